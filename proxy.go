package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The HTTP reverse proxy: /proxy/{service}/{path...}, and /{service}/...
// under --handler=proxy, forward any request to a node chosen by the same
// selector as RPC. Small requests of stated length take the direct path
// (proxy_direct.go); net/http/httputil.ReverseProxy forwards the rest: it
// strips hop-by-hop headers (RFC 9110 section 7.6.1), streams bodies,
// flushes server-sent events and unknown-length bodies as they come, and
// passes WebSocket upgrades through. Both paths choose, eject and retry
// nodes through attemptNodes.

// proxyConfig tunes the proxy. Zero values take the documented defaults.
type proxyConfig struct {
	Retries int           // further nodes tried when a request may be retried
	Timeout time.Duration // wait for a node's response headers; default 5s
	// BodyIdle bounds a pause in a node's answer body (--idle_timeout): a
	// node that stops mid-body would otherwise hold the caller, a
	// goroutine and an in-flight slot for ever. Upgraded connections are
	// not limited. 0: no bound.
	BodyIdle time.Duration
}

// proxy forwards HTTP requests to the nodes of services.
type proxy struct {
	cfg       proxyConfig
	reg       *registry
	sel       *selector
	transport http.RoundTripper
	direct    *nodeClient // the direct path's connections, shared with RPC; nil: none
	bufs      sync.Pool   // *[]byte for the direct path; see getBuf
	rp        *httputil.ReverseProxy
	log       *slog.Logger

	conns *connSet // upgraded (hijacked) connections in flight, closed at shutdown
}

func newProxy(cfg proxyConfig, reg *registry, sel *selector, transport http.RoundTripper, conns *connSet, log *slog.Logger) *proxy {
	if cfg.Timeout <= 0 {
		cfg.Timeout = 5 * time.Second
	}
	p := &proxy{cfg: cfg, reg: reg, sel: sel, transport: transport, log: log, conns: conns}
	p.rp = &httputil.ReverseProxy{
		Rewrite:      rewrite,
		Transport:    roundTripFunc(p.roundTrip),
		BufferPool:   newBufferPool(),
		ErrorLog:     slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		ErrorHandler: proxyError,
		// Every piece of an answer goes on as it comes, of stated length
		// too, as on the direct path: held back (net/http's 4 KiB, the
		// fast-path server's 64 KiB), a slowly made answer would reach its
		// caller only at its end.
		FlushInterval: -1,
		ModifyResponse: func(resp *http.Response) error {
			t, _ := resp.Request.Context().Value(targetKey{}).(*proxyTarget)
			if t == nil {
				return nil
			}
			dropNodeCORS(resp.Header, t.corsAnswer)
			if t.corsAnswer == corsSidecar {
				addFields(resp.Header, t.cors)
			}
			noSniffing(t.answer) // again: a 1xx passed on took it off
			return nil
		},
	}
	return p
}

// sidecarAnsweredCORS reports whether the sidecar's guard set CORS fields
// on the answer for an allowed origin. Its policy then stands: the node's
// own CORS fields are dropped, since two Access-Control-Allow-Origin
// fields fail the browser's check.
func sidecarAnsweredCORS(h http.Header) bool { return h["Access-Control-Allow-Origin"] != nil }

// corsAnswer says what becomes of a node's CORS fields (Access-Control-*)
// on a proxied answer.
type corsAnswer uint8

const (
	// corsNode: the request carries no Origin (no browser's cross-origin
	// request): the node's fields stay.
	corsNode corsAnswer = iota
	// corsSidecar: the sidecar answered for an allowed origin. The node's
	// fields give way to its answer, but for the one that adds to it
	// rather than contradicts it: which fields the page may read. Not
	// Allow-Credentials: with --cors_allowed_origins=*, which the guard
	// answers by echoing the origin, it would let any site read with the
	// user's cookies, which a literal * never allows.
	corsSidecar
	// corsRefused: the origin is not allowed. The node's fields all go, so
	// that a page cannot read through the sidecar what the node would let
	// any origin read (an "Access-Control-Allow-Origin: *").
	corsRefused
)

// corsAnswerOf tells the corsAnswer of a request whose answer the guard
// has prepared.
func corsAnswerOf(r *http.Request, answer http.Header) corsAnswer {
	switch {
	case sidecarAnsweredCORS(answer):
		return corsSidecar
	case firstValue(r.Header["Origin"]) != "":
		return corsRefused
	}
	return corsNode
}

// drops reports whether the node's field k is left off the answer.
func (a corsAnswer) drops(k string) bool {
	switch {
	case a == corsNode || !isCORSField(k):
		return false
	case a == corsRefused:
		return true
	}
	return !strings.EqualFold(k, "Access-Control-Expose-Headers")
}

// variesByOrigin reports whether an answer that carried the node's CORS
// fields must say it varies by Origin: unless the sidecar answered for
// the origin (its own fields carry Vary), the node's fields reach a caller
// without an Origin and not one with a foreign Origin, and a cache must
// not serve one the other's.
func (a corsAnswer) variesByOrigin(nodeHadCORS bool) bool { return nodeHadCORS && a != corsSidecar }

// isCORSField reports whether a field name is a CORS answer's.
func isCORSField(k string) bool {
	const prefix = "Access-Control-"
	// The first byte settles it for most fields, on every proxied answer.
	return len(k) > len(prefix) && k[0]|0x20 == 'a' && strings.EqualFold(k[:len(prefix)], prefix)
}

// takeCORS removes the CORS answer the guard put on h, its fields and
// Vary, and returns it. On the ReverseProxy path it goes on the node's
// answer instead (ModifyResponse), or on an error (proxyError):
// ReverseProxy clears the answer's header once it has passed on an
// interim 1xx (a 103), which took the fields off the final answer.
func takeCORS(h http.Header) http.Header {
	own := http.Header{}
	for k, v := range h {
		if isCORSField(k) || k == "Vary" {
			own[k] = v
			delete(h, k)
		}
	}
	return own
}

// addFields adds the values of from to h.
func addFields(h, from http.Header) {
	for k, v := range from {
		h[k] = append(h[k], v...)
	}
}

// dropNodeCORS takes off h, a node's answer, the CORS fields a drops, and
// says it varies by Origin where it must (see variesByOrigin).
func dropNodeCORS(h http.Header, a corsAnswer) {
	had := false
	for k := range h {
		had = had || isCORSField(k)
		if a.drops(k) {
			delete(h, k)
		}
	}
	if a.variesByOrigin(had) {
		h.Add("Vary", "Origin")
	}
}

// proxyTarget is what the handler resolved for one request, handed to
// Rewrite and the RoundTripper through the request's context.
type proxyTarget struct {
	service    string
	nodes      []Node
	path       string // escaped path to request from the node
	timeout    time.Duration
	timeoutIn  string        // the Timeout header as it came, for the 504's hint
	shortened  bool          // the caller asked for less than the default deadline
	body       stallReporter // the caller's body, when it can stall; ReverseProxy hides it behind its own reader
	corsAnswer corsAnswer    // what becomes of the node's CORS fields
	cors       http.Header   // that answer, on the ReverseProxy path (see takeCORS)
	answer     http.Header   // the caller's answer's, on the ReverseProxy path, which clears it after a 1xx
	answered   Node          // the node whose answer ReverseProxy passes on
	answerBody *idleBody     // that answer's body, to tell why it broke off
}

type targetKey struct{}

// handleProxy serves /proxy/{service}/{path...}: the service is named in
// full, and the node is asked for /{path...} with the query as it came.
func (s *sidecar) handleProxy(w http.ResponseWriter, r *http.Request) {
	rest := strings.TrimPrefix(escapedPath(r.URL), "/proxy/")
	name, fwd, _ := strings.Cut(rest, "/")
	service, err := name, error(nil)
	if strings.IndexByte(name, '%') >= 0 {
		service, err = url.PathUnescape(name)
	}
	if err != nil || service == "" || !validName(service) {
		writeError(w, http.StatusNotFound, "no service named in "+truncate(r.URL.EscapedPath(), 128)+"; use /proxy/{service}/{path}")
		return
	}
	s.proxy.serve(w, r, service, "/"+fwd)
}

// handleProxyPath serves /{service}/... under --handler=proxy: the service
// comes from the path as micro's proxy handler maps it, and the node is
// asked for the whole path.
func (s *sidecar) handleProxyPath(w http.ResponseWriter, r *http.Request) {
	service, err := proxyRoute(s.rpc.cfg.Namespace, r.URL.Path)
	if err != nil {
		writeError(w, http.StatusNotFound, "no endpoint at "+truncate(r.URL.Path, 128)+": "+err.Error())
		return
	}
	s.proxy.serve(w, r, service, escapedPath(r.URL))
}

// escapedPath is the path as the client escaped it: u.EscapedPath,
// without its byte-by-byte escaping pass for the common path that escaping
// leaves as it is. Where the client left raw a byte a path may not hold
// (a '{' beside a %2F), EscapedPath escapes the decoded path afresh, which
// turns %2F into a slash: another path, even another service. The
// client's form is kept then, with those bytes escaped.
func escapedPath(u *url.URL) string {
	if u.RawPath == "" && plainPath(u.Path) {
		return u.Path
	}
	if u.RawPath != "" {
		if p := escapeLeftRaw(u.RawPath); p != u.RawPath {
			if decoded, err := url.PathUnescape(p); err == nil && decoded == u.Path {
				return p
			}
		}
	}
	return u.EscapedPath()
}

// escapeLeftRaw escapes the bytes of an escaped path that a path may not
// hold as they are (those url.URL's EscapedPath finds invalid), keeping
// its escapes (%XX) as they are.
func escapeLeftRaw(p string) string {
	var b strings.Builder
	for i := 0; i < len(p); i++ {
		c := p[i]
		switch {
		case c == '%' && i+2 < len(p) && isHex(p[i+1]) && isHex(p[i+2]):
			b.WriteString(p[i : i+3])
			i += 2
		case c != '%' && byteClass[c]&classPath != 0, strings.IndexByte("!$&'()*+,;=:@[]", c) >= 0:
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "%%%02X", c)
		}
	}
	return b.String()
}

func (p *proxy) serve(w http.ResponseWriter, r *http.Request, service, path string) {
	versions, err := p.reg.GetServiceAt(service, requestStart(w))
	if err != nil {
		writeError(w, http.StatusNotFound, "service "+truncate(service, 128)+" not found"+serviceHint)
		return
	}
	if n := forwardedHops(r.Header["X-Forwarded-For"]); n >= maxProxyHops {
		writeError(w, http.StatusLoopDetected, fmt.Sprintf("the request has passed %d proxies (X-Forwarded-For): a loop? Is a node of %s registered at a sidecar's own address?", n, truncate(service, 128)))
		return
	}
	t := proxyTarget{service: service, nodes: allNodes(versions), path: path, timeoutIn: firstValue(r.Header["Timeout"])}
	if t.timeout, t.shortened, err = callTimeout(r.Header["Timeout"], p.cfg.Timeout); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if p.direct != nil && canForwardDirect(r) {
		p.forward(w, r, &t)
		return
	}
	rt := t // a copy goes in the context, so that t stays off the heap
	rt.body, _ = r.Body.(stallReporter)
	rt.corsAnswer = corsAnswerOf(r, w.Header())
	if rt.corsAnswer == corsSidecar {
		rt.cors = takeCORS(w.Header())
	}
	rt.answer = w.Header()
	noSniffing(rt.answer) // ReverseProxy adds the node's Content-Type, if it sent one
	ctx := context.WithValue(callerContext(r), targetKey{}, &rt)
	if ctx.Value(http.ServerContextKey) == nil {
		// ReverseProxy aborts a response it cannot finish (a node gone
		// mid-body) only for a request that names its server; otherwise it
		// ends the body cleanly, and a truncated answer looks whole. The
		// fast-path server names none, so the proxy names one.
		ctx = context.WithValue(ctx, http.ServerContextKey, fastPathServer)
	}
	if upgradeAsked(r) {
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		// Cancelling the request closes the node's side, which ends the
		// copy and closes the client's.
		if !p.conns.add(&cancel, cancel) {
			writeError(w, http.StatusServiceUnavailable, "the sidecar is shutting down")
			return
		}
		defer p.conns.remove(&cancel)
		w = upgradeWriter{w}
	}
	if r.ContentLength != 0 {
		// The node may answer while the upload still comes (an echo, a
		// refusal), and its caller send the rest only once it has read
		// that: net/http would otherwise discard the rest as the answer's
		// head goes out, and the call hang. (The fast path's server never
		// does; it says so with an error.)
		http.NewResponseController(w).EnableFullDuplex()
	}
	hw := &heldHead{ResponseWriter: w}
	defer hw.answerBreak(ctx, &rt)
	p.rp.ServeHTTP(hw, r.WithContext(ctx))
	hw.release()
}

// heldHead holds the node's status back from the caller's writer until
// the answer's first byte, or a flush of a stream's (an answer of no
// stated length), as net/http's writer holds the head itself: an answer
// that breaks off before any of it went out can then be a 502 in the
// error shape, not a closed connection that the sidecar's metrics would
// count as a 200.
type heldHead struct {
	http.ResponseWriter
	code     int  // the status held; 0: none
	released bool // what comes now goes straight to the writer
}

func (h *heldHead) WriteHeader(code int) {
	switch {
	case code < 200 || h.released: // interim answers go at once, as they come
		h.ResponseWriter.WriteHeader(code)
	case h.code == 0:
		h.code = code
	}
}

// release writes the held status, if any; from then on h holds nothing.
func (h *heldHead) release() {
	if h.released {
		return
	}
	h.released = true
	if h.code != 0 {
		h.ResponseWriter.WriteHeader(h.code)
	}
}

func (h *heldHead) Write(b []byte) (int, error) {
	h.release()
	return h.ResponseWriter.Write(b)
}

func (h *heldHead) Flush() {
	if !h.released && h.code != 0 && h.Header().Get("Content-Length") != "" {
		// ReverseProxy flushes an answer's head at once, its body may be
		// slow to start (FlushInterval); a stated-length answer's is held
		// for its first byte all the same, as on the direct path.
		return
	}
	h.release()
	http.NewResponseController(h.ResponseWriter).Flush()
}

func (h *heldHead) Unwrap() http.ResponseWriter { return h.ResponseWriter }

// answerBreak, deferred, turns ReverseProxy's abort of an answer none of
// which went out (its body's first read failed) into a 502 naming the
// node; an abort after the head went out, or for a caller gone, goes on.
func (h *heldHead) answerBreak(ctx context.Context, t *proxyTarget) {
	v := recover()
	if v == nil {
		return
	}
	if v != http.ErrAbortHandler || h.released || h.code == 0 || ctx.Err() != nil {
		panic(v)
	}
	clear(h.Header()) // the node's fields are not the 502's
	if t.corsAnswer == corsSidecar {
		addFields(h.Header(), t.cors)
	}
	why := error(errors.New("the body ended"))
	if t.answerBody != nil && t.answerBody.err != nil {
		why = t.answerBody.err
	}
	h.code, h.released = 0, true
	writeError(h, http.StatusBadGateway, fmt.Sprintf("node %s (%s) of %s: its answer broke off before any of it was passed on: %v", t.answered.ID, t.answered.hostPort(), t.service, why))
}

// maxProxyHops bounds the proxies a request may have passed: a node
// registered at a sidecar's own address (by mistake, or by anyone who may
// register) would otherwise send each request round until every in-flight
// slot is taken. Every hop appends to X-Forwarded-For, so its entries count
// them, at no cost to requests that carry none.
const maxProxyHops = 16

// forwardedHops counts the addresses in X-Forwarded-For fields.
func forwardedHops(values []string) int {
	n := 0
	for _, v := range values {
		n += strings.Count(v, ",") + 1
	}
	return n
}

// callerContext is the context a proxied request's attempts run in. An
// upgrade or an event stream lasts as long as its caller listens, and ends
// when it goes. Any other request runs to its answer, as on the fast-path
// server, whose requests' contexts never end: net/http ends one also when
// the client only half-closes after sending (nc -N, many scripts), and
// that client still waits for its answer.
func callerContext(r *http.Request) context.Context {
	ctx := r.Context()
	if ctx.Done() == nil || upgradeAsked(r) || acceptsEventStream(r) {
		return ctx
	}
	return context.WithoutCancel(ctx)
}

// acceptsEventStream reports whether r asks for server-sent events.
func acceptsEventStream(r *http.Request) bool {
	for _, v := range r.Header["Accept"] {
		if strings.Contains(v, "text/event-stream") {
			return true
		}
	}
	return false
}

// upgradeAsked reports whether r asks to switch protocols, to a WebSocket
// or any other: ReverseProxy passes any such switch through.
func upgradeAsked(r *http.Request) bool {
	return len(r.Header["Upgrade"]) > 0 && hasTokenIn(r.Header["Connection"], "upgrade")
}

// upgradeWriter hands ReverseProxy a connection that yields first what the
// server had read past the upgrade request: ReverseProxy copies from the
// hijacked connection alone, and would drop bytes a client sent right
// behind its request, without waiting for the 101.
type upgradeWriter struct{ http.ResponseWriter }

func (w upgradeWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (w upgradeWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(w.ResponseWriter).Hijack()
	if err != nil || brw.Reader.Buffered() == 0 {
		return conn, brw, err
	}
	pending, _ := brw.Reader.Peek(brw.Reader.Buffered())
	conn = &replayConn{Conn: conn, pending: bytes.Clone(pending)}
	return conn, bufio.NewReadWriter(bufio.NewReader(conn), brw.Writer), nil
}

// fastPathServer stands for the fast-path server where a request's context
// should name its *http.Server; nothing is read from it.
var fastPathServer = &http.Server{}

// rewrite turns the incoming request into the one for the node; the
// RoundTripper fills in the node's address.
func rewrite(pr *httputil.ProxyRequest) {
	t := pr.In.Context().Value(targetKey{}).(*proxyTarget)
	u := pr.Out.URL
	u.Scheme, u.Host = "http", "node.invalid"
	u.Path, u.RawPath = t.path, ""
	if p, err := url.PathUnescape(t.path); err == nil && p != t.path {
		u.Path, u.RawPath = p, t.path
	}
	pr.Out.Host = ""
	// The query as it came: ReverseProxy drops the parameters with a
	// semicolon or a broken escape, which the app may well read.
	u.RawQuery = pr.In.URL.RawQuery
	// Keep the chain of proxies the request already passed (Rewrite drops
	// the incoming X-Forwarded-* headers); SetXForwarded appends the client.
	if xff := pr.In.Header["X-Forwarded-For"]; len(xff) > 0 {
		pr.Out.Header["X-Forwarded-For"] = xff
	}
	pr.SetXForwarded()
	// The sidecar's server has answered 100 Continue as the body was read:
	// the node's would reach the caller as a second one.
	delete(pr.Out.Header, "Expect")
}

type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// errHeaderTimeout cancels a request whose node sent no response headers in
// time.
var errHeaderTimeout = errors.New("no response headers within the deadline")

// roundTrip sends the request to a node of its target, moving to another
// node when it may: when the connection was never made and nothing of the
// body was read, or when the request is idempotent and has no body (RFC
// 9110 section 9.2.2).
func (p *proxy) roundTrip(req *http.Request) (*http.Response, error) {
	t := req.Context().Value(targetKey{}).(*proxyTarget)
	var body *onceBody
	if req.Body != nil && req.Body != http.NoBody {
		if b, ok := req.Body.(interface{ lend() }); ok {
			b.lend() // the transport's writer may read it after the handler returned
		}
		body = &onceBody{rc: req.Body}
		req.Body = body
	}
	replayable := body == nil && idempotent(req.Method)

	ctx, cancel := context.WithCancelCause(req.Context())
	// The deadline is for the node's response headers, counted once the
	// request is all sent, as net/http's ResponseHeaderTimeout counts: an
	// upload may take as long as it keeps coming (--idle_timeout), and a
	// slow client is no slow node to eject.
	timer := &headerTimer{d: t.timeout, f: func() { cancel(errHeaderTimeout) }}
	defer timer.stop() // the deadline ends with the headers; bodies stream on
	if body == nil {
		timer.start()
	} else {
		body.onEnd = timer.start
	}

	var resp *http.Response
	mayRetry := func(o outcome) bool { return o == notSent && (body == nil || !body.read) || replayable && o == lost }
	err := p.attemptNodes(t, mayRetry, func(node Node) (outcome, bool, error) {
		// Whether the transport reused a connection: a node closing an
		// idle one as the request goes out is no failing node (see
		// keptAliveLost).
		var reused, wroteHead, answerBegan atomic.Bool
		var conn atomic.Pointer[resetSeen]
		trace := &httptrace.ClientTrace{
			GotConn: func(info httptrace.GotConnInfo) {
				reused.Store(info.Reused)
				if c, ok := info.Conn.(*resetSeen); ok {
					conn.Store(c)
				}
			},
			WroteHeaders:         func() { wroteHead.Store(true) },
			GotFirstResponseByte: func() { answerBegan.Store(true) },
		}
		out := req.WithContext(httptrace.WithClientTrace(ctx, trace))
		u := *req.URL
		u.Host = node.hostPort()
		out.URL = &u
		r, err := p.transport.RoundTrip(out)
		if err == nil {
			resp = r
			t.answered = node
			return answered, false, nil
		}
		if berr := body.failure(); berr != nil {
			// The caller's body broke (a bad chunk, a cut upload), not the
			// node: nobody to eject, nothing to send elsewhere.
			return answered, false, callErrorf(http.StatusBadRequest, "request body: %v", berr)
		}
		o := classifyFailure(ctx, time.Time{}, err) // the deadline cancels ctx
		err = unwrapURLError(err)
		switch cut := headCut(err); {
		case o == lost && answerBegan.Load() && conn.Load().wasReset():
			err = errResetInHead // a failing connection, as on the direct path
		case o == lost && answerBegan.Load() && !isConnFailure(cut):
			o, err = answered, cut // a malformed answer, as badAnswer on the direct path
		case reused.Load():
			err = keptAliveLoss(err)
		case o == lost && body != nil && body.read && wroteHead.Load():
			err = &uploadCut{err}
		}
		return o, o == timedOut && context.Cause(ctx) == errHeaderTimeout, err
	})
	if err == errCallerGone && ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if resp != nil && resp.StatusCode != http.StatusSwitchingProtocols {
		t.answerBody = &idleBody{ReadCloser: resp.Body, idle: p.cfg.BodyIdle}
		resp.Body = t.answerBody
	}
	return resp, err
}

// idleBody ends a node's answer body that stops coming for idle (0:
// never): closing it fails the read in progress (a transport's body may be
// closed while read), and ReverseProxy then aborts the caller's response,
// which must not pass for whole. It keeps the first failure, to say why.
type idleBody struct {
	io.ReadCloser
	idle    time.Duration
	timer   *time.Timer
	stalled atomic.Bool
	err     error // the first read's failure other than the end
}

func (b *idleBody) Read(p []byte) (int, error) {
	n, err := b.read(p)
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}

func (b *idleBody) read(p []byte) (int, error) {
	if b.idle <= 0 {
		return b.ReadCloser.Read(p)
	}
	if b.timer == nil {
		b.timer = time.AfterFunc(b.idle, func() {
			b.stalled.Store(true)
			b.ReadCloser.Close()
		})
	} else {
		b.timer.Reset(b.idle)
	}
	n, err := b.ReadCloser.Read(p)
	b.timer.Stop()
	if err != nil && b.stalled.Load() {
		err = fmt.Errorf("the node sent nothing of its answer for %v (--idle_timeout)", b.idle)
	}
	return n, err
}

func (b *idleBody) Close() error {
	if b.timer != nil {
		b.timer.Stop()
	}
	return b.ReadCloser.Close()
}

// stalled reports whether the caller's body failed for stalling. The
// proxy learns of it from elsewhere (net/http cancels the request's
// context, as if the caller had gone; the transport fails), and still owes
// the caller a 408.
func (t *proxyTarget) stalled() bool { return t.body != nil && t.body.stalled() }

// idempotent reports whether a request with method may be sent twice
// (RFC 9110 section 9.2.2); the proxy resends only those without a body,
// as nginx's proxy_next_upstream does by default.
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// errCallerGone ends an attempt whose caller went away: nobody reads an
// answer.
var errCallerGone = errors.New("the caller went away")

// attemptNodes sends a request to nodes of t chosen by the selector until
// one answers, with the rules both proxy paths share. A node is ejected
// when its connection failed or it ran out of the proxy's own deadline.
// Another node is tried while mayRetry says the request may be sent again.
// send reports how a failed attempt failed, and whether it was the
// deadline (not the caller leaving) that ended it. The error is the answer
// to give: nil when a node answered, errCallerGone when there is nobody to
// tell.
func (p *proxy) attemptNodes(t *proxyTarget, mayRetry func(outcome) bool, send func(Node) (o outcome, late bool, err error)) error {
	var triedArr [4]nodeKey
	tried := triedArr[:0]
	var lastErr error
	for attempt := 0; attempt <= p.cfg.Retries; attempt++ {
		node, ok := p.sel.next(t.service, t.nodes, tried)
		if !ok {
			break
		}
		tried = append(tried, keyOf(node))
		o, late, err := send(node)
		if err == nil {
			p.sel.succeeded(node)
			return nil
		}
		if ce := (*callError)(nil); errors.As(err, &ce) && ce.code < 500 {
			p.sel.settled(node)
			return err // the caller's own fault: it is told so as it is
		}
		if o == notSent && ejectsNotSent(err) || o == lost && isConnFailure(err) || late && !t.shortened {
			if d := p.sel.failed(node); d > 0 {
				p.log.Warn("node ejected", "service", t.service, "node", node.ID, "address", node.hostPort(), "for", d, "error", err)
			}
		} else {
			p.sel.settled(node)
		}
		if o == timedOut {
			if late {
				return callErrorf(http.StatusGatewayTimeout, "no response from node %s (%s) of %s within the deadline (%s)", node.ID, node.hostPort(), t.service, timeoutHint(t.timeoutIn, t.timeout))
			}
			return errCallerGone
		}
		lastErr = &callError{http.StatusBadGateway, fmt.Sprintf("node %s (%s) of %s: %v", node.ID, node.hostPort(), t.service, err), err}
		if !mayRetry(o) {
			return lastErr
		}
	}
	switch {
	case lastErr == nil:
		return callErrorf(http.StatusServiceUnavailable, "no nodes available for service %s: all %d ejected after failures", t.service, len(t.nodes))
	case len(tried) > 1:
		return callErrorf(http.StatusBadGateway, "service %s unreachable: tried %d nodes; last: %v", t.service, len(tried), lastErr)
	default:
		return lastErr
	}
}

// proxyError is the ReverseProxy's one error handler.
func proxyError(w http.ResponseWriter, r *http.Request, err error) {
	t, _ := r.Context().Value(targetKey{}).(*proxyTarget)
	if t != nil && t.corsAnswer == corsSidecar {
		addFields(w.Header(), t.cors)
	}
	if t != nil && t.stalled() {
		writeError(w, http.StatusRequestTimeout, errBodyStalled.Error())
		return
	}
	if r.Context().Err() != nil {
		// The caller of a stream or an upgrade has gone. A handler that
		// writes nothing would pass for a 200 with no body; this closes
		// the connection without an answer.
		panic(http.ErrAbortHandler)
	}
	var ce *callError
	if !errors.As(err, &ce) {
		err = callErrorf(http.StatusBadGateway, "proxy: %v", err)
	}
	writeCallError(w, err)
}

// resetSeen is a connection to a node that remembers whether a read found
// it reset. Go's transport cannot tell a reset that cut a line of the
// answer's head from the node closing there: its reader takes the reset
// for the line's end, and reads the end of the connection next.
type resetSeen struct {
	net.Conn
	reset atomic.Bool
}

func (c *resetSeen) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if err != nil && errors.Is(err, syscall.ECONNRESET) {
		c.reset.Store(true)
	}
	return n, err
}

// wasReset reports whether a read of c found it reset; false for nil.
func (c *resetSeen) wasReset() bool { return c != nil && c.reset.Load() }

// errResetInHead is a node resetting its connection after part of its
// answer's head, a failing connection (see isConnFailure).
var errResetInHead = fmt.Errorf("the node reset the connection in the middle of its head (%w)", syscall.ECONNRESET)

// uploadCut is the failure of a request whose head reached the node and
// whose body the node stopped taking (it closed or reset the connection)
// before an answer could be read. Most often the node refused the upload
// (a 413 over its limit, a 401) and closed at once, and the reset that
// closing with the body unread sends destroyed its answer on the way, or
// Go's transport returned the failed write instead (golang/go#51109). The
// node is reachable, and is not ejected for it (see isConnFailure): two
// such uploads used to take a service's two nodes out for everyone.
type uploadCut struct{ err error }

func (e *uploadCut) Error() string {
	return "the node closed the connection while the request body was being sent (it may have refused the upload; an answer it sent was lost): " + e.err.Error()
}

func (e *uploadCut) Unwrap() error { return e.err }

// onceBody lets a request body survive a failed attempt: the transport
// closes the body it was given, and a retry needs it still open. read says
// whether any of it has been consumed, after which it cannot be replayed.
type onceBody struct {
	rc    io.ReadCloser
	read  bool
	ended bool   // rc said io.EOF: it is not read again
	onEnd func() // called when the body has been read to its end

	mu  sync.Mutex // the transport's writer sets err as RoundTrip returns
	err error      // the caller's body failed to read: not the node's fault
}

func (b *onceBody) Read(p []byte) (int, error) {
	if b.ended {
		// The transport reads once more past a stated length, to check
		// that nothing more came. By then net/http may have closed the
		// caller's body (it does as the answer's head goes out), and the
		// error of reading it would make the transport close the node's
		// connection, and cut off the answer coming on it.
		return 0, io.EOF
	}
	b.read = true
	n, err := b.rc.Read(p)
	switch {
	case err == io.EOF:
		b.ended = true
		if b.onEnd != nil {
			b.onEnd()
		}
	case err != nil:
		b.mu.Lock()
		b.err = err
		b.mu.Unlock()
	}
	return n, err
}

// headerTimer runs f once d has passed since start, unless stopped first;
// start may come from the transport's writer, stop from the handler.
type headerTimer struct {
	d       time.Duration
	f       func()
	mu      sync.Mutex
	t       *time.Timer
	stopped bool
}

func (h *headerTimer) start() {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.stopped && h.t == nil {
		h.t = time.AfterFunc(h.d, h.f)
	}
}

func (h *headerTimer) stop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopped = true
	if h.t != nil {
		h.t.Stop()
	}
}

// failure is why reading the caller's body failed, or nil; nil for no body.
func (b *onceBody) failure() error {
	if b == nil {
		return nil
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// Close leaves the incoming body to the server, which closes it when the
// handler returns.
func (b *onceBody) Close() error { return nil }

// bufferPool recycles the 32 KiB copy buffers of the ReverseProxy.
type bufferPool struct{ p sync.Pool }

func newBufferPool() *bufferPool {
	return &bufferPool{p: sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}}
}

func (b *bufferPool) Get() []byte  { return *(b.p.Get().(*[]byte)) }
func (b *bufferPool) Put(v []byte) { b.p.Put(&v) }
