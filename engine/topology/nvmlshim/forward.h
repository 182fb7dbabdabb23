// The forwarder pattern of package nvmlshim (see doc.go); the generated
// zz_generated_forwarders.c instantiates it once per NVML function.
#ifndef PF_NVML_FORWARD_H
#define PF_NVML_FORWARD_H

// pf_nvml_resolve looks name up in the NVML library go-nvml loaded. It sets
// *lib to a reference to that library (NULL when NVML is not loaded) that
// keeps it mapped until pf_nvml_release, and returns the function, or NULL
// when NVML is not loaded or lacks it.
void *pf_nvml_resolve(const char *name, void **lib);
void pf_nvml_release(void *lib);

// PF_NVML_FORWARD defines name with the ABI-level signature params, calling
// NVML's own name with args while holding the library; absent and missing
// are the results when NVML is not loaded and when it lacks the function.
//
// Hidden visibility: the definition satisfies go-nvml's reference at link
// time but is not exported, so with --export-dynamic (go-nvml's flags) it
// still cannot interpose on NVML's calls to its own functions, and nothing
// but go-nvml's code in this binary calls it.
#define PF_NVML_FORWARD(ret, name, params, args, absent, missing) \
	__attribute__((visibility("hidden"))) ret name params { \
		void *lib; \
		ret (*fn) params = (ret (*) params)pf_nvml_resolve(#name, &lib); \
		if (fn == 0) { \
			if (lib == 0) \
				return absent; \
			pf_nvml_release(lib); \
			return missing; \
		} \
		ret result = fn args; \
		pf_nvml_release(lib); \
		return result; \
	}

#endif
