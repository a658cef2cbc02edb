//go:build unix

package main

import (
	"net"
	"os"
	"syscall"
)

// nodeSocket does two things on a connection to a node with system calls
// of its own. It is made once per connection, so that neither allocates.
//
// alive tells whether an idle connection may be reused: the node has
// neither closed it nor sent anything unasked. One non-blocking peek, so
// that a connection the node closed while idle is not mistaken for a node
// failing a call.
//
// send writes a request and returns once the answer starts to arrive.
// Written with net.Conn, the reader would then try a read that fails with
// EAGAIN (the node has not answered yet) before waiting: a system call per
// call for nothing. Here the write happens inside RawConn.Read's callback,
// after the poller's state for the connection is reset, so no answer can
// be missed and the wait comes first. The connection has nothing unread
// (alive just said so, or it is new), and the node sends nothing before it
// has the request.
type nodeSocket struct {
	raw syscall.RawConn // nil when the connection has no descriptor

	alive bool
	peek  func(fd uintptr) bool

	out     []byte // the request being sent
	written int
	werr    error
	waiting bool // written: the next callback means the answer is here
	write   func(fd uintptr) bool
}

func newNodeSocket(c net.Conn) *nodeSocket {
	s := &nodeSocket{}
	if sc, ok := c.(syscall.Conn); ok {
		s.raw, _ = sc.SyscallConn()
	}
	var b [1]byte
	s.peek = func(fd uintptr) bool {
		for {
			_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
			if err == syscall.EINTR {
				continue
			}
			s.alive = err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
			return true // never wait for readiness
		}
	}
	s.write = func(fd uintptr) bool {
		if s.waiting {
			return true
		}
		for s.written < len(s.out) {
			n, err := syscall.Write(int(fd), s.out[s.written:])
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				s.werr = err
				return true
			}
			s.written += n
		}
		s.waiting = true
		return false
	}
	return s
}

func (s *nodeSocket) check() bool {
	if s.raw == nil {
		return true
	}
	s.alive = false
	return s.raw.Read(s.peek) == nil && s.alive
}

// send writes b on c and waits for the answer to begin, or for c's
// deadline.
func (s *nodeSocket) send(c net.Conn, b []byte) error {
	if s.raw == nil {
		_, err := c.Write(b)
		return err
	}
	s.out, s.written, s.werr, s.waiting = b, 0, nil, false
	err := s.raw.Read(s.write)
	rest := b[s.written:]
	werr := s.werr
	s.out = nil
	switch {
	case werr == syscall.EAGAIN || werr == syscall.EWOULDBLOCK:
		// The socket's buffer is full: the rest goes the usual way, and
		// the answer is read the usual way.
		_, err := c.Write(rest)
		return err
	case werr != nil:
		return &net.OpError{Op: "write", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: os.NewSyscallError("write", werr)}
	}
	return err
}
