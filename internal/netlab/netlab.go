// Package netlab builds two "hosts" on one Linux machine: two network
// namespaces joined by a veth pair, each end with its own address. It is
// the lab of the cross-host proof (TestMultiHostPD) and of `pegaflow demo
// --hosts 2`: processes started inside a namespace see only its loopback
// and its end of the link, so traffic between the hosts crosses the veth
// as it would cross a wire.
//
// Building a lab needs root and iproute2's `ip` (Check). A Lab owns its
// namespaces until Close; deleting a namespace removes its veth end and
// so the pair. Processes still running in a deleted namespace keep it
// alive (unnamed) until they exit: stop them before Close.
package netlab

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pegaflow/pegaflow/internal/ids"
)

// The hosts' addresses on the link, in 10.77.0.0/24. They are the same in
// every lab: each lab's namespaces see only their own link, so labs never
// collide; the namespace and interface names are what is unique per lab.
const (
	IPA = "10.77.0.1"
	IPB = "10.77.0.2"
)

// maxPrefix keeps a veth name (prefix, a letter, 6 hex digits) within
// Linux's 15 bytes of an interface name.
const maxPrefix = 8

// Host is one namespace of a lab and its end of the veth pair.
type Host struct {
	// NS is the namespace's name (`ip netns`, /var/run/netns/NS).
	NS string
	// Veth is this host's end of the pair, inside NS.
	Veth string
	// IP is this host's address on Veth (a /24 shared with the other end).
	IP string
}

// Lab is two hosts, A at IPA and B at IPB, joined by a veth pair. A and B
// are fixed once New returns; Close is safe to call from several
// goroutines and more than once.
type Lab struct {
	A, B Host

	closeOnce sync.Once
	closeErr  error
}

// Check reports why a lab cannot be built here (nil when it can): not
// root, or no `ip` on PATH. It does not try the kernel's netns support;
// New does.
func Check() error {
	if os.Geteuid() != 0 {
		return errors.New("network namespaces need root (ip netns, veth)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("network namespaces need iproute2's ip: %w", err)
	}
	return nil
}

// New creates the namespaces prefix+"A-"+suffix and prefix+"B-"+suffix
// (suffix random, 6 hex digits), the veth pair between them (lowercase
// prefix+"a"/"b"+suffix), brings both ends and both loopbacks up and
// assigns the addresses. prefix is 1 to 8 characters of [A-Za-z0-9].
// On any error, what was created is deleted before New returns; on
// success the caller must Close the lab.
func New(ctx context.Context, prefix string) (*Lab, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, err
	}
	if err := Check(); err != nil {
		return nil, err
	}
	sfx := ids.Hex(3)
	low := strings.ToLower(prefix)
	l := &Lab{
		A: Host{NS: prefix + "A-" + sfx, Veth: low + "a" + sfx, IP: IPA},
		B: Host{NS: prefix + "B-" + sfx, Veth: low + "b" + sfx, IP: IPB},
	}
	steps := [][]string{
		{"netns", "add", l.A.NS},
		{"netns", "add", l.B.NS},
		{"link", "add", l.A.Veth, "type", "veth", "peer", "name", l.B.Veth},
		{"link", "set", l.A.Veth, "netns", l.A.NS},
		{"link", "set", l.B.Veth, "netns", l.B.NS},
	}
	for _, h := range []Host{l.A, l.B} {
		steps = append(steps,
			[]string{"-n", h.NS, "link", "set", "lo", "up"},
			[]string{"-n", h.NS, "addr", "add", h.IP + "/24", "dev", h.Veth},
			[]string{"-n", h.NS, "link", "set", h.Veth, "up"})
	}
	const vethAdded, vethMoved = 3, 5 // steps[:vethAdded] made the pair, steps[:vethMoved] moved both ends
	for i, s := range steps {
		if err := run(ctx, "ip", s...); err != nil {
			if i >= vethAdded && i < vethMoved {
				// An end still in the root namespace is in neither
				// namespace Close deletes; deleting it deletes the pair.
				_ = exec.Command("ip", "link", "del", l.A.Veth).Run()
				_ = exec.Command("ip", "link", "del", l.B.Veth).Run()
			}
			return nil, errors.Join(fmt.Errorf("network namespace setup: %w", err), l.Close())
		}
	}
	return l, nil
}

func checkPrefix(p string) error {
	if p == "" || len(p) > maxPrefix {
		return fmt.Errorf("netlab prefix %q: want 1 to %d characters", p, maxPrefix)
	}
	for _, r := range p {
		if !('a' <= r && r <= 'z' || 'A' <= r && r <= 'Z' || '0' <= r && r <= '9') {
			return fmt.Errorf("netlab prefix %q: want letters and digits only", p)
		}
	}
	return nil
}

// closeTimeout bounds each `ip netns del` of Close.
const closeTimeout = 30 * time.Second

// Close deletes both namespaces (and with them the veth pair). It needs
// no context so that it runs after the caller's was cancelled; each
// deletion has its own deadline (closeTimeout). Only the first call acts,
// later ones return its result. A namespace already gone is not an error.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		var errs []error
		for _, ns := range []string{l.A.NS, l.B.NS} {
			if _, err := os.Stat(nsPath(ns)); errors.Is(err, os.ErrNotExist) {
				continue
			}
			ctx, cancel := context.WithTimeout(context.Background(), closeTimeout)
			err := run(ctx, "ip", "netns", "del", ns)
			cancel()
			if err != nil {
				errs = append(errs, err)
			}
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// Addr is host:port on h's address.
func (h Host) Addr(port int) string { return net.JoinHostPort(h.IP, strconv.Itoa(port)) }

// Command returns `ip netns exec NS name args...`, not started. ip enters
// the namespace and execs name in place (no fork), so the process is name
// itself: its pid, process group, signals, Pdeathsig and exit status are
// name's. The caller sets Env, output and SysProcAttr.
func (h Host) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

// Run runs name inside h's namespace to completion; the error carries the
// command's combined output.
func (h Host) Run(ctx context.Context, name string, args ...string) error {
	return run(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
}

func nsPath(ns string) string { return "/var/run/netns/" + ns }

func run(ctx context.Context, name string, args ...string) error {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}
