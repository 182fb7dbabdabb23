// A stand-in libnvidia-ml.so.1 for tests: two GPUs with fixed facts, and
// only the functions below, so every other NVML call meets a library that
// lacks it. Declared at the ABI level (handles are pointers, enums and
// nvmlReturn_t unsigned int) with the layouts of NVML's structs as go-nvml
// reads them.
#include <stdio.h>
#include <string.h>

enum { SUCCESS = 0, ERROR_UNINITIALIZED = 1, ERROR_INVALID_ARGUMENT = 2, ERROR_NOT_SUPPORTED = 3 };
enum { GPUS = 2 };

typedef struct {
	char busIdLegacy[16];
	unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
	char busId[32];
} pciInfo;

typedef struct {
	unsigned long long total, free, used;
} memory;

static int initialised;

// A handle is 1 + the GPU's index, never NULL.
static int gpu(void *h) {
	long i = (long)h - 1;
	return initialised && i >= 0 && i < GPUS ? (int)i : -1;
}

unsigned int nvmlInit_v2(void) { initialised = 1; return SUCCESS; }
unsigned int nvmlShutdown(void) { initialised = 0; return SUCCESS; }

unsigned int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
	if (!initialised) return ERROR_UNINITIALIZED;
	snprintf(version, length, "999.88.77");
	return SUCCESS;
}

unsigned int nvmlDeviceGetCount_v2(unsigned int *count) {
	if (!initialised) return ERROR_UNINITIALIZED;
	*count = GPUS;
	return SUCCESS;
}

unsigned int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device) {
	if (!initialised) return ERROR_UNINITIALIZED;
	if (index >= GPUS) return ERROR_INVALID_ARGUMENT;
	*device = (void *)(long)(index + 1);
	return SUCCESS;
}

unsigned int nvmlDeviceGetIndex(void *device, unsigned int *index) {
	int i = gpu(device);
	if (i < 0) return ERROR_INVALID_ARGUMENT;
	*index = (unsigned int)i;
	return SUCCESS;
}

unsigned int nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length) {
	int i = gpu(device);
	if (i < 0) return ERROR_INVALID_ARGUMENT;
	snprintf(uuid, length, "GPU-fake-%d", i);
	return SUCCESS;
}

unsigned int nvmlDeviceGetName(void *device, char *name, unsigned int length) {
	if (gpu(device) < 0) return ERROR_INVALID_ARGUMENT;
	snprintf(name, length, "Fake GPU");
	return SUCCESS;
}

unsigned int nvmlDeviceGetPciInfo_v3(void *device, pciInfo *pci) {
	int i = gpu(device);
	if (i < 0) return ERROR_INVALID_ARGUMENT;
	memset(pci, 0, sizeof *pci);
	snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", 0xF0 + i);
	return SUCCESS;
}

unsigned int nvmlDeviceGetMemoryInfo(void *device, memory *m) {
	int i = gpu(device);
	if (i < 0) return ERROR_INVALID_ARGUMENT;
	m->total = (unsigned long long)(i + 1) << 30;
	m->free = m->total;
	m->used = 0;
	return SUCCESS;
}

// One active link (link 0) per GPU: a call with a by-value argument
// besides the handle.
unsigned int nvmlDeviceGetNvLinkState(void *device, unsigned int link, unsigned int *isActive) {
	if (gpu(device) < 0) return ERROR_INVALID_ARGUMENT;
	if (link >= 2) return ERROR_NOT_SUPPORTED;
	*isActive = link == 0;
	return SUCCESS;
}

const char *nvmlErrorString(unsigned int result) {
	return result == SUCCESS ? "fake: success" : "fake: error";
}
