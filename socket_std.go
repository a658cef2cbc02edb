//go:build unix && !(linux && !386)

package main

import (
	"io"
	"net"
	"syscall"
	"time"
)

// Without raw system calls (see socket_raw.go) sockets are read and
// written the usual way.

func newRawSocket(c net.Conn) io.ReadWriter { return c }

func newServerSocket(c net.Conn, writeIdle time.Duration) io.ReadWriter {
	return stallLimited(c, writeIdle)
}

func sysRead(fd uintptr, p []byte) (int, error) { return syscall.Read(int(fd), p) }

func sysWrite(fd uintptr, p []byte) (int, error) { return syscall.Write(int(fd), p) }

func sysPeek(fd uintptr, p []byte) (int, error) {
	n, _, err := syscall.Recvfrom(int(fd), p, syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	return n, err
}
