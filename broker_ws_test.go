package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

func closePayload(code int, reason string) []byte {
	p := binary.BigEndian.AppendUint16(nil, uint16(code))
	return append(p, reason...)
}

// TestCloseFramesAreChecked: a client's close is answered with its own
// code, and a close no peer may send fails the connection, on the broker
// and on the registry's watch.
func TestCloseFramesAreChecked(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	for _, c := range []struct {
		name    string
		payload []byte
		want    int
	}{
		{"no code", nil, closeNormal},
		{"1000", closePayload(1000, "bye"), 1000},
		{"going away", closePayload(1001, ""), 1001},
		{"an application's", closePayload(4000, "logout"), 4000},
		{"1-byte payload", []byte{3}, closeProtocolError},
		{"999", closePayload(999, ""), closeProtocolError},
		{"1005, never sent", closePayload(1005, ""), closeProtocolError},
		{"1006, never sent", closePayload(1006, ""), closeProtocolError},
		{"2999", closePayload(2999, ""), closeProtocolError},
		{"5000", closePayload(5000, ""), closeProtocolError},
		{"reason not UTF-8", closePayload(1000, "\xff\xfe"), closeInvalidPayload},
	} {
		for _, path := range []string{"/broker?topic=t", "/registry?watch=1"} {
			ws := dialRaw(t, addr, path)
			ws.send(t, websocket.CloseFrame, c.payload)
			if code, _ := ws.closeCode(t); code != c.want {
				t.Errorf("%s on %s: answered %d; want %d", c.name, path, code, c.want)
			}
			ws.conn.Close()
		}
	}
}

// TestTextMustBeUTF8: RFC 6455 section 8.1 fails a text message that is
// not UTF-8 with 1007, even when a fragment split a character in two.
func TestTextMustBeUTF8(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	ws := dialRaw(t, addr, "/broker?topic=t")
	ws.sendFrame(t, websocket.TextFrame, []byte("caf\xc3")) // é split across fragments: fine
	ws.sendFrame(t, 0x80|websocket.ContinuationFrame, []byte("\xa9"))
	if _, p, err := ws.next(5 * time.Second); err != nil || !bytes.Contains(p, []byte(`"café"`)) {
		t.Fatalf("a character split across fragments: %q, %v; want it published", p, err)
	}
	ws.send(t, websocket.TextFrame, []byte("\xff"))
	if code, reason := ws.closeCode(t); code != closeInvalidPayload || !strings.Contains(reason, "UTF-8") {
		t.Errorf("text not UTF-8: closed %d %q; want 1007", code, reason)
	}
	if n := s.broker.stats.Published.Load(); n != 1 {
		t.Errorf("%d published; want only the valid message", n)
	}
}

// TestFrameLengthTopBit: a 64-bit length must have its top bit clear.
func TestFrameLengthTopBit(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	ws := dialRaw(t, addr, "/broker?topic=t")
	frame := []byte{0x80 | websocket.BinaryFrame, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 1, 1, 2, 3, 4}
	if _, err := ws.conn.Write(frame); err != nil {
		t.Fatal(err)
	}
	if code, _ := ws.closeCode(t); code != closeProtocolError {
		t.Errorf("closed %d; want 1002", code)
	}
}

// TestPayloadMemoryFollowsTheBytes: a frame that announces a large
// payload and sends little holds little, not what it announced.
func TestPayloadMemoryFollowsTheBytes(t *testing.T) {
	const announced = 16 << 20
	var frame []byte
	frame = append(frame, 0x80|websocket.BinaryFrame, 0x80|127)
	frame = binary.BigEndian.AppendUint64(frame, announced)
	frame = append(frame, 1, 2, 3, 4)
	frame = append(frame, "only this"...)
	r := &wsReader{br: bufio.NewReader(bytes.NewReader(frame)), max: 32 << 20, onPing: func([]byte) error { return nil }}
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := r.next()
	runtime.ReadMemStats(&after)
	if err != io.ErrUnexpectedEOF {
		t.Errorf("a cut frame: %v; want io.ErrUnexpectedEOF", err)
	}
	if got := after.TotalAlloc - before.TotalAlloc; got > 1<<20 {
		t.Errorf("allocated %d bytes for 9 sent of %d announced; want about one read step (%d)", got, announced, payloadStep)
	}
}

// TestBusyWriterIsNotTakenForSilent: a client the writer is blocked on is
// judged by the write timeout, as a slow client (counted, logged), not
// reaped as silent for a pong stuck behind its backlog.
func TestBusyWriterIsNotTakenForSilent(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Hour, WriteTimeout: 500 * time.Millisecond, MaxPayloadBytes: 64 << 10}) // keepalive runs here, not on a timer
	ws := dialRaw(t, addr, "/broker?topic=backlog")
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	sub := subscriberAt(t, s.broker, ws.conn.LocalAddr().String())
	payload := []byte(strings.Repeat("x", 60<<10))
	waitFor(t, 10*time.Second, "the writer to block on the client", func() bool {
		s.broker.publish("backlog", payloadText, "text/plain", payload)
		return sub.writing.Load()
	})
	for range 10 { // keepalive rounds while it is blocked: none may reap it
		s.broker.keepalive()
	}
	waitFor(t, 10*time.Second, "the write timeout to close it", func() bool { return subCount(s.broker) == 0 })
	st := &s.broker.stats
	if st.Reaped.Load() != 0 || st.SlowClosed.Load() != 1 {
		t.Errorf("reaped %d, closed as slow %d; want it closed as slow, not reaped", st.Reaped.Load(), st.SlowClosed.Load())
	}
}

// TestNoDataAfterTheCloseAnswer: once the broker answers a client's
// close, no data frame follows, however busy the topic (RFC 6455 section
// 5.5.1).
func TestNoDataAfterTheCloseAnswer(t *testing.T) {
	// A paced publisher and a deep queue: a subscriber that fell behind on
	// a loaded machine would be closed as slow, which is another test's.
	s, addr := brokerSidecar(t, brokerConfig{QueueSize: 1 << 16, QueueBytes: 64 << 20})
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(10 * time.Microsecond)
		defer tick.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tick.C:
				s.broker.publish("busy", payloadText, "text/plain", []byte("tick"))
			}
		}
	}()
	defer func() { close(stop); <-done }()
	for i := range 50 {
		ws := dialRaw(t, addr, "/broker?topic=busy")
		if _, _, err := ws.next(5 * time.Second); err != nil { // subscribed and receiving
			t.Fatal(err)
		}
		ws.send(t, websocket.CloseFrame, closePayload(1000, ""))
		ws.closeCode(t)
		if op, _, err := ws.next(5 * time.Second); err == nil {
			t.Fatalf("round %d: a frame (opcode %d) after the close answer", i, op)
		}
		ws.conn.Close()
	}
}

// TestSilentWatcherIsReaped: a watcher silent for three pings, not even a
// pong, is gone and gives back its slot; one that talks stays.
func TestSilentWatcherIsReaped(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.watchPing = 20 * time.Millisecond })
	addr := hostOf(srv)
	talking := dialRaw(t, addr, "/registry?watch=1")
	silent := dialRaw(t, addr, "/registry?watch=1")
	waitFor(t, 5*time.Second, "two watchers", func() bool { return s.watchers.Load() == 2 })
	stop := make(chan struct{})
	defer close(stop)
	go func() { // pings of its own count as much as pongs
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				talking.conn.Write([]byte{0x80 | websocket.PingFrame, 0x80, 1, 2, 3, 4})
			}
		}
	}()
	waitFor(t, 5*time.Second, "the silent watcher to go", func() bool { return s.watchers.Load() == 1 })
	silent.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.Copy(io.Discard, silent.br); err != nil {
		t.Errorf("the silent watcher's connection: %v; want it closed", err)
	}
	for range 10 { // several ping intervals: the talking one stays
		if _, _, err := talking.next(5 * time.Second); err != nil {
			t.Fatalf("the talking watcher: %v", err)
		}
	}
	if n := s.watchers.Load(); n != 1 {
		t.Errorf("%d watchers; want the talking one", n)
	}
}

// TestPublishTooLargeIsRefusedAtOnce: a POST whose Content-Length is over
// the limit gets its 413 before sending any of the body, and is not asked
// for it with 100 Continue.
func TestPublishTooLargeIsRefusedAtOnce(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{MaxPayloadBytes: 1000})
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	io.WriteString(conn, "POST /broker?topic=t HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nExpect: 100-continue\r\nContent-Length: 10000000\r\n\r\n")
	conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatalf("no answer without the body: %v", err)
	}
	if resp.StatusCode != http.StatusRequestEntityTooLarge {
		t.Errorf("answered %d; want 413 at once", resp.StatusCode)
	}
}

// TestPublishWithAContentEncodingIsRefused: a gzip body would be published
// as its coded bytes under the declared type, the coding lost.
func TestPublishWithAContentEncodingIsRefused(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	for _, tc := range []struct {
		lines []string // one field line each
		want  int
	}{
		{[]string{"gzip"}, http.StatusUnsupportedMediaType},
		{[]string{"identity"}, http.StatusOK},
		{[]string{"identity", "gzip"}, http.StatusUnsupportedMediaType}, // one list over two lines
		{[]string{"identity, br"}, http.StatusUnsupportedMediaType},
		{[]string{"Identity, identity"}, http.StatusOK},
	} {
		req, _ := http.NewRequest("POST", "http://"+addr+"/broker?topic=t", strings.NewReader("hello"))
		req.Header.Set("Content-Type", "text/plain")
		req.Header["Content-Encoding"] = tc.lines
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("Content-Encoding %q: %d; want %d", tc.lines, resp.StatusCode, tc.want)
		}
	}
}

// TestHandshakeForms: Upgrade is a list, which may name websocket among
// others; a handshake needs HTTP/1.1 (RFC 6455 section 4.2.1).
func TestHandshakeForms(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	for _, c := range []struct {
		name, proto, upgrade string
		want                 int
	}{
		{"a list naming websocket", "HTTP/1.1", "websocket, foo/1", http.StatusSwitchingProtocols},
		{"websocket second", "HTTP/1.1", "foo/1, websocket", http.StatusSwitchingProtocols},
		{"HTTP/1.0", "HTTP/1.0", "websocket", http.StatusBadRequest},
	} {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(conn, "GET /broker?topic=t %s\r\nHost: x\r\nUpgrade: %s\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n", c.proto, c.upgrade)
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if resp.StatusCode != c.want {
			t.Errorf("%s: %d; want %d", c.name, resp.StatusCode, c.want)
		}
		conn.Close()
	}
}

// TestBrokerEntriesAreNotTheRegistryAPIs: a client can neither take over
// nor delete a topic entry the broker keeps for its subscribers (the
// broker registers each once, and peers would stop forwarding for good);
// other nodes of the topic's service are the client's as ever.
func TestBrokerEntriesAreNotTheRegistryAPIs(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	dialRaw(t, addr, "/broker?topic=orders&queue=billing")
	waitFor(t, 5*time.Second, "the group's registration", func() bool { return s.reg.table.has("topic:orders") })
	id := s.broker.id + ":billing"
	base := "http://" + addr + "/registry"
	for _, c := range []struct{ method, url, body, fix string }{
		{"POST", base + "?ttl=1s", `{"name":"topic:orders","nodes":[{"id":"` + id + `","address":"127.0.0.1","port":1}]}`, "register another node id"},
		{"DELETE", base, `{"name":"topic:orders","nodes":[{"id":"other"},{"id":"` + id + `"}]}`, "it goes when the last of them closes, or the sidecar stops"},
	} {
		code, body := do(t, c.method, c.url, "application/json", c.body)
		if code != http.StatusConflict || !strings.Contains(body, "broker entry for topic orders, kept by its broker while it has subscribers; "+c.fix) {
			t.Errorf("%s of the broker's entry: %d %s; want 409 saying whose it is and %q", c.method, code, body, c.fix)
		}
	}
	if !s.reg.owns(Service{Name: "topic:orders", Nodes: []Node{{ID: id}}}) {
		t.Errorf("the broker's entry is no longer kept alive")
	}
	if code, body := do(t, "POST", base, "application/json", `{"name":"topic:orders","nodes":[{"id":"app-1","address":"127.0.0.1","port":1}]}`); code != http.StatusOK {
		t.Errorf("POST of another node of the topic's service: %d %s; want 200", code, body)
	}
	// A peer's entry: not to be kept alive here (a sync script posting
	// what it read), but a stale one may be planted with a ttl, or cleared.
	peer := `{"name":"topic:orders","nodes":[{"id":"sidecar-peer:billing","address":"127.0.0.1","port":2,"metadata":{"broker":"1","sidecar":"sidecar-peer","queue":"billing"}}]}`
	if code, body := do(t, "POST", base, "application/json", peer); code != http.StatusConflict || !strings.Contains(body, "its own sidecar keeps alive") {
		t.Errorf("POST of a peer's broker entry to be kept alive: %d %s; want 409", code, body)
	}
	for _, c := range []struct{ method, url string }{{"POST", base + "?ttl=5s"}, {"DELETE", base}} {
		if code, body := do(t, c.method, c.url, "application/json", peer); code != http.StatusOK {
			t.Errorf("%s %s of a peer's broker entry: %d %s; want 200", c.method, c.url, code, body)
		}
	}
}

// TestBrokerRegistryFailuresAreCounted: a topic entry the registry refuses
// is counted in /broker/stats and /metrics, where an operator can alert.
func TestBrokerRegistryFailuresAreCounted(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	s.reg.deregisterOwned() // as at shutdown: registrations the sidecar keeps are refused
	dialRaw(t, addr, "/broker?topic=orders")
	waitFor(t, 5*time.Second, "the refused registration to be counted", func() bool { return s.broker.report().RegistryFailure > 0 })
	_, body := do(t, "GET", "http://"+addr+"/metrics", "", "")
	if !regexp.MustCompile(`(?m)^micro_broker_registry_failures_total [1-9]`).MatchString(body) {
		t.Errorf("/metrics does not count the failure:\n%s", body)
	}
}

// TestBrokerRetriesARefusedTopicSoon: a topic entry the registry refused
// (down, or shutting down) is tried again within seconds, not at the next
// ping round (20 s), so that a subscriber made during an outage is not deaf
// to its peers that long after it.
func TestBrokerRetriesARefusedTopicSoon(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Minute})
	s.reg.mu.Lock()
	s.reg.closed = true // refuses what the sidecar keeps, as a registry that is down does
	s.reg.mu.Unlock()
	dialRaw(t, addr, "/broker?topic=orders")
	waitFor(t, 5*time.Second, "the refused registration to be counted", func() bool { return s.broker.report().RegistryFailure > 0 })
	s.reg.mu.Lock()
	s.reg.closed = false // the registry is back
	s.reg.mu.Unlock()
	waitFor(t, 10*time.Second, "the topic to be registered", func() bool {
		svcs, err := s.reg.GetService("topic:orders")
		return err == nil && len(svcs) > 0
	})
}

// TestOwnRegistrationsPassTheClientsCap: clients that fill the 4,096
// registrations a sidecar keeps alive for them do not cut a subscription
// off from the other sidecars: its topic is registered still.
func TestOwnRegistrationsPassTheClientsCap(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	for i := range maxOwned {
		if err := s.reg.Register(Service{Name: fmt.Sprintf("client.%d", i), Nodes: []Node{{ID: "n", Address: "127.0.0.1", Port: 1}}}, 0); err != nil {
			t.Fatalf("client registration %d: %v", i, err)
		}
	}
	if err := s.reg.Register(Service{Name: "one.more", Nodes: []Node{{ID: "n", Address: "127.0.0.1", Port: 1}}}, 0); !errors.Is(err, errTableFull) {
		t.Fatalf("a client registration past the cap: %v; want it refused", err)
	}
	dialRaw(t, addr, "/broker?topic=orders")
	waitFor(t, 5*time.Second, "the topic's registration", func() bool { return s.reg.table.has("topic:orders") })
}

// TestFailedPingGivesTheBatchBack: a writer whose ping fails gives back
// the batch it took with the ping, not only what waits in the queue.
func TestFailedPingGivesTheBatchBack(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Hour, WriteTimeout: time.Nanosecond}) // every write times out
	ws := dialRaw(t, addr, "/broker?topic=leak")
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	sub := subscriberAt(t, s.broker, ws.conn.LocalAddr().String())
	waitFor(t, 5*time.Second, "the handshake", sub.isReady)
	sub.mu.Lock()
	sub.pinging = true // as keepalive's ping would, without starting the writer: the message below starts it
	sub.mu.Unlock()
	s.broker.publish("leak", payloadText, "text/plain", []byte(strings.Repeat("x", 1000)))
	waitFor(t, 5*time.Second, "the subscriber to go", func() bool { return subCount(s.broker) == 0 })
	waitFor(t, 5*time.Second, "held bytes back to 0", func() bool { return s.broker.held.Load() == 0 })
}

// TestCloseFrameGoesOutOnAQuietConnection: a close frame is sent however
// long ago the last frame set a write deadline. A registry watch quiet for
// over 10 s (its events' deadline) lost its 1001 at shutdown and its 1009
// for a bad frame: the write failed at once, and the client saw the
// connection drop.
func TestCloseFrameGoesOutOnAQuietConnection(t *testing.T) {
	srv := httptest.NewServer(wsServer(func(c *websocket.Conn) {
		c.SetWriteDeadline(time.Now().Add(-time.Second)) // an event's deadline, passed
		writeClose(c, closeGoingAway, "sidecar shutting down")
	}))
	defer srv.Close()
	ws := dialRaw(t, strings.TrimPrefix(srv.URL, "http://"), "/")
	if code, reason := ws.closeCode(t); code != closeGoingAway || reason != "sidecar shutting down" {
		t.Errorf("close %d %q; want 1001", code, reason)
	}
}

// arrivingBackend is a registry during one of whose registrations a
// subscriber comes back to a topic: arrive runs once, at the first.
type arrivingBackend struct {
	memoryBackend
	arrive func()
}

func (b *arrivingBackend) register(s Service, ttl time.Duration) error {
	if f := b.arrive; f != nil {
		b.arrive = nil
		f()
	}
	return b.memoryBackend.register(s, ttl)
}

// TestReconcileKeepsATopicWhoseSubscriberCameBack: a pass over the topics
// decided what to deregister from the subscribers at its start; a client
// that closed and reopened its subscriptions at once had the topics that
// came back while the pass registered others deregistered, live, and
// their messages lost for 10-15 s.
func TestReconcileKeepsATopicWhoseSubscriberCameBack(t *testing.T) {
	tb := newTable(100)
	be := &arrivingBackend{memoryBackend: memoryBackend{t: tb, now: time.Now}}
	reg := &registry{table: tb, backend: be, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	b := newBroker(brokerConfig{}, reg, newConnSet(), discardLog)
	b.advertise = "127.0.0.1:1"
	b.topics["new"] = &topic{broadcast: []*subscriber{{}}, groups: map[string]*group{}}
	back := regKey{"back", ""}
	be.arrive = func() { // while "new" is registered, "back" gets its subscriber again
		b.mu.Lock()
		b.topics["back"] = &topic{broadcast: []*subscriber{{}}, groups: map[string]*group{}}
		b.mu.Unlock()
	}
	registered := map[regKey]bool{back: true} // registered by an earlier pass
	b.reconcile(registered, map[regKey]bool{})
	if !registered[back] {
		t.Errorf("the topic whose subscriber came back during the pass was deregistered")
	}
}

// TestClientReadingItsBacklogIsNotTakenForSilent: messages the writer
// handed to the socket wait in its buffers, with the pings behind them;
// a client taking them is alive though it sends no pong for a while, and
// was reaped as silent (its unread messages lost). One that stops taking
// them is silent, and reaped.
func TestClientReadingItsBacklogIsNotTakenForSilent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the socket's send queue is read on Linux only")
	}
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Hour}) // keepalive runs here, not on a timer
	ws := dialRaw(t, addr, "/broker?topic=backlog")
	ws.conn.(*net.TCPConn).SetReadBuffer(128 << 10)
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	sub := subscriberAt(t, s.broker, ws.conn.LocalAddr().String())
	// Room for the whole backlog in the sidecar's socket: the writer
	// hands it all over, and the client's buffer holds a part.
	sub.conn.(*net.TCPConn).SetWriteBuffer(8 << 20)
	payload := []byte(strings.Repeat("x", 16<<10))
	for range 192 {
		s.broker.publish("backlog", payloadText, "text/plain", payload)
	}
	idle := func() bool {
		sub.mu.Lock()
		defer sub.mu.Unlock()
		return len(sub.q) == 0 && !sub.writing.Load()
	}
	waitFor(t, 5*time.Second, "the writer to hand the backlog to the socket", idle)
	if n := unsentBytes(sub.conn); n < 256<<10 {
		t.Fatalf("%d bytes wait in the socket; the test needs a backlog there", n)
	}
	buf := make([]byte, 16<<10)
	for round := range 2 * reapAfter {
		before := unsentBytes(sub.conn)
		// The client reads until its window opens (a window update waits
		// for room enough) and the sidecar's queue shrinks.
		waitFor(t, 5*time.Second, "the sidecar to see the client take some", func() bool {
			ws.conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(ws.conn, buf); err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			return unsentBytes(sub.conn) < before
		})
		s.broker.keepalive()
	}
	if st := &s.broker.stats; st.Reaped.Load() != 0 || subCount(s.broker) != 1 {
		t.Fatalf("reaped %d; want the client reading its backlog kept", st.Reaped.Load())
	}
	for range reapAfter { // it stops reading
		s.broker.keepalive()
	}
	if st := &s.broker.stats; st.Reaped.Load() != 1 {
		t.Errorf("reaped %d; want the client that stopped taking anything reaped", st.Reaped.Load())
	}
}

// TestWatcherReadingItsBacklogIsNotTakenForSilent: a watcher working
// through a large initial state, handed to its socket ahead of the pings,
// is alive though it sends no pong for a while; it was closed as silent,
// its events cut off.
func TestWatcherReadingItsBacklogIsNotTakenForSilent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("the socket's send queue is read on Linux only")
	}
	// Pings far apart next to the client's window updates, which come as
	// it frees room enough (some 64 KiB, every 0.3 s here).
	s, srv := testSidecar(t, func(c *config) { c.watchPing = 500 * time.Millisecond })
	const nodes = 1000
	md := map[string]string{"pad": strings.Repeat("x", 1000)}
	var recs []record
	for i := range nodes {
		recs = append(recs, record{Service: "big", Metadata: map[string]string{}, Node: Node{ID: fmt.Sprint("n", i), Address: "127.0.0.1", Port: 1, Metadata: md}})
	}
	if err := s.reg.table.upsert(recs...); err != nil {
		t.Fatal(err)
	}
	ws := dialRaw(t, hostOf(srv), "/registry?watch=1&service=big")
	ws.conn.(*net.TCPConn).SetReadBuffer(128 << 10)
	pace := time.NewTicker(10 * time.Millisecond) // about 200 KB/s: seconds for the backlog
	defer pace.Stop()
	creates := 0
	for creates < nodes {
		<-pace.C
		for range 2 {
			op, data, err := ws.next(5 * time.Second)
			if err != nil {
				t.Fatalf("after %d of %d events: %v", creates, nodes, err)
			}
			switch {
			case op == websocket.PingFrame:
				ws.send(t, websocket.PongFrame, data) // late, behind the backlog
			case op == websocket.TextFrame && strings.Contains(string(data), `"create"`):
				creates++
			}
		}
	}
	// The watch goes on: what was handed over before a close would come
	// through it, all of it.
	if err := s.reg.table.upsert(record{Service: "big", Metadata: map[string]string{}, Node: Node{ID: "late", Address: "127.0.0.1", Port: 1, Metadata: map[string]string{}}}); err != nil {
		t.Fatal(err)
	}
	for {
		op, data, err := ws.next(5 * time.Second)
		if err != nil {
			t.Fatalf("the event after the backlog: %v; want the watch still open", err)
		}
		switch {
		case op == websocket.PingFrame:
			ws.send(t, websocket.PongFrame, data)
		case op == websocket.TextFrame && strings.Contains(string(data), `"late"`):
			return
		}
	}
}
