package netlab

import (
	"bufio"
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func TestCheckPrefix(t *testing.T) {
	cases := []struct {
		prefix string
		ok     bool
	}{
		{"pf", true},
		{"pfd", true},
		{"Abc12345", true},
		{"", false},
		{"abcdefghi", false},
		{"pf-", false},
		{"p f", false},
	}
	for _, tc := range cases {
		err := checkPrefix(tc.prefix)
		if tc.ok {
			require.NoError(t, err, tc.prefix)
		} else {
			require.Error(t, err, tc.prefix)
		}
	}
}

// helperEnv makes the test binary a listener inside a namespace: it
// accepts one connection on the address it names and writes "hello".
const helperEnv = "NETLAB_TEST_LISTEN"

func TestMain(m *testing.M) {
	if addr := os.Getenv(helperEnv); addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			os.Exit(3)
		}
		c, err := ln.Accept()
		if err != nil {
			os.Exit(4)
		}
		_, _ = c.Write([]byte("hello\n"))
		c.Close()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// A lab joins A and B: a process started in B listens on B's address, a
// dial from A reaches it over the veth; Close removes both namespaces.
func TestLab(t *testing.T) {
	if err := Check(); err != nil {
		t.Skipf("netlab: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	l, err := New(ctx, "nlt")
	if err != nil {
		t.Skipf("netlab: %v", err)
	}
	t.Cleanup(func() { _ = l.Close() })
	require.Equal(t, IPA, l.A.IP)
	require.Equal(t, IPB, l.B.IP)
	require.NoError(t, l.A.Run(ctx, "ip", "link", "show", l.A.Veth))
	require.Error(t, l.A.Run(ctx, "ip", "link", "show", l.B.Veth), "B's end is not in A")

	addr := l.B.Addr(7399)
	cmd := l.B.Command(os.Args[0])
	cmd.Env = append(os.Environ(), helperEnv+"="+addr)
	require.NoError(t, cmd.Start())
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var c net.Conn
	require.Eventually(t, func() bool {
		c, err = l.A.DialContext(ctx, "tcp", addr)
		return err == nil
	}, 10*time.Second, 20*time.Millisecond, "dial %s from A", addr)
	line, err := bufio.NewReader(c).ReadString('\n')
	require.NoError(t, err)
	require.Equal(t, "hello\n", line)
	c.Close()
	require.NoError(t, <-done)

	// The thread that dialled went back: this process still sees the
	// root namespace, where the lab's address is not local.
	_, err = net.Listen("tcp", addr)
	require.Error(t, err)

	require.NoError(t, l.Close())
	require.NoError(t, l.Close(), "Close twice")
	for _, ns := range []string{l.A.NS, l.B.NS} {
		_, err := os.Stat(nsPath(ns))
		require.ErrorIs(t, err, os.ErrNotExist, ns)
	}
}
