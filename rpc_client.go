package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// nodeClient is the connection pool to nodes of RPC and of the proxy's
// direct path: HTTP/1.1 keep-alive connections on which the calling
// goroutine itself writes a request and reads the response. net/http's
// Transport hands every request to two goroutines per connection (a writer
// and a reader) over channels; for many small calls those handoffs, and
// the allocations around them, cost more than the I/O. The proxy keeps the
// Transport for what the direct path does not take (proxy_direct.go).
type nodeClient struct {
	dialer      net.Dialer
	connects    *connectLog   // shared with the proxy's Transport
	maxIdle     int           // idle connections kept per address
	maxIdleAll  int           // idle connections kept in all
	idleTimeout time.Duration // an idle connection older than this is closed
	maxHeader   int64         // largest response head read

	mu       sync.Mutex // guards idle, nIdle, sweeping
	idle     map[string][]*nodeConn
	nIdle    int
	sweeping bool // a sweep of old idle connections is scheduled

	addrMu sync.RWMutex       // guards addrs
	addrs  map[nodeKey]string // "host:port" of nodes called; emptied at maxAddrs
}

// maxAddrs bounds nodeClient.addrs; past it the map starts over.
const maxAddrs = 4096

// addrOf returns n's "host:port", formatted once per node rather than once
// per call.
func (nc *nodeClient) addrOf(n Node) string {
	k := keyOf(n)
	nc.addrMu.RLock()
	a, ok := nc.addrs[k]
	nc.addrMu.RUnlock()
	if ok {
		return a
	}
	a = n.hostPort()
	nc.addrMu.Lock()
	if len(nc.addrs) >= maxAddrs {
		clear(nc.addrs)
	}
	nc.addrs[k] = a
	nc.addrMu.Unlock()
	return a
}

func newNodeClient() *nodeClient {
	return &nodeClient{
		dialer:      net.Dialer{Timeout: nodeConnectTimeout, KeepAlive: 30 * time.Second},
		connects:    newConnectLog(),
		maxIdle:     512,
		maxIdleAll:  4096,
		idleTimeout: 90 * time.Second,
		maxHeader:   64 << 10,
		idle:        map[string][]*nodeConn{},
		addrs:       map[nodeKey]string{},
	}
}

// nodeConn is one connection to a node.
type nodeConn struct {
	conn     net.Conn
	lim      limitedConn
	br       *bufio.Reader
	sock     *nodeSocket
	reused   bool             // taken from the idle pool rather than dialed
	body     fixedBody        // the response body being read
	lr       io.LimitedReader // bounds body, kept here so as not to allocate
	wbuf     []byte           // the request being written
	hdr      []string         // a proxied response's header fields, reused
	lines    []byte           // and those passed on, as lines
	since    time.Time        // when the request it last served started
	deadline time.Time        // set on conn; zero: none
}

// limitedConn reads from a connection, failing once n bytes have been
// read, n < 0 meaning no limit: response heads are bounded, bodies are
// bounded by their reader. A request queued on sock goes out with the
// first read.
type limitedConn struct {
	c    io.Reader // the connection's reads (see rawSocket)
	sock *nodeSocket
	n    int64
}

var errHeadTooBig = errors.New("response headers too large")

func (l *limitedConn) Read(p []byte) (int, error) {
	if l.n == 0 {
		return 0, errHeadTooBig
	}
	if l.n > 0 && int64(len(p)) > l.n {
		p = p[:l.n]
	}
	var n int
	var err error
	if l.sock.pending() {
		n, err = l.sock.exchange(p)
	} else {
		n, err = l.c.Read(p)
	}
	if l.n > 0 {
		l.n -= int64(n)
	}
	return n, err
}

// get returns an idle connection to addr not idle for too long, if any;
// whether the node has closed it shows when it is used (see nodeSocket).
func (nc *nodeClient) get(addr string, now time.Time) *nodeConn {
	for {
		nc.mu.Lock()
		list := nc.idle[addr]
		if len(list) == 0 {
			nc.mu.Unlock()
			return nil
		}
		c := list[len(list)-1]
		list[len(list)-1] = nil
		// An emptied list is kept for the next put, which would otherwise
		// allocate a new one; sweep drops lists that stay empty.
		nc.idle[addr] = list[:len(list)-1]
		nc.nIdle--
		nc.mu.Unlock()
		if now.Sub(c.since) < nc.idleTimeout {
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
		time.AfterFunc(idleSweepEvery, nc.sweep)
	}
	nc.mu.Unlock()
}

// idleSweepEvery is how often sweep looks at the idle connections.
const idleSweepEvery = 15 * time.Second

// sweep closes connections idle for longer than idleTimeout, or that their
// node closed (an app that exited leaves them half-closed, holding a file
// descriptor each until then), and comes back while any are left.
func (nc *nodeClient) sweep() {
	now := time.Now()
	var old []*nodeConn
	nc.mu.Lock()
	for addr, list := range nc.idle {
		keep := list[:0]
		for _, c := range list {
			if now.Sub(c.since) >= nc.idleTimeout || !c.sock.check() {
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
		time.AfterFunc(idleSweepEvery, nc.sweep)
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

// open returns an idle connection to addr, or dials one by the deadline.
// now is about the time: a connection counts as idle from the start of the
// request it last served.
func (nc *nodeClient) open(ctx context.Context, now, deadline time.Time, addr string) (*nodeConn, error) {
	if c := nc.get(addr, now); c != nil {
		c.since, c.reused = now, true
		return c, nil
	}
	d := nc.dialer
	d.Deadline = connectDeadline(time.Now(), deadline) // now may be the request's start, long before a slow upload ended
	conn, err := nc.connects.dial(ctx, &d, addr)
	if err != nil {
		return nil, err
	}
	c := &nodeConn{conn: conn, sock: newNodeSocket(conn), since: now}
	c.lim.c, c.lim.sock = newRawSocket(conn), c.sock
	c.br = bufio.NewReaderSize(&c.lim, 4096)
	c.body.br = c.br
	return c, nil
}

// nodeConnectTimeout bounds a connection attempt to a node. A node that
// does not accept within it (a dead host) is taken for one that failed
// before the request left: ejected, and the call tried on another node.
// Given the whole call's deadline, the attempt would use it up, and the
// call end as a timeout that no other node could answer. It outlasts the
// second SYN, sent 1 s after the first (RFC 6298's initial RTO): a node
// whose accept queue overflowed for a moment (Python's servers listen with
// a backlog of 5) drops a SYN of a burst of calls, and is reached by the
// next.
const nodeConnectTimeout = 3 * time.Second

// minConnectTimeout is the shortest connection attempt whose failure
// tells of the node. Below it, the attempt gets the call's whole time,
// and failing, the call ends as the caller's deadline, not the node's
// fault: a caller asking for 5 ns must not get nodes ejected.
const minConnectTimeout = 100 * time.Millisecond

// connectDeadline is when a connection attempt made at now gives up:
// after nodeConnectTimeout, or half the time the call has left, so that
// another node may still be tried; or, when that half is under
// minConnectTimeout, at the call's deadline.
func connectDeadline(now, deadline time.Time) time.Time {
	limit := now.Add(nodeConnectTimeout)
	if deadline.IsZero() {
		return limit
	}
	half := deadline.Sub(now) / 2
	switch {
	case half < minConnectTimeout:
		return deadline
	case now.Add(half).Before(limit):
		return now.Add(half)
	}
	return limit
}

// connectLog keeps when a connection to each node address was last made,
// to tell a node whose accept queue is full from a dead host: both leave a
// connection attempt hanging, but only the first accepts others meanwhile.
type connectLog struct {
	mu   sync.Mutex
	last map[string]time.Time // emptied at maxAddrs
}

func newConnectLog() *connectLog { return &connectLog{last: map[string]time.Time{}} }

// dial connects to addr with d, noting the connection made; a timeout
// while another connection to addr was made is a busyNode.
func (l *connectLog) dial(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	start := time.Now()
	conn, err := d.DialContext(ctx, "tcp", addr)
	l.mu.Lock()
	defer l.mu.Unlock()
	if err == nil {
		if len(l.last) >= maxAddrs {
			clear(l.last)
		}
		l.last[addr] = time.Now()
		return conn, nil
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() && l.last[addr].After(start) {
		return nil, &busyNode{err}
	}
	return nil, err
}

// busyNode is a connection attempt that timed out while the node accepted
// others: it is up, its accept queue full. It is not ejected for it (see
// ejectsNotSent); the call may still move to another node.
type busyNode struct{ err error }

func (e *busyNode) Error() string {
	return "the node accepted other connections meanwhile, so it is up, but its accept queue is full (a listen backlog too small for the load?): " + e.err.Error()
}

func (e *busyNode) Unwrap() error { return e.err }

// ejectsNotSent reports whether a call that failed before its request
// left, with err, tells of a failing node: all such failures but a busy
// node's.
func ejectsNotSent(err error) bool {
	var b *busyNode
	return !errors.As(err, &b)
}

// errIdleClosed is an idle connection that the node closed, or sent
// something on, while it waited in the pool. Nothing was written on it.
var errIdleClosed = errors.New("idle connection closed by the node")

// keptAliveLost is a reused connection that ended before any of the answer
// came. That is most often the node closing it, idle (an idle timeout, a
// restart), in the moment the request went out, just after the check that
// it was open: the node is not failing, and is not ejected for it (see
// isConnFailure). It may
// also have read the request before closing, so the call is not sent
// again either.
type keptAliveLost struct{ err error }

func (e *keptAliveLost) Error() string {
	// Not "idle closed": a node that crashed on the request ends the same way.
	return "the node closed the connection before any answer (it may have read the request, so the call is not sent again): " + e.err.Error()
}

func (e *keptAliveLost) Unwrap() error { return e.err }

// keptAliveLoss marks err, which ended a call on a reused connection
// before any of the answer came, as a keptAliveLost when the node closed
// the connection (an end, a reset, a broken pipe, or, through net/http's
// transport, the connection closed on seeing one); other errors, the
// deadline's among them, and nil pass as they are.
func keptAliveLoss(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) || errors.Is(err, net.ErrClosed) {
		return &keptAliveLost{err}
	}
	return err
}

// start opens a connection to addr and writes on it the request that build
// appends to the connection's buffer, as part of reading the first bytes
// of the answer into c.br (see nodeSocket). An idle connection the node
// has closed is dropped for the next one. Unless c is nil (no connection
// could be made), the caller reads the answer, at most maxHeader bytes of
// head, and releases c, after stop.
func (nc *nodeClient) start(ctx context.Context, now, deadline time.Time, addr string, build func(b []byte) []byte) (c *nodeConn, stop func() bool, err error) {
	for {
		if c, err = nc.open(ctx, now, deadline, addr); err != nil {
			return nil, nil, err
		}
		stop = c.guard(ctx, deadline)
		c.wbuf = build(c.wbuf[:0])
		c.sock.queue(c.wbuf, c.reused)
		c.lim.n = nc.maxHeader
		if _, err = c.br.Peek(1); err != errIdleClosed {
			if c.reused {
				err = keptAliveLoss(err)
			}
			return c, stop, err
		}
		stop()
		c.conn.Close()
	}
}

// earlyAnswer is what a request's first read gives when the request could
// not be written whole. A node that refuses a call as its head arrives (a
// 413 over its body limit) answers and closes with the rest unread, and
// the reset that sends fails the write; its answer is still in the
// socket's buffer, and is the call's. With none, a node that took part of
// the request (sent) was reached, and is not to be ejected for it
// (uploadCut); one that took none of it failed as a connection does.
func earlyAnswer(c net.Conn, p []byte, werr error, sent bool) (int, error) {
	if !errors.Is(werr, syscall.ECONNRESET) && !errors.Is(werr, syscall.EPIPE) {
		return 0, werr // the deadline, or the caller gone: nothing to read
	}
	if n, _ := c.Read(p); n > 0 {
		return n, nil
	}
	if sent {
		return 0, &uploadCut{werr}
	}
	return 0, werr
}

// guard ends c's I/O at the deadline (none when zero), and at once when
// ctx ends. stop undoes the latter and reports whether ctx had not ended
// by then, so that the connection may be reused.
func (c *nodeConn) guard(ctx context.Context, deadline time.Time) (stop func() bool) {
	c.setDeadline(deadline)
	if ctx.Done() == nil {
		return func() bool { return true }
	}
	return context.AfterFunc(ctx, func() { c.conn.SetDeadline(aLongTimeAgo) })
}

// deadlineSlack is how much earlier than asked a call's deadline may fall.
// A deadline already set that early or less is kept: back-to-back calls
// on a connection then move no timer.
const deadlineSlack = 10 * time.Millisecond

// setDeadline sets the connection's deadline to t, or keeps the one it has
// when that is at most deadlineSlack before t.
func (c *nodeConn) setDeadline(t time.Time) {
	if !t.IsZero() && !c.deadline.IsZero() && !c.deadline.After(t) && t.Sub(c.deadline) <= deadlineSlack {
		return
	}
	c.deadline = t
	c.conn.SetDeadline(t)
}

// release keeps c for the next request to addr when reuse is set, and
// closes it otherwise.
func (nc *nodeClient) release(addr string, c *nodeConn, reuse bool) {
	if reuse {
		nc.put(addr, c)
	} else {
		c.conn.Close()
	}
}

// errInvalidHeader is a caller's header that cannot be sent on.
type errInvalidHeader string

func (e errInvalidHeader) Error() string {
	return fmt.Sprintf("net/http: invalid header field value for %q", string(e))
}

// nodeRequest is one POST to a node. Its deadline goes with it in a
// Timeout header, in go-micro's integer nanoseconds. The node's address is
// passed apart: it is kept by the pool, and escape analysis would then
// move the caller's header array to the heap along with it.
type nodeRequest struct {
	header []string // name, value pairs, names canonical
	body   []byte
}

// nodeResponse is a node's answer; body is read into the caller's buffer.
type nodeResponse struct {
	status      string
	code        int
	contentType string
}

// do sends req to addr and reads the response body into buf, at most limit+1
// bytes. Errors are those of net: a failed dial is a *net.OpError with Op
// "dial"; past the deadline, I/O fails with os.ErrDeadlineExceeded; when
// ctx ends, I/O in progress fails and ctx.Err() is set first. n is the
// number of body bytes read. now is the time of the call: the node is told
// it has deadline - now.
func (nc *nodeClient) do(ctx context.Context, now, deadline time.Time, addr string, req *nodeRequest, buf interface {
	ReadFrom(io.Reader) (int64, error)
	Grow(int)
}, limit int64) (resp nodeResponse, n int64, err error) {
	for i := 0; i+1 < len(req.header); i += 2 {
		if !validFieldValue(req.header[i+1]) {
			// A copy, so that req's header does not escape.
			return resp, 0, errInvalidHeader(strings.Clone(req.header[i]))
		}
	}
	c, stop, err := nc.start(ctx, now, deadline, addr, func(w []byte) []byte {
		w = append(w, "POST / HTTP/1.1\r\nHost: "...)
		w = append(w, addr...)
		w = append(w, "\r\nContent-Length: "...)
		w = strconv.AppendInt(w, int64(len(req.body)), 10)
		w = append(w, "\r\nTimeout: "...)
		w = strconv.AppendInt(w, int64(deadline.Sub(now)), 10)
		w = append(w, "\r\n"...)
		for i := 0; i+1 < len(req.header); i += 2 {
			w = append(w, req.header[i]...)
			w = append(w, ": "...)
			w = append(w, req.header[i+1]...)
			w = append(w, "\r\n"...)
		}
		w = append(w, "\r\n"...)
		return append(w, req.body...)
	})
	if c == nil {
		return resp, 0, err
	}
	reuse := false
	defer func() { nc.release(addr, c, stop() && reuse) }()
	if err != nil {
		return resp, 0, err
	}

	head, err := readResponseHead(c.br)
	for err == nil && head.code >= 100 && head.code <= 199 && head.code != http.StatusSwitchingProtocols {
		head, err = readResponseHead(c.br) // 100 Continue and the like come before the answer
	}
	if err != nil {
		if errors.Is(err, errHeadTooBig) {
			err = fmt.Errorf("net/http: server response headers exceeded %d bytes; aborted", nc.maxHeader)
		}
		return resp, 0, err
	}
	c.lim.n = -1
	resp = nodeResponse{status: head.status, code: head.code, contentType: head.contentType}
	var body io.Reader
	switch {
	case head.code == http.StatusNoContent || head.code == http.StatusNotModified:
		body = http.NoBody
	case head.code == http.StatusSwitchingProtocols:
		// Nothing was asked to switch to: whatever follows is not this
		// call's answer, and reading it to the connection's end would wait
		// out the deadline. The call reports the 101; the connection closes.
		body = http.NoBody
	case head.chunked:
		body = newChunkedBody(c.br, maxTrailerBytes)
	case head.contentLength >= 0:
		c.body.left, c.body.closed = head.contentLength, false
		body = &c.body
		if head.contentLength <= limit {
			buf.Grow(int(head.contentLength))
		}
	default:
		body, head.close = c.br, true // the body ends with the connection
	}
	c.lr = io.LimitedReader{R: body, N: limit + 1}
	n, err = buf.ReadFrom(&c.lr)
	c.lr.R = nil
	if err != nil {
		return resp, n, err
	}
	reuse = n <= limit && !head.close && head.code != http.StatusSwitchingProtocols && c.br.Buffered() == 0
	return resp, n, nil
}

// chunkedBody reads a chunked body to the very end of its message.
// httputil's reader stops after the last chunk's size line ("0\r\n"),
// before the trailer fields and the empty line that end the message; left
// unread, they would be taken for the next answer on the connection, or
// keep a clean connection from being reused. Trailer fields are dropped,
// as RFC 9112 section 7.1.2 allows one that removes the chunked coding.
type chunkedBody struct {
	r     io.Reader
	br    *bufio.Reader
	limit int64 // bytes of trailer section allowed
	err   error // once the body ended: io.EOF, or what was wrong with its end
}

// maxTrailerBytes bounds a chunked body's trailer section, as maxHeader
// bounds a head.
const maxTrailerBytes = 64 << 10

func newChunkedBody(br *bufio.Reader, limit int64) *chunkedBody {
	return &chunkedBody{r: httputil.NewChunkedReader(br), br: br, limit: limit}
}

func (b *chunkedBody) Read(p []byte) (int, error) {
	if b.err != nil {
		return 0, b.err
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		err = skipTrailers(b.br, b.limit)
		b.err = err
	}
	return n, err
}

// skipTrailers reads a chunked message's trailer section and its closing
// empty line, at most limit bytes; it returns io.EOF once they are read.
func skipTrailers(br *bufio.Reader, limit int64) error {
	var read int64
	for {
		line, err := br.ReadSlice('\n')
		read += int64(len(line))
		switch {
		case err == io.EOF:
			return io.ErrUnexpectedEOF
		case err != nil:
			return fmt.Errorf("%w: a chunked body's trailer: %v", errMalformedResponse, err)
		case read > limit:
			return fmt.Errorf("%w: a chunked body's trailers exceed %d bytes", errMalformedResponse, limit)
		}
		if len(bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r"))) == 0 {
			return io.EOF
		}
	}
}

// responseHead is what the client needs of a response's head.
type responseHead struct {
	code          int
	status        string // "200 OK"
	contentType   string
	contentLength int64 // -1 when not given
	chunked       bool
	close         bool // the node closes the connection after the body
}

var errMalformedResponse = errors.New("malformed HTTP response")

// readResponseHead reads a status line and header block, keeping the few
// fields a call needs; net/http's ReadResponse builds a whole header map.
func readResponseHead(br *bufio.Reader) (responseHead, error) { return readResponseHeader(br, nil) }

// readResponseHeader is readResponseHead that also appends every header
// line but Content-Length (the head's contentLength) to header, as
// canonical name and value pairs, when header is not nil.
func readResponseHeader(br *bufio.Reader, header *[]string) (responseHead, error) {
	// A head has almost always arrived whole with the first read: it is
	// then parsed where it lies, without a trip through bufio per line.
	if _, err := br.Peek(1); err != nil {
		return responseHead{contentLength: -1}, err
	}
	mark := 0
	if header != nil {
		mark = len(*header)
	}
	buf, _ := br.Peek(br.Buffered())
	lines := headLines{buf: buf}
	h, err := parseResponseHead(&lines, header)
	if err != errHeadIncomplete {
		br.Discard(lines.off)
		return h, err
	}
	if header != nil {
		*header = (*header)[:mark]
	}
	h, err = parseResponseHead(&headLines{br: br}, header)
	return h, headCut(err)
}

// headCut is the error of an answer's head that the node ended after its
// first byte: it answered, if brokenly, and is not ejected as a failing
// connection (badAnswer; isConnFailure no longer sees the end). A reset
// is a failing connection's, as ever.
func headCut(err error) error {
	if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: the node closed the connection in the middle of its head (%v)", errMalformedResponse, err)
	}
	return err
}

// cutByte is bytes.Cut for a one-byte separator, without bytes.Index's
// general case in between.
func cutByte(b []byte, sep byte) (before, after []byte, found bool) {
	if i := bytes.IndexByte(b, sep); i >= 0 {
		return b[:i], b[i+1:], true
	}
	return b, nil, false
}

// headLines yields the lines of a head without their line endings: cut
// from bytes already buffered, or read one at a time.
type headLines struct {
	br  *bufio.Reader
	buf []byte // not nil: the bytes the lines are cut from
	off int    // in buf, where the next line starts
}

// errHeadIncomplete is a head that goes on past the buffered bytes.
var errHeadIncomplete = errors.New("head not all buffered")

func (l *headLines) next() ([]byte, error) {
	if l.buf == nil {
		return readHeadLine(l.br)
	}
	i := bytes.IndexByte(l.buf[l.off:], '\n')
	if i < 0 {
		return nil, errHeadIncomplete
	}
	line := l.buf[l.off : l.off+i]
	l.off += i + 1
	return bytes.TrimSuffix(line, []byte("\r")), nil
}

// parseResponseHead parses a status line and header block; see
// readResponseHeader.
func parseResponseHead(lines *headLines, header *[]string) (responseHead, error) {
	h := responseHead{contentLength: -1}
	line, err := lines.next()
	if err != nil {
		return h, err
	}
	proto, status, _ := cutByte(line, ' ')
	code, _, _ := cutByte(status, ' ')
	h.code = int(parseDigits(code))
	if !bytes.HasPrefix(proto, []byte("HTTP/1.")) || len(code) != 3 || h.code < 100 {
		return h, fmt.Errorf("%w: status line %q", errMalformedResponse, truncate(string(line), 64))
	}
	h.status = internHeadValue(status)
	// Decided now: line's bytes, proto's included, are bufio's until the
	// next line is read.
	http10 := string(proto) == "HTTP/1.0"
	var codings int // Transfer-Encoding lines
	var connClose, keepAlive bool
	for {
		line, err := lines.next()
		if err != nil {
			return h, err
		}
		if len(line) == 0 {
			// As net/http: HTTP/1.0 has no chunked coding, and closes unless
			// asked to keep alive; a close asked for on any Connection line
			// stands, whatever other lines say.
			h.close = connClose || http10 && !keepAlive
			if http10 {
				h.chunked = false
			} else if codings > 1 || codings == 1 && !h.chunked {
				// Like net/http (and nginx), only a lone "chunked" is
				// understood: any other framing could be read otherwise by
				// whoever reads the connection next.
				return h, fmt.Errorf("%w: Transfer-Encoding other than chunked", errMalformedResponse)
			}
			return h, nil
		}
		name, value, ok := cutByte(line, ':')
		if !ok {
			return h, fmt.Errorf("%w: header line %q", errMalformedResponse, truncate(string(line), 64))
		}
		if n := len(name); n > 0 && (name[n-1] == ' ' || name[n-1] == '\t') {
			// White space before the colon: RFC 9112 section 5.1 has a
			// proxy remove it. The field is dropped, as net/http's client
			// drops it, unless it frames the body: read either way, it
			// would split the connection differently for someone.
			if framing := trimOWS(name); bytes.EqualFold(framing, []byte("Content-Length")) || bytes.EqualFold(framing, []byte("Transfer-Encoding")) {
				return h, fmt.Errorf("%w: header line %q", errMalformedResponse, truncate(string(line), 64))
			}
			continue
		}
		value = trimOWS(value)
		// By length first: EqualFold on every name costs more than the rest.
		isLength := len(name) == len("Content-Length") && bytes.EqualFold(name, []byte("Content-Length"))
		if header != nil {
			if !validToken(string(name)) || !validFieldValue(string(value)) {
				return h, fmt.Errorf("%w: header line %q", errMalformedResponse, truncate(string(line), 64))
			}
			if !isLength {
				*header = append(*header, internHeaderName(name), internHeadValue(value))
			}
		}
		switch {
		case len(name) == len("Content-Type") && bytes.EqualFold(name, []byte("Content-Type")):
			h.contentType = internHeadValue(value)
		case isLength:
			n := parseDigits(value)
			if n < 0 || h.contentLength >= 0 && h.contentLength != n {
				return h, fmt.Errorf("%w: Content-Length %q", errMalformedResponse, truncate(string(value), 64))
			}
			h.contentLength = n
		case len(name) == len("Transfer-Encoding") && bytes.EqualFold(name, []byte("Transfer-Encoding")):
			codings++
			h.chunked = bytes.EqualFold(value, []byte("chunked"))
		case len(name) == len("Connection") && bytes.EqualFold(name, []byte("Connection")):
			connClose = connClose || hasToken(string(value), "close")
			keepAlive = keepAlive || hasToken(string(value), "keep-alive")
		}
	}
}

// readHeadLine reads one line of a head without its line ending; the bytes
// are valid until the next read. A line longer than br's buffer (a
// Set-Cookie with a token, a Content-Security-Policy) is gathered in a
// slice of its own: only the head as a whole is bounded, by the reader
// under br (limitedConn).
func readHeadLine(br *bufio.Reader) ([]byte, error) {
	line, err := br.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		long := bytes.Clone(line)
		for errors.Is(err, bufio.ErrBufferFull) {
			line, err = br.ReadSlice('\n')
			long = append(long, line...)
		}
		line = long
	}
	if err != nil {
		if err == io.EOF && len(line) > 0 {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return bytes.TrimSuffix(bytes.TrimSuffix(line, []byte("\n")), []byte("\r")), nil
}

// parseDigits parses a non-negative decimal of at most 18 digits; -1 for
// anything else.
func parseDigits(b []byte) int64 {
	if len(b) == 0 || len(b) > 18 {
		return -1
	}
	var n int64
	for _, c := range b {
		if c < '0' || c > '9' {
			return -1
		}
		n = n*10 + int64(c-'0')
	}
	return n
}

// internHeaderName returns a field name in canonical form, without
// allocating for the names most responses carry.
func internHeaderName(b []byte) string {
	switch string(b) {
	case "Content-Type":
		return "Content-Type"
	case "Content-Length":
		return "Content-Length"
	case "Date":
		return "Date"
	case "Connection":
		return "Connection"
	case "Cache-Control":
		return "Cache-Control"
	case "Server":
		return "Server"
	case "Vary":
		return "Vary"
	case "Etag":
		return "Etag"
	case "Last-Modified":
		return "Last-Modified"
	case "Location":
		return "Location"
	case "Content-Encoding":
		return "Content-Encoding"
	}
	return http.CanonicalHeaderKey(string(b))
}

// internHeadValue returns b as a string, without allocating for the values
// almost every reply carries: its status, a JSON content type and, within
// a second, the same Date.
func internHeadValue(b []byte) string {
	for _, s := range [...]string{"200 OK", "application/json", "application/json; charset=utf-8"} {
		if string(b) == s {
			return s
		}
	}
	if len(b) == len(http.TimeFormat) {
		if d := lastDate.Load(); d != nil && string(b) == *d {
			return *d
		}
		s := string(b)
		lastDate.Store(&s)
		return s
	}
	return string(b)
}

// lastDate is the last value as long as a Date that internHeadValue saw:
// the Date of recent replies, the same for a second.
var lastDate atomic.Pointer[string]

// aLongTimeAgo is a deadline in the past: I/O fails at once.
var aLongTimeAgo = time.Unix(1, 0)
