package engine

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/pegaflow/pegaflow/native"
)

// cudaDevice is the CUDA ordinal, in the engine's process, of a CUDA IPC
// region's device. The worker names its device by UUID because ordinals
// differ between processes (each vLLM worker usually sees one GPU as
// device 0 through CUDA_VISIBLE_DEVICES; the engine sees them all). An
// empty UUID (an old connector, a torch without device UUIDs) keeps the
// historical device 0, which is right on single-GPU hosts only.
func cudaDevice(spec regionSpec) (int, error) {
	if spec.deviceUUID == "" {
		return -1, nil
	}
	dev, err := native.CUDADeviceByUUID(spec.deviceUUID)
	switch {
	case err == nil:
		return dev, nil
	case errors.Is(err, native.ErrNotSupported):
		// CPU build: opening the handle fails with the clearer message.
		return -1, nil
	case errors.Is(err, native.ErrNoDevice), errors.Is(err, native.ErrIO):
		visible, set := os.LookupEnv("CUDA_VISIBLE_DEVICES")
		if !set {
			visible = "(unset)"
		}
		return -1, fmt.Errorf("%w: device %s is not visible to the engine (CUDA_VISIBLE_DEVICES=%s); "+
			"run the engine where it sees every GPU its workers use: %w", ErrPrecondition, spec.deviceUUID, visible, err)
	default:
		return -1, fmt.Errorf("%w: device_uuid %q: %w", ErrInvalid, spec.deviceUUID, err)
	}
}

// openProducerEvent opens the worker's interprocess CUDA event, if it sent
// one, on the device of its first CUDA region. Failure is not an error:
// the registration stands, RegisterResponse.cuda_event tells the worker
// that it must order its saves itself (host-side event sync on its save
// thread), which is correct, only slower.
func openProducerEvent(log *slog.Logger, req *registration) *native.Event {
	handle := req.event
	if len(handle) == 0 {
		return nil
	}
	dev, found := -1, false
	for _, spec := range req.layout.regions {
		if spec.ipcHandle != nil {
			d, err := cudaDevice(spec)
			if err != nil {
				log.Warn("producer event not opened: region device", "instance", req.instanceID, "rank", req.rank, "err", err)
				return nil
			}
			dev, found = d, true
			break
		}
	}
	if !found {
		return nil // shm regions: nothing on a GPU to order
	}
	ev, err := native.OpenCUDAIPCEvent(handle, dev)
	if err != nil {
		log.Warn("producer event not opened; the worker orders its saves on the host", "instance", req.instanceID,
			"rank", req.rank, "device", dev, "err", err)
		return nil
	}
	return ev
}

// openMemory opens a registration's regions and, if the worker sent one,
// its producer event.
func (e *Engine) openMemory(req *registration) ([]*native.Region, *native.Event, error) {
	regions, err := openRegions(req.layout.regions, e.cfg.ShmDir, req.peer)
	if err != nil {
		return nil, nil, err
	}
	return regions, openProducerEvent(e.log, req), nil
}

func closeEvent(ev *native.Event) {
	if ev != nil {
		_ = ev.Close()
	}
}
