package main

// End-to-end tests of the broker: the built binary, real WebSocket clients
// (x/net/websocket, a raw client that sees close codes, and Debian's
// python3-websockets), several sidecars sharing a file registry.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// collector gathers the events one x/net/websocket subscriber receives.
type collector struct {
	name string
	ws   *websocket.Conn

	mu     sync.Mutex // guards events, counts
	events []cloudEvent
	counts map[string]int // by data
}

// subscribeWS connects a subscriber to p's /broker with query and collects
// what it receives until the test ends.
func subscribeWS(t *testing.T, p *proc, name, query string) *collector {
	t.Helper()
	ws, err := websocket.Dial("ws://"+p.addr+"/broker?"+query, "", "http://"+p.addr)
	if err != nil {
		t.Fatalf("subscriber %s: %v", name, err)
	}
	c := &collector{name: name, ws: ws, counts: map[string]int{}}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			var ev cloudEvent
			if err := websocket.JSON.Receive(ws, &ev); err != nil {
				return
			}
			var data string
			if json.Unmarshal(ev.Data, &data) != nil {
				data = string(ev.Data)
			}
			c.mu.Lock()
			c.events = append(c.events, ev)
			c.counts[data]++
			c.mu.Unlock()
		}
	}()
	t.Cleanup(func() { ws.Close(); <-done })
	return c
}

func (c *collector) total() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.events)
}

// publish POSTs body to topic on p and returns the message id.
func publish(t *testing.T, p *proc, topic, contentType, body string) string {
	t.Helper()
	code, out := do(t, "POST", p.url("/broker?topic="+topic), contentType, body)
	var a publishAnswer
	if code != http.StatusOK || json.Unmarshal([]byte(out), &a) != nil || a.ID == "" {
		t.Fatalf("publish to %s: %d %s", topic, code, out)
	}
	return a.ID
}

func brokerStatsOf(t *testing.T, p *proc) brokerStatsReport {
	t.Helper()
	code, body := do(t, "GET", p.url("/broker/stats"), "", "")
	var st brokerStatsReport
	if code != http.StatusOK || json.Unmarshal([]byte(body), &st) != nil {
		t.Fatalf("/broker/stats: %d %s", code, body)
	}
	return st
}

func waitSubscribers(t *testing.T, p *proc, n int) {
	t.Helper()
	waitFor(t, 10*time.Second, fmt.Sprintf("%d subscribers on %s", n, p.addr), func() bool { return brokerStatsOf(t, p).Subscribers == n })
}

// TestBrokerSeedExample follows the seed README: a client subscribes to
// foo, writes "hello world" on a ticker, and reads back each message.
func TestBrokerSeedExample(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	c, err := websocket.Dial("ws://"+p.addr+"/broker?topic=foo", "", "http://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	got := make(chan cloudEvent, 16)
	go func() {
		for {
			var p []byte
			if err := websocket.Message.Receive(c, &p); err != nil {
				close(got)
				return
			}
			var msg cloudEvent
			json.Unmarshal(p, &msg)
			got <- msg
		}
	}()
	ticker := time.NewTicker(20 * time.Millisecond)
	defer ticker.Stop()
	deadline := time.After(10 * time.Second)
	for n := 0; n < 3; {
		select {
		case <-ticker.C:
			if _, err := c.Write([]byte(`hello world`)); err != nil {
				t.Fatal(err)
			}
		case msg, ok := <-got:
			if !ok {
				t.Fatal("connection ended")
			}
			n++
			if msg.SpecVersion != "1.0" || msg.Type != "micro.broker.message" || msg.Topic != "foo" || msg.ID == "" ||
				msg.DataContentType != "text/plain" || string(msg.Data) != `"hello world"` || !strings.HasPrefix(msg.Source, "/micro/sidecar-") {
				t.Errorf("event %+v; want a CloudEvent of topic foo with data \"hello world\"", msg)
			}
			if _, err := time.Parse(time.RFC3339Nano, msg.Time); err != nil {
				t.Errorf("time %q: %v", msg.Time, err)
			}
		case <-deadline:
			t.Fatalf("got %d of 3 messages in 10s", n)
		}
	}
}

func TestBrokerPublishFormats(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	sub := subscribeWS(t, p, "s", "topic=formats")
	waitSubscribers(t, p, 1)
	id := publish(t, p, "formats", "application/json", `{"n": 1}`)
	publish(t, p, "formats", "text/plain; charset=utf-8", "héllo")
	publish(t, p, "formats", "application/octet-stream", "\x00\x01")
	if err := websocket.Message.Send(sub.ws, []byte{0xff, 0}); err != nil { // a binary frame
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "four events", func() bool { return sub.total() == 4 })
	sub.mu.Lock()
	defer sub.mu.Unlock()
	want := []struct{ dct, data, b64 string }{
		{"application/json", `{"n":1}`, ""},
		{"text/plain; charset=utf-8", `"héllo"`, ""},
		{"application/octet-stream", "", "AAE="},
		{"application/octet-stream", "", "/wA="},
	}
	for i, w := range want {
		ev := sub.events[i]
		b64 := ""
		if ev.DataBase64 != nil {
			b64 = *ev.DataBase64
		}
		if ev.DataContentType != w.dct || string(ev.Data) != w.data || b64 != w.b64 {
			t.Errorf("event %d: %s %s %s; want %s %s %s", i, ev.DataContentType, ev.Data, b64, w.dct, w.data, w.b64)
		}
	}
	if sub.events[0].ID != id {
		t.Errorf("POST answered id %s; the event carries %s", id, sub.events[0].ID)
	}
}

// checkExactlyOnce fails unless each broadcast collector got every message
// in want exactly once, and each group's members together did.
func checkExactlyOnce(t *testing.T, want []string, broadcast []*collector, groups map[string][]*collector) {
	t.Helper()
	for _, c := range broadcast {
		c.mu.Lock()
		for _, m := range want {
			if c.counts[m] != 1 {
				t.Errorf("broadcast subscriber %s got %q %d times; want once", c.name, m, c.counts[m])
			}
		}
		if len(c.events) != len(want) {
			t.Errorf("broadcast subscriber %s got %d messages; want %d", c.name, len(c.events), len(want))
		}
		c.mu.Unlock()
	}
	for g, members := range groups {
		total := map[string]int{}
		for _, c := range members {
			c.mu.Lock()
			if len(c.events) == 0 {
				t.Errorf("group %s member %s got nothing; want the group's messages spread", g, c.name)
			}
			for m, n := range c.counts {
				total[m] += n
			}
			c.mu.Unlock()
		}
		for _, m := range want {
			if total[m] != 1 {
				t.Errorf("group %s got %q %d times; want once", g, m, total[m])
			}
		}
		if len(total) != len(want) {
			t.Errorf("group %s got %d distinct messages; want %d", g, len(total), len(want))
		}
	}
}

func waitAll(t *testing.T, n int, broadcast []*collector, groups map[string][]*collector) {
	t.Helper()
	waitFor(t, 20*time.Second, "every message to arrive", func() bool {
		for _, c := range broadcast {
			if c.total() < n {
				return false
			}
		}
		for _, members := range groups {
			sum := 0
			for _, c := range members {
				sum += c.total()
			}
			if sum < n {
				return false
			}
		}
		return true
	})
}

func TestBrokerBroadcastAndGroupsOneSidecar(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	b1, b2 := subscribeWS(t, p, "b1", "topic=orders"), subscribeWS(t, p, "b2", "topic=orders")
	g := []*collector{subscribeWS(t, p, "g1", "topic=orders&queue=g"), subscribeWS(t, p, "g2", "topic=orders&queue=g"), subscribeWS(t, p, "g3", "topic=orders&queue=g")}
	h := []*collector{subscribeWS(t, p, "h1", "topic=orders&queue=h")}
	other := subscribeWS(t, p, "other", "topic=other")
	waitSubscribers(t, p, 7)
	var want []string
	for i := range 300 {
		m := fmt.Sprintf("m-%d", i)
		want = append(want, m)
		publish(t, p, "orders", "text/plain", m)
	}
	groups := map[string][]*collector{"g": g, "h": h}
	waitAll(t, len(want), []*collector{b1, b2}, groups)
	checkExactlyOnce(t, want, []*collector{b1, b2}, groups)
	if other.total() != 0 {
		t.Errorf("a subscriber of another topic got %d messages", other.total())
	}
	for _, c := range g {
		if n := c.total(); n < 60 || n > 140 {
			t.Errorf("group member %s got %d of 300; want about a third", c.name, n)
		}
	}
}

// TestBrokerAcrossThreeSidecars: subscribers on three sidecars sharing a
// file registry; messages published on each reach every broadcast
// subscriber once and every queue group once, wherever its members are.
func TestBrokerAcrossThreeSidecars(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	var ps []*proc
	for range 3 {
		ps = append(ps, startSidecar(t, "--registry=file", "--registry_address="+file))
	}
	a, b, c := ps[0], ps[1], ps[2]
	broadcast := []*collector{subscribeWS(t, a, "A.b1", "topic=t"), subscribeWS(t, a, "A.b2", "topic=t"), subscribeWS(t, b, "B.b1", "topic=t")}
	groups := map[string][]*collector{
		"g": {subscribeWS(t, a, "A.g1", "topic=t&queue=g"), subscribeWS(t, b, "B.g1", "topic=t&queue=g"), subscribeWS(t, b, "B.g2", "topic=t&queue=g")},
		"h": {subscribeWS(t, b, "B.h1", "topic=t&queue=h"), subscribeWS(t, c, "C.h1", "topic=t&queue=h")},
	}
	// A: broadcast and g; B: broadcast, g and h; C: h.
	for _, p := range ps {
		waitFor(t, 10*time.Second, "every topic registration on "+p.addr, func() bool {
			s := lookup(t, p, "topic:t")
			return s != nil && len(s.Nodes) == 6
		})
	}
	var want []string
	for i := range 100 {
		for j, p := range ps {
			m := fmt.Sprintf("%c-%d", 'A'+j, i)
			want = append(want, m)
			publish(t, p, "t", "text/plain", m)
		}
	}
	waitAll(t, len(want), broadcast, groups)
	checkExactlyOnce(t, want, broadcast, groups)
	for _, p := range ps {
		if st := brokerStatsOf(t, p); st.ForwardDropped != 0 || st.NoSubscriber != 0 || st.SlowClosed != 0 {
			t.Errorf("sidecar %s lost messages: %+v", p.addr, st)
		}
	}

	// The last local subscriber of a group leaving takes the registration.
	groups["h"][1].ws.Close()
	waitFor(t, 10*time.Second, "C's registration for h to go", func() bool {
		s := lookup(t, a, "topic:t")
		return s != nil && len(s.Nodes) == 5
	})
}

// TestBrokerSlowSubscriberDoesNotSlowOthers: a subscriber that stops
// reading is closed once its queue overflows, and the others get every
// message meanwhile.
func TestBrokerSlowSubscriberDoesNotSlowOthers(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_queue_size=64", "--broker_queue_bytes=1048576")
	stuck := dialRaw(t, p.addr, "/broker?topic=flood") // never reads
	fast := []*collector{subscribeWS(t, p, "f1", "topic=flood"), subscribeWS(t, p, "f2", "topic=flood"), subscribeWS(t, p, "f3", "topic=flood")}
	waitSubscribers(t, p, 4)
	// 3000 messages of 8 KB: more than the loopback socket buffers and the
	// queue can hold for the stuck one.
	pad := strings.Repeat("x", 8<<10)
	var want []string
	start := time.Now()
	for i := range 3000 {
		m := fmt.Sprintf("%d-%s", i, pad)
		want = append(want, m)
		publish(t, p, "flood", "text/plain", m)
	}
	waitAll(t, len(want), fast, nil)
	t.Logf("3000 messages of 8 KB reached 3 fast subscribers in %v", time.Since(start))
	checkExactlyOnce(t, want, fast, nil)
	st := brokerStatsOf(t, p)
	if st.SlowClosed != 1 || st.SlowDropped == 0 {
		t.Errorf("stats %+v; want one slow subscriber closed and its messages counted", st)
	}
	waitSubscribers(t, p, 3)
	stuck.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, stuck.br); err != nil && !strings.Contains(err.Error(), "reset") {
		t.Errorf("the slow subscriber's connection did not end: %v", err)
	}
	if !strings.Contains(p.log.String(), "closing a slow broker subscriber") {
		t.Error("closing a slow subscriber is not logged")
	}
	// The log tells what the stats count: the queue and the message that
	// overflowed it.
	if want := fmt.Sprintf("dropped=%d ", st.SlowDropped); !strings.Contains(p.log.String(), want) {
		t.Errorf("the log does not say %q, as /broker/stats counts:\n%s", want, p.log.String())
	}
}

// blackhole forwards one connection to addr until vanish is called; then it
// drops everything both ways without closing either side, like a peer whose
// machine went away.
type blackhole struct {
	addr     string
	vanished chan struct{}
	upEnded  chan struct{} // the sidecar closed its side
	once     sync.Once
}

func newBlackhole(t *testing.T, target string) *blackhole {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	bh := &blackhole{addr: ln.Addr().String(), vanished: make(chan struct{}), upEnded: make(chan struct{})}
	go func() {
		down, err := ln.Accept()
		if err != nil {
			return
		}
		up, err := net.Dial("tcp", target)
		if err != nil {
			down.Close()
			return
		}
		t.Cleanup(func() { down.Close(); up.Close() })
		pipe := func(dst, src net.Conn, ended chan struct{}) {
			buf := make([]byte, 32<<10)
			for {
				n, err := src.Read(buf)
				if err != nil {
					if ended != nil {
						close(ended)
					}
					return
				}
				select {
				case <-bh.vanished:
				default:
					dst.Write(buf[:n])
				}
			}
		}
		go pipe(up, down, nil)
		go pipe(down, up, bh.upEnded)
	}()
	return bh
}

func (bh *blackhole) vanish() { bh.once.Do(func() { close(bh.vanished) }) }

// TestBrokerReapsVanishedSubscriber: a subscriber whose connection goes
// silent without a close is pinged, then closed; a live idle one stays.
func TestBrokerReapsVanishedSubscriber(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_ping_interval=100ms")
	bh := newBlackhole(t, p.addr)
	gone, err := websocket.Dial("ws://"+bh.addr+"/broker?topic=foo", "", "http://"+bh.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer gone.Close()
	alive := subscribeWS(t, p, "alive", "topic=foo") // reads, so it answers pings
	waitSubscribers(t, p, 2)
	bh.vanish()
	start := time.Now()
	select {
	case <-bh.upEnded:
	case <-time.After(10 * time.Second):
		t.Fatal("the sidecar did not close a vanished subscriber within 10s")
	}
	t.Logf("vanished subscriber reaped after %v (ping interval 100ms)", time.Since(start))
	waitSubscribers(t, p, 1)
	if st := brokerStatsOf(t, p); st.Reaped != 1 {
		t.Errorf("stats %+v; want one reaped and the live subscriber kept", st)
	}
	publish(t, p, "foo", "", "still here")
	waitFor(t, 5*time.Second, "the live subscriber to get a message", func() bool { return alive.total() == 1 })
}

// TestBrokerPythonClient: a client we did not write, Debian's
// python3-websockets, subscribes, publishes and receives.
func TestBrokerPythonClient(t *testing.T) {
	if err := exec.Command("/usr/bin/python3", "-c", "import websockets").Run(); err != nil {
		t.Skipf("Debian's python3-websockets is not importable by /usr/bin/python3 (%v); apt-get install python3-websockets", err)
	}
	p := startSidecar(t, "--registry=memory")
	script := `
import asyncio, sys, websockets
async def main(url):
    async with websockets.connect(url) as ws:
        print("ready", flush=True)
        await ws.send("hello from python")
        for _ in range(2):
            print(await asyncio.wait_for(ws.recv(), 10), flush=True)
asyncio.run(main(sys.argv[1]))
`
	cmd := exec.Command("/usr/bin/python3", "-c", script, "ws://"+p.addr+"/broker?topic=py")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sc := bufio.NewScanner(out)
	sc.Buffer(nil, 1<<20)
	if !sc.Scan() || sc.Text() != "ready" {
		t.Fatalf("python client did not connect: %q %s", sc.Text(), stderr.String())
	}
	publish(t, p, "py", "application/json", `{"from":"go"}`)
	seen := map[string]bool{}
	for range 2 {
		if !sc.Scan() {
			t.Fatalf("python client ended early: %s", stderr.String())
		}
		var ev cloudEvent
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Topic != "py" {
			t.Fatalf("python client got %q: %v", sc.Text(), err)
		}
		seen[string(ev.Data)] = true
	}
	if !seen[`"hello from python"`] || !seen[`{"from":"go"}`] {
		t.Errorf("python client saw %v; want its own frame and the POSTed JSON", seen)
	}
	if err := cmd.Wait(); err != nil {
		t.Errorf("python client: %v %s", err, stderr.String())
	}
}

func TestBrokerBadInput(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_max_payload_bytes=1000")
	upgrade := map[string]string{"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
	for _, tc := range []struct {
		method, path, body string
		header             map[string]string
		code               int
		detail             string
	}{
		{"GET", "/broker", "", nil, 400, "topic is required"},
		{"GET", "/broker?topic=foo", "", nil, 400, "needs a WebSocket upgrade"},
		{"GET", "/broker", "", upgrade, 400, "topic is required"},
		{"GET", "/broker?topic=a%20b", "", upgrade, 400, `topic "a b"`},
		{"GET", "/broker?topic=foo&queue=a/b", "", upgrade, 400, `queue "a/b"`},
		{"GET", "/broker?topic=foo&queue=", "", upgrade, 400, "queue is empty"},
		{"GET", "/broker?topic=" + strings.Repeat("x", 201), "", upgrade, 400, "use 1 to 200"},
		{"GET", "/broker?topic=foo", "", map[string]string{"Upgrade": "websocket", "Connection": "Upgrade", "Origin": "http://evil.example"}, 403, "not allowed"},
		{"POST", "/broker", "x", nil, 400, "topic is required"},
		{"POST", "/broker?topic=foo&queue=g", "x", nil, 400, "queue is for subscribers"},
		{"POST", "/broker?topic=a&topic=b", "x", nil, 400, "topic is given 2 times"},
		{"POST", "/broker?topic=foo&qeue=g", "x", nil, 400, `query parameter "qeue" is not one POST /broker takes (it takes topic)`},
		{"GET", "/broker?topic=%zz", "", upgrade, 400, `invalid URL escape "%zz"`},
		{"POST", "/broker?topic=foo", strings.Repeat("x", 1001), nil, 413, "larger than 1000 bytes"},
		{"POST", "/broker?topic=foo", `{"a":`, map[string]string{"Content-Type": "application/json"}, 400, "not valid JSON"},
		{"POST", "/broker?topic=foo", "\"\xe9\"", map[string]string{"Content-Type": "application/json"}, 400, "is not UTF-8"},
		{"POST", "/broker", "garbage", map[string]string{forwardedHeader: "x"}, 400, "forwarded batch"},
		{"PUT", "/broker?topic=foo", "x", nil, 405, "method PUT not allowed"},
		{"POST", "/broker/stats", "", nil, 405, "not allowed"},
	} {
		t.Run(tc.method+" "+truncate(tc.path, 40), func(t *testing.T) {
			req, _ := http.NewRequest(tc.method, p.url(tc.path), strings.NewReader(tc.body))
			for k, v := range tc.header {
				req.Header.Set(k, v)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, _ := io.ReadAll(resp.Body)
			var e errorBody
			if err := json.Unmarshal(body, &e); err != nil {
				t.Fatalf("answer is not the error shape: %d %s", resp.StatusCode, body)
			}
			if resp.StatusCode != tc.code || e.Code != tc.code || e.ID != "go.micro.sidecar" || !strings.Contains(e.Detail, tc.detail) {
				t.Errorf("got %d %s; want %d with detail containing %q", resp.StatusCode, body, tc.code, tc.detail)
			}
		})
	}
	// An oversized frame closes the connection with 1009 and a reason.
	c := dialRaw(t, p.addr, "/broker?topic=foo")
	c.send(t, websocket.TextFrame, make([]byte, 1001))
	if code, reason := c.closeCode(t); code != closeTooBig || !strings.Contains(reason, "larger than 1000 bytes") {
		t.Errorf("oversized frame: close %d %q; want 1009", code, reason)
	}
}

// TestBrokerShutdown: SIGTERM sends every WebSocket a going-away close
// frame, removes the topic registrations and exits 0.
func TestBrokerShutdown(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file)
	other := startSidecar(t, "--registry=file", "--registry_address="+file)
	var clients []*rawWS
	for _, q := range []string{"topic=a", "topic=a&queue=g", "topic=b"} {
		clients = append(clients, dialRaw(t, p.addr, "/broker?"+q))
	}
	waitFor(t, 10*time.Second, "the registrations", func() bool {
		s := lookup(t, other, "topic:a")
		return s != nil && len(s.Nodes) == 2 && lookup(t, other, "topic:b") != nil
	})
	codes := make(chan int, len(clients))
	for _, c := range clients {
		go func() {
			code, _, err := c.readClose()
			if err != nil {
				t.Errorf("reading until the close frame: %v", err)
			}
			codes <- code
		}()
	}
	if code := p.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status %d; want 0", code)
	}
	for range clients {
		if code := <-codes; code != closeGoingAway {
			t.Errorf("close code %d on shutdown; want 1001", code)
		}
	}
	waitFor(t, time.Second, "the topic registrations to go", func() bool {
		return lookup(t, other, "topic:a") == nil && lookup(t, other, "topic:b") == nil
	})
}

// TestShutdownStopsListeningWhileAWebSocketDrains: once deregistered, a
// stopping sidecar stops listening, as README says, even while a
// subscriber that stopped reading holds its drain for the write timeout;
// it kept taking new connections (and registrations it then lost) until
// every WebSocket had closed.
func TestShutdownStopsListeningWhileAWebSocketDrains(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_queue_bytes=67108864")
	dialRaw(t, p.addr, "/broker?topic=stall") // reads nothing
	chunk := strings.Repeat("x", 256<<10)
	for i := range 100 { // more than the socket buffers hold: the subscriber's writer blocks
		if code, out := do(t, "POST", p.url("/broker?topic=stall"), "", chunk); code != 200 {
			t.Fatalf("publish %d: %d %s", i, code, out)
		}
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the listener to close", func() bool {
		c, err := net.DialTimeout("tcp", p.addr, time.Second)
		if err == nil {
			c.Close()
		}
		return err != nil
	})
	select {
	case <-p.done:
		t.Fatal("the sidecar exited before the stalled subscriber's drain ended; the test shows nothing")
	default:
	}
	p.stop(syscall.SIGTERM) // a second signal ends the drain
}

// TestWebSocketHandshakeErrors: a handshake the WebSocket library would
// refuse in plain text is refused in the error shape, a version other than
// 13 with 426 and the version to use; offered subprotocols are declined,
// not echoed as agreed or refused with an empty 400.
func TestWebSocketHandshakeErrors(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	const key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
	for _, path := range []string{"/broker?topic=hs", "/registry?watch=1"} {
		for _, tc := range []struct {
			headers string
			code    int
			detail  string
		}{
			{key + "Sec-WebSocket-Version: 8\r\n", 426, `WebSocket version \"8\" is not supported; use 13`},
			{"Sec-WebSocket-Version: 13\r\n", 400, "not a WebSocket handshake"},
			{"Sec-WebSocket-Key: not-base64!\r\nSec-WebSocket-Version: 13\r\n", 400, "Sec-WebSocket-Key must be one value, 16 bytes in base64"},
			{"Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n", 400, "16 bytes in base64"},
			{key + key + "Sec-WebSocket-Version: 13\r\n", 400, "must be one value"},
		} {
			rc := dialHTTP(t, p.addr)
			rc.send("GET " + path + " HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + tc.headers + "\r\n")
			resp, body, err := rc.read("GET")
			if err != nil || resp.StatusCode != tc.code || !strings.Contains(body, `"code":`+strconv.Itoa(tc.code)) || !strings.Contains(body, tc.detail) {
				t.Errorf("%s with %q: %v %q %v; want %d saying %s", path, tc.headers, resp, body, err, tc.code, tc.detail)
			}
			if tc.code == 426 && resp != nil && resp.Header.Get("Sec-WebSocket-Version") != "13" {
				t.Errorf("%s: 426 without Sec-WebSocket-Version: 13", path)
			}
		}
		rc := dialHTTP(t, p.addr)
		rc.send("GET " + path + " HTTP/1.1\r\nHost: %zz\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + key + "Sec-WebSocket-Version: 13\r\n\r\n")
		if resp, body, err := rc.read("GET"); err != nil || resp.StatusCode != 400 || !strings.Contains(body, `"code":400`) || !strings.Contains(body, "does not make a WebSocket URL") {
			t.Errorf("%s with Host %%zz: %v %q %v; want 400 in the error shape", path, resp, body, err)
		}
		// Connection's list over two lines is one list (RFC 9110 section 5.3).
		rc = dialHTTP(t, p.addr)
		rc.send("GET " + path + " HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + key + "Sec-WebSocket-Version: 13\r\n\r\n")
		if resp, err := http.ReadResponse(rc.br, nil); err != nil || resp.StatusCode != 101 {
			t.Errorf("%s with Connection on two lines: %v %v; want 101", path, resp, err)
		}
		rc = dialHTTP(t, p.addr)
		rc.send("GET " + path + " HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" + key + "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat, superchat\r\n\r\n")
		resp, err := http.ReadResponse(rc.br, nil)
		if err != nil || resp.StatusCode != 101 || resp.Header.Get("Sec-WebSocket-Protocol") != "" {
			t.Errorf("%s offering subprotocols: %v %v; want 101 agreeing to none", path, resp, err)
		}
	}
}

// TestBrokerForwardsToManyGroups: a peer with more queue groups on a topic
// than one header line of a batch holds gets every message, its broadcast
// subscribers too.
func TestBrokerForwardsToManyGroups(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	b := startSidecar(t, "--registry=file", "--registry_address="+file)
	broadcast := []*collector{subscribeWS(t, b, "B.all", "topic=many")}
	groups := map[string][]*collector{}
	for i := range 70 {
		g := fmt.Sprintf("g%063d", i) // 64 characters, the longest name
		groups[g] = []*collector{subscribeWS(t, b, "B."+g[len(g)-2:], "topic=many&queue="+g)}
	}
	waitFor(t, 10*time.Second, "B's 71 registrations on A", func() bool {
		s := lookup(t, a, "topic:many")
		return s != nil && len(s.Nodes) == 71
	})
	var want []string
	for i := range 5 {
		want = append(want, fmt.Sprint("m-", i))
		publish(t, a, "many", "text/plain", want[i])
	}
	waitAll(t, len(want), broadcast, groups)
	checkExactlyOnce(t, want, broadcast, groups)
	if st := brokerStatsOf(t, a); st.ForwardDropped != 0 || st.Forwarded != 5 {
		t.Errorf("A dropped forwards, or did not count 5 forwarded: %+v", st)
	}
	if st := brokerStatsOf(t, b); st.Received != 5 {
		t.Errorf("B counts %d messages received; want 5, each split one once", st.Received)
	}
}

// TestBrokerDoesNotForwardToItself: a topic entry naming a sidecar at an
// address it does not know as its own (here localhost for 127.0.0.1)
// must not make its subscribers get each message twice.
func TestBrokerDoesNotForwardToItself(t *testing.T) {
	a := startSidecar(t, "--registry=memory")
	_, port, _ := net.SplitHostPort(a.addr)
	body := fmt.Sprintf(`{"name":"topic:loop","nodes":[{"id":"stale","address":"localhost:%s","metadata":{"broker":"1","sidecar":"stale"}}]}`, port)
	if code, out := do(t, "POST", a.url("/registry?ttl=60s"), "application/json", body); code != 200 {
		t.Fatalf("register the stale entry: %d %s", code, out)
	}
	sub := subscribeWS(t, a, "A.loop", "topic=loop")
	waitSubscribers(t, a, 1)
	publish(t, a, "loop", "text/plain", "once")
	waitFor(t, 10*time.Second, "the forward to itself to be refused", func() bool { return brokerStatsOf(t, a).ForwardDropped == 1 })
	waitFor(t, 10*time.Second, "the message", func() bool { return sub.total() >= 1 })
	if n := sub.total(); n != 1 {
		t.Errorf("the subscriber got the message %d times; want once", n)
	}
	if !strings.Contains(a.log.String(), "came from this sidecar itself") {
		t.Error("the refused forward is not logged with its reason")
	}
}

// TestBrokerIgnoresAStaleEntryOfAnother: a topic entry left by an
// earlier process at another spelling of a sidecar's address (localhost
// for 127.0.0.1) made every other sidecar forward to it twice, and its
// subscribers got each message twice. The sidecar there now refuses
// batches named for another sidecar, with 410, and the publisher drops
// them quietly: they were copies.
func TestBrokerIgnoresAStaleEntryOfAnother(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--log_level=debug")
	s := startSidecar(t, "--registry=file", "--registry_address="+file)
	sub := subscribeWS(t, s, "S.dup", "topic=dup")
	waitFor(t, 10*time.Second, "s's topic entry on p", func() bool { return lookup(t, p, "topic:dup") != nil })
	_, port, _ := net.SplitHostPort(s.addr)
	stale := `{"name":"topic:dup","nodes":[{"id":"gone","address":"localhost","port":` + port + `,"metadata":{"broker":"1","sidecar":"gone"}}]}`
	if code, body := do(t, "POST", p.url("/registry?ttl=60s"), "", stale); code != 200 {
		t.Fatalf("registering the stale entry: %d %s", code, body)
	}
	publish(t, p, "dup", "text/plain", "once")
	waitFor(t, 10*time.Second, "the copy by the stale entry to be refused", func() bool {
		return strings.Contains(p.log.String(), "a stale topic entry names a sidecar at an address another answers")
	})
	waitFor(t, 10*time.Second, "the message", func() bool { return sub.total() >= 1 })
	if n := sub.total(); n != 1 {
		t.Errorf("the subscriber got the message %d times; want once", n)
	}
	if st := brokerStatsOf(t, p); st.ForwardDropped != 0 {
		t.Errorf("forward_dropped %d on the publisher; want 0: the refused copy was not a loss", st.ForwardDropped)
	}
}

// TestBrokerLargeMessageToAnIdleSubscriber: a message larger than
// --broker_queue_bytes reaches a subscriber with nothing waiting, rather
// than closing it as slow.
func TestBrokerLargeMessageToAnIdleSubscriber(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_queue_bytes=1024")
	sub := subscribeWS(t, p, "idle", "topic=big")
	waitSubscribers(t, p, 1)
	publish(t, p, "big", "text/plain", strings.Repeat("x", 4096))
	waitFor(t, 10*time.Second, "the large message", func() bool { return sub.total() == 1 })
	if st := brokerStatsOf(t, p); st.SlowClosed != 0 {
		t.Errorf("slow_closed %d; want 0: the subscriber had nothing waiting", st.SlowClosed)
	}
}

// TestBrokerPublisherClosedAsSlowLosesNothing: a WebSocket client that
// publishes and never reads its topic's echoes is closed as slow; what it
// sent before it learnt of the close is still published, not dropped
// without a word.
func TestBrokerPublisherClosedAsSlowLosesNothing(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--broker_queue_size=16")
	cfg, err := websocket.NewConfig("ws://"+p.addr+"/broker?topic=flood", "http://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	// A small receive buffer, so that the echoes it never reads back up
	// into the sidecar within the test's 16 MB.
	cfg.Dialer = &net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
		return c.Control(func(fd uintptr) { syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, 32<<10) })
	}}
	pub, err := websocket.DialConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	waitSubscribers(t, p, 1)
	const n = 1000
	msg := strings.Repeat("m", 16<<10)
	pub.SetWriteDeadline(time.Now().Add(20 * time.Second))
	for i := range n {
		if err := websocket.Message.Send(pub, msg); err != nil {
			t.Fatalf("publishing message %d: %v", i, err)
		}
	}
	// The client's socket stays open: closed with the echoes unread, it
	// would be reset, and the reset destroys what the sidecar has not read.
	waitFor(t, 5*time.Second, "the publisher to be closed as slow", func() bool { return brokerStatsOf(t, p).SlowClosed == 1 })
	waitFor(t, 10*time.Second, "every message published", func() bool { return brokerStatsOf(t, p).Published == n })
}

// TestBrokerSubscribedOnceAnswered: a message published as soon as the
// client has its handshake's answer reaches it.
func TestBrokerSubscribedOnceAnswered(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	for i := range 100 {
		topic := fmt.Sprint("race-", i)
		ws, err := websocket.Dial("ws://"+p.addr+"/broker?topic="+topic, "", "http://"+p.addr)
		if err != nil {
			t.Fatal(err)
		}
		publish(t, p, topic, "text/plain", "now")
		ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		var ev cloudEvent
		err = websocket.JSON.Receive(ws, &ev)
		ws.Close()
		if err != nil {
			t.Fatalf("subscription %d missed a message published right after its handshake: %v", i, err)
		}
	}
}

// TestGroupMessagesLeaveACrashedPeer: a queue group with members on two
// sidecars, one of which is killed. Its entry stays in the registry until
// its TTL, but no message for the group is lost: the one refused at
// connect goes to the live member, and the next ones go there directly.
func TestGroupMessagesLeaveACrashedPeer(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	c := startSidecar(t, "--registry=file", "--registry_address="+file)
	memberA := subscribeWS(t, a, "A.g", "topic=orders&queue=g")
	subscribeWS(t, c, "C.g", "topic=orders&queue=g")
	waitFor(t, 10*time.Second, "both members on a", func() bool {
		s := lookup(t, a, "topic:orders")
		return s != nil && len(s.Nodes) == 2
	})
	c.stop(syscall.SIGKILL)
	const n = 20
	for i := range n {
		publish(t, a, "orders", "text/plain", fmt.Sprint("m-", i))
	}
	waitFor(t, 10*time.Second, "every message on the live member", func() bool { return memberA.total() == n })
	st := brokerStatsOf(t, a)
	if st.ForwardDropped != 0 {
		t.Errorf("a dropped %d forwards; want 0: %+v", st.ForwardDropped, st)
	}
	if lookup(t, a, "topic:orders") == nil || len(lookup(t, a, "topic:orders").Nodes) != 2 {
		t.Error("the crashed sidecar's entry left before its TTL: the test proves nothing")
	}
}

// TestGroupMessagesLeaveAStaleEntry: an entry naming a group member at the
// address of a sidecar that is another (a restart at the same address)
// gets 410 for the group's messages, which then go to the live member.
func TestGroupMessagesLeaveAStaleEntry(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	b := startSidecar(t, "--registry=file", "--registry_address="+file)
	memberA := subscribeWS(t, a, "A.g", "topic=orders&queue=g")
	host, port, _ := net.SplitHostPort(b.addr)
	ghost := fmt.Sprintf(`{"name":"topic:orders","nodes":[{"id":"ghost:g","address":%q,"port":%s,"metadata":{"broker":"1","sidecar":"ghost","scheme":"http","queue":"g"}}]}`, host, port)
	if code, out := do(t, "POST", a.url("/registry?ttl=60s"), "application/json", ghost); code != 200 {
		t.Fatalf("register the stale entry: %d %s", code, out)
	}
	waitFor(t, 10*time.Second, "the member and the stale entry on a", func() bool {
		s := lookup(t, a, "topic:orders")
		return s != nil && len(s.Nodes) == 2
	})
	const n = 20
	for i := range n {
		publish(t, a, "orders", "text/plain", fmt.Sprint("m-", i))
	}
	waitFor(t, 10*time.Second, "every message on the live member", func() bool { return memberA.total() == n })
	if st := brokerStatsOf(t, a); st.ForwardDropped != 0 {
		t.Errorf("a dropped %d forwards; want 0: %+v", st.ForwardDropped, st)
	}
}

// TestLeavingGroupMemberHandsOnItsQueue: the messages waiting for a group
// member whose client goes away (none of them sent: its socket is full)
// go to the group's other member, on another sidecar, once each, where
// they were lost.
func TestLeavingGroupMemberHandsOnItsQueue(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	common := []string{"--registry=file", "--registry_address=" + file, "--broker_queue_size=100000", "--broker_queue_bytes=1073741824"}
	a, b := startSidecar(t, common...), startSidecar(t, common...)
	stuck := dialRaw(t, a.addr, "/broker?topic=jobs&queue=w") // never reads
	other := subscribeWS(t, b, "B.w", "topic=jobs&queue=w")
	waitFor(t, 10*time.Second, "both members' entries on a", func() bool {
		s := lookup(t, a, "topic:jobs")
		return s != nil && len(s.Nodes) == 2
	})
	// 1,000 of 16 KB: the stuck member's half, 8 MB, more than the
	// loopback socket buffers hold, so that some wait in its queue.
	const n = 1000
	pad := strings.Repeat("x", 16<<10)
	for i := range n {
		publish(t, a, "jobs", "text/plain", fmt.Sprintf("%d-%s", i, pad))
	}
	waitFor(t, 10*time.Second, "half of them on b's member", func() bool { return other.total() >= n/2 })
	stuck.conn.Close()
	var st brokerStatsReport
	waitFor(t, 10*time.Second, "a's member to leave, and its queue to be handed on", func() bool {
		st = brokerStatsOf(t, a)
		return st.Subscribers == 0 && st.HeldBytes == 0
	})
	if st.Redelivered == 0 {
		t.Fatalf("nothing was handed on: %+v", st)
	}
	waitFor(t, 10*time.Second, "the handed-on messages on b's member", func() bool { return other.total() == n/2+int(st.Redelivered) })
	other.mu.Lock()
	defer other.mu.Unlock()
	for data, c := range other.counts {
		if c != 1 {
			t.Errorf("message %.10s... came %d times", data, c)
		}
	}
	if st.SlowClosed != 0 || st.NoSubscriber != 0 {
		t.Errorf("stats %+v; want no slow subscriber and no message without a member", st)
	}
}

// TestStaleEntryKeepsOtherTopicsGroups: a stale entry of group g on topic
// T at a live sidecar's address (an earlier process's) costs that sidecar
// nothing of other topics: its member of U's group w gets its turn, where
// the 410 for T once kept it out of every group for up to 30 s.
func TestStaleEntryKeepsOtherTopicsGroups(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	b := startSidecar(t, "--registry=file", "--registry_address="+file)
	host, port, _ := net.SplitHostPort(b.addr)
	ghost := fmt.Sprintf(`{"name":"topic:T","nodes":[{"id":"ghost:g","address":%q,"port":%s,"metadata":{"broker":"1","sidecar":"ghost","scheme":"http","queue":"g"}}]}`, host, port)
	if code, out := do(t, "POST", a.url("/registry?ttl=60s"), "application/json", ghost); code != 200 {
		t.Fatalf("register the stale entry: %d %s", code, out)
	}
	memberT := subscribeWS(t, a, "A.T.g", "topic=T&queue=g")
	memberUA := subscribeWS(t, a, "A.U.w", "topic=U&queue=w")
	memberUB := subscribeWS(t, b, "B.U.w", "topic=U&queue=w")
	waitFor(t, 10*time.Second, "the entries of T and U on a", func() bool {
		st, su := lookup(t, a, "topic:T"), lookup(t, a, "topic:U")
		return st != nil && len(st.Nodes) == 2 && su != nil && len(su.Nodes) == 2
	})
	const n = 40
	for i := range n {
		publish(t, a, "T", "text/plain", fmt.Sprint(i))
		publish(t, a, "U", "text/plain", fmt.Sprint(i))
	}
	waitFor(t, 10*time.Second, "every message of T and U", func() bool {
		return memberT.total() == n && memberUA.total()+memberUB.total() == n
	})
	if got := memberUB.total(); got < n/4 {
		t.Errorf("b's member of U's group got %d of %d (a's %d); want its turn, about half", got, n, memberUA.total())
	}
}

// TestStaleGroupEntryAtARestartedSidecar: a sidecar restarted at the same
// address, with a broadcast subscriber but no member of group g, while the
// entry of g its earlier process registered is still in the registry:
// messages for g that go there by that entry reach g's member elsewhere,
// not one in two lost until the entry lapses.
func TestStaleGroupEntryAtARestartedSidecar(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	b := startSidecar(t, "--registry=file", "--registry_address="+file)
	c := startSidecar(t, "--registry=file", "--registry_address="+file)
	host, port, _ := net.SplitHostPort(b.addr)
	stale := fmt.Sprintf(`{"name":"topic:t","nodes":[{"id":"sidecar-earlier:g","address":%q,"port":%s,"metadata":{"broker":"1","sidecar":"sidecar-earlier","queue":"g","scheme":"http"}}]}`, host, port)
	if code, body := do(t, "POST", a.url("/registry?ttl=60s"), "application/json", stale); code != http.StatusOK {
		t.Fatalf("registering the earlier process's entry: %d %s", code, body)
	}
	onB := subscribeWS(t, b, "B.b1", "topic=t")
	member := subscribeWS(t, c, "C.g1", "topic=t&queue=g")
	waitFor(t, 10*time.Second, "three topic entries on A", func() bool {
		s := lookup(t, a, "topic:t")
		return s != nil && len(s.Nodes) == 3
	})
	const n = 40
	// Of the first two, one goes to B by the stale entry, and back.
	publish(t, a, "t", "text/plain", "0")
	publish(t, a, "t", "text/plain", "1")
	waitFor(t, 10*time.Second, "the first two to g's member", func() bool { return member.total() == 2 })
	for i := 2; i < n; i++ {
		publish(t, a, "t", "text/plain", fmt.Sprint(i))
	}
	waitFor(t, 10*time.Second, "every message to B's subscriber and to g's member", func() bool {
		return onB.total() == n && member.total() == n
	})
	if st := brokerStatsOf(t, b); st.NoSubscriber != 0 {
		t.Errorf("B counted %d messages for a group it has no member of as lost; the sender gave them to C", st.NoSubscriber)
	}
	// B's answer keeps g off it: the later messages go to C alone, in
	// order, not one in two there and back.
	member.mu.Lock()
	var got []int
	for _, ev := range member.events {
		var data string
		json.Unmarshal(ev.Data, &data)
		i, err := strconv.Atoi(data)
		if err != nil {
			t.Fatalf("a message of g: %s", ev.Data)
		}
		got = append(got, i)
	}
	member.mu.Unlock()
	inversions := 0
	for i := 3; i < len(got); i++ {
		if got[i] < got[i-1] {
			inversions++
		}
	}
	if inversions > 0 {
		t.Errorf("g's member got the messages in this order, %d out of place: %v", inversions, got)
	}
}

// TestForwardedEventOverAPeersLimitCostsItAlone: a peer with a lower
// --broker_max_payload_bytes refuses a forwarded message too large for it,
// and that message alone: the others of its batch are delivered, and the
// publisher counts and logs the one lost. It refused the whole batch.
func TestForwardedEventOverAPeersLimitCostsItAlone(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	a := startSidecar(t, "--registry=file", "--registry_address="+file)
	b := startSidecar(t, "--registry=file", "--registry_address="+file, "--broker_max_payload_bytes=1024")
	sub := subscribeWS(t, b, "B", "topic=sizes")
	waitFor(t, 10*time.Second, "a to see b's subscriber", func() bool { return lookup(t, a, "topic:sizes") != nil })
	// b pauses, so that what a publishes meanwhile piles up into batches
	// of several messages, as for a peer briefly slow.
	b.cmd.Process.Signal(syscall.SIGSTOP)
	resumed := false
	defer func() {
		if !resumed {
			b.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	for _, m := range []string{"small-1", "small-2", strings.Repeat("x", 100_000), "small-3", "small-4"} {
		publish(t, a, "sizes", "text/plain", m)
	}
	b.cmd.Process.Signal(syscall.SIGCONT)
	resumed = true
	waitFor(t, 15*time.Second, "the four small messages at b", func() bool { return sub.total() >= 4 })
	waitFor(t, 15*time.Second, "the large one counted lost at a", func() bool { return brokerStatsOf(t, a).ForwardDropped == 1 })
	sub.mu.Lock()
	counts := maps.Clone(sub.counts)
	sub.mu.Unlock()
	for _, m := range []string{"small-1", "small-2", "small-3", "small-4"} {
		if counts[m] != 1 {
			t.Errorf("b's subscriber got %q %d times; want once (got %v)", m, counts[m], slices.Collect(maps.Keys(counts)))
		}
	}
	if !strings.Contains(a.log.String(), "refused messages too large for it") || strings.Contains(a.log.String(), "works again") {
		t.Errorf("a does not say why the message was lost:\n%s", a.log.String())
	}
}
