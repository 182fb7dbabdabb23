//go:build !noucx

package main

/*
#cgo pkg-config: ucx
#include "ucx_baseline.h"
*/
import "C"

import (
	"context"
	"fmt"
	"os"
	"syscall"
	"text/tabwriter"
	"time"
	"unsafe"

	"github.com/pegaflow/pegaflow/native"
)

type xferResult struct {
	ExtentBytes int     `json:"extent_bytes"`
	Extents     int     `json:"extents_per_batch"`
	AgentGBps   float64 `json:"agent_gbps"`
	UCXGBps     float64 `json:"ucp_get_nbx_gbps"`
	Ratio       float64 `json:"ratio"`
}

// runXfer measures XferPeer.Get between two agents in this process against
// a plain ucp_get_nbx loop over the same memory and offsets, for 16 KiB to
// 2 MiB extents scattered over the source (so nothing is contiguous).
func runXfer(batch uint64, iters int) ([]xferResult, error) {
	if os.Getenv("UCX_TLS") == "" {
		os.Setenv("UCX_TLS", "tcp")
	}
	srcSize := 2 * batch
	src, err := syscall.Mmap(-1, 0, int(srcSize), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, err
	}
	defer syscall.Munmap(src)
	dst, err := syscall.Mmap(-1, 0, int(batch), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANON)
	if err != nil {
		return nil, err
	}
	defer syscall.Munmap(dst)
	for i := range src {
		src[i] = byte(i)
	}
	clear(dst) // fault every page in

	target, err := native.NewXferAgent()
	if err != nil {
		return nil, err
	}
	defer target.Close()
	reader, err := native.NewXferAgent()
	if err != nil {
		return nil, err
	}
	defer reader.Close()
	sm, err := target.RegisterMemory(unsafe.Pointer(&src[0]), srcSize)
	if err != nil {
		return nil, err
	}
	dm, err := reader.RegisterMemory(unsafe.Pointer(&dst[0]), batch)
	if err != nil {
		return nil, err
	}
	peer, err := reader.Connect(target.Address())
	if err != nil {
		return nil, err
	}
	region, err := peer.AddRemoteRegion(sm.RKey(), sm.Base(), sm.Size())
	if err != nil {
		return nil, err
	}
	ctx := context.Background()

	var results []xferResult
	for ext := uint64(16 << 10); ext <= 2<<20; ext *= 2 {
		n := batch / ext
		slots := srcSize / ext
		ops := make([]native.XferOp, n)
		roffs := make([]uint64, n)
		for i := range ops {
			roffs[i] = (uint64(i)*7 + 3) % slots * ext // 7 is coprime with the power-of-two slot count
			ops[i] = native.XferOp{RemoteOffset: roffs[i], LocalOffset: uint64(i) * ext, Len: ext}
		}
		if err := peer.Get(ctx, region, dm, ops); err != nil { // warm-up
			return nil, err
		}
		start := time.Now()
		for range iters {
			if err := peer.Get(ctx, region, dm, ops); err != nil {
				return nil, err
			}
		}
		agent := time.Since(start).Seconds()
		bare := float64(C.pfb_ucx_get_loop(unsafe.Pointer(&src[0]), C.uint64_t(srcSize), unsafe.Pointer(&dst[0]),
			C.uint64_t(batch), (*C.uint64_t)(unsafe.Pointer(&roffs[0])), C.uint64_t(n), C.uint64_t(ext), C.int(iters)))
		if bare <= 0 {
			return nil, fmt.Errorf("ucp_get_nbx baseline failed: ucs_status %d", int(bare))
		}
		bytes := float64(batch) * float64(iters)
		r := xferResult{ExtentBytes: int(ext), Extents: int(n), AgentGBps: bytes / agent / 1e9, UCXGBps: bytes / bare / 1e9}
		r.Ratio = r.AgentGBps / r.UCXGBps
		results = append(results, r)
	}
	return results, nil
}

func printXfer(results []xferResult, batchMiB int) {
	fmt.Printf("UCX transfer agent (XferPeer.Get) vs plain ucp_get_nbx, UCX_TLS=%s, batches of %d MiB, %d CPUs\n",
		os.Getenv("UCX_TLS"), batchMiB, runtimeCPUs())
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "extent\textents/batch\tagent GB/s\tucp_get_nbx GB/s\tratio\t")
	for _, r := range results {
		fmt.Fprintf(tw, "%s\t%d\t%.2f\t%.2f\t%.2fx\t\n", size(r.ExtentBytes), r.Extents, r.AgentGBps, r.UCXGBps, r.Ratio)
	}
	tw.Flush()
}
