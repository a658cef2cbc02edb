package main

// End-to-end tests of what protects a sidecar: the token, the origin policy,
// TLS, and what it tells operators (metrics, logs).

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func request(t *testing.T, method, url string, headers map[string]string, body string) *http.Response {
	t.Helper()
	return requestHost(t, method, url, "", headers, body)
}

// requestHost is request with the Host header set to host, unless empty.
func requestHost(t *testing.T, method, url, host string, headers map[string]string, body string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if host != "" {
		req.Host = host
	}
	for k, v := range headers {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	resp.Body.Close()
	return resp
}

func TestAuthToken(t *testing.T) {
	const token = "s3cret-token-value"
	p := startSidecarEnv(t, []string{"MICRO_AUTH_TOKEN=" + token}, "--registry=memory", "--server_name=foo", "--server_address=127.0.0.1:9090")
	for _, tc := range []struct {
		path, auth string
		code       int
	}{
		{"/registry", "", 401},
		{"/registry", "Bearer wrong", 401},
		{"/registry", "Basic " + token, 401},
		{"/registry", "Bearer " + token, 200},
		{"/registry?service=foo", "bearer " + token, 200},
		{"/metrics", "", 401},
		{"/health", "", 200},
	} {
		resp := request(t, "GET", p.url(tc.path), map[string]string{"Authorization": tc.auth}, "")
		if resp.StatusCode != tc.code {
			t.Errorf("GET %s with %q: got %d; want %d", tc.path, tc.auth, resp.StatusCode, tc.code)
		}
		if tc.code == 401 && resp.Header.Get("WWW-Authenticate") == "" {
			t.Errorf("401 without WWW-Authenticate")
		}
	}
	code, body := do(t, "GET", p.url("/registry"), "", "")
	var e errorBody
	if json.Unmarshal([]byte(body), &e); code != 401 || e.Code != 401 || !strings.Contains(e.Detail, "Bearer") {
		t.Errorf("401 body: %s; want the error shape saying how to authenticate", body)
	}
	if _, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://"+p.addr); err == nil {
		t.Error("a WebSocket without the token was accepted")
	}
	ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1&access_token="+token, "", "http://"+p.addr)
	if err != nil {
		t.Fatalf("WebSocket with ?access_token: %v", err)
	}
	ws.Close()
	// The URL carries the token for a WebSocket handshake alone, not for a
	// request that merely names an upgrade.
	for _, method := range []string{"GET", "POST"} {
		resp := request(t, method, p.url("/registry?access_token="+token), map[string]string{"Upgrade": "websocket"}, "")
		if resp.StatusCode != 401 {
			t.Errorf("%s with Upgrade: websocket and ?access_token: got %d; want 401", method, resp.StatusCode)
		}
	}
	// Nor for one with both upgrade fields and no key: no handshake.
	resp := request(t, "GET", p.url("/metrics?access_token="+token), map[string]string{"Upgrade": "websocket", "Connection": "Upgrade"}, "")
	if resp.StatusCode != 401 {
		t.Errorf("GET /metrics with the upgrade fields, no Sec-WebSocket-Key, and ?access_token: got %d; want 401", resp.StatusCode)
	}
	if strings.Contains(p.log.String(), token) {
		t.Errorf("the token appears in the log:\n%s", p.log.String())
	}
}

// TestProxyKeepsTheTokenFromApps: the sidecar's token admits a request to
// the sidecar; it is not passed on to the apps the proxy calls, neither as
// Authorization nor as a WebSocket's ?access_token.
func TestProxyKeepsTheTokenFromApps(t *testing.T) {
	const token = "s3cret-token-value"
	seen := make(chan string, 8)
	mux := http.NewServeMux()
	mux.Handle("/ws", websocket.Handler(func(ws *websocket.Conn) {
		seen <- "query " + ws.Request().URL.RawQuery + " auth " + ws.Request().Header.Get("Authorization")
	}))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		seen <- "query " + r.URL.RawQuery + " auth " + r.Header.Get("Authorization")
	})
	app := httptest.NewServer(mux)
	defer app.Close()
	p := startSidecarEnv(t, []string{"MICRO_AUTH_TOKEN=" + token}, "--registry=memory", "--server_name=web", "--server_address="+strings.TrimPrefix(app.URL, "http://"))
	for _, headers := range []map[string]string{
		{"Authorization": "Bearer " + token},                   // the direct path
		{"Authorization": "Bearer " + token, "TE": "trailers"}, // ReverseProxy's
	} {
		resp := request(t, "GET", p.url("/proxy/web/x?q=1&access_token=app-own"), headers, "")
		if got := <-seen; resp.StatusCode != 200 || got != "query q=1&access_token=app-own auth " {
			t.Errorf("%v: %d, the app saw %q; want 200, the query as sent and no Authorization", headers, resp.StatusCode, got)
		}
		// The token sent both ways: the query's copy goes too.
		resp = request(t, "GET", p.url("/proxy/web/x?q=1&access_token="+token), headers, "")
		if got := <-seen; resp.StatusCode != 200 || got != "query q=1 auth " {
			t.Errorf("%v, the token in the query too: %d, the app saw %q; want 200 and no token", headers, resp.StatusCode, got)
		}
	}
	ws, err := websocket.Dial("ws://"+p.addr+"/proxy/web/ws?x=1&access_token="+token+"&y=2", "", "http://"+p.addr)
	if err != nil {
		t.Fatalf("WebSocket through the proxy with ?access_token: %v", err)
	}
	defer ws.Close()
	if got := <-seen; got != "query x=1&y=2 auth " {
		t.Errorf("the app saw %q on the WebSocket handshake; want the query without access_token", got)
	}
}

// TestProxiedCORSHasOneOrigin: for an allowed origin the sidecar's CORS
// answer stands on proxied requests; an app's own CORS fields would make
// two Access-Control-Allow-Origin fields, which fail the browser's check.
// The app's field that adds to it (what the page may read) stays; its
// Allow-Credentials does not (with --cors_allowed_origins=* any site would
// read with the user's cookies). For an origin not allowed the app's CORS
// fields all go: the page must not read through the sidecar what the app
// lets any origin read. An answer that kept or lost the app's fields by
// the Origin says it varies by Origin, for caches.
func TestProxiedCORSHasOneOrigin(t *testing.T) {
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Access-Control-Allow-Origin", "*")
		w.Header().Set("Access-Control-Expose-Headers", "X-App")
		w.Header().Set("Access-Control-Allow-Credentials", "true")
		w.Header().Set("Access-Control-Max-Age", "60")
		io.WriteString(w, "ok")
	}))
	defer app.Close()
	p := startSidecar(t, "--registry=memory", "--cors_allowed_origins=http://app.example")
	registerAddr(t, p, "web", "w1", strings.TrimPrefix(app.URL, "http://"))
	for _, headers := range []map[string]string{
		{"Origin": "http://app.example"},                   // the direct path
		{"Origin": "http://app.example", "TE": "trailers"}, // ReverseProxy's
	} {
		resp := request(t, "GET", p.url("/proxy/web/"), headers, "")
		if got := resp.Header.Values("Access-Control-Allow-Origin"); resp.StatusCode != 200 || len(got) != 1 || got[0] != "http://app.example" {
			t.Errorf("%v: %d, Access-Control-Allow-Origin %q; want 200 and the allowed origin once", headers, resp.StatusCode, got)
		}
		if resp.Header.Get("Access-Control-Expose-Headers") != "X-App" || resp.Header.Get("Access-Control-Allow-Credentials") != "" || resp.Header.Get("Access-Control-Max-Age") != "" {
			t.Errorf("%v: %v; want the app's Expose-Headers, and no other field of its", headers, resp.Header)
		}
		headers["Origin"] = "http://evil.example"
		resp = request(t, "GET", p.url("/proxy/web/"), headers, "")
		for k := range resp.Header {
			if isCORSField(k) {
				t.Errorf("%v: a foreign origin's answer has %s: %q; want no CORS field", headers, k, resp.Header.Values(k))
			}
		}
		if !hasTokenIn(resp.Header["Vary"], "Origin") {
			t.Errorf("%v: Vary %q; want Origin", headers, resp.Header["Vary"])
		}
		// Without an Origin the app's fields pass as they are.
		delete(headers, "Origin")
		resp = request(t, "GET", p.url("/proxy/web/"), headers, "")
		if got := resp.Header.Values("Access-Control-Allow-Origin"); len(got) != 1 || got[0] != "*" || !hasTokenIn(resp.Header["Vary"], "Origin") {
			t.Errorf("%v without Origin: Access-Control-Allow-Origin %q, Vary %q; want the app's * and Vary: Origin", headers, got, resp.Header["Vary"])
		}
	}
}

func TestOriginPolicy(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--cors_allowed_origins=http://app.example")
	svc := `{"name":"csrf","nodes":[{"id":"c1","address":"127.0.0.1","port":1}]}`

	// A page on another site posts a simple (no preflight) request.
	resp := request(t, "POST", p.url("/registry"), map[string]string{"Origin": "http://evil.example", "Content-Type": "text/plain"}, svc)
	if resp.StatusCode != 403 {
		t.Errorf("cross-site POST: got %d; want 403", resp.StatusCode)
	}
	resp = request(t, "DELETE", p.url("/registry"), map[string]string{"Origin": "null"}, svc)
	if resp.StatusCode != 403 {
		t.Errorf("DELETE from an opaque origin: got %d; want 403", resp.StatusCode)
	}
	if lookup(t, p, "csrf") != nil {
		t.Fatal("a refused cross-site request changed the registry")
	}
	// ... or opens a WebSocket.
	if _, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://evil.example"); err == nil {
		t.Error("cross-site WebSocket upgrade accepted")
	}
	// Reads carry no CORS header for other origins, so the page cannot read them.
	resp = request(t, "GET", p.url("/registry"), map[string]string{"Origin": "http://evil.example"}, "")
	if resp.Header.Get("Access-Control-Allow-Origin") != "" {
		t.Error("a read answered a foreign origin with CORS headers")
	}

	// The allowed origin may do all of it, preflight included.
	resp = request(t, "OPTIONS", p.url("/registry"), map[string]string{"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}, "")
	if resp.StatusCode != 204 || resp.Header.Get("Access-Control-Allow-Origin") != "http://app.example" || !strings.Contains(resp.Header.Get("Access-Control-Allow-Methods"), "POST") || resp.Header.Get("Access-Control-Allow-Headers") != "content-type" {
		t.Errorf("preflight: %d %v", resp.StatusCode, resp.Header)
	}
	resp = request(t, "POST", p.url("/registry"), map[string]string{"Origin": "http://app.example"}, svc)
	if resp.StatusCode != 200 || resp.Header.Get("Access-Control-Allow-Origin") != "http://app.example" {
		t.Errorf("allowed origin POST: %d %v", resp.StatusCode, resp.Header)
	}
	ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://app.example")
	if err != nil {
		t.Errorf("allowed origin WebSocket: %v", err)
	} else {
		ws.Close()
	}
	// The sidecar's own origin is allowed, by IP address or localhost.
	_, port, _ := net.SplitHostPort(p.addr)
	for _, own := range []string{p.addr, "localhost:" + port} {
		resp = requestHost(t, "POST", p.url("/registry"), own, map[string]string{"Origin": "http://" + own}, svc)
		if resp.StatusCode != 200 {
			t.Errorf("own origin %s POST: got %d; want 200", own, resp.StatusCode)
		}
	}
	// DNS rebinding: a page of evil.example, its name now resolving to
	// this machine, sends Origin and Host both evil.example.
	rebound := "evil.example:" + port
	for _, method := range []string{"POST", "DELETE"} {
		resp = requestHost(t, method, p.url("/registry"), rebound, map[string]string{"Origin": "http://" + rebound}, svc)
		if resp.StatusCode != 403 || resp.Header.Get("Access-Control-Allow-Origin") != "" {
			t.Errorf("rebound %s: got %d %v; want 403 and no CORS header", method, resp.StatusCode, resp.Header)
		}
	}
}

// selfSigned writes a certificate and key for 127.0.0.1 and returns their
// paths and a pool that trusts the certificate.
func selfSigned(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "micro test"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600)
	os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600)
	cert, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(cert)
	return certFile, keyFile, pool
}

// TestHTTP2UploadAnsweredEarlyThroughTheProxy: over TLS browsers speak
// HTTP/2, and an upload through the proxy to an app that answers before
// reading it goes on being read after the handler returned; the body's
// deadline, set through the HTTP/2 response writer then, crashed the
// sidecar within a few such requests (TLS review).
func TestHTTP2UploadAnsweredEarlyThroughTheProxy(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	early := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		w.Write([]byte(`{"early":true}`)) // the upload unread
	})
	p := startSidecar(t, "--registry=memory", "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	resp, err := client.Post("https://"+p.addr+"/registry", "application/json", strings.NewReader(`{"name":"early","nodes":[{"id":"e1","address":"`+hostOf(early)+`"}]}`))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("register: %v %v", resp, err)
	}
	resp.Body.Close()
	body := bytes.Repeat([]byte("x"), 5<<20)
	for i := range 10 {
		resp, err := client.Post("https://"+p.addr+"/proxy/early/up", "application/octet-stream", bytes.NewReader(body))
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.ProtoMajor != 2 {
				t.Fatalf("upload %d went over %s; want HTTP/2", i, resp.Proto)
			}
		}
		select {
		case <-p.done:
			t.Fatalf("the sidecar died at upload %d:\n%s", i, p.log.String())
		default:
		}
	}
	// Each upload's body was still being read as its handler ended; the
	// process must outlive the last of them.
	resp, err = client.Get("https://" + p.addr + "/health")
	if err != nil {
		t.Fatalf("the sidecar after the uploads: %v\n%s", err, p.log.String())
	}
	resp.Body.Close()
}

func TestTLS(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	p := startSidecar(t, "--registry=memory", "--tls_cert_file="+certFile, "--tls_key_file="+keyFile, "--server_name=foo", "--server_address=127.0.0.1:9090")
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	waitRegisteredOverTLS(t, client, p, "foo")
	resp, err := client.Get("https://" + p.addr + "/registry?service=foo")
	if err != nil {
		t.Fatalf("HTTPS lookup: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.TLS == nil {
		t.Errorf("HTTPS lookup: %d, TLS %v", resp.StatusCode, resp.TLS != nil)
	}
	if resp, err := http.Get("http://" + p.addr + "/registry"); err == nil && resp.StatusCode < 400 {
		t.Errorf("plain HTTP to a TLS sidecar succeeded: %d", resp.StatusCode)
	}
	// An HTTP/1.0 client offering only http/1.0 (curl --http1.0).
	if c, err := tls.Dial("tcp", p.addr, &tls.Config{RootCAs: pool, NextProtos: []string{"http/1.0"}}); err != nil {
		t.Errorf("a TLS handshake offering http/1.0: %v", err)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		io.WriteString(c, "GET /health HTTP/1.0\r\n\r\n")
		if resp, err := http.ReadResponse(bufio.NewReader(c), nil); err != nil || resp.StatusCode != 200 {
			t.Errorf("HTTP/1.0 over TLS: %v %v; want 200", resp, err)
		}
		c.Close()
	}
	for _, path := range []string{"/broker?topic=t", "/registry?watch=1"} { // the hint names the scheme in use
		resp, err := client.Get("https://" + p.addr + path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 400 || !strings.Contains(string(body), "wss://") {
			t.Errorf("GET %s over TLS without an upgrade: %d %s; want 400 pointing at wss://", path, resp.StatusCode, body)
		}
	}
	code, out := run(t, "sidecar", "--tls_cert_file="+certFile)
	if code != 2 || !strings.Contains(out, "go together") {
		t.Errorf("cert without key: exit %d %q", code, out)
	}
	code, out = run(t, "sidecar", "--tls_cert_file="+keyFile, "--tls_key_file="+keyFile)
	if code != 2 || !strings.Contains(out, "--tls_cert_file") {
		t.Errorf("a key given as certificate: exit %d %q", code, out)
	}
	encrypted := filepath.Join(t.TempDir(), "enc.key")
	os.WriteFile(encrypted, []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n"), 0o600)
	code, out = run(t, "sidecar", "--tls_cert_file="+certFile, "--tls_key_file="+encrypted)
	if code != 2 || !strings.Contains(out, "an encrypted key, which is not read") {
		t.Errorf("an encrypted key: exit %d %q; want 2 saying it is encrypted", code, out)
	}
}

// TestTLSStalledBodyGets408: over TLS (net/http serves every request), a
// body that stops arriving gets its 408 after --idle_timeout, as on the
// fast path, and so does one behind Expect: 100-continue on plain HTTP.
func TestTLSStalledBodyGets408(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	tp := startSidecar(t, "--registry=memory", "--idle_timeout=1s", "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)
	pp := startSidecar(t, "--registry=memory", "--idle_timeout=1s")
	stall := func(name string, dial func() (net.Conn, error), extra string) {
		t.Helper()
		c, err := dial()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "POST /registry HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"+extra+"\r\n{\"name\":\"x\"")
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		br := bufio.NewReader(c)
		for {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Errorf("%s: no answer to a stalled body: %v", name, err)
				return
			}
			resp.Body.Close()
			if resp.StatusCode == http.StatusContinue {
				continue
			}
			if resp.StatusCode != http.StatusRequestTimeout {
				t.Errorf("%s: %d; want 408", name, resp.StatusCode)
			}
			return
		}
	}
	stall("TLS", func() (net.Conn, error) { return tls.Dial("tcp", tp.addr, &tls.Config{RootCAs: pool}) }, "")
	stall("TLS, Expect: 100-continue", func() (net.Conn, error) { return tls.Dial("tcp", tp.addr, &tls.Config{RootCAs: pool}) }, "Expect: 100-continue\r\n")
	stall("plain, Expect: 100-continue", func() (net.Conn, error) { return net.Dial("tcp", pp.addr) }, "Expect: 100-continue\r\n")
}

// TestMetricsParse checks /metrics with Prometheus' own parser (promtool,
// from Debian's prometheus package).
func TestMetricsParse(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (apt-get install prometheus); skipping the parser check")
	}
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{"ok":true}}`)
	}))
	defer app.Close()
	p := startSidecar(t, "--registry=memory", "--server_name=foo", "--server_address=127.0.0.1:9090")
	lookup(t, p, "foo")
	lookup(t, p, "nope")
	registerAddr(t, p, "go.micro.srv.metered", "m1", strings.TrimPrefix(app.URL, "http://"))
	if code, out := do(t, "POST", p.url("/metered/call"), "application/json", `{}`); code != 200 {
		t.Fatalf("rpc: %d %s", code, out)
	}
	do(t, "POST", p.url("/rpc"), "application/json", `{"service":"go.micro.srv.absent","method":"A.B"}`)
	publish(t, p, "metered", "text/plain", "hello")
	code, body := do(t, "GET", p.url("/metrics"), "", "")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		`micro_http_requests_total{route="/registry",code="200"} 2`, // a lookup and a registration
		`micro_http_requests_total{route="/registry",code="404"} 1`,
		`micro_registry_nodes 2`,
		`micro_app_healthy{service="foo"} 1`,
		`micro_rpc_duration_seconds_count{service="go.micro.srv.metered",result="ok"} 1`,
		`micro_rpc_duration_seconds_count{service="_unregistered",result="404"} 1`, // a name nobody registered takes no series of its own
		`micro_rpc_node_ejections_total 0`,
		`micro_broker_messages_total{event="published"} 1`,
		`micro_broker_subscribers 0`,
		`micro_broker_registry_failures_total 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(body)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

func TestJSONLogs(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--log_format=json", "--server_name=foo", "--server_address=127.0.0.1:9090")
	appID(t, p)
	// A node that sends a body after its answer to a HEAD: net/http's
	// client logs it on its own, in the same format as the rest.
	registerAddr(t, p, "chatty", "c1", tcpNode(t, func(c net.Conn) {
		defer c.Close()
		if _, err := http.ReadRequest(bufio.NewReader(c)); err == nil {
			io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
			io.Copy(io.Discard, c)
		}
	}))
	request(t, "HEAD", p.url("/proxy/chatty/x"), map[string]string{"TE": "trailers"}, "") // through net/http's client
	waitFor(t, 5*time.Second, "net/http's own log line", func() bool { return strings.Contains(p.log.String(), "Unsolicited response") })
	p.stop(syscall.SIGTERM) // its log line has a duration: the shutdown timeout
	sc := bufio.NewScanner(strings.NewReader(p.log.String()))
	n, timeouts := 0, 0
	for sc.Scan() {
		var line map[string]any
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil || line["msg"] == nil || line["level"] == nil {
			t.Errorf("not a JSON log line: %s", sc.Text())
		}
		if v, ok := line["timeout"]; ok {
			timeouts++
			if v != "10s" {
				t.Errorf("timeout logged as %#v; want the text \"10s\", as the text log has it", v)
			}
		}
		n++
	}
	if n < 3 || timeouts == 0 {
		t.Errorf("want at least the listening, registering and shutdown lines, got %d (%d with a timeout)", n, timeouts)
	}
}

// TestInFlightLimit holds the only slot with a request whose body is still
// coming, and checks the next request is refused at once, not queued.
func TestInFlightLimit(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--max_inflight=1")
	body := `{"name":"slow","nodes":[{"id":"s1","address":"127.0.0.1","port":1}]}`
	head := "POST /registry HTTP/1.1\r\nHost: x\r\nContent-Length: " + itoa(int64(len(body))) + "\r\n\r\n"
	// startSlow sends a request whose body stops halfway, so that it holds
	// the only slot while the sidecar waits for the rest.
	startSlow := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte(head + body[:10])); err != nil {
			t.Fatal(err)
		}
		return c, bufio.NewReader(c)
	}
	c, br := startSlow()
	defer func() { c.Close() }()
	var detail string
	waitFor(t, 5*time.Second, "a request to be refused while the slow one holds the slot", func() bool {
		var code int
		code, detail = do(t, "GET", p.url("/registry"), "", "")
		if code == 503 {
			return true
		}
		// A probe that got in first makes the slow request the refused
		// one: it then has an answer already, and is sent again.
		c.SetReadDeadline(time.Now().Add(time.Millisecond))
		if _, err := br.Peek(1); err == nil {
			c.Close()
			c, br = startSlow()
		}
		return false
	})
	if !strings.Contains(detail, "--max_inflight") {
		t.Errorf("refusal detail: %s", detail)
	}
	// A page of an allowed origin (the sidecar's own) can read the refusal.
	own := request(t, "GET", p.url("/registry"), map[string]string{"Origin": "http://" + p.addr}, "")
	if own.StatusCode != 503 || own.Header.Get("Access-Control-Allow-Origin") != "http://"+p.addr {
		t.Errorf("an allowed origin at the limit: %d %v; want the 503 with its CORS answer", own.StatusCode, own.Header)
	}
	for _, path := range []string{"/health", "/metrics"} {
		if code, _ := do(t, "GET", p.url(path), "", ""); code != 200 {
			t.Errorf("%s must stay reachable at the limit: %d", path, code)
		}
	}
	// Only a WebSocket handshake is exempt (it lives as long as it likes),
	// not any request that names an upgrade.
	sneak, _ := http.NewRequest("POST", p.url("/registry"), strings.NewReader(`{"name":"sneak","nodes":[{"id":"s1","address":"127.0.0.1","port":1}]}`))
	sneak.Header.Set("Upgrade", "websocket")
	if resp, err := http.DefaultClient.Do(sneak); err != nil || resp.StatusCode != 503 {
		t.Errorf("a POST carrying Upgrade: websocket at the limit: %v %v; want 503", resp, err)
	} else {
		resp.Body.Close()
	}
	sneak, _ = http.NewRequest("GET", p.url("/registry"), nil) // a GET, but no Connection: upgrade
	sneak.Header.Set("Upgrade", "websocket")
	if resp, err := http.DefaultClient.Do(sneak); err != nil || resp.StatusCode != 503 {
		t.Errorf("a GET carrying Upgrade: websocket alone at the limit: %v %v; want 503", resp, err)
	} else {
		resp.Body.Close()
	}
	c.SetReadDeadline(time.Time{})
	c.Write([]byte(body[10:]))
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("the slow request: %v %v", resp, err)
	}
	if code, _ := do(t, "GET", p.url("/registry"), "", ""); code != 200 {
		t.Errorf("after the slot frees: %d; want 200", code)
	}
}

// TestBrokerForwardsWithToken: with --auth_token on every sidecar, a message
// published on one reaches a subscriber on another, so the forwarder must
// present the token.
func TestBrokerForwardsWithToken(t *testing.T) {
	const token = "shared-token"
	file := filepath.Join(t.TempDir(), "registry.json")
	env := []string{"MICRO_AUTH_TOKEN=" + token}
	a := startSidecarEnv(t, env, "--registry=file", "--registry_address="+file)
	b := startSidecarEnv(t, env, "--registry=file", "--registry_address="+file)
	sub := subscribeWS(t, b, "B", "topic=secure&access_token="+token)
	waitFor(t, 10*time.Second, "b's topic registration on a", func() bool {
		resp := request(t, "GET", a.url("/registry?service=topic:secure"), map[string]string{"Authorization": "Bearer " + token}, "")
		return resp.StatusCode == 200
	})
	if resp := request(t, "POST", a.url("/broker?topic=secure"), nil, "no token"); resp.StatusCode != 401 {
		t.Errorf("publish without the token: %d; want 401", resp.StatusCode)
	}
	if resp := request(t, "POST", a.url("/broker?topic=secure"), map[string]string{"Authorization": "Bearer " + token}, "hello"); resp.StatusCode != 200 {
		t.Fatalf("publish with the token: %d", resp.StatusCode)
	}
	waitFor(t, 10*time.Second, "the message to cross sidecars", func() bool { return sub.total() == 1 })
}

// TestBrokerTokenGoesOnlyToProvenPeers: a sidecar with a token forwards
// (its token and the messages) only to topic entries made by a holder of
// the token. Here a fake peer announced by hand, as any host could with
// mDNS, and a sidecar without the token are both ignored, with a warning;
// the sidecar sharing the token gets the message.
func TestBrokerTokenGoesOnlyToProvenPeers(t *testing.T) {
	const token = "shared-token"
	var fakeHits sync.Map
	fake := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fakeHits.Store(r.Header.Get("Authorization"), true)
	}))
	defer fake.Close()
	file := filepath.Join(t.TempDir(), "registry.json")
	auth := map[string]string{"Authorization": "Bearer " + token}
	env := []string{"MICRO_AUTH_TOKEN=" + token}
	a := startSidecarEnv(t, env, "--registry=file", "--registry_address="+file)
	b := startSidecarEnv(t, env, "--registry=file", "--registry_address="+file)
	c := startSidecar(t, "--registry=file", "--registry_address="+file)
	subB := subscribeWS(t, b, "B", "topic=orders&access_token="+token)
	subC := subscribeWS(t, c, "C", "topic=orders")
	entry := fmt.Sprintf(`{"name":"topic:orders","nodes":[{"id":"evil","address":%q,"metadata":{"broker":"1","sidecar":"evil","scheme":"http"}}]}`, strings.TrimPrefix(fake.URL, "http://"))
	if resp := request(t, "POST", a.url("/registry?ttl=60s"), auth, entry); resp.StatusCode != 200 {
		t.Fatalf("register the fake peer: %d", resp.StatusCode)
	}
	waitFor(t, 10*time.Second, "three topic entries on a", func() bool {
		var s Service
		return getJSON(t, a.url("/registry?service=topic:orders"), token, &s) == http.StatusOK && len(s.Nodes) == 3
	})
	if resp := request(t, "POST", a.url("/broker?topic=orders"), auth, "card 4111"); resp.StatusCode != 200 {
		t.Fatalf("publish: %d", resp.StatusCode)
	}
	waitFor(t, 10*time.Second, "the message on b", func() bool { return subB.total() == 1 })
	var st brokerStatsReport
	if getJSON(t, a.url("/broker/stats"), token, &st) != http.StatusOK || st.Forwarded != 1 {
		t.Errorf("a forwarded to %d peers; want 1 (b alone): %+v", st.Forwarded, st)
	}
	fakeHits.Range(func(k, _ any) bool {
		t.Errorf("the fake peer was sent a batch, with Authorization %q", k)
		return true
	})
	if n := subC.total(); n != 0 {
		t.Errorf("the sidecar without the token got %d messages; want 0", n)
	}
	log := a.log.String()
	if strings.Count(log, "ignoring a topic entry") != 2 || !strings.Contains(log, "does not prove this sidecar's --auth_token") {
		t.Errorf("a does not say, once per entry, why it ignores the fake peer and c:\n%s", log)
	}
}

// getJSON GETs url with token and decodes the answer into v; it returns
// the status.
func getJSON(t *testing.T, url, token string, v any) int {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Errorf("GET %s: %v", url, err)
	}
	return resp.StatusCode
}

// TestBrokerForwardsOverTLS: sidecars serving HTTPS with one self-signed
// certificate forward to each other over HTTPS, trusting the certificate
// they serve with; no SSL_CERT_FILE is needed.
func TestBrokerForwardsOverTLS(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	args := []string{"--registry=file", "--registry_address=" + filepath.Join(t.TempDir(), "registry.json"), "--tls_cert_file=" + certFile, "--tls_key_file=" + keyFile}
	a := startSidecar(t, args...)
	b := startSidecar(t, args...)
	ws := subscribeWSS(t, b, "tls", pool)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	waitRegisteredOverTLS(t, client, a, "topic:tls")
	publishOverTLS(t, client, a, "tls", "over tls")
	if ev, err := receiveEvent(ws); err != nil || !strings.Contains(string(ev.Data), "over tls") {
		t.Fatalf("b's subscriber: %v, %s; want the message published on a\nlog of a:\n%s", err, ev.Data, a.log.String())
	}
}

// TestGroupMessagesLeaveAnUntrustedPeer: a queue group's message for a
// member at a peer whose certificate this sidecar does not trust was sent
// nowhere (a failed handshake was taken for a batch that may have been
// delivered) and lost; nothing of it left, so it goes to another member.
func TestGroupMessagesLeaveAnUntrustedPeer(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	registry := []string{"--registry=file", "--registry_address=" + filepath.Join(t.TempDir(), "registry.json")}
	a := startSidecar(t, registry...)
	b := startSidecar(t, append(registry, "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)...) // a does not trust it
	c := startSidecar(t, registry...)
	subscribeWSS(t, b, "orders&queue=g", pool)
	subC := subscribeWS(t, c, "C", "topic=orders&queue=g")
	waitFor(t, 10*time.Second, "both members' entries on a", func() bool {
		s := lookup(t, a, "topic:orders")
		return s != nil && len(s.Nodes) == 2
	})
	for i := range 10 {
		if code, out := do(t, "POST", a.url("/broker?topic=orders"), "", fmt.Sprintf("m%d", i)); code != 200 {
			t.Fatalf("publish %d: %d %s", i, code, out)
		}
	}
	waitFor(t, 10*time.Second, "all 10 messages at c's member", func() bool { return subC.total() == 10 })
}

// subscribeWSS subscribes to topic on p over WSS, trusting pool; the
// connection closes with the test.
func subscribeWSS(t *testing.T, p *proc, topic string, pool *x509.CertPool) *websocket.Conn {
	t.Helper()
	cfg, err := websocket.NewConfig("wss://"+p.addr+"/broker?topic="+topic, "https://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	cfg.TlsConfig = &tls.Config{RootCAs: pool}
	ws, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatalf("subscribing over WSS: %v", err)
	}
	t.Cleanup(func() { ws.Close() })
	return ws
}

// waitRegisteredOverTLS waits until p's registry, asked over HTTPS, knows
// service.
func waitRegisteredOverTLS(t *testing.T, client *http.Client, p *proc, service string) {
	t.Helper()
	waitFor(t, 10*time.Second, service+" registered on "+p.addr, func() bool {
		resp, err := client.Get("https://" + p.addr + "/registry?service=" + service)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	})
}

// publishOverTLS publishes body to topic on p over HTTPS.
func publishOverTLS(t *testing.T, client *http.Client, p *proc, topic, body string) {
	t.Helper()
	resp, err := client.Post("https://"+p.addr+"/broker?topic="+topic, "text/plain", strings.NewReader(body))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("publish on %s: %v %v", p.addr, err, resp)
	}
	resp.Body.Close()
}

// receiveEvent reads the next event on ws, waiting up to 10 s.
func receiveEvent(ws *websocket.Conn) (cloudEvent, error) {
	ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	var ev cloudEvent
	err := websocket.JSON.Receive(ws, &ev)
	return ev, err
}

// TestStalledBodiesAreCutOff: a request body that stops arriving is cut
// off after --idle_timeout with a 408 in the error shape, on the registry
// API, /rpc, /broker and the proxy, whether the fast path reads it (a
// stated length) or net/http does (chunked); a body that keeps coming,
// slowly, is read whole however long it takes.
func TestStalledBodiesAreCutOff(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--idle_timeout=1s")
	app := newJSONRPCApp(t, "slow")
	if code, body := do(t, "POST", p.url("/registry"), "application/json", `{"name":"go.micro.srv.slow","nodes":[{"id":"s1","address":"`+app.addr()+`"}]}`); code != 200 {
		t.Fatalf("registering: %d %s", code, body)
	}
	// send sends a body in parts, gap apart, framed by chunks or by a
	// stated length; with stall set, the last part never comes. It returns
	// the status and body of the answer.
	send := func(path string, chunked bool, parts []string, gap time.Duration, stall bool) string {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			return err.Error()
		}
		defer c.Close()
		framing := "Transfer-Encoding: chunked"
		if !chunked {
			framing = fmt.Sprintf("Content-Length: %d", len(strings.Join(parts, "")))
		}
		fmt.Fprintf(c, "POST %s HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n%s\r\n\r\n", path, framing)
		if stall {
			parts = parts[:len(parts)-1]
		}
		for i, part := range parts {
			if i > 0 {
				time.Sleep(gap) // the client's pace, which is what is tested
			}
			if chunked {
				part = fmt.Sprintf("%x\r\n%s\r\n", len(part), part)
			}
			io.WriteString(c, part)
		}
		if chunked && !stall {
			io.WriteString(c, "0\r\n\r\n")
		}
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return "no answer: " + err.Error()
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return fmt.Sprintf("%d %s", resp.StatusCode, bytes.TrimSpace(body))
	}
	var wg sync.WaitGroup // the cases run side by side: each takes a second or more
	for _, chunked := range []bool{false, true} {
		for _, path := range []string{"/registry", "/rpc", "/broker?topic=t", "/proxy/go.micro.srv.slow/", "/proxy/go.micro.srv.slow/large"} {
			rest := `"x"}`
			if strings.HasSuffix(path, "large") {
				rest = strings.Repeat("x", 100<<10) // past the direct path's 64 KiB: through ReverseProxy
			}
			wg.Go(func() {
				got := send(path, chunked, []string{`{"name":`, rest}, 0, true)
				if !strings.HasPrefix(got, "408 ") || !strings.Contains(got, `"code":408`) {
					t.Errorf("%s, chunked %v, a body that stalls: %s; want a 408 in the error shape", path, chunked, got)
				}
			})
		}
		wg.Go(func() {
			slow := []string{`{"name":"go.micro.srv.paced",`, `"nodes":[{"id":"p1",`, `"address":"127.0.0.1:9"`, `}]}`}
			if got := send("/registry", chunked, slow, 400*time.Millisecond, false); !strings.HasPrefix(got, "200 ") {
				t.Errorf("chunked %v, a body that keeps coming over %v: %s; want 200", chunked, 3*400*time.Millisecond, got)
			}
		})
	}
	wg.Wait()
}

// TestConnectIsRefusedInTheErrorShape: the sidecar is no forward proxy; a
// CONNECT gets a 501 in the ecosystem's error shape, not a plain-text 404.
func TestConnectIsRefusedInTheErrorShape(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "web", "w1", hostOf(appServer(t, func(w http.ResponseWriter, r *http.Request) {})))
	for _, target := range []string{"127.0.0.1:9", "/rpc", "/proxy/web/x"} { // on the sidecar's own routes too
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "CONNECT "+target+" HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		c.Close()
		var e errorBody
		if resp.StatusCode != 501 || json.Unmarshal(body, &e) != nil || e.Code != 501 || e.ID != "go.micro.sidecar" || !strings.Contains(e.Detail, "not a forward proxy") {
			t.Errorf("CONNECT %s: %d %s; want a 501 in the error shape", target, resp.StatusCode, body)
		}
	}
}

// TestBothLengthsAreRefusedAndClosed: a request stating Content-Length and
// Transfer-Encoding gets a 400 and its connection closed (RFC 9112 section
// 6.1), whichever comes first, and whatever else in its head would leave
// it to net/http: what a front proxy framing it by the other field took
// for its body must not be served as a request of its own. On a
// connection net/http already serves, the connection is closed after the
// request (net/http hides the Content-Length, so it is closed after every
// chunked one).
func TestBothLengthsAreRefusedAndClosed(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	smuggled := "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
	body := "0\r\n\r\n" + smuggled
	cl := fmt.Sprintf("Content-Length: %d\r\n", len(body))
	for _, tc := range []struct {
		name, earlier, fields string
		refused               bool // by the fast path, with its own 400
	}{
		{"CL first", "", cl + "Transfer-Encoding: chunked\r\n", true},
		{"TE first", "", "Transfer-Encoding: chunked\r\n" + strings.ToLower(cl), true},
		{"after an Expect", "", "Expect: 100-continue\r\nTransfer-Encoding: chunked\r\n" + cl, true},
		{"after an Upgrade", "", "Upgrade: x\r\n" + cl + "Transfer-Encoding: chunked\r\n", true},
		{"on a connection net/http serves", "GET /health HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n", "Transfer-Encoding: chunked\r\n" + cl, false},
		{"chunked alone, on a connection net/http serves", "GET /health HTTP/1.1\r\nHost: x\r\nTE: trailers\r\n\r\n", "Transfer-Encoding: chunked\r\n", false},
	} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, tc.earlier+"POST /registry HTTP/1.1\r\nHost: x\r\n"+tc.fields+"\r\n"+body)
		br := bufio.NewReader(c)
		var answers []*http.Response
		var bodies []string
		for {
			resp, err := http.ReadResponse(br, nil)
			if err != nil {
				break
			}
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode == http.StatusContinue {
				continue
			}
			answers, bodies = append(answers, resp), append(bodies, string(b))
		}
		c.Close()
		want := 1
		if tc.earlier != "" {
			want = 2
		}
		if len(answers) != want {
			t.Errorf("%s: %d answers %q; want %d: the smuggled request was served", tc.name, len(answers), bodies, want)
			continue
		}
		last := answers[len(answers)-1]
		if !last.Close {
			t.Errorf("%s: the connection was kept after the request", tc.name)
		}
		var e errorBody
		if tc.refused && (last.StatusCode != 400 || json.Unmarshal([]byte(bodies[len(bodies)-1]), &e) != nil || e.Code != 400 || !strings.Contains(e.Detail, "ambiguous")) {
			t.Errorf("%s: %d %s; want a 400 in the error shape saying the length is ambiguous", tc.name, last.StatusCode, bodies[len(bodies)-1])
		}
	}
}

// TestTransferEncodingOnHTTP10IsRefused: an HTTP/1.0 request with a
// Transfer-Encoding gets a 400 and its connection closed (RFC 9112 section
// 6.1): net/http would ignore the field, pass on an empty body, and read
// the chunks as a request of their own. A head the fast path leaves to
// net/http (one over its buffer, or with a bare LF), where net/http frames
// a request with both lengths by its Content-Length, is answered by
// net/http, and its connection closed after it: a front proxy framing it
// by its chunks would have sent what follows as part of it.
func TestTransferEncodingOnHTTP10IsRefused(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	smuggled := "GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
	pad := "X-Pad: " + strings.Repeat("a", 20000) + "\r\n"
	for _, tc := range []struct {
		name, head string
		detail     string // of the fast path's 400; empty: net/http's answer
	}{
		{"a plain head", "POST /registry HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n", "HTTP/1.0 request has no Transfer-Encoding"},
		{"both lengths and a bare LF", "POST /registry HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n", ""},
		{"both lengths, over the fast path's buffer", "POST /registry HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n" + pad + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n", ""},
	} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, tc.head+smuggled)
		all, _ := io.ReadAll(c) // to the close
		c.Close()
		br := bufio.NewReader(bytes.NewReader(all))
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Errorf("%s: %q: %v", tc.name, all, err)
			continue
		}
		body, _ := io.ReadAll(resp.Body)
		var e errorBody
		if tc.detail != "" && (resp.StatusCode != 400 || json.Unmarshal(body, &e) != nil || !strings.Contains(e.Detail, tc.detail)) {
			t.Errorf("%s: %d %s; want a 400 in the error shape naming the fault", tc.name, resp.StatusCode, body)
		}
		if rest, _ := io.ReadAll(br); len(rest) != 0 {
			t.Errorf("%s: after the answer: %q; want the connection closed, the chunks not read as a request", tc.name, rest)
		}
	}
}

// TestSilentConnectionClosedAfterReadHeaderTimeout: a new connection that
// sends nothing is closed after --read_header_timeout, as net/http closes
// one; between requests a connection may idle for --idle_timeout.
func TestSilentConnectionClosedAfterReadHeaderTimeout(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--read_header_timeout=500ms", "--idle_timeout=30s")
	silent, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	start := time.Now()
	silent.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := silent.Read(make([]byte, 1)); err != io.EOF || time.Since(start) > 5*time.Second {
		t.Errorf("a silent new connection: %v after %v; want it closed within a few seconds", err, time.Since(start).Round(time.Millisecond))
	}
	kept, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer kept.Close()
	br := bufio.NewReader(kept)
	ask := func() error {
		io.WriteString(kept, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
		kept.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(br, nil)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		return err
	}
	if err := ask(); err != nil {
		t.Fatal(err)
	}
	// An idle wait longer than the head timeout, checked by the next request.
	idle := time.NewTimer(time.Second)
	<-idle.C
	if err := ask(); err != nil {
		t.Errorf("a kept-alive connection idle for 1s of its 30s: %v", err)
	}
}

// TestIdleTimeoutShorterThanTheHeadTimeout: a connection idle after its
// request closes after --idle_timeout, also when that is shorter than
// --read_header_timeout, which gave its first head a later deadline.
func TestIdleTimeoutShorterThanTheHeadTimeout(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--read_header_timeout=20s", "--idle_timeout=1s")
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	io.WriteString(c, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	start := time.Now()
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("an idle connection: %v after %v; want it closed after its 1s idle timeout, not the head's 20s", err, time.Since(start).Round(time.Millisecond))
	}
}

// TestInFlightLimitCountsHandshakesUntilTakenOver: a request that names a
// WebSocket upgrade holds an in-flight slot until its connection is taken
// over; one the app never upgrades keeps it to the end, and a WebSocket
// once open holds none.
func TestInFlightLimitCountsHandshakesUntilTakenOver(t *testing.T) {
	release, arrived := make(chan struct{}), make(chan struct{}, 1)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		select { // answers, and never upgrades, when the test lets it
		case <-release:
		case <-r.Context().Done():
		}
	}))
	defer app.Close()
	defer close(release)
	p := startSidecar(t, "--registry=memory", "--max_inflight=1")
	registerAddr(t, p, "slowws", "s1", strings.TrimPrefix(app.URL, "http://"))
	fake := func() *http.Response {
		req, _ := http.NewRequest("GET", p.url("/proxy/slowws/"), nil)
		req.Header.Set("Connection", "Upgrade")
		req.Header.Set("Upgrade", "websocket")
		req.Header.Set("Sec-WebSocket-Version", "13")
		req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	held := make(chan *http.Response, 1)
	go func() { held <- fake() }()
	<-arrived // the first is at the app, holding the slot
	if resp := fake(); resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("a second fake upgrade while the first holds the slot: %d; want 503", resp.StatusCode)
		resp.Body.Close()
	}
	release <- struct{}{} // the first one answers
	if resp := <-held; resp.StatusCode != http.StatusOK {
		t.Errorf("the held fake upgrade: %d; want the app's 200", resp.StatusCode)
	} else {
		resp.Body.Close()
	}
	// A real WebSocket gives its slot back once open.
	subscribeWS(t, p, "open", "topic=inflight")
	waitSubscribers(t, p, 1)
	if code, _ := do(t, "GET", p.url("/registry"), "", ""); code != http.StatusOK {
		t.Errorf("a request with a WebSocket open at --max_inflight=1: %d; want 200", code)
	}
}

// TestCertWarning: a certificate that loads but that clients will refuse
// (expired, not valid yet) is said so at start.
func TestCertWarning(t *testing.T) {
	certFile, keyFile, _ := selfSigned(t) // valid from an hour ago to an hour from now
	now := time.Now()
	for _, c := range []struct {
		at   time.Time
		want string
	}{
		{now, ""},
		{now.Add(2 * time.Hour), "expired on"},
		{now.Add(-2 * time.Hour), "not valid before"},
	} {
		got := certWarning(certFile, keyFile, c.at)
		if c.want == "" && got != "" || !strings.Contains(got, c.want) {
			t.Errorf("at %v: %q; want %q", c.at.Sub(now).Round(time.Hour), got, c.want)
		}
	}
}

// TestBrokerForwardsBetweenTLSAndPlain: a fleet moving to TLS holds both
// kinds of sidecar; each topic entry says how its sidecar serves, and
// messages are forwarded so, both ways. (The plain one trusts the other's
// self-signed certificate through SSL_CERT_FILE, as the README says.)
func TestBrokerForwardsBetweenTLSAndPlain(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	registry := "--registry_address=" + filepath.Join(t.TempDir(), "registry.json")
	tlsSide := startSidecar(t, "--registry=file", registry, "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)
	plain := startSidecarEnv(t, []string{"SSL_CERT_FILE=" + certFile}, "--registry=file", registry)
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}

	// To the TLS one, from the plain one.
	ws := subscribeWSS(t, tlsSide, "mixed", pool)
	waitFor(t, 10*time.Second, "the TLS sidecar's topic on the plain one", func() bool { return lookup(t, plain, "topic:mixed") != nil })
	publish(t, plain, "mixed", "text/plain", "to tls")
	if ev, err := receiveEvent(ws); err != nil || !strings.Contains(string(ev.Data), "to tls") {
		t.Fatalf("the TLS sidecar's subscriber: %v, %s; want the message published on the plain one\nlog of the plain one:\n%s", err, ev.Data, plain.log.String())
	}

	// To the plain one, from the TLS one.
	sub := subscribeWS(t, plain, "plain", "topic=mixed2")
	waitRegisteredOverTLS(t, client, tlsSide, "topic:mixed2")
	publishOverTLS(t, client, tlsSide, "mixed2", "to plain")
	waitFor(t, 10*time.Second, "the plain sidecar's subscriber to get it", func() bool { return sub.total() == 1 })
	if !strings.Contains(tlsSide.log.String(), "messages cross the network unencrypted") {
		t.Errorf("the TLS sidecar forwards in plain HTTP without a warning:\n%s", tlsSide.log.String())
	}
}

// TestTLSToAPlainServerIsNotSpoken: a TLS connection to a server that
// answers in plain HTTP is a TLS failure (nothing was delivered: a broker
// peer's queue groups go to other members; etcd's hint says use http://).
// net/http's client reports it as ErrSchemeMismatch, which hides the
// record error, and it passed for a failure that may have delivered.
func TestTLSToAPlainServerIsNotSpoken(t *testing.T) {
	plain := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer plain.Close()
	_, err := http.Get("https://" + strings.TrimPrefix(plain.URL, "http://") + "/")
	if got := tlsFailureOf(err); got != tlsNotSpoken {
		t.Errorf("https:// to a plain server (%v): %v; want tlsNotSpoken", err, got)
	}
}

// TestTLSToThePlainPortIsAnsweredAtOnce: a client speaking TLS to the
// sidecar's plain port (https:// for http://, a peer by a stale https://
// entry) gets a 400 saying so at once. The fast path waited for a whole
// head, which a TLS hello never makes, until --read_header_timeout, and
// answered nothing; a peer's forward then timed out as "may have been
// delivered" instead of going to another member.
func TestTLSToThePlainPortIsAnsweredAtOnce(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--read_header_timeout=60s")
	client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	_, err := client.Get("https://" + p.addr + "/health")
	if got := tlsFailureOf(err); got != tlsNotSpoken {
		t.Errorf("https:// to the plain port: %v (%v); want an answer in plain HTTP", err, got)
	}
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	c.Write([]byte{0x16, 0x03, 0x01, 0x00, 0x05, 0x01, 0x00, 0x00, 0x01, 0x03}) // a TLS record's start: no line end
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "use http://, not https://") {
		t.Errorf("a TLS hello: %d %s; want 400 saying to use http://", resp.StatusCode, body)
	}
}

// TestClientThatStopsReadingIsCutOff: a client that stops reading its
// answer gets --idle_timeout to take more of it; then its request ends
// and gives back its --max_inflight slot, and its connection closes. It
// held both for as long as it liked: a proxied download left unread, and
// pipelined requests whose answers pile up unread.
func TestClientThatStopsReadingIsCutOff(t *testing.T) {
	big := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		chunk := bytes.Repeat([]byte("x"), 1<<20)
		for range 256 {
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	})
	certFile, keyFile, pool := selfSigned(t)
	flags := []string{"--registry=memory", "--idle_timeout=1s", "--max_inflight=1"}
	plain := startSidecar(t, flags...)
	tlsp := startSidecar(t, append(flags, "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)...)
	tlsClient := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
	registerAddr(t, plain, "big", "b1", hostOf(big))
	reg := fmt.Sprintf(`{"name":"big","nodes":[{"id":"b1","address":%q}]}`, hostOf(big))
	if resp, err := tlsClient.Post("https://"+tlsp.addr+"/registry", "application/json", strings.NewReader(reg)); err != nil || resp.StatusCode != 200 {
		t.Fatalf("register on the TLS sidecar: %v %v", resp, err)
	}
	slotFree := func(p *proc, client *http.Client, scheme string) bool {
		resp, err := client.Get(scheme + "://" + p.addr + "/registry")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == 200
	}
	stalled := func(name string, c net.Conn, p *proc, client *http.Client, scheme string) {
		t.Helper()
		defer c.Close()
		io.WriteString(c, "GET /proxy/big/x HTTP/1.1\r\nHost: x\r\n\r\n")
		waitFor(t, 20*time.Second, name+": the unread download to give back its slot", func() bool { return slotFree(p, client, scheme) })
	}
	dialSmall := func(addr string) net.Conn {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		c.(*net.TCPConn).SetReadBuffer(4096)
		return c
	}
	stalled("plain", dialSmall(plain.addr), plain, http.DefaultClient, "http")
	tc := tls.Client(dialSmall(tlsp.addr), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1", NextProtos: []string{"http/1.1"}})
	stalled("TLS", tc, tlsp, tlsClient, "https")

	// HTTP/2: a stream whose window the client never opens.
	h2 := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true,
		HTTP2: &http.HTTP2Config{MaxReceiveBufferPerStream: 1 << 16, MaxReceiveBufferPerConnection: 1 << 16}}}
	resp, err := h2.Get("https://" + tlsp.addr + "/proxy/big/x")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.ProtoMajor != 2 {
		t.Fatalf("HTTP/%d; want 2", resp.ProtoMajor)
	}
	waitFor(t, 20*time.Second, "HTTP/2: the unread download to give back its slot", func() bool { return slotFree(tlsp, tlsClient, "https") })

	// Pipelined requests whose answers are never read: the connection
	// closes, and the client's writes fail. Large answers fill the
	// socket's buffers (4 MiB here) in some hundred requests, not in as
	// many thousand as a busy machine serves in seconds.
	var nodes []string
	for i := range 40 {
		nodes = append(nodes, fmt.Sprintf(`{"id":"p%d","address":"127.0.0.1","port":1,"metadata":{"pad":%q}}`, i, strings.Repeat("x", 900)))
	}
	if code, out := do(t, "POST", plain.url("/registry"), "application/json", `{"name":"pad","nodes":[`+strings.Join(nodes, ",")+`]}`); code != 200 {
		t.Fatalf("register pad: %d %s", code, out)
	}
	c := dialSmall(plain.addr)
	defer c.Close()
	failed := make(chan error, 1)
	go func() {
		req := []byte(strings.Repeat("GET /registry?service=pad HTTP/1.1\r\nHost: x\r\n\r\n", 100))
		for {
			if _, err := c.Write(req); err != nil {
				failed <- err
				return
			}
		}
	}()
	select {
	case <-failed:
	case <-time.After(20 * time.Second):
		t.Error("pipelined requests whose answers are not read: the connection still takes requests after 20 s")
	}
}

// TestFirstHeadDeadlineCountsFromTheConnection: a new connection owes its
// first head within --read_header_timeout of its accept, however late its
// first byte, and a head that grows past the fast path's buffer (handed
// to net/http) gets no fresh timeout either: a client trickling its head
// held the connection for up to three times the timeout.
func TestFirstHeadDeadlineCountsFromTheConnection(t *testing.T) {
	const rht = 2 * time.Second
	p := startSidecar(t, "--registry=memory", "--read_header_timeout="+rht.String())
	for _, big := range []bool{false, true} {
		c, err := net.Dial("tcp", p.addr)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		<-time.After(rht * 9 / 10) // a client that waits before its first byte
		closed := make(chan time.Duration, 1)
		go func() {
			c.SetReadDeadline(time.Now().Add(20 * time.Second))
			io.Copy(io.Discard, c)
			closed <- time.Since(start)
		}()
		head := "GET /health HTTP/1.1\r\nHost: x\r\n"
		if big {
			head += "X-Pad: " + strings.Repeat("p", 9<<10) + "\r\n" // past the fast path's buffer
		}
		io.WriteString(c, head)
		trickle := time.NewTicker(100 * time.Millisecond) // and never ends its head
		var took time.Duration
	loop:
		for {
			select {
			case took = <-closed:
				break loop
			case <-trickle.C:
				c.Write([]byte("X-A: b\r\n"))
			}
		}
		trickle.Stop()
		c.Close()
		if took > rht*3/2 {
			t.Errorf("head past the buffer %v: closed %v after the connection; want about %v", big, took.Round(time.Millisecond), rht)
		}
	}
}

// TestHTTP2ConnectionOwesARequestWithinTheHeadTimeout: an HTTP/2
// connection that never finishes a request's headers is closed after
// --read_header_timeout, as an HTTP/1.1 one is; it lasted --idle_timeout.
// One that made a request idles as long as --idle_timeout allows.
func TestHTTP2ConnectionOwesARequestWithinTheHeadTimeout(t *testing.T) {
	certFile, keyFile, pool := selfSigned(t)
	p := startSidecar(t, "--registry=memory", "--read_header_timeout=1s", "--idle_timeout=30s", "--tls_cert_file="+certFile, "--tls_key_file="+keyFile)
	c, err := tls.Dial("tcp", p.addr, &tls.Config{RootCAs: pool, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if proto := c.ConnectionState().NegotiatedProtocol; proto != "h2" {
		t.Fatalf("negotiated %q; want h2", proto)
	}
	start := time.Now()
	io.WriteString(c, "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	c.Write([]byte{0, 0, 0, 4, 0, 0, 0, 0, 0}) // an empty SETTINGS frame, and no request
	c.SetReadDeadline(time.Now().Add(20 * time.Second))
	io.Copy(io.Discard, c)
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("an HTTP/2 connection with no request closed after %v; want about 1s (--read_header_timeout)", took.Round(time.Millisecond))
	}

	var conns []string
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ForceAttemptHTTP2: true}}
	for i := range 2 {
		trace := &httptrace.ClientTrace{GotConn: func(info httptrace.GotConnInfo) { conns = append(conns, info.Conn.LocalAddr().String()) }}
		req, _ := http.NewRequestWithContext(httptrace.WithClientTrace(context.Background(), trace), "GET", "https://"+p.addr+"/health", nil)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.ProtoMajor != 2 {
			t.Fatalf("HTTP/%d; want 2", resp.ProtoMajor)
		}
		if i == 0 {
			<-time.After(1500 * time.Millisecond) // idle past the head timeout
		}
	}
	if len(conns) != 2 || conns[0] != conns[1] {
		t.Errorf("connections %q; want the second request on the first's, idle 1.5s of its 30s", conns)
	}
}

// pacedReader reads at most step bytes at each tick: a client that reads
// slowly, but steadily.
type pacedReader struct {
	r    io.Reader
	tick <-chan time.Time
	step int
}

func (p *pacedReader) Read(b []byte) (int, error) {
	<-p.tick
	return p.r.Read(b[:min(len(b), p.step)])
}
