package main

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// otherCPUs are the cores but core (all of them on a one-core machine).
func otherCPUs(core int) []int {
	var cores []int
	for i := range runtime.NumCPU() {
		if i != core {
			cores = append(cores, i)
		}
	}
	if len(cores) == 0 {
		cores = []int{core}
	}
	return cores
}

func cpuList(cores []int) string {
	s := make([]string, len(cores))
	for i, c := range cores {
		s[i] = strconv.Itoa(c)
	}
	return strings.Join(s, ",")
}

// pinSelf re-executes the bench under taskset on cores (once): every
// thread of the load generator then runs there.
func pinSelf(cores []int) error {
	const mark = "PEGAFLOW_BENCH_PINNED"
	if os.Getenv(mark) != "" {
		return nil
	}
	ts, err := exec.LookPath("taskset")
	if err != nil {
		return err
	}
	exe, err := os.Executable()
	if err != nil {
		return err
	}
	args := append([]string{"taskset", "-c", cpuList(cores), exe}, os.Args[1:]...)
	return syscall.Exec(ts, args, append(os.Environ(), mark+"=1"))
}

// freeAddr reserves a loopback address (closed again at once).
func freeAddr() string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fatal(fmt.Errorf("reserve a port: %w", err))
	}
	defer lis.Close()
	return lis.Addr().String()
}
