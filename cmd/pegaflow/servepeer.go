package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/peer"
	"github.com/pegaflow/pegaflow/internal/cli"
)

// peerFlags are serve's cross-host flags (docs/multi-host.md).
type peerFlags struct {
	addr, tokenFile string
	transport       string
	advertise       string // where peers reach addr; check defaults it to addr
	allow           cli.StringList
	insecure        bool
	token           []byte // loaded from tokenFile by check
}

func bindPeerFlags(fs *flag.FlagSet, f *peerFlags) {
	fs.StringVar(&f.addr, "peer-addr", "", "TCP host:port to serve the peer API to other engines on (cross-host P/D); "+
		"also starts UCX and lets queries fetch from peers (source_engine). Empty: no peers, no UCX")
	fs.StringVar(&f.transport, "peer-transport", engine.PeerTransportTCP, "how fetched KV bytes move between engines: \"tcp\" (a stream on --peer-addr "+
		"that sends only whole shares of a transfer the reader opened) or \"rdma\" (UCX one-sided reads; needs UCX_TLS naming RDMA transports only, e.g. rc,ud)")
	fs.StringVar(&f.tokenFile, "peer-token-file", "", "file holding the shared peer token (mode 0600, >= 32 bytes) that every engine of the deployment sends and expects; "+
		"a router with --lb kv shows it to the remote engines it looks up (also with --engine=false)")
	fs.BoolVar(&f.insecure, "peer-insecure", false, "serve the peer API without a token: only on a loopback --peer-addr (tests, one-host trials)")
	fs.StringVar(&f.advertise, "peer-advertise", "", "HOST:PORT other engines reach --peer-addr at, reported to clients (Attach) and in /kv_ready "+
		"as the source engine (default --peer-addr; required when it binds every address, e.g. 0.0.0.0:7400)")
	fs.Var(&f.allow, "peer-allow", "source engines a query may fetch from (repeatable): a peer's host:port, a subnet with its port like 10.1.0.0/24:7400, or loopback:PORT "+
		"(default: none; every entry needs a port). The engine sends its peer token to the source a query names, so list only peer engines")
}

// check loads the token and refuses a peer service without one, and
// settles the advertised address.
func (f *peerFlags) check() error {
	if err := engine.CheckPeerAllow(f.allow); err != nil {
		return err
	}
	if err := engine.CheckPeerTransport(f.transport, os.Getenv); err != nil {
		return err
	}
	if f.tokenFile != "" {
		// Read even without --peer-addr: a router's --lb kv shows it to
		// the engines it looks up (servekv.go).
		tok, err := peer.LoadToken(f.tokenFile)
		if err != nil {
			return err
		}
		f.token = tok
	}
	if f.addr == "" {
		if f.advertise != "" || len(f.allow) > 0 {
			return errors.New("--peer-advertise and --peer-allow need --peer-addr (an engine without it never fetches from peers)")
		}
		return nil
	}
	if err := f.checkAdvertise(); err != nil {
		return err
	}
	if err := f.restrictUCX(); err != nil {
		return err
	}
	return f.config(nil).Validate()
}

// checkAdvertise defaults --peer-advertise to --peer-addr, which must
// then name one address, and refuses an advertised address peers cannot
// dial.
func (f *peerFlags) checkAdvertise() error {
	host, _, err := net.SplitHostPort(f.addr)
	if err != nil {
		return fmt.Errorf("--peer-addr %q: %w", f.addr, err)
	}
	if f.advertise == "" {
		if unspecifiedHost(host) {
			return fmt.Errorf("--peer-addr %q binds every address: give --peer-advertise HOST:PORT, the address peer engines reach this one at", f.addr)
		}
		f.advertise = f.addr
		return nil
	}
	ahost, aport, err := net.SplitHostPort(f.advertise)
	if err != nil || aport == "" || unspecifiedHost(ahost) {
		return fmt.Errorf("--peer-advertise %q: want the HOST:PORT peer engines dial (not an unspecified address)", f.advertise)
	}
	return nil
}

// restrictUCX keeps --peer-transport=rdma's UCX on the NIC of --peer-addr
// unless the operator named the devices: UCX_NET_DEVICES is set, for
// the engine's UCX agent (which reads it at start and logs it), to the
// RDMA device and port behind the interface holding that address.
func (f *peerFlags) restrictUCX() error {
	if f.transport != engine.PeerTransportRDMA || os.Getenv("UCX_NET_DEVICES") != "" {
		return nil
	}
	host, _, _ := net.SplitHostPort(f.addr)
	ip := net.ParseIP(host)
	if ip == nil {
		return fmt.Errorf("--peer-transport=rdma with --peer-addr %q (a name): set UCX_NET_DEVICES to the KV NIC's RDMA device (e.g. mlx5_0:1)", f.addr)
	}
	ifaces, err := net.Interfaces()
	if err != nil {
		return fmt.Errorf("--peer-transport=rdma: list interfaces: %w", err)
	}
	dev, err := engine.RDMADeviceFor(ip, ifaces, func(i net.Interface) ([]net.Addr, error) { return i.Addrs() }, os.DirFS("/sys"))
	if err != nil {
		return err
	}
	return os.Setenv("UCX_NET_DEVICES", dev)
}

func unspecifiedHost(host string) bool {
	ip := net.ParseIP(host)
	return host == "" || (ip != nil && ip.IsUnspecified())
}

func (f *peerFlags) config(reg prometheus.Registerer) peer.Config {
	return peer.Config{Addr: f.addr, Token: f.token, Insecure: f.insecure, Registerer: reg}
}

// control is the engine's client to other engines; nil without --peer-addr.
func (f *peerFlags) control() *peer.Client {
	if f.addr == "" {
		return nil
	}
	return peer.NewClient(f.token)
}

// listen opens the peer API's listener; nil without --peer-addr.
func (f *peerFlags) listen(eng *engine.Engine, reg prometheus.Registerer, log *slog.Logger) (*peer.Server, error) {
	if f.addr == "" {
		return nil, nil
	}
	return peer.New(f.config(reg), eng, log.With("component", "peer"))
}
