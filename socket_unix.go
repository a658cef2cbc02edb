//go:build unix

package main

import (
	"io"
	"net"
	"os"
	"syscall"
)

// renameOp gives a RawConn's error ("raw-read") the operation a net.Conn
// would name.
func renameOp(err error, op string) error {
	if e, ok := err.(*net.OpError); ok {
		e.Op = op
	}
	return err
}

// socketError wraps a failed system call on c as net.Conn would.
func socketError(c net.Conn, op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError(op, err)}
}

// writeFully writes p[*done:] on fd, advancing *done, until all of it has
// gone, the socket's buffer is full (wait: the poller is to wait for
// room), or a write fails.
func writeFully(fd uintptr, p []byte, done *int) (wait bool, err error) {
	for *done < len(p) {
		n, err := sysWrite(fd, p[*done:])
		switch {
		case err == syscall.EINTR:
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
			return true, nil
		case err != nil:
			return false, err
		case n == 0:
			return false, io.ErrUnexpectedEOF // as net.Conn says: no progress
		default:
			*done += n
		}
	}
	return false, nil
}

// readOnce reads into p what has arrived on fd; wait says nothing has, and
// the poller is to wait for it.
func readOnce(fd uintptr, p []byte) (n int, wait bool, err error) {
	for {
		n, err := sysRead(fd, p)
		switch {
		case err == syscall.EINTR:
		case err == syscall.EAGAIN || err == syscall.EWOULDBLOCK:
			return 0, true, nil
		default:
			return max(n, 0), false, err
		}
	}
}

// readResult gives a read made through RawConn as net.Conn's Read would:
// pollErr is the poller's (the deadline, a close), err the system call's.
func readResult(c net.Conn, pollErr error, n int, err error) (int, error) {
	switch {
	case pollErr != nil:
		return 0, renameOp(pollErr, "read")
	case err != nil:
		return 0, socketError(c, "read", err)
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}
