//go:build unix

package main

import (
	"net"
	"syscall"
)

// nodeSocket writes a request on a connection to a node as part of the
// first read of its answer: one pass through the network poller, with
// system calls of its own, instead of three (a liveness peek, a write, a
// read). It is made once per connection, so that nothing allocates per
// call.
//
// The pass runs inside RawConn.Read's callback, which the poller calls
// after resetting its readiness state for the connection:
//
//  1. An idle connection is peeked at first (one non-blocking byte): a
//     node that closed it, or sent something unasked, while it was idle
//     must not be mistaken for a node failing a call. Such a connection
//     gets errIdleClosed, with nothing written, and the caller takes
//     another.
//  2. The request is written.
//  3. On an idle connection the callback asks to wait for readability
//     without trying a read: the peek came after the poller's reset and
//     found nothing, so whatever the node sends next wakes the poller. A
//     read tried now would fail with EAGAIN, a system call for nothing. A
//     new connection had no peek, and is read once at once: the node may
//     have answered, or closed, before the reset (a server refusing work
//     as it accepts).
//  4. Woken, it reads the answer's first bytes into the caller's buffer.
type nodeSocket struct {
	conn net.Conn
	raw  syscall.RawConn // nil when the connection has no descriptor

	out    []byte // the request to write with the next read; nil: none
	reused bool   // the connection was idle: peek first

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
// the connection was idle, and is to be checked before b goes out.
func (s *nodeSocket) queue(b []byte, reused bool) { s.out, s.reused = b, reused }

func (s *nodeSocket) pending() bool { return s.out != nil }

// exchange writes the queued request and reads the first bytes of the
// answer into p, as net.Conn's Write and Read would, errors included.
func (s *nodeSocket) exchange(p []byte) (int, error) {
	b := s.out
	if s.raw == nil {
		s.out = nil
		if n, err := s.conn.Write(b); err != nil {
			return earlyAnswer(s.conn, p, err, n > 0)
		}
		return s.conn.Read(p)
	}
	s.written, s.waiting, s.stale, s.werr, s.in, s.n, s.rerr = 0, false, false, nil, p, 0, nil
	err := s.raw.Read(s.step)
	s.out, s.in = nil, nil
	switch {
	case s.stale:
		return 0, errIdleClosed
	case s.werr == syscall.EAGAIN || s.werr == syscall.EWOULDBLOCK:
		// The socket's buffer is full: the rest goes, and the answer is
		// read, the usual way.
		if _, err := s.conn.Write(b[s.written:]); err != nil {
			return earlyAnswer(s.conn, p, err, true)
		}
		return s.conn.Read(p)
	case s.werr != nil && s.written == 0 && s.reused:
		// The node reset the idle connection after the peek: nothing of
		// the request left, so another connection may carry it.
		return 0, errIdleClosed
	case s.werr != nil:
		return earlyAnswer(s.conn, p, socketError(s.conn, "write", s.werr), s.written > 0)
	}
	return readResult(s.conn, err, s.n, s.rerr) // err: the deadline, or the connection closed under the call
}

// exchangeStep is the callback of exchange; see nodeSocket.
func (s *nodeSocket) exchangeStep(fd uintptr) bool {
	if !s.waiting {
		if s.reused && !idleOpen(fd) {
			s.stale = true
			return true
		}
		wait, err := writeFully(fd, s.out, &s.written)
		if wait {
			err = syscall.EAGAIN // exchange writes the rest the usual way
		}
		if err != nil {
			s.werr = err
			return true
		}
		s.waiting = true
		if s.reused {
			return false // the peek, after the poller's reset, saw nothing
		}
		// A new connection had no peek: what the node sent on it before
		// the poller's reset (an early answer, a close) raises no wake-up
		// of its own, and a node draining for a lingering close sends
		// nothing more. One read now finds it.
	}
	var wait bool
	s.n, wait, s.rerr = readOnce(fd, s.in)
	return !wait // waiting on when woken early
}

// idleOpen peeks at an idle connection: it is fit for a request when the
// node has neither closed it nor sent anything.
func idleOpen(fd uintptr) bool {
	var b [1]byte
	for {
		_, err := sysPeek(fd, b[:])
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
	// Control, not Read: Read fails at once on the deadline an idle
	// connection keeps from its last call, long past.
	err := s.raw.Control(func(fd uintptr) { open = idleOpen(fd) })
	return err == nil && open
}
