//go:build unix

package main

import (
	"net"
	"syscall"
)

// connAlive reports whether an idle connection may be reused: the node has
// neither closed it nor sent anything unasked. One non-blocking peek, so
// that a connection the node closed while idle is not mistaken for a node
// failing a call.
func connAlive(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	var b [1]byte
	err = raw.Read(func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			alive = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
			return true // never wait for readiness
		}
	})
	return err == nil && alive
}
