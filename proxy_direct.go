package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// The proxy's direct path. For the common request, one with a small body
// of stated length (or none) and no upgrade, the proxy writes the request
// to a kept-alive node connection of the RPC client itself and copies the
// answer back, streaming a body of unknown length as it comes. Through
// ReverseProxy and http.Transport every request is cloned, handed to two
// goroutines per connection and written in pieces; for small calls that
// costs more than the call (see "Performance" in the README). Everything
// else goes through ReverseProxy as before. Both paths forward the same
// headers: see forwardHeader and the tests that run both.

// directMaxBody is the largest request body the direct path takes. The
// body is read before a node is chosen, so that a request whose connection
// failed can be sent to another node with the same bytes.
const directMaxBody = 64 << 10

// getBuf and putBuf recycle the direct path's buffers: requests being
// written and bodies being copied, 32 KiB each, more when a request needs
// it; buffers over 128 KiB are dropped.
func (p *proxy) getBuf() *[]byte {
	if b, ok := p.bufs.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 0, 32<<10)
	return &b
}

func (p *proxy) putBuf(b *[]byte) {
	if cap(*b) <= 128<<10 {
		p.bufs.Put(b)
	}
}

// canForwardDirect reports whether the direct path can take r: not an
// upgrade, a body of stated length up to directMaxBody, and no "TE:
// trailers" (the direct path drops trailers; a client that asks for them
// goes through ReverseProxy, which forwards them).
func canForwardDirect(r *http.Request) bool {
	return r.ContentLength >= 0 && r.ContentLength <= directMaxBody && len(r.TransferEncoding) == 0 &&
		firstValue(r.Header["Upgrade"]) == "" && !hasTokenIn(r.Header["Te"], "trailers")
}

// isHopHeader reports whether name is hop-by-hop, or named as such by the
// message's Connection field.
func isHopHeader(name string, connection []string) bool {
	switch name { // the fields a proxy must not forward (RFC 9110 section 7.6.1), as ReverseProxy lists them
	case "Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Te", "Trailer", "Transfer-Encoding", "Upgrade":
		return true
	}
	for _, v := range connection {
		if hasToken(v, name) {
			return true
		}
	}
	return false
}

// forwardHeader appends the header block of the request to the node, after
// its Host line: the client's fields but hop-by-hop ones and any
// Forwarded or X-Forwarded-* ones, then X-Forwarded-For (the chain the
// request came with, then the client), -Host and -Proto, as rewrite and
// ReverseProxy set them.
func forwardHeader(b []byte, r *http.Request, bodyLen int) []byte {
	connection := r.Header["Connection"]
	for k, vs := range r.Header {
		switch k {
		case "Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Content-Length",
			"Expect": // answered by the sidecar's server as it read the body, as rewrite drops it
			continue
		}
		if isHopHeader(k, connection) {
			continue
		}
		for _, v := range vs {
			b = appendHeaderLine(b, k, v)
		}
	}
	if ip, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		if prior := r.Header["X-Forwarded-For"]; len(prior) > 0 {
			ip = strings.Join(prior, ", ") + ", " + ip
		}
		b = appendHeaderLine(b, "X-Forwarded-For", ip)
	}
	b = appendHeaderLine(b, "X-Forwarded-Host", r.Host)
	proto := "http"
	if r.TLS != nil {
		proto = "https"
	}
	b = appendHeaderLine(b, "X-Forwarded-Proto", proto)
	if bodyLen > 0 || r.Method == http.MethodPost || r.Method == http.MethodPut || r.Method == http.MethodPatch {
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, int64(bodyLen), 10)
		b = append(b, "\r\n"...)
	}
	return append(b, "\r\n"...)
}

// badAnswer reports whether err is a node's answer the sidecar refuses (a
// malformed or oversized head), not a failing connection: the node has run
// the request, so it goes to no other node, idempotent or not, and the node
// is not ejected, as nginx's default proxy_next_upstream has it.
func badAnswer(err error) bool {
	return errors.Is(err, errMalformedResponse) || errors.Is(err, errHeadTooBig)
}

func appendHeaderLine(b []byte, name, value string) []byte {
	b = append(b, name...)
	b = append(b, ": "...)
	b = append(b, value...)
	return append(b, "\r\n"...)
}

func hasTokenIn(values []string, token string) bool {
	for _, v := range values {
		if hasToken(v, token) {
			return true
		}
	}
	return false
}

// forward sends r to a node of t and copies the answer to w, with the
// rules of attemptNodes; a request whose body is held in memory may always
// go to another node when no connection was made.
func (p *proxy) forward(w http.ResponseWriter, r *http.Request, t *proxyTarget) {
	bp := p.getBuf()
	defer p.putBuf(bp)
	req := append((*bp)[:0], r.Method...)
	req = append(req, ' ')
	req = append(req, t.path...)
	if r.URL.RawQuery != "" || r.URL.ForceQuery { // "/x?" goes on as it came, as through ReverseProxy
		req = append(req, '?')
		req = append(req, r.URL.RawQuery...)
	}
	req = append(req, " HTTP/1.1\r\nHost: "...)
	hostAt := len(req) // the node's address goes here
	req = forwardHeader(req, r, int(r.ContentLength))
	// The body, of the length canForwardDirect checked, is read straight
	// in after the head.
	headEnd := len(req)
	req = slices.Grow(req, int(r.ContentLength))[:headEnd+int(r.ContentLength)]
	*bp = req
	if _, err := io.ReadFull(r.Body, req[headEnd:]); err != nil {
		writeBodyError(w, err)
		return
	}
	replayable := r.ContentLength == 0 && idempotent(r.Method)

	ctx := callerContext(r)
	now := bodyReadAt(r, requestStart(w)) // as roundTrip: a slow upload is no slow node
	deadline := now.Add(t.timeout)
	attempts := 0
	mayRetry := func(o outcome) bool { return o == notSent || replayable && o == lost }
	cors := corsAnswerOf(r, w.Header())
	err := p.attemptNodes(t, mayRetry, func(node Node) (outcome, bool, error) {
		if attempts++; attempts > 1 {
			now = time.Now()
		}
		o, err := p.forwardTo(ctx, now, deadline, w, r.Method, cors, node, req[:hostAt], req[hostAt:])
		return o, o == timedOut && ctx.Err() == nil, err
	})
	switch {
	case err == errCallerGone:
		panic(http.ErrAbortHandler) // as proxyError: no answer is no 200
	case err != nil:
		writeCallError(w, err)
	}
}

// forwardTo sends one attempt to node: the request line and Host up to
// the node's address, then the rest. An error means nothing was written to
// w; once the head is copied, a failure aborts the response, as in
// ReverseProxy.
func (p *proxy) forwardTo(ctx context.Context, now, deadline time.Time, w http.ResponseWriter, method string, cors corsAnswer, node Node, line, rest []byte) (outcome, error) {
	addr := p.direct.addrOf(node)
	c, stop, err := p.direct.start(ctx, now, deadline, addr, func(out []byte) []byte {
		out = append(out, line...)
		out = append(out, addr...)
		out = append(out, "\r\n"...)
		return append(out, rest...)
	})
	if c == nil {
		return classifyFailure(ctx, deadline, err), err
	}
	reuse := false
	defer func() { p.direct.release(addr, c, stop() && reuse) }()
	if err != nil {
		return classifyFailure(ctx, deadline, err), err
	}
	header := c.hdr[:0]
	defer func() { c.hdr = header[:0] }()
	head, err := readResponseHeader(c.br, &header)
	for err == nil && head.code >= 100 && head.code <= 199 {
		if head.code == http.StatusSwitchingProtocols {
			return answered, fmt.Errorf("%w: 101 Switching Protocols to a request without Upgrade", errMalformedResponse)
		}
		header = header[:0]
		head, err = readResponseHeader(c.br, &header)
	}
	if err != nil {
		if badAnswer(err) {
			return answered, err
		}
		return classifyFailure(ctx, deadline, err), err
	}
	c.lim.n = -1
	if n := head.contentLength; n > int64(c.br.Buffered()) && n <= int64(c.br.Size()) && !head.chunked &&
		method != http.MethodHead && bodyAllowedForStatus(head.code) {
		// A small body is read before the head is passed on: a node that
		// dies in the middle of it then costs the caller a 502 in the error
		// shape, not a cut answer. Each of its pieces may be as long in
		// coming as a body streamed may pause: a body that trickles in
		// without a pause is no stalled one, however long it takes.
		for c.br.Buffered() < int(n) {
			if p.cfg.BodyIdle > 0 {
				c.setDeadline(time.Now().Add(p.cfg.BodyIdle))
			} else {
				c.setDeadline(time.Time{})
			}
			if _, err := c.br.Peek(c.br.Buffered() + 1); err != nil {
				return answered, fmt.Errorf("its answer broke off after the head: %w", err)
			}
		}
	}

	// The head is in: the deadline ends, bodies stream for as long as they
	// take (a caller going away still ends them). A body already read needs
	// no clearing, which saves a timer update.
	if head.contentLength < 0 || head.chunked || int64(c.br.Buffered()) < head.contentLength {
		c.setDeadline(time.Time{})
	}
	var connection []string
	for i := 0; i < len(header); i += 2 {
		if header[i] == "Connection" {
			connection = append(connection, header[i+1])
		}
	}
	passHead(w, c, head, header, connection, cors)
	whole, err := p.copyResponseBody(w, c, method, head)
	if err != nil {
		return answered, err
	}
	reuse = whole && !head.close && c.br.Buffered() == 0
	return answered, nil
}

// passHead writes the status and the end-to-end fields of a node's head to
// w: to the fast-path server as lines, with no header map in between (it
// computes the framing from length), else through w.Header().
func passHead(w http.ResponseWriter, c *nodeConn, head responseHead, header, connection []string, cors corsAnswer) {
	length := head.contentLength
	if head.chunked {
		length = -1 // the coding frames the body; a Content-Length with it is void
	}
	if head.contentType == "" {
		noSniffing(w.Header())
	}
	hadCORS := false
	if fw, ok := w.(*response); ok {
		lines := c.lines[:0]
		for i := 0; i < len(header); i += 2 {
			k := header[i]
			hadCORS = hadCORS || isCORSField(k)
			if !isHopHeader(k, connection) && !cors.drops(k) {
				lines = appendHeaderLine(lines, k, header[i+1])
			}
		}
		if cors.variesByOrigin(hadCORS) {
			lines = appendHeaderLine(lines, "Vary", "Origin")
		}
		c.lines = lines
		fw.writeHeaderLines(head.code, lines, length)
		return
	}
	wh := w.Header()
	values := make([]string, 0, len(header)/2) // backs the fields' one-value slices
	for i := 0; i < len(header); i += 2 {
		k, v := header[i], header[i+1]
		hadCORS = hadCORS || isCORSField(k)
		switch {
		case isHopHeader(k, connection), cors.drops(k):
		case wh[k] == nil:
			values = append(values, v)
			wh[k] = values[len(values)-1 : len(values) : len(values)]
		default:
			wh[k] = append(wh[k], v)
		}
	}
	if cors.variesByOrigin(hadCORS) {
		wh.Add("Vary", "Origin")
	}
	if length >= 0 {
		wh["Content-Length"] = []string{strconv.FormatInt(length, 10)}
	}
	w.WriteHeader(head.code)
}

// noSniffing keeps the server from guessing a Content-Type for an answer
// the node sent without one (net/http's convention: a present, empty
// field). A guess would be the sidecar's, not the node's: an upload the
// app serves untyped, with nosniff, would reach browsers as text/html.
func noSniffing(h http.Header) {
	if _, ok := h["Content-Type"]; !ok {
		h["Content-Type"] = nil
	}
}

// copyResponseBody copies the node's body to w, flushing as it comes when
// its length is unknown (server-sent events, chunked streams). It reports
// whether the body was read to its end. A failure mid-body aborts the
// response, or, while none of it went out yet, takes it back and returns
// the error, for the caller to answer 502 in the error shape.
func (p *proxy) copyResponseBody(w http.ResponseWriter, c *nodeConn, method string, head responseHead) (bool, error) {
	if method == http.MethodHead || head.code == http.StatusNoContent || head.code == http.StatusNotModified {
		return true, nil
	}
	if n := head.contentLength; n >= 0 && !head.chunked && int64(c.br.Buffered()) >= n {
		// The usual small answer came with its head: one write, no copy.
		b, _ := c.br.Peek(int(n))
		if _, err := w.Write(b); err != nil {
			panic(http.ErrAbortHandler) // the client is gone
		}
		c.br.Discard(int(n))
		return true, nil
	}
	var body io.Reader
	flush := false // after every piece; else (a stated length) before a read that may wait on the node
	switch {
	case head.chunked:
		body, flush = newChunkedBody(c.br, maxTrailerBytes), true
	case head.contentLength >= 0:
		c.body.left, c.body.closed = head.contentLength, false
		body = &c.body
	default:
		body, flush = c.br, true
		head.close = true
	}
	fl, _ := w.(http.Flusher)
	bp := p.getBuf()
	defer p.putBuf(bp)
	chunk := (*bp)[:cap(*bp)]
	drained := true // the last read took all there was: the next may wait
	for {
		if p.cfg.BodyIdle > 0 {
			c.setDeadline(time.Now().Add(p.cfg.BodyIdle)) // a node that stops mid-body must not hold the caller for ever
		}
		if !flush && fl != nil && drained && c.br.Buffered() == 0 && c.body.left > 0 {
			// What came so far goes out before a read that may wait: the
			// server holds up to 64 KiB of an answer back, which would hold
			// a slow node's head back from the caller with it. A read that
			// filled the chunk leaves more to come at once: no flush.
			fl.Flush()
		}
		n, err := body.Read(chunk)
		drained = n < len(chunk)
		if n > 0 {
			if _, werr := w.Write(chunk[:n]); werr != nil {
				panic(http.ErrAbortHandler) // the client is gone
			}
			if flush && fl != nil {
				fl.Flush()
			}
		}
		if err == io.EOF {
			return !head.close, nil
		}
		if err != nil {
			if fw, ok := w.(*response); ok && fw.unsend() {
				return false, fmt.Errorf("its answer broke off before any of it was passed on: %w", err)
			}
			panic(http.ErrAbortHandler) // the node failed mid-body: the client must not take a cut body for whole
		}
	}
}
