package main

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"os"
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
	// The socket is made by hand: net.ListenPacket on a multicast address
	// binds the wildcard address instead, and would hear unicast too.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, syscall.IPPROTO_UDP)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	fail := func(stage string, err error) (*mdnsConn, error) {
		syscall.Close(fd)
		return nil, fmt.Errorf("%s: %w", stage, err)
	}
	for _, o := range []struct{ level, opt, v int }{
		{syscall.SOL_SOCKET, syscall.SO_REUSEADDR, 1},
		{syscall.SOL_SOCKET, soReusePort, 1},
		{syscall.IPPROTO_IP, ipMulticastAll, 0},
		{syscall.IPPROTO_IP, syscall.IP_PKTINFO, 1},
		{syscall.IPPROTO_IP, syscall.IP_MULTICAST_TTL, 255},
		{syscall.IPPROTO_IP, syscall.IP_MULTICAST_LOOP, 1},
	} {
		if err := syscall.SetsockoptInt(fd, o.level, o.opt, o.v); err != nil {
			return fail(fmt.Sprintf("setsockopt %d/%d", o.level, o.opt), err)
		}
	}
	// A larger receive buffer, where the system allows one, holds a burst
	// of announcements or goodbyes (a sidecar with a thousand nodes); the
	// kernel caps it at net.core.rmem_max, and a refusal is no failure.
	syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, mdnsReceiveBuffer)
	m := &syscall.IPMreqn{Multiaddr: mdnsGroup.As4(), Ifindex: int32(ifi.Index)}
	if src.Is4() {
		m.Address = src.As4()
	}
	if err := syscall.SetsockoptIPMreqn(fd, syscall.IPPROTO_IP, syscall.IP_MULTICAST_IF, &syscall.IPMreqn{Address: m.Address, Ifindex: int32(ifi.Index)}); err != nil {
		return fail("set the outgoing interface", err)
	}
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: port, Addr: mdnsGroup.As4()}); err != nil {
		return fail(fmt.Sprintf("bind UDP %d", port), err)
	}
	if err := syscall.SetsockoptIPMreqn(fd, syscall.IPPROTO_IP, syscall.IP_ADD_MEMBERSHIP, m); err != nil {
		return fail("join "+mdnsGroup.String(), err)
	}
	f := os.NewFile(uintptr(fd), "mdns-"+ifi.Name)
	pc, err := net.FilePacketConn(f) // a duplicate of fd, in the runtime's poller
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	return &mdnsConn{c: pc.(*net.UDPConn), index: ifi.Index}, nil
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
