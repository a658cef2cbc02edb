package main

// End-to-end tests of RPC and the proxy: the built sidecar binary in front
// of app processes, one of them a JSON-RPC server written by others in
// another language (Debian's python3-jsonrpclib-pelix).

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// A test binary started with MICRO_TEST_APP=name is a JSON-RPC app named
// name instead: it answers Example.Call with {"msg":"name: Hello <name>"}.
// The end-to-end tests run it as a real process they can kill.
func init() {
	if name := os.Getenv("MICRO_TEST_APP"); name != "" {
		os.Exit(runTestApp(name))
	}
}

func runTestApp(name string) int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("listening on %s\n", ln.Addr())
	err = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req struct {
			ID     json.RawMessage
			Method string
			Params []struct{ Name string }
		}
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil || len(req.Params) != 1 {
			fmt.Fprintf(w, `{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse error"}}`)
			return
		}
		msg, _ := json.Marshal(name + ": Hello " + req.Params[0].Name)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":{"msg":%s}}`, req.ID, msg)
	}))
	fmt.Fprintln(os.Stderr, err)
	return 1
}

// appProc is one app process.
type appProc struct {
	cmd  *exec.Cmd
	addr string
	done chan struct{}
}

var listeningOnRE = regexp.MustCompile(`listening on (\S+)`)

// startApp runs an app process that prints "listening on host:port" first.
func startApp(t *testing.T, env []string, name string, args ...string) *appProc {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	a := &appProc{cmd: cmd, done: make(chan struct{})}
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		if sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		io.Copy(io.Discard, out)
	}()
	go func() { cmd.Wait(); close(a.done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-a.done })
	select {
	case line := <-lines:
		m := listeningOnRE.FindStringSubmatch(line)
		if m == nil {
			t.Fatalf("%s %v: first line %q; stderr: %s", name, args, line, stderr.String())
		}
		a.addr = m[1]
	case <-time.After(10 * time.Second):
		t.Fatalf("%s %v did not start listening within 10s; stderr: %s", name, args, stderr.String())
	}
	return a
}

// goApp runs this test binary as a JSON-RPC app named name.
func goApp(t *testing.T, name string) *appProc {
	t.Helper()
	return startApp(t, []string{"MICRO_TEST_APP=" + name}, os.Args[0], "-test.run=^$")
}

// python is Debian's interpreter, where python3-jsonrpclib-pelix lives (a
// pyenv or virtualenv python3 on PATH would not see it).
const python = "/usr/bin/python3"

// pythonJSONRPCApp runs a jsonrpclib-pelix server, or skips the test with
// the reason it cannot.
func pythonJSONRPCApp(t *testing.T, name string) *appProc {
	t.Helper()
	if out, err := exec.Command(python, "-c", "import jsonrpclib.SimpleJSONRPCServer").CombinedOutput(); err != nil {
		t.Skipf("needs %s with jsonrpclib (Debian package python3-jsonrpclib-pelix): %v %s", python, err, out)
	}
	return startApp(t, nil, python, "testdata/jsonrpclib_app.py", name)
}

// registerAddr registers one node at addr (host:port) through p.
func registerAddr(t *testing.T, p *proc, service, id, addr string) {
	t.Helper()
	registerAddrQuery(t, p, "", service, id, addr)
}

func registerAddrQuery(t *testing.T, p *proc, query, service, id, addr string) {
	t.Helper()
	body := fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q,"address":%q}]}`, service, id, addr)
	if code, out := do(t, "POST", p.url("/registry"+query), "application/json", body); code != 200 {
		t.Fatalf("register %s/%s on %s: %d %s", service, id, p.addr, code, out)
	}
}

// TestSeedRPCExample runs the seed README's example verbatim: a sidecar for
// a Python app written with the standard library alone (the README's
// example service), and the curl call.
func TestSeedRPCExample(t *testing.T) {
	if _, err := os.Stat(python); err != nil {
		t.Skipf("needs %s: %v", python, err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	app := startApp(t, nil, python, "testdata/greeter.py", "127.0.0.1", port, "greeter-1")
	// As the README starts it: registered once its health page answers.
	p := startSidecar(t, "--registry=memory", "--server_name=go.micro.srv.example", "--server_address="+app.addr, "--healthcheck_url=http://"+app.addr+"/_status/health")
	id := appID(t, p)
	want := `{"msg": "greeter-1: Hello John"}`

	if curl, err := exec.LookPath("curl"); err == nil {
		out, err := exec.Command(curl, "-s", "-d", "service=go.micro.srv.example", "-d", "method=Example.Call",
			"-d", `request={"name": "John"}`, "http://"+p.addr+"/rpc").CombinedOutput()
		if err != nil || string(out) != want {
			t.Errorf("seed curl: %q, %v; want %s", out, err, want)
		}
	} else {
		t.Log("curl not installed; sending the seed's form fields from Go")
	}
	resp, err := http.PostForm(p.url("/rpc"), url.Values{"service": {"go.micro.srv.example"}, "method": {"Example.Call"}, "request": {`{"name": "John"}`}})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != want || resp.Header.Get("Content-Type") != "application/json" {
		t.Errorf("form call: %d %s %q; want 200 %s as JSON", resp.StatusCode, resp.Header.Get("Content-Type"), body, want)
	}
	for _, tc := range []struct{ path, ct, body string }{
		{"/rpc", "application/json", `{"service":"go.micro.srv.example","method":"Example.Call","request":{"name":"John"}}`},
		{"/rpc", "application/json", `{"service":"go.micro.srv.example","method":"Example.Call","request":"{\"name\":\"John\"}"}`},
		{"/rpc", "application/x-www-form-urlencoded", `service=go.micro.srv.example&method=Example.Call&address=` + app.addr + `&request={"name":"John"}`},
		{"/example/call", "application/json", `{"name":"John"}`},
		{"/example/call", "application/x-www-form-urlencoded", `name=John`},
	} {
		if code, got := do(t, "POST", p.url(tc.path), tc.ct, tc.body); code != 200 || got != want {
			t.Errorf("POST %s %s: %d %s; want 200 %s", tc.path, tc.body, code, got, want)
		}
	}
	code, got := do(t, "POST", p.url("/example/nope"), "application/json", `{}`)
	if code != 500 || !strings.Contains(got, "unknown method Example.Nope") {
		t.Errorf("unknown method: %d %s; want 500 with the app's message", code, got)
	}
	// A field given twice is refused, as in a query, not half used.
	for _, tc := range []struct{ path, body, detail string }{
		{"/rpc", `service=go.micro.srv.example&service=x&method=Example.Call`, "service is given 2 times; give it once"},
		{"/example/call", `name=a&name=b`, "name is given 2 times; give it once"},
		{"/example/call", `John`, `body is neither JSON nor form fields: \"John\" is not name=value`},
	} {
		code, got := do(t, "POST", p.url(tc.path), "application/x-www-form-urlencoded", tc.body)
		if code != 400 || !strings.Contains(got, `"code":400`) || !strings.Contains(got, tc.detail) {
			t.Errorf("POST %s %s: %d %s; want 400 saying %s", tc.path, tc.body, code, got, tc.detail)
		}
	}
	_ = id
}

// TestRPCLoadBalancingAndFailures puts three app processes behind one
// service (one of them jsonrpclib-pelix in Python), spreads calls across
// them, kills one mid-run, and adds a hanging and a garbage-speaking node
// to other services.
func TestRPCLoadBalancingAndFailures(t *testing.T) {
	py := pythonJSONRPCApp(t, "py")
	goA, goB := goApp(t, "goA"), goApp(t, "goB")
	p := startSidecar(t, "--registry=memory", "--rpc_timeout=500ms", "--rpc_retries=2")
	for id, a := range map[string]*appProc{"py": py, "goA": goA, "goB": goB} {
		registerAddr(t, p, "go.micro.srv.greeter", id, a.addr)
	}

	var (
		mu      sync.Mutex // guards byNode, errs
		byNode  = map[string]int{}
		errs    []string
		killed  atomic.Bool
		ejected atomic.Bool // the killed node has been ejected
		stop    = make(chan struct{})
		wg      sync.WaitGroup
		calls   atomic.Int64
	)
	client := &http.Client{Timeout: 10 * time.Second}
	const workers = 4
	var errsAfterEjection atomic.Int32
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				after := ejected.Load()
				resp, err := client.Post(p.url("/greeter/example/call"), "application/json", strings.NewReader(fmt.Sprintf(`{"name":"w%d-%d"}`, w, i)))
				var body []byte
				if err == nil {
					body, _ = io.ReadAll(resp.Body)
					resp.Body.Close()
				}
				calls.Add(1)
				var r struct{ Msg string }
				if err != nil || resp.StatusCode != 200 || json.Unmarshal(body, &r) != nil {
					mu.Lock()
					errs = append(errs, fmt.Sprintf("%v %s", err, body))
					mu.Unlock()
					if after {
						errsAfterEjection.Add(1)
					}
					continue
				}
				node, _, _ := strings.Cut(r.Msg, ":")
				mu.Lock()
				if !killed.Load() {
					byNode[node]++
				}
				mu.Unlock()
			}
		}()
	}
	defer func() { close(stop); wg.Wait() }()

	waitFor(t, 20*time.Second, "300 calls spread over the three nodes", func() bool { return calls.Load() >= 300 })
	mu.Lock()
	spread := fmt.Sprint(byNode)
	for _, n := range []string{"py", "goA", "goB"} {
		if byNode[n] < 50 {
			t.Errorf("node %s served %d of the first calls (%s); want round robin to spread them", n, byNode[n], spread)
		}
	}
	mu.Unlock()

	killed.Store(true)
	goB.cmd.Process.Signal(syscall.SIGKILL)
	<-goB.done
	ejections := regexp.MustCompile(`node ejected.*address=` + regexp.QuoteMeta(goB.addr))
	waitFor(t, 10*time.Second, "the killed node to be ejected", func() bool { return ejections.MatchString(p.log.String()) })
	ejected.Store(true)
	// Past the first backoff the node is tried again, refused, retried
	// elsewhere and ejected for longer: still no error for the callers.
	waitFor(t, 10*time.Second, "the killed node to be tried again and ejected again", func() bool {
		return len(ejections.FindAllString(p.log.String(), -1)) >= 2
	})
	n := calls.Load()
	waitFor(t, 10*time.Second, "100 more calls", func() bool { return calls.Load() >= n+100 })
	close(stop)
	wg.Wait()
	stop = make(chan struct{})
	mu.Lock()
	t.Logf("spread before the kill: %s; %d calls in all; %d errors, all before the ejection: %v", spread, calls.Load(), len(errs), errs)
	// Each connection to the killed node fails at most one call, which may
	// have reached the app and is not retried: one per worker in flight at
	// the kill, and one per kept-alive connection picked from the pool
	// before the node's close reached it (a close seen in time is dialed
	// around, not failed). A node closing kept-alive connections is no
	// cause to eject it, so those may outnumber the workers in flight.
	if len(errs) > 2*workers {
		t.Errorf("%d calls failed around the kill; want at most %d: one per connection the %d workers held to it", len(errs), 2*workers, workers)
	}
	mu.Unlock()
	if n := errsAfterEjection.Load(); n > 0 {
		t.Errorf("%d calls failed after the killed node was ejected; want none", n)
	}

	// A node that hangs: the deadline is honoured with a 504, a Timeout
	// header shortens it.
	// Each case has its own node, since a node that times out under the
	// default deadline is ejected.
	release := make(chan struct{})
	defer close(release)
	for i, tc := range []struct {
		timeout string
		want    time.Duration
	}{{"", 500 * time.Millisecond}, {"200ms", 200 * time.Millisecond}, {"100000000", 100 * time.Millisecond}} {
		hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.ReadAll(r.Body) // so that the server notices the sidecar hanging up
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}))
		defer hang.Close()
		service := fmt.Sprintf("hang%d", i)
		registerAddr(t, p, "go.micro.srv."+service, service, hostOf(hang))
		req, _ := http.NewRequest("POST", p.url("/"+service+"/call"), strings.NewReader("{}"))
		if tc.timeout != "" {
			req.Header.Set("Timeout", tc.timeout)
		}
		start := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		took := time.Since(start)
		if resp.StatusCode != 504 || took < tc.want || took > tc.want+2*time.Second {
			t.Errorf("hanging node, Timeout %q: %d %s after %v; want 504 after %v", tc.timeout, resp.StatusCode, body, took, tc.want)
		}
	}

	// A node that answers garbage: 502 naming what came back.
	garbage := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		io.WriteString(w, "<h1>It works!</h1>")
	}))
	defer garbage.Close()
	registerAddr(t, p, "go.micro.srv.garbage", "garbage-1", hostOf(garbage))
	code, body := do(t, "POST", p.url("/garbage/call"), "application/json", "{}")
	var e errorBody
	json.Unmarshal([]byte(body), &e)
	if code != 502 || !strings.Contains(e.Detail, `answered 200 OK with text/html "<h1>It works!</h1>"`) {
		t.Errorf("garbage: %d %s; want 502 naming the HTML that came back", code, body)
	}
	code, body = do(t, "POST", p.url("/nothere/call"), "application/json", "{}")
	if code != 404 {
		t.Errorf("unknown service: %d %s; want 404", code, body)
	}
}

// TestProxyThroughBinary streams server-sent events through the built
// sidecar: the client has the first event before the app sends the second.
func TestProxyThroughBinary(t *testing.T) {
	next := make(chan struct{})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprintf(w, "data: one %s\n\n", r.Header.Get("X-Forwarded-For"))
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: two\n\n")
	}))
	defer app.Close()
	p := startSidecar(t, "--registry=memory", "--handler=proxy")
	registerAddr(t, p, "go.micro.srv.events", "ev-1", hostOf(app))
	for _, path := range []string{"/proxy/go.micro.srv.events/stream", "/events/stream"} {
		resp, err := http.Get(p.url(path))
		if err != nil {
			t.Fatal(err)
		}
		rd := bufio.NewReader(resp.Body)
		line, err := rd.ReadString('\n')
		if err != nil || line != "data: one 127.0.0.1\n" {
			t.Fatalf("GET %s: first event %q, %v; want it before the second is sent, with X-Forwarded-For", path, line, err)
		}
		next <- struct{}{}
		rest, _ := io.ReadAll(rd)
		resp.Body.Close()
		if string(rest) != "\ndata: two\n\n" {
			t.Errorf("GET %s: rest %q", path, rest)
		}
	}
}

// TestProxyPassesAKnownLengthAnswerAsItComes: an answer of stated length
// over 4 KiB that the node sends slowly reaches the caller as it comes,
// head first, on the direct path too: it held the head back until the
// whole body or 64 KiB of it had come. So does it through ReverseProxy (a
// client taking trailers, a large upload), which held it back in net/http's
// 4 KiB or the fast-path server's 64 KiB.
func TestProxyPassesAKnownLengthAnswerAsItComes(t *testing.T) {
	next := make(chan struct{})
	first, rest := strings.Repeat("a", 6000), strings.Repeat("b", 14000)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Length", strconv.Itoa(len(first)+len(rest)))
		io.WriteString(w, first)
		w.(http.Flusher).Flush()
		select {
		case <-next:
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, rest)
	}))
	defer app.Close()
	defer close(next)
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "go.micro.srv.report", "r-1", hostOf(app))
	client := &http.Client{Timeout: 10 * time.Second} // a held-back answer fails here, not by hanging
	for _, tc := range []struct {
		name, method, body string
		header             map[string]string
	}{
		{"direct path", "GET", "", nil},
		{"ReverseProxy, through net/http", "GET", "", map[string]string{"TE": "trailers"}},
		{"ReverseProxy, a large upload", "POST", strings.Repeat("u", 70000), nil},
	} {
		req, _ := http.NewRequest(tc.method, p.url("/proxy/go.micro.srv.report/slow"), strings.NewReader(tc.body))
		for k, v := range tc.header {
			req.Header.Set(k, v)
		}
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s: the head while the node holds the rest of its body: %v", tc.name, err)
		}
		got := make([]byte, len(first))
		if _, err := io.ReadFull(resp.Body, got); err != nil || string(got) != first {
			t.Fatalf("%s: the body's first part: %v", tc.name, err)
		}
		select {
		case next <- struct{}{}:
		case <-time.After(10 * time.Second): // fail, not hang, when the handler is gone
			t.Fatalf("%s: the node's handler gave up before the rest of its body: its request was cancelled", tc.name)
		}
		if all, err := io.ReadAll(resp.Body); err != nil || string(all) != rest {
			t.Errorf("%s: the rest: %d bytes, %v; want %d", tc.name, len(all), err, len(rest))
		}
		resp.Body.Close()
	}
}

// TestBinaryServesFastAndHandedOffRequests drives one keep-alive
// connection to the binary with a request its own server answers, one it
// hands to net/http (a client that takes trailers), and more after that:
// all are answered, in order, on the same connection. A chunked request
// there is answered and the connection closed after it (net/http would
// hide a Content-Length beside its Transfer-Encoding: see
// closeAfterUnsureFraming).
func TestBinaryServesFastAndHandedOffRequests(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	rc := dialHTTP(t, p.addr)
	svc := `{"name":"handed","nodes":[{"id":"h1","address":"127.0.0.1","port":9}]}`
	rc.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	rc.send(fmt.Sprintf("POST /registry HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nContent-Length: %d\r\n\r\n%s", len(svc), svc))
	rc.send("GET /registry?service=handed HTTP/1.1\r\nHost: x\r\n\r\n")
	rc.send("HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
	rc.send(fmt.Sprintf("POST /registry HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n", len(svc), svc))
	rc.send("GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
	for i, want := range []struct {
		method, contains string
	}{{"GET", `"status":"ok"`}, {"POST", ""}, {"GET", `"id":"h1"`}, {"HEAD", ""}, {"POST", ""}} {
		resp, body, err := rc.read(want.method)
		if err != nil || resp.StatusCode != 200 && resp.StatusCode != 201 || !strings.Contains(body, want.contains) {
			t.Fatalf("answer %d (%s): %v %q %v; want 2xx with %q", i, want.method, resp, body, err, want.contains)
		}
		if last := i == 4; resp.Close != last {
			t.Errorf("answer %d (%s): Connection: close %v; want %v", i, want.method, resp.Close, last)
		}
	}
	// Closed with the pipelined request unread: an EOF, or a reset.
	if b, err := rc.br.ReadByte(); err == nil {
		t.Errorf("the connection is still open after the chunked request's answer: read %q", b)
	}
}

// blackholeAddr returns the address of a listener whose accept queue is
// full: a connection attempt to it hangs, its SYNs dropped, as one to a
// dead host does.
func blackholeAddr(t *testing.T) string {
	_, addr := fullQueue(t)
	return addr
}

// fullQueue returns a listening socket, never accepted from, whose accept
// queue is full, and its address.
func fullQueue(t *testing.T) (fd int, addr string) {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	port := sa.(*syscall.SockaddrInet4).Port
	for range 4 { // fill the queue, never accepted
		c, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Close(c) })
		syscall.Connect(c, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}, Port: port})
	}
	return fd, fmt.Sprintf("127.0.0.1:%d", port)
}

// listenerOf returns a listener on a copy of the listening socket fd, which
// stays the caller's.
func listenerOf(t *testing.T, fd int) net.Listener {
	t.Helper()
	d, err := syscall.Dup(fd) // an os.File closes its descriptor, at the latest when collected
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(d), "listener")
	defer f.Close()
	ln, err := net.FileListener(f) // on a copy of its own
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// synsWaiting counts the connections to addr's port, from this network
// namespace, whose SYN is unanswered (state SYN_SENT in /proc/net/tcp):
// dropped at a full accept queue, on loopback.
func synsWaiting(t *testing.T, addr string) int {
	t.Helper()
	_, port, _ := net.SplitHostPort(addr)
	p, _ := strconv.Atoi(port)
	table, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("no /proc/net/tcp to see SYNs in: %v", err)
	}
	n := 0
	for _, line := range strings.Split(string(table), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && f[3] == "02" && strings.HasSuffix(f[2], fmt.Sprintf(":%04X", p)) {
			n++
		}
	}
	return n
}

// TestBusyNodeIsReachedByTheNextSYN: a node whose accept queue is full
// when a call connects (a burst of calls to Python's servers, which listen
// with a backlog of 5) drops the SYN, and the kernel sends it again 1 s
// later; a node accepting by then answers the call. The connection
// attempt gave up at 1 s, and the node, healthy, was ejected, failing
// every call for the ejection's time.
func TestBusyNodeIsReachedByTheNextSYN(t *testing.T) {
	fd, addr := fullQueue(t)
	before := synsWaiting(t, addr)
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "go.micro.srv.busy", "b1", addr)
	answer := make(chan string, 1)
	go func() {
		code, body := post(t, p.url("/rpc"), "application/json", `{"service":"go.micro.srv.busy","method":"A.B","request":{}}`)
		answer <- fmt.Sprint(code, " ", body)
	}()
	waitFor(t, 5*time.Second, "the call's SYN to be dropped", func() bool { return synsWaiting(t, addr) > before })
	ln := listenerOf(t, fd)
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":"took it"}`)
	}))
	select {
	case got := <-answer:
		if got != `200 "took it"` {
			t.Errorf("the call: %s; want the node's answer", got)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no answer")
	}
	if strings.Contains(p.log.String(), "node ejected") {
		t.Errorf("the busy node was ejected:\n%s", p.log.String())
	}
}

// TestConnectLogTellsABusyNodeFromADeadOne: a connection attempt that
// times out while the node accepted another is a busy node's, which is not
// ejected; one to a node that accepted none is a dead host's.
func TestConnectLogTellsABusyNodeFromADeadOne(t *testing.T) {
	fd, addr := fullQueue(t)
	l := newConnectLog()
	before := synsWaiting(t, addr)
	failed := make(chan error, 1)
	go func() {
		_, err := l.dial(context.Background(), &net.Dialer{Timeout: 1500 * time.Millisecond}, addr)
		failed <- err
	}()
	waitFor(t, 5*time.Second, "the attempt's SYN to be dropped", func() bool { return synsWaiting(t, addr) > before })
	nfd, _, err := syscall.Accept(fd) // room for one more, which the next attempt takes
	if err != nil {
		t.Fatal(err)
	}
	syscall.Close(nfd)
	c, err := l.dial(context.Background(), &net.Dialer{Timeout: time.Second}, addr)
	if err != nil {
		t.Fatalf("the attempt after room was made: %v", err)
	}
	defer c.Close()
	if err := <-failed; err == nil || ejectsNotSent(err) || !strings.Contains(err.Error(), "accept queue is full") {
		t.Errorf("the attempt while another was accepted: %v; want a busy node, not ejected", err)
	}
	_, dead := fullQueue(t)
	if _, err := l.dial(context.Background(), &net.Dialer{Timeout: 300 * time.Millisecond}, dead); err == nil || !ejectsNotSent(err) {
		t.Errorf("an attempt to a node that accepted none: %v; want a plain timeout, ejected", err)
	}
}

// TestDeadHostIsSkipped: a node whose connection attempt hangs (a dead
// host) is given up on after the connect timeout, ejected, and the call
// answered by another node, with the default deadline and with a short
// Timeout alike; before, the attempt used the whole deadline and the call
// ended in a 504 that no other node was asked to spare.
func TestDeadHostIsSkipped(t *testing.T) {
	dead := blackholeAddr(t)
	probe := net.Dialer{Timeout: 300 * time.Millisecond}
	if c, err := probe.Dial("tcp", dead); err == nil {
		c.Close()
		t.Skip("this kernel accepts past a full queue; no dead host to test with")
	}
	good := newJSONRPCApp(t, "good")
	for _, timeout := range []string{"", "1s"} {
		p := startSidecar(t, "--registry=memory")
		registerAddr(t, p, "go.micro.srv.s", "dead", dead)
		registerAddr(t, p, "go.micro.srv.s", "good", good.addr())
		for i := range 4 {
			req, _ := http.NewRequest("POST", p.url("/rpc"), strings.NewReader("service=go.micro.srv.s&method=A.B"))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			if timeout != "" {
				req.Header.Set("Timeout", timeout)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || !strings.Contains(string(body), `"node":"good"`) {
				t.Errorf("Timeout %q, call %d: %d %s; want the good node's answer", timeout, i, resp.StatusCode, body)
			}
		}
		if !regexp.MustCompile(`node ejected.*node=dead`).MatchString(p.log.String()) {
			t.Errorf("Timeout %q: the dead node was not ejected:\n%s", timeout, p.log.String())
		}
	}
}

// TestProxyEndsABodyThatStops: a node that sends its head and part of its
// body, then nothing, has its answer cut off after --idle_timeout, on the
// direct path and ReverseProxy's alike: the caller gets a broken body, not
// a wait for ever, and the in-flight slot comes back.
func TestProxyEndsABodyThatStops(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var held sync.WaitGroup
	release := make(chan struct{})
	defer func() { close(release); held.Wait() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held.Add(1)
			go func() {
				defer held.Done()
				defer c.Close()
				bufio.NewReader(c).ReadString('\n') // the request line; the rest does not matter
				io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
				<-release // and then nothing
			}()
		}
	}()
	good := newJSONRPCApp(t, "good")
	p := startSidecar(t, "--registry=memory", "--idle_timeout=1s", "--max_inflight=1")
	registerAddr(t, p, "stall", "s1", ln.Addr().String())
	registerAddr(t, p, "good", "g1", good.addr())
	client := &http.Client{Timeout: 20 * time.Second}
	for _, headers := range []map[string]string{nil, {"TE": "trailers"}} { // the direct path, ReverseProxy's
		req, _ := http.NewRequest("GET", p.url("/proxy/stall/"), nil)
		for k, v := range headers {
			req.Header.Set(k, v)
		}
		// The caller learns the answer broke: on the direct path, which
		// reads a small body before passing its head on, as a 502; through
		// ReverseProxy as a cut body, or, when the sidecar had not sent its
		// head yet, as a closed connection.
		start := time.Now()
		resp, err := client.Do(req)
		var body []byte
		if err == nil {
			body, err = io.ReadAll(resp.Body)
			resp.Body.Close()
		}
		broke := err != nil && !strings.Contains(err.Error(), "Client.Timeout")
		if headers == nil {
			broke = err == nil && resp.StatusCode == http.StatusBadGateway && strings.Contains(string(body), "broke off")
		}
		if !broke || time.Since(start) > 15*time.Second {
			t.Errorf("%v: %v %s after %v; want the answer to break within seconds", headers, err, body, time.Since(start))
		}
		waitFor(t, 5*time.Second, "the in-flight slot to come back", func() bool {
			code, _ := do(t, "GET", p.url("/proxy/good/"), "", "")
			return code == 200
		})
	}
}

// TestTimeoutSentIsTheTimeLeft: the Timeout a node is told is what is left
// of the caller's deadline, which counts from the end of a slow upload;
// before, the upload's time was added to it, and the node worked on past
// the point where the sidecar had given up on it.
func TestTimeoutSentIsTheTimeLeft(t *testing.T) {
	told := make(chan string, 1)
	node := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		told <- r.Header.Get("Timeout")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
	}))
	defer node.Close()
	p := startSidecar(t, "--registry=memory")
	registerAddr(t, p, "go.micro.srv.slow", "s1", strings.TrimPrefix(node.URL, "http://"))
	c, err := net.Dial("tcp", p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	body := `service=go.micro.srv.slow&method=Slow.Upload&request={}`
	fmt.Fprintf(c, "POST /rpc HTTP/1.1\r\nHost: x\r\nTimeout: 1s\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n\r\n", len(body))
	time.Sleep(400 * time.Millisecond) // the upload is slow: part of the scenario, not a wait
	io.WriteString(c, body)
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	ns, err := time.ParseDuration(<-told + "ns")
	if resp.StatusCode != 200 || err != nil || ns > time.Second || ns < 500*time.Millisecond {
		t.Errorf("status %d; the node was told %v (%v); want at most the caller's 1s", resp.StatusCode, ns, err)
	}
}

// TestNodeRefusingALargeCallIsNoFailingNode: a node that answers a call
// too large for it as soon as its head arrives, and closes with the rest
// unread, resets the connection under the sidecar's write. Its answer is
// the call's when it survived the reset; either way the node answered, and
// is not ejected: one caller's large calls must not take a service out for
// everyone.
func TestNodeRefusingALargeCallIsNoFailingNode(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--max_body_bytes=16777216")
	refusing := rawHeadNode(t, "HTTP/1.1 413 Content Too Large\r\nContent-Type: text/plain\r\nContent-Length: 8\r\nConnection: close\r\n\r\ntoo big\n")
	registerAddr(t, p, "small", "s1", refusing)
	body := `{"service":"small","method":"A.B","request":{"d":"` + strings.Repeat("x", 8<<20) + `"}}`
	answers := 0
	for i := range 8 {
		code, out := do(t, "POST", p.url("/rpc"), "application/json", body)
		switch {
		case code == http.StatusBadGateway && strings.Contains(out, "answered 413"):
			answers++
		case code == http.StatusBadGateway && strings.Contains(out, "while the request body was being sent"):
		default:
			t.Errorf("call %d: %d %s; want the node's 413 reported, or a 502 saying the node stopped reading", i, code, out)
		}
	}
	if code, out := do(t, "POST", p.url("/rpc"), "application/json", `{"service":"small","method":"A.B"}`); code != http.StatusRequestEntityTooLarge && code != http.StatusBadGateway {
		t.Errorf("a small call after them: %d %s; want the node reached", code, out)
	}
	if strings.Contains(p.log.String(), "node ejected") {
		t.Errorf("a node that answered was ejected:\n%s", p.log.String())
	}
	t.Logf("%d of 8 calls got the node's answer", answers)
}

// TestProxySmallAnswerMayTrickle: a small answer of stated length, which
// the direct path reads whole before passing its head on, may take longer
// than --idle_timeout in all as long as it never pauses that long, as a
// streamed one may.
func TestProxySmallAnswerMayTrickle(t *testing.T) {
	piece := strings.Repeat("t", 10)
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Length", strconv.Itoa(100*len(piece)))
		for range 100 { // 10 bytes every 10 ms: a second in all, never a pause of 300 ms
			io.WriteString(w, piece)
			w.(http.Flusher).Flush()
			time.Sleep(10 * time.Millisecond) // the app's pace, not a wait in the test
		}
	}))
	defer app.Close()
	p := startSidecar(t, "--registry=memory", "--idle_timeout=300ms")
	registerAddr(t, p, "trickle", "t1", hostOf(app))
	code, body := do(t, "GET", p.url("/proxy/trickle/x"), "", "")
	if code != http.StatusOK || body != strings.Repeat(piece, 100) {
		t.Errorf("%d, %d bytes %.80q; want 200 and the whole answer", code, len(body), body)
	}
}
