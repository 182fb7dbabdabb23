//go:build !cuda

package native

// nativeBuildDir is the CMake build directory this build links.
const nativeBuildDir = "native"
