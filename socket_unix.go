//go:build unix

package main

import (
	"net"
	"os"
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
