// The run-time half of the NVML forwarders: finding the function in the
// NVML library go-nvml opened.
#include <dlfcn.h>
#include <stddef.h>

#include "forward.h"

// go-nvml's library name. RTLD_NOLOAD matches a loaded object by this name
// or by its DT_SONAME, so an NVML go-nvml opened by full path is found too.
static const char pf_nvml_soname[] = "libnvidia-ml.so.1";

void *pf_nvml_resolve(const char *name, void **lib) {
	// RTLD_NOLOAD: never load NVML here (go-nvml's Init decides that);
	// the reference taken keeps the library mapped through the call even if
	// go-nvml's Shutdown dlcloses it meanwhile. A lookup in the library's
	// own handle searches it and its dependencies, never this executable,
	// so a forwarder cannot resolve to itself.
	*lib = dlopen(pf_nvml_soname, RTLD_LAZY | RTLD_NOLOAD);
	if (*lib == NULL) {
		(void)dlerror(); // leave no stale error for go-nvml's own dlsym checks
		return NULL;
	}
	void *fn = dlsym(*lib, name);
	if (fn == NULL)
		(void)dlerror();
	return fn;
}

void pf_nvml_release(void *lib) {
	dlclose(lib);
}
