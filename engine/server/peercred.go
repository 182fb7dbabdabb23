package server

import (
	"context"
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	"github.com/pegaflow/pegaflow/engine"
)

// peerCreds is the server's transport security on the UNIX socket: it adds
// nothing to the wire, but records every connection's peer credentials
// (SO_PEERCRED: the uid, gid and pid of the process that connected, as the
// kernel saw them at connect time) so handlers can authorise by them.
type peerCreds struct{}

// peerAuthInfo is a connection's peer, as handlers find it through
// peer.FromContext.
type peerAuthInfo struct {
	credentials.CommonAuthInfo
	engine.Peer
}

func (peerAuthInfo) AuthType() string { return "unix-peercred" }

func (peerCreds) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		return nil, nil, fmt.Errorf("peer credentials: %T is not a UNIX socket connection", conn)
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return nil, nil, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, nil, fmt.Errorf("peer credentials: %w", err)
	}
	if credErr != nil {
		return nil, nil, fmt.Errorf("peer credentials (SO_PEERCRED): %w", credErr)
	}
	info := peerAuthInfo{
		CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity},
		Peer:           engine.Peer{UID: cred.Uid, GID: cred.Gid, PID: cred.Pid},
	}
	return conn, info, nil
}

func (peerCreds) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("peer credentials are server-side only")
}

func (peerCreds) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "unix-peercred"}
}

func (c peerCreds) Clone() credentials.TransportCredentials { return c }

func (peerCreds) OverrideServerName(string) error { return nil }

// errNoPeer: a request arrived without peer credentials (not over the UNIX
// socket this server listens on), so nothing can be authorised for it.
var errNoPeer = fmt.Errorf("%w: no peer credentials on this connection", engine.ErrPermission)

// withPeer passes the caller's credentials on to the engine.
func withPeer(ctx context.Context) (context.Context, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, errNoPeer
	}
	info, ok := p.AuthInfo.(peerAuthInfo)
	if !ok {
		return nil, errNoPeer
	}
	return engine.WithPeer(ctx, info.Peer), nil
}
