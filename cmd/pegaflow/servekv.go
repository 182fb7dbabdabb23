package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/pegaflow/pegaflow/engine"
	"github.com/pegaflow/pegaflow/engine/kvlookup"
	"github.com/pegaflow/pegaflow/router"
)

// --lb kv in serve: the router maps each backend to its engine's peer
// address (--kv-engine, --kv-engine-port) and asks kvlookup, which
// answers the engine in this process itself and dials the others with
// the peer token (--peer-token-file, read even without --peer-addr: a
// router alone needs it to reach the engines).

// checkKV refuses --lb kv setups that could never see a hit: a router
// alone with no engine mapped, or remote engines and no token to show
// them.
func (f *serveFlags) checkKV() error {
	rc := f.router
	if !rc.Enabled() || rc.LB != router.LBKV {
		return nil
	}
	remote := len(rc.KVEngines) > 0 || rc.KVEnginePort > 0
	if !f.engine && !remote {
		return errors.New("--lb kv with --engine=false: there is no engine in this process to ask; " +
			"map the backends to their engines with --kv-engine BACKEND_HOST[:PORT]=ENGINE_HOST:PORT or --kv-engine-port")
	}
	if remote && f.peer.token == nil && !f.peer.insecure {
		return errors.New("--lb kv asks remote engines (--kv-engine, --kv-engine-port) over their peer API: " +
			"give --peer-token-file (the engines' peer token), or --peer-insecure for engines serving without one")
	}
	return nil
}

// kvIndex is the router's KVIndex over kvlookup.
type kvIndex struct{ x *kvlookup.Index }

func (k kvIndex) Lookup(ctx context.Context, engineAddr string, q router.KVQuery) (int, error) {
	return k.x.Lookup(ctx, engineAddr, kvlookup.Query(q))
}

// newKVIndex is the router's KVIndex under --lb kv (nil otherwise; close
// it when the router is done): eng, when this process runs one, answers
// for its own advertised peer address and router.LocalEngine.
func newKVIndex(f *serveFlags, eng *engine.Engine, log *slog.Logger) *kvlookup.Index {
	if !f.router.Enabled() || f.router.LB != router.LBKV {
		return nil
	}
	cfg := kvlookup.Config{Token: f.peer.token, Log: log.With("component", "kvlookup")}
	if eng != nil {
		cfg.Local, cfg.LocalAddr = eng, f.peer.advertise
	}
	return kvlookup.New(cfg)
}
