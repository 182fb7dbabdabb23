//go:build !noucx

package main

/*
#cgo pkg-config: ucx
#include "ucx_baseline.h"
*/
import "C"

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

// ucxTarget is what -ucx-get-target prints on its first stdout line and
// -ucx-get-initiator reads from stdin: enough to read the target's region
// with plain UCX.
type ucxTarget struct {
	Address []byte `json:"address"` // worker address blob
	RKey    []byte `json:"rkey"`    // packed rkey of the region
	Base    uint64 `json:"base"`
	Size    uint64 `json:"size"`
}

// ucxGetResult is one -ucx-get-initiator run.
type ucxGetResult struct {
	ExtentBytes uint64  `json:"extent_bytes"`
	BatchBytes  uint64  `json:"batch_bytes"`
	Batches     int     `json:"batches"`
	Window      int     `json:"window"`
	Seconds     float64 `json:"seconds"`
	GBps        float64 `json:"gbps"`
}

func mapAnon(size uint64) ([]byte, error) {
	if size == 0 || size > 1<<40 {
		return nil, fmt.Errorf("mapping of %d bytes", size)
	}
	return syscall.Mmap(-1, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
}

// runUCXGetTarget registers a region of size bytes (every page written, as
// an engine's pool pages are by the saves), prints its ucxTarget line and
// serves GETs until stdin is closed.
func runUCXGetTarget(size uint64) error {
	buf, err := mapAnon(size)
	if err != nil {
		return err
	}
	defer syscall.Munmap(buf)
	for i := 0; i < len(buf); i += 4096 {
		buf[i] = byte(i >> 12)
	}
	var t *C.pfb_target
	if st := C.pfb_target_open(unsafe.Pointer(&buf[0]), C.uint64_t(size), &t); st != 0 {
		return fmt.Errorf("target: ucs_status %d", int(st))
	}
	defer C.pfb_target_close(t)
	info := ucxTarget{Base: uint64(uintptr(unsafe.Pointer(&buf[0]))), Size: size}
	for which, dst := range []*[]byte{&info.Address, &info.RKey} {
		b := make([]byte, C.PFB_MAX_BLOB)
		n := C.pfb_target_blob(t, C.int(which), (*C.uint8_t)(unsafe.Pointer(&b[0])), C.uint64_t(len(b)))
		if n < 0 {
			return fmt.Errorf("target blob %d: ucs_status %d", which, int(n))
		}
		*dst = b[:n]
	}
	line, err := json.Marshal(info)
	if err != nil {
		return err
	}
	if _, err := os.Stdout.Write(append(line, '\n')); err != nil {
		return err
	}
	if st := C.pfb_target_serve(t, C.int(os.Stdin.Fd())); st != 0 {
		return fmt.Errorf("target: ucs_status %d", int(st))
	}
	return nil
}

// runUCXGetInitiator reads a ucxTarget line from stdin and reads batches
// of batch bytes from the target in extents of extent bytes, at most
// window outstanding: one warm-up batch, then batches timed.
func runUCXGetInitiator(extent, batch uint64, batches, window int) (ucxGetResult, error) {
	line, err := bufio.NewReaderSize(os.Stdin, 4<<20).ReadBytes('\n')
	if err != nil {
		return ucxGetResult{}, fmt.Errorf("reading the target's line: %w", err)
	}
	var t ucxTarget
	if err := json.Unmarshal(line, &t); err != nil {
		return ucxGetResult{}, fmt.Errorf("the target's line: %w", err)
	}
	if len(t.Address) == 0 || len(t.RKey) == 0 {
		return ucxGetResult{}, errors.New("the target's line has no address or rkey")
	}
	dst, err := mapAnon(batch)
	if err != nil {
		return ucxGetResult{}, err
	}
	defer syscall.Munmap(dst)
	clear(dst) // fault every page in, as a pool's are
	secs := float64(C.pfb_initiator_run((*C.uint8_t)(unsafe.Pointer(&t.Address[0])), C.uint64_t(len(t.Address)),
		(*C.uint8_t)(unsafe.Pointer(&t.RKey[0])), C.uint64_t(len(t.RKey)), C.uint64_t(t.Base), C.uint64_t(t.Size),
		unsafe.Pointer(&dst[0]), C.uint64_t(batch), C.uint64_t(extent), C.uint64_t(window), C.uint64_t(batches)))
	if secs <= 0 {
		return ucxGetResult{}, fmt.Errorf("initiator: ucs_status %d", int(secs))
	}
	n := batch / extent * extent
	return ucxGetResult{ExtentBytes: extent, BatchBytes: n, Batches: batches, Window: window, Seconds: secs,
		GBps: float64(n) * float64(batches) / secs / 1e9}, nil
}
