package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// server serves HTTP/1.1 on plain-text connections. It answers the common
// request itself: a head that fits its buffer, a body with a
// Content-Length or none, no upgrade, no Expect, no event stream. At the
// first request that is anything else it hands the connection, and the
// bytes it has buffered, to net/http, which keeps it from then on; net/http
// thus answers every unusual or malformed request exactly as it always
// does. The reason is cost: net/http's server spends, per request, a
// context, a goroutine parked on a background read to notice a departed
// client, and several read deadlines; for small proxied calls that is more
// than the call itself (see "Performance" in the README). What this path
// gives up: a request's context is not cancelled when its client goes away
// mid-request (the next write fails instead). TLS is served by net/http
// alone.
type server struct {
	handler           http.Handler
	fallback          *http.Server // serves handed-off connections
	readHeaderTimeout time.Duration
	idleTimeout       time.Duration
	log               *slog.Logger

	handoff      *handoffListener
	shuttingDown atomic.Bool
	date         dateCache

	mu    sync.Mutex // guards ln, conns
	ln    net.Listener
	conns map[*serverConn]struct{}
}

// Bounds of the fast path. A head that does not fit headBufferSize goes
// to net/http (whose own limit is MaxHeaderBytes); a response body is
// buffered up to responseBufferSize, so that small answers leave in one
// write with a Content-Length, and streamed beyond it.
const (
	headBufferSize     = 8 << 10
	responseBufferSize = 64 << 10
)

func newServer(h http.Handler, fallback *http.Server, log *slog.Logger) *server {
	return &server{
		handler:           h,
		fallback:          fallback,
		readHeaderTimeout: fallback.ReadHeaderTimeout,
		idleTimeout:       fallback.IdleTimeout,
		log:               log,
		handoff:           newHandoffListener(),
		conns:             map[*serverConn]struct{}{},
	}
}

// Serve accepts connections on ln until Shutdown; it returns
// http.ErrServerClosed then, like net/http.
func (s *server) Serve(ln net.Listener) error {
	s.mu.Lock()
	s.ln = ln
	s.mu.Unlock()
	if s.shuttingDown.Load() {
		ln.Close()
		return http.ErrServerClosed
	}
	// net/http serves what is handed to it until Shutdown closes the
	// hand-off listener, and Shutdown waits for its connections.
	go s.fallback.Serve(s.handoff)
	backoff := time.Duration(0)
	for {
		rwc, err := ln.Accept()
		if err != nil {
			if s.shuttingDown.Load() {
				return http.ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// Out of file descriptors and the like pass; wait and go on,
			// as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.log.Warn("accepting a connection failed; retrying", "error", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		sock := newServerSocket(rwc, s.idleTimeout)
		c := &serverConn{srv: s, rwc: rwc, sock: sock, br: bufio.NewReaderSize(sock, headBufferSize), remote: rwc.RemoteAddr().String()}
		if !s.track(c) {
			rwc.Close()
			return http.ErrServerClosed
		}
		go c.serve()
	}
}

// stallLimited bounds each write on c to idle (0: none), where a write
// cannot tell whether it waits for the client (see rawSocket).
func stallLimited(c net.Conn, idle time.Duration) io.ReadWriter {
	if idle <= 0 {
		return c
	}
	return &stallLimitedConn{c, idle}
}

type stallLimitedConn struct {
	net.Conn
	idle time.Duration
}

func (c *stallLimitedConn) Write(p []byte) (int, error) {
	c.Conn.SetWriteDeadline(time.Now().Add(c.idle))
	return c.Conn.Write(p)
}

// track adds c to the open connections, unless the server is shutting down.
func (s *server) track(c *serverConn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shuttingDown.Load() {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *server) forget(c *serverConn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
}

// Shutdown stops accepting, closes idle connections, and waits until the
// active ones have answered their request or ctx ends; net/http's share is
// shut down alongside. Hijacked connections are their owners' to close.
func (s *server) Shutdown(ctx context.Context) error {
	s.shuttingDown.Store(true)
	s.mu.Lock()
	if s.ln != nil {
		s.ln.Close()
	}
	s.mu.Unlock()
	fallbackDone := make(chan error, 1)
	go func() { fallbackDone <- s.fallback.Shutdown(ctx) }()
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !s.closeIdle() {
		select {
		case <-ctx.Done():
			<-fallbackDone
			return ctx.Err()
		case <-tick.C:
		}
	}
	return <-fallbackDone
}

// closeIdle closes the connections waiting for a request and reports
// whether none are left.
func (s *server) closeIdle() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		if c.state.CompareAndSwap(connIdle, connClosed) {
			c.rwc.Close()
		}
	}
	return len(s.conns) == 0
}

// The states of a serverConn: between requests it is idle, and Shutdown
// may close it; while serving a request it is active.
const (
	connIdle int32 = iota
	connActive
	connClosed
)

// serverConn is one client connection on the fast path.
type serverConn struct {
	srv      *server
	rwc      net.Conn
	sock     io.ReadWriter // rwc's reads and writes on the fast path (see rawSocket)
	br       *bufio.Reader
	remote   string
	state    atomic.Int32
	deadline time.Time // the read deadline set on rwc; zero when none
	// Reused from one request to the next: a handler must not keep the
	// request, its header, or the response writer once it returns, as with
	// any http.Handler.
	head    requestHead
	req     http.Request
	reqBody *fixedBody
	resp    response
	out     []byte // the head, or head and body, being written
	body    []byte // the body held back
	header  http.Header
	keys    []string // header keys, sorted
	lines   []byte   // header lines a handler passed as they are
}

// serve answers requests until the connection closes, is handed to
// net/http, or is hijacked.
func (c *serverConn) serve() {
	keep := false // the connection now belongs to someone else
	defer func() {
		if !keep {
			c.rwc.Close()
		}
		c.srv.forget(c)
	}()
	for {
		if c.srv.shuttingDown.Load() {
			return
		}
		if c.br.Buffered() == 0 {
			// The client's next request is likely still on its way: a read
			// now would fail with EAGAIN and park the goroutine on the
			// poller, a system call and a wake-up for nothing. Letting the
			// other connections run first gives it time to arrive; with
			// nothing else to run, Gosched returns at once. Under load this
			// saves one of six system calls per request.
			runtime.Gosched()
		}
		n, err := c.readHead()
		if !c.state.CompareAndSwap(connIdle, connActive) {
			return // closed by Shutdown
		}
		if err != nil {
			switch {
			case errors.Is(err, errHandOff):
				keep = true
				c.handOff()
			case errors.Is(err, errTLSOnPlainPort):
				c.refuse(http.StatusBadRequest, err.Error())
			}
			return
		}
		head, _ := c.br.Peek(n)
		if err := parseRequestHead(head, &c.head); err != nil {
			if err == errBothLengths || err == errTransferEncodingOn10 {
				c.refuse(http.StatusBadRequest, err.Error())
				return
			}
			keep = true
			c.handOff()
			return
		}
		c.br.Discard(n)
		done, hijacked := c.serveRequest(&c.head)
		if hijacked {
			keep = true
			return
		}
		if !done {
			c.linger()
			return
		}
		if !c.state.CompareAndSwap(connActive, connIdle) {
			return
		}
	}
}

// Bounds of a lingering close (see linger).
const (
	lingerTimeout  = 500 * time.Millisecond // as net/http's rstAvoidanceDelay
	lingerMaxBytes = 16 << 20
)

// linger ends the sending side of a connection the server gives up after
// an answer, then reads and drops what the client still sends until it
// closes, for up to lingerTimeout and lingerMaxBytes, before the close (RFC
// 9112 section 9.6). The client may still be sending: an upload refused
// before it was read, requests pipelined after a Connection: close. A
// close with such bytes unread makes the kernel reset the connection, and
// a reset destroys the answers the client has not read yet.
func (c *serverConn) linger() {
	cw, ok := c.rwc.(interface{ CloseWrite() error })
	if !ok || cw.CloseWrite() != nil {
		return
	}
	c.rwc.SetReadDeadline(time.Now().Add(lingerTimeout))
	io.CopyN(io.Discard, c.rwc, lingerMaxBytes)
}

// refuse answers a request the connection cannot go on from with an
// error in the ecosystem's shape, then closes it.
func (c *serverConn) refuse(code int, detail string) {
	body, _ := json.Marshal(errorBody{ID: "go.micro.sidecar", Code: code, Detail: detail, Status: statusText(code)})
	c.rwc.SetWriteDeadline(time.Now().Add(lingerTimeout))
	fmt.Fprintf(c.rwc, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", code, statusText(code), len(body), body)
	c.linger()
}

// errHandOff is a request the fast path leaves to net/http.
var errHandOff = errors.New("request for net/http")

// tlsHandshakeRecord is the first byte of a TLS connection (RFC 8446
// section 5.1: a handshake record), which no request line starts with.
const tlsHandshakeRecord = 0x16

// errTLSOnPlainPort is a client that speaks TLS to this plain-HTTP
// server. Its hello has no blank line: waiting for a whole head, the
// server would keep it for --read_header_timeout, a peer sidecar
// forwarding to a stale https:// entry too, and answer nothing.
var errTLSOnPlainPort = errors.New("the client began a TLS handshake, and this port speaks plain HTTP: use http://, not https:// (or start the sidecar with --tls_cert_file and --tls_key_file)")

// readHead waits until the buffer holds a whole request head and returns
// its length, blank line included. Heads larger than the buffer are handed
// off, and so are bare-LF heads: those that have ended here, and those
// parseRequestHead finds a bare LF in.
func (c *serverConn) readHead() (int, error) {
	if c.deadline.IsZero() {
		// A new connection owes its first head within readHeaderTimeout,
		// as net/http has it: idleTimeout is for waits between requests.
		c.setDeadline(time.Now().Add(c.srv.readHeaderTimeout))
	} else {
		c.keepIdleDeadline()
	}
	partial, skipped := false, 0
	for {
		buf, _ := c.br.Peek(c.br.Buffered())
		// RFC 9112 section 2.2: empty lines before a request line are
		// ignored (an old client's CRLF after a POST body), up to four
		// bytes of them, as net/http ignores.
		for len(buf) > 0 && skipped < 4 && (buf[0] == '\r' || buf[0] == '\n') {
			c.br.Discard(1)
			buf, skipped = buf[1:], skipped+1
		}
		if len(buf) > 0 && buf[0] == tlsHandshakeRecord {
			return 0, errTLSOnPlainPort
		}
		if i := bytes.Index(buf, []byte("\n\r\n")); i >= 0 {
			return i + 3, nil
		}
		if bytes.Contains(buf, []byte("\n\n")) || len(buf) == c.br.Size() {
			return 0, errHandOff
		}
		if len(buf) > 0 && !partial {
			// The head came in pieces: the rest must follow promptly. A
			// new connection's deadline, from its accept, stays: its
			// first byte does not buy it another readHeaderTimeout.
			partial = true
			if d := time.Now().Add(c.srv.readHeaderTimeout); d.Before(c.deadline) {
				c.setDeadline(d)
			}
		}
		if _, err := c.br.Peek(len(buf) + 1); err != nil {
			return 0, err
		}
	}
}

// keepIdleDeadline makes sure an idle connection is closed after about
// idleTimeout. Moving a deadline costs a timer update, so it is moved only
// when less than three quarters of idleTimeout are left, or more than all
// of it (the first head's, --read_header_timeout, may be longer): a
// connection idles for between 0.75 and 1 times idleTimeout.
func (c *serverConn) keepIdleDeadline() {
	// The last request's latest reading is microseconds old, unless its
	// response streamed for a while.
	now := c.resp.now
	if now.IsZero() || c.resp.streaming {
		now = time.Now()
	}
	if left := c.deadline.Sub(now); c.deadline.IsZero() || left < c.srv.idleTimeout*3/4 || left > c.srv.idleTimeout {
		c.setDeadline(now.Add(c.srv.idleTimeout))
	}
}

func (c *serverConn) setDeadline(t time.Time) {
	c.deadline = t
	c.rwc.SetReadDeadline(t)
}

// handOff gives the connection, with what was read and not yet used, to
// net/http.
func (c *serverConn) handOff() {
	c.srv.forget(c)
	pending, _ := c.br.Peek(c.br.Buffered())
	conn := &replayConn{Conn: c.rwc, pending: bytes.Clone(pending), headBy: c.deadline}
	c.rwc.SetReadDeadline(time.Time{})
	if !c.srv.handoff.deliver(conn) {
		c.rwc.Close()
	}
}

// serveRequest runs the handler for one request and finishes its response.
// done is false when the connection must close; hijacked when the handler
// took it.
func (c *serverConn) serveRequest(req *requestHead) (done, hijacked bool) {
	var body io.ReadCloser = http.NoBody
	var rb *fixedBody
	if req.contentLength > 0 {
		rb = c.requestBody(req.contentLength)
		body = rb
	}
	r := &c.req
	*r = http.Request{
		Method:        req.method,
		URL:           &req.url,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        req.header,
		Body:          body,
		ContentLength: req.contentLength,
		Close:         req.close,
		Host:          req.host,
		RemoteAddr:    c.remote,
		RequestURI:    req.target,
	}
	if c.header == nil {
		c.header = make(http.Header, 8)
	}
	clear(c.header)
	w := &c.resp
	*w = response{c: c, method: r.Method, start: clockNow(), header: c.header, declared: -1, body: c.body[:0], closeAfter: req.close}
	if !c.runHandler(w, r) {
		return false, false
	}
	if w.hijacked {
		c.srv.forget(c)
		return false, true
	}
	if rb != nil && !rb.finish() {
		w.closeAfter = true
	}
	if c.srv.shuttingDown.Load() {
		w.closeAfter = true
	}
	err := w.finish()
	if cap(w.body) <= 2*responseBufferSize {
		c.body = w.body[:0]
	}
	return err == nil && !w.closeAfter, false
}

// requestBody returns the reader of a request's body. One serves request
// after request while each handler read its body to the end before it
// returned, as the hot paths do, and lent it to no reader that may outlive
// it (see fixedBody.lend). Any other reader stays closed for good, and the
// next request gets a new one: a reader left behind, or started late from
// a goroutine, gets an error rather than the next request's body.
func (c *serverConn) requestBody(length int64) *fixedBody {
	b := c.reqBody
	if b == nil || b.lent || !b.drained {
		b = &fixedBody{br: c.br, conn: c.rwc, gap: c.srv.idleTimeout}
		c.reqBody = b
	}
	b.left, b.closed, b.drained, b.waited = length, false, false, false
	b.stall.Store(false)
	return b
}

// runHandler calls the handler, turning a panic into a closed connection
// and a log line as net/http does. It reports whether the handler returned.
func (c *serverConn) runHandler(w *response, r *http.Request) (ok bool) {
	defer func() {
		if v := recover(); v != nil {
			if v != http.ErrAbortHandler {
				buf := make([]byte, 16<<10)
				buf = buf[:runtime.Stack(buf, false)]
				c.srv.log.Error("panic serving "+c.remote, "panic", fmt.Sprint(v), "stack", string(buf))
			}
			ok = false
		}
	}()
	c.srv.handler.ServeHTTP(w, r)
	return true
}

// fixedBody reads a body of a known length from a connection: a request's
// on the fast path, a response's in the RPC client. It never reads past
// its length.
//
// A request's body must keep arriving: a read that has to wait for the
// client gives it gap (--idle_timeout) to send more, however long the whole
// upload takes. The deadline is set on conn only then, so a body that came
// with its head costs no timer update.
type fixedBody struct {
	mu      sync.Mutex // guards br's use, left, closed, drained: a reader may outlive the handler
	br      *bufio.Reader
	left    int64
	closed  bool     // the handler returned: reading is a bug
	conn    net.Conn // a request's connection; nil for a response
	gap     time.Duration
	stall   atomic.Bool // a read failed at the deadline
	lent    bool        // see lend
	drained bool        // a read reached the end of the body
	waited  bool        // a read had to wait for the client: see bodyReadAt
}

// lend marks a request's body as handed to a reader that may go on after
// its handler returned, as http.Transport's writer does: the body is then
// never reused for a later request, whose bytes that reader could see.
func (b *fixedBody) lend() { b.lent = true }

func (b *fixedBody) stalled() bool { return b.stall.Load() }

// bodyReadAt is when the request's body was all read, for a handler that
// has just read it and took start from requestStart: start itself when the
// body came with the head, as is usual, and the clock's reading when the
// client kept the handler waiting. A call's deadline counts from it, so
// that a slow upload does not use up the node's time. (For net/http's
// requests, requestStart reads the clock, after the body already.)
func bodyReadAt(r *http.Request, start time.Time) time.Time {
	if b, ok := r.Body.(*fixedBody); ok && b.waited {
		return clockNow()
	}
	return start
}

var errBodyAfterHandler = errors.New("http: invalid Read on closed Body")

// finish ends the body when its handler returned: later reads fail, and a
// rest that has all arrived is skipped. It reports whether the connection
// may serve another request: not when the rest has yet to come (waiting
// for it would hold the answer back; a refused upload must hear so at
// once), nor when a reader the handler left behind is still reading.
func (b *fixedBody) finish() bool {
	if !b.mu.TryLock() {
		return false
	}
	defer b.mu.Unlock()
	b.closed = true
	if int64(b.br.Buffered()) < b.left {
		return false
	}
	b.br.Discard(int(b.left))
	b.left = 0
	return true
}

func (b *fixedBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, errBodyAfterHandler
	}
	if b.left <= 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	if b.conn != nil && b.br.Buffered() == 0 {
		b.waited = true
		b.conn.SetReadDeadline(time.Now().Add(b.gap))
	}
	n, err := b.br.Read(p)
	if err != nil && b.conn != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		b.stall.Store(true)
	}
	b.left -= int64(n)
	if b.left == 0 {
		b.drained = true
		return n, io.EOF
	}
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *fixedBody) Close() error { return nil }

// replayConn is a connection handed to net/http: it first reads what the
// fast path had buffered.
type replayConn struct {
	net.Conn
	pending []byte

	// headBy is the deadline of the head begun on the fast path: the
	// first deadline net/http sets, a fresh --read_header_timeout for
	// the head, is kept to it, so that a head growing past the fast
	// path's buffer gets no more time than one that fits.
	mu     sync.Mutex
	headBy time.Time
}

// NetConn is the connection under c (see unsentBytes).
func (c *replayConn) NetConn() net.Conn { return c.Conn }

func (c *replayConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	if by := c.headBy; !by.IsZero() {
		c.headBy = time.Time{}
		if t.IsZero() || t.After(by) {
			t = by
		}
	}
	c.mu.Unlock()
	return c.Conn.SetReadDeadline(t)
}

func (c *replayConn) Read(p []byte) (int, error) {
	if len(c.pending) > 0 {
		n := copy(p, c.pending)
		c.pending = c.pending[n:]
		return n, nil
	}
	return c.Conn.Read(p)
}

// CloseWrite lets net/http close its side gracefully, as on a TCP
// connection.
func (c *replayConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// handoffListener is the listener net/http serves: it yields the
// connections the fast path hands over. The channel is unbuffered; a
// connection handed over after Close is closed by its sender.
type handoffListener struct {
	conns  chan net.Conn
	done   chan struct{}
	closed sync.Once
}

func newHandoffListener() *handoffListener {
	return &handoffListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

func (l *handoffListener) deliver(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.closed.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return handoffAddr{} }

type handoffAddr struct{}

func (handoffAddr) Network() string { return "handoff" }
func (handoffAddr) String() string  { return "handoff" }

// clockNow is time.Now with one clock reading rather than two. time.Now
// reads the wall clock and the monotonic clock, each a call into the
// kernel's vDSO; clockNow reads the monotonic clock alone and adds the time
// since a full reading taken less than a second before. Its wall time
// thus follows a step of the system clock within a second, and is good
// for Date headers and durations; its monotonic reading is exact.
func clockNow() time.Time {
	if base := clockBase.Load(); base != nil {
		if d := time.Since(*base); d >= 0 && d < time.Second {
			return base.Add(d)
		}
	}
	t := time.Now()
	clockBase.Store(&t)
	return t
}

// clockBase is clockNow's last full reading.
var clockBase atomic.Pointer[time.Time]

// dateCache formats the Date header once a second.
type dateCache struct{ p atomic.Pointer[cachedDate] }

type cachedDate struct {
	unix int64
	text []byte
}

func (d *dateCache) append(b []byte, now time.Time) []byte {
	c := d.p.Load()
	if c == nil || c.unix != now.Unix() {
		c = &cachedDate{unix: now.Unix(), text: now.UTC().AppendFormat(nil, http.TimeFormat)}
		d.p.Store(c)
	}
	return append(b, c.text...)
}
