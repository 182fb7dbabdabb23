package peer

import (
	"context"
	"crypto/subtle"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/grpc/tap"
)

// TokenHeader is the gRPC metadata key carrying the shared peer token.
const TokenHeader = "pegaflow-peer-token"

// MinTokenBytes is the shortest token LoadToken accepts (128 bits as hex).
const MinTokenBytes = 32

// LoadToken reads the shared peer token from path: its content with
// surrounding whitespace trimmed, at least MinTokenBytes long, in a file
// neither group nor others may read (like ssh keys: whoever reads it can
// read every peer engine's pools).
func LoadToken(path string) ([]byte, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("peer token file: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("peer token file %s has mode %v: it must not be readable by group or others (chmod 600)", path, st.Mode().Perm())
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("peer token file: %w", err)
	}
	tok := []byte(strings.TrimSpace(string(raw)))
	if len(tok) < MinTokenBytes {
		return nil, fmt.Errorf("peer token in %s has %d bytes, want at least %d (e.g. openssl rand -hex 32)", path, len(tok), MinTokenBytes)
	}
	return tok, nil
}

// IsLoopback reports whether host (of a host:port) is a loopback name or
// address.
func IsLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// checkAuth refuses a call without the token (Unauthenticated) or with
// another one (PermissionDenied). The comparison takes constant time.
func checkAuth(ctx context.Context, token []byte) error {
	md, _ := metadata.FromIncomingContext(ctx)
	return checkToken(md.Get(TokenHeader), token)
}

func checkToken(got []string, token []byte) error {
	if len(got) == 0 {
		return status.Error(codes.Unauthenticated, "peer token missing ("+TokenHeader+" metadata)")
	}
	if len(got) != 1 || subtle.ConstantTimeCompare([]byte(got[0]), token) != 1 {
		return status.Error(codes.PermissionDenied, "peer token does not match")
	}
	return nil
}

// authTap refuses a call whose headers lack the token before gRPC reads
// its message: a caller without the token never makes the engine read or
// hold its body (a flood of large calls with a wrong token cost the
// engine gigabytes when the check ran after unmarshalling).
func authTap(token []byte) tap.ServerInHandle {
	return func(ctx context.Context, info *tap.Info) (context.Context, error) {
		if token == nil {
			return ctx, nil
		}
		if err := checkToken(info.Header.Get(TokenHeader), token); err != nil {
			return nil, err
		}
		return ctx, nil
	}
}

// authInterceptor checks every call again, after authTap (defence in
// depth: a call reaching a handler always passed the check); nil token
// (insecure loopback) checks nothing.
func authInterceptor(token []byte) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		if token != nil {
			if err := checkAuth(ctx, token); err != nil {
				return nil, err
			}
		}
		return handler(ctx, req)
	}
}

// errInsecure is Config.Validate's refusal.
var errInsecure = errors.New("the peer service needs --peer-token-file (or --peer-insecure on a loopback --peer-addr)")
