package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// nodeClient is RPC's connection pool to nodes: HTTP/1.1 keep-alive
// connections on which the calling goroutine itself writes a JSON-RPC POST
// and reads the response. net/http's Transport hands every request to two
// goroutines per connection (a writer and a reader) over channels; for many
// small calls those handoffs, and the allocations around them, cost more
// than the I/O. The proxy, which streams arbitrary requests, keeps the
// Transport.
type nodeClient struct {
	dialer      net.Dialer
	maxIdle     int           // idle connections kept per address
	maxIdleAll  int           // idle connections kept in all
	idleTimeout time.Duration // an idle connection older than this is closed
	maxHeader   int64         // largest response head read

	mu       sync.Mutex // guards idle, nIdle, sweeping
	idle     map[string][]*nodeConn
	nIdle    int
	sweeping bool // a sweep of old idle connections is scheduled
}

func newNodeClient() *nodeClient {
	return &nodeClient{
		dialer:      net.Dialer{Timeout: 5 * time.Second, KeepAlive: 30 * time.Second},
		maxIdle:     512,
		maxIdleAll:  4096,
		idleTimeout: 90 * time.Second,
		maxHeader:   64 << 10,
		idle:        map[string][]*nodeConn{},
	}
}

// nodeConn is one connection to a node.
type nodeConn struct {
	conn  net.Conn
	lim   limitedConn
	br    *bufio.Reader
	wbuf  []byte    // the request being written
	since time.Time // when it went idle
}

// limitedConn reads from a connection, failing once n bytes have been
// read, n < 0 meaning no limit: response heads are bounded, bodies are
// bounded by their reader.
type limitedConn struct {
	c net.Conn
	n int64
}

var errHeadTooBig = errors.New("response headers too large")

func (l *limitedConn) Read(p []byte) (int, error) {
	if l.n == 0 {
		return 0, errHeadTooBig
	}
	if l.n > 0 && int64(len(p)) > l.n {
		p = p[:l.n]
	}
	n, err := l.c.Read(p)
	if l.n > 0 {
		l.n -= int64(n)
	}
	return n, err
}

// get returns an idle connection to addr that is still open, if any.
func (nc *nodeClient) get(addr string) *nodeConn {
	now := time.Now()
	for {
		nc.mu.Lock()
		list := nc.idle[addr]
		if len(list) == 0 {
			nc.mu.Unlock()
			return nil
		}
		c := list[len(list)-1]
		list[len(list)-1] = nil
		if len(list) == 1 {
			delete(nc.idle, addr)
		} else {
			nc.idle[addr] = list[:len(list)-1]
		}
		nc.nIdle--
		nc.mu.Unlock()
		if now.Sub(c.since) < nc.idleTimeout && connAlive(c.conn) {
			return c
		}
		c.conn.Close()
	}
}

// put keeps c for the next call to addr, or closes it when enough are kept.
func (nc *nodeClient) put(addr string, c *nodeConn) {
	if cap(c.wbuf) > 64<<10 {
		c.wbuf = nil
	}
	c.since = time.Now()
	nc.mu.Lock()
	if len(nc.idle[addr]) >= nc.maxIdle || nc.nIdle >= nc.maxIdleAll {
		nc.mu.Unlock()
		c.conn.Close()
		return
	}
	nc.idle[addr] = append(nc.idle[addr], c)
	nc.nIdle++
	if !nc.sweeping {
		nc.sweeping = true
		time.AfterFunc(nc.idleTimeout, nc.sweep)
	}
	nc.mu.Unlock()
}

// sweep closes connections idle for longer than idleTimeout, and comes back
// while any are left.
func (nc *nodeClient) sweep() {
	now := time.Now()
	var old []*nodeConn
	nc.mu.Lock()
	for addr, list := range nc.idle {
		keep := list[:0]
		for _, c := range list {
			if now.Sub(c.since) >= nc.idleTimeout {
				old = append(old, c)
			} else {
				keep = append(keep, c)
			}
		}
		clear(list[len(keep):])
		if len(keep) == 0 {
			delete(nc.idle, addr)
		} else {
			nc.idle[addr] = keep
		}
	}
	nc.nIdle -= len(old)
	nc.sweeping = nc.nIdle > 0
	if nc.sweeping {
		time.AfterFunc(nc.idleTimeout/2, nc.sweep)
	}
	nc.mu.Unlock()
	for _, c := range old {
		c.conn.Close()
	}
}

// closeIdle closes every idle connection.
func (nc *nodeClient) closeIdle() {
	nc.mu.Lock()
	idle := nc.idle
	nc.idle, nc.nIdle = map[string][]*nodeConn{}, 0
	nc.mu.Unlock()
	for _, list := range idle {
		for _, c := range list {
			c.conn.Close()
		}
	}
}

// errInvalidHeader is a caller's header that cannot be sent on.
type errInvalidHeader string

func (e errInvalidHeader) Error() string {
	return fmt.Sprintf("net/http: invalid header field value for %q", string(e))
}

// validHeaderValue is RFC 7230's field-value, as net/http checks it: no
// control characters but tab.
func validHeaderValue(v string) bool {
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// nodeRequest is one POST to a node.
type nodeRequest struct {
	addr   string
	header []string // name, value pairs, names canonical
	body   []byte
}

// nodeResponse is a node's answer; body is read into the caller's buffer.
type nodeResponse struct {
	status      string
	code        int
	contentType string
}

// do sends req and reads the response body into buf, at most limit+1
// bytes. Errors are those of net: a failed dial is a *net.OpError with Op
// "dial"; when ctx ends, I/O in progress fails and ctx.Err() is set first.
// n is the number of body bytes read.
func (nc *nodeClient) do(ctx context.Context, req *nodeRequest, buf interface {
	ReadFrom(io.Reader) (int64, error)
	Grow(int)
}, limit int64) (resp nodeResponse, n int64, err error) {
	for i := 0; i+1 < len(req.header); i += 2 {
		if !validHeaderValue(req.header[i+1]) {
			return resp, 0, errInvalidHeader(req.header[i])
		}
	}
	c := nc.get(req.addr)
	if c == nil {
		conn, err := nc.dialer.DialContext(ctx, "tcp", req.addr)
		if err != nil {
			return resp, 0, err
		}
		c = &nodeConn{conn: conn}
		c.lim.c = conn
		c.br = bufio.NewReaderSize(&c.lim, 4096)
	}
	// The call's deadline, or its caller going away, ends the I/O at once.
	stop := context.AfterFunc(ctx, func() { c.conn.SetDeadline(aLongTimeAgo) })
	reuse := false
	defer func() {
		if stop() && reuse {
			nc.put(req.addr, c)
		} else {
			c.conn.Close()
		}
	}()

	w := append(c.wbuf[:0], "POST / HTTP/1.1\r\nHost: "...)
	w = append(w, req.addr...)
	w = append(w, "\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: "...)
	w = strconv.AppendInt(w, int64(len(req.body)), 10)
	w = append(w, "\r\n"...)
	for i := 0; i+1 < len(req.header); i += 2 {
		w = append(w, req.header[i]...)
		w = append(w, ": "...)
		w = append(w, req.header[i+1]...)
		w = append(w, "\r\n"...)
	}
	w = append(w, "\r\n"...)
	w = append(w, req.body...)
	c.wbuf = w
	if _, err := c.conn.Write(w); err != nil {
		return resp, 0, err
	}

	c.lim.n = nc.maxHeader
	r, err := http.ReadResponse(c.br, nil)
	for err == nil && r.StatusCode >= 100 && r.StatusCode <= 199 && r.StatusCode != http.StatusSwitchingProtocols {
		r, err = http.ReadResponse(c.br, nil) // 100 Continue and the like come before the answer
	}
	if err != nil {
		if errors.Is(err, errHeadTooBig) {
			err = fmt.Errorf("net/http: server response headers exceeded %d bytes; aborted", nc.maxHeader)
		}
		return resp, 0, err
	}
	c.lim.n = -1
	resp = nodeResponse{status: r.Status, code: r.StatusCode, contentType: r.Header.Get("Content-Type")}
	if r.ContentLength > 0 && r.ContentLength <= limit {
		buf.Grow(int(r.ContentLength))
	}
	n, err = buf.ReadFrom(io.LimitReader(r.Body, limit+1))
	if err != nil {
		return resp, n, err
	}
	r.Body.Close()
	reuse = n <= limit && !r.Close && r.StatusCode != http.StatusSwitchingProtocols && c.br.Buffered() == 0
	return resp, n, nil
}

// aLongTimeAgo is a deadline in the past: I/O fails at once.
var aLongTimeAgo = time.Unix(1, 0)
