package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// response is the fast path's http.ResponseWriter. It holds a body of up to
// responseBufferSize, so that the head can state its length and head and
// body leave in one write; beyond that, or when the handler flushes, it
// streams, with the handler's Content-Length or chunked.
type response struct {
	c          *serverConn
	method     string
	start      time.Time // when the request's head was read
	now        time.Time // the last clock reading for this request, if any
	header     http.Header
	status     int    // 0 until the handler writes a head
	declared   int64  // the handler's Content-Length, or -1
	written    int64  // body bytes the handler wrote
	body       []byte // body held back while not streaming
	lines      []byte // header lines from writeHeaderLines, after Header()'s
	streaming  bool   // the head is out; the body goes as it is written
	chunked    bool
	closeAfter bool // the connection closes after this response
	hijacked   bool
}

func (w *response) Header() http.Header { return w.header }

// Start is when the request's head was read (see requestStart).
func (w *response) Start() time.Time { return w.start }

// Now reads the clock and keeps the reading for the Date header.
func (w *response) Now() time.Time {
	w.now = clockNow()
	return w.now
}

// Status is the status written so far, for the metrics.
func (w *response) Status() int {
	if w.hijacked {
		return http.StatusSwitchingProtocols
	}
	return w.status
}

// WriteHeader records the status; 1xx answers other than 101 go out at
// once, as in net/http.
func (w *response) WriteHeader(code int) {
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if w.status != 0 || w.hijacked {
		return
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		w.send(w.appendHead(w.c.out[:0], code, -1))
		return
	}
	w.status = code
	// The keys are canonical already: indexing skips Get's canonicalizing.
	if cl := firstValue(w.header["Content-Length"]); cl != "" {
		if n, err := strconv.ParseInt(cl, 10, 64); err == nil && n >= 0 {
			w.declared = n
		}
	}
	if hasToken(firstValue(w.header["Connection"]), "close") {
		w.closeAfter = true
	}
}

// writeHeaderLines is WriteHeader for a head whose fields the handler has
// as lines already, "Name: value\r\n" each, with canonical names, valid
// names and values, and no framing or hop-by-hop fields. They go out after
// Header()'s fields, with no map in between: the proxy passes a node's
// head on this way. length is the body's stated length, or -1.
func (w *response) writeHeaderLines(code int, lines []byte, length int64) {
	if w.status != 0 || w.hijacked || code < 200 {
		return
	}
	w.lines = append(w.c.lines[:0], lines...) // lines' buffer is not ours to keep
	w.c.lines = w.lines[:0]
	w.WriteHeader(code)
	if length >= 0 {
		w.declared = length
	}
}

// hasField reports whether header lines hold a field named name.
func hasField(lines []byte, name string) bool {
	for len(lines) > 0 {
		if len(lines) > len(name) && lines[len(name)] == ':' && string(lines[:len(name)]) == name {
			return true
		}
		i := bytes.IndexByte(lines, '\n')
		if i < 0 {
			break
		}
		lines = lines[i+1:]
	}
	return false
}

func (w *response) Write(p []byte) (int, error) {
	if w.hijacked {
		return 0, http.ErrHijacked
	}
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if !bodyAllowedForStatus(w.status) {
		return 0, http.ErrBodyNotAllowed
	}
	if w.declared >= 0 && w.written+int64(len(p)) > w.declared {
		return 0, http.ErrContentLength
	}
	w.written += int64(len(p))
	if w.streaming {
		return len(p), w.writeStream(p)
	}
	w.body = append(w.body, p...)
	if len(w.body) > responseBufferSize {
		if err := w.startStreaming(); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}

// Flush sends the head and what the body has so far.
func (w *response) Flush() { w.FlushError() }

// FlushError is Flush for http.ResponseController.
func (w *response) FlushError() error {
	if w.hijacked {
		return http.ErrHijacked
	}
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.streaming {
		return nil
	}
	return w.startStreaming()
}

// unsend takes back an answer none of which went out yet (its head and
// what the body has so far are still held), so that the handler can
// answer otherwise; it reports whether it could. Header()'s fields stay.
func (w *response) unsend() bool {
	if w.streaming || w.hijacked {
		return false
	}
	w.status, w.declared, w.written = 0, -1, 0
	w.body, w.lines = w.body[:0], w.lines[:0]
	return true
}

// Hijack hands the connection to the handler, as for a WebSocket. Its
// read deadline is cleared: the new owner keeps its own time.
func (w *response) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	if w.hijacked {
		return nil, nil, http.ErrHijacked
	}
	if w.streaming {
		return nil, nil, errors.New("http: Hijack after the response head was sent")
	}
	w.hijacked = true
	w.c.setDeadline(time.Time{})
	w.c.rwc.SetWriteDeadline(time.Time{}) // an answer's stall limit (stallLimited) is not the new owner's
	return w.c.rwc, bufio.NewReadWriter(w.c.br, bufio.NewWriter(w.c.rwc)), nil
}

// SetReadDeadline and SetWriteDeadline serve http.ResponseController.
func (w *response) SetReadDeadline(t time.Time) error {
	w.c.setDeadline(t)
	return nil
}

func (w *response) SetWriteDeadline(t time.Time) error { return w.c.rwc.SetWriteDeadline(t) }

// startStreaming sends the head and the body so far; the rest of the body
// follows as it is written.
func (w *response) startStreaming() error {
	w.streaming = true
	w.chunked = w.declared < 0 && bodyAllowedForStatus(w.status) && w.method != http.MethodHead
	out := w.appendHead(w.c.out[:0], w.status, w.declared)
	body := w.body
	w.body = w.body[:0]
	return w.send(w.appendBody(out, body))
}

func (w *response) writeStream(p []byte) error {
	if len(p) == 0 || w.method == http.MethodHead {
		return nil
	}
	if !w.chunked {
		return w.write(p) // the handler's bytes: written, never kept
	}
	return w.send(w.appendBody(w.c.out[:0], p))
}

// appendBody appends p, as a chunk when the body is chunked; a HEAD
// answer has no body.
func (w *response) appendBody(b, p []byte) []byte {
	if len(p) == 0 || w.method == http.MethodHead {
		return b
	}
	if !w.chunked {
		return append(b, p...)
	}
	b = strconv.AppendInt(b, int64(len(p)), 16)
	b = append(b, "\r\n"...)
	b = append(b, p...)
	return append(b, "\r\n"...)
}

// finish completes the response after the handler returned.
func (w *response) finish() error {
	if w.hijacked {
		return nil
	}
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.declared >= 0 && w.written < w.declared && w.method != http.MethodHead && bodyAllowedForStatus(w.status) {
		w.closeAfter = true // the body is short of what the head said
	}
	if w.streaming {
		if !w.chunked {
			return nil
		}
		return w.send(append(w.c.out[:0], "0\r\n\r\n"...))
	}
	length := w.declared
	if length < 0 && (len(w.body) > 0 || w.method != http.MethodHead) {
		length = int64(len(w.body))
	}
	return w.send(w.appendBody(w.appendHead(w.c.out[:0], w.status, length), w.body))
}

// send writes b, built in the connection's output buffer, and keeps b's
// array as that buffer for the next response.
func (w *response) send(b []byte) error {
	if cap(b) <= responseBufferSize+headBufferSize {
		w.c.out = b[:0]
	}
	return w.write(b)
}

// write writes p to the connection; after a failed write it closes.
func (w *response) write(p []byte) error {
	_, err := w.c.sock.Write(p)
	if err != nil {
		w.closeAfter = true
	}
	return err
}

// appendHead appends the status line and header block, as net/http writes
// them: keys sorted, values on one line, a Date, a Content-Type sniffed
// from the body when the handler set none, and the framing: length when
// known (not below 0), else chunked.
func (w *response) appendHead(b []byte, code int, length int64) []byte {
	b = append(b, "HTTP/1.1 "...)
	b = strconv.AppendInt(b, int64(code), 10)
	b = append(b, ' ')
	b = append(b, statusText(code)...)
	b = append(b, "\r\n"...)
	final := code >= 200 || code == http.StatusSwitchingProtocols
	if _, ok := w.header["Content-Type"]; !ok && final && len(w.body) > 0 && firstValue(w.header["Content-Encoding"]) == "" &&
		!hasField(w.lines, "Content-Type") && !hasField(w.lines, "Content-Encoding") {
		w.header["Content-Type"] = []string{http.DetectContentType(w.body)}
	}
	keys := w.c.keys[:0]
	for k := range w.header {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	w.c.keys = keys
	for _, k := range keys {
		if !validToken(k) || final && (k == "Content-Length" || k == "Transfer-Encoding" || k == "Connection") {
			continue
		}
		for _, v := range w.header[k] {
			if strings.IndexByte(v, '\r') >= 0 || strings.IndexByte(v, '\n') >= 0 { // vectorised, unlike ContainsAny
				v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
			}
			b = append(b, k...)
			b = append(b, ": "...)
			b = append(b, trimOWS(v)...)
			b = append(b, "\r\n"...)
		}
	}
	if !final {
		return append(b, "\r\n"...)
	}
	b = append(b, w.lines...)
	if _, ok := w.header["Date"]; !ok && !hasField(w.lines, "Date") {
		b = append(b, "Date: "...)
		now := w.now
		if now.IsZero() {
			now = time.Now()
		}
		b = w.c.srv.date.append(b, now)
		b = append(b, "\r\n"...)
	}
	switch {
	case !bodyAllowedForStatus(code):
	case w.chunked:
		b = append(b, "Transfer-Encoding: chunked\r\n"...)
	case length >= 0:
		b = append(b, "Content-Length: "...)
		b = strconv.AppendInt(b, length, 10)
		b = append(b, "\r\n"...)
	case w.method != http.MethodHead:
		w.closeAfter = true // a body of unknown length ends with the connection
	}
	if w.closeAfter || w.c.srv.shuttingDown.Load() {
		w.closeAfter = true
		b = append(b, "Connection: close\r\n"...)
	}
	return append(b, "\r\n"...)
}

// firstValue is a header's first value, or "", as http.Header.Get gives it.
func firstValue(values []string) string {
	if len(values) == 0 {
		return ""
	}
	return values[0]
}

// bodyAllowedForStatus is RFC 9112 section 6.3: 1xx, 204 and 304 answers
// have no body.
func bodyAllowedForStatus(code int) bool {
	return code >= 200 && code != http.StatusNoContent && code != http.StatusNotModified
}
