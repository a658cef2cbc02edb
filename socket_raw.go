//go:build linux && !386

package main

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// The hot path's socket calls are made with RawSyscall, past the runtime's
// system-call bookkeeping (entersyscall and exitsyscall). That bookkeeping
// lets the scheduler hand a blocked thread's processor to another, which a
// non-blocking socket call never needs; and the first such call after the
// process has been idle wakes Go's monitor thread (sysmon), which then
// polls every 20 us until the process is idle again. A sidecar waits on its
// app between calls, so under load that happened for nearly every request
// (0.5-0.6 us of CPU per request, by perf). Without it the sidecar spends
// 2-3% less CPU per request at saturation, and a fifth less at 1,000
// requests/s (README, "sysmon, no longer woken").

// rawSocket reads and writes a connection with raw system calls, waiting
// for readiness on Go's network poller as net.Conn does, deadlines
// included. Reads must not run concurrently with each other, nor writes
// with writes: each direction keeps its state in the socket, so that
// nothing allocates per call.
type rawSocket struct {
	conn net.Conn
	raw  syscall.RawConn

	rp       []byte
	rn       int
	rerr     error
	readStep func(fd uintptr) bool

	wp        []byte
	wn        int
	werr      error
	writeStep func(fd uintptr) bool

	// writeIdle bounds a write's wait for room in the socket's buffer (0:
	// none). The deadline is armed only when a write must wait, so that
	// a write the buffer takes at once costs no timer update.
	writeIdle time.Duration
	armedAt   int  // wn when the deadline was last armed; -1: not armed
	mustArm   bool // the write stopped to arm it before waiting
	unsent    int  // the socket's send queue when the deadline was armed
}

// newRawSocket returns c's reads and writes as a rawSocket, or c itself
// when it has no descriptor (a pipe in tests).
func newRawSocket(c net.Conn) io.ReadWriter { return newServerSocket(c, 0) }

// newServerSocket is newRawSocket for a server's connection to a client:
// a write that waits writeIdle (0: for ever) for the client to take
// anything fails with os.ErrDeadlineExceeded. A client that stops reading
// must not hold its request, its in-flight slot and the socket's buffers
// for as long as it likes.
func newServerSocket(c net.Conn, writeIdle time.Duration) io.ReadWriter {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return stallLimited(c, writeIdle)
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return stallLimited(c, writeIdle)
	}
	s := &rawSocket{conn: c, raw: raw, writeIdle: writeIdle}
	s.readStep, s.writeStep = s.readOnce, s.writeAll
	return s
}

func (s *rawSocket) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp, s.rn, s.rerr = p, 0, nil
	err := s.raw.Read(s.readStep)
	s.rp = nil
	return readResult(s.conn, err, s.rn, s.rerr)
}

// readOnce reads what has arrived, or asks the poller to wait.
func (s *rawSocket) readOnce(fd uintptr) bool {
	var wait bool
	s.rn, wait, s.rerr = readOnce(fd, s.rp)
	return !wait
}

func (s *rawSocket) Write(p []byte) (int, error) {
	s.wp, s.wn, s.werr, s.armedAt = p, 0, nil, -1
	var err error
	for {
		s.mustArm = false
		err = s.raw.Write(s.writeStep)
		if err != nil && !s.tookSinceArmed(err) || err == nil && !s.mustArm {
			break
		}
		// The socket's buffer is full, and the client took some of it
		// since the last arming (or this is the first): it gets
		// writeIdle from now to take more.
		s.conn.SetWriteDeadline(time.Now().Add(s.writeIdle))
		s.armedAt, s.unsent = s.wn, unsentBytes(s.conn)
	}
	if s.armedAt >= 0 {
		s.conn.SetWriteDeadline(time.Time{})
	}
	s.wp = nil
	switch {
	case err != nil:
		return s.wn, renameOp(err, "write")
	case s.werr != nil:
		return s.wn, socketError(s.conn, "write", s.werr)
	}
	return s.wn, nil
}

// tookSinceArmed reports whether err is the write deadline passing while
// the client took some of what waits in the socket's buffer: the poller
// says there is room only once a third of the buffer (up to megabytes) is
// free, which a client reading slowly, but reading, may take longer than
// writeIdle to make.
func (s *rawSocket) tookSinceArmed(err error) bool {
	if s.armedAt < 0 || !errors.Is(err, os.ErrDeadlineExceeded) {
		return false
	}
	n := unsentBytes(s.conn)
	return n >= 0 && n < s.unsent
}

// writeAll writes what the socket's buffer takes, and asks the poller to
// wait for room while some is left; or stops, for Write to arm the
// deadline first, when the wait is the first since the client last took
// something.
func (s *rawSocket) writeAll(fd uintptr) bool {
	wait, err := writeFully(fd, s.wp, &s.wn)
	s.werr = err
	if wait && s.writeIdle > 0 && s.wn != s.armedAt {
		s.mustArm = true
		return true
	}
	return !wait
}

// Reads and writes are recvfrom and sendto, not read and write: on a
// socket they do the same, minus the file layer's bookkeeping (position
// lock, access checks, notifications), about 0.2 us less CPU per proxied
// request. MSG_NOSIGNAL makes a write to a closed peer fail with EPIPE
// without raising SIGPIPE, which Go would ignore anyway.
//
// The race detector learns what a system call reads and writes only from
// the syscall package's wrappers: under it, those are used.

func sysRead(fd uintptr, p []byte) (int, error) {
	if raceEnabled {
		return syscall.Read(int(fd), p)
	}
	return rawCall(syscall.SYS_RECVFROM, fd, p, 0)
}

func sysWrite(fd uintptr, p []byte) (int, error) {
	if raceEnabled {
		return syscall.Write(int(fd), p)
	}
	return rawCall(syscall.SYS_SENDTO, fd, p, syscall.MSG_NOSIGNAL)
}

// sysPeek reads without consuming and without waiting.
func sysPeek(fd uintptr, p []byte) (int, error) {
	const flags = syscall.MSG_PEEK | syscall.MSG_DONTWAIT
	if raceEnabled {
		n, _, err := syscall.Recvfrom(int(fd), p, flags)
		return n, err
	}
	return rawCall(syscall.SYS_RECVFROM, fd, p, flags)
}

// rawCall makes a read, write or recvfrom on fd with p, flags only for the
// last. p must not be empty.
func rawCall(trap, fd uintptr, p []byte, flags uintptr) (int, error) {
	r, _, e := syscall.RawSyscall6(trap, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)), flags, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}
