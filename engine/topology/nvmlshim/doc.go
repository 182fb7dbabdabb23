// Package nvmlshim lets the binary link with full RELRO (-z now) while it
// uses go-nvml.
//
// go-nvml's cgo code calls NVML's C functions directly and links with
// --unresolved-symbols=ignore-in-object-files: about 430 nvml* symbols stay
// undefined in the binary and are bound lazily, after go-nvml's Init has
// dlopened libnvidia-ml.so.1 with RTLD_GLOBAL. With BIND_NOW the loader binds
// them at start, where nothing defines them, and the binary does not start,
// with or without a driver.
//
// This package defines each of those symbols (zz_generated_forwarders.c) as
// a forwarder: it looks the same name up in the libnvidia-ml.so.1 go-nvml
// opened (dlopen RTLD_NOLOAD, never loading it itself), calls it with the
// same arguments and returns its result; NVML_ERROR_LIBRARY_NOT_FOUND when
// NVML is not loaded, NVML_ERROR_FUNCTION_NOT_FOUND when this NVML lacks the
// function (where lazy binding would have killed the process). The
// definitions are hidden, so the binary exports no nvml* symbol and NVML's
// calls to itself never come back here. Importing the package is all a
// user does; engine/topology imports it for its side effect.
//
// The forwarders are generated from go-nvml's nvml.h by ./gen (`make
// nvml-shim`, after a go-nvml upgrade); the tests fail while they are stale
// or while the binary has an undefined nvml* symbol.
//
// Files: doc.go (this), forward.h (the forwarder), forward.c (the lookup),
// zz_generated_forwarders.c (one forwarder per function), gen/ (the
// generator).
package nvmlshim

// #cgo LDFLAGS: -ldl
import "C"

//go:generate go run ./gen -o zz_generated_forwarders.c
