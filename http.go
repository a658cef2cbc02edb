package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/websocket"
)

// errorBody is the ecosystem's error shape.
type errorBody struct {
	ID     string `json:"id"`
	Code   int    `json:"code"`
	Detail string `json:"detail"`
	Status string `json:"status"`
}

// writeError is the one place errors become HTTP answers.
func writeError(w http.ResponseWriter, code int, detail string) {
	writeJSON(w, code, errorBody{ID: "go.micro.sidecar", Code: code, Detail: detail, Status: statusText(code)})
}

// statusText is http.StatusText, or for a code it does not name (an app's
// 499, say) what net/http puts in such a status line: never empty.
func statusText(code int) string {
	if t := http.StatusText(code); t != "" {
		return t
	}
	return "status code " + strconv.Itoa(code)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	data, err := marshalJSON(v)
	if err != nil {
		code = http.StatusInternalServerError
		data, _ = marshalJSON(errorBody{ID: "go.micro.sidecar", Code: code, Detail: "encoding the answer: " + err.Error(), Status: statusText(code)})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	w.Write(data)
}

// marshalJSON is json.Marshal and a newline, without escaping <, > and &
// for HTML: answers are application/json, read in terminals and logs,
// where "Bearer <token>" should read as written.
func marshalJSON(v any) ([]byte, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	err := enc.Encode(v)
	return b.Bytes(), err
}

// allowMethods answers 405 with Allow unless r uses one of methods.
func allowMethods(w http.ResponseWriter, r *http.Request, methods ...string) bool {
	for _, m := range methods {
		if r.Method == m {
			return true
		}
	}
	w.Header().Set("Allow", strings.Join(methods, ", "))
	writeError(w, http.StatusMethodNotAllowed, "method "+r.Method+" not allowed on "+r.URL.Path+"; use "+strings.Join(methods, " or "))
	return false
}

// readBody reads a request body of at most limit bytes, answering 413 or 400
// itself when it cannot.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, bool) {
	return readBodyInto(w, r, limit, nil)
}

// readBodyInto is readBody appending to buf, when it is not nil, rather
// than to memory of its own: a handler that keeps a pooled buffer for the
// request saves an allocation. The body is valid until buf is next written.
func readBodyInto(w http.ResponseWriter, r *http.Request, limit int64, buf *bytes.Buffer) ([]byte, bool) {
	if ce := contentCoding(r.Header["Content-Encoding"]); ce != "" {
		refuseCoding(w, ce, "the sidecar reads request bodies as they are; send the body without a content coding")
		return nil, false
	}
	if r.ContentLength > limit {
		writeError(w, http.StatusRequestEntityTooLarge, "request body larger than "+itoa(limit)+" bytes (--max_body_bytes)")
		return nil, false
	}
	if r.ContentLength >= 0 && r.ContentLength <= 64<<10 {
		// The usual case, a small stated length: one read into a buffer of
		// that size. Larger bodies grow as they arrive, so that a length
		// alone reserves no memory.
		var body []byte
		if buf != nil {
			buf.Grow(int(r.ContentLength))
			body = buf.AvailableBuffer()[:r.ContentLength]
		} else {
			body = make([]byte, r.ContentLength)
		}
		if _, err := io.ReadFull(r.Body, body); err != nil {
			writeBodyError(w, err)
			return nil, false
		}
		if buf != nil {
			buf.Write(body) // in place: marks the bytes used
		}
		return body, true
	}
	r.Body = http.MaxBytesReader(w, r.Body, limit)
	var body []byte
	var err error
	if buf != nil {
		start := buf.Len()
		_, err = buf.ReadFrom(r.Body)
		body = buf.Bytes()[start:]
	} else {
		body, err = io.ReadAll(r.Body)
	}
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, "request body larger than "+itoa(limit)+" bytes (--max_body_bytes)")
		return nil, false
	case err != nil:
		writeBodyError(w, err)
		return nil, false
	}
	return body, true
}

// wsScheme is the WebSocket scheme of the connection r came on.
func wsScheme(r *http.Request) string {
	if r.TLS != nil {
		return "wss"
	}
	return "ws"
}

// tlsFailure is how a TLS handshake this sidecar made as a client failed.
type tlsFailure int

const (
	tlsOK        tlsFailure = iota // no handshake failure
	tlsUntrusted                   // the server's certificate is not trusted
	tlsNotSpoken                   // the server answered in something else (plain HTTP)
	tlsRefused                     // the server sent an alert: it refused our certificate, or wanted one
)

// tlsFailureOf classifies err. The server's alert comes as crypto/tls's
// "remote error", in TLS 1.3 after the client finished its part, when the
// request may be on its way: but the server refused the connection, and
// reads nothing of it.
func tlsFailureOf(err error) tlsFailure {
	var verify *tls.CertificateVerificationError
	var record tls.RecordHeaderError
	var op *net.OpError
	switch {
	case errors.As(err, &verify):
		return tlsUntrusted
	case errors.As(err, &record), errors.Is(err, http.ErrSchemeMismatch): // a plain HTTP answer, which net/http's client turns into the second
		return tlsNotSpoken
	case errors.As(err, &op) && op.Op == "remote error":
		return tlsRefused
	}
	return tlsOK
}

// writeBodyError answers a request whose body could not be read: 408 when
// it stalled, 400 otherwise.
func writeBodyError(w http.ResponseWriter, err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		writeError(w, http.StatusRequestTimeout, errBodyStalled.Error())
		return
	}
	writeError(w, http.StatusBadRequest, "reading request body: "+err.Error())
}

// refuseCoding answers a body in content coding ce with a 415 saying why,
// naming the coding that would do (RFC 9110 section 15.5.16).
func refuseCoding(w http.ResponseWriter, ce, why string) {
	w.Header().Set("Accept-Encoding", "identity")
	writeError(w, http.StatusUnsupportedMediaType, "Content-Encoding "+truncate(ce, 64)+": "+why)
}

// contentCoding returns the first coding other than identity that the
// Content-Encoding field lines list (RFC 9110 section 8.4: one list, over
// any number of lines), or "" when the body is as it is.
func contentCoding(lines []string) string {
	for _, line := range lines {
		for c := range strings.SplitSeq(line, ",") {
			if c = strings.TrimSpace(c); c != "" && !strings.EqualFold(c, "identity") {
				return c
			}
		}
	}
	return ""
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

var errBodyStalled = errors.New("request body stalled: nothing more arrived within --idle_timeout")

// boundStalledBodies makes, on net/http's connections, a request body that
// stops arriving fail: each read of it must bring bytes within gap, as on
// the fast path (see fixedBody). net/http has no such bound (ReadTimeout
// bounds a whole request, and would cut off long uploads to the proxy),
// so a chunked body sent a byte at a time, a minute apart, would hold its
// handler for good.
func boundStalledBodies(gap time.Duration, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Body != nil && r.Body != http.NoBody && r.ContentLength != 0 {
			// A copy of the request carries the bounded body: net/http's
			// own keeps its body, which it recognises after the handler
			// (to discard what is left, or to close after a 100-continue).
			body := &progressBody{ReadCloser: r.Body, rc: http.NewResponseController(w), gap: gap}
			defer body.handlerDone()
			bounded := *r
			bounded.Body = body
			r = &bounded
		}
		next.ServeHTTP(w, r)
	})
}

// boundStalledAnswers makes each write of an answer on net/http's
// connections (TLS, HTTP/2, heads the fast path handed over) fail once the
// client has taken nothing of it for gap, as on the fast path (see
// newServerSocket): a client that stops reading, or an HTTP/2 client that
// never opens a stream's window, must not hold its request and its
// --max_inflight slot for as long as it likes.
func boundStalledAnswers(gap time.Duration, next http.Handler) http.Handler {
	if gap <= 0 {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		conn, _ := r.Context().Value(connKey{}).(net.Conn)
		sw := &stallBoundWriter{ResponseWriter: w, rc: http.NewResponseController(w), gap: gap, conn: conn}
		// The last request's deadline may linger on a kept-alive
		// connection: none until this handler writes.
		sw.rc.SetWriteDeadline(time.Time{})
		defer sw.finish()
		next.ServeHTTP(sw, r)
	})
}

// stallBoundWriter gives each write of an answer gap to go out, for as
// long as the client keeps taking some of it: the deadline moves on while
// the socket's send queue shrinks (on Linux; see unsentBytes). Between
// writes there is none: an HTTP/2 stream would be reset by one passing
// while the handler waits on a node (after a 103, say).
type stallBoundWriter struct {
	http.ResponseWriter
	rc   *http.ResponseController
	gap  time.Duration
	conn net.Conn // the client's connection, for its send queue; nil: unknown

	mu       sync.Mutex // guards the fields below, taken by the timer too
	timer    *time.Timer
	writing  bool
	unsent   int
	hijacked bool // the connection is the handler's: its deadlines too
}

// arm gives the write about to start gap, and watches it.
func (w *stallBoundWriter) arm() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.hijacked {
		return
	}
	w.writing, w.unsent = true, unsentBytes(w.conn)
	w.rc.SetWriteDeadline(time.Now().Add(w.gap))
	if w.unsent < 0 {
		return // nothing to watch
	}
	if w.timer == nil {
		w.timer = time.AfterFunc(w.gap*3/4, w.extend)
	} else {
		w.timer.Reset(w.gap * 3 / 4)
	}
}

// extend moves a write's deadline on when the send queue changed since
// the last look: the client took some of it, or, the write going on,
// more went in.
func (w *stallBoundWriter) extend() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.writing {
		return
	}
	if n := unsentBytes(w.conn); n >= 0 && n != w.unsent {
		w.unsent = n
		w.rc.SetWriteDeadline(time.Now().Add(w.gap))
		w.timer.Reset(w.gap * 3 / 4)
	}
}

// disarm ends a write's deadline once it is done.
func (w *stallBoundWriter) disarm() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.writing {
		return
	}
	w.writing = false
	if w.timer != nil {
		w.timer.Stop()
	}
	w.rc.SetWriteDeadline(time.Time{})
}

// finish gives what net/http sends after the handler returns (the rest
// of an HTTP/1 buffer, an HTTP/2 stream's end) gap; the writer is not to
// be used once the handler returned, so nothing watches it then.
func (w *stallBoundWriter) finish() {
	w.disarm()
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.hijacked {
		w.rc.SetWriteDeadline(time.Now().Add(w.gap))
	}
}

func (w *stallBoundWriter) Write(p []byte) (int, error) {
	w.arm()
	defer w.disarm()
	return w.ResponseWriter.Write(p)
}

func (w *stallBoundWriter) FlushError() error {
	w.arm()
	defer w.disarm()
	return w.rc.Flush()
}

func (w *stallBoundWriter) Flush() { w.FlushError() }

func (w *stallBoundWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, rw, err := w.rc.Hijack()
	if err == nil {
		w.mu.Lock()
		w.hijacked = true
		w.mu.Unlock()
		c.SetWriteDeadline(time.Time{})
	}
	return c, rw, err
}

func (w *stallBoundWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// headDueListener gives each TLS connection it accepts a deadline for its
// first request head, counted from the accept (see headDueConn).
type headDueListener struct {
	net.Listener
	timeout time.Duration // --read_header_timeout; 0: none
}

func (l *headDueListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil || l.timeout <= 0 {
		return c, err
	}
	hc := &headDueConn{Conn: c, due: time.Now().Add(l.timeout)}
	c.SetReadDeadline(hc.due)
	return hc, nil
}

// headDueConn holds a connection's reads to the deadline of its first
// request head until a request has come (headIn). net/http clears the
// deadline after the TLS handshake, and its HTTP/2 server sets none for
// requests: an HTTP/2 connection that never finished a request's headers
// lived --idle_timeout, not --read_header_timeout.
type headDueConn struct {
	net.Conn
	mu  sync.Mutex
	due time.Time // zero once a request came
}

// NetConn is the connection under c (see unsentBytes).
func (c *headDueConn) NetConn() net.Conn { return c.Conn }

func (c *headDueConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.due.IsZero() && (t.IsZero() || t.After(c.due)) {
		t = c.due
	}
	return c.Conn.SetReadDeadline(t)
}

// headIn lifts the first head's deadline: a request came. What net/http
// wants then is no read deadline (a body's reads get their own).
func (c *headDueConn) headIn() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.due.IsZero() {
		c.due = time.Time{}
		c.Conn.SetReadDeadline(time.Time{})
	}
}

type connKey struct{}

// withConn keeps a connection in its requests' context (http.Server's
// ConnContext), for markHeadIn and the answers' stall limit
// (boundStalledAnswers).
func withConn(ctx context.Context, c net.Conn) context.Context {
	return context.WithValue(ctx, connKey{}, c)
}

// markHeadIn tells a TLS connection's headDueConn that a request came.
func markHeadIn(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if tc, ok := r.Context().Value(connKey{}).(*tls.Conn); ok {
			if hc, ok := tc.NetConn().(*headDueConn); ok {
				hc.headIn()
			}
		}
		next.ServeHTTP(w, r)
	})
}

// closeAfterUnsureFraming closes, on net/http's connections, the
// connection after every request whose body came chunked, and after every
// HTTP/1.0 request with a body. net/http frames a request that states both
// a Transfer-Encoding and a Content-Length by the first (in HTTP/1.0, by
// the second, the first dropped unseen), hides the other from handlers,
// and keeps the connection; RFC 9112 section 6.1 wants it closed, or what
// a front proxy framing the request by the other field took for the
// body's rest would be served as a request of its own (request
// smuggling). The fast path refuses such requests (errBothLengths,
// errTransferEncodingOn10); here the signs left are a chunked body and an
// HTTP/1.0 body. (An HTTP/1.0 request with a Transfer-Encoding alone
// leaves chunks behind, whose first line, a chunk size, is no request:
// net/http answers it with a 400 and closes.)
func closeAfterUnsureFraming(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TransferEncoding == nil && (r.ProtoAtLeast(1, 1) || r.ContentLength == 0) {
			next.ServeHTTP(w, r)
			return
		}
		cw := &closingWriter{ResponseWriter: w}
		next.ServeHTTP(cw, r)
		if !cw.headSent {
			w.Header().Set("Connection", "close") // nothing written: net/http sends the head now
		}
	})
}

// closingWriter puts Connection: close on the final answer's head: set at
// once, it could be cleared by a handler that passes on an interim 1xx
// (ReverseProxy clears the header after one).
type closingWriter struct {
	http.ResponseWriter
	headSent bool
}

func (w *closingWriter) WriteHeader(code int) {
	if !w.headSent && code >= 200 {
		w.headSent = true
		w.Header().Set("Connection", "close")
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *closingWriter) Write(p []byte) (int, error) {
	if !w.headSent {
		w.WriteHeader(http.StatusOK)
	}
	return w.ResponseWriter.Write(p)
}

// Flush, Hijack and Unwrap keep streams and upgrades working through it.
func (w *closingWriter) Flush() {
	if !w.headSent {
		w.WriteHeader(http.StatusOK)
	}
	http.NewResponseController(w.ResponseWriter).Flush()
}

func (w *closingWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

func (w *closingWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// stallReporter is a request body that knows whether it failed for
// stalling: progressBody, and the fast path's fixedBody.
type stallReporter interface{ stalled() bool }

// progressBody is a request body whose every read has a deadline.
//
// The deadline is set through the response writer, which is not to be
// used once the handler returned; the body may still be read then (the
// proxy's transport sends an upload from a goroutine of its own, on after
// an early answer), and an HTTP/2 writer dereferences nil. So the
// deadline is only moved while the handler runs.
type progressBody struct {
	io.ReadCloser
	rc    *http.ResponseController
	gap   time.Duration
	stall atomic.Bool

	mu   sync.Mutex // held across each deadline change, and by handlerDone
	done bool       // the handler returned: rc is not to be used
}

func (b *progressBody) stalled() bool { return b.stall.Load() }

func (b *progressBody) handlerDone() {
	b.mu.Lock()
	b.done = true
	b.mu.Unlock()
}

// setDeadline sets the connection's read deadline while the handler runs.
func (b *progressBody) setDeadline(t time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.done {
		b.rc.SetReadDeadline(t)
	}
}

func (b *progressBody) Read(p []byte) (int, error) {
	b.setDeadline(time.Now().Add(b.gap))
	n, err := b.ReadCloser.Read(p)
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		// Stalled: the deadline stays in the past, so that net/http, which
		// discards the rest of the body before it answers, gives up too
		// rather than wait on the client for the 408.
		b.stall.Store(true)
	case err != nil:
		// The body is over. net/http now reads on to notice the client
		// leaving, which must not time out while the handler works.
		b.setDeadline(time.Time{})
	}
	return n, err
}

// requestClock is a response writer that knows when its request arrived
// and keeps the last clock reading taken for it. Reading the clock costs
// about 50 ns in a virtual machine, and a call through /rpc read it seven
// times: the metrics, the deadline, the node's Timeout, the Date header.
type requestClock interface {
	Start() time.Time
	Now() time.Time
}

// requestStart is when the request w answers arrived, or now.
func requestStart(w http.ResponseWriter) time.Time {
	if c, ok := w.(requestClock); ok {
		return c.Start()
	}
	return time.Now()
}

// requestNow reads the clock, letting w reuse the reading.
func requestNow(w http.ResponseWriter) time.Time {
	if c, ok := w.(requestClock); ok {
		return c.Now()
	}
	return time.Now()
}

// guard refuses browser requests from origins the user did not allow on
// everything that changes state or upgrades to a WebSocket: a web page must
// not drive a developer's local sidecar. Plain reads stay open, and CORS
// headers are added for allowed origins.
func (s *sidecar) guard(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		origin := firstValue(r.Header["Origin"])
		if origin == "" {
			next.ServeHTTP(w, r)
			return
		}
		if !s.originAllowed(origin, r.Host) {
			if r.Method != http.MethodGet && r.Method != http.MethodHead || isUpgrade(r) {
				writeError(w, http.StatusForbidden, "origin "+truncate(origin, 128)+" is not allowed; add it to --cors_allowed_origins")
				return
			}
			next.ServeHTTP(w, r)
			return
		}
		w.Header().Set("Access-Control-Allow-Origin", origin)
		w.Header().Add("Vary", "Origin")
		if r.Method == http.MethodOptions && r.Header.Get("Access-Control-Request-Method") != "" {
			w.Header().Set("Access-Control-Allow-Methods", "GET, POST, PUT, PATCH, DELETE, OPTIONS")
			if h := r.Header.Get("Access-Control-Request-Headers"); h != "" {
				w.Header().Set("Access-Control-Allow-Headers", h)
			}
			w.Header().Set("Access-Control-Max-Age", "600")
			w.WriteHeader(http.StatusNoContent)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// originAllowed reports whether a browser origin may drive the sidecar: its
// own origin may when that is an IP address or localhost (see
// unrebindable), others only when listed.
func (s *sidecar) originAllowed(origin, host string) bool {
	if u, err := url.Parse(origin); err == nil && u.Host != "" && strings.EqualFold(u.Host, host) && unrebindable(u.Hostname()) {
		return true
	}
	for _, o := range s.cfg.CORSAllowedOrigins {
		if o == "*" || strings.EqualFold(o, origin) {
			return true
		}
	}
	return false
}

// unrebindable reports whether a page's host name is one no attacker can
// point at this machine: an IP address, or localhost. A page's own origin
// is trusted only then. Under DNS rebinding, a page of evil.example is
// served first from the attacker's server, then evil.example is made to
// resolve to 127.0.0.1, and the page's requests reach the sidecar with
// Origin and Host both evil.example: the same origin, to a check that
// compares the two alone. Other names go in --cors_allowed_origins.
func unrebindable(host string) bool {
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	return net.ParseIP(host) != nil || host == "localhost" || strings.HasSuffix(host, ".localhost")
}

func isUpgrade(r *http.Request) bool {
	return hasTokenIn(r.Header["Upgrade"], "websocket") // a list: "websocket, foo/1" names it too
}

// isWebSocketHandshake reports whether r is a WebSocket opening handshake
// (RFC 6455 section 4.1): a GET asking, in Connection too, to upgrade,
// with the key every handshake carries. Only such a request may skip the
// in-flight limit or carry its token in the URL; Upgrade fields alone on
// any request earn neither.
func isWebSocketHandshake(r *http.Request) bool {
	return r.Method == http.MethodGet && isUpgrade(r) && upgradeAsked(r) && firstValue(r.Header["Sec-Websocket-Key"]) != ""
}

// wsServer builds a WebSocket server for handler. The origin policy has
// already been applied by guard; the library's default handshake would
// refuse clients that send no Origin at all, which most non-browser clients
// do not. No subprotocol is agreed to: the library would echo a client's
// one as chosen, and answer an empty 400 to several.
func wsServer(handler websocket.Handler) websocket.Server {
	return websocket.Server{
		Handshake: func(cfg *websocket.Config, _ *http.Request) error {
			cfg.Protocol = nil
			return nil
		},
		Handler: handler,
	}
}

// handshakeOK checks what the WebSocket library would refuse in plain text,
// and answers in the error shape instead: a handshake that is not one
// (RFC 6455 section 4.2.1), or a version other than 13, which gets 426
// with the version to use (section 4.4).
func handshakeOK(w http.ResponseWriter, r *http.Request) bool {
	switch {
	case !isWebSocketHandshake(r) || firstValue(r.Header["Sec-Websocket-Key"]) == "":
		writeError(w, http.StatusBadRequest, "not a WebSocket handshake: a GET with Connection: Upgrade, Upgrade: websocket and a Sec-WebSocket-Key; use a WebSocket client")
	case !r.ProtoAtLeast(1, 1):
		writeError(w, http.StatusBadRequest, "a WebSocket handshake needs HTTP/1.1 or later (RFC 6455 section 4.2.1)")
	case !validWebSocketKey(r.Header["Sec-Websocket-Key"]):
		writeError(w, http.StatusBadRequest, "Sec-WebSocket-Key must be one value, 16 bytes in base64 (RFC 6455 section 4.1)")
	case firstValue(r.Header["Sec-Websocket-Version"]) != "13":
		w.Header().Set("Sec-WebSocket-Version", "13")
		writeError(w, http.StatusUpgradeRequired, "WebSocket version "+strconv.Quote(truncate(firstValue(r.Header["Sec-Websocket-Version"]), 16))+" is not supported; use 13 (RFC 6455)")
	case !validHandshakeHost(r):
		writeError(w, http.StatusBadRequest, "Host "+strconv.Quote(truncate(r.Host, 64))+" does not make a WebSocket URL")
	default:
		// x/net/websocket reads each field's first line only, and wants
		// the whole of it to be the token: two lines (Connection:
		// keep-alive, then Connection: Upgrade) are one list (RFC 9110
		// section 5.3), checked above.
		r.Header["Upgrade"] = []string{"websocket"}
		r.Header["Connection"] = []string{"Upgrade"}
		return true
	}
	return false
}

// validHandshakeHost reports whether x/net/websocket can make the
// handshake's URL of the request's Host, as it does before answering.
func validHandshakeHost(r *http.Request) bool {
	_, err := url.ParseRequestURI("ws://" + r.Host + r.URL.RequestURI())
	return err == nil
}

// validWebSocketKey reports whether a handshake's key fields are one
// value that decodes to 16 bytes, as RFC 6455 section 4.2.1 asks a server
// to check.
func validWebSocketKey(values []string) bool {
	if len(values) != 1 {
		return false
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(values[0]))
	return err == nil && len(key) == 16
}

// connSet tracks hijacked connections (WebSockets of the watch, the broker
// and the proxy): http.Server.Shutdown neither closes nor waits for them.
// Each connection's owner registers, under a key of its choice, a stop
// function that makes it close the connection (with a going-away frame
// where it speaks WebSocket) and return; closeAll calls them all and waits
// for the owners to finish.
type connSet struct {
	mu     sync.Mutex // guards stops, closed
	stops  map[any]func()
	closed bool
	wg     sync.WaitGroup // one per tracked connection
}

func newConnSet() *connSet { return &connSet{stops: map[any]func(){}} }

// add tracks c until remove; it returns false once shutdown has begun, and
// the caller should then close c at once.
func (cs *connSet) add(c any, stop func()) bool {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if cs.closed {
		return false
	}
	cs.stops[c] = stop
	cs.wg.Add(1)
	return true
}

func (cs *connSet) remove(c any) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	if _, ok := cs.stops[c]; ok {
		delete(cs.stops, c)
		cs.wg.Done()
	}
}

// closeAll stops every connection and waits for their owners, or for ctx.
func (cs *connSet) closeAll(ctx context.Context) {
	cs.mu.Lock()
	cs.closed = true
	for _, stop := range cs.stops {
		stop()
	}
	cs.mu.Unlock()
	done := make(chan struct{})
	go func() { cs.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// writeControl sends a control frame (close or ping) on c. The library only
// exposes data writes, so the frame type is switched for one write. Only the
// goroutine that owns c's writes may call it.
func writeControl(c *websocket.Conn, opcode byte, payload []byte) error {
	saved := c.PayloadType
	c.PayloadType = opcode
	_, err := c.Write(payload)
	c.PayloadType = saved
	return err
}

// writeClose sends a close frame with a status code (RFC 6455 section
// 7.4.1) and a reason, which must stay under 123 bytes, within closeGrace:
// a write deadline an earlier frame set may have passed on a quiet
// connection, and the frame would fail at once, unsent.
func writeClose(c *websocket.Conn, code int, reason string) error {
	c.SetWriteDeadline(time.Now().Add(closeGrace))
	payload := make([]byte, 2, 2+len(reason))
	binary.BigEndian.PutUint16(payload, uint16(code))
	payload = append(payload, truncate(reason, 120)...)
	return writeControl(c, websocket.CloseFrame, payload)
}

// queryOf parses the request's query strictly, answering 400 itself when
// it fails, as checkQuery says.
func queryOf(w http.ResponseWriter, r *http.Request, takes ...string) (url.Values, bool) {
	q, err := checkQuery(r, takes...)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return nil, false
	}
	return q, true
}

// checkQuery parses the request's query strictly: a bad escape is an
// error, not a pair silently dropped as URL.Query drops it; each name in
// takes may appear at most once; and a name the endpoint does not take (a
// typo: TTL for ttl) is an error, not ignored. access_token, which the
// token check reads, is always taken.
func checkQuery(r *http.Request, takes ...string) (url.Values, error) {
	q, err := parseForm(r.URL.RawQuery, "query")
	if err != nil {
		return nil, errors.New("query " + strconv.Quote(truncate(r.URL.RawQuery, 64)) + ": " + err.Error())
	}
	for name, values := range q {
		if name == "access_token" {
			continue
		}
		if !slices.Contains(takes, name) {
			list := "none"
			if len(takes) > 0 {
				list = strings.Join(takes, ", ")
			}
			return nil, fmt.Errorf("query parameter %q is not one %s %s takes (it takes %s)", truncate(name, 64), r.Method, r.URL.Path, list)
		}
		if err := onceOnly(name, len(values)); err != nil {
			return nil, err
		}
	}
	return q, nil
}

// parseForm is url.ParseQuery for a query or a form body (where says
// which, "query" or "form body"), with its refusal of a ';' put in words
// that fit: Go's says "invalid semicolon separator in query" whatever it
// parsed, and not what to send instead. A ';' is refused wherever it is,
// as url.ParseQuery refuses it (no separator since Go 1.17).
func parseForm(s, where string) (url.Values, error) {
	if strings.IndexByte(s, ';') >= 0 {
		return nil, fmt.Errorf("a ';' in a %s must be escaped, as %%3B", where)
	}
	return url.ParseQuery(s)
}

// answerClose answers a peer that closed with a close frame of its own,
// with code, as RFC 6455 section 5.5.1 asks: without it a browser's
// onclose reports 1006, an abnormal closure. x/net/websocket reads the
// peer's close as io.EOF and sends nothing back. The caller closes the
// connection, and must be its only writer of data frames: none may follow.
func answerClose(c *websocket.Conn, code int) {
	writeClose(c, code, "")
}

// WebSocket close codes (RFC 6455 section 7.4.1).
const (
	closeNormal         = 1000
	closeGoingAway      = 1001
	closeProtocolError  = 1002
	closeInvalidPayload = 1007
	closePolicyViolated = 1008
	closeTooBig         = 1009
	closeTryAgainLater  = 1013
)

// authenticate requires the --auth_token on every endpoint but /health. A
// WebSocket client that cannot set headers (a browser) may pass it as
// ?access_token=. Tokens are compared in constant time.
func (s *sidecar) authenticate(next http.Handler) http.Handler {
	if s.cfg.AuthToken == "" {
		return next
	}
	want := sha256.Sum256([]byte(s.cfg.AuthToken))
	peerLog := &logLimiter{every: time.Minute}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			next.ServeHTTP(w, r)
			return
		}
		got, ok := bearerToken(r)
		sum := sha256.Sum256([]byte(got))
		if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
			if peer := r.Header.Get(forwardedHeader); peer != "" && peerLog.allow(remoteHost(r)) {
				// The sender logs its side too; here is where the messages
				// were missed.
				s.log.Warn("refused messages forwarded by a peer sidecar: its token is not this sidecar's; sidecars that share topics need the same --auth_token", "peer", truncate(peer, 128), "remote", r.RemoteAddr)
			}
			w.Header().Set("WWW-Authenticate", `Bearer realm="micro"`)
			writeError(w, http.StatusUnauthorized, "missing or wrong token: send Authorization: Bearer <token> (WebSockets may use ?access_token=<token>)")
			return
		}
		dropToken(r, s.cfg.AuthToken)
		next.ServeHTTP(w, r)
	})
}

// remoteHost is the host part of the request's remote address: the key
// for what is logged once per sender, which a client cannot vary at will.
func remoteHost(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// dropToken removes the sidecar's token from a request it admitted. The
// token is the sidecar's secret, not the apps': the proxy passes headers
// and the query on, and would hand it to every app it calls. When the
// header carried it, an access_token in the query is the app's own, and
// stays, unless it is the token too (a client may send it both ways).
func dropToken(r *http.Request, token string) {
	if r.Header.Get("Authorization") != "" { // where bearerToken took it from
		delete(r.Header, "Authorization")
		r.URL.RawQuery = withoutParam(r.URL.RawQuery, "access_token", func(v string) bool { return v == token })
		return
	}
	r.URL.RawQuery = withoutParam(r.URL.RawQuery, "access_token", func(string) bool { return true })
}

// withoutParam returns the query without the pairs named name whose value
// drop picks, the others as they came.
func withoutParam(query, name string, drop func(value string) bool) string {
	if !strings.Contains(query, "_") && !strings.Contains(query, "%") {
		return query // neither access_token nor an escaped spelling of it
	}
	var kept []string
	for _, pair := range strings.Split(query, "&") {
		key, value, _ := strings.Cut(pair, "=")
		if k, err := url.QueryUnescape(key); err == nil && k == name {
			v, err := url.QueryUnescape(value)
			if err != nil {
				v = value
			}
			if drop(v) {
				continue
			}
		}
		kept = append(kept, pair)
	}
	return strings.Join(kept, "&")
}

// bearerToken returns the request's token, from the Authorization header or,
// on a WebSocket upgrade, the access_token query parameter.
func bearerToken(r *http.Request) (string, bool) {
	if h := r.Header.Get("Authorization"); h != "" {
		scheme, token, ok := strings.Cut(h, " ")
		return strings.TrimSpace(token), ok && strings.EqualFold(scheme, "Bearer")
	}
	if isWebSocketHandshake(r) && r.URL.Query().Has("access_token") {
		return r.URL.Query().Get("access_token"), true
	}
	return "", false
}

// limitInFlight bounds the requests being served at once, WebSockets aside
// (they are long-lived and bounded by their own limits). Past the bound a
// request is refused at once with 503 and Retry-After rather than queued, so
// a flood cannot pile up goroutines and memory. /health and /metrics are
// served regardless: an overload is when they are needed most.
func limitInFlight(max int, next http.Handler) http.Handler {
	var inFlight atomic.Int64 // a counter, not a channel of slots: two atomic adds per request
	refuse := func(w http.ResponseWriter) {
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "too many requests in flight ("+strconv.Itoa(max)+", --max_inflight); retry shortly")
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/health" || r.URL.Path == "/metrics":
			next.ServeHTTP(w, r)
		case isWebSocketHandshake(r):
			// A WebSocket lives as long as it likes: its slot is given back
			// once its connection is taken over. A request that only names
			// an upgrade, which nothing takes over, keeps it to the end.
			h := &releaseOnHijack{ResponseWriter: w, inFlight: &inFlight}
			defer h.release()
			if inFlight.Add(1) > int64(max) {
				refuse(w)
				return
			}
			next.ServeHTTP(h, r)
		default:
			defer inFlight.Add(-1)
			if inFlight.Add(1) > int64(max) {
				refuse(w)
				return
			}
			next.ServeHTTP(w, r)
		}
	})
}

// releaseOnHijack is a response writer that gives back its request's
// in-flight slot when its connection is taken over, or at the latest when
// release is called.
type releaseOnHijack struct {
	http.ResponseWriter
	inFlight *atomic.Int64
	done     atomic.Bool
}

func (w *releaseOnHijack) release() {
	if w.done.CompareAndSwap(false, true) {
		w.inFlight.Add(-1)
	}
}

func (w *releaseOnHijack) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w *releaseOnHijack) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	w.release()
	return http.NewResponseController(w.ResponseWriter).Hijack()
}

// serverErrorLog is net/http's error log: its lines go to log as warnings,
// but for failed TLS handshakes, which any port scanner or plain-HTTP
// client causes: at most one a minute, with the count of those left out.
type serverErrorLog struct {
	log     *slog.Logger
	mu      sync.Mutex // guards last, skipped
	last    time.Time
	skipped int
}

func (l *serverErrorLog) Write(p []byte) (int, error) {
	msg := strings.TrimSuffix(string(p), "\n")
	if !strings.Contains(msg, "TLS handshake error") {
		l.log.Warn(msg)
		return len(p), nil
	}
	l.mu.Lock()
	now := time.Now()
	if !l.last.IsZero() && now.Sub(l.last) < time.Minute {
		l.skipped++
		l.mu.Unlock()
		return len(p), nil
	}
	skipped := l.skipped
	l.last, l.skipped = now, 0
	l.mu.Unlock()
	l.log.Warn(msg, "similar_left_out", skipped)
	return len(p), nil
}
