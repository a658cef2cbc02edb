package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"golang.org/x/net/websocket"
)

// appServer is an HTTP app behind the proxy.
func appServer(t *testing.T, h http.HandlerFunc) *httptest.Server {
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv
}

func hostOf(srv *httptest.Server) string { return strings.TrimPrefix(srv.URL, "http://") }

// TestProxyForwardsMethodsBodiesAndHeaders runs the same request through
// the direct path (a body of stated length) and through ReverseProxy (a
// chunked body), and wants the same request at the app and the same
// answer at the client.
func TestProxyForwardsMethodsBodiesAndHeaders(t *testing.T) {
	s, srv := testSidecar(t, nil)
	seen := make(chan *http.Request, 1)
	bodies := make(chan string, 1)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		seen <- r
		bodies <- string(b)
		w.Header().Set("X-App", "yes")
		w.Header().Set("Connection", "X-Secret")
		w.Header().Set("X-Secret", "hop")
		w.Header().Add("X-Two", "1")
		w.Header().Add("X-Two", "2")
		w.WriteHeader(http.StatusCreated)
		io.WriteString(w, "made")
	})
	register(t, s, "web", hostOf(app))

	var atApp, atClient []http.Header
	for _, tc := range []struct {
		name string
		body io.Reader
	}{
		{"direct", strings.NewReader("payload")},
		{"through ReverseProxy", io.MultiReader(strings.NewReader("payload"))},
	} {
		req, _ := http.NewRequest("PUT", srv.URL+"/proxy/web/items/a%2Fb?x=1;z=3&y=%zz", tc.body) // a query as it came, semicolon and broken escape too
		req.Header.Set("X-Custom", "kept")
		req.Header.Set("Connection", "X-Hop")
		req.Header.Set("X-Hop", "dropped")
		req.Header.Set("X-Forwarded-For", "192.0.2.7")
		req.Header.Set("X-Forwarded-Host", "spoofed")
		req.Header.Set("Expect", "100-continue") // the sidecar's to answer, not the app's
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		data, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 201 || string(data) != "made" || resp.Header.Get("X-App") != "yes" || resp.Header.Get("X-Secret") != "" || len(resp.Header["X-Two"]) != 2 {
			t.Errorf("%s: response %d %q headers %v; want 201 made, X-App, X-Two twice, no hop-by-hop X-Secret", tc.name, resp.StatusCode, data, resp.Header)
		}
		r := <-seen
		if got := <-bodies; r.Method != "PUT" || got != "payload" {
			t.Errorf("%s: at the app: %s body %q; want PUT payload", tc.name, r.Method, got)
		}
		if r.URL.RawPath != "/items/a%2Fb" || r.URL.RawQuery != "x=1;z=3&y=%zz" {
			t.Errorf("%s: at the app: path %q (raw %q) query %q; want /items/a%%2Fb and x=1;z=3&y=%%zz", tc.name, r.URL.Path, r.URL.RawPath, r.URL.RawQuery)
		}
		for k, want := range map[string]string{
			"X-Custom": "kept", "X-Hop": "", "Expect": "", "X-Forwarded-For": "192.0.2.7, 127.0.0.1",
			"X-Forwarded-Host": strings.TrimPrefix(srv.URL, "http://"), "X-Forwarded-Proto": "http",
		} {
			if got := r.Header.Get(k); got != want {
				t.Errorf("%s: header %s at the app: %q; want %q", tc.name, k, got, want)
			}
		}
		h := r.Header.Clone()
		h.Del("Content-Length") // the framing differs by design
		atApp = append(atApp, h)
		rh := resp.Header.Clone()
		rh.Del("Date")
		atClient = append(atClient, rh)
	}
	if fmt.Sprint(atApp[0]) != fmt.Sprint(atApp[1]) {
		t.Errorf("headers at the app differ by path:\ndirect:       %v\nReverseProxy: %v", atApp[0], atApp[1])
	}
	if fmt.Sprint(atClient[0]) != fmt.Sprint(atClient[1]) {
		t.Errorf("headers at the client differ by path:\ndirect:       %v\nReverseProxy: %v", atClient[0], atClient[1])
	}
}

// TestProxyStreamsBodiesPastTheLimit: --max_body_bytes bounds what the
// sidecar reads itself; a proxied body streams through to the app whole,
// with a stated length or chunked.
func TestProxyStreamsBodiesPastTheLimit(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.MaxBodyBytes, c.RPC.MaxBodyBytes = 100, 100 })
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprintf(w, "got %d", n)
	})
	register(t, s, "up", hostOf(app))
	body := strings.Repeat("x", 1000)
	for name, r := range map[string]io.Reader{"stated length": strings.NewReader(body), "chunked": io.MultiReader(strings.NewReader(body))} {
		resp, err := http.Post(srv.URL+"/proxy/up/", "text/plain", r)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != "got 1000" {
			t.Errorf("%s: %d %q; want 200 got 1000", name, resp.StatusCode, got)
		}
	}
	if code, got := post(t, srv.URL+"/rpc", "application/json", `{"service":"up","method":"A.B","request":"`+body+`"}`); code != 413 {
		t.Errorf("/rpc with the same body: %d %s; want 413", code, got)
	}
}

// TestProxyPassesHeadsAlike asks for answers of several shapes through
// the direct path, served by the fast-path server (which takes the node's
// head as lines) and by net/http (which takes it through a header map),
// and through ReverseProxy: the client must see the same status, fields
// and body from all three.
func TestProxyPassesHeadsAlike(t *testing.T) {
	s, viaNetHTTP := testSidecar(t, nil)
	_, fastAddr := startFastServer(t, s.routes(), nil)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/sniffed": // no Content-Type: none is guessed
			io.WriteString(w, "<html><body>hi</body></html>")
		case "/chunked": // no length: chunked on to the client
			w.Header().Set("Content-Type", "text/plain")
			w.(http.Flusher).Flush()
			io.WriteString(w, "in pieces")
		case "/fields":
			w.Header().Add("Set-Cookie", "a=1")
			w.Header().Add("Set-Cookie", "b=2")
			w.Header().Set("Date", "Mon, 02 Jan 2006 15:04:05 GMT")
			w.Header().Set("Connection", "X-Private")
			w.Header().Set("X-Private", "hop")
			w.Header().Set("Keep-Alive", "timeout=5")
			w.Header().Set("Content-Length", "4")
			w.WriteHeader(http.StatusAccepted)
			io.WriteString(w, "done")
		case "/empty":
			w.WriteHeader(http.StatusNoContent)
		case "/unnamed": // a status without a name: each path gives it net/http's
			w.WriteHeader(499)
		case "/longline": // one field longer than a read buffer: a token in a cookie
			w.Header().Set("Set-Cookie", "session="+strings.Repeat("t", 6000))
			io.WriteString(w, "ok")
		default:
			w.Header().Set("Content-Length", "1234")
			w.Header().Set("Content-Type", "application/octet-stream")
		}
	})
	register(t, s, "shapes", hostOf(app))

	type answer struct {
		status int
		header http.Header
		body   string
	}
	ask := func(base, method, path string, reverseProxy bool) answer {
		t.Helper()
		req, _ := http.NewRequest(method, base+"/proxy/shapes"+path, nil)
		if reverseProxy {
			req.Header.Set("TE", "trailers") // the direct path leaves these to ReverseProxy
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		h := resp.Header.Clone()
		if path != "/fields" {
			h.Del("Date") // the sidecar's own, of its own second
		}
		return answer{resp.StatusCode, h, resp.Status + " " + string(b) + fmt.Sprint(" length ", resp.ContentLength, " ", resp.TransferEncoding)}
	}
	for _, tc := range []struct{ method, path string }{
		{"GET", "/sniffed"}, {"GET", "/chunked"}, {"GET", "/fields"}, {"GET", "/empty"}, {"GET", "/longline"}, {"GET", "/unnamed"},
		{"HEAD", "/head"}, {"HEAD", "/fields"},
	} {
		fast := ask("http://"+fastAddr, tc.method, tc.path, false)
		netHTTP := ask(viaNetHTTP.URL, tc.method, tc.path, false)
		rp := ask(viaNetHTTP.URL, tc.method, tc.path, true)
		if fmt.Sprint(fast) != fmt.Sprint(netHTTP) || fmt.Sprint(fast) != fmt.Sprint(rp) {
			t.Errorf("%s %s answered differently:\nfast-path server: %v\nnet/http:         %v\nReverseProxy:     %v", tc.method, tc.path, fast, netHTTP, rp)
		}
		if tc.path == "/longline" && (fast.status != http.StatusOK || len(fast.header.Get("Set-Cookie")) != len("session=")+6000) {
			t.Errorf("%s /longline: %d, cookie of %d bytes; want 200 and the whole cookie", tc.method, fast.status, len(fast.header.Get("Set-Cookie")))
		}
		if tc.path == "/fields" && (fast.header.Get("X-Private") != "" || fast.header.Get("Keep-Alive") != "" || len(fast.header["Set-Cookie"]) != 2 ||
			fast.header.Get("Date") != "Mon, 02 Jan 2006 15:04:05 GMT") {
			t.Errorf("%s /fields: fields %v; want both cookies and the app's Date, and no hop-by-hop fields", tc.method, fast.header)
		}
	}
}

func TestCanForwardDirect(t *testing.T) {
	for _, tc := range []struct {
		name   string
		mod    func(r *http.Request)
		direct bool
	}{
		{"small body", func(r *http.Request) {}, true},
		{"no body", func(r *http.Request) { r.ContentLength = 0 }, true},
		{"chunked body", func(r *http.Request) { r.ContentLength = -1; r.TransferEncoding = []string{"chunked"} }, false},
		{"large body", func(r *http.Request) { r.ContentLength = directMaxBody + 1 }, false},
		{"upgrade", func(r *http.Request) { r.Header.Set("Upgrade", "websocket") }, false},
		{"trailers asked for", func(r *http.Request) { r.Header.Set("Te", "trailers") }, false},
		{"semicolon query", func(r *http.Request) { r.URL.RawQuery = "a=1;b=2" }, true},
	} {
		r := httptest.NewRequest("POST", "/proxy/web/x", strings.NewReader("body"))
		tc.mod(r)
		if got := canForwardDirect(r); got != tc.direct {
			t.Errorf("%s: canForwardDirect = %v; want %v", tc.name, got, tc.direct)
		}
	}
}

// TestProxyTrailers: a client that asks for trailers gets them, through
// ReverseProxy.
// TestProxyTrailers: a node's trailer fields reach a client that asked for
// them. The real binary, whose fast-path server writes no trailers and
// must leave such requests to net/http.
func TestProxyTrailers(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Trailer", "X-Sum")
		io.WriteString(w, "data")
		w.Header().Set("X-Sum", "42")
	})
	registerAddr(t, p, "trailing", "t1", hostOf(app))
	req, _ := http.NewRequest("GET", p.url("/proxy/trailing/"), nil)
	req.Header.Set("Te", "trailers")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if string(body) != "data" || resp.Trailer.Get("X-Sum") != "42" {
		t.Errorf("body %q trailer %v; want data and X-Sum: 42", body, resp.Trailer)
	}
}

func TestProxyHandlerMode(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.Handler = "proxy" })
	paths := make(chan string, 2)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) { paths <- r.URL.Path })
	register(t, s, "go.micro.srv.greeter", hostOf(app))
	register(t, s, "go.micro.srv.v1.greeter", hostOf(app))
	for _, p := range []string{"/greeter/say/hello", "/v1/greeter/x"} {
		code, body := do(t, "GET", srv.URL+p, "", "")
		if got := <-paths; code != 200 || got != p {
			t.Errorf("GET %s: %d %s, app saw %q; want 200 and the whole path", p, code, body, got)
		}
	}
	if code, _ := do(t, "GET", srv.URL+"/nope/x", "", ""); code != 404 {
		t.Errorf("unknown service: %d; want 404", code)
	}
	if code, _ := do(t, "GET", srv.URL+"/health", "", ""); code != 200 {
		t.Errorf("/health under --handler=proxy: %d; want the sidecar's own 200", code)
	}
}

func TestProxyStreamsEventsUnbuffered(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.RPC.Timeout = 200 * time.Millisecond })
	next := make(chan struct{})
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: two\n\n")
	})
	register(t, s, "events", hostOf(app))
	resp, err := http.Get(srv.URL + "/proxy/events/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	line, err := rd.ReadString('\n')
	if err != nil || line != "data: one\n" {
		t.Fatalf("first event: %q, %v", line, err)
	}
	// The first event arrived while the app still holds the second. Hold it
	// past the 200ms deadline: the deadline covers response headers, not
	// streams.
	time.AfterFunc(400*time.Millisecond, func() { close(next) })
	rest, _ := io.ReadAll(rd)
	if string(rest) != "\ndata: two\n\n" {
		t.Errorf("rest of the stream: %q; want the second event", rest)
	}
}

func TestProxyWebSocket(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := appServer(t, wsServer(func(c *websocket.Conn) { io.Copy(c, c) }).ServeHTTP)
	register(t, s, "ws", hostOf(app))
	ws, err := websocket.Dial("ws"+strings.TrimPrefix(srv.URL, "http")+"/proxy/ws/echo", "", srv.URL)
	if err != nil {
		t.Fatalf("dial through the proxy: %v", err)
	}
	defer ws.Close()
	ws.SetDeadline(time.Now().Add(5 * time.Second))
	if err := websocket.Message.Send(ws, "ping"); err != nil {
		t.Fatal(err)
	}
	var got string
	if err := websocket.Message.Receive(ws, &got); err != nil || got != "ping" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	// Shutdown ends upgraded connections, which http.Server.Shutdown does not.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.conns.closeAll(ctx)
	if err := websocket.Message.Receive(ws, &got); err == nil {
		t.Errorf("after closeAll: received %q; want the connection closed", got)
	}
	s.conns.mu.Lock()
	left := len(s.conns.stops)
	s.conns.mu.Unlock()
	if left != 0 {
		t.Errorf("%d connections still tracked", left)
	}
}

// rawNode is a node written by hand: it reads one request per connection,
// lets answer write whatever it likes, and hangs up. It returns its
// address.
func rawNode(t *testing.T, answer func(c net.Conn, req *http.Request)) string {
	t.Helper()
	return tcpNode(t, func(c net.Conn) {
		defer c.Close()
		if req, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			answer(c, req)
		}
	})
}

// tcpNode listens on loopback and serves each connection it accepts with
// serve, in a goroutine of its own; it returns its address.
func tcpNode(t *testing.T, serve func(c net.Conn)) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go serve(c)
		}
	}()
	return ln.Addr().String()
}

// serveRequests reads requests on c one after another, as a kept-alive
// node does, lets answer write each one's answer, and closes c when the
// client does.
func serveRequests(c net.Conn, answer func(req *http.Request, body []byte)) {
	defer c.Close()
	br := bufio.NewReader(c)
	for {
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		body, _ := io.ReadAll(req.Body)
		answer(req, body)
	}
}

// brokenNode answers every request with the start of a response and then
// hangs up: a node that dies mid-body.
func brokenNode(t *testing.T, partial string) string {
	return rawNode(t, func(c net.Conn, _ *http.Request) { io.WriteString(c, partial) })
}

// TestProxyNodeDyingMidBodyIsNoCleanEnd: when a node hangs up in the middle
// of its body, the client must see a broken response, on either path, never
// a complete-looking one.
// The real binary, so that requests come through the fast-path server.
func TestProxyNodeDyingMidBodyIsNoCleanEnd(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "chunked", "c1", brokenNode(t, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"))
	registerAddr(t, p, "sized", "s1", brokenNode(t, "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nhell"))
	for _, service := range []string{"chunked", "sized"} {
		for _, path := range []string{"direct", "ReverseProxy"} {
			body := ""
			if path == "ReverseProxy" {
				body = strings.Repeat("x", directMaxBody+1) // the direct path leaves these to ReverseProxy
			}
			req, _ := http.NewRequest("POST", p.url("/proxy/"+service+"/x"), strings.NewReader(body))
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				continue // broken before the head: fine
			}
			got, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err == nil && resp.StatusCode == 200 {
				t.Errorf("%s node, %s path: a clean 200 with %q from a node that died mid-body", service, path, got)
			}
		}
	}
}

func TestProxyRetriesAndErrors(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.RPC.Timeout = 300 * time.Millisecond })
	var hits atomic.Int32
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		b, _ := io.ReadAll(r.Body)
		w.Write(b)
	})
	register(t, s, "mixed", deadPort(t), deadPort(t), hostOf(app))
	for i := range 4 {
		code, body := do(t, "POST", srv.URL+"/proxy/mixed/", "text/plain", "body survives retries")
		if code != 200 || body != "body survives retries" {
			t.Fatalf("call %d: %d %q; want refused nodes skipped and the body intact", i, code, body)
		}
	}

	release := make(chan struct{})
	defer close(release)
	hang := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	})
	register(t, s, "hang", hostOf(hang))
	register(t, s, "dead", deadPort(t))
	for _, tc := range []struct {
		path   string
		code   int
		detail string
	}{
		{"/proxy/nope/x", 404, "service nope not found (names are matched in full, as registered: GET /registry lists them)"},
		{"/proxy/", 404, "no service named"},
		{"/proxy/web%2Fx/y", 404, "no service named in /proxy/web%2Fx/y;"}, // the path as the client sent it
		{"/proxy/hang/x", 504, "no response from node"},
		{"/proxy/dead/x", 502, "connection refused"},
		{"/proxy/dead/x", 503, "no nodes available for service dead"},
	} {
		code, body := do(t, "GET", srv.URL+tc.path, "", "")
		if code != tc.code || !strings.Contains(body, tc.detail) {
			t.Errorf("GET %s: %d %s; want %d with %q", tc.path, code, body, tc.code, tc.detail)
		}
	}
	// A bare small Timeout is nanoseconds, as go-micro sends it; the 504
	// says so, as /rpc's does.
	hang2 := appServer(t, func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	register(t, s, "hang2", hostOf(hang2)) // hang's node is out after its 504
	req, _ := http.NewRequest("GET", srv.URL+"/proxy/hang2/x", nil)
	req.Header.Set("Timeout", "5")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 504 || !strings.Contains(string(body), "read as nanoseconds") {
		t.Errorf("Timeout: 5 through the proxy: %d %s; want 504 with the hint", resp.StatusCode, body)
	}
}

// TestChunkedBodyReadsToTheMessageEnd: a chunked body is read through its
// trailer section and closing empty line, however they arrive, so that the
// next answer on the connection starts where it should.
func TestChunkedBodyReadsToTheMessageEnd(t *testing.T) {
	for _, tc := range []struct{ in, body, rest, err string }{
		{"5\r\nhello\r\n0\r\n\r\nNEXT", "hello", "NEXT", ""},
		{"5\r\nhello\r\n0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\nNEXT", "hello", "NEXT", ""},
		{"0\r\n\nNEXT", "", "NEXT", ""},
		{"5\r\nhello\r\n0\r\nX-Sum: 1\r\n", "hello", "", "unexpected EOF"},
		{"5\r\nhello\r\n0\r\n", "hello", "", "unexpected EOF"},
		{"0\r\nX: " + strings.Repeat("v", 300) + "\r\n\r\n", "", "\r\n", "trailers exceed 200 bytes"},
	} {
		for _, pieces := range []bool{false, true} {
			var r io.Reader = strings.NewReader(tc.in)
			if pieces {
				r = iotest.OneByteReader(r)
			}
			br := bufio.NewReader(r)
			got, err := io.ReadAll(newChunkedBody(br, 200))
			rest, _ := io.ReadAll(br)
			if string(got) != tc.body || string(rest) != tc.rest || (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q (in pieces %v): body %q, rest %q, error %v; want %q, %q, %q", tc.in, pieces, got, rest, err, tc.body, tc.rest, tc.err)
			}
		}
	}
}

// TestChunkedAnswersKeepTheirConnection: a node that answers in chunks,
// with a trailer written after the last chunk, keeps one connection for
// calls one after another, through /rpc and the proxy alike; each answer
// is its own, never the trailer of the one before.
// The real binary, so that requests come through the fast-path server.
func TestChunkedAnswersKeepTheirConnection(t *testing.T) {
	var conns atomic.Int32
	addr := tcpNode(t, func(c net.Conn) {
		conns.Add(1)
		serveRequests(c, func(req *http.Request, body []byte) {
			answer := req.URL.Path
			if req.URL.Path == "/" { // a JSON-RPC call: answer its id
				var env struct{ ID json.RawMessage }
				json.Unmarshal(body, &env)
				answer = `{"jsonrpc":"2.0","id":` + string(env.ID) + `,"result":"chunked"}`
			}
			fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n%x\r\n%s\r\n0\r\n", len(answer), answer)
			io.WriteString(c, "X-Sum: 1\r\n\r\n") // the message's end, in a write of its own
		})
	})
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "chunks", "c1", addr)
	for i := range 4 {
		path := fmt.Sprint("/call-", i)
		if code, got := do(t, "GET", p.url("/proxy/chunks"+path), "", ""); code != 200 || got != path {
			t.Fatalf("proxied call %d: %d %q; want 200 %q", i, code, got, path)
		}
		if code, got := do(t, "POST", p.url("/rpc"), "application/x-www-form-urlencoded", "service=chunks&method=A.B"); code != 200 || got != `"chunked"` {
			t.Fatalf("rpc call %d: %d %q; want 200 \"chunked\"", i, code, got)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Errorf("the node saw %d connections for 8 calls one after another; want 1, kept alive", n)
	}
}

// TestProxyBadClientBodyIsTheClientsError: a chunked upload that breaks
// off or is malformed is the caller's fault, told as a 400, and the node
// it was going to is neither blamed (502) nor ejected.
// The real binary: chunked uploads reach the proxy through net/http.
func TestProxyBadClientBodyIsTheClientsError(t *testing.T) {
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, "fine")
	})
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "uploads", "u1", hostOf(app))
	for _, chunks := range []string{"0x3\r\nabc\r\n0\r\n\r\n", "3\r\nabcXY0\r\n\r\n", "-3\r\nabc\r\n0\r\n\r\n"} {
		rc := dialHTTP(t, p.addr)
		rc.send("POST /proxy/uploads/x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)
		resp, body, err := rc.read("POST")
		if err != nil || resp.StatusCode != 400 || !strings.Contains(body, `"code":400`) || !strings.Contains(body, "request body: ") {
			t.Errorf("chunks %q: %v %q %v; want a 400 about the request body", chunks, resp, body, err)
		}
		if code, got := do(t, "GET", p.url("/proxy/uploads/y"), "", ""); code != 200 || got != "fine" {
			t.Fatalf("after chunks %q: %d %q; want the node still in use", chunks, code, got)
		}
	}
}

// TestProxyUpgradeKeepsEarlyBytes: bytes a client sends right behind an
// upgrade request, in the same write, reach the node once it switched
// protocols, through either server.
func TestProxyUpgradeKeepsEarlyBytes(t *testing.T) {
	s, viaNetHTTP := testSidecar(t, nil)
	_, fastAddr := startFastServer(t, s.routes(), nil)
	node := tcpNode(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		if _, err := http.ReadRequest(br); err != nil {
			return
		}
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		io.Copy(c, br) // an echo of whatever comes, what br holds first
	})
	register(t, s, "echo", node)
	for _, addr := range []string{fastAddr, strings.TrimPrefix(viaNetHTTP.URL, "http://")} {
		rc := dialHTTP(t, addr)
		rc.send("GET /proxy/echo/ HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nEARLY")
		resp, err := http.ReadResponse(rc.br, nil)
		if err != nil || resp.StatusCode != 101 {
			t.Fatalf("%s: %v %v; want 101", addr, resp, err)
		}
		rc.send("LATE")
		got := make([]byte, len("EARLYLATE"))
		if _, err := io.ReadFull(rc.br, got); err != nil || string(got) != "EARLYLATE" {
			t.Errorf("%s: echoed %q, %v; want EARLYLATE", addr, got, err)
		}
	}
}

// TestProxyLoopIsCut: a node registered at the sidecar's own address sends
// each proxied request round again; the round ends after maxProxyHops with
// a 508, and the sidecar serves others meanwhile and after.
func TestProxyLoopIsCut(t *testing.T) {
	for _, handler := range []string{"rpc", "proxy"} {
		p := startSidecar(t, "--registry=memory", "--handler="+handler, "--max_inflight=64")
		registerAddr(t, p, "go.micro.srv.loop", "self", p.addr)
		path := strings.Repeat("/proxy/go.micro.srv.loop", 20) + "/x" // each hop takes one off
		if handler == "proxy" {
			path = "/loop/x" // forwarded as it is: round and round
		}
		code, body := do(t, "GET", p.url(path), "", "")
		if code != http.StatusLoopDetected || !strings.Contains(body, "passed 16 proxies") {
			t.Errorf("--handler=%s: GET %s: %d %s; want 508 after 16 proxies", handler, truncate(path, 64), code, body)
		}
		if code, _ := do(t, "GET", p.url("/registry"), "", ""); code != 200 {
			t.Errorf("--handler=%s: after the loop: GET /registry %d; want 200", handler, code)
		}
	}
}

// TestProxySlowUploadIsNoSlowNode: the deadline is for the node's response
// headers once the request is all sent; an upload that takes longer than
// it, while it keeps coming, is answered, and its node is not ejected.
func TestProxySlowUploadIsNoSlowNode(t *testing.T) {
	s, _ := testSidecar(t, func(c *config) { c.RPC.Timeout = 200 * time.Millisecond })
	_, fastAddr := startFastServer(t, s.routes(), nil) // its requests know when their head came
	base := "http://" + fastAddr
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		n, _ := io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, n)
	})
	register(t, s, "uploads", hostOf(app))
	register(t, s, "calls", newJSONRPCApp(t, "c").addr())
	// slowly sends body in three pieces, 150 ms apart: 450 ms in all, past
	// the 200 ms deadline; length -1 sends it chunked.
	slowly := func(path, body string, length int64) (int, string) {
		pr, pw := io.Pipe()
		go func() {
			third := len(body) / 3
			for _, piece := range []string{body[:third], body[third : 2*third], body[2*third:]} {
				pw.Write([]byte(piece))
				time.Sleep(150 * time.Millisecond) // a slow client, not a wait for something
			}
			pw.Close()
		}()
		req, _ := http.NewRequest("POST", base+path, pr)
		req.ContentLength = length
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(got)
	}
	// Each piece fills the client's 4 KiB write buffer, so that it goes out.
	upload := strings.Repeat("x", 15000)
	if code, got := slowly("/proxy/uploads/", upload, 15000); code != 200 || got != "15000" {
		t.Errorf("direct path: %d %q; want 200 and the whole upload", code, got)
	}
	if code, got := slowly("/proxy/uploads/", upload, -1); code != 200 || got != "15000" {
		t.Errorf("ReverseProxy: %d %q; want 200 and the whole upload", code, got)
	}
	// /rpc, from a raw client: its body's second part comes 300 ms after
	// the head and the first.
	call := "service=calls&method=A.B&request=" + strings.Repeat("1", 3000)
	rc := dialHTTP(t, fastAddr)
	rc.send(fmt.Sprintf("POST /rpc HTTP/1.1\r\nHost: h\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n%s", len(call), call[:100]))
	time.Sleep(300 * time.Millisecond) // a slow client, not a wait for something
	rc.send(call[100:])
	if resp, got, err := rc.read("POST"); err != nil || resp.StatusCode != 200 || !strings.Contains(got, `"node":"c"`) {
		t.Errorf("/rpc: %v %.200q %v; want 200 and the node's answer", resp, got, err)
	}
	if code, got := do(t, "POST", base+"/proxy/uploads/", "text/plain", "quick"); code != 200 || got != "5" {
		t.Errorf("after the slow uploads: %d %q; want the node still in use", code, got)
	}
}

func TestEscapedPathAsURL(t *testing.T) {
	for _, target := range []string{
		"/proxy/svc/", "/proxy/svc/a/b;c=d", "/proxy/svc/%41", "/proxy/svc/a%2Fb",
		"/proxy/svc/a b", "/proxy/svc/%25", "/proxy/svc/it's", "/proxy/svc/(x)", "/proxy/svc/ü",
		"/proxy/svc/a+b@c:d,e$f&g=h~i", "/proxy/s%76c/x",
	} {
		u := &url.URL{Path: target}
		if p, err := url.ParseRequestURI(target); err == nil {
			u = p
		}
		if got, want := escapedPath(u), u.EscapedPath(); got != want {
			t.Errorf("%q: escapedPath %q, EscapedPath %q", target, got, want)
		}
	}
	// Where the client left raw what a path may not hold, EscapedPath
	// decodes its %2F; escapedPath keeps it, and escapes the rest.
	for target, want := range map[string]string{
		"/proxy/web/files/a%2Fb{1}": "/proxy/web/files/a%2Fb%7B1%7D",
		"/proxy/web%2Fx/y{":         "/proxy/web%2Fx/y%7B",
		"/proxy/svc/a%2fb|c%3B":     "/proxy/svc/a%2fb%7Cc%3B",
	} {
		u, err := url.ParseRequestURI(target)
		if err != nil {
			t.Fatal(err)
		}
		if got := escapedPath(u); got != want {
			t.Errorf("%q: escapedPath %q; want %q", target, got, want)
		}
	}
}

// TestHalfClosedCallerGetsItsAnswer: a client that half-closes once its
// request is sent (nc -N, many scripts) still waits for the answer. The
// call goes on, on /rpc and on both proxy paths, though net/http ends such
// a request's context; it once answered an empty 200 without the app's.
func TestHalfClosedCallerGetsItsAnswer(t *testing.T) {
	s, srv := testSidecar(t, nil)
	halfClosed := make(chan struct{}, 1)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		select { // answer once the caller has half-closed
		case <-halfClosed:
		case <-time.After(5 * time.Second):
		}
		io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, `{"jsonrpc":"2.0","id":1,"result":{"answered":true}}`)
	})
	register(t, s, "go.micro.srv.foo", hostOf(app))
	rpcBody := `{"service":"go.micro.srv.foo","method":"Foo.Call","request":{}}`
	for name, req := range map[string]string{
		"rpc":           "POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: " + strconv.Itoa(len(rpcBody)) + "\r\n\r\n" + rpcBody,
		"proxy direct":  "POST /proxy/go.micro.srv.foo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
		"proxy chunked": "POST /proxy/go.micro.srv.foo/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
	} {
		conn, err := net.Dial("tcp", hostOf(srv))
		if err != nil {
			t.Fatal(err)
		}
		io.WriteString(conn, req)
		conn.(*net.TCPConn).CloseWrite()
		halfClosed <- struct{}{}
		conn.SetReadDeadline(time.Now().Add(10 * time.Second))
		answer, _ := io.ReadAll(conn)
		conn.Close()
		if !bytes.HasPrefix(answer, []byte("HTTP/1.1 200 ")) || !bytes.Contains(answer, []byte(`"answered":true`)) {
			t.Errorf("%s: answered %q; want the app's answer", name, answer)
		}
		select { // a call that never reached the app left its token
		case <-halfClosed:
			t.Errorf("%s: the app was not called", name)
		default:
		}
	}
}

// TestInterimAnswersAreNotTheStatus: an app's 103 before its 200 passes
// through ReverseProxy, and the request counts as the 200.
func TestInterimAnswersAreNotTheStatus(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		io.WriteString(w, "done")
	})
	register(t, s, "web", hostOf(app))
	req, _ := http.NewRequest("POST", srv.URL+"/proxy/web/x", io.MultiReader(strings.NewReader("chunked"))) // through ReverseProxy
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("status %d; want 200", resp.StatusCode)
	}
	_, metrics := do(t, "GET", srv.URL+"/metrics", "", "")
	if !strings.Contains(metrics, `micro_http_requests_total{route="/proxy/",code="200"} 1`) || strings.Contains(metrics, `code="103"`) {
		t.Errorf("metrics:\n%s\nwant the request counted as its 200", grepLines(metrics, "micro_http_requests_total"))
	}
}

// grepLines returns the lines of text that hold s.
func grepLines(text, s string) string {
	var out []string
	for _, l := range strings.Split(text, "\n") {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// TestProxyNodeDyingInASmallBodyIs502: a node that sends a head and part
// of a small body, then hangs up, costs the caller a 502 in the error
// shape on the direct path: nothing of the answer went out yet.
func TestProxyNodeDyingInASmallBodyIs502(t *testing.T) {
	s, srv := testSidecar(t, nil)
	register(t, s, "web", brokenNode(t, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"partial\""))
	code, body := post(t, srv.URL+"/proxy/web/x", "application/json", "{}")
	if code != http.StatusBadGateway || !strings.Contains(body, "broke off") {
		t.Errorf("answered %d %s; want a 502 saying the answer broke off", code, body)
	}
	if n := s.rpc.sel.ejections.Load(); n != 0 {
		t.Errorf("%d ejections; want none: the node answered", n)
	}
}

// TestAbortedRequestsAreCounted: a stream whose caller leaves before any
// answer ends without one, and counts as 499 (nginx's "client closed
// request"), not as nothing or a 200.
func TestAbortedRequestsAreCounted(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		select { // no answer until the caller is gone
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	register(t, s, "web", hostOf(app))
	conn, err := net.Dial("tcp", hostOf(srv))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(conn, "GET /proxy/web/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
	conn.(*net.TCPConn).CloseWrite()
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if answer, _ := io.ReadAll(conn); len(answer) != 0 {
		t.Errorf("answered %q; want the connection closed without an answer", answer)
	}
	conn.Close()
	waitFor(t, 5*time.Second, "the request counted", func() bool {
		_, metrics := do(t, "GET", srv.URL+"/metrics", "", "")
		return strings.Contains(metrics, `micro_http_requests_total{route="/proxy/",code="499"} 1`)
	})
}

// TestEarlyAnswerToAnUploadIsPassedOn: a node that answers an upload
// before reading it (a 413 over its limit) and closes gets its answer to
// the caller, and is not ejected for it: before, Go's transport failed to
// write the rest of the body and returned that for the answer, and two
// such uploads took a service's two nodes out for everyone.
// The real binary, so that requests come through the fast-path server.
func TestEarlyAnswerToAnUploadIsPassedOn(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	refuse := func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		http.Error(w, "too large", http.StatusRequestEntityTooLarge) // Go's server closes after about 256 KiB of it unread
	}
	registerAddr(t, p, "upload", "u1", hostOf(appServer(t, refuse)))
	registerAddr(t, p, "upload", "u2", hostOf(appServer(t, refuse)))
	// A node that closes at once, with the body unread, resets the
	// connection: its answer may be lost, but it is no failing node.
	abrupt := rawHeadNode(t, "HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
	registerAddr(t, p, "abrupt", "a1", abrupt)
	registerAddr(t, p, "abrupt", "a2", abrupt)
	body := strings.Repeat("x", 4<<20)
	for i := range 6 {
		if code, _ := uploadReadingEarly(t, p.addr, "/proxy/upload/files", body); code != http.StatusRequestEntityTooLarge {
			t.Errorf("upload %d: %d; want the node's 413", i, code)
		}
		code, out := uploadReadingEarly(t, p.addr, "/proxy/abrupt/files", body)
		if code != http.StatusRequestEntityTooLarge && !(code == http.StatusBadGateway && strings.Contains(out, "while the request body was being sent")) {
			t.Errorf("abrupt upload %d: %d %s; want the node's 413, or a 502 saying the node stopped reading", i, code, out)
		}
	}
	if strings.Contains(p.log.String(), "node ejected") {
		t.Errorf("a node that answered was ejected:\n%s", p.log.String())
	}
}

// uploadReadingEarly POSTs body to path at addr and reads the answer while
// the body is still going out, as curl does: Go's client may report its
// failed write instead of an answer that came early (see uploadCut), and
// the sidecar closes a connection whose upload it did not read whole.
func uploadReadingEarly(t *testing.T, addr, path, body string) (int, string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() { // its write fails once the sidecar closes: the answer is what counts
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n", path, addr, len(body))
		io.WriteString(c, body)
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("POST %s: %v", path, err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	return resp.StatusCode, string(out)
}

// rawHeadNode answers every request with answer as soon as its head is
// read, and closes with the body unread.
func rawHeadNode(t *testing.T, answer string) string {
	return tcpNode(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			if line == "\r\n" {
				io.WriteString(c, answer)
				return
			}
		}
	})
}

// TestCORSSurvivesInterimAnswers: on the ReverseProxy path, an interim
// answer from the node (a 103, a 100) must not take the sidecar's CORS
// fields off the final answer, and an Expect: 100-continue gets one 100,
// not the sidecar's and the node's.
func TestCORSSurvivesInterimAnswers(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Link", "</style.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Set("Access-Control-Allow-Origin", "*") // the sidecar's policy stands
		io.WriteString(w, "ok")
	})
	registerAddr(t, p, "web", "w1", hostOf(app))
	origin := "http://" + p.addr // the sidecar's own, under an IP address: allowed
	for _, tc := range []struct {
		name    string
		method  string
		body    string
		headers map[string]string
	}{
		{"TE: trailers", "GET", "", map[string]string{"Te": "trailers"}},
		{"a large upload with Expect", "POST", strings.Repeat("x", directMaxBody+1), map[string]string{"Expect": "100-continue"}},
	} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		head := fmt.Sprintf("%s /proxy/web/x HTTP/1.1\r\nHost: %s\r\nOrigin: %s\r\nContent-Length: %d\r\n", tc.method, p.addr, origin, len(tc.body))
		for k, v := range tc.headers {
			head += k + ": " + v + "\r\n"
		}
		io.WriteString(c, head+"\r\n")
		if tc.headers["Expect"] == "" {
			io.WriteString(c, tc.body)
		}
		br := bufio.NewReader(c)
		continues := 0
		var resp *http.Response
		for {
			resp, err = http.ReadResponse(br, nil)
			if err != nil || resp.StatusCode >= 200 {
				break
			}
			if resp.StatusCode == http.StatusContinue {
				if continues == 0 {
					io.WriteString(c, tc.body) // as curl does, once told to go on
				}
				continues++
			}
		}
		c.Close()
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := resp.Header.Values("Access-Control-Allow-Origin"); len(got) != 1 || got[0] != origin || !slices.Contains(resp.Header.Values("Vary"), "Origin") {
			t.Errorf("%s: final answer's Access-Control-Allow-Origin %q, Vary %q; want %s alone, and Origin", tc.name, got, resp.Header.Values("Vary"), origin)
		}
		if continues > 1 {
			t.Errorf("%s: %d 100 Continue; want one at most", tc.name, continues)
		}
	}
}

// TestProxyGuessesNoContentType: an answer the node sent without a
// Content-Type goes on without one, on both paths: a type the sidecar
// guessed (text/html for an HTML upload the app serves untyped, with
// nosniff) would make browsers render it.
func TestProxyGuessesNoContentType(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	var early atomic.Bool // a 103 Early Hints first, which ReverseProxy passes on
	app := rawNode(t, func(c net.Conn, _ *http.Request) {
		if early.Load() {
			io.WriteString(c, "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")
		}
		body := "<html><script>alert(1)</script></html>"
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nX-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
	})
	registerAddr(t, p, "files", "f1", app)
	for _, interim := range []bool{false, true} {
		early.Store(interim)
		for _, te := range []string{"", "trailers"} { // the direct path, then ReverseProxy
			req, _ := http.NewRequest("GET", p.url("/proxy/files/upload.bin"), nil)
			if te != "" {
				req.Header.Set("Te", te)
			}
			req.Close = true // the raw node serves one request a connection
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if ct, ok := resp.Header["Content-Type"]; resp.StatusCode != 200 || ok {
				t.Errorf("TE %q, a 103 first %v: %d, Content-Type %q; want 200 and none", te, interim, resp.StatusCode, ct)
			}
		}
	}
}

// TestProxyPassesEmptySegments: a path with "//" after the service reaches
// the app as it came (an app may use them), where the mux redirected it;
// dot segments are still redirected to the clean path, which may name
// another service.
func TestProxyPassesEmptySegments(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.EscapedPath()) })
	registerAddr(t, p, "web", "w1", hostOf(app))
	noRedirect := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := noRedirect.Get(p.url("/proxy/web/a//b"))
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "/a//b" {
		t.Errorf("/proxy/web/a//b: %d %q; want the app to get /a//b", resp.StatusCode, body)
	}
	resp, err = noRedirect.Get(p.url("/proxy/web/../other/x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusTemporaryRedirect && resp.StatusCode != http.StatusMovedPermanently {
		t.Errorf("a dot segment: %d; want the mux's redirect", resp.StatusCode)
	}
	// The clean form keeps the path's escapes as they came (the mux
	// escaped them again: b%252Fc), and the query.
	for path, want := range map[string]string{
		"/proxy/web/a/../b%2Fc?q=1":   "/proxy/web/b%2Fc?q=1",
		"/proxy/web/./100%25":         "/proxy/web/100%25",
		"/proxy/web/./%E2%82%AC/x/./": "/proxy/web/%E2%82%AC/x/",
	} {
		resp, err := noRedirect.Get(p.url(path))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusTemporaryRedirect || resp.Header.Get("Location") != want {
			t.Errorf("%s: %d to %q; want 307 to %q", path, resp.StatusCode, resp.Header.Get("Location"), want)
		}
	}
}

// TestIdempotentRequestsMoveOn: a request without a body whose node reset
// the connection after reading it moves to another node when its method
// is idempotent (RFC 9110 section 9.2.2: PUT and DELETE too, as issue #4
// and nginx have it); a POST, which may have done its work, does not.
func TestIdempotentRequestsMoveOn(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	var resets atomic.Int32
	good := appServer(t, func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Method) })
	for _, method := range []string{"GET", "PUT", "DELETE", "POST"} {
		service := "svc-" + strings.ToLower(method)
		bad := rawNode(t, func(c net.Conn, _ *http.Request) { // one each: a failed node is ejected
			resets.Add(1)
			c.(*net.TCPConn).SetLinger(0) // closing sends a reset
		})
		registerAddr(t, p, service, "a-bad", bad)
		registerAddr(t, p, service, "b-good", hostOf(good))
		before := resets.Load()
		for range 2 { // round robin: one of the two starts at the bad node
			req, _ := http.NewRequest(method, p.url("/proxy/"+service+"/x"), nil)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if method == "POST" && resp.StatusCode != 200 && resp.StatusCode != http.StatusBadGateway ||
				method != "POST" && resp.StatusCode != 200 {
				t.Errorf("%s: %d", method, resp.StatusCode)
			}
		}
		if resets.Load() == before {
			t.Errorf("%s: the bad node was never tried: the test proves nothing", method)
		}
	}
}

// TestSpaceBeforeColonInAnAnswer: a node's field with white space before
// its colon is dropped on both paths, as net/http's client drops it (RFC
// 9112 section 5.1 has a proxy remove the white space), where the direct
// path answered 502; one that frames the body is a 502.
func TestSpaceBeforeColonInAnAnswer(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "spaced", "s1", rawNode(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nX-A : v\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
	}))
	registerAddr(t, p, "framing", "f1", rawNode(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length : 2\r\nConnection: close\r\n\r\nok")
	}))
	for _, te := range []string{"", "trailers"} { // the direct path, then ReverseProxy
		req, _ := http.NewRequest("GET", p.url("/proxy/spaced/x"), nil)
		if te != "" {
			req.Header.Set("Te", te)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(body) != "ok" || resp.Header.Get("X-A") != "" {
			t.Errorf("TE %q: %d %q, X-A %q; want 200 ok without the field", te, resp.StatusCode, body, resp.Header.Get("X-A"))
		}
	}
	if code, _ := do(t, "GET", p.url("/proxy/framing/x"), "", ""); code != http.StatusBadGateway {
		t.Errorf("a Content-Length with a space before its colon: %d; want 502", code)
	}
}

// TestEmptyQueryGoesOnAsItCame: "/x?" reaches the app as "/x?" on both
// paths; the direct path dropped the "?".
func TestEmptyQueryGoesOnAsItCame(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "q", "q1", rawNode(t, func(c net.Conn, r *http.Request) {
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s", len(r.RequestURI), r.RequestURI)
	}))
	for _, te := range []string{"", "trailers"} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		head := "GET /proxy/q/x? HTTP/1.1\r\nHost: x\r\n"
		if te != "" {
			head += "TE: " + te + "\r\n"
		}
		io.WriteString(c, head+"\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		c.Close()
		if string(body) != "/x?" {
			t.Errorf("TE %q: the app got %q; want /x?", te, body)
		}
	}
}

// TestBadAnswerIsNotSentAgain: a node that ran a DELETE and answered it
// with a head the sidecar refuses has the caller told so (502); the
// DELETE, idempotent as it is, goes to no other node on either path, and
// the node is not ejected (nginx's default leaves invalid_header alone).
func TestBadAnswerIsNotSentAgain(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	var atBad, atGood atomic.Int64
	bad := rawNode(t, func(c net.Conn, _ *http.Request) {
		atBad.Add(1)
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx")
	})
	good := appServer(t, func(w http.ResponseWriter, r *http.Request) { atGood.Add(1); io.WriteString(w, "deleted") })
	registerAddr(t, p, "items", "a-bad", bad)
	registerAddr(t, p, "items", "b-good", hostOf(good))
	codes := map[int]int{}
	for _, te := range []string{"", "trailers"} { // the direct path, then ReverseProxy
		for range 4 {
			req, _ := http.NewRequest("DELETE", p.url("/proxy/items/1"), nil)
			if te != "" {
				req.Header.Set("Te", te)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			codes[resp.StatusCode]++
		}
	}
	if n := atBad.Load() + atGood.Load(); n != 8 {
		t.Errorf("8 DELETEs reached the apps %d times (bad node %d, good %d); want each once", n, atBad.Load(), atGood.Load())
	}
	if codes[http.StatusBadGateway] != int(atBad.Load()) || atBad.Load() == 0 {
		t.Errorf("answers %v; want a 502 for each of the %d the bad node answered", codes, atBad.Load())
	}
	if strings.Contains(p.log.String(), "node ejected") {
		t.Errorf("a node that answered was ejected:\n%s", p.log.String())
	}
}

// TestBrokenAnswerBeforeAnyOfItWentOut: a node whose answer breaks before
// any of it was passed on costs the caller a 502 in the error shape,
// counted as such, where the caller got an empty reply counted as a 200:
// on the direct path a bad first chunk or a body cut short, on the
// ReverseProxy path (TE: trailers) a body of stated length cut short. (A
// chunked answer's head goes out at once there, as the stream it may be.)
func TestBrokenAnswerBeforeAnyOfItWentOut(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "broken", "b1", rawNode(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Node: b1\r\n\r\nzz\r\n")
	}))
	registerAddr(t, p, "cut", "c1", rawNode(t, func(c net.Conn, _ *http.Request) {
		io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Node: c1\r\n\r\n")
	}))
	for _, tc := range []struct{ service, node, te string }{
		{"broken", "b1", ""}, {"cut", "c1", ""}, // the direct path
		{"cut", "c1", "trailers"}, // ReverseProxy
	} {
		for range 2 {
			req, _ := http.NewRequest("GET", p.url("/proxy/"+tc.service+"/x"), nil)
			req.Header.Set("Te", tc.te)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatalf("%s, TE %q: %v; want a 502", tc.service, tc.te, err)
			}
			body, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil || resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), `"code":502`) ||
				!strings.Contains(string(body), "node "+tc.node+" (") || !strings.Contains(string(body), "broke off") {
				t.Errorf("%s, TE %q: an answer broken before anything went out: %d %s %v; want a 502 in the error shape saying so", tc.service, tc.te, resp.StatusCode, body, err)
			}
			if resp.Header.Get("X-Node") != "" {
				t.Errorf("%s, TE %q: the 502 carries the broken answer's field X-Node", tc.service, tc.te)
			}
		}
	}
	if _, m := do(t, "GET", p.url("/metrics"), "", ""); !strings.Contains(m, `micro_http_requests_total{route="/proxy/",code="502"} 6`) {
		t.Errorf("want all six counted as 502:\n%s", m)
	}
	// The sidecar's connection to the caller stays usable.
	if code, _ := do(t, "GET", p.url("/health"), "", ""); code != 200 {
		t.Errorf("/health after: %d", code)
	}
}

func TestIsCORSField(t *testing.T) {
	for k, want := range map[string]bool{
		"Access-Control-Allow-Origin": true, "access-control-max-age": true, "ACCESS-CONTROL-X": true,
		"Access-Control-": false, "Accept": false, "Content-Type": false, "Xccess-Control-Allow-Origin": false,
	} {
		if got := isCORSField(k); got != want {
			t.Errorf("isCORSField(%q) = %v; want %v", k, got, want)
		}
	}
}

// closedAtItsEnd is a caller's body that net/http closed once it was read
// to its end, as it does when the answer's head goes out: a read past the
// end fails. Its last bytes come with io.EOF, as net/http's do.
type closedAtItsEnd struct{ r io.Reader }

func (b *closedAtItsEnd) Read(p []byte) (int, error) {
	if b.r == nil {
		return 0, errors.New("http: invalid Read on closed Body")
	}
	n, err := b.r.Read(p)
	if err == io.EOF {
		b.r = nil
	}
	return n, err
}

func (b *closedAtItsEnd) Close() error { return nil }

// TestOnceBodyIsNotReadPastItsEnd: the transport reads a request body of
// stated length once more after its end, to check that nothing more came.
// A caller's body closed by then failed that read, and the transport
// closed the node's connection with the answer on its way: the caller got
// the answer's first part and then a cut (seen as a flaky
// TestProxyPassesAKnownLengthAnswerAsItComes).
func TestOnceBodyIsNotReadPastItsEnd(t *testing.T) {
	answer := strings.Repeat("a", 20000)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		io.WriteString(w, answer)
	})
	upload := strings.Repeat("u", 70000)
	var wrote atomic.Value
	trace := &httptrace.ClientTrace{WroteRequest: func(i httptrace.WroteRequestInfo) { wrote.Store(fmt.Sprint(i.Err)) }}
	req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "POST", app.URL, &onceBody{rc: &closedAtItsEnd{r: iotest.DataErrReader(strings.NewReader(upload))}})
	req.ContentLength = int64(len(upload))
	tr := newNodeTransport(newConnectLog())
	defer tr.CloseIdleConnections()
	resp, err := tr.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || string(got) != answer {
		t.Errorf("the answer: %d bytes, %v; want %d", len(got), err, len(answer))
	}
	waitFor(t, 5*time.Second, "the request's write to end", func() bool { return wrote.Load() != nil })
	if e := wrote.Load(); e != "<nil>" {
		t.Errorf("writing the request failed: %v", e)
	}
}

// TestProxyIsFullDuplex: a node may answer while the upload still comes
// (an echo, a transcoder), and the caller may send the rest only once it
// read the answer so far. On net/http's connections the sidecar discarded
// the rest of the upload as the answer's head went out, and the call hung.
func TestProxyIsFullDuplex(t *testing.T) {
	echo := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		http.NewResponseController(w).EnableFullDuplex()
		w.WriteHeader(http.StatusOK)
		buf := make([]byte, 32<<10)
		for {
			n, err := r.Body.Read(buf)
			w.Write(buf[:n])
			w.(http.Flusher).Flush()
			if err != nil {
				return
			}
		}
	})
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "echo", "e1", hostOf(echo))
	for _, tc := range []struct {
		length int64
		te     string // "trailers": served by net/http
	}{{-1, ""}, {1 << 20, ""}, {100 << 10, "trailers"}, {1 << 20, "trailers"}} {
		length := tc.length
		pr, pw := io.Pipe()
		req, _ := http.NewRequest("POST", p.url("/proxy/echo/x"), pr)
		req.ContentLength = length
		if tc.te != "" {
			req.Header.Set("TE", tc.te)
		}
		client := &http.Client{Timeout: 10 * time.Second}                                                 // a hang fails here,
		stop := time.AfterFunc(10*time.Second, func() { pw.CloseWithError(errors.New("the call hung")) }) // and the client's body ends
		defer stop.Stop()
		first := strings.Repeat("p", 100)
		go pw.Write([]byte(first)) // the rest is sent once the echo of this came
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("length %d, TE %q: %v", length, tc.te, err)
		}
		got := make([]byte, len(first))
		if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != first {
			t.Fatalf("length %d, TE %q: the echo of the first part: %q %v", length, tc.te, got, err)
		}
		rest := strings.Repeat("r", 100)
		if length > 0 {
			rest = strings.Repeat("r", int(length)-len(first))
		}
		go func() { io.WriteString(pw, rest); pw.Close() }()
		all, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil || string(all) != rest {
			t.Errorf("length %d, TE %q: the echo of the rest: %d bytes, %v; want %d", length, tc.te, len(all), err, len(rest))
		}
	}
}

// TestNodeResettingInItsHeadIsEjected: a node that resets its connection
// after part of its answer's head is a failing connection, ejected, on
// every proxy path and whether the connection was new or kept alive (the
// README: "refused, reset or timed out"). Through ReverseProxy (a chunked
// upload, one over directMaxBody, TE: trailers) it was taken for an upload
// the node refused, or for a kept-alive connection closed as the request
// went out, and kept.
func TestNodeResettingInItsHeadIsEjected(t *testing.T) {
	for _, kept := range []bool{false, true} {
		for _, via := range []string{"direct", "chunked", "large", "trailers"} {
			name := fmt.Sprintf("%s, kept alive %v", via, kept)
			s, srv := testSidecar(t, nil)
			register(t, s, "go.micro.srv.reset", tcpNode(t, func(c net.Conn) {
				defer c.Close()
				br := bufio.NewReader(c)
				for first := true; ; first = false {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					io.Copy(io.Discard, req.Body) // the whole upload: no refusal
					if first && kept {
						io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
						continue
					}
					io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: te")
					c.(*net.TCPConn).SetLinger(0) // closing sends a reset
					return
				}
			}))
			call := func() int {
				var body io.Reader
				switch via {
				case "chunked":
					body = io.NopCloser(strings.NewReader("data")) // no length: sent chunked
				case "large":
					body = strings.NewReader(strings.Repeat("x", directMaxBody+1))
				default:
					body = strings.NewReader("data")
				}
				req, _ := http.NewRequest("POST", srv.URL+"/proxy/go.micro.srv.reset/x", body)
				if via == "trailers" {
					req.Header.Set("TE", "trailers")
				}
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				return resp.StatusCode
			}
			if kept {
				if code := call(); code != 200 {
					t.Fatalf("%s: first call %d; want the node's 200", name, code)
				}
			}
			if code := call(); code != http.StatusBadGateway {
				t.Errorf("%s: %d; want 502", name, code)
			}
			if n := s.rpc.sel.ejections.Load(); n != 1 {
				t.Errorf("%s: %d ejections; want the node ejected", name, n)
			}
		}
	}
}
