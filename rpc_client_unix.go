//go:build unix

package main

import (
	"net"
	"syscall"
)

// aliveProbe tells whether an idle connection may be reused: the node has
// neither closed it nor sent anything unasked. One non-blocking peek, so
// that a connection the node closed while idle is not mistaken for a node
// failing a call. It is made once per connection: the peek allocates
// nothing.
type aliveProbe struct {
	raw   syscall.RawConn // nil when the connection has no descriptor
	alive bool
	peek  func(fd uintptr) bool
}

func newAliveProbe(c net.Conn) *aliveProbe {
	p := &aliveProbe{}
	if sc, ok := c.(syscall.Conn); ok {
		p.raw, _ = sc.SyscallConn()
	}
	var b [1]byte
	p.peek = func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			p.alive = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
			return true // never wait for readiness
		}
	}
	return p
}

func (p *aliveProbe) check() bool {
	if p.raw == nil {
		return true
	}
	p.alive = false
	return p.raw.Read(p.peek) == nil && p.alive
}
