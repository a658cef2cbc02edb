//go:build !unix

package main

import (
	"io"
	"net"
	"time"
)

// newRawSocket: see socket_raw.go.
func newRawSocket(c net.Conn) io.ReadWriter { return c }

// newServerSocket: see socket_raw.go.
func newServerSocket(c net.Conn, writeIdle time.Duration) io.ReadWriter {
	return stallLimited(c, writeIdle)
}

// nodeSocket cannot peek at a connection here: an idle connection the node
// closed shows up as a failed call. Requests are written the usual way.
type nodeSocket struct {
	conn net.Conn
	out  []byte
}

func newNodeSocket(c net.Conn) *nodeSocket { return &nodeSocket{conn: c} }

func (s *nodeSocket) queue(b []byte, reused bool) { s.out = b }

func (s *nodeSocket) pending() bool { return s.out != nil }

func (s *nodeSocket) exchange(p []byte) (int, error) {
	b := s.out
	s.out = nil
	if n, err := s.conn.Write(b); err != nil {
		return earlyAnswer(s.conn, p, err, n > 0)
	}
	return s.conn.Read(p)
}

func (*nodeSocket) check() bool { return true }
