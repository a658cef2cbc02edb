package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/net/websocket"
)

// handle serves /broker:
//
//	GET  /broker?topic=T[&queue=G]  (WebSocket) subscribe to T, in group G;
//	                                every frame sent is published to T
//	POST /broker?topic=T            publish the body to T; answers {"id":...}
//	POST /broker                    with Micro-Broker-Forwarded: a batch from a peer sidecar
func (b *broker) handle(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost && r.Header.Get(forwardedHeader) != "" {
		b.handleForwarded(w, r)
		return
	}
	switch r.Method {
	case http.MethodGet:
		b.handleSubscribe(w, r)
	case http.MethodPost:
		b.handlePublish(w, r)
	default:
		allowMethods(w, r, http.MethodGet, http.MethodPost)
	}
}

// publishAnswer is the answer to a POST: the message's id, as its
// subscribers see it in the event.
type publishAnswer struct {
	ID    string `json:"id"`
	Topic string `json:"topic"`
}

func (b *broker) handlePublish(w http.ResponseWriter, r *http.Request) {
	if r.URL.Query().Has("queue") { // refused with its reason, before queryOf's generic one
		writeError(w, http.StatusBadRequest, "queue is for subscribers (GET with a WebSocket upgrade); a message published goes to every queue group")
		return
	}
	q, ok := queryOf(w, r, "topic")
	if !ok {
		return
	}
	topic := strings.Clone(q.Get("topic")) // queued messages keep it: not a piece of a request's head (see stringArena)
	if err := checkNames(topic, ""); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if ce := contentCoding(r.Header["Content-Encoding"]); ce != "" {
		// The event would carry the coded bytes under the declared type,
		// the coding lost: a gzip body published as text/plain.
		refuseCoding(w, ce, "not accepted: publish the body as it is")
		return
	}
	tooBigError := "message larger than " + strconv.Itoa(b.cfg.MaxPayloadBytes) + " bytes (--broker_max_payload_bytes)"
	if r.ContentLength > int64(b.cfg.MaxPayloadBytes) { // refused before any of it is read, or asked for with 100 Continue
		writeError(w, http.StatusRequestEntityTooLarge, tooBigError)
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, int64(b.cfg.MaxPayloadBytes))
	body, err := io.ReadAll(r.Body)
	var tooBig *http.MaxBytesError
	switch {
	case errors.As(err, &tooBig):
		writeError(w, http.StatusRequestEntityTooLarge, tooBigError)
		return
	case err != nil:
		writeBodyError(w, err)
		return
	}
	kind, dct, err := classify(r.Header.Get("Content-Type"), body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	writeJSON(w, http.StatusOK, publishAnswer{ID: b.publish(topic, kind, dct, body), Topic: topic})
}

func (b *broker) handleForwarded(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get(forwardedHeader) == b.id {
		// A topic entry names this sidecar under an address it does not
		// know as its own (a stale entry of a process that had its port):
		// delivering would hand each subscriber the message twice.
		writeError(w, http.StatusLoopDetected, "forwarded batch: it came from this sidecar itself; a topic entry in the registry names this sidecar at another address (a stale entry lapses within --register_ttl)")
		return
	}
	if to := r.Header.Get(forwardedToHeader); to != "" && !slices.Contains(strings.Split(to, ","), b.id) {
		writeError(w, http.StatusGone, "forwarded batch: for sidecar "+truncate(to, 128)+", and this is "+b.id+": a stale topic entry names this address under another spelling (it lapses within --register_ttl); this sidecar's own entry brings it the messages")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, b.fwd.maxForwardBody())
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, http.StatusRequestEntityTooLarge, "forwarded batch: "+err.Error())
		return
	}
	ans, err := b.fwd.receive(body, r.Header.Get(reroutesHeader) == "1")
	if err != nil {
		writeError(w, http.StatusBadRequest, "forwarded batch: "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, ans)
}

func (b *broker) handleSubscribe(w http.ResponseWriter, r *http.Request) {
	q, ok := queryOf(w, r, "topic", "queue")
	if !ok {
		return
	}
	topic, queue := q.Get("topic"), q.Get("queue")
	if q.Has("queue") && queue == "" {
		writeError(w, http.StatusBadRequest, "queue is empty; leave it out to get every message, or name a group")
		return
	}
	if err := checkNames(topic, queue); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if !isUpgrade(r) {
		writeError(w, http.StatusBadRequest, "GET /broker needs a WebSocket upgrade: connect a WebSocket client to "+wsScheme(r)+"://"+truncate(r.Host, 64)+"/broker?topic="+topic+", or POST to publish")
		return
	}
	if !handshakeOK(w, r) {
		return
	}
	// Subscribed before the handshake is answered, so that a message
	// published once the client has its 101 reaches it; the slot is taken
	// here too, so that a full broker answers 503 rather than a 101 and a
	// close. Messages queue until serveConn marks the subscriber ready.
	s := &subscriber{b: b, topic: topic, queue: queue, remote: r.RemoteAddr}
	if err := b.subscribe(s); err != nil {
		w.Header().Set("Retry-After", "5") // subscribers come and go
		writeError(w, http.StatusServiceUnavailable, err.Error())
		return
	}
	served := false
	srv := wsServer(func(c *websocket.Conn) {
		served = true
		b.serveConn(s, c)
	})
	srv.ServeHTTP(&hijackWriter{ResponseWriter: w, s: s}, r)
	if !served { // the handshake failed
		b.unsubscribe(s)
		s.drop()
		b.redeliver(s)
	}
}

// serveConn sets up one subscriber connection and hands it to its own
// reader goroutine, returning the HTTP server's goroutine: that one holds
// the server's 4 KB read and write buffers and a deep stack, twice what the
// rest of an idle subscriber costs.
func (b *broker) serveConn(s *subscriber, c *websocket.Conn) {
	s.ws = c
	if !b.conns.add(c, func() { s.closeWith(closeGoingAway, "sidecar shutting down") }) {
		b.unsubscribe(s)
		s.drop()
		b.redeliver(s)
		writeClose(c, closeGoingAway, "sidecar shutting down")
		return
	}
	s.rw.keep = true       // the library closes the connection when this returns; the reader owns it now
	s.readSeen.Store(true) // the handshake: silence counts from it, as from any read
	s.markReady()
	go b.readLoop(s, c)
}

// readLoop publishes every message the client sends until the connection
// ends; the subscriber's writer does all other writing.
func (b *broker) readLoop(s *subscriber, c *websocket.Conn) {
	defer b.conns.remove(c)
	defer s.conn.Close()
	defer func() {
		b.unsubscribe(s)
		s.abort()
		s.wg.Wait()
		b.redeliver(s)
	}()
	r := &wsReader{br: s.br, max: b.cfg.MaxPayloadBytes, limit: "--broker_max_payload_bytes", onPing: s.pong}
	for {
		m, err := r.next()
		var fail *wsFailure
		switch {
		case errors.As(err, &fail):
			if fail.code == closeTooBig {
				b.stats.TooBig.Add(1)
			}
			s.closeWith(fail.code, fail.reason)
			io.Copy(io.Discard, s.br) // until the peer answers or the close grace ends
			return
		case errors.Is(err, errPeerClosed):
			s.answerPeerClose(r.answerCode())
			return
		case err != nil:
			return
		}
		if s.droppingInput() {
			continue
		}
		kind, dct := payloadText, "text/plain" // the reader checked that text is UTF-8
		if m.binary {
			kind, dct = payloadBinary, "application/octet-stream"
		}
		b.publish(s.topic, kind, dct, m.data)
	}
}

// pong answers a client's ping. It may run beside the writer: every frame
// goes out whole under wmu.
func (s *subscriber) pong(payload []byte) error {
	frame := append(appendFrameHeader(make([]byte, 0, 2+len(payload)), websocket.PongFrame, len(payload)), payload...)
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.conn.SetWriteDeadline(time.Now().Add(s.b.cfg.WriteTimeout))
	_, err := s.conn.Write(frame)
	return err
}

// droppingInput reports whether the client's messages are to be dropped:
// once the sidecar is closing the connection, unless for slowness. A
// client closed as slow has sent what it sent before it could see the
// close, as a publisher that never reads its own topic's echoes does;
// those messages are published, not lost without a word.
func (s *subscriber) droppingInput() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing && s.closeCode != closeTryAgainLater
}

func (s *subscriber) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// readBufferSize is a connection's read buffer: frames from subscribers
// are mostly pongs, and larger frames are read straight through.
const readBufferSize = 512

// hijackWriter hands the WebSocket library a connection the broker can
// batch writes on and watch reads of. The library writes (handshake, pongs,
// control frames) through a small buffer that is flushed a whole frame at a
// time under the subscriber's write lock, so they never interleave with the
// writer's batches.
type hijackWriter struct {
	http.ResponseWriter
	s *subscriber
}

func (h *hijackWriter) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(h.ResponseWriter).Hijack()
	if err != nil {
		return nil, nil, err
	}
	h.s.conn = conn
	rc := &readWatcher{Conn: conn, seen: &h.s.readSeen}
	h.s.rw = rc
	var r io.Reader = rc
	if n := brw.Reader.Buffered(); n > 0 { // a client may send frames right behind its handshake
		pre, _ := brw.Reader.Peek(n)
		r = io.MultiReader(bytes.NewReader(bytes.Clone(pre)), rc)
	}
	// The write buffer holds the largest control frame (2+125 bytes), so a
	// frame reaches lockedWriter in one piece.
	lw := &lockedWriter{mu: &h.s.wmu, w: conn}
	h.s.br = bufio.NewReaderSize(r, readBufferSize) // the library reads the handshake only; readLoop the rest
	return rc, bufio.NewReadWriter(h.s.br, bufio.NewWriterSize(lw, 256)), nil
}

// readWatcher records that the peer sent something: its pongs are read and
// skipped like any frame, so reads are the only sign of life.
type readWatcher struct {
	net.Conn
	seen interface{ Store(bool) }
	keep bool // Close is a no-op: the connection outlives the handler
}

func (r *readWatcher) Close() error {
	if r.keep {
		return nil
	}
	return r.Conn.Close()
}

func (r *readWatcher) Read(p []byte) (int, error) {
	n, err := r.Conn.Read(p)
	if n > 0 {
		r.seen.Store(true)
	}
	return n, err
}

// lockedWriter writes under a lock shared with the subscriber's writer.
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// brokerStatsReport is the answer of GET /broker/stats.
type brokerStatsReport struct {
	ID              string `json:"id"`
	Advertise       string `json:"advertise_address"`
	Topics          int    `json:"topics"`
	Subscribers     int    `json:"subscribers"`
	HeldBytes       int64  `json:"held_bytes"`
	Published       uint64 `json:"published"`
	Delivered       uint64 `json:"delivered"`
	Received        uint64 `json:"received_from_peers"`
	Forwarded       uint64 `json:"forwarded_to_peers"`
	ForwardDropped  uint64 `json:"forward_dropped"`
	NoSubscriber    uint64 `json:"group_without_members"`
	SlowClosed      uint64 `json:"slow_subscribers_closed"`
	SlowDropped     uint64 `json:"slow_subscriber_messages_dropped"`
	Redelivered     uint64 `json:"group_messages_redelivered"`
	Reaped          uint64 `json:"silent_connections_reaped"`
	TooBig          uint64 `json:"oversized_frames"`
	RegistryFailure uint64 `json:"registry_failures"`
}

func (b *broker) handleStats(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	if _, ok := queryOf(w, r); !ok { // read strictly, as /broker's: it takes none
		return
	}
	writeJSON(w, http.StatusOK, b.report())
}

// report is a snapshot of the broker's counters, for /broker/stats and
// /metrics.
func (b *broker) report() brokerStatsReport {
	b.mu.RLock()
	rep := brokerStatsReport{ID: b.id, Advertise: b.advertise, Topics: len(b.topics), Subscribers: len(b.subs), HeldBytes: b.held.Load()}
	b.mu.RUnlock()
	st := &b.stats
	rep.Published, rep.Delivered, rep.Received = st.Published.Load(), st.Delivered.Load(), st.Received.Load()
	rep.Forwarded, rep.ForwardDropped, rep.NoSubscriber = st.Forwarded.Load(), st.ForwardDropped.Load(), st.NoSubscriber.Load()
	rep.SlowClosed, rep.SlowDropped, rep.Reaped = st.SlowClosed.Load(), st.SlowDropped.Load(), st.Reaped.Load()
	rep.Redelivered = st.Redelivered.Load()
	rep.TooBig, rep.RegistryFailure = st.TooBig.Load(), st.RegistryFailure.Load()
	return rep
}

// checkAdvertise validates --advertise_address: a host, or host:port.
func checkAdvertise(s string) error {
	if s == "" {
		return nil
	}
	port := 0 // in s
	if _, _, err := net.SplitHostPort(s); err != nil {
		port = 1 // none: the bound one goes with the host
	}
	// As a node's address is checked: an IP address or a host name,
	// IPv6 in brackets or bare, one that others can reach.
	if _, _, err := splitAddress(s, port); err != nil {
		return fmt.Errorf("--advertise_address %q: %v; want a host or host:port that other sidecars can reach, e.g. 10.0.0.5:8081", s, err)
	}
	return nil
}

// resolveAdvertise picks the address peers reach this sidecar's API at:
// the flag when given (its port defaults to the bound one); else the bound
// address when its host is specific; else, when the API listens on every
// interface, the host of --server_address when it is specific; else the
// first non-loopback interface address (IPv4 first); else loopback.
func resolveAdvertise(flagValue string, bound *net.TCPAddr, serverAddress string, ifaceAddrs []net.Addr) string {
	port := strconv.Itoa(bound.Port)
	if flagValue != "" {
		if host, p, err := net.SplitHostPort(flagValue); err == nil {
			return net.JoinHostPort(canonicalHost(host), p)
		}
		host := strings.TrimSuffix(strings.TrimPrefix(flagValue, "["), "]") // "[::1]", a port not given
		return net.JoinHostPort(canonicalHost(host), port)
	}
	if !bound.IP.IsUnspecified() {
		return bound.String()
	}
	if host, _, err := net.SplitHostPort(serverAddress); err == nil && host != "" {
		if ip := net.ParseIP(host); ip == nil || !ip.IsUnspecified() {
			return net.JoinHostPort(canonicalHost(host), port)
		}
	}
	var v6 net.IP
	for _, a := range ifaceAddrs {
		ipn, ok := a.(*net.IPNet)
		if !ok || !ipn.IP.IsGlobalUnicast() && !ipn.IP.IsPrivate() {
			continue
		}
		if ipn.IP.To4() != nil {
			return net.JoinHostPort(ipn.IP.String(), port)
		}
		if v6 == nil {
			v6 = ipn.IP
		}
	}
	if v6 != nil {
		return net.JoinHostPort(v6.String(), port)
	}
	return net.JoinHostPort("127.0.0.1", port)
}

// isLocalName reports whether host is a name under .local, which the
// multicast registry's peers may resolve to an address.
func isLocalName(host string) bool {
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	return strings.HasSuffix(host, ".local")
}

// interfaceAddrs lists this machine's interface addresses, or none.
func interfaceAddrs() []net.Addr {
	addrs, _ := net.InterfaceAddrs()
	return addrs
}
