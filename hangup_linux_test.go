//go:build linux && !386

package main

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection: ours, as the
// pool would dial it, and the node's.
func tcpPair(t *testing.T) (ours, node net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ours, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	node, err = ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ours.Close(); node.Close() })
	return ours, node
}

// TestNodeSocketTellsUnreachedFromUnanswered: on a connection taken from
// the pool without a peek, a failure or an answer that is not a success
// counts as the idle connection's end (errIdleClosed, to be retried on
// another) only when the node acknowledged none of the request.
func TestNodeSocketTellsUnreachedFromUnanswered(t *testing.T) {
	const ok = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
	for _, tc := range []struct {
		name   string
		reused bool
		node   func(node net.Conn, req int) // what the node does once it has served the first request
		want   string                       // the answer read; "" for an error
		retry  bool                         // the error is errIdleClosed
	}{
		{"closed while idle", true, func(n net.Conn, _ int) { n.Close() }, "", true},
		{"408, then closed", true, func(n net.Conn, _ int) {
			io.WriteString(n, "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
			n.Close()
		}, "", true},
		{"read, then closed", true, func(n net.Conn, req int) {
			go func() { io.ReadFull(n, make([]byte, req)); n.Close() }()
		}, "", false},
		// A reset carries no acknowledgement that counts: the node may
		// have read the request before its delayed acknowledgement went.
		{"read, then reset", true, func(n net.Conn, req int) {
			go func() {
				io.ReadFull(n, make([]byte, req))
				n.(*net.TCPConn).SetLinger(0)
				n.Close()
			}()
		}, "", false},
		{"partly read, then closed", true, func(n net.Conn, req int) {
			go func() { io.ReadFull(n, make([]byte, req/2)); n.Close() }()
		}, "", false},
		{"read, then 404", true, func(n net.Conn, req int) {
			go func() {
				io.ReadFull(n, make([]byte, req))
				io.WriteString(n, "HTTP/1.1 404 Not Found\r\n")
			}()
		}, "HTTP/1.1 404 Not Found\r\n", false},
		{"dialed, closed", false, func(n net.Conn, _ int) { n.Close() }, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours, node := tcpPair(t)
			s := newNodeSocket(ours)
			first := []byte("POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
			go func() {
				io.ReadFull(node, make([]byte, len(first)))
				io.WriteString(node, ok)
			}()
			s.queue(first, false, false)
			p := make([]byte, 256)
			if n, err := s.exchange(p); err != nil || string(p[:n]) != ok {
				t.Fatalf("first exchange: %q, %v", p[:n], err)
			}
			second := []byte("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
			tc.node(node, len(second))
			s.queue(second, tc.reused, false)
			n, err := s.exchange(p)
			if got := errors.Is(err, errIdleClosed); got != tc.retry {
				t.Fatalf("second exchange: %q, %v; want errIdleClosed: %v", p[:n], err, tc.retry)
			}
			if tc.want != "" && (err != nil || string(p[:n]) != tc.want) {
				t.Fatalf("second exchange: %q, %v; want %q", p[:n], err, tc.want)
			}
			if tc.want == "" && err == nil {
				t.Fatalf("second exchange: %q; want an error", p[:n])
			}
		})
	}
}

// TestHangupWatcherMarksClosedConnections: the pool learns of a node's
// close of an idle connection without using it, drops it rather than hand
// it out, and is not woken by data; closing the pool stops the watcher.
func TestHangupWatcherMarksClosedConnections(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addr := ln.Addr().String()
	nc := newNodeClient()
	open := func() (*nodeConn, net.Conn) {
		t.Helper()
		c, err := nc.open(context.Background(), time.Now(), time.Now().Add(5*time.Second), addr)
		if err != nil {
			t.Fatal(err)
		}
		node, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { node.Close() })
		if c.watched == 0 {
			t.Fatal("a dialed connection is not watched")
		}
		return c, node
	}
	talked, talker := open()
	closed, closer := open()
	nc.put(addr, talked)
	nc.put(addr, closed)
	io.WriteString(talker, "data")
	closer.Close()
	waitFor(t, 5*time.Second, "the close to be seen", closed.hung.Load)
	if talked.hung.Load() {
		t.Error("data on an idle connection marked it hung up")
	}
	if c := nc.get(addr, time.Now()); c != talked {
		t.Errorf("the pool handed out %p; want the connection still open, %p", c, talked)
	}
	if c := nc.get(addr, time.Now()); c != nil {
		t.Errorf("the pool handed out %p after the open one; want none", c)
	}
	w := nc.hangups
	nc.close()
	select {
	case <-w.done:
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher's goroutine did not end at close")
	}
}
