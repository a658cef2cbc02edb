package main

// The in-process broker: topics, subscribers with bounded queues and their
// writers, and the CloudEvents encoding of a message. The /broker endpoint
// is in broker_http.go, delivery between sidecars in broker_forward.go.
//
// Data flows one way: a publish (a WebSocket frame or a POST body) becomes a
// message, encoded once; local delivery appends a pointer to it to each
// chosen subscriber's queue, whose writer batches queued frames into one
// write; forwarding hands it to one queue per peer sidecar.

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// brokerConfig bounds the broker. Zero values take the defaults below.
type brokerConfig struct {
	MaxPayloadBytes int            // largest message (WebSocket frame or POST body); default 1 MiB
	QueueSize       int            // messages a subscriber may have waiting; default 4096
	QueueBytes      int            // bytes a subscriber may have waiting; default 16 MiB
	MemoryBytes     int            // bytes all subscribers together may have waiting; default 256 MiB
	PingInterval    time.Duration  // between pings to a quiet connection; default 20s
	MaxTopics       int            // topics with local subscribers; default 1000
	MaxSubscribers  int            // WebSocket connections; default 10000
	WriteTimeout    time.Duration  // one write to a subscriber; default 10s
	PeerScheme      string         // how peers are reached: http (default) or https, as this sidecar serves
	PeerRoots       *x509.CertPool // CAs trusted for https peers; nil: the system's
	AuthToken       string         // sent to peers as a bearer token; peers share the sidecars' --auth_token
}

const (
	defaultMaxPayloadBytes = 1 << 20
	defaultQueueSize       = 4096
	defaultQueueBytes      = 16 << 20
	defaultMemoryBytes     = 256 << 20
	defaultPingInterval    = 20 * time.Second
	defaultMaxTopics       = 1000
	defaultMaxSubscribers  = 10000
	defaultWriteTimeout    = 10 * time.Second

	// reapAfter is how many ping intervals a connection may stay silent
	// (not even a pong) before it is taken for dead and closed.
	reapAfter = 3
	// closeGrace bounds how long a closing connection may take to send
	// its close frame and hear the answer.
	closeGrace = 2 * time.Second
	// maxBatchBytes is how much a writer gathers into one write.
	maxBatchBytes = 64 << 10
)

func (c *brokerConfig) fill() {
	if c.MaxPayloadBytes <= 0 {
		c.MaxPayloadBytes = defaultMaxPayloadBytes
	}
	if c.QueueSize <= 0 {
		c.QueueSize = defaultQueueSize
	}
	if c.QueueBytes <= 0 {
		c.QueueBytes = defaultQueueBytes
	}
	if c.MemoryBytes <= 0 {
		c.MemoryBytes = defaultMemoryBytes
	}
	if c.PingInterval <= 0 {
		c.PingInterval = defaultPingInterval
	}
	if c.MaxTopics <= 0 {
		c.MaxTopics = defaultMaxTopics
	}
	if c.MaxSubscribers <= 0 {
		c.MaxSubscribers = defaultMaxSubscribers
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = defaultWriteTimeout
	}
}

// validate checks the flags that set c and names the fix.
func (c brokerConfig) validate() error {
	if c.MaxPayloadBytes < 1 || c.MaxPayloadBytes > 64<<20 {
		return fmt.Errorf("--broker_max_payload_bytes %d: want 1 to %d (64 MiB)", c.MaxPayloadBytes, 64<<20)
	}
	if c.PingInterval < 10*time.Millisecond {
		return fmt.Errorf("--broker_ping_interval %v: want at least 10ms", c.PingInterval)
	}
	for _, f := range []struct {
		name string
		n    int
	}{
		{"broker_queue_size", c.QueueSize}, {"broker_queue_bytes", c.QueueBytes}, {"broker_memory_bytes", c.MemoryBytes},
		{"broker_max_topics", c.MaxTopics}, {"broker_max_subscribers", c.MaxSubscribers},
	} {
		if f.n < 1 {
			return fmt.Errorf("--%s %d: must be more than 0", f.name, f.n)
		}
	}
	return nil
}

// Names. Topics and queue groups travel in URLs, registry service names
// (topic:NAME, at most 255 bytes), node ids and DNS-SD labels, so they are
// short and plain.
const (
	maxTopicLen = 200
	maxQueueLen = 64
	// topicService prefixes the registry service a sidecar registers
	// under when it has subscribers for a topic.
	topicService = "topic:"
)

// validTopicName reports whether s may name a topic or a queue group of at
// most max bytes: ASCII letters, digits, '.', '_', '-' and ':'.
func validTopicName(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '.', c == '_', c == '-', c == ':':
		default:
			return false
		}
	}
	return true
}

// checkNames validates a topic and an optional queue group with the message
// a client needs to fix them.
func checkNames(topic, queue string) error {
	if topic == "" {
		return errors.New("topic is required; use /broker?topic=NAME")
	}
	if !validTopicName(topic, maxTopicLen) {
		return fmt.Errorf("topic %q: use 1 to %d letters, digits, '.', '_', '-' or ':'", truncate(topic, 64), maxTopicLen)
	}
	if queue != "" && !validTopicName(queue, maxQueueLen) {
		return fmt.Errorf("queue %q: use 1 to %d letters, digits, '.', '_', '-' or ':'", truncate(queue, 64), maxQueueLen)
	}
	return nil
}

// maxContentTypeLen bounds a published payload's declared type. Media
// types are short (RFC 6838: 127 bytes a name); the bound keeps the event
// within what peers take (see decodeForward).
const maxContentTypeLen = 1024

// Kinds of payload, as the event carries them.
const (
	payloadText   = iota // data as a JSON string
	payloadJSON          // data as JSON
	payloadBinary        // data_base64
)

// classify decides how a payload travels in the event from its declared
// content type (RFC 2045 media type, may be empty) and its bytes, and
// returns the event's datacontenttype. A body declared JSON must be JSON.
func classify(contentType string, body []byte) (kind int, dataContentType string, err error) {
	if len(contentType) > maxContentTypeLen {
		// The event carries it: a peer bounds an event by the payload
		// limit and some room for the rest, and would refuse it.
		return 0, "", fmt.Errorf("content type of %d bytes: at most %d", len(contentType), maxContentTypeLen)
	}
	if contentType == "" {
		if utf8.Valid(body) {
			return payloadText, "text/plain", nil
		}
		return payloadBinary, "application/octet-stream", nil
	}
	mt, params, perr := mime.ParseMediaType(contentType)
	if perr == nil && !strings.Contains(mt, "/") {
		// mime takes a bare token; the event's datacontenttype must be
		// a media type (RFC 2046), as its readers will parse it.
		perr = errors.New("want type/subtype, e.g. text/plain")
	}
	if perr != nil {
		return 0, "", fmt.Errorf("content type %q: %v", truncate(contentType, 64), perr)
	}
	charset := strings.ToLower(params["charset"])
	switch {
	case charset != "" && charset != "utf-8" && charset != "us-ascii" && !(mt == "application/json" || strings.HasSuffix(mt, "+json")):
		// Text in another charset goes as its bytes (data_base64) with
		// its declared type: read as UTF-8 into a JSON string, Latin-1's
		// "\xc3\xa9" would arrive as "é", and UTF-16 as garbage.
		return payloadBinary, contentType, nil
	case mt == "application/json" || strings.HasSuffix(mt, "+json"):
		// Checked first: json.Valid stops at encoding/json's depth, and
		// says only no. One level short of that depth is the limit too:
		// inside the event, one level deeper, it would be past the depth
		// peers read it with.
		if jsonNestsDeeper(body, maxJSONDepth-1) {
			return 0, "", fmt.Errorf("body is declared %s but nests deeper than %d levels; send it as text/plain", mt, maxJSONDepth-1)
		}
		if !json.Valid(body) {
			return 0, "", errors.New("body is declared " + mt + " but is not valid JSON; fix it or send it as text/plain")
		}
		if !utf8.Valid(body) {
			// json.Valid takes any bytes inside strings; passed on, they would
			// make the event's text frame invalid, which a WebSocket client
			// must fail the connection over (RFC 6455 section 8.1).
			return 0, "", errors.New("body is declared " + mt + " but is not UTF-8 (RFC 8259 section 8.1); send it as application/octet-stream")
		}
		return payloadJSON, contentType, nil
	case mt == "application/octet-stream" || !utf8.Valid(body):
		return payloadBinary, contentType, nil
	default:
		return payloadText, contentType, nil
	}
}

// cloudEvent is the CloudEvents 1.0 JSON format (cloudevents/spec
// json-format.md): data holds JSON or a string, data_base64 binary data.
// topic is an extension attribute.
type cloudEvent struct {
	SpecVersion     string          `json:"specversion"`
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	Time            string          `json:"time"`
	Topic           string          `json:"topic"`
	DataContentType string          `json:"datacontenttype"`
	Data            json.RawMessage `json:"data,omitempty"`
	DataBase64      *string         `json:"data_base64,omitempty"`
}

// eventType is the CloudEvents type of every broker message.
const eventType = "micro.broker.message"

// encodeEvent builds the event for one message. The payload has been
// classified already, so encoding cannot fail on client input.
func encodeEvent(id, source, topic string, t time.Time, kind int, dataContentType string, payload []byte) []byte {
	ev := cloudEvent{
		SpecVersion:     "1.0",
		ID:              id,
		Source:          source,
		Type:            eventType,
		Time:            t.UTC().Format(time.RFC3339Nano),
		Topic:           topic,
		DataContentType: dataContentType,
	}
	switch kind {
	case payloadJSON:
		ev.Data = payload
	case payloadText:
		ev.Data, _ = marshalJSON(string(payload))
	default:
		s := base64.StdEncoding.EncodeToString(payload)
		ev.DataBase64 = &s
	}
	// Without json.Marshal's HTML escaping of <, > and &: an event is not
	// embedded in HTML, and the escapes would change data's bytes (a
	// signature over them) and make HTML-heavy text grow sixfold.
	data, err := marshalJSON(ev)
	if err != nil { // only a payload classify did not check could do this
		ev.Data, ev.DataBase64 = nil, nil
		s := base64.StdEncoding.EncodeToString(payload)
		ev.DataBase64, ev.DataContentType = &s, "application/octet-stream"
		data, _ = marshalJSON(ev)
	}
	return bytes.TrimSuffix(data, []byte("\n"))
}

// appendFrameHeader appends the header of an unmasked, final WebSocket frame
// (RFC 6455 section 5.2), as a server sends it.
func appendFrameHeader(dst []byte, opcode byte, n int) []byte {
	dst = append(dst, 0x80|opcode)
	switch {
	case n <= 125:
		return append(dst, byte(n))
	case n <= 0xffff:
		return binary.BigEndian.AppendUint16(append(dst, 126), uint16(n))
	default:
		return binary.BigEndian.AppendUint64(append(dst, 127), uint64(n))
	}
}

// message is one published message, shared read-only by every queue it is
// in: encoded once, however many subscribers get it.
type message struct {
	topic string
	id    string
	event []byte       // the CloudEvent JSON, as forwarded to peers
	frame []byte       // the WebSocket text frame holding event, as written to subscribers
	holds atomic.Int32 // the subscribers' queues and writers holding it (see broker.hold)
}

func newMessage(topic, id string, event []byte) *message {
	frame := make([]byte, 0, len(event)+10)
	frame = appendFrameHeader(frame, websocket.TextFrame, len(event))
	hdr := len(frame)
	frame = append(frame, event...)
	return &message{topic: topic, id: id, event: frame[hdr:], frame: frame}
}

// brokerStats are the broker's counters, reported at /broker/stats.
type brokerStats struct {
	Published       atomic.Uint64 // messages published on this sidecar
	Delivered       atomic.Uint64 // messages queued to local subscribers
	Received        atomic.Uint64 // messages forwarded here by peers
	Forwarded       atomic.Uint64 // messages handed to peers
	ForwardDropped  atomic.Uint64 // messages lost on the way to a peer (queue full, peer failing)
	NoSubscriber    atomic.Uint64 // group deliveries that found the group empty
	SlowClosed      atomic.Uint64 // subscribers closed because their queue overflowed
	SlowDropped     atomic.Uint64 // messages lost with them
	Redelivered     atomic.Uint64 // messages a leaving group member had waiting, given to another member
	Reaped          atomic.Uint64 // connections closed for silence
	TooBig          atomic.Uint64 // connections closed for an oversized frame
	RegistryFailure atomic.Uint64 // topic registrations that failed
}

// broker is one sidecar's broker.
type broker struct {
	cfg    brokerConfig
	id     string // this sidecar's id in topic registrations
	source string // the CloudEvents source of messages published here
	reg    *registry
	conns  *connSet
	log    *slog.Logger
	stats  brokerStats

	idPrefix string        // message ids are idPrefix + sequence number
	seq      atomic.Uint64 // last message sequence number

	// advertise is the host:port peers reach this sidecar's API at; set
	// once before the server starts.
	advertise string

	mu     sync.RWMutex // guards topics, subs
	topics map[string]*topic
	subs   map[*subscriber]struct{} // every connected subscriber, for pings

	changed chan struct{} // capacity 1: wakes the registrar after a topic or group appears or goes
	shed    chan struct{} // capacity 1: wakes run to shed memory (see shedMemory)

	fwd *forwarder

	// batches holds the writers' batch buffers between bursts, so that
	// idle subscribers hold none.
	batches sync.Pool

	// held is the bytes of the messages that subscribers' queues and
	// writers hold, each message once however many hold it: what
	// --broker_memory_bytes bounds.
	held atomic.Int64
}

// hold counts m as held by one more subscriber.
func (b *broker) hold(m *message) {
	if m.holds.Add(1) == 1 {
		b.held.Add(int64(len(m.frame)))
	}
}

// release counts the messages as held by one subscriber fewer.
func (b *broker) release(ms []*message) {
	for _, m := range ms {
		if m.holds.Add(-1) == 0 {
			b.held.Add(-int64(len(m.frame)))
		}
	}
}

// shedSoon asks run to shed memory: the subscriber that passed
// --broker_memory_bytes is not the one to close, unless it holds the most.
func (b *broker) shedSoon() {
	select {
	case b.shed <- struct{}{}:
	default:
	}
}

// subscribers returns the connected subscribers, to go through without
// holding the broker's lock.
func (b *broker) subscribers() []*subscriber {
	b.mu.RLock()
	defer b.mu.RUnlock()
	subs := make([]*subscriber, 0, len(b.subs))
	for s := range b.subs {
		subs = append(subs, s)
	}
	return subs
}

// shedMemory closes, as slow, the subscribers holding the most until what
// stays held is within --broker_memory_bytes. The ones that keep up hold
// little, and stay; what a stuck writer holds comes back within closeGrace.
func (b *broker) shedMemory() {
	subs := b.subscribers()
	type holder struct {
		s *subscriber
		n int
	}
	var holders []holder
	for _, s := range subs {
		if n, ok := s.holding(); ok && n > 0 {
			holders = append(holders, holder{s, n})
		}
	}
	slices.SortFunc(holders, func(a, c holder) int { return c.n - a.n })
	over := b.held.Load() - int64(b.cfg.MemoryBytes)
	for _, h := range holders {
		if over <= 0 {
			return
		}
		h.s.mu.Lock()
		if h.s.closing {
			h.s.mu.Unlock()
			continue
		}
		h.s.closeSlowLocked(fmt.Sprintf("slow subscriber: it held the most of the %d bytes the broker may hold (--broker_memory_bytes)", b.cfg.MemoryBytes), false)
		over -= int64(h.n)
	}
}

// topic is the local subscribers of one topic. Its slices are copied on
// write under broker.mu, so publishers read them under the read lock.
type topic struct {
	broadcast []*subscriber
	groups    map[string]*group // bounded by the subscriber limit
}

// group is one queue group's local members; each message for the group
// goes to one of them, in turn.
type group struct {
	members []*subscriber
	next    atomic.Uint64
}

func newBroker(cfg brokerConfig, reg *registry, conns *connSet, log *slog.Logger) *broker {
	cfg.fill()
	var r [8]byte
	rand.Read(r[:])
	id := "sidecar-" + newUUID()
	b := &broker{
		cfg:      cfg,
		id:       id,
		source:   "/micro/" + id,
		reg:      reg,
		conns:    conns,
		log:      log,
		idPrefix: hex.EncodeToString(r[:]) + "-",
		topics:   map[string]*topic{},
		subs:     map[*subscriber]struct{}{},
		changed:  make(chan struct{}, 1),
		shed:     make(chan struct{}, 1),
	}
	b.fwd = newForwarder(b)
	b.batches.New = func() any { buf := make([]byte, 0, maxBatchBytes); return &buf }
	return b
}

// errBrokerFull is returned when a topic or subscriber limit is reached.
var errBrokerFull = errors.New("broker is full")

// subscribe adds s to its topic and group.
func (b *broker) subscribe(s *subscriber) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.subs) >= b.cfg.MaxSubscribers {
		return fmt.Errorf("%w: %d subscribers is the limit (--broker_max_subscribers)", errBrokerFull, b.cfg.MaxSubscribers)
	}
	t := b.topics[s.topic]
	if t == nil {
		if len(b.topics) >= b.cfg.MaxTopics {
			return fmt.Errorf("%w: %d topics is the limit (--broker_max_topics)", errBrokerFull, b.cfg.MaxTopics)
		}
		t = &topic{groups: map[string]*group{}}
		b.topics[s.topic] = t
	}
	b.subs[s] = struct{}{}
	newKey := false
	if s.queue == "" {
		newKey = len(t.broadcast) == 0
		t.broadcast = append(slices.Clip(t.broadcast), s)
	} else {
		g := t.groups[s.queue]
		if g == nil {
			g = &group{}
			t.groups[s.queue] = g
			newKey = true
		}
		g.members = append(slices.Clip(g.members), s)
	}
	if newKey {
		b.wakeRegistrar()
	}
	return nil
}

// unsubscribe removes s; it is a no-op for a subscriber not subscribed.
func (b *broker) unsubscribe(s *subscriber) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subs[s]; !ok {
		return
	}
	delete(b.subs, s)
	t := b.topics[s.topic]
	if t == nil {
		return
	}
	gone := false
	without := func(list []*subscriber) []*subscriber {
		out := make([]*subscriber, 0, len(list))
		for _, x := range list {
			if x != s {
				out = append(out, x)
			}
		}
		return out
	}
	if s.queue == "" {
		t.broadcast = without(t.broadcast)
		gone = len(t.broadcast) == 0
	} else if g := t.groups[s.queue]; g != nil {
		g.members = without(g.members)
		if len(g.members) == 0 {
			delete(t.groups, s.queue)
			gone = true
		}
	}
	if len(t.broadcast) == 0 && len(t.groups) == 0 {
		delete(b.topics, s.topic)
	}
	if gone {
		b.wakeRegistrar()
	}
}

func (b *broker) wakeRegistrar() {
	select {
	case b.changed <- struct{}{}:
	default:
	}
}

// localView is what this sidecar has for a topic, for planning delivery.
func (b *broker) localView(name string) (broadcast bool, groups []string) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	t := b.topics[name]
	if t == nil {
		return false, nil
	}
	for g := range t.groups {
		groups = append(groups, g)
	}
	slices.Sort(groups)
	return len(t.broadcast) > 0, groups
}

// nextID returns a message id unique to this sidecar's lifetime; with the
// source it identifies the event everywhere.
func (b *broker) nextID() string {
	return b.idPrefix + strconv.FormatUint(b.seq.Add(1), 10)
}

// publish encodes a payload published on this sidecar, delivers it to the
// local subscribers and hands it to the forwarder. It never blocks on a
// subscriber or a peer.
func (b *broker) publish(topicName string, kind int, dataContentType string, payload []byte) string {
	id := b.nextID()
	m := newMessage(topicName, id, encodeEvent(id, b.source, topicName, time.Now(), kind, dataContentType, payload))
	b.stats.Published.Add(1)
	broadcast, groups := b.localView(topicName)
	plan := b.fwd.plan(topicName, broadcast, groups)
	if missing := b.deliver(m, plan.local.broadcast, plan.local.groups); len(missing) > 0 {
		b.stats.NoSubscriber.Add(uint64(len(missing))) // no shared counter touched on the common path
	}
	b.fwd.send(m, plan.forwards)
	return id
}

// deliver queues m to the local broadcast subscribers when broadcast is
// set, and to one member of each named group, and returns the groups that
// had no member to take it (the caller counts or reroutes them).
func (b *broker) deliver(m *message, broadcast bool, groups []string) (missing []string) {
	b.mu.RLock()
	defer b.mu.RUnlock()
	t := b.topics[m.topic]
	if t == nil {
		return groups
	}
	n := 0
	if broadcast {
		for _, s := range t.broadcast {
			// Counted delivered when an overflow lost it, as the overflow
			// counted it in slow_dropped, which counts delivered ones lost.
			if taken, overflowed := s.enqueue(m); taken || overflowed {
				n++
			}
		}
	}
	for _, name := range groups {
		g := t.groups[name]
		if g == nil || len(g.members) == 0 {
			missing = append(missing, name)
			continue
		}
		// Try each member once, starting with the next in turn, so that
		// one closing member does not lose the group its message. The
		// message is lost only when no member takes it: counted once,
		// with the slow one it closed, or as a group without members when
		// all were closing already.
		start := g.next.Add(1)
		taken, overflowed := false, false
		for i := 0; i < len(g.members) && !taken; i++ {
			var closed bool
			taken, closed = g.members[(start+uint64(i))%uint64(len(g.members))].enqueue(m)
			overflowed = overflowed || closed
		}
		switch {
		case taken:
			n++
		case overflowed:
			n++
			b.stats.SlowDropped.Add(1)
		default:
			missing = append(missing, name)
		}
	}
	b.stats.Delivered.Add(uint64(n))
	return missing
}

// run pings quiet connections and reaps dead ones every ping interval, and
// keeps the registry's topic entries in step with the local subscribers,
// until ctx ends.
func (b *broker) run(ctx context.Context) {
	tick := time.NewTicker(b.cfg.PingInterval)
	defer tick.Stop()
	registered := map[regKey]bool{}
	refused := map[regKey]bool{} // whose refusal was logged, until it goes through
	failed := false
	// A failed registration is tried again after a second, then after
	// twice as long each time, up to the ping interval: a subscriber
	// made while the registry was down is deaf to its peers until then.
	var retry <-chan time.Time
	backoff := time.Second
	reconcile := func() {
		ok := b.reconcile(registered, refused)
		switch {
		case ok:
			retry, backoff = nil, time.Second
		case retry == nil:
			retry = time.After(backoff)
			backoff = min(2*backoff, b.cfg.PingInterval)
		}
		failed = !ok
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			b.keepalive()
			if failed {
				reconcile()
			}
		case <-retry:
			retry = nil
			reconcile()
		case <-b.changed:
			reconcile()
		case <-b.shed:
			b.shedMemory()
		}
	}
}

// keepalive is one round of pings: a connection heard from since the last
// round is fine, and so is one whose writer waits on it (the write timeout
// judges that one); a quiet one is pinged; one quiet for reapAfter rounds
// is dead (its peer vanished without closing) and is closed. The step of
// run; tests call it directly.
func (b *broker) keepalive() {
	subs := b.subscribers()
	for _, s := range subs {
		if !s.isReady() {
			continue // still in its handshake
		}
		if s.readSeen.Swap(false) || s.writing.Load() || s.taking.took(s.conn) {
			s.quiet = 0
			continue
		}
		s.quiet++
		if s.quiet >= reapAfter {
			b.stats.Reaped.Add(1)
			b.log.Debug("closing a silent broker connection", "topic", s.topic, "remote", s.remote)
			s.abort()
			continue
		}
		s.ping()
	}
}

// regKey is one topic registration: a topic, and a queue group or "" for
// broadcast subscribers.
type regKey struct{ topic, queue string }

// registration is the registry entry that tells peers this sidecar has
// subscribers for key.
func (b *broker) registration(k regKey) (Service, error) {
	host, port, err := net.SplitHostPort(b.advertise)
	if err != nil {
		return Service{}, fmt.Errorf("advertise address %q: %w", b.advertise, err)
	}
	p, _ := strconv.Atoi(port)
	scheme := cmp.Or(b.cfg.PeerScheme, "http")
	md := map[string]string{"broker": "1", "sidecar": b.id, "scheme": scheme}
	id := b.id
	if k.queue != "" {
		md["queue"] = k.queue
		id += ":" + k.queue
	}
	node := Node{ID: id, Address: host, Port: p, Metadata: md}
	if b.cfg.AuthToken != "" {
		md["auth"] = peerProof(b.cfg.AuthToken, b.id, scheme, node.hostPort(), k.topic, k.queue)
	}
	return Service{Name: topicService + k.topic, Metadata: map[string]string{}, Nodes: []Node{node}}, nil
}

// wants reports whether topic k.topic has local subscribers of k's kind
// now: broadcast ones, or members of group k.queue.
func (b *broker) wants(k regKey) bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	t := b.topics[k.topic]
	switch {
	case t == nil:
		return false
	case k.queue == "":
		return len(t.broadcast) > 0
	}
	return t.groups[k.queue] != nil
}

// reconcile registers the topics and groups that gained local subscribers
// and deregisters those that lost their last, and reports whether all went
// well. registered and refused are owned by the caller (run's goroutine):
// a refusal is logged once for each entry, and its late success too.
func (b *broker) reconcile(registered, refused map[regKey]bool) bool {
	want := map[regKey]bool{}
	b.mu.RLock()
	for name, t := range b.topics {
		if len(t.broadcast) > 0 {
			want[regKey{name, ""}] = true
		}
		for g := range t.groups {
			want[regKey{name, g}] = true
		}
	}
	b.mu.RUnlock()
	ok := true
	for k := range want {
		if registered[k] {
			continue
		}
		svc, err := b.registration(k)
		if err == nil {
			err = b.reg.registerOwn(svc)
		}
		if err != nil {
			ok = false
			b.stats.RegistryFailure.Add(1)
			if !refused[k] {
				refused[k] = true
				b.log.Warn("registering a topic failed; peers will not forward it here until a retry succeeds", "topic", k.topic, "queue", k.queue, "error", err)
			}
			continue
		}
		registered[k] = true
		if refused[k] {
			delete(refused, k)
			b.log.Info("registered a topic after the registry refused it", "topic", k.topic, "queue", k.queue)
		}
	}
	for k := range registered {
		if want[k] || b.wants(k) {
			// b.wants: a pass over many topics takes a while, and a
			// subscriber may have come back since want was taken (a client
			// reconnecting its subscriptions at once).
			continue
		}
		svc, err := b.registration(k)
		if err == nil {
			err = b.reg.Deregister(svc)
		}
		if err != nil {
			ok = false
			b.stats.RegistryFailure.Add(1)
			if !refused[k] {
				refused[k] = true
				b.log.Warn("deregistering a topic failed; retrying", "topic", k.topic, "queue", k.queue, "error", err)
			}
			continue
		}
		delete(registered, k)
		delete(refused, k)
	}
	for k := range refused {
		if !want[k] && !registered[k] { // its subscribers left before it went through
			delete(refused, k)
		}
	}
	return ok
}

// close stops forwarding and waits for in-flight forwards, or for ctx.
func (b *broker) close(ctx context.Context) { b.fwd.close(ctx) }

// subscriber is one WebSocket connection to /broker: subscribed to a topic
// (and maybe a queue group), publishing every frame it sends.
//
// Its queue is bounded by QueueSize messages and QueueBytes bytes, and all
// queues together by MemoryBytes. Overflow policy: a subscriber whose queue
// would overflow is slow; it loses what is queued, gets no more messages,
// and is closed with 1013 (try again later) and the reason "slow
// subscriber". When all queues together pass their bound, the subscribers
// holding the most are slow (see shedMemory): the ones that keep up are not
// the ones holding the memory, whoever added the message that passed it.
// The publisher never waits.
//
// Writes: at most one writer goroutine per subscriber, started when the
// queue gets something and gone once it is empty (an idle subscriber costs
// no goroutine but its reader). The writer gathers every queued frame into
// one buffer and writes it in one call, so a subscriber that keeps up gets
// one write per burst, not one per message.
type subscriber struct {
	b      *broker
	topic  string
	queue  string
	remote string
	ws     *websocket.Conn
	conn   net.Conn      // the raw connection, for batched writes
	rw     *readWatcher  // conn as the library reads it
	br     *bufio.Reader // rw, buffered: the client's frames, for readLoop

	wmu sync.Mutex // guards writes to conn: the writer's batches, the library's pongs

	readSeen atomic.Bool  // set by every read; cleared by keepalive
	writing  atomic.Bool  // a write of messages is waiting on the client
	quiet    int          // keepalive rounds without a read; keepalive's goroutine only
	taking   sendProgress // whether the client takes what was written; keepalive's goroutine only

	mu          sync.Mutex // guards the fields below
	q           []*message
	qBytes      int
	ready       bool // the handshake's answer is out: the writer may start
	running     bool // a writer goroutine is running
	pinging     bool // the writer should send a ping
	closing     bool // no more messages: the writer sends the close frame, if any, and stops
	inflight    int  // bytes of the batch the writer is writing
	closeCode   int  // 0: close without a close frame
	closeReason string
	wg          sync.WaitGroup // the writer
	// orphans are a group member's messages that never went out when it
	// ended (its client closed or went): the group's other members get
	// them (broker.redeliver), where they were once lost.
	orphans []*message
}

// enqueue adds m to the queue and reports whether it was taken, and
// whether m overflowed the queue and closed the subscriber as slow; the
// messages waiting in the queue are then counted as dropped, and so is m
// for a broadcast subscriber; a group member's m is left to the caller.
// It never blocks on the connection.
func (s *subscriber) enqueue(m *message) (taken, overflowed bool) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return false, false
	}
	// An empty queue takes any message: one frame larger than
	// --broker_queue_bytes (a payload near a raised
	// --broker_max_payload_bytes, escaped) says nothing of the subscriber.
	if len(s.q) >= s.b.cfg.QueueSize || len(s.q) > 0 && s.qBytes+len(m.frame) > s.b.cfg.QueueBytes {
		// A broadcast subscriber's loss includes m; a group member's
		// does not, as another member may take m.
		s.closeSlowLocked(fmt.Sprintf("slow subscriber: more than %d messages or %d bytes waiting", s.b.cfg.QueueSize, s.b.cfg.QueueBytes), s.queue == "")
		return false, true
	}
	s.b.hold(m)
	s.q = append(s.q, m)
	s.qBytes += len(m.frame)
	s.startLocked()
	s.mu.Unlock()
	if s.b.held.Load() > int64(s.b.cfg.MemoryBytes) {
		s.b.shedSoon()
	}
	return true, false
}

// closeSlowLocked closes the subscriber as slow, with reason: what waits
// in its queue is dropped, and a writer stuck on the client gives up
// within closeGrace. With overflowed, the message that overflowed the
// queue is counted dropped too. It unlocks s.mu.
func (s *subscriber) closeSlowLocked(reason string, overflowed bool) {
	dropped := len(s.q)
	if overflowed {
		dropped++
	}
	s.b.release(s.q)
	s.q, s.qBytes = nil, 0
	s.closing = true
	s.closeCode = closeTryAgainLater
	s.closeReason = reason
	s.startLocked()
	ready := s.ready
	s.mu.Unlock()
	if ready { // else the connection is not the subscriber's yet, and no writer is stuck
		s.conn.SetWriteDeadline(time.Now().Add(closeGrace))
	}
	s.b.stats.SlowClosed.Add(1)
	s.b.stats.SlowDropped.Add(uint64(dropped))
	s.b.log.Info("closing a slow broker subscriber", "topic", s.topic, "queue", s.queue, "remote", s.remote, "dropped", dropped, "reason", reason)
}

// holding is the bytes the subscriber holds: waiting in its queue and in
// the batch its writer is writing. ok is false for a subscriber closing
// already.
func (s *subscriber) holding() (n int, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.qBytes + s.inflight, !s.closing
}

// startLocked starts the writer unless it runs, or the handshake's answer
// is not out yet (markReady starts it then).
func (s *subscriber) startLocked() {
	if !s.running && s.ready {
		s.running = true
		s.wg.Add(1)
		go s.writeLoop()
	}
}

// markReady lets the writer start, once the handshake's answer is out:
// messages for the subscriber may have queued since it subscribed, just
// before that answer.
func (s *subscriber) markReady() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ready = true
	if len(s.q) > 0 || s.closing || s.pinging {
		s.startLocked()
	}
}

// isReady reports whether the handshake's answer is out.
func (s *subscriber) isReady() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.ready
}

// ping asks the writer to send a ping.
func (s *subscriber) ping() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.closing {
		s.pinging = true
		s.startLocked()
	}
}

// closeWith makes the writer send what is queued, then a close frame with
// code and reason, and stop. It is idempotent and does not block.
func (s *subscriber) closeWith(code int, reason string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return
	}
	s.closing, s.closeCode, s.closeReason = true, code, reason
	s.startLocked()
}

// answerPeerClose has the writer answer the client's close with code
// and waits for it. What waits in the queue is dropped (a client that
// closed reads no more), and the answer goes after any batch being
// written, never before it: no data frame may follow a close (RFC 6455
// section 5.5.1). A subscriber closing already has its own close frame out
// or on the way.
func (s *subscriber) answerPeerClose(code int) {
	s.mu.Lock()
	if !s.closing {
		s.closing, s.closeCode, s.closeReason = true, code, ""
		s.shedLocked()
		s.startLocked()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// abort drops the connection at once, without a close frame: for peers
// that are gone.
func (s *subscriber) abort() {
	s.drop()
	s.conn.Close()
}

// drop ends the subscriber's queue: it takes no more messages, and those
// waiting are released.
func (s *subscriber) drop() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	s.shedLocked()
}

// shedLocked empties the queue of a subscriber that ends without sending
// it: a broadcast subscriber's messages are released, a group member's
// kept as orphans for redeliver. s.mu is held.
func (s *subscriber) shedLocked() {
	if s.queue != "" {
		s.orphans = append(s.orphans, s.q...)
	} else {
		s.b.release(s.q)
	}
	s.q, s.qBytes = nil, 0
}

// redeliver gives the messages s, a group member that ended, left waiting
// to the group's other members, here or on other sidecars, once each; s
// must be unsubscribed, and its writer done. None of them went out on s's
// connection, so none reaches the group twice.
func (b *broker) redeliver(s *subscriber) {
	s.mu.Lock()
	q := s.orphans
	s.orphans = nil
	s.mu.Unlock()
	for _, m := range q {
		if unplanned, missing := b.fwd.rerouteGroups("", forwardItem{topic: m.topic, groups: []string{s.queue}, event: m.event}); unplanned || missing > 0 {
			b.stats.NoSubscriber.Add(1) // the group has no other member, or none here that took it
		} else {
			b.stats.Redelivered.Add(1)
		}
	}
	b.release(q)
}

// writeLoop is the subscriber's only writer while it runs.
func (s *subscriber) writeLoop() {
	defer s.wg.Done()
	var buf []byte
	for {
		s.mu.Lock()
		q := s.q
		s.inflight = s.qBytes
		s.q, s.qBytes = nil, 0
		ping := s.pinging
		s.pinging = false
		closing, code, reason := s.closing, s.closeCode, s.closeReason
		if len(q) == 0 && !ping && !closing {
			s.running = false
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()

		if ping {
			// Ahead of the messages: a control frame may go between them,
			// and a client working through a backlog answers it sooner.
			s.conn.SetWriteDeadline(time.Now().Add(s.b.cfg.WriteTimeout))
			if writeControl(s.ws, websocket.PingFrame, nil) != nil {
				s.releaseBatch(q) // taken from the queue already: abort releases only what waits there
				s.abort()
				return
			}
		}
		if len(q) > 0 {
			if buf == nil {
				bp := s.b.batches.Get().(*[]byte)
				defer s.b.batches.Put(bp)
				buf = (*bp)[:0]
			}
			sent, err := s.writeBatch(q, &buf)
			s.releaseBatch(q)
			if err != nil {
				s.writeFailed(err, len(q)-sent)
				return
			}
		}
		if closing {
			if code != 0 {
				writeClose(s.ws, code, reason)
				// Half-close and give the peer a moment to answer the
				// close, which ends the reader (RFC 6455 section 7.1.1).
				if cw, ok := s.conn.(interface{ CloseWrite() error }); ok {
					cw.CloseWrite()
				}
				s.conn.SetReadDeadline(time.Now().Add(closeGrace))
			} else {
				s.conn.Close()
			}
			return // running stays true: no writer starts again
		}
	}
}

// releaseBatch gives back the batch the writer took.
func (s *subscriber) releaseBatch(q []*message) {
	s.b.release(q)
	s.mu.Lock()
	s.inflight = 0
	s.mu.Unlock()
}

// writeFailed ends a subscriber whose write failed, with lost messages
// of its batch unsent. A write that timed out is a client too slow to
// take what it is sent, closed as slow (its socket is full: no close frame
// can go out); any other failure is a connection gone.
func (s *subscriber) writeFailed(err error, lost int) {
	if errors.Is(err, os.ErrDeadlineExceeded) && !s.isClosing() {
		s.mu.Lock()
		lost += len(s.q) // lost with the slow subscriber, as closeSlowLocked has it: not orphans
		s.b.release(s.q)
		s.q, s.qBytes = nil, 0
		s.mu.Unlock()
		s.b.stats.SlowClosed.Add(1)
		s.b.stats.SlowDropped.Add(uint64(lost))
		s.b.log.Info("closing a slow broker subscriber: a write did not complete in time", "topic", s.topic, "queue", s.queue, "remote", s.remote, "timeout", s.b.cfg.WriteTimeout, "dropped", lost)
	}
	s.abort()
}

// writeBatch writes q's frames, gathered into writes of up to
// maxBatchBytes, and returns how many of them were written.
func (s *subscriber) writeBatch(q []*message, buf *[]byte) (int, error) {
	b := (*buf)[:0]
	sent, gathered := 0, 0
	defer func() { *buf = b[:0] }()
	for _, m := range q {
		if len(b) > 0 && len(b)+len(m.frame) > maxBatchBytes {
			if err := s.write(b); err != nil {
				return sent, err
			}
			sent, b = sent+gathered, b[:0]
			gathered = 0
		}
		if len(m.frame) > maxBatchBytes {
			if err := s.write(m.frame); err != nil {
				return sent, err
			}
			sent++
			continue
		}
		b = append(b, m.frame...)
		gathered++
	}
	if len(b) > 0 {
		if err := s.write(b); err != nil {
			return sent, err
		}
	}
	return sent + gathered, nil
}

// write writes p to the connection within the write timeout. While it
// waits on the client, keepalive leaves the client to that timeout: a
// client working through a backlog reads, though its pong may be behind.
func (s *subscriber) write(p []byte) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	s.writing.Store(true)
	defer s.writing.Store(false)
	s.conn.SetWriteDeadline(time.Now().Add(s.b.cfg.WriteTimeout))
	_, err := s.conn.Write(p)
	return err
}
