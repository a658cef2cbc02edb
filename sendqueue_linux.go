//go:build linux

package main

import (
	"net"
	"syscall"
	"unsafe"
)

// unsentBytes is how many bytes written to c its peer has not yet
// acknowledged (the socket's send queue, SIOCOUTQ), or -1 when unknown.
func unsentBytes(c net.Conn) int {
	sc, ok := c.(syscall.Conn)
	for !ok {
		// A TLS connection, or one of the server's wrappers: the TCP
		// socket's queue under it.
		nc, wraps := c.(interface{ NetConn() net.Conn })
		if !wraps {
			return -1
		}
		c = nc.NetConn()
		sc, ok = c.(syscall.Conn)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	raw.Control(func(fd uintptr) {
		var v int32
		if _, _, e := syscall.Syscall(syscall.SYS_IOCTL, fd, syscall.TIOCOUTQ, uintptr(unsafe.Pointer(&v))); e == 0 {
			n = int(v)
		}
	})
	return n
}
