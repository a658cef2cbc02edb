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
	if nc, ok := c.(interface{ NetConn() net.Conn }); ok {
		c = nc.NetConn() // a TLS connection: its TCP socket's queue
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return -1
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
