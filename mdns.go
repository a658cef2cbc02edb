package main

// The multicast registry backend: multicast DNS (RFC 6762) with DNS-based
// service discovery (RFC 6763). Every node registered on this sidecar is
// announced as an instance of _micro._tcp.local.; every answer heard on
// the chosen interfaces goes through a passive cache into the table, so
// that lookups never wait on the network. The records themselves are
// built and read by the pure functions of mdns_records.go and
// mdns_cache.go; this file only moves packets and keeps time.

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

const (
	mdnsPort = 5353
	// mdnsTick is how often the backend's loop runs its step: repeated
	// announcements, start queries, cache expiry and refresh queries.
	mdnsTick = 250 * time.Millisecond
	// mdnsRepeat is the gap between the two announcements of a new or
	// changed node (RFC 6762 section 8.3: at least two, one second apart).
	mdnsRepeat = time.Second
	// mdnsStartQueries is how many browse queries a starting sidecar sends,
	// mdnsRepeat apart (RFC 6762 section 5.2 asks for at least two).
	mdnsStartQueries = 2
	// mdnsMaxQuestions bounds the questions of one cache-refresh query.
	mdnsMaxQuestions = 48
)

// mdnsGroup is the IPv4 mDNS group (RFC 6762 section 3).
var mdnsGroup = netip.MustParseAddr("224.0.0.251")

// mdnsConfig is what the backend needs from the sidecar's config.
type mdnsConfig struct {
	// Interfaces names the interfaces to use. Empty: the loopback
	// interface when Loopback is set, else every up, multicast-capable
	// interface with an IPv4 address.
	Interfaces []string
	// Loopback says the advertised address is a loopback address, useless
	// to other hosts.
	Loopback bool
	// Port is the UDP port; zero means 5353.
	Port int
}

// mdnsStats counts what the backend did and dropped; the metrics issue
// exports them.
type mdnsStats struct {
	packetsIn    atomic.Uint64
	packetsOut   atomic.Uint64
	malformed    atomic.Uint64 // did not parse: dropped
	oversize     atomic.Uint64 // larger than 9000 bytes: dropped
	ignored      atomic.Uint64 // wrong interface, or a response not from port 5353
	rejected     atomic.Uint64 // _micro._tcp instances that do not make a valid node
	cacheFull    atomic.Uint64 // peers' records dropped at the cache's bound
	sendErrors   atomic.Uint64
	goodbyesSeen atomic.Uint64 // goodbyes for our own instances, answered by announcing again
	conflicts    atomic.Uint64 // records for our own instances or hosts, with other data, from someone else
}

// mdnsIface is one interface the backend joined.
type mdnsIface struct {
	name    string
	conn    *mdnsConn
	link    []netip.Prefix // the interface's subnets
	sendErr error          // the latest send's failure; guarded by mdnsBackend.mu
}

// linkPrefixes lists the subnets of ifi's addresses.
func linkPrefixes(ifi net.Interface) []netip.Prefix {
	addrs, _ := ifi.Addrs()
	var link []netip.Prefix
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, ok := netip.AddrFromSlice(ipn.IP)
		ones, _ := ipn.Mask.Size()
		if ok {
			ip = ip.Unmap()
			if ip.Is4() && ones > 32 {
				ones -= 96
			}
			link = append(link, netip.PrefixFrom(ip, ones).Masked())
		}
	}
	return link
}

// onLink reports whether addr is on one of the subnets of link.
func onLink(link []netip.Prefix, addr netip.Addr) bool {
	addr = addr.Unmap().WithZone("")
	for _, p := range link {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// mdnsLocal is one node this sidecar announces.
type mdnsLocal struct {
	rec      record
	ann      mdnsAnnouncement
	ttl      uint32    // seconds
	repeatAt time.Time // zero: no announcement pending
	again    bool      // after the pending one, one more a second later (RFC 6762 section 8.3)
	lastSent time.Time // when its records were last multicast
	// rescue marks the pending announcement as the answer to a goodbye
	// for the node, which goes at the next tick however recently the
	// records went out (see defendLocked); rescuedAt is when the last
	// such answer went, to keep them to one a second.
	rescue    bool
	rescuedAt time.Time

	// The announcement it replaced, and until when an echo of it is no
	// conflict: this sidecar hears its own packets, some still on their
	// way when the node changed.
	prev      mdnsAnnouncement
	prevUntil time.Time
}

// echoGrace is how long after a change this sidecar's own earlier records,
// heard back, are taken for echoes.
const echoGrace = 2 * time.Second

// ttlAt is the TTL to announce l with at now: what is left of its
// registration's life, so that the other caches expire it when this
// sidecar does. Announcing the whole TTL at every answer or repeat let a
// node posted once with ?ttl=10s live on other sidecars for 19 s (a
// peer's refresh query at 80% of the TTL got a whole TTL back).
func (l *mdnsLocal) ttlAt(now time.Time) uint32 {
	if l.rec.Expires.IsZero() {
		return l.ttl
	}
	left := l.rec.Expires.Sub(now)
	if left <= 0 {
		return mdnsMinTTL // expiring now; 0 would be a goodbye, and mdnsTTL's 0 means never
	}
	return max(min(mdnsTTL(left), l.ttl), mdnsMinTTL)
}

// mdnsMinTTL is the least TTL announced. Records go out at most once a
// second (RFC 6762 section 6), checked every 250 ms: an entry kept alive
// with ?ttl=1s, announced with 1 s, lapsed on the other caches between
// two announcements.
const mdnsMinTTL = 2

// mdnsBackend keeps the table current from the link and announces this
// sidecar's registrations on it.
type mdnsBackend struct {
	t     *table
	log   *slog.Logger
	now   func() time.Time
	port  int
	stats mdnsStats

	ifaces  []*mdnsIface // fixed once started
	joinErr error        // the interfaces that could not be joined, with what to do

	// sendMu is held from building packets that speak for local nodes
	// (announcements, answers, goodbyes) to their last send, and taken
	// before mu. A burst of a thousand is paced over tens of milliseconds,
	// and a goodbye sent meanwhile would be overtaken by an announcement
	// built before it: the node, deleted, would live on in every cache,
	// its own included, for its TTL.
	sendMu sync.Mutex
	// write sends one packet; tests replace it.
	write func(i *mdnsIface, p []byte, dst netip.AddrPort) error

	// rescueNow wakes the loop for a tick now: a goodbye for one of our
	// nodes was heard, and every other cache has just dropped it.
	rescueNow chan struct{}

	startedAt time.Time // when the backend started; zero in tests of its state alone

	mu           sync.Mutex // guards locals, labels, cache, startQueries, nextQuery, unheard, each iface's sendErr
	unheard      []unheardNode
	locals       map[string]*mdnsLocal
	labels       map[string]string // lower-cased instance label -> record key
	cache        *mdnsCache
	startQueries int
	nextQuery    time.Time
	conflictLog  logLimiter
	// keeps reports whether the registry keeps a record key alive (nil:
	// all): a goodbye for one it does not, posted with ?ttl=, is a DELETE
	// through another sidecar, taken as final rather than defended.
	keeps func(key string) bool

	stop context.CancelFunc
	wg   sync.WaitGroup
	once sync.Once
}

// errNoInterface is the status of a backend that joined no interface.
var errNoInterface = errors.New("mdns: no interface joined")

// newMDNSBackend joins the interfaces cfg chooses and starts listening. A
// name in cfg.Interfaces that does not exist is an error; an interface
// that cannot be joined is logged, reported by status, and skipped, and the
// local registry keeps working.
func newMDNSBackend(ctx context.Context, cfg mdnsConfig, t *table, log *slog.Logger) (*mdnsBackend, error) {
	all, err := net.Interfaces()
	if err != nil {
		return nil, fmt.Errorf("mdns registry: listing interfaces: %w", err)
	}
	chosen, err := chooseInterfaces(cfg.Interfaces, cfg.Loopback, all, ipv4Of)
	if err != nil {
		return nil, err
	}
	b := newMDNSState(t, log, cfg.Port)
	var failed []error
	for _, ifi := range chosen {
		conn, err := listenMDNS(ifi, ipv4Of(ifi), b.port)
		if err != nil {
			err = fmt.Errorf("mdns: interface %s: %w; %s", ifi.Name, err, joinAdvice(ifi.Name, err))
			log.Error("multicast registry cannot use an interface; the local registry keeps working", "interface", ifi.Name, "error", err)
			failed = append(failed, err)
			continue
		}
		b.ifaces = append(b.ifaces, &mdnsIface{name: ifi.Name, conn: conn, link: linkPrefixes(ifi)})
	}
	b.joinErr = errors.Join(failed...)
	if len(chosen) == 0 {
		b.joinErr = fmt.Errorf("%w: no up, multicast-capable interface with an IPv4 address; name one with --registry_interface, or use --registry=file", errNoInterface)
		log.Error("multicast registry has no interface; the local registry keeps working", "error", b.joinErr)
	}
	names := make([]string, 0, len(b.ifaces))
	for _, i := range b.ifaces {
		names = append(names, i.name)
	}
	if len(names) > 0 { // with none, the error above said so
		log.Info("Multicast registry on "+strings.Join(names, ","), "interfaces", names, "service_type", mdnsServiceType, "port", b.port)
	}

	b.startedAt = b.now()
	ctx, b.stop = context.WithCancel(ctx)
	for _, i := range b.ifaces {
		b.wg.Add(1)
		go b.readLoop(ctx, i)
	}
	b.wg.Add(1)
	go b.loop(ctx)
	b.tick(b.now()) // the first browse query goes out at once
	return b, nil
}

// newMDNSState is a backend with no sockets: what tests and the fuzz target
// drive directly.
func newMDNSState(t *table, log *slog.Logger, port int) *mdnsBackend {
	if port == 0 {
		port = mdnsPort
	}
	b := &mdnsBackend{
		t: t, log: log, now: time.Now, port: port,
		locals: map[string]*mdnsLocal{}, labels: map[string]string{}, cache: newMDNSCache(t.maxNodes),
		conflictLog: logLimiter{every: 10 * time.Minute},
		rescueNow:   make(chan struct{}, 1),
		stop:        func() {},
		write:       func(i *mdnsIface, p []byte, dst netip.AddrPort) error { return i.conn.write(p, dst) },
	}
	b.cache.ownInstance = b.ownInstanceLocked
	return b
}

// ownInstanceLocked reports whether an instance name (lower-cased, as
// parsed) is one this sidecar announces. The caller holds b.mu.
func (b *mdnsBackend) ownInstanceLocked(name string) bool {
	label, ok := strings.CutSuffix(name, "."+mdnsServiceType)
	return ok && b.localByLabelLocked(label) != nil
}

// joinAdvice says what to do about an interface that could not be used.
// Interfaces are joined once, at start: the advice says to restart.
func joinAdvice(name string, err error) string {
	if strings.Contains(err.Error(), "bind") {
		return "another program holds UDP 5353 without sharing it (stop its mDNS responder, then restart the sidecar), or use --registry=file"
	}
	return fmt.Sprintf("check that %s is up and multicast-capable (ip link set %s multicast on), then restart the sidecar; in containers and VPNs multicast is often off: choose another interface with --registry_interface, run the containers on a network that carries multicast, or use --registry=file", name, name)
}

// chooseInterfaces picks the interfaces to join: the named ones (an
// unknown name is an error that lists the known ones), else the loopback
// interfaces when the advertised address is loopback, else the up,
// multicast-capable, non-loopback interfaces with an IPv4 address.
func chooseInterfaces(names []string, loopback bool, all []net.Interface, v4 func(net.Interface) netip.Addr) ([]net.Interface, error) {
	if len(names) > 0 {
		var out []net.Interface
		for _, n := range names {
			if slices.ContainsFunc(out, func(ifi net.Interface) bool { return ifi.Name == n }) {
				continue // joined twice, every packet would go out and be handled twice
			}
			found := false
			for _, ifi := range all {
				if ifi.Name == n {
					out, found = append(out, ifi), true
					break
				}
			}
			if !found {
				known := make([]string, 0, len(all))
				for _, ifi := range all {
					known = append(known, ifi.Name)
				}
				return nil, fmt.Errorf("--registry_interface %q: no such interface (this host has %s)", n, strings.Join(known, ", "))
			}
		}
		return out, nil
	}
	var out []net.Interface
	for _, ifi := range all {
		up := ifi.Flags&net.FlagUp != 0
		lo := ifi.Flags&net.FlagLoopback != 0
		switch {
		case loopback && up && lo:
			out = append(out, ifi)
		case !loopback && up && !lo && ifi.Flags&net.FlagMulticast != 0 && v4(ifi).IsValid():
			out = append(out, ifi)
		}
	}
	return out, nil
}

// ipv4Of is an interface's first IPv4 address, the source of what we send
// on it; invalid when it has none.
func ipv4Of(ifi net.Interface) netip.Addr {
	addrs, err := ifi.Addrs()
	if err != nil {
		return netip.Addr{}
	}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok && ip.Unmap().Is4() {
				return ip.Unmap()
			}
		}
	}
	return netip.Addr{}
}

// mdnsTTL rounds a registration's TTL up to whole seconds; a TTL of
// zero (never expires) is announced with RFC 6762 section 10's 120 s.
func mdnsTTL(ttl time.Duration) uint32 {
	if ttl <= 0 {
		return 120
	}
	return uint32(min(math.Ceil(ttl.Seconds()), mdnsMaxTTL))
}

func (b *mdnsBackend) register(s Service, ttl time.Duration) error {
	return b.registerAll([]Service{s}, ttl)
}

// registerAll registers ss and multicasts their announcements as one
// paced burst: the refresh of a thousand nodes is as gentle on the link
// (and on the other sidecars' socket buffers) as a multi-node change.
func (b *mdnsBackend) registerAll(ss []Service, ttl time.Duration) error {
	now := b.now()
	var pkts [][]byte
	var errs []error
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	for _, s := range ss {
		p, err := b.registerLocked(s, ttl, now)
		pkts = append(pkts, p...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	b.mu.Unlock()
	b.multicast(pkts)
	return errors.Join(errs...)
}

// registerLocked puts s in the table and returns the packets announcing
// what is new or due. The caller holds b.mu.
func (b *mdnsBackend) registerLocked(s Service, ttl time.Duration, now time.Time) ([][]byte, error) {
	recs := recordsOf(s, expiry(now, ttl))
	anns := make([]mdnsAnnouncement, len(recs))
	for i, r := range recs {
		label := instanceLabel(r.Service, r.Node.ID)
		if l, ok := b.locals[r.key()]; ok {
			label = strings.TrimSuffix(l.ann.instance, "."+mdnsServiceType)
		} else if k, taken := b.labels[strings.ToLower(label)]; taken && k != r.key() {
			label = uniqueLabel(r.Service, r.Node.ID)
		}
		a, err := announcementOf(r, label)
		if err != nil {
			return nil, err
		}
		anns[i] = a
	}
	if err := b.roomLocked(recs, now); err != nil {
		return nil, err
	}
	b.t.put(recs...)
	var pkts [][]byte
	for i, r := range recs {
		a := anns[i]
		l := b.locals[r.key()]
		if l == nil || !l.rec.same(r) || l.ttl != mdnsTTL(ttl) {
			// New or changed: announce twice (RFC 6762 section 8.3).
			prev := l
			l = &mdnsLocal{repeatAt: now.Add(mdnsRepeat)}
			b.locals[r.key()] = l
			if prev != nil {
				l.prev, l.prevUntil = prev.ann, now.Add(echoGrace)
				if next := prev.lastSent.Add(mdnsRepeat); now.Before(next) {
					// Changed under a second after its records went out:
					// the newest state goes once the second is up, and
					// again a second later, however often a client changes
					// it (a heartbeat with a counter, a TTL that varies).
					l.rec, l.ann, l.ttl, l.lastSent = r, a, mdnsTTL(ttl), prev.lastSent
					l.repeatAt, l.again = next, true
					continue // under the label it had
				}
			}
		} else if now.Sub(l.lastSent) < time.Second {
			// The same records, multicast under a second ago: RFC 6762
			// section 6 allows no sooner (a client re-registering in a loop
			// must not flood the link). When the other caches' copy runs
			// out soon (a heartbeat with a short ?ttl=), the new expiry
			// goes out once the second is up.
			if old := l.rec.Expires; !old.IsZero() && old.Sub(now) < 2*mdnsRepeat {
				if next := l.lastSent.Add(mdnsRepeat); l.repeatAt.IsZero() || next.Before(l.repeatAt) {
					l.repeatAt = next
				}
			}
			l.rec = r
			continue
		}
		l.rec, l.ann, l.ttl, l.lastSent = r, a, mdnsTTL(ttl), now
		b.labels[strings.ToLower(a.instance[:len(a.instance)-len(mdnsServiceType)-1])] = r.key()
		if p, err := announcePacket(a, l.ttlAt(now)); err == nil {
			pkts = append(pkts, p)
		}
	}
	return pkts, nil
}

func (b *mdnsBackend) deregister(s Service) error {
	return b.deregisterAll([]Service{s})
}

// deregisterAll removes ss with their goodbyes packed several to a packet
// and paced: a sidecar shutting down with a thousand nodes sends some
// hundred packets, not a thousand in a burst.
func (b *mdnsBackend) deregisterAll(ss []Service) error {
	var keys []string
	var recs []record
	for _, s := range ss {
		keys = append(keys, keysOf(s)...)
		recs = append(recs, recordsOf(s, time.Time{})...)
	}
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	pkts := b.peerGoodbyesLocked(recs)
	pkts = append(pkts, b.forgetLocalsLocked(keys)...)
	b.t.remove(recs...)
	b.mu.Unlock()
	b.multicast(pkts)
	return nil
}

// peerGoodbyesLocked returns goodbyes for the nodes among recs that others
// announce (another sidecar, another tool): a DELETE through this sidecar
// of a node it does not keep. Every cache on the link drops them, so that
// a killed peer's node is gone everywhere at once rather than a TTL later;
// an announcer still alive answers by announcing its node again
// (defendLocked), as a shared registry's keeper puts back an entry deleted
// through another sidecar. Only the PTR record goes: its goodbye drops
// the whole instance.
func (b *mdnsBackend) peerGoodbyesLocked(recs []record) [][]byte {
	peers := map[string]bool{}
	for _, r := range recs {
		if !b.isLocalLocked(r.key()) {
			peers[r.key()] = true
		}
	}
	if len(peers) == 0 {
		return nil
	}
	var groups [][2][]dnsmessage.Resource
	for _, inst := range b.cache.instances {
		if inst.installed == nil || !peers[inst.installed.key()] {
			continue
		}
		name, err := dnsmessage.NewName(inst.name)
		if err != nil {
			continue // it came in a packet: it is a name
		}
		groups = append(groups, [2][]dnsmessage.Resource{{ptrGoodbye(name)}, nil})
	}
	pkts, _ := packResponses(dnsmessage.Header{Response: true, Authoritative: true}, nil, groups)
	return pkts
}

// ptrGoodbye is the goodbye of an instance's PTR record, which drops the
// whole instance from a cache.
func ptrGoodbye(instance dnsmessage.Name) dnsmessage.Resource {
	return dnsmessage.Resource{
		Header: dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(mdnsServiceType), Class: dnsmessage.ClassINET, TTL: 0},
		Body:   &dnsmessage.PTRResource{PTR: instance},
	}
}

// goodbyeUnheard says goodbye for the nodes of s that this sidecar does
// not announce and has not heard, by the instance names they would have:
// an earlier run's (killed, with the same fixed --server_id), which the
// other caches hold until its TTL runs out while this sidecar never heard
// it (only an instance's owner answers a query for it). It goes once the
// startup queries had their answers (unheardWait after the start): a node
// heard by then has a live owner (a rolling restart's old sidecar), and
// is left alone. A goodbye for an instance nobody holds costs one packet.
func (b *mdnsBackend) goodbyeUnheard(s Service) {
	now := b.now()
	due := b.startedAt.Add(unheardWait)
	if due.Before(now) {
		due = now
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range recordsOf(s, time.Time{}) {
		if len(b.unheard) < maxUnheard {
			b.unheard = append(b.unheard, unheardNode{r, due})
		}
	}
}

// unheardNode is a node to say goodbye for at due, if still unheard.
type unheardNode struct {
	rec record
	due time.Time
}

const (
	// unheardWait is from the start to when a live owner has answered
	// the startup queries (mdnsStartQueries, a second apart, each answer
	// within a second).
	unheardWait = 3 * time.Second
	maxUnheard  = 16 // the app's node, once per failing start: a few at most
)

// unheardGoodbyesLocked returns the goodbyes of goodbyeUnheard that are
// due at now, for the nodes still neither heard nor ours.
func (b *mdnsBackend) unheardGoodbyesLocked(now time.Time) [][]byte {
	var groups [][2][]dnsmessage.Resource
	keep := b.unheard[:0]
	for _, u := range b.unheard {
		switch {
		case now.Before(u.due):
			keep = append(keep, u)
		case b.isLocalLocked(u.rec.key()) || b.t.holds(u.rec.Service, u.rec.Node.ID):
		default:
			if name, err := dnsmessage.NewName(instanceLabel(u.rec.Service, u.rec.Node.ID) + "." + mdnsServiceType); err == nil {
				groups = append(groups, [2][]dnsmessage.Resource{{ptrGoodbye(name)}, nil})
			}
		}
	}
	b.unheard = keep
	if len(groups) == 0 {
		return nil
	}
	pkts, _ := packResponses(dnsmessage.Header{Response: true, Authoritative: true}, nil, groups)
	return pkts
}

// forgetLocalsLocked drops local nodes and returns their goodbye packets
// (RFC 6762 section 10.1: the same records with TTL 0).
func (b *mdnsBackend) forgetLocalsLocked(keys []string) [][]byte {
	var groups [][2][]dnsmessage.Resource
	for _, k := range keys {
		l := b.locals[k]
		if l == nil {
			continue
		}
		delete(b.locals, k)
		delete(b.labels, strings.ToLower(strings.TrimSuffix(l.ann.instance, "."+mdnsServiceType)))
		ptr, unique := l.ann.resources(0, false)
		groups = append(groups, [2][]dnsmessage.Resource{append([]dnsmessage.Resource{ptr}, unique...), nil})
	}
	// Several goodbyes to a packet: a sidecar leaving with a thousand
	// nodes sends some hundred packets rather than a thousand in a burst,
	// which overflowed the receivers' socket buffers.
	pkts, _ := packResponses(dnsmessage.Header{Response: true, Authoritative: true}, nil, groups)
	return pkts
}

func (b *mdnsBackend) status() error {
	b.mu.Lock()
	var sendErrs []error
	for _, i := range b.ifaces {
		sendErrs = append(sendErrs, i.sendErr)
	}
	b.mu.Unlock()
	sendErr := errors.Join(sendErrs...)
	switch {
	case len(b.ifaces) == 0 && b.joinErr != nil && !errors.Is(b.joinErr, errNoInterface):
		return fmt.Errorf("%w: %w", errNoInterface, b.joinErr)
	case b.joinErr != nil:
		return b.joinErr
	case sendErr != nil:
		return sendErr
	}
	return nil
}

// close says goodbye for every local node, then stops the loops and closes
// the sockets. It is idempotent and waits for the goroutines it owns.
func (b *mdnsBackend) close() error {
	b.once.Do(func() {
		b.sendMu.Lock()
		b.mu.Lock()
		keys := make([]string, 0, len(b.locals))
		for k := range b.locals {
			keys = append(keys, k)
		}
		pkts := b.forgetLocalsLocked(keys)
		b.mu.Unlock()
		b.multicast(pkts)
		b.sendMu.Unlock()
		b.stop()
		for _, i := range b.ifaces {
			i.conn.close()
		}
		b.wg.Wait()
	})
	return nil
}

// isLocalLocked reports whether key is one of this sidecar's nodes.
func (b *mdnsBackend) isLocalLocked(key string) bool { _, ok := b.locals[key]; return ok }

// handlePacket takes one packet heard from src and returns the packets to
// send back on the same interface: the answers to a query. It is the
// packet-to-registry path the fuzz target drives.
func (b *mdnsBackend) handlePacket(data []byte, src netip.AddrPort) []outPacket {
	b.stats.packetsIn.Add(1)
	pkt, err := parsePacket(data)
	if err != nil {
		b.stats.malformed.Add(1)
		b.log.Debug("mdns: dropped a malformed packet", "from", src, "error", err)
		return nil
	}
	now := b.now()
	if pkt.response {
		// RFC 6762 section 6: responses not from port 5353 are ignored.
		if src.Port() != uint16(b.port) {
			b.stats.ignored.Add(1)
			return nil
		}
		b.mu.Lock()
		ch, st := b.cache.apply(pkt, now, b.isLocalLocked)
		rescue := b.defendLocked(pkt, now)
		b.noticeConflictsLocked(pkt, src, now)
		b.applyChanges(ch) // under mu: the table sees changes in the order the cache made them
		b.mu.Unlock()
		if rescue {
			select {
			case b.rescueNow <- struct{}{}:
			default: // a tick is already due
			}
		}
		b.stats.rejected.Add(uint64(st.rejected))
		b.stats.cacheFull.Add(uint64(st.full))
		return nil
	}
	if len(pkt.questions) == 0 {
		return nil
	}
	// A query from a port other than 5353 is a legacy unicast query (RFC
	// 6762 section 6.7): answered to its sender, with its ID and questions.
	legacy := src.Port() != uint16(b.port)
	var groups [][2][]dnsmessage.Resource
	b.mu.Lock()
	for _, l := range b.locals {
		if l.rec.expired(now) {
			continue
		}
		ans, extra := answer(pkt.questions, pkt.records, []mdnsAnnouncement{l.ann}, func(mdnsAnnouncement) uint32 { return l.ttlAt(now) }, legacy)
		if len(ans) == 0 {
			continue
		}
		if !legacy {
			// RFC 6762 section 6: a record is multicast at most once a
			// second. Answers to records sent less than a second ago wait
			// until the second is up, and go out once however many queries
			// asked, as an announcement at the next tick.
			if next := l.lastSent.Add(mdnsRepeat); now.Before(next) {
				if l.repeatAt.IsZero() || next.Before(l.repeatAt) {
					l.repeatAt = next
				}
				continue
			}
			l.lastSent = now
		}
		groups = append(groups, [2][]dnsmessage.Resource{ans, extra})
	}
	b.mu.Unlock()
	if len(groups) == 0 {
		return nil
	}
	h := dnsmessage.Header{Response: true, Authoritative: true}
	var qs []dnsmessage.Question
	dst := netip.AddrPortFrom(mdnsGroup, uint16(b.port))
	if legacy {
		h.ID, qs, dst = pkt.id, pkt.questions, src
	}
	pkts, err := packResponses(h, qs, groups)
	if err != nil {
		b.log.Warn("mdns: building an answer failed", "error", err)
		return nil
	}
	out := make([]outPacket, 0, len(pkts))
	for _, p := range pkts {
		out = append(out, outPacket{data: p, dst: dst})
	}
	return out
}

// outPacket is a packet to send and where to.
type outPacket struct {
	data []byte
	dst  netip.AddrPort
}

// defendLocked answers a goodbye for one of our own instances or their
// hosts' addresses, heard from someone else or left over from an earlier
// run, by announcing it again, so that the other caches keep it. It
// reports whether the loop should tick now for it.
//
// The first answer in a second goes at once, however recently the
// records went out: the other caches dropped the node on the goodbye
// (this registry removes at once, not after RFC 6762's one second), so
// every moment until it is announced again is a moment its callers are
// told it does not exist. A rolling restart with a fixed --server_id
// meets this each time: the old sidecar's goodbye, the new one's node.
// Later goodbyes in the same second (a flood) are answered once the
// second is up, as before.
func (b *mdnsBackend) defendLocked(pkt mdnsPacket, now time.Time) bool {
	rescue := false
	var deleted []string
	for _, rr := range pkt.records {
		if rr.ttl != 0 {
			continue
		}
		var label string
		switch {
		case rr.typ == dnsmessage.TypePTR && instanceOf(rr.target):
			label = strings.TrimSuffix(rr.target, "."+mdnsServiceType)
		case instanceOf(rr.name):
			label = strings.TrimSuffix(rr.name, "."+mdnsServiceType)
		case rr.typ == dnsmessage.TypeA || rr.typ == dnsmessage.TypeAAAA:
			label = strings.TrimSuffix(rr.name, ".local.") // a host of ours is <label>.local.
		default:
			continue
		}
		k, ok := b.labels[label]
		l := b.locals[k]
		switch {
		case !ok || l == nil || l.rescue:
		case b.keeps != nil && !b.keeps(k):
			deleted = append(deleted, k)
		case now.Sub(l.rescuedAt) >= mdnsRepeat:
			l.repeatAt, l.rescue, rescue = now, true, true
			b.stats.goodbyesSeen.Add(1)
		case l.repeatAt.IsZero():
			l.repeatAt = now // tick keeps it to once a second
			b.stats.goodbyesSeen.Add(1)
		}
	}
	b.dropDeletedLocked(deleted)
	return rescue
}

// dropDeletedLocked forgets local nodes a goodbye from elsewhere deleted:
// the other caches dropped them on it, and so does this one.
func (b *mdnsBackend) dropDeletedLocked(keys []string) {
	var recs []record
	for _, k := range keys {
		if l := b.locals[k]; l != nil {
			recs = append(recs, l.rec)
		}
	}
	b.forgetLocalsLocked(keys) // no goodbyes of our own: they were said
	b.t.remove(recs...)
}

// setKeeps tells the backend which record keys the registry keeps alive;
// changed is not needed here: a goodbye for a kept node is answered at once.
func (b *mdnsBackend) setKeeps(keeps func(key string) bool, _ func()) {
	b.mu.Lock()
	b.keeps = keeps
	b.mu.Unlock()
}

// noticeConflictsLocked says when someone else announces one of our
// instances or their hosts with other data: two sidecars keeping one node
// id (a --server_id copied between hosts), or a spoofed record. The other
// caches then flip between the two, or build a node of one's address and
// the other's port, until one of us stops. It is logged once per node
// every ten minutes and counted as a conflict; nothing is re-announced,
// which two keepers would do at each other for ever.
func (b *mdnsBackend) noticeConflictsLocked(pkt mdnsPacket, src netip.AddrPort, now time.Time) {
	for _, rr := range pkt.records {
		if rr.ttl == 0 {
			continue // goodbyes are defendLocked's
		}
		var l *mdnsLocal
		var label string
		var ok bool
		switch rr.typ {
		case dnsmessage.TypeSRV, dnsmessage.TypeTXT:
			label, ok = strings.CutSuffix(rr.name, "."+mdnsServiceType)
		case dnsmessage.TypeA, dnsmessage.TypeAAAA:
			label, ok = strings.CutSuffix(rr.name, ".local.")
		}
		if l = b.localByLabelLocked(label); !ok || l == nil || !recordDiffers(rr, l.ann) {
			continue
		}
		if now.Before(l.prevUntil) && !recordDiffers(rr, l.prev) {
			continue // our own, from before the node changed
		}
		b.stats.conflicts.Add(1)
		if b.conflictLog.allow(l.rec.key()) {
			b.log.Warn("mdns: another host announces this sidecar's node with other data: two sidecars keep the same node id (give each its own --server_id), or a record is spoofed; other sidecars may mix the two", "service", l.rec.Service, "node", l.rec.Node.ID, "from", src, "record", rr.typ)
		}
	}
}

// recordDiffers reports whether rr, a record of an instance or its host,
// says other than ann does. Records ann has none of (an address record for
// a node addressed by name) do not differ.
func recordDiffers(rr mdnsRR, ann mdnsAnnouncement) bool {
	switch rr.typ {
	case dnsmessage.TypeSRV:
		return rr.port != ann.port || rr.target != strings.ToLower(ann.host)
	case dnsmessage.TypeTXT:
		return !slices.Equal(rr.txt, ann.txt)
	case dnsmessage.TypeA, dnsmessage.TypeAAAA:
		return ann.addr.IsValid() && rr.addr != ann.addr
	}
	return false
}

// localByLabelLocked returns the local node of an instance label, nil if
// none.
func (b *mdnsBackend) localByLabelLocked(label string) *mdnsLocal {
	if k, ok := b.labels[label]; ok {
		return b.locals[k]
	}
	return nil
}

// applyChanges installs the cache's changes in the table. The caller holds
// b.mu; the table never calls back into the backend.
func (b *mdnsBackend) applyChanges(ch cacheChanges) {
	if len(ch.remove) > 0 {
		b.t.remove(ch.remove...)
	}
	if len(ch.upsert) > 0 {
		b.t.put(ch.upsert...) // the cache holds at most the limit
	}
}

// roomLocked says whether recs fit under --registry_max_nodes, which
// bounds this sidecar's own nodes here. The nodes heard from peers are
// bounded apart, by the cache: on a shared link anyone can announce, and
// a flood of announcements must not get the app's or the broker's
// registrations refused. The caller holds b.mu.
func (b *mdnsBackend) roomLocked(recs []record, now time.Time) error {
	limit := b.t.maxNodes
	added := 0
	for _, r := range recs {
		if _, ok := b.locals[r.key()]; !ok {
			added++
		}
	}
	if limit == 0 || added == 0 || len(b.locals)+added <= limit {
		return nil
	}
	live := 0 // lapsed nodes leave locals at the next tick; they make no room until then otherwise
	for _, l := range b.locals {
		if !l.rec.expired(now) {
			live++
		}
	}
	if live+added > limit {
		return fmt.Errorf("%w: %d nodes registered through this sidecar is the limit (--registry_max_nodes; nodes heard from peers over mDNS are bounded apart)", errTableFull, limit)
	}
	return nil
}

// tick is the step of the backend's loop: repeat announcements that are
// due, send the start queries, expire the cache and ask what it needs to
// stay current. Tests call it with the time they want.
func (b *mdnsBackend) tick(now time.Time) {
	var pkts [][]byte
	var lapsed []string
	b.sendMu.Lock()
	defer b.sendMu.Unlock()
	b.mu.Lock()
	for k, l := range b.locals {
		if l.rec.expired(now) {
			lapsed = append(lapsed, k)
			continue
		}
		if l.repeatAt.IsZero() || now.Before(l.repeatAt) {
			continue
		}
		if next := l.lastSent.Add(mdnsRepeat); now.Before(next) && !l.rescue {
			// Sent under a second ago (an answer, a post): no sooner
			// than the second is up (RFC 6762 section 6).
			l.repeatAt = next
			continue
		}
		if l.rescue {
			l.rescue, l.rescuedAt = false, now
		}
		l.repeatAt, l.lastSent = time.Time{}, now
		if l.again {
			l.repeatAt, l.again = now.Add(mdnsRepeat), false
		}
		if p, err := announcePacket(l.ann, l.ttlAt(now)); err == nil {
			pkts = append(pkts, p)
		}
	}
	// A registration with ?ttl= that was not renewed says goodbye: the
	// other caches were told at least mdnsMinTTL, which may outlive it
	// by up to two seconds.
	pkts = append(pkts, b.forgetLocalsLocked(lapsed)...)
	pkts = append(pkts, b.unheardGoodbyesLocked(now)...)
	if b.startQueries < mdnsStartQueries && !now.Before(b.nextQuery) {
		b.startQueries++
		b.nextQuery = now.Add(mdnsRepeat)
		if p, err := queryPacket([]dnsmessage.Question{question(mdnsServiceType, dnsmessage.TypePTR)}, nil); err == nil {
			pkts = append(pkts, p)
		}
	}
	b.applyChanges(b.cache.expire(now, b.isLocalLocked))
	if qs := b.cache.due(now, b.isLocalLocked, mdnsMaxQuestions); len(qs) > 0 {
		if p, err := queryPacket(qs, nil); err == nil {
			pkts = append(pkts, p)
		}
	}
	b.mu.Unlock()
	b.t.sweep(now)
	b.multicast(pkts)
}

func (b *mdnsBackend) loop(ctx context.Context) {
	defer b.wg.Done()
	tick := time.NewTicker(mdnsTick)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			b.tick(b.now())
		case <-b.rescueNow:
			b.tick(b.now())
		}
	}
}

// readLoop reads one interface's socket until it is closed.
func (b *mdnsBackend) readLoop(ctx context.Context, i *mdnsIface) {
	defer b.wg.Done()
	buf := make([]byte, mdnsMaxPacket+1)
	oob := make([]byte, 256)
	for {
		n, src, ifindex, truncated, err := i.conn.read(buf, oob)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || ctx.Err() != nil {
				return
			}
			b.log.Warn("mdns: read failed", "interface", i.name, "error", err)
			continue
		}
		if truncated || n > mdnsMaxPacket {
			b.stats.oversize.Add(1)
			continue
		}
		if ifindex != 0 && ifindex != i.conn.index {
			b.stats.ignored.Add(1) // heard on an interface nobody chose
			continue
		}
		if src.Port() != uint16(b.port) && !onLink(i.link, src.Addr()) {
			// A legacy query, answered to its source, from off the link:
			// the answer would leave by whatever route leads there, maybe
			// an interface nobody chose (RFC 6762 section 11).
			b.stats.ignored.Add(1)
			continue
		}
		b.handleAndAnswer(i, buf[:n], src)
	}
}

// handleAndAnswer handles one packet and sends its answers. A multicast
// query's answers speak for local nodes to every cache on the link and
// hold sendMu. A response answers nothing, and a legacy query (from a
// port other than 5353) is answered to its sender alone, no cache: they
// do not wait on a burst, nor make registrations wait on them.
func (b *mdnsBackend) handleAndAnswer(i *mdnsIface, data []byte, src netip.AddrPort) {
	if isQuery := len(data) > 2 && data[2]&0x80 == 0; isQuery && src.Port() == uint16(b.port) {
		b.sendMu.Lock()
		defer b.sendMu.Unlock()
	}
	for n, p := range b.handlePacket(data, src) {
		pace(n) // the answers to a browse from a sidecar holding a thousand nodes
		b.send(i, p.data, p.dst)
	}
}

// multicast sends packets to the group on every joined interface.
func (b *mdnsBackend) multicast(pkts [][]byte) {
	dst := netip.AddrPortFrom(mdnsGroup, uint16(b.port))
	for n, p := range pkts {
		pace(n)
		for _, i := range b.ifaces {
			b.send(i, p, dst)
		}
	}
}

// pace pauses before the nth packet of a burst, after every mdnsBurst: a
// long burst (a thousand nodes announced, leaving, or answered at once)
// would overflow the receivers' socket buffers. It gives them a moment to
// read.
func pace(n int) {
	if n > 0 && n%mdnsBurst == 0 {
		time.Sleep(mdnsBurstPause)
	}
}

// A burst of multicast packets pauses after every mdnsBurst packets; a
// socket asks for a receive buffer of mdnsReceiveBuffer bytes.
const (
	mdnsBurst         = 16
	mdnsBurstPause    = time.Millisecond
	mdnsReceiveBuffer = 1 << 20
)

// send writes one packet, keeping the latest failure for status and
// logging each change between failing and working once.
func (b *mdnsBackend) send(i *mdnsIface, p []byte, dst netip.AddrPort) {
	err := b.write(i, p, dst)
	if err == nil {
		b.stats.packetsOut.Add(1)
	} else {
		b.stats.sendErrors.Add(1)
		err = fmt.Errorf("mdns: sending on %s: %w; %s", i.name, err, joinAdvice(i.name, err))
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case err != nil && i.sendErr == nil:
		b.log.Warn("multicast registry cannot send", "interface", i.name, "error", err)
	case err == nil && i.sendErr != nil:
		b.log.Info("multicast registry sends again", "interface", i.name)
	}
	i.sendErr = err
}

// mdnsPacketsHelp describes micro_mdns_packets_total.
const mdnsPacketsHelp = "Multicast registry packets and records by what became of them: received, sent, send_error, malformed and oversize (dropped packets), ignored (wrong interface or source port), rejected (instances that are not valid nodes), cache_full (records past the bound), defended (goodbyes for our own nodes, answered), conflict (records for our own nodes or hosts with other data, from someone else)."

// packetSamples reads the backend's counters for micro_mdns_packets_total.
func (b *mdnsBackend) packetSamples() []sample {
	st := &b.stats
	var out []sample
	for _, c := range []struct {
		event string
		n     *atomic.Uint64
	}{
		{"cache_full", &st.cacheFull}, {"conflict", &st.conflicts}, {"defended", &st.goodbyesSeen}, {"ignored", &st.ignored},
		{"malformed", &st.malformed}, {"oversize", &st.oversize}, {"received", &st.packetsIn},
		{"rejected", &st.rejected}, {"send_error", &st.sendErrors}, {"sent", &st.packetsOut},
	} {
		out = append(out, sample{values: []string{c.event}, v: float64(c.n.Load())})
	}
	return out
}
