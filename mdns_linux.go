package main

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
)

// Socket options the syscall package does not name on Linux
// (include/uapi/asm-generic/socket.h, include/uapi/linux/in.h). The
// golang.org/x/net/ipv4 package would name them, but it needs the
// golang.org/x/sys module, and the sidecar promises the standard library
// and golang.org/x/net alone.
const (
	soReusePort    = 0xf // SO_REUSEPORT; mips and sparc differ, and are not our targets
	ipMulticastAll = 49  // IP_MULTICAST_ALL
)

// mdnsConn is one UDP socket on port 5353 for one interface: bound to the
// group so that it receives nothing else, member of the group on that
// interface alone, and sending by that interface alone.
type mdnsConn struct {
	c     *net.UDPConn
	index int
}

// listenMDNS opens the socket for ifi. SO_REUSEADDR and SO_REUSEPORT let
// every sidecar on the host, and avahi, share the port (RFC 6762 section
// 15.1). IP_MULTICAST_ALL off makes the kernel deliver only what arrived on
// an interface this socket joined; IP_MULTICAST_IF with the interface's
// address sets the outgoing interface and source explicitly, so a packet
// never leaves by an interface nobody chose; TTL 255 (section 11) and
// loopback on, so that the other sidecars of this host hear us.
func listenMDNS(ifi net.Interface, src netip.Addr, port int) (*mdnsConn, error) {
	lc := net.ListenConfig{Control: func(network, address string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			s := int(fd)
			for _, o := range []struct{ level, opt, v int }{
				{syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1},
				{syscall.SOL_SOCKET, soReusePort, 1},
				{syscall.IPPROTO_IP, ipMulticastAll, 0},
				{syscall.IPPROTO_IP, syscall.IP_PKTINFO, 1},
			} {
				if err := syscall.SetsockoptInt(s, o.level, o.opt, o.v); err != nil && serr == nil {
					serr = fmt.Errorf("setsockopt %d/%d: %w", o.level, o.opt, err)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "udp4", net.JoinHostPort(mdnsGroup.String(), fmt.Sprint(port)))
	if err != nil {
		return nil, fmt.Errorf("bind UDP %d: %w", port, err)
	}
	c := pc.(*net.UDPConn)
	rc, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, err
	}
	var joinErr, optErr error
	err = rc.Control(func(fd uintptr) {
		s := int(fd)
		m := &syscall.IPMreqn{Multiaddr: mdnsGroup.As4(), Ifindex: int32(ifi.Index)}
		if src.Is4() {
			m.Address = src.As4()
		}
		joinErr = syscall.SetsockoptIPMreqn(s, syscall.IPPROTO_IP, syscall.IP_ADD_MEMBERSHIP, m)
		if joinErr != nil {
			return
		}
		optErr = syscall.SetsockoptIPMreqn(s, syscall.IPPROTO_IP, syscall.IP_MULTICAST_IF, &syscall.IPMreqn{Address: m.Address, Ifindex: int32(ifi.Index)})
		if optErr == nil {
			optErr = syscall.SetsockoptInt(s, syscall.IPPROTO_IP, syscall.IP_MULTICAST_TTL, 255)
		}
		if optErr == nil {
			optErr = syscall.SetsockoptInt(s, syscall.IPPROTO_IP, syscall.IP_MULTICAST_LOOP, 1)
		}
	})
	switch {
	case err != nil:
		optErr = err
	case joinErr != nil:
		c.Close()
		return nil, fmt.Errorf("join %s: %w", mdnsGroup, joinErr)
	}
	if optErr != nil {
		c.Close()
		return nil, fmt.Errorf("set the outgoing interface: %w", optErr)
	}
	return &mdnsConn{c: c, index: ifi.Index}, nil
}

// read returns one packet, its source, and the index of the interface it
// arrived on (0 when the kernel did not say); truncated reports a packet
// larger than buf.
func (m *mdnsConn) read(buf, oob []byte) (n int, src netip.AddrPort, ifindex int, truncated bool, err error) {
	n, oobn, flags, addr, err := m.c.ReadMsgUDPAddrPort(buf, oob)
	if err != nil {
		return 0, netip.AddrPort{}, 0, false, err
	}
	if msgs, perr := syscall.ParseSocketControlMessage(oob[:oobn]); perr == nil {
		for _, cm := range msgs {
			if cm.Header.Level == syscall.IPPROTO_IP && cm.Header.Type == syscall.IP_PKTINFO && len(cm.Data) >= 4 {
				ifindex = int(binary.NativeEndian.Uint32(cm.Data[0:4]))
			}
		}
	}
	return n, netip.AddrPortFrom(addr.Addr().Unmap(), addr.Port()), ifindex, flags&syscall.MSG_TRUNC != 0, nil
}

func (m *mdnsConn) write(b []byte, dst netip.AddrPort) error {
	_, err := m.c.WriteToUDPAddrPort(b, dst)
	return err
}

func (m *mdnsConn) close() error { return m.c.Close() }
