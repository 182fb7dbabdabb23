package engine

import (
	"fmt"
	"io/fs"
	"net"
	"path"
	"slices"
	"strings"
)

// RDMADeviceFor is the UCX_NET_DEVICES value ("mlx5_0:1") that keeps
// PeerTransportRDMA's UCX on the NIC serving peerIP, the host of
// --peer-addr: the network interface holding that address, then the RDMA
// device and port behind that interface in sysfs (rooted at /sys):
// class/net/IF/device/infiniband/DEV, and the port of DEV whose GID
// table names IF (ports/N/gid_attrs/ndevs/*), or its only port. An
// unspecified or non-local address, or an interface with no RDMA device,
// is an error naming UCX_NET_DEVICES: the operator then says which NIC.
func RDMADeviceFor(peerIP net.IP, ifaces []net.Interface, addrs func(net.Interface) ([]net.Addr, error), sysfs fs.FS) (string, error) {
	if peerIP == nil || peerIP.IsUnspecified() {
		return "", fmt.Errorf("%w: --peer-transport=rdma with --peer-addr on every address: set UCX_NET_DEVICES to the KV NIC's RDMA device (e.g. mlx5_0:1)", ErrInvalid)
	}
	iface := ""
	for _, ifc := range ifaces {
		as, err := addrs(ifc)
		if err != nil {
			continue
		}
		for _, a := range as {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(peerIP) {
				iface = ifc.Name
			}
		}
	}
	if iface == "" {
		return "", fmt.Errorf("%w: --peer-transport=rdma: no local interface holds %s (--peer-addr): set UCX_NET_DEVICES", ErrInvalid, peerIP)
	}
	devs, err := fs.ReadDir(sysfs, path.Join("class/net", iface, "device/infiniband"))
	if err != nil || len(devs) == 0 {
		return "", fmt.Errorf("%w: --peer-transport=rdma: interface %s (of --peer-addr %s) has no RDMA device: set UCX_NET_DEVICES, or use --peer-transport=tcp",
			ErrInvalid, iface, peerIP)
	}
	dev := devs[0].Name()
	ports, err := fs.ReadDir(sysfs, path.Join("class/infiniband", dev, "ports"))
	if err != nil || len(ports) == 0 {
		return "", fmt.Errorf("%w: --peer-transport=rdma: RDMA device %s has no ports in sysfs: set UCX_NET_DEVICES", ErrInvalid, dev)
	}
	if len(ports) == 1 {
		return dev + ":" + ports[0].Name(), nil
	}
	for _, p := range ports {
		nd, err := fs.ReadDir(sysfs, path.Join("class/infiniband", dev, "ports", p.Name(), "gid_attrs/ndevs"))
		if err != nil {
			continue
		}
		if slices.ContainsFunc(nd, func(e fs.DirEntry) bool {
			b, err := fs.ReadFile(sysfs, path.Join("class/infiniband", dev, "ports", p.Name(), "gid_attrs/ndevs", e.Name()))
			return err == nil && strings.TrimSpace(string(b)) == iface
		}) {
			return dev + ":" + p.Name(), nil
		}
	}
	return "", fmt.Errorf("%w: --peer-transport=rdma: no port of RDMA device %s serves %s: set UCX_NET_DEVICES", ErrInvalid, dev, iface)
}
