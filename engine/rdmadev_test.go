package engine

import (
	"net"
	"testing"
	"testing/fstest"

	"github.com/stretchr/testify/require"
)

func TestRDMADeviceFor(t *testing.T) {
	ifaces := []net.Interface{{Name: "lo"}, {Name: "eth0"}, {Name: "eth1"}, {Name: "eth2"}}
	ips := map[string]string{"lo": "127.0.0.1/8", "eth0": "192.168.1.5/24", "eth1": "10.1.0.5/24", "eth2": "10.2.0.5/24"}
	addrs := func(i net.Interface) ([]net.Addr, error) {
		ip, n, err := net.ParseCIDR(ips[i.Name])
		require.NoError(t, err)
		n.IP = ip
		return []net.Addr{n}, nil
	}
	dir := &fstest.MapFile{Mode: 0o755 | 1<<31}
	sysfs := fstest.MapFS{
		// eth1: a single-port HCA; eth2: a dual-port one, port 2 carrying eth2.
		"class/net/eth1/device/infiniband/mlx5_0":           dir,
		"class/infiniband/mlx5_0/ports/1":                   dir,
		"class/net/eth2/device/infiniband/mlx5_1":           dir,
		"class/infiniband/mlx5_1/ports/1/gid_attrs/ndevs/0": {Data: []byte("eth3\n")},
		"class/infiniband/mlx5_1/ports/2/gid_attrs/ndevs/0": {Data: []byte("eth2\n")},
		"class/net/eth0/device/vendor":                      {Data: []byte("0x8086\n")},
	}
	for _, tc := range []struct {
		ip, want, err string
	}{
		{"10.1.0.5", "mlx5_0:1", ""},
		{"10.2.0.5", "mlx5_1:2", ""},
		{"192.168.1.5", "", "has no RDMA device"},
		{"10.9.9.9", "", "no local interface holds"},
		{"0.0.0.0", "", "on every address"},
	} {
		got, err := RDMADeviceFor(net.ParseIP(tc.ip), ifaces, addrs, sysfs)
		if tc.err != "" {
			require.ErrorIs(t, err, ErrInvalid, tc.ip)
			require.ErrorContains(t, err, tc.err, tc.ip)
			require.ErrorContains(t, err, "UCX_NET_DEVICES", tc.ip)
			continue
		}
		require.NoError(t, err, tc.ip)
		require.Equal(t, tc.want, got, tc.ip)
	}
}
