//go:build !linux

package main

import (
	"errors"
	"net"
	"net/netip"
)

// mdnsConn is not implemented off Linux yet: the socket options it needs
// (per-interface membership, IP_PKTINFO) are named differently on each
// system. The backend keeps serving the local registry and /health says why.
type mdnsConn struct{ index int }

func listenMDNS(ifi net.Interface, src netip.Addr, port int) (*mdnsConn, error) {
	return nil, errors.New("multicast sockets are implemented on Linux only so far; use --registry=file on this system")
}

func (m *mdnsConn) read(buf, oob []byte) (int, netip.AddrPort, int, bool, error) {
	return 0, netip.AddrPort{}, 0, false, net.ErrClosed
}

func (m *mdnsConn) write(b []byte, dst netip.AddrPort) error { return net.ErrClosed }
func (m *mdnsConn) close() error                             { return nil }
