//go:build unix

package main

import (
	"io"
	"net"
	"os"
	"syscall"
)

// nodeSocket writes a request on a connection to a node as part of the
// first read of its answer: one pass through the network poller, with
// system calls of its own, instead of up to four (a liveness peek, a
// write, a read that finds nothing yet, the read of the answer). It is
// made once per connection, so that nothing allocates per call.
//
// The pass runs inside RawConn.Read's callback, which the poller calls
// after resetting its readiness state for the connection:
//
//  1. An idle connection may be peeked at first (one non-blocking byte): a
//     node that closed it, or sent something unasked, while it was idle
//     must not be mistaken for a node failing a call. Such a connection
//     gets errIdleClosed, with nothing written, and the caller takes
//     another. Where the pool's hangupWatcher learns of closes, the peek
//     is left out for connections idle a short while (see nodeConn.peek).
//  2. The request is written.
//  3. The callback asks to wait for readability without trying a read:
//     the node sends nothing before it has the request, and the reset came
//     before the write, so the answer's arrival cannot be missed. A read
//     tried now would fail with EAGAIN, a system call for nothing.
//  4. Woken, it reads the answer's first bytes into the caller's buffer.
//
// A node may still close an idle connection, or speak on it, just before
// the request goes out. On a connection taken from the pool, a failure, or
// an answer that is not a success, is then checked (neverReached) against
// TCP's count of the bytes the node acknowledged (bytesAcked): if none of
// the request reached the node, the connection gets errIdleClosed as
// above.
type nodeSocket struct {
	conn net.Conn
	raw  syscall.RawConn // nil when the connection has no descriptor

	out    []byte // the request to write with the next read; nil: none
	reused bool   // the connection was idle: a failure may be its close
	peek   bool   // check the idle connection before writing
	sent   uint64 // bytes written on the connection, requests before this one

	written int
	waiting bool   // written: the next callback means the answer is here
	stale   bool   // the peek found the idle connection closed or dirty
	werr    error  // the write's error
	in      []byte // where the answer's first bytes go
	n       int    // bytes read into in
	rerr    error  // the read's error
	step    func(fd uintptr) bool
}

func newNodeSocket(c net.Conn) *nodeSocket {
	s := &nodeSocket{conn: c}
	if sc, ok := c.(syscall.Conn); ok {
		s.raw, _ = sc.SyscallConn()
	}
	s.step = s.exchangeStep
	return s
}

// queue makes the next read of the connection write b first; reused says
// the connection was idle, peek that it is to be checked before b goes
// out.
func (s *nodeSocket) queue(b []byte, reused, peek bool) { s.out, s.reused, s.peek = b, reused, peek }

func (s *nodeSocket) pending() bool { return s.out != nil }

// exchange writes the queued request and reads the first bytes of the
// answer into p, as net.Conn's Write and Read would, errors included.
func (s *nodeSocket) exchange(p []byte) (int, error) {
	b := s.out
	if s.raw == nil {
		s.out = nil
		if _, err := s.conn.Write(b); err != nil {
			return 0, err
		}
		return s.conn.Read(p)
	}
	s.written, s.waiting, s.stale, s.werr, s.in, s.n, s.rerr = 0, false, false, nil, p, 0, nil
	err := s.raw.Read(s.step)
	s.out, s.in = nil, nil
	if s.stale {
		return 0, errIdleClosed
	}
	before := s.sent
	s.sent += uint64(s.written)
	var n int
	var werr, rerr error // as net.Conn's Write and Read report them
	switch {
	case s.werr == syscall.EAGAIN || s.werr == syscall.EWOULDBLOCK:
		// The socket's buffer is full: the rest goes, and the answer is
		// read, the usual way.
		var m int
		m, werr = s.conn.Write(b[s.written:])
		s.written += m
		s.sent += uint64(m)
		if werr == nil {
			n, rerr = s.conn.Read(p)
		}
	case s.werr != nil:
		werr = s.opError("write", s.werr)
	case err != nil:
		rerr = err // the deadline, or the connection closed under the call
	case s.rerr != nil:
		rerr = s.opError("read", s.rerr)
	case s.n == 0:
		rerr = io.EOF
	default:
		n = s.n
	}
	if s.reused && err == nil && s.neverReached(p[:n], werr, rerr, before) {
		return 0, errIdleClosed
	}
	if werr != nil {
		return 0, werr
	}
	return n, rerr
}

// neverReached reports whether a request written on a connection from the
// pool met the connection's end, or an answer sent before it, and none of
// it reached the node; it may then go out on another connection. got is
// what came back, werr and rerr how the write and the read failed, before
// the bytes written on the connection before the request. None of it
// reached the node when
//   - the write failed before a byte went out;
//   - the node's close (a FIN) came, and the node has acknowledged none
//     of the request: TCP acknowledges, with the FIN, all it received. A
//     reset says nothing: a node that read the request and reset the
//     connection before its delayed acknowledgement left it
//     unacknowledged too;
//   - what came is not the start of a success, and none of the request is
//     acknowledged: a segment that answers a request acknowledges it, so
//     this was sent before the request arrived (a 408 as the node's idle
//     timeout ended).
func (s *nodeSocket) neverReached(got []byte, werr, rerr error, before uint64) bool {
	switch {
	case werr != nil:
		return s.written == 0
	case rerr == io.EOF:
		return s.unacknowledged(before)
	case rerr != nil:
		return false
	}
	success := len(got) >= 10 && (string(got[:9]) == "HTTP/1.1 " || string(got[:9]) == "HTTP/1.0 ") && got[9] == '2'
	return !success && s.unacknowledged(before)
}

// unacknowledged reports whether the node has acknowledged none of the
// bytes written after the first before.
func (s *nodeSocket) unacknowledged(before uint64) bool {
	acked, ok := uint64(0), false
	s.raw.Control(func(fd uintptr) { acked, ok = bytesAcked(fd) })
	return ok && acked <= before+1 // the SYN counts one
}

// exchangeStep is the callback of exchange; see nodeSocket.
func (s *nodeSocket) exchangeStep(fd uintptr) bool {
	if !s.waiting {
		if s.peek && !idleOpen(fd) {
			s.stale = true
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
	for {
		n, err := syscall.Read(int(fd), s.in)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN || err == syscall.EWOULDBLOCK {
			return false // woken early: wait on
		}
		s.n, s.rerr = n, err
		if n < 0 {
			s.n = 0
		}
		return true
	}
}

func (s *nodeSocket) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: s.conn.LocalAddr(), Addr: s.conn.RemoteAddr(), Err: os.NewSyscallError(op, err)}
}

// idleOpen peeks at an idle connection: it is fit for a request when the
// node has neither closed it nor sent anything.
func idleOpen(fd uintptr) bool {
	var b [1]byte
	for {
		_, _, err := syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
		if err == syscall.EINTR {
			continue
		}
		return err == syscall.EAGAIN || err == syscall.EWOULDBLOCK
	}
}

// check reports whether an idle connection is still fit for a request, as
// exchange would find it; tests wait on it for a node's close to arrive.
func (s *nodeSocket) check() bool {
	if s.raw == nil {
		return true
	}
	open := false
	err := s.raw.Read(func(fd uintptr) bool {
		open = idleOpen(fd)
		return true
	})
	return err == nil && open
}
