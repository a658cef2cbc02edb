package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// startFastServer serves h with the fast-path server on a loopback port
// and shuts it down at the end of the test.
func startFastServer(t *testing.T, h http.Handler, tune func(*http.Server)) (*server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second}
	if tune != nil {
		tune(hs)
	}
	s := newServer(h, hs, slog.New(slog.NewTextHandler(io.Discard, nil)))
	done := make(chan error, 1)
	go func() { done <- s.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve returned %v; want http.ErrServerClosed", err)
		}
	})
	return s, ln.Addr().String()
}

// httpConn is a client connection that writes raw bytes and reads responses.
type httpConn struct {
	t  *testing.T
	c  net.Conn
	br *bufio.Reader
}

func dialHTTP(t *testing.T, addr string) *httpConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return &httpConn{t: t, c: c, br: bufio.NewReader(c)}
}

func (rc *httpConn) send(raw string) {
	rc.t.Helper()
	if _, err := io.WriteString(rc.c, raw); err != nil {
		rc.t.Fatal(err)
	}
}

// read reads one response to a request with method and returns its status
// and body; an error when the connection ended first.
func (rc *httpConn) read(method string) (*http.Response, string, error) {
	resp, err := http.ReadResponse(rc.br, &http.Request{Method: method})
	if err != nil {
		return nil, "", err
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp, string(b), err
}

// closed reports whether the server closed the connection.
func (rc *httpConn) closed() bool {
	_, err := rc.br.ReadByte()
	return err == io.EOF
}

// echoRequest answers with what the handler saw of the request, as JSON.
func echoRequest(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	h := r.Header.Clone()
	// net/http adds the chunked coding's own field; the fields compared are
	// the client's.
	delete(h, "Content-Length")
	out, _ := json.Marshal(map[string]any{
		"method": r.Method, "uri": r.RequestURI, "path": r.URL.Path, "rawPath": r.URL.RawPath,
		"query": r.URL.RawQuery, "forceQuery": r.URL.ForceQuery, "host": r.Host, "header": h,
		"close": r.Close, "body": string(body), "proto": r.Proto,
	})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Multi", "a")
	w.Header().Add("X-Multi", "b")
	w.Write(out)
}

// TestServerAgreesWithNetHTTP sends the same bytes to the fast-path server
// and to net/http's, and wants the same answer: what the handler saw, the
// status and the headers. Unusual requests are handed to net/http, so these
// cover both the fast path and the hand-off.
func TestServerAgreesWithNetHTTP(t *testing.T) {
	_, fast := startFastServer(t, http.HandlerFunc(echoRequest), nil)
	ref := httptest.NewServer(http.HandlerFunc(echoRequest))
	defer ref.Close()
	refAddr := strings.TrimPrefix(ref.URL, "http://")
	big := strings.Repeat("x", 10<<10)
	for _, tc := range []struct{ name, method, raw string }{
		{"get", "GET", "GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n\r\n"},
		{"post", "POST", "POST /rpc HTTP/1.1\r\nHost: h:8\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"},
		{"escaped path", "GET", "GET /proxy/x/a%2Fb/c%20d HTTP/1.1\r\nHost: h\r\n\r\n"},
		{"odd path", "GET", "GET /a{b}/(c)!*' HTTP/1.1\r\nHost: h\r\n\r\n"},
		{"force query", "GET", "GET /a? HTTP/1.1\r\nHost: h\r\n\r\n"},
		{"double slash", "GET", "GET //a//b HTTP/1.1\r\nHost: h\r\n\r\n"},
		{"names in any case and repeated", "GET", "GET / HTTP/1.1\r\nhost: h\r\nx-thing: 1\r\nX-THING: 2\r\ncontent-type:  a/b \t\r\n\r\n"},
		{"pragma", "GET", "GET / HTTP/1.1\r\nHost: h\r\nPragma: no-cache\r\n\r\n"},
		{"connection close", "GET", "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"},
		{"chunked body", "POST", "POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"},
		{"expect continue", "POST", "POST /e HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok"},
		{"bare LF", "GET", "GET /lf HTTP/1.1\nHost: h\n\n"},
		{"HTTP/1.0", "GET", "GET /old HTTP/1.0\r\nHost: h\r\n\r\n"},
		{"absolute form", "GET", "GET http://h/abs HTTP/1.1\r\nHost: h\r\n\r\n"},
		{"big head", "GET", "GET /big HTTP/1.1\r\nHost: h\r\nX-Big: " + big + "\r\n\r\n"},
		{"no host", "GET", "GET / HTTP/1.1\r\nAccept: x\r\n\r\n"},
		{"two hosts", "GET", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"},
		{"bad host", "GET", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n"},
		{"bad header name", "GET", "GET / HTTP/1.1\r\nHost: h\r\nBad Name: x\r\n\r\n"},
		{"control in value", "GET", "GET / HTTP/1.1\r\nHost: h\r\nX: a\x01b\r\n\r\n"},
		{"bad content length", "POST", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n"},
		{"two content lengths", "POST", "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na"},
		{"folded line", "GET", "GET / HTTP/1.1\r\nHost: h\r\nX: a\r\n b\r\n\r\n"},
		{"head", "HEAD", "HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := exchange(t, fast, tc.method, tc.raw)
			want := exchange(t, refAddr, tc.method, tc.raw)
			if got != want {
				t.Errorf("%q:\nfast path: %s\nnet/http:  %s", tc.raw, got, want)
			}
		})
	}
}

// exchange sends raw on a new connection and describes the answer without
// the fields that differ by time.
func exchange(t *testing.T, addr, method, raw string) string {
	rc := dialHTTP(t, addr)
	rc.send(raw)
	resp, body, err := rc.read(method)
	if err != nil {
		return "error: " + err.Error()
	}
	var keys []string
	for k, vs := range resp.Header {
		if k != "Date" {
			keys = append(keys, k+"="+strings.Join(vs, ","))
		}
	}
	sort.Strings(keys)
	return fmt.Sprintf("%d %v len=%d close=%v %s", resp.StatusCode, keys, resp.ContentLength, resp.Close, body)
}

func TestServerKeepAliveAndPipelining(t *testing.T) {
	_, addr := startFastServer(t, http.HandlerFunc(echoRequest), nil)
	rc := dialHTTP(t, addr)
	// Two requests in one write, then a third: three answers, in order, on
	// one connection.
	rc.send("GET /1 HTTP/1.1\r\nHost: h\r\n\r\nPOST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc")
	rc.send("GET /3 HTTP/1.1\r\nHost: h\r\n\r\n")
	// An empty line after a POST's body, as old clients send (RFC 9112
	// section 2.2: ignored), then a request: both answered.
	rc.send("POST /4 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\ndef\r\n")
	rc.send("GET /5 HTTP/1.1\r\nHost: h\r\n\r\n")
	for _, want := range []string{`"path":"/1"`, `"body":"abc"`, `"path":"/3"`, `"body":"def"`, `"path":"/5"`} {
		resp, body, err := rc.read("GET")
		if err != nil {
			t.Fatalf("reading the answer with %s: %v", want, err)
		}
		if !strings.Contains(body, want) || resp.Header.Get("Date") == "" || resp.ContentLength != int64(len(body)) {
			t.Errorf("answer %d %v %s; want %s, a Date and a Content-Length", resp.StatusCode, resp.Header, body, want)
		}
	}
}

func TestServerResponseFraming(t *testing.T) {
	release := make(chan struct{})
	mux := http.NewServeMux()
	mux.HandleFunc("/stream", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "first")
		w.(http.Flusher).Flush()
		<-release // the client has read "first" before the rest exists
		io.WriteString(w, "second")
	})
	mux.HandleFunc("/big", func(w http.ResponseWriter, r *http.Request) {
		w.Write(bytes.Repeat([]byte("0123456789"), 20000)) // past the buffer: streamed
	})
	mux.HandleFunc("/nocontent", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusNoContent)
		if _, err := w.Write([]byte("x")); err != http.ErrBodyNotAllowed {
			t.Errorf("Write after 204: %v; want ErrBodyNotAllowed", err)
		}
	})
	mux.HandleFunc("/short", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", "10")
		io.WriteString(w, "12345")
	})
	mux.HandleFunc("/sniff", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "<html><body>hi</body></html>")
	})
	chunk := bytes.Repeat([]byte("a"), 30000)
	mux.HandleFunc("/declared", func(w http.ResponseWriter, r *http.Request) {
		// Past the buffer with a stated length: the handler's own bytes go
		// out as they are, and must never be written over afterwards.
		w.Header().Set("Content-Length", strconv.Itoa(4*len(chunk)))
		for range 4 { // the fourth write comes after streaming began
			w.Write(chunk)
		}
	})
	mux.HandleFunc("/stated", func(w http.ResponseWriter, r *http.Request) {
		// A length with no body, as a proxy passes on a node's answer to
		// HEAD, or a 304's: the connection carries on.
		w.Header().Set("Content-Length", "6")
		if r.URL.RawQuery == "304" {
			w.WriteHeader(http.StatusNotModified)
		}
	})
	mux.HandleFunc("/newline", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Injected", "a\r\nSet-Cookie: evil=1")
	})
	_, addr := startFastServer(t, mux, nil)

	rc := dialHTTP(t, addr)
	rc.send("GET /stream HTTP/1.1\r\nHost: h\r\n\r\n")
	resp, err := http.ReadResponse(rc.br, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := make([]byte, 5)
	if _, err := io.ReadFull(resp.Body, first); err != nil || string(first) != "first" || resp.TransferEncoding[0] != "chunked" {
		t.Fatalf("first part: %q %v, encoding %v; want first, chunked", first, err, resp.TransferEncoding)
	}
	close(release)
	if rest, err := io.ReadAll(resp.Body); err != nil || string(rest) != "second" {
		t.Errorf("rest: %q %v; want second", rest, err)
	}

	rc.send("GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, body, err := rc.read("GET"); err != nil || len(body) != 200000 {
		t.Errorf("big body: %d bytes, %v; want 200000", len(body), err)
	}
	for range 2 {
		rc.send("GET /declared HTTP/1.1\r\nHost: h\r\n\r\n")
		if resp, body, err := rc.read("GET"); err != nil || len(body) != 120000 || resp.ContentLength != 120000 || strings.Trim(body, "a") != "" {
			t.Fatalf("declared length: %d bytes, %v", len(body), err)
		}
	}
	if strings.Trim(string(chunk), "a") != "" {
		t.Errorf("the handler's buffer was written over: %q...", chunk[:40])
	}
	rc.send("HEAD /big HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, body, err := rc.read("HEAD"); err != nil || body != "" {
		t.Errorf("HEAD: %q, %v; want no body", body, err)
	}
	rc.send("HEAD /stated HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, body, err := rc.read("HEAD"); err != nil || body != "" || resp.ContentLength != 6 || resp.Close {
		t.Fatalf("HEAD with a stated length: %v %q %v; want length 6, no body, kept alive", resp, body, err)
	}
	rc.send("GET /stated?304 HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, body, err := rc.read("GET"); err != nil || resp.StatusCode != 304 || body != "" || resp.Close {
		t.Fatalf("304 with a stated length: %v %q %v; want no body, kept alive", resp, body, err)
	}
	rc.send("GET /nocontent HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, body, err := rc.read("GET"); err != nil || resp.StatusCode != 204 || body != "" {
		t.Errorf("204: %v %q %v", resp, body, err)
	}
	rc.send("GET /sniff HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, _, err := rc.read("GET"); err != nil || resp.Header.Get("Content-Type") != "text/html; charset=utf-8" {
		t.Errorf("sniffed type: %v %v; want text/html", resp.Header.Get("Content-Type"), err)
	}
	rc.send("GET /newline HTTP/1.1\r\nHost: h\r\n\r\n")
	if resp, _, err := rc.read("GET"); err != nil || resp.Header.Get("Set-Cookie") != "" || resp.Header.Get("X-Injected") != "a  Set-Cookie: evil=1" {
		t.Errorf("a value with a newline: %v %v; want it on one line", resp.Header, err)
	}
	// A body shorter than its Content-Length cannot be framed: the
	// connection closes after it.
	rc.send("GET /short HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, _, err := rc.read("GET"); err == nil {
		t.Errorf("a short body was read whole")
	}
	if !rc.closed() {
		t.Errorf("the connection stayed open after a short body")
	}
}

func TestServerPanicsAndHijack(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/panic", func(w http.ResponseWriter, r *http.Request) { panic("boom") })
	mux.HandleFunc("/hijack", func(w http.ResponseWriter, r *http.Request) {
		c, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			t.Errorf("Hijack: %v", err)
			return
		}
		defer c.Close()
		brw.WriteString("raw\n")
		brw.Flush()
		line, _ := brw.ReadString('\n') // what the client sends next is ours
		io.WriteString(c, "got "+line)
	})
	mux.Handle("/ws", wsServer(func(ws *websocket.Conn) { io.Copy(ws, ws) }))
	_, addr := startFastServer(t, mux, nil)

	rc := dialHTTP(t, addr)
	rc.send("GET /panic HTTP/1.1\r\nHost: h\r\n\r\n")
	if !rc.closed() {
		t.Errorf("a panicking handler's connection stayed open")
	}
	rc = dialHTTP(t, addr)
	rc.send("GET /hijack HTTP/1.1\r\nHost: h\r\n\r\n")
	if line, _ := rc.br.ReadString('\n'); line != "raw\n" {
		t.Fatalf("hijacked connection sent %q; want raw", line)
	}
	rc.send("ping\n")
	if line, _ := rc.br.ReadString('\n'); line != "got ping\n" {
		t.Errorf("hijacked connection answered %q; want got ping", line)
	}
	ws, err := websocket.Dial("ws://"+addr+"/ws", "", "http://"+addr)
	if err != nil {
		t.Fatalf("a WebSocket through the hand-off: %v", err)
	}
	defer ws.Close()
	websocket.Message.Send(ws, "echo")
	var got string
	if err := websocket.Message.Receive(ws, &got); err != nil || got != "echo" {
		t.Errorf("WebSocket echo: %q %v", got, err)
	}
}

func TestServerUnreadBodies(t *testing.T) {
	_, addr := startFastServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusForbidden) // never reads the body
	}), nil)
	rc := dialHTTP(t, addr)
	// The whole body came: it is skipped and the connection serves on.
	rc.send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nHost: h\r\n\r\n")
	for i := 0; i < 2; i++ {
		if resp, _, err := rc.read("POST"); err != nil || resp.StatusCode != 403 || resp.Close {
			t.Fatalf("answer %d: %v %v; want 403, kept alive", i, resp, err)
		}
	}
	// Half the body came: the answer comes at once, and the connection
	// closes after it rather than wait for the rest.
	rc.send("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nabc")
	if resp, _, err := rc.read("POST"); err != nil || resp.StatusCode != 403 || !resp.Close {
		t.Fatalf("answer to a half-sent body: %v %v; want 403 and Connection: close", resp, err)
	}
	if !rc.closed() {
		t.Errorf("the connection stayed open")
	}
}

// TestServerBodyReaderOutlivesHandler: a reader the handler leaves behind
// gets an error, and cannot touch the next request on the connection, even
// while that request is served: whether the handler lent it the body (as
// the proxy lends http.Transport's writer, which may read after a node
// answered early) or left behind a wrapped body without a word.
func TestServerBodyReaderOutlivesHandler(t *testing.T) {
	for _, tc := range []struct {
		name  string
		leave func(w http.ResponseWriter, r *http.Request) io.Reader
	}{
		{"lent", func(w http.ResponseWriter, r *http.Request) io.Reader {
			r.Body.(interface{ lend() }).lend()
			return r.Body
		}},
		{"wrapped", func(w http.ResponseWriter, r *http.Request) io.Reader {
			return http.MaxBytesReader(w, r.Body, 1<<20)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			returned := make(chan struct{})
			late := make(chan string, 1)
			_, addr := startFastServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				switch r.URL.Path {
				case "/leave":
					body := tc.leave(w, r)
					go func() {
						<-returned
						b := make([]byte, 10)
						n, err := body.Read(b)
						late <- fmt.Sprintf("%q %v", b[:n], err)
					}()
				case "/next":
					// The left reader reads while this request's body waits.
					close(returned)
					if got := <-late; !strings.HasPrefix(got, `"" `) || strings.HasSuffix(got, " <nil>") {
						t.Errorf("a read after the handler returned gave %s; want nothing and an error", got)
					}
					io.Copy(w, r.Body)
				}
			}), nil)
			rc := dialHTTP(t, addr)
			rc.send("POST /leave HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello")
			if _, body, err := rc.read("POST"); err != nil || body != "" {
				t.Fatalf("first answer: %q %v", body, err)
			}
			rc.send("POST /next HTTP/1.1\r\nHost: h\r\nContent-Length: 6\r\n\r\nsecret")
			if _, body, err := rc.read("POST"); err != nil || body != "secret" {
				t.Errorf("next answer on the connection: %q %v; want its whole body", body, err)
			}
		})
	}
}

// A connection reuses its body reader from request to request: each
// request reads its own body, whatever the last one left unread.
func TestServerBodiesOnOneConnection(t *testing.T) {
	_, addr := startFastServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n, _ := strconv.Atoi(r.URL.Query().Get("read"))
		b := make([]byte, n)
		k, _ := io.ReadFull(r.Body, b)
		w.Write(b[:k])
	}), nil)
	rc := dialHTTP(t, addr)
	for _, tc := range []struct{ read, body, want string }{
		{"5", "hello", "hello"},
		{"2", "abcdef", "ab"}, // the rest is skipped
		{"9", "xyz", "xyz"},
		{"0", "", ""},
		{"4", "last", "last"},
	} {
		rc.send("POST /?read=" + tc.read + " HTTP/1.1\r\nHost: h\r\nContent-Length: " + strconv.Itoa(len(tc.body)) + "\r\n\r\n" + tc.body)
		if resp, body, err := rc.read("POST"); err != nil || body != tc.want || resp.Close {
			t.Fatalf("reading %s of %q: %q %v; want %q, kept alive", tc.read, tc.body, body, err, tc.want)
		}
	}
}

// Strings cut from the arena stay as they were while later ones are made,
// across chunks and for strings larger than a chunk.
func TestStringArenaKeepsStrings(t *testing.T) {
	var a stringArena
	var got, want []string
	for i := range 200 {
		b := bytes.Repeat([]byte{byte('a' + i%26)}, 1+i*37%(3*arenaChunk))
		got = append(got, a.copy(b))
		want = append(want, string(b))
		b[0] = '!' // the caller's bytes are its own
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("string %d changed: %.20q...; want %.20q...", i, got[i], want[i])
		}
	}
	if a.copy(nil) != "" {
		t.Error("an empty copy is not empty")
	}
}

func TestServerTimeouts(t *testing.T) {
	_, addr := startFastServer(t, http.HandlerFunc(echoRequest), func(s *http.Server) {
		s.ReadHeaderTimeout = 100 * time.Millisecond
		s.IdleTimeout = 200 * time.Millisecond
	})
	// A head that stops halfway is cut off after the header timeout.
	rc := dialHTTP(t, addr)
	rc.send("GET / HTTP/1.1\r\nHo")
	start := time.Now()
	if !rc.closed() {
		t.Fatal("a half-sent head was not cut off")
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("a half-sent head was cut off after %v", d)
	}
	// An idle connection is closed after the idle timeout.
	rc = dialHTTP(t, addr)
	rc.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, _, err := rc.read("GET"); err != nil {
		t.Fatal(err)
	}
	if !rc.closed() {
		t.Error("an idle connection was not closed")
	}
}

func TestServerShutdown(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			close(entered)
			<-release
		}
		io.WriteString(w, "done")
	})
	s := newServer(h, &http.Server{Handler: h, ReadHeaderTimeout: time.Second, IdleTimeout: time.Minute}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	served := make(chan error, 1)
	go func() { served <- s.Serve(ln) }()
	addr := ln.Addr().String()

	idle := dialHTTP(t, addr)
	idle.send("GET / HTTP/1.1\r\nHost: h\r\n\r\n")
	if _, _, err := idle.read("GET"); err != nil {
		t.Fatal(err)
	}
	busy := dialHTTP(t, addr)
	busy.send("GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
	<-entered
	shut := make(chan error, 1)
	go func() { shut <- s.Shutdown(context.Background()) }()
	if !idle.closed() {
		t.Error("Shutdown left an idle connection open")
	}
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a request in flight", err)
	default:
	}
	close(release)
	resp, body, err := busy.read("GET")
	if err != nil || body != "done" || !resp.Close {
		t.Errorf("the request in flight: %v %q %v; want done with Connection: close", resp, body, err)
	}
	if err := <-shut; err != nil {
		t.Errorf("Shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, http.ErrServerClosed) {
		t.Errorf("Serve: %v; want ErrServerClosed", err)
	}
}

// FuzzParseRequestHead: whatever the fast path accepts, net/http reads
// the same way.
func FuzzParseRequestHead(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /rpc?a=b HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
		"GET /a%2Fb? HTTP/1.1\r\nhost: h\r\nx-a: 1\r\nX-A: 2\r\nConnection: keep-alive, close\r\n\r\n",
		"PUT //x/../y HTTP/1.1\r\nHost: [::1]:80\r\nPragma: no-cache\r\n\r\n",
		"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -0\r\n\r\n", // net/http refuses a sign
	} {
		f.Add([]byte(s))
	}
	// More fields than parseRequestHead tracks without its map, repeats
	// among the first and past them.
	many := "GET / HTTP/1.1\r\nHost: h\r\n"
	for i := range 20 {
		many += fmt.Sprintf("X-F%d: %d\r\nx-f%d: again\r\n", i%18, i, i%3)
	}
	f.Add([]byte(many + "\r\n"))
	f.Fuzz(func(t *testing.T, head []byte) {
		// As readHead hands it over: up to the first CRLF blank line, bare
		// LFs and all, which parseRequestHead must refuse.
		i := bytes.Index(head, []byte("\n\r\n"))
		if i < 0 {
			return
		}
		head = head[:i+3]
		var got requestHead
		if parseRequestHead(head, &got) != nil {
			return
		}
		if bytes.Count(head, []byte("\n")) != bytes.Count(head, []byte("\r\n")) {
			t.Fatalf("accepted %q, which has a bare LF", head)
		}
		nbr := bufio.NewReader(bytes.NewReader(head))
		want, err := http.ReadRequest(nbr)
		if err != nil {
			t.Fatalf("accepted %q, which net/http refuses: %v", head, err)
		}
		if nbr.Buffered() != 0 {
			t.Fatalf("%q: net/http's head ends %d bytes earlier", head, nbr.Buffered())
		}
		if got.method != want.Method || got.target != want.RequestURI || got.url.String() != want.URL.String() ||
			got.url.RawPath != want.URL.RawPath || got.url.Path != want.URL.Path || got.host != want.Host ||
			got.contentLength != want.ContentLength || got.close != want.Close {
			t.Fatalf("%q:\nfast path: %s %s %+v host %q length %d close %v\nnet/http:  %s %s %+v host %q length %d close %v", head,
				got.method, got.target, got.url, got.host, got.contentLength, got.close,
				want.Method, want.RequestURI, *want.URL, want.Host, want.ContentLength, want.Close)
		}
		if fmt.Sprint(got.header) != fmt.Sprint(want.Header) {
			t.Fatalf("%q: header %v; net/http %v", head, got.header, want.Header)
		}
	})
}

// FuzzNoDotSegments: the hot routes take a proxied path exactly when the
// mux would not redirect it but for empty segments, which go to the app.
func FuzzNoDotSegments(f *testing.F) {
	for _, s := range []string{"/proxy/a", "/proxy/a/", "/proxy//a", "/proxy/./a", "/proxy/../a", "/proxy/a/..", "/proxy/.a/..b/"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		if !strings.HasPrefix(p, "/") {
			return
		}
		q := p
		for strings.Contains(q, "//") {
			q = strings.ReplaceAll(q, "//", "/")
		}
		c := path.Clean(q)
		if want := c == q || c+"/" == q; noDotSegments(p) != want {
			t.Fatalf("noDotSegments(%q) = %v; path.Clean of %q says %v", p, !want, q, want)
		}
	})
}

// FuzzRedirectToClean: hotRoutes' redirect of a path the mux would clean
// goes where the mux sends no client on (no redirect loop), keeps the
// query, and names the path the mux's clean form names, with its escapes
// as they came.
func FuzzRedirectToClean(f *testing.F) {
	for _, s := range []string{"/proxy/web/a/../b%2Fc?q=1", "/a/./%E2%82%AC/", "//x", "/..", "/a/%2e%2e/b", "/a%2F..%2Fb/./c"} {
		f.Add(s)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(http.ResponseWriter, *http.Request) {})
	routes := hotRoutes(mux, func(http.ResponseWriter, *http.Request) {}, func(http.ResponseWriter, *http.Request) {})
	f.Fuzz(func(t *testing.T, target string) {
		r, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + target + " HTTP/1.1\r\nHost: h\r\n\r\n")))
		if err != nil || !strings.HasPrefix(target, "/") {
			return
		}
		w := httptest.NewRecorder()
		routes.ServeHTTP(w, r)
		if w.Code != http.StatusTemporaryRedirect {
			return
		}
		loc := w.Header().Get("Location")
		again, err := http.ReadRequest(bufio.NewReader(strings.NewReader("GET " + loc + " HTTP/1.1\r\nHost: h\r\n\r\n")))
		if err != nil {
			t.Fatalf("%q redirects to %q, which is no request target: %v", target, loc, err)
		}
		w2 := httptest.NewRecorder()
		routes.ServeHTTP(w2, again)
		if w2.Code == http.StatusTemporaryRedirect {
			t.Fatalf("%q redirects to %q, which redirects to %q", target, loc, w2.Header().Get("Location"))
		}
		// Raw bytes past ASCII go escaped (http.Redirect escapes them, as
		// the mux's redirect does): the same query to a server.
		if !strings.EqualFold(again.URL.RawQuery, escapeNonASCII(r.URL.RawQuery)) {
			t.Fatalf("%q redirects to %q: query %q; want %q", target, loc, again.URL.RawQuery, r.URL.RawQuery)
		}
		if want := muxCleanPath(r.URL.EscapedPath()); again.URL.EscapedPath() != want {
			t.Fatalf("%q redirects to %q: path %q; want %q", target, loc, again.URL.EscapedPath(), want)
		}
	})
}

func escapeNonASCII(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			fmt.Fprintf(&b, "%%%02x", s[i])
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func BenchmarkParseRequestHead(b *testing.B) {
	head := []byte("POST /rpc HTTP/1.1\r\nHost: 127.0.0.1:8081\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 71\r\n\r\n")
	var req requestHead
	b.ReportAllocs()
	for b.Loop() {
		if err := parseRequestHead(head, &req); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkResponseHead(b *testing.B) {
	c := &serverConn{srv: &server{}}
	w := &response{c: c, method: "POST", header: http.Header{"Content-Type": jsonContentType}, status: 200, declared: -1, body: []byte(`{"msg":"bench-1: Hello John"}`)}
	b.ReportAllocs()
	for b.Loop() {
		c.out = w.appendBody(w.appendHead(c.out[:0], 200, int64(len(w.body))), w.body)
	}
}

// FuzzServerConn feeds any bytes to a connection of the fast path: it must
// neither panic nor hang, whatever comes. (Requests it hands off are
// closed here; net/http has its own fuzzing.)
func FuzzServerConn(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhelloGET /stream HTTP/1.1\r\nHost: h\r\n\r\n",
		"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\nshort",
		"HEAD /stream HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/echo":
			io.Copy(w, r.Body)
		case "/stream":
			io.WriteString(w, "a")
			w.(http.Flusher).Flush()
			w.Write(bytes.Repeat([]byte("b"), responseBufferSize+1))
		default:
			w.Header().Set("X-Path", r.URL.Path)
		}
	})
	f.Fuzz(func(t *testing.T, in []byte) {
		s := newServer(h, &http.Server{ReadHeaderTimeout: 50 * time.Millisecond, IdleTimeout: 50 * time.Millisecond}, slog.New(slog.NewTextHandler(io.Discard, nil)))
		s.handoff.Close()
		client, conn := net.Pipe()
		c := &serverConn{srv: s, rwc: conn, sock: conn, br: bufio.NewReaderSize(conn, headBufferSize), remote: "pipe"}
		s.track(c)
		go func() {
			client.Write(in)
			client.Close()
		}()
		go io.Copy(io.Discard, client)
		done := make(chan struct{})
		go func() { c.serve(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("the connection still serves %q after 10s", in)
		}
	})
}

// clockNow agrees with time.Now: on the monotonic clock exactly, and on
// the wall clock within what a system clock could have moved.
func TestClockNow(t *testing.T) {
	for i := range 1000 {
		before := time.Now()
		got := clockNow()
		after := time.Now()
		if got.Before(before) || got.After(after) {
			t.Fatalf("reading %d: %v not between %v and %v", i, got, before, after)
		}
		wall := got.Round(0) // without the monotonic reading
		if wall.Before(before.Round(0).Add(-time.Millisecond)) || wall.After(after.Round(0).Add(time.Millisecond)) {
			t.Fatalf("reading %d: wall time %v not between %v and %v", i, wall, before.Round(0), after.Round(0))
		}
	}
	// An old base is replaced by a full reading.
	old := time.Now().Add(-2 * time.Second)
	clockBase.Store(&old)
	if got := clockNow(); time.Since(got) > time.Second {
		t.Errorf("a base two seconds old was kept: %v", got)
	}
}

// A connection the server gives up while the client is still sending (an
// upload refused before it was read) ends without a reset: a reset would
// destroy the answers the client has not read yet, here most of a large
// one, still in the server's send queue when the connection closes.
func TestServerLingersOverUnreadInput(t *testing.T) {
	large := strings.Repeat("x", 1<<20)
	s, addr := startFastServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/refuse" {
			w.WriteHeader(http.StatusRequestEntityTooLarge) // never reads the body
			return
		}
		io.WriteString(w, large)
	}), nil)
	rc := dialHTTP(t, addr)
	body := strings.Repeat("a", 200<<10)
	go io.WriteString(rc.c, "GET /large HTTP/1.1\r\nHost: h\r\n\r\nPOST /refuse HTTP/1.1\r\nHost: h\r\nContent-Length: "+
		strconv.Itoa(len(body))+"\r\n\r\n"+body)
	// Read only once the server is done with the connection.
	waitFor(t, 5*time.Second, "the server to let the connection go", func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return len(s.conns) == 0
	})
	if resp, got, err := rc.read("GET"); err != nil || resp.StatusCode != 200 || len(got) != len(large) {
		t.Fatalf("the large answer: %v, %d of %d bytes, %v", resp, len(got), len(large), err)
	}
	if resp, _, err := rc.read("POST"); err != nil || resp.StatusCode != 413 {
		t.Fatalf("the refusal: %v %v; want 413", resp, err)
	}
}

// TestServerErrorLogLimitsHandshakeFailures: failed TLS handshakes, which
// any scanner causes, are logged at most once a minute with a count of
// those left out; other lines of net/http pass.
func TestServerErrorLogLimitsHandshakeFailures(t *testing.T) {
	var out bytes.Buffer
	l := &serverErrorLog{log: slog.New(slog.NewTextHandler(&out, nil))}
	for range 100 {
		fmt.Fprintf(l, "http: TLS handshake error from 127.0.0.1:1234: EOF\n")
	}
	fmt.Fprintf(l, "http: Accept error: too many open files\n")
	if n := strings.Count(out.String(), "TLS handshake error"); n != 1 {
		t.Errorf("%d handshake lines logged of 100 in a minute; want 1:\n%s", n, out.String())
	}
	if !strings.Contains(out.String(), "Accept error") {
		t.Errorf("another error was left out:\n%s", out.String())
	}
	l.last = l.last.Add(-time.Minute) // a minute on
	fmt.Fprintf(l, "http: TLS handshake error from 127.0.0.1:1234: EOF\n")
	if !strings.Contains(out.String(), "similar_left_out=99") {
		t.Errorf("the next line does not count the 99 left out:\n%s", out.String())
	}
}

// TestCloseAfterChunked: on a connection net/http serves, a chunked
// request's answer closes the connection, whether the handler wrote its
// answer, passed on a 1xx first, or wrote nothing; what followed the
// chunked body is never served. Other requests keep the connection.
func TestCloseAfterChunked(t *testing.T) {
	var served atomic.Int64
	srv := httptest.NewServer(closeAfterUnsureFraming(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served.Add(1)
		io.Copy(io.Discard, r.Body)
		switch r.URL.Path {
		case "/written":
			io.WriteString(w, "ok")
		case "/interim":
			w.WriteHeader(http.StatusEarlyHints)
			clear(w.Header()) // as ReverseProxy does after passing a 1xx on
			io.WriteString(w, "ok")
		}
	})))
	defer srv.Close()
	for _, path := range []string{"/written", "/interim", "/nothing"} {
		served.Store(0)
		rc := dialHTTP(t, srv.Listener.Addr().String())
		rc.send("GET /before HTTP/1.1\r\nHost: x\r\n\r\n")
		rc.send("POST " + path + " HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
		rc.send("GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
		if resp, _, err := rc.read("GET"); err != nil || resp.Close {
			t.Fatalf("%s: the plain request before: %v, close %v; want it answered and the connection kept", path, err, resp != nil && resp.Close)
		}
		var resp *http.Response
		var err error
		for resp, _, err = rc.read("POST"); err == nil && resp.StatusCode < 200; resp, _, err = rc.read("POST") {
		}
		_, errAfter := rc.br.ReadByte() // an EOF, or a reset: the smuggled request is left unread
		if err != nil || !resp.Close || errAfter == nil || served.Load() != 2 {
			t.Errorf("%s: %v, close %v, %d requests served; want the answer, the connection closed after it, and 2 served", path, err, resp != nil && resp.Close, served.Load())
		}
	}
}

// slowDownload reads the answer to req on c at rate bytes a second, in
// steps, as a client that reads slowly but all the while.
func slowDownload(t *testing.T, c net.Conn, req string, rate int) (int64, error) {
	t.Helper()
	defer c.Close()
	io.WriteString(c, req)
	const every = 20 * time.Millisecond
	tick := time.NewTicker(every)
	defer tick.Stop()
	step := rate / int(time.Second/every)
	resp, err := http.ReadResponse(bufio.NewReaderSize(&pacedReader{r: c, tick: tick.C, step: step}, step), nil)
	if err != nil {
		return 0, err
	}
	return io.Copy(io.Discard, resp.Body)
}

// TestSlowReaderIsNotCutOff: a client that reads a large answer slowly,
// but all the while, gets all of it: the stall limit moves on while the
// socket's send queue shrinks. The poller says there is room only once a
// third of the send buffer is free, which at this pace takes longer than
// the limit (the buffer grows to megabytes), and such a client was cut
// off: on the fast path, and on net/http's connections (TLS here), where a
// large answer written at once had the limit for the whole write.
func TestSlowReaderIsNotCutOff(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the socket's send queue is read on Linux only")
	}
	const size, rate = 2500 << 10, 512 << 10 // seconds to read; a third of the 2 MiB buffer takes 1.3 s
	const idle = 500 * time.Millisecond
	payload := []byte(strings.Repeat("x", size))
	bigBuffer := func(c net.Conn) {
		for {
			if tc, ok := c.(*net.TCPConn); ok {
				tc.SetWriteBuffer(1 << 20) // the kernel doubles it
				return
			}
			c = c.(interface{ NetConn() net.Conn }).NetConn()
		}
	}
	fast := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bigBuffer(w.(*response).c.rwc)
		w.Write(payload)
	})
	_, addr := startFastServer(t, fast, func(hs *http.Server) { hs.IdleTimeout = idle })
	dial := func(addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).SetReadBuffer(64 << 10)
		return c
	}
	if n, err := slowDownload(t, dial(addr), "GET / HTTP/1.1\r\nHost: x\r\n\r\n", rate); n != size {
		t.Errorf("fast path: %d of %d bytes, %v; want all of it", n, size, err)
	}

	viaTLS := httptest.NewUnstartedServer(boundStalledAnswers(idle, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		bigBuffer(r.Context().Value(connKey{}).(net.Conn))
		w.Write(payload)
	})))
	viaTLS.Config.ConnContext = withConn
	viaTLS.StartTLS()
	defer viaTLS.Close()
	tc := tls.Client(dial(viaTLS.Listener.Addr().String()), &tls.Config{InsecureSkipVerify: true})
	if n, err := slowDownload(t, tc, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", rate); n != size {
		t.Errorf("TLS: %d of %d bytes, %v; want all of it", n, size, err)
	}
}

// TestEarlyHintsThenALateAnswerOverHTTP2: between writes an answer has no
// write deadline: an HTTP/2 stream is reset when one passes, even with
// nothing to write, and a 103 followed by the answer more than the stall
// limit later (the node working, within its own deadline) was reset.
func TestEarlyHintsThenALateAnswerOverHTTP2(t *testing.T) {
	const idle = 200 * time.Millisecond
	ts := httptest.NewUnstartedServer(boundStalledAnswers(idle, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		<-time.After(5 * idle) // the node at work
		io.WriteString(w, "late")
	})))
	ts.EnableHTTP2 = true
	ts.StartTLS()
	defer ts.Close()
	resp, err := ts.Client().Get(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if resp.ProtoMajor != 2 || resp.StatusCode != 200 || string(body) != "late" || err != nil {
		t.Errorf("HTTP/%d %d %q %v; want HTTP/2 200 \"late\"", resp.ProtoMajor, resp.StatusCode, body, err)
	}
}
