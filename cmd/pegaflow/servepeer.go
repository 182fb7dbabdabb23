package main

import (
	"flag"
	"log/slog"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/peer"
)

// peerFlags are serve's cross-host flags (docs/multi-host.md).
type peerFlags struct {
	addr, tokenFile string
	insecure        bool
	token           []byte // loaded from tokenFile by check
}

func bindPeerFlags(fs *flag.FlagSet, f *peerFlags) {
	fs.StringVar(&f.addr, "peer-addr", "", "TCP host:port to serve the peer API to other engines on (cross-host P/D); "+
		"also starts UCX and lets queries fetch from peers (source_engine). Empty: no peers, no UCX")
	fs.StringVar(&f.tokenFile, "peer-token-file", "", "file holding the shared peer token (mode 0600, >= 32 bytes) that every engine of the deployment sends and expects")
	fs.BoolVar(&f.insecure, "peer-insecure", false, "serve the peer API without a token: only on a loopback --peer-addr (tests, one-host trials)")
}

// check loads the token and refuses a peer service without one.
func (f *peerFlags) check() error {
	if f.addr == "" {
		return nil
	}
	if f.tokenFile != "" {
		tok, err := peer.LoadToken(f.tokenFile)
		if err != nil {
			return err
		}
		f.token = tok
	}
	return f.config().Validate()
}

func (f *peerFlags) config() peer.Config {
	return peer.Config{Addr: f.addr, Token: f.token, Insecure: f.insecure}
}

// control is the engine's client to other engines; nil without --peer-addr.
func (f *peerFlags) control() *peer.Client {
	if f.addr == "" {
		return nil
	}
	return peer.NewClient(f.token)
}

// listen opens the peer API's listener; nil without --peer-addr.
func (f *peerFlags) listen(eng *engine.Engine, log *slog.Logger) (*peer.Server, error) {
	if f.addr == "" {
		return nil, nil
	}
	return peer.New(f.config(), eng, log.With("component", "peer"))
}
