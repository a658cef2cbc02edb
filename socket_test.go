package main

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// socketPair returns both ends of a loopback TCP connection: the dialled
// one, and the accepted one.
func socketPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

func TestRawSocketReadsAndWrites(t *testing.T) {
	c, s := socketPair(t)
	rc, rs := newRawSocket(c), newRawSocket(s)
	if _, err := rc.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 16)
	n, err := rs.Read(buf)
	if err != nil || string(buf[:n]) != "ping" {
		t.Fatalf("read %q, %v; want ping", buf[:n], err)
	}
	if n, err := rs.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty read: %d, %v; want 0, nil", n, err)
	}
	c.Close()
	if n, err := rs.Read(buf); n != 0 || err != io.EOF {
		t.Fatalf("after the peer closed: %d, %v; want 0, EOF", n, err)
	}
}

// A write larger than the socket's buffers waits for the reader, as
// net.Conn's does, and delivers every byte in order.
func TestRawSocketWritesMoreThanTheBufferHolds(t *testing.T) {
	c, s := socketPair(t)
	if err := c.SetWriteBuffer(16 << 10); err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte("0123456789abcdef"), 1<<18) // 4 MiB
	done := make(chan error, 1)
	go func() {
		n, err := newRawSocket(c).Write(want)
		if err == nil && n != len(want) {
			err = errors.New("short write")
		}
		c.CloseWrite()
		done <- err
	}()
	got, err := io.ReadAll(newRawSocket(s))
	if err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written", len(got), len(want))
	}
}

func TestRawSocketErrorsAsNetConn(t *testing.T) {
	c, s := socketPair(t)
	rs := newRawSocket(s)
	buf := make([]byte, 16)

	s.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := rs.Read(buf)
	var oe *net.OpError
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("past the deadline: %v; want a read OpError for the deadline", err)
	}
	s.SetReadDeadline(time.Time{})

	c.SetLinger(0) // closing sends a reset
	c.Close()
	if _, err := rs.Read(buf); !errors.Is(err, syscall.ECONNRESET) || !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("after a reset: %v; want a read OpError for ECONNRESET", err)
	}
	if _, err := rs.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) || !errors.As(err, &oe) || oe.Op != "write" {
		t.Fatalf("writing after a reset: %v; want a write OpError for EPIPE", err)
	}
	s.Close()
	if _, err := rs.Read(buf); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("after closing: %v; want net.ErrClosed", err)
	}
}

// TestUnsentBytesSeesThroughWrappers: the send queue of a connection the
// server wrapped (a head handed to net/http, a TLS connection's first
// head deadline) is its TCP socket's: the broker's and the watch's
// keepalive, and the answers' stall limit, read it through them. They
// read nothing through them, and took a client reading its backlog for
// silent.
func TestUnsentBytesSeesThroughWrappers(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the socket's send queue is read on Linux only")
	}
	c, peer := socketPair(t)
	peer.SetReadBuffer(4096)
	c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	c.Write(make([]byte, 1<<20)) // more than the peer takes unread: some stays queued
	for _, w := range []net.Conn{c, &replayConn{Conn: c}, &headDueConn{Conn: &replayConn{Conn: c}}} {
		if n := unsentBytes(w); n <= 0 {
			t.Errorf("%T: %d bytes queued; want the socket's queue", w, n)
		}
	}
}
