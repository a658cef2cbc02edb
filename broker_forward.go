package main

// Delivery between sidecars. A sidecar with subscribers for topic T
// registers itself under the registry service topic:T, one node per queue
// group (metadata queue=G) and one for its broadcast subscribers. A
// publishing sidecar plans each message: its own broadcast subscribers, one
// forward to each peer with broadcast subscribers, and for each queue group
// one sidecar in turn among those with members (itself included). Forwards
// to a peer are batched and posted to its /broker, marked forwarded; the
// peer delivers them locally and never forwards them again.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"
)

const (
	// forwardedToHeader names the sidecars (their ids, comma separated)
	// that the registry has at the address a batch goes to. A sidecar not
	// among them refuses the batch with 410: it came by a stale entry of an
	// earlier process, under another spelling of this sidecar's address,
	// and this sidecar's own entry brings it each message already.
	forwardedToHeader = "Micro-Broker-To"
	// forwardedHeader marks a POST to /broker as a batch of messages
	// forwarded by a peer; its value is the sending sidecar's id.
	forwardedHeader = "Micro-Broker-Forwarded"
	// reroutesHeader says the sender reads its answer's no_member (it gives
	// those queue groups to their other members) and refused (it counts
	// those items lost). A sender without it (an older sidecar) does not:
	// the peer counts the former as lost, and refuses a batch with the
	// latter whole, as before.
	reroutesHeader = "Micro-Broker-Reroutes"
	// forwardContentType is the batch format of encodeForward.
	forwardContentType = "application/vnd.micro.broker-batch.v1"

	// maxPeerQueue bounds the messages waiting for one peer; beyond it
	// they are dropped, counted and logged.
	maxPeerQueue = 16384
	// maxPeerQueueBytes bounds the bytes waiting for one peer; a queue
	// with nothing waiting takes one message of any size.
	maxPeerQueueBytes = 64 << 20
	// maxPeers bounds the peers with a queue at one time.
	maxPeers = 1024
	// maxForwardItems and maxForwardBytes bound one forwarded batch; an
	// item larger than maxForwardBytes goes in a batch of its own.
	maxForwardItems = 4096
	maxForwardBytes = 4 << 20
	// peerCacheTTL bounds how long a topic's peer list is reused; the
	// registry watch invalidates it sooner on any change.
	peerCacheTTL = 2 * time.Second
	// forwardTimeout bounds one forward request.
	forwardTimeout = 10 * time.Second
)

// peerNode is one topic registration of another sidecar.
// peerAddr is where a peer's API is reached: "scheme://host:port" when its
// entry says how it serves (a fleet moving to TLS holds both kinds), else
// "host:port", reached as this sidecar serves (entries of sidecars that do
// not say).
func peerAddr(n Node) string {
	if s := n.Metadata["scheme"]; s == "http" || s == "https" {
		return s + "://" + n.hostPort()
	}
	return n.hostPort()
}

type peerNode struct {
	addr  string // where its API is reached: see peerAddr
	queue string // "" for broadcast subscribers
	id    string // the sidecar's id, from its entry's metadata
}

// deliveryPlan says where one message goes.
type deliveryPlan struct {
	local    localDelivery
	forwards []forwardPlan // one per peer, sorted by address
}

type localDelivery struct {
	broadcast bool
	groups    []string
}

type forwardPlan struct {
	addr string
	ids  []string // the sidecars registered at addr
	localDelivery
}

// planDelivery decides where one message published here goes: to the
// local broadcast subscribers; to every peer with broadcast subscribers;
// and for each queue group to one sidecar with members, chosen in turn
// by rr among them (this one first, then the peers in address order).
// peers must not include this sidecar; groups are the local groups,
// sorted. It is pure: the same input gives the same plan.
func planDelivery(localBroadcast bool, localGroups []string, peers []peerNode, rr uint64) deliveryPlan {
	plan := deliveryPlan{local: localDelivery{broadcast: localBroadcast}}
	byAddr := map[string]*forwardPlan{}
	to := func(addr string) *forwardPlan {
		f := byAddr[addr]
		if f == nil {
			f = &forwardPlan{addr: addr}
			byAddr[addr] = f
		}
		return f
	}
	candidates := map[string][]string{} // group -> addresses, "" for this sidecar
	for _, g := range localGroups {
		candidates[g] = []string{""}
	}
	ids := map[string][]string{}
	for _, p := range peers {
		if p.id != "" && !slices.Contains(ids[p.addr], p.id) {
			ids[p.addr] = append(ids[p.addr], p.id)
		}
		if p.queue == "" {
			to(p.addr).broadcast = true
			continue
		}
		if !slices.Contains(candidates[p.queue], p.addr) {
			candidates[p.queue] = append(candidates[p.queue], p.addr)
		}
	}
	groups := make([]string, 0, len(candidates))
	for g := range candidates {
		groups = append(groups, g)
	}
	slices.Sort(groups)
	for _, g := range groups {
		c := candidates[g]
		if c[0] == "" {
			slices.Sort(c[1:])
		} else {
			slices.Sort(c)
		}
		switch pick := c[rr%uint64(len(c))]; pick {
		case "":
			plan.local.groups = append(plan.local.groups, g)
		default:
			f := to(pick)
			f.groups = append(f.groups, g)
		}
	}
	for _, f := range byAddr {
		f.ids = ids[f.addr]
		plan.forwards = append(plan.forwards, *f)
	}
	slices.SortFunc(plan.forwards, func(a, b forwardPlan) int { return strings.Compare(a.addr, b.addr) })
	return plan
}

// peersOf extracts the other sidecars' registrations from a topic's
// registry entry. A node is this sidecar's own when it carries this
// sidecar's id or this sidecar's address (a stale entry of an earlier run
// at the same address must not make it forward to itself). Only broker
// entries of a sidecar count; with a token, only those that prove it (see
// peerProof): the others are returned as refused.
func peersOf(versions []Service, selfID, selfAddr, token string) (peers []peerNode, refused []Node) {
	var out []peerNode
	for _, v := range versions {
		topic := strings.TrimPrefix(v.Name, topicService)
		for _, n := range v.Nodes {
			if n.Metadata["sidecar"] == selfID || n.hostPort() == selfAddr {
				continue
			}
			if !isBrokerEntry(n) || token != "" && !provesToken(n, token, topic) {
				refused = append(refused, n)
				continue
			}
			p := peerNode{addr: peerAddr(n), queue: n.Metadata["queue"], id: n.Metadata["sidecar"]}
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
	}
	slices.SortFunc(out, func(a, b peerNode) int {
		if c := strings.Compare(a.addr, b.addr); c != 0 {
			return c
		}
		if c := strings.Compare(a.queue, b.queue); c != 0 {
			return c
		}
		return strings.Compare(a.id, b.id)
	})
	return out, refused
}

// isBrokerEntry reports whether a topic entry's node is a sidecar's, as
// registration makes them: an app that registers a service named topic:T
// is no peer to send messages to.
func isBrokerEntry(n Node) bool {
	return n.Metadata["broker"] == "1" && n.Metadata["sidecar"] != ""
}

// peerProof is what a sidecar with a token puts in its topic entries
// (metadata "auth"): an HMAC of the entry keyed by the token. A sidecar
// with a token forwards, and so hands its token and messages, only to
// entries that prove it: anyone who can write the registry (with mDNS,
// any host on the LAN) can announce a topic entry, but only a holder of
// the token can make one another sidecar believes. The proof covers where
// messages go (scheme, address) and what for (sidecar, topic, queue): it
// cannot be moved to another address, nor turned from https to http.
func peerProof(token, sidecar, scheme, hostPort, topic, queue string) string {
	mac := hmac.New(sha256.New, []byte(token))
	for _, field := range []string{"micro-broker-peer-v1", sidecar, scheme, hostPort, topic, queue} {
		mac.Write(binary.BigEndian.AppendUint32(nil, uint32(len(field)))) // lengths first: no two entries make the same input
		mac.Write([]byte(field))
	}
	return base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
}

// provesToken reports whether a topic entry's node carries a proof of
// token for what it says.
func provesToken(n Node, token, topic string) bool {
	want := peerProof(token, n.Metadata["sidecar"], n.Metadata["scheme"], n.hostPort(), topic, n.Metadata["queue"])
	return hmac.Equal([]byte(n.Metadata["auth"]), []byte(want))
}

// forwardItem is one message for one peer, with what the peer should do
// with it.
type forwardItem struct {
	topic     string
	broadcast bool
	groups    []string
	event     []byte
	to        []string      // the sidecars registered at the peer's address (sent as a header, not in the item)
	split     *splitMessage // shared by the pieces of a message split by splitGroups; nil: whole
	rerouted  bool          // its groups were refused by another peer already: not rerouted again
	refused   string        // why a receiver does not deliver it (an event over its limit); empty: delivered
}

// splitMessage is what the pieces of a split message share: whether the
// message was counted lost, by the first of them found undelivered, in
// whichever batch each piece went.
type splitMessage struct{ lost atomic.Bool }

// countLoss reports whether it, found undelivered, is its message's first
// loss, which the caller counts: a message counts once, not once a piece.
func (it forwardItem) countLoss() bool {
	return it.split == nil || it.split.lost.CompareAndSwap(false, true)
}

// messagesIn counts the messages of a failed batch not counted lost
// already: what was lost, not how it was cut.
func messagesIn(batch []forwardItem) int {
	n := 0
	for _, it := range batch {
		if it.countLoss() {
			n++
		}
	}
	return n
}

// encodeForward appends the batch format: per item, a header line
// "TOPIC FLAGS LENGTH [GROUP...]\n" (FLAGS is "b" to deliver to the
// broadcast subscribers, "-" not to), then LENGTH bytes of CloudEvent JSON
// and "\n". Names never hold spaces, so the line splits cleanly.
func encodeForward(dst []byte, items []forwardItem) []byte {
	for _, it := range items {
		dst = append(dst, it.topic...)
		if it.broadcast {
			dst = append(dst, " b "...)
		} else {
			dst = append(dst, " - "...)
		}
		dst = strconv.AppendInt(dst, int64(len(it.event)), 10)
		for _, g := range it.groups {
			dst = append(dst, ' ')
			dst = append(dst, g...)
		}
		dst = append(dst, '\n')
		dst = append(dst, it.event...)
		dst = append(dst, '\n')
	}
	return dst
}

// decodeForward parses a batch from a peer and validates every name and
// event; the events alias body.
func decodeForward(body []byte, maxEvent int64) ([]forwardItem, error) {
	var items []forwardItem
	for len(body) > 0 {
		if len(items) >= maxForwardItems {
			return nil, fmt.Errorf("batch: more than %d messages", maxForwardItems)
		}
		nl := bytes.IndexByte(body, '\n')
		if nl < 0 || nl > maxForwardLine {
			return nil, fmt.Errorf("batch item %d: header line missing or too long", len(items))
		}
		fields := strings.Fields(string(body[:nl]))
		body = body[nl+1:]
		if len(fields) < 3 || (fields[1] != "b" && fields[1] != "-") {
			return nil, fmt.Errorf("batch item %d: want TOPIC b|- LENGTH [GROUP...]", len(items))
		}
		it := forwardItem{topic: fields[0], broadcast: fields[1] == "b"}
		if err := checkNames(it.topic, ""); err != nil {
			return nil, fmt.Errorf("batch item %d: %w", len(items), err)
		}
		n, err := strconv.Atoi(fields[2])
		if err != nil || n < 0 || n >= len(body) || body[n] != '\n' {
			return nil, fmt.Errorf("batch item %d: bad length %q", len(items), truncate(fields[2], 20))
		}
		for _, g := range fields[3:] {
			if !validTopicName(g, maxQueueLen) {
				return nil, fmt.Errorf("batch item %d: queue %q is not valid", len(items), truncate(g, 64))
			}
			it.groups = append(it.groups, g)
		}
		if g, ok := repeatedName(it.groups); ok { // each group gets a message once
			return nil, fmt.Errorf("batch item %d: queue %q named twice", len(items), truncate(g, 64))
		}
		it.event = body[:n:n]
		body = body[n+1:]
		if int64(n) > maxEvent {
			// A peer with a higher limit (a rolling change of it): this
			// item alone is refused, not the batch, whose other messages
			// are fine here.
			it.refused = fmt.Sprintf("an event of %d bytes, over the %d a publish here can make", n, maxEvent)
			items = append(items, it)
			continue
		}
		if !utf8.Valid(it.event) {
			// Subscribers get events in text frames, which must be UTF-8,
			// as a publish here must be.
			return nil, fmt.Errorf("batch item %d: the event is not UTF-8", len(items))
		}
		var head struct {
			SpecVersion string `json:"specversion"`
			ID          string `json:"id"`
			Topic       string `json:"topic"`
		}
		if err := json.Unmarshal(it.event, &head); err != nil || head.SpecVersion != "1.0" || head.ID == "" || head.Topic != it.topic {
			return nil, fmt.Errorf("batch item %d: not a CloudEvent of topic %s", len(items), it.topic)
		}
		items = append(items, it)
	}
	return items, nil
}

// repeatedName returns a name that names holds twice, if any.
func repeatedName(names []string) (string, bool) {
	if len(names) < 2 {
		return "", false
	}
	sorted := slices.Sorted(slices.Values(names))
	for i := 1; i < len(sorted); i++ {
		if sorted[i] == sorted[i-1] {
			return sorted[i], true
		}
	}
	return "", false
}

// forwarder keeps a queue and at most one request in flight per peer, so
// that a peer gets a topic's messages in order, in batches as large as
// what piled up during the previous request.
type forwarder struct {
	b      *broker
	client *http.Client
	gen    atomic.Uint64 // bumped on every registry change to a topic

	cacheMu sync.Mutex // guards cache
	cache   map[string]*peerEntry

	mu     sync.Mutex // guards peers, closed, held
	peers  map[string]*peerQueue
	closed bool
	held   int            // event bytes queued for peers or being posted, against --broker_memory_bytes
	wg     sync.WaitGroup // one per running peer worker

	failLog  logLimiter // forward failures, per peer
	entryLog logLimiter // topic entries ignored or reached in plain HTTP, per entry

	unloggedMu sync.Mutex     // guards unlogged
	unlogged   map[string]int // messages lost to a peer since the last line: its failures by its address, other losses by a prefix and it (refusedPrefix, droppedPrefix); at most maxLogKeys keys
	nUnlogged  atomic.Int32   // len(unlogged), read without the lock after every batch

	downMu sync.Mutex          // guards down
	down   map[string]peerDown // peers that refused a batch or could not be reached, by address
	nDown  atomic.Int32        // len(down), read without the lock on every publish

	absentMu    sync.Mutex              // guards absent
	absent      map[string]groupAbsence // groups a peer said it has no member of, by absenceKey
	nAbsent     atomic.Int32            // len(absent), read without the lock on every publish
	absentGen   atomic.Uint64           // gen when an absence was last noted: a change since ends them all
	absentUntil atomic.Int64            // UnixNano when the last noted absence lapses
}

// groupAbsence is a peer's word that a queue group has no member there,
// while the registry still says it has (an earlier process's entry at a
// restarted sidecar's address): the group's messages go to its other
// members, in order, rather than there and back, until the topics'
// entries change or maxDownBackoff passes.
type groupAbsence struct {
	gen   uint64 // forwarder.gen when said
	until time.Time
}

func absenceKey(addr, topic, group string) string { return addr + "\x00" + topic + "\x00" + group }

// peerDown is a peer that refused a batch, or could not be reached: queue
// groups go to their other members until it is tried again, after a
// backoff that doubles with each failure in a row.
type peerDown struct {
	until    time.Time
	failures int
}

// peerEntry caches the peers of one topic. Bounded by maxPeerCache
// entries; on overflow the entries without peers or past their time go,
// and if that frees nothing, all.
type peerEntry struct {
	gen     uint64
	expires time.Time
	peers   []peerNode
	rr      atomic.Uint64
}

const maxPeerCache = 4096

// peerQueue is the messages waiting for one peer.
type peerQueue struct {
	addr    string
	items   []forwardItem
	bytes   int
	running bool
}

func newForwarder(b *broker) *forwarder {
	return &forwarder{
		b: b,
		client: &http.Client{
			Timeout: forwardTimeout,
			Transport: &http.Transport{
				Proxy:                 nil, // peers are reached directly, never through an environment proxy
				DialContext:           (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
				MaxIdleConnsPerHost:   2,
				MaxConnsPerHost:       4,
				IdleConnTimeout:       90 * time.Second,
				ResponseHeaderTimeout: forwardTimeout,
				TLSClientConfig:       &tls.Config{RootCAs: b.cfg.PeerRoots},
			},
		},
		cache:    map[string]*peerEntry{},
		peers:    map[string]*peerQueue{},
		failLog:  logLimiter{every: 10 * time.Second},
		entryLog: logLimiter{every: 10 * time.Minute},
		unlogged: map[string]int{},
	}
}

// peerRoots returns the CAs a sidecar serving HTTPS with certFile trusts
// in its peers: the system's, and every certificate in certFile. Sidecars
// that share a self-signed certificate, or whose chain files end in their
// private CA, then reach each other with no more setup; other CAs go in
// SSL_CERT_FILE or SSL_CERT_DIR, as for any Go program.
func peerRoots(certFile string) (*x509.CertPool, error) {
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	data, err := os.ReadFile(certFile)
	if err != nil {
		return nil, err
	}
	if !pool.AppendCertsFromPEM(data) {
		return nil, fmt.Errorf("%s: no PEM certificate", certFile)
	}
	return pool, nil
}

// watch invalidates cached peer lists whenever a topic registration
// changes, until ctx ends.
func (f *forwarder) watch(ctx context.Context) {
	for {
		w := f.b.reg.table.watch("")
		f.gen.Add(1) // whatever happened before this watch began
	events:
		for {
			select {
			case <-ctx.Done():
				f.b.reg.table.unwatch(w)
				return
			case evs, ok := <-w.ch:
				if !ok { // fell behind: start over
					break events
				}
				for _, ev := range evs {
					if strings.HasPrefix(ev.Service.Name, topicService) {
						f.gen.Add(1)
						break
					}
				}
			}
		}
	}
}

// peersFor returns the other sidecars registered for topic, and the
// topic's round-robin counter.
func (f *forwarder) peersFor(topic string) ([]peerNode, *atomic.Uint64) {
	gen, now := f.gen.Load(), time.Now()
	f.cacheMu.Lock()
	e := f.cache[topic]
	f.cacheMu.Unlock()
	if e != nil && e.gen == gen && now.Before(e.expires) {
		return e.peers, &e.rr
	}
	versions, _ := f.b.reg.GetService(topicService + topic)
	peers, refused := peersOf(versions, f.b.id, f.b.advertise, f.b.cfg.AuthToken)
	for _, n := range refused {
		f.warnRefused(topic, n)
	}
	for _, p := range peers {
		f.warnPlain(p)
	}
	next := &peerEntry{gen: gen, expires: now.Add(peerCacheTTL), peers: peers}
	if e != nil {
		next.rr.Store(e.rr.Load())
	}
	f.cacheMu.Lock()
	if len(f.cache) >= maxPeerCache {
		// Topics published to without peers (any name a client makes up)
		// and stale entries go first: the round-robin positions of the
		// topics with peers are worth keeping.
		for k, old := range f.cache {
			if len(old.peers) == 0 || !now.Before(old.expires) {
				delete(f.cache, k)
			}
		}
		if len(f.cache) >= maxPeerCache {
			f.cache = map[string]*peerEntry{}
		}
	}
	f.cache[topic] = next
	f.cacheMu.Unlock()
	return next.peers, &next.rr
}

// warnRefused says, now and then, why a topic entry gets no messages.
func (f *forwarder) warnRefused(topic string, n Node) {
	if !f.entryLog.allow("refused " + topic + " " + n.ID + " " + n.hostPort()) {
		return
	}
	why := "it is no sidecar's broker entry (it lacks the broker and sidecar metadata)"
	if isBrokerEntry(n) {
		why = "it does not prove this sidecar's --auth_token: its sidecar has another token, or none, or is of an earlier release; sidecars that share topics need the same token"
	}
	f.b.log.Warn("ignoring a topic entry: no messages go to it", "topic", topic, "queue", n.Metadata["queue"], "peer", n.hostPort(), "sidecar", n.Metadata["sidecar"], "reason", why)
}

// warnPlain says, now and then, that a sidecar serving HTTPS forwards to
// a peer in plain HTTP, as the peer's entry says it serves (a fleet moving
// to TLS one sidecar at a time).
func (f *forwarder) warnPlain(p peerNode) {
	if f.b.cfg.PeerScheme != "https" || !strings.HasPrefix(p.addr, "http://") || !f.entryLog.allow("plain "+p.addr) {
		return
	}
	f.b.log.Warn("forwarding to a peer sidecar in plain HTTP, as its entry says it serves: messages cross the network unencrypted", "peer", p.addr, "sidecar", p.id)
}

// plan is planDelivery over the current registry, queue groups kept off
// peers that are down while they have other members.
func (f *forwarder) plan(topic string, localBroadcast bool, localGroups []string) deliveryPlan {
	peers, rr := f.peersFor(topic)
	if len(peers) == 0 && len(localGroups) == 0 {
		return deliveryPlan{local: localDelivery{broadcast: localBroadcast}}
	}
	if f.nDown.Load() > 0 || f.absences() {
		peers = withoutDown(peers, localGroups, f.leftOut(topic))
	}
	return planDelivery(localBroadcast, localGroups, peers, rr.Add(1)-1)
}

// withoutDown leaves out the queue-group entries of peers that are down,
// for the groups that have another member: a group whose members are all
// down keeps them, as a message for it is lost anyway unless one is back.
// Broadcast entries stay: every peer with broadcast subscribers gets each
// message.
func withoutDown(peers []peerNode, localGroups []string, down func(p peerNode) bool) []peerNode {
	alive := map[string]bool{} // groups with a member that is not down
	for _, g := range localGroups {
		alive[g] = true
	}
	for _, p := range peers {
		if p.queue != "" && !down(p) {
			alive[p.queue] = true
		}
	}
	var out []peerNode
	for _, p := range peers {
		if p.queue != "" && alive[p.queue] && down(p) {
			continue
		}
		out = append(out, p)
	}
	return out
}

// leftOut says which queue-group entries of topic withoutDown leaves
// out: those of peers that are down, and those a peer said have no member.
func (f *forwarder) leftOut(topic string) func(p peerNode) bool {
	return func(p peerNode) bool {
		return f.nDown.Load() > 0 && f.isDown(p.addr) || p.queue != "" && f.absences() && f.isAbsent(p.addr, topic, p.queue)
	}
}

// markAbsent notes a peer's word that groups of topic have no member there.
func (f *forwarder) markAbsent(addr, topic string, groups []string) {
	now := time.Now()
	f.absentMu.Lock()
	defer f.absentMu.Unlock()
	if f.absent == nil {
		f.absent = map[string]groupAbsence{}
	}
	for _, g := range groups {
		k := absenceKey(addr, topic, g)
		if _, ok := f.absent[k]; !ok && len(f.absent) >= maxLogKeys {
			for k, a := range f.absent {
				if !now.Before(a.until) || a.gen != f.gen.Load() {
					delete(f.absent, k)
				}
			}
			if len(f.absent) >= maxLogKeys {
				break // a bound: the group's messages go there and back as before
			}
		}
		f.absent[k] = groupAbsence{gen: f.gen.Load(), until: now.Add(maxDownBackoff)}
	}
	f.absentGen.Store(f.gen.Load())
	f.absentUntil.Store(now.Add(maxDownBackoff).UnixNano())
	f.nAbsent.Store(int32(len(f.absent)))
}

// absences reports whether an absence may hold, cheaply, for every
// publish; once none can (the topics' entries changed, or the last one
// lapsed), it forgets them all, so that publishes no longer ask.
func (f *forwarder) absences() bool {
	if f.nAbsent.Load() == 0 {
		return false
	}
	if f.absentGen.Load() == f.gen.Load() && time.Now().UnixNano() < f.absentUntil.Load() {
		return true
	}
	f.absentMu.Lock()
	defer f.absentMu.Unlock()
	if f.absentGen.Load() == f.gen.Load() && time.Now().UnixNano() < f.absentUntil.Load() {
		return true // noted again meanwhile
	}
	clear(f.absent)
	f.nAbsent.Store(0)
	return false
}

// isAbsent reports whether the peer at addr said group of topic has no
// member there, since the topics' entries last changed.
func (f *forwarder) isAbsent(addr, topic, group string) bool {
	f.absentMu.Lock()
	defer f.absentMu.Unlock()
	a, ok := f.absent[absenceKey(addr, topic, group)]
	return ok && a.gen == f.gen.Load() && time.Now().Before(a.until)
}

func (f *forwarder) isDown(addr string) bool {
	f.downMu.Lock()
	defer f.downMu.Unlock()
	d, ok := f.down[addr]
	return ok && time.Now().Before(d.until)
}

// maxDownBackoff bounds how long a peer is kept out of queue groups: a
// crashed sidecar's entries lapse with --register_ttl (30 s by default).
const maxDownBackoff = 30 * time.Second

// markDown keeps queue groups off addr for a while, and longer with each
// failure in a row.
func (f *forwarder) markDown(addr string) {
	f.downMu.Lock()
	defer f.downMu.Unlock()
	if f.down == nil {
		f.down = map[string]peerDown{}
	}
	d := f.down[addr]
	if d.failures == 0 && len(f.down) >= maxPeers {
		f.forgetLapsedDown()
	}
	if d.failures == 0 && len(f.down) >= maxPeers {
		return // a bound, like the peer queues'; the groups' rotation goes on as before
	}
	d.failures++
	d.until = time.Now().Add(min(time.Second<<min(d.failures-1, 5), maxDownBackoff))
	f.down[addr] = d
	f.nDown.Store(int32(len(f.down)))
}

// forgetLapsedDown drops the peers whose backoff ended over
// maxDownBackoff ago without a failure since: gone for good, most of them
// (a pod's address, a changed port), they would otherwise fill the table
// and keep the peers that fail now in rotation. Called with downMu held.
func (f *forwarder) forgetLapsedDown() {
	before := time.Now().Add(-maxDownBackoff)
	for addr, d := range f.down {
		if d.until.Before(before) {
			delete(f.down, addr)
		}
	}
	f.nDown.Store(int32(len(f.down)))
}

// markUp forgets a peer's failures once a batch went through.
func (f *forwarder) markUp(addr string) {
	if f.nUnlogged.Load() > 0 {
		f.unloggedMu.Lock()
		lost := f.takeUnlogged(addr)
		f.unloggedMu.Unlock()
		if lost > 0 {
			f.b.log.Warn("forwarding to a peer sidecar works again; more messages were lost before it did (delivery is at most once)", "peer", addr, "messages", lost)
		}
	}
	if f.nDown.Load() == 0 {
		return
	}
	f.downMu.Lock()
	defer f.downMu.Unlock()
	delete(f.down, addr)
	f.nDown.Store(int32(len(f.down)))
}

// reroute gives the queue groups of a batch that the peer at addr refused,
// or never received, to their other members, here or at other peers: a
// refused batch is certainly undelivered, so no member gets a message
// twice. It returns the messages lost: those for broadcast subscribers
// when broadcastLost, and those with a group that has no other member or
// was rerouted once already. A message split into pieces (splitGroups)
// counts once, as in messagesIn.
func (f *forwarder) reroute(addr string, batch []forwardItem, broadcastLost bool) int {
	lost := 0
	for _, it := range batch {
		itemLost := broadcastLost && it.broadcast
		if len(it.groups) > 0 {
			unplanned, missing := f.rerouteGroups(addr, it)
			f.b.stats.NoSubscriber.Add(uint64(missing))
			itemLost = unplanned || itemLost
		}
		if itemLost && it.countLoss() {
			lost++
		}
	}
	return lost
}

// rerouteGroups plans the groups of it again without addr, and reports whether
// any was left without a member, and how many planned here found none to
// take it (members closing meanwhile).
func (f *forwarder) rerouteGroups(addr string, it forwardItem) (unplanned bool, missing int) {
	if it.rerouted {
		return true, 0
	}
	_, localGroups := f.b.localView(it.topic)
	peers, rr := f.peersFor(it.topic)
	var mine []string
	for _, g := range localGroups {
		if slices.Contains(it.groups, g) {
			mine = append(mine, g)
		}
	}
	var others []peerNode
	for _, p := range peers {
		if p.queue != "" && p.addr != addr && slices.Contains(it.groups, p.queue) {
			others = append(others, p)
		}
	}
	if f.nDown.Load() > 0 || f.absences() {
		// As plan: a member known down would refuse it again, and a
		// rerouted message is not rerouted twice.
		others = withoutDown(others, mine, f.leftOut(it.topic))
	}
	plan := planDelivery(false, mine, others, rr.Add(1)-1)
	planned := len(plan.local.groups)
	m := newMessage(it.topic, "", it.event)
	missing = len(f.b.deliver(m, false, plan.local.groups))
	for i := range plan.forwards {
		planned += len(plan.forwards[i].groups)
	}
	f.sendRerouted(m, plan.forwards)
	return planned < len(it.groups), missing
}

// send queues m for each forward. It never blocks on a peer: a full queue
// drops the message, counted.
func (f *forwarder) send(m *message, forwards []forwardPlan) {
	f.sendItems(m, forwards, false)
}

// sendRerouted is send for the groups of a batch another peer refused.
func (f *forwarder) sendRerouted(m *message, forwards []forwardPlan) {
	f.sendItems(m, forwards, true)
}

func (f *forwarder) sendItems(m *message, forwards []forwardPlan, rerouted bool) {
	for _, fp := range forwards {
		item := forwardItem{topic: m.topic, broadcast: fp.broadcast, groups: fp.groups, event: m.event, to: fp.ids, rerouted: rerouted}
		// Whatever becomes of it: a loss counts in ForwardDropped too.
		f.b.stats.Forwarded.Add(1)
		var err error
		pieces := splitGroups(item)
		for _, piece := range pieces {
			err = cmp.Or(f.enqueue(fp.addr, piece), err)
		}
		if err != nil && pieces[0].countLoss() { // queued pieces that fail later count no more
			f.b.stats.ForwardDropped.Add(1)
			if err != errForwarderClosed {
				f.logDropped(fp.addr, 1, err)
			}
		}
	}
}

// Why enqueue refused a message.
var (
	errForwarderClosed = errors.New("the sidecar is shutting down")
	errTooManyPeers    = fmt.Errorf("messages wait for %d peers, the most at a time", maxPeers)
	errPeerQueueFull   = fmt.Errorf("its queue is full (%d messages or %d MiB waiting): the peer takes batches slower than they come", maxPeerQueue, maxPeerQueueBytes>>20)
	errForwardMemory   = errors.New("what waits for peers fills --broker_memory_bytes")
)

// maxForwardLine bounds an item's header line in a batch.
const maxForwardLine = 4096

// splitGroups splits an item for more queue groups than one header line
// holds into items of the same event, each for some of the groups and the
// first alone for the broadcast subscribers: each group still gets the
// message once.
func splitGroups(it forwardItem) []forwardItem {
	base := len(it.topic) + len(" b ") + 20 // 20: the longest length
	var out []forwardItem
	var shared *splitMessage
	start, size := 0, base
	for i, g := range it.groups {
		if size+1+len(g) > maxForwardLine && i > start {
			if shared == nil {
				shared = &splitMessage{}
			}
			out = append(out, forwardItem{topic: it.topic, broadcast: it.broadcast && len(out) == 0, groups: it.groups[start:i:i], event: it.event, to: it.to, split: shared, rerouted: it.rerouted})
			start, size = i, base
		}
		size += 1 + len(g)
	}
	return append(out, forwardItem{topic: it.topic, broadcast: it.broadcast && len(out) == 0, groups: it.groups[start:], event: it.event, to: it.to, split: shared, rerouted: it.rerouted})
}

// encodedSize is what it takes in a batch, header line and all.
func (it forwardItem) encodedSize() int {
	n := len(it.topic) + len(" b ") + len(strconv.Itoa(len(it.event))) + 1 + len(it.event) + 1
	for _, g := range it.groups {
		n += 1 + len(g)
	}
	return n
}

// enqueue queues it for the peer at addr, or says why not. A message
// alone may be of any size (up to 6 times --broker_max_payload_bytes, as
// an event): it is refused only for what waits before it.
func (f *forwarder) enqueue(addr string, it forwardItem) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return errForwarderClosed
	}
	p := f.peers[addr]
	if p == nil {
		if len(f.peers) >= maxPeers {
			return errTooManyPeers
		}
		p = &peerQueue{addr: addr}
		f.peers[addr] = p
	}
	switch {
	case len(p.items) >= maxPeerQueue || p.bytes > 0 && p.bytes+len(it.event) > maxPeerQueueBytes:
		return errPeerQueueFull
	case f.held > 0 && f.held+len(it.event) > f.b.cfg.MemoryBytes:
		return errForwardMemory
	}
	p.items = append(p.items, it)
	p.bytes += len(it.event)
	f.held += len(it.event)
	if !p.running {
		p.running = true
		f.wg.Add(1)
		go f.work(p)
	}
	return nil
}

// batchLen is how many of the items waiting for a peer go in its next
// batch: those planned for the same sidecars (a batch names them,
// forwardedToHeader), up to maxForwardItems and maxForwardBytes. An item
// that would take the batch past maxForwardBytes waits for the next one,
// unless it is the first: a peer refuses the whole of a batch larger
// than its maxForwardBody, and must be able to refuse an event too large
// for it alone.
func batchLen(items []forwardItem) int {
	n, size := 0, 0
	for n < len(items) && n < maxForwardItems && (n == 0 || size+items[n].encodedSize() <= maxForwardBytes) && slices.Equal(items[n].to, items[0].to) {
		size += items[n].encodedSize()
		n++
	}
	return n
}

// work posts p's queue in batches until it is empty, then removes p.
func (f *forwarder) work(p *peerQueue) {
	defer f.wg.Done()
	var body []byte
	for {
		f.mu.Lock()
		n := batchLen(p.items)
		if n == 0 {
			p.running = false
			delete(f.peers, p.addr)
			f.mu.Unlock()
			return
		}
		batch := slices.Clone(p.items[:n])
		p.items = p.items[n:]
		if len(p.items) == 0 {
			p.items = nil
		}
		batchBytes := 0
		for _, it := range batch {
			batchBytes += len(it.event)
		}
		p.bytes -= batchBytes
		f.mu.Unlock()

		body = encodeForward(body[:0], batch)
		ans, err := f.post(p.addr, batch[0].to, body)
		f.mu.Lock()
		f.held -= batchBytes // held until posted: a batch in flight is memory too
		f.mu.Unlock()
		switch {
		case err == nil:
			f.markUp(p.addr)
			if len(ans.NoMember) > 0 {
				missing := itemsWithoutMembers(batch, ans.NoMember)
				for _, it := range missing {
					f.markAbsent(p.addr, it.topic, it.groups)
				}
				f.b.stats.ForwardDropped.Add(uint64(f.reroute(p.addr, missing, false)))
			}
			if len(ans.Refused) > 0 {
				f.countRefused(p.addr, batch, ans.Refused)
			}
		case errors.Is(err, errStalePeer):
			// The sidecar at that address has its own entry, which brings
			// its broadcast subscribers each message already; the groups
			// the stale entry named are not its. They are kept off it, for
			// these topics alone, as a peer's word that it has no member:
			// the sidecar there is alive, and may have members of other
			// topics' groups (marked down, it lost them all, for as long
			// as the stale entry lasted and 30 s more).
			for _, it := range batch {
				if len(it.groups) > 0 {
					f.markAbsent(p.addr, it.topic, it.groups)
				}
			}
			f.b.stats.ForwardDropped.Add(uint64(f.reroute(p.addr, batch, false)))
			f.b.log.Debug("a stale topic entry names a sidecar at an address another answers", "peer", p.addr, "error", err)
		case len(batch) == 1 && refusedAsTooLarge(err):
			// One event over the peer's limit for a whole batch, refused
			// as an event over its limit would be within one.
			f.countRefused(p.addr, batch, []refusedItem{{Item: 0, Reason: err.Error()}})
		case undelivered(err):
			f.markDown(p.addr)
			lost := f.reroute(p.addr, batch, true)
			f.b.stats.ForwardDropped.Add(uint64(lost))
			f.logFailure(p.addr, lost, err)
		default:
			lost := messagesIn(batch)
			f.b.stats.ForwardDropped.Add(uint64(lost))
			f.logFailure(p.addr, lost, err)
		}
	}
}

// countRefused counts lost the items of batch a peer took the batch but
// not these for (an event over its limit), and logs why.
func (f *forwarder) countRefused(addr string, batch []forwardItem, refused []refusedItem) {
	lost, reason := 0, ""
	seen := map[int]bool{}
	for _, r := range refused {
		if r.Item < 0 || r.Item >= len(batch) || seen[r.Item] {
			continue // a peer's mistake: nothing to count, or nothing again
		}
		seen[r.Item] = true
		if batch[r.Item].countLoss() {
			lost++
		}
		reason = cmp.Or(reason, r.Reason)
	}
	f.b.stats.ForwardDropped.Add(uint64(lost))
	f.logRefused(addr, lost, reason)
}

// itemsWithoutMembers is the part of batch that a peer found no member
// for: each item it names, with only those of its groups, and none of
// its broadcast, which was delivered.
func itemsWithoutMembers(batch []forwardItem, noMember []groupsOfItem) []forwardItem {
	var out []forwardItem
	seen := map[int]bool{}
	for _, nm := range noMember {
		if nm.Item < 0 || nm.Item >= len(batch) || seen[nm.Item] {
			continue // a peer's mistake: nothing to reroute, or nothing again
		}
		seen[nm.Item] = true
		it := batch[nm.Item]
		var groups []string
		for _, g := range nm.Groups {
			if slices.Contains(it.groups, g) && !slices.Contains(groups, g) {
				groups = append(groups, g)
			}
		}
		if len(groups) > 0 {
			it.broadcast, it.groups = false, groups
			out = append(out, it)
		}
	}
	return out
}

// errStalePeer is a peer's 410: the batch went by a stale entry.
var errStalePeer = errors.New("the sidecar there is another than the entry names")

// peerRefusal is a peer's answer other than 2xx: it refuses a batch whole,
// before delivering any of it.
type peerRefusal struct {
	msg  string
	code int // the answer's status
}

// refusedAsTooLarge reports whether err is a peer's 413.
func refusedAsTooLarge(err error) bool {
	var refusal *peerRefusal
	return errors.As(err, &refusal) && refusal.code == http.StatusRequestEntityTooLarge
}

func (e *peerRefusal) Error() string { return e.msg }

// undelivered reports whether a failed forward certainly delivered
// nothing: the peer could not be reached, its TLS handshake failed (a
// certificate this sidecar does not trust, a peer that speaks plain HTTP
// or refuses ours: the request is written after the handshake), or it
// refused the batch. A batch that timed out may yet be delivered.
func undelivered(err error) bool {
	var refusal *peerRefusal
	var op *net.OpError
	return errors.As(err, &refusal) || errors.As(err, &op) && op.Op == "dial" || tlsFailureOf(err) != tlsOK
}

// post sends a batch to the peer at addr and returns the groups it found
// no member for.
func (f *forwarder) post(addr string, ids []string, body []byte) (forwardAnswer, error) {
	base := addr
	if !strings.Contains(addr, "://") { // a peer that does not say: as this sidecar serves
		base = cmp.Or(f.b.cfg.PeerScheme, "http") + "://" + addr
	}
	req, err := http.NewRequest(http.MethodPost, base+"/broker", bytes.NewReader(body))
	if err != nil {
		return forwardAnswer{}, err
	}
	if f.b.cfg.AuthToken != "" {
		req.Header.Set("Authorization", "Bearer "+f.b.cfg.AuthToken)
	}
	req.Header.Set("Content-Type", forwardContentType)
	req.Header.Set(forwardedHeader, f.b.id)
	req.Header.Set(reroutesHeader, "1")
	if len(ids) > 0 {
		req.Header.Set(forwardedToHeader, strings.Join(ids, ","))
	}
	resp, err := f.client.Do(req)
	if err != nil {
		return forwardAnswer{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		// Read to its end (an error in the error shape, small), so that
		// the connection is kept for the next batch: a stale entry gets a
		// 410 for every batch until it lapses.
		defer io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	}
	switch resp.StatusCode {
	case http.StatusGone:
		return forwardAnswer{}, errStalePeer
	case http.StatusUnauthorized:
		return forwardAnswer{}, &peerRefusal{"peer refused this sidecar's token (401 Unauthorized): sidecars that share topics need the same --auth_token", resp.StatusCode}
	}
	if resp.StatusCode/100 != 2 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return forwardAnswer{}, &peerRefusal{fmt.Sprintf("peer answered %s: %s", resp.Status, bytes.TrimSpace(msg)), resp.StatusCode}
	}
	// The answer was a success, whatever its body: one that does not
	// decode (an older peer's, cut off) names no group to reroute.
	var ans forwardAnswer
	json.NewDecoder(io.LimitReader(resp.Body, maxForwardAnswer)).Decode(&ans)
	io.Copy(io.Discard, io.LimitReader(resp.Body, 4096))
	return ans, nil
}

// maxForwardAnswer bounds what is read of a peer's answer to a batch.
const maxForwardAnswer = 4 << 20

// logFailure logs forward failures at most once every ten seconds for
// each peer.
func (f *forwarder) logFailure(addr string, lost int, err error) {
	if lost, ok := f.loggable(addr, lost); ok {
		if lost == 0 {
			f.b.log.Warn("forwarding to a peer sidecar failed; its queue groups' messages went to other members", "peer", addr, "error", err)
			return
		}
		f.b.log.Warn("forwarding to a peer sidecar failed; messages lost (delivery is at most once)", "peer", addr, "messages", lost, "error", err)
	}
}

// The keys of a peer's losses other than its failures, in the unlogged
// losses and the log's limiter: messages it refused as too large for it,
// and messages dropped as its queue was full. They are logged apart from
// its failures (keyed by its address alone), as the peer works: its next
// batch must not read as its coming back (markUp).
const (
	refusedPrefix = "refused "
	droppedPrefix = "dropped "
)

func refusedKey(addr string) string { return refusedPrefix + addr }

// logDropped logs messages for a peer its queue could not take (err says
// why) at most once every ten seconds for each peer.
func (f *forwarder) logDropped(addr string, lost int, err error) {
	if lost, ok := f.loggable(droppedPrefix+addr, lost); ok {
		f.b.log.Warn("messages for a peer sidecar were dropped before they were sent (delivery is at most once)", "peer", addr, "messages", lost, "error", err)
	}
}

// logRefused logs a peer's refusals of messages too large for it at most
// once every ten seconds for each peer.
func (f *forwarder) logRefused(addr string, lost int, reason string) {
	if lost, ok := f.loggable(refusedKey(addr), lost); ok {
		f.b.log.Warn("a peer sidecar refused messages too large for it; they are lost (give sidecars that share topics the same --broker_max_payload_bytes)", "peer", addr, "messages", lost, "reason", truncate(reason, 200))
	}
}

// loggable reports whether a line about key may be logged now, with the
// losses to say: lost and those held back since the last line. When it may
// not, lost is held back, to be said by the next line or, if none comes,
// once the quiet time is over.
func (f *forwarder) loggable(key string, lost int) (int, bool) {
	f.unloggedMu.Lock()
	defer f.unloggedMu.Unlock()
	if !f.failLog.allow(key) {
		// Said with the next line for this peer: the log tells what was
		// lost, not what was lost at the first failure of ten seconds.
		if _, ok := f.unlogged[key]; lost > 0 && (ok || len(f.unlogged) < maxLogKeys) {
			f.unlogged[key] += lost
			f.nUnlogged.Store(int32(len(f.unlogged)))
			if !ok {
				f.sayUnloggedLater(key)
			}
		}
		return 0, false
	}
	return lost + f.takeUnlogged(key), true
}

// sayUnloggedLater logs the losses held back under key by the log's quiet
// time once it is over, unless a line for the peer (a failure, or its
// working again) said them first: a peer that is gone fails no more, and
// what was lost to it would otherwise never be said.
func (f *forwarder) sayUnloggedLater(key string) { f.sayUnloggedAfter(key, f.failLog.wait(key)) }

// sayUnloggedAfter is sayUnloggedLater, after d.
func (f *forwarder) sayUnloggedAfter(key string, d time.Duration) {
	time.AfterFunc(d, func() {
		f.unloggedMu.Lock()
		if f.unlogged[key] == 0 {
			f.unloggedMu.Unlock()
			return // said already
		}
		if !f.failLog.allow(key) {
			// The timer ran early, or the limiter is full of other peers
			// (then it says no wait, and would be asked again at once).
			f.sayUnloggedAfter(key, max(f.failLog.wait(key), time.Second))
			f.unloggedMu.Unlock()
			return
		}
		lost := f.takeUnlogged(key)
		f.unloggedMu.Unlock()
		if addr, ok := strings.CutPrefix(key, refusedPrefix); ok {
			f.b.log.Warn("a peer sidecar refused more messages too large for it since the last line for it; they are lost", "peer", addr, "messages", lost)
			return
		}
		if addr, ok := strings.CutPrefix(key, droppedPrefix); ok {
			f.b.log.Warn("more messages for a peer sidecar were dropped before they were sent since the last line for it", "peer", addr, "messages", lost)
			return
		}
		f.b.log.Warn("forwarding to a peer sidecar failed again; messages lost since the last line for it (delivery is at most once)", "peer", key, "messages", lost)
	})
}

// takeUnlogged returns the losses to addr not logged yet, and forgets
// them; unloggedMu is held.
func (f *forwarder) takeUnlogged(addr string) int {
	lost := f.unlogged[addr]
	delete(f.unlogged, addr)
	f.nUnlogged.Store(int32(len(f.unlogged)))
	return lost
}

// close refuses new forwards and waits for the queued ones, or for ctx.
func (f *forwarder) close(ctx context.Context) {
	f.mu.Lock()
	f.closed = true
	f.mu.Unlock()
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	f.client.CloseIdleConnections()
}

// maxForwardBody is the largest batch a sidecar accepts from a peer: a full
// batch (counted as encodedSize counts it) plus one item of the largest
// event, the payload escaped at worst six times its size (a JSON string of
// control characters). This sidecar sends one or the other (see work);
// earlier ones sent both.
func (f *forwarder) maxForwardBody() int64 {
	return maxForwardBytes + maxForwardLine + f.maxForwardEvent() + 2 // 2: the last item's newlines
}

// maxForwardEvent is the largest event a peer may forward: the largest
// payload escaped at worst, and room for the envelope's other fields.
func (f *forwarder) maxForwardEvent() int64 { return maxEventFor(f.b.cfg.MaxPayloadBytes) }

// maxEventFor is the largest event of a payload of at most payloadBytes.
func maxEventFor(payloadBytes int) int64 { return 6*int64(payloadBytes) + 64<<10 }

// forwardAnswer is a peer's answer to a batch it took. NoMember names, by
// their index in the batch, the items whose queue groups had no member
// here (a stale entry of an earlier process at this address, a last
// member just gone): the sender gives them to other members.
type forwardAnswer struct {
	Delivered int            `json:"delivered"`
	NoMember  []groupsOfItem `json:"no_member,omitempty"`
	Refused   []refusedItem  `json:"refused,omitempty"`
}

type groupsOfItem struct {
	Item   int      `json:"item"`
	Groups []string `json:"groups"`
}

// refusedItem names an item of a batch the peer did not deliver, and why;
// the sender counts it lost. An older sender ignores it.
type refusedItem struct {
	Item   int    `json:"item"`
	Reason string `json:"reason"`
}

// receive delivers a batch forwarded by a peer to the local subscribers.
// When the sender reroutes, the answer names the groups that had no member
// here (the sender counts what it cannot place); else they are counted
// here as without members.
func (f *forwarder) receive(body []byte, senderReroutes bool) (forwardAnswer, error) {
	items, err := decodeForward(body, f.maxForwardEvent())
	if err != nil {
		return forwardAnswer{}, err
	}
	if !senderReroutes {
		// An older sender reads no refused items: it gets the whole
		// batch refused, as before, and counts and logs the loss.
		for i, it := range items {
			if it.refused != "" {
				return forwardAnswer{}, fmt.Errorf("batch item %d: %s", i, it.refused)
			}
		}
	}
	var ans forwardAnswer
	for i, it := range items {
		if it.refused != "" {
			ans.Refused = append(ans.Refused, refusedItem{i, it.refused})
			continue
		}
		m := newMessage(it.topic, "", it.event)
		missing := f.b.deliver(m, it.broadcast, it.groups)
		switch {
		case len(missing) == 0:
		case senderReroutes:
			ans.NoMember = append(ans.NoMember, groupsOfItem{i, missing})
		default:
			f.b.stats.NoSubscriber.Add(uint64(len(missing)))
		}
	}
	if len(ans.Refused) > 0 {
		items = slices.DeleteFunc(slices.Clone(items), func(it forwardItem) bool { return it.refused != "" })
	}
	ans.Delivered = messagesReceived(items)
	f.b.stats.Received.Add(uint64(ans.Delivered))
	return ans, nil
}

// messagesReceived counts the messages of a batch from a peer: the pieces
// of a message split for its many groups (see splitGroups) follow one
// another with the same event, which no two messages share (ids differ).
func messagesReceived(items []forwardItem) int {
	n := 0
	for i, it := range items {
		if i == 0 || !bytes.Equal(it.event, items[i-1].event) {
			n++
		}
	}
	return n
}
