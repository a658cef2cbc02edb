package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/dns/dnsmessage"
	"golang.org/x/net/websocket"
)

// Unit tests of the multicast registry's pure parts: record building, TXT
// layout, packet parsing, the cache and the answers. They use no socket.

var discardLog = slog.New(slog.NewTextHandler(io.Discard, nil))

func testRecord(service, id, addr string, port int) record {
	return record{Service: service, Version: "1.0.0", Metadata: map[string]string{"owner": "team-a"},
		Node: Node{ID: id, Address: addr, Port: port, Metadata: map[string]string{"zone": "eu", "name": "tricky", "svc:x": "y"}}}
}

func TestInstanceLabel(t *testing.T) {
	long := strings.Repeat("a", 100)
	for _, tc := range []struct{ service, id, want string }{
		{"foo", "foo-1", "foo-1-c70451d7"}, // the README's example
		{"go.micro.srv.example", "go.micro.srv.example-c5718d29", "go-micro-srv-example-c5718d29-" + shortHash("go.micro.srv.example\x00go.micro.srv.example-c5718d29")},
		{"s", long, long[:54] + "-" + shortHash("s\x00"+long)},
	} {
		if got := instanceLabel(tc.service, tc.id); got != tc.want || len(got) > 63 {
			t.Errorf("instanceLabel(%q, %q) = %q; want %q (at most 63 bytes)", tc.service, tc.id, got, tc.want)
		}
	}
	// Nodes the readable part alone would not keep apart (mDNS names
	// ignore case): one id under two services, ids that differ in a dot or
	// in case.
	seen := map[string]string{}
	for _, n := range [][2]string{{"alpha", "node-1"}, {"beta", "node-1"}, {"api", "web.1"}, {"api", "web-1"}, {"api", "Web-1"}} {
		l := strings.ToLower(instanceLabel(n[0], n[1]))
		if other, ok := seen[l]; ok {
			t.Errorf("%v and %s share the label %q", n, other, l)
		}
		seen[l] = n[0] + "/" + n[1]
	}
	if a, b := instanceLabel("s", "x"), uniqueLabel("s", "x"); a == b || len(b) > 63 {
		t.Errorf("uniqueLabel must differ from instanceLabel: %q and %q", a, b)
	}
}

func TestTXTRoundTrip(t *testing.T) {
	r := testRecord("go.micro.srv.example", "n1", "127.0.0.1", 80)
	txt, err := txtOf(r)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"txtvers=1", "name=go.micro.srv.example", "id=n1", "version=1.0.0", "svc:owner=team-a", "node:name=tricky", "node:svc:x=y", "zone=eu"}
	if !reflect.DeepEqual(txt, want) {
		t.Errorf("txtOf = %q; want %q", txt, want)
	}
	got, ok := parseTXT(txt)
	if !ok || got.name != r.Service || got.id != r.Node.ID || got.version != r.Version ||
		!reflect.DeepEqual(got.svcMeta, r.Metadata) || !reflect.DeepEqual(got.nodeMeta, r.Node.Metadata) {
		t.Errorf("parseTXT(%q) = %+v, %v; want the record back", txt, got, ok)
	}
	for _, tc := range []struct {
		txt  []string
		ok   bool
		want txtRecord
	}{
		{[]string{"name=a", "id=b"}, true, txtRecord{name: "a", id: "b", svcMeta: map[string]string{}, nodeMeta: map[string]string{}}},
		{[]string{"txtvers=2", "name=a", "id=b"}, false, txtRecord{}},
		{[]string{"name=a"}, false, txtRecord{}},
		{[]string{"ID=b", "Name=a", "id=c", "flag", "=x", "", "k=1", "k=2"}, true, txtRecord{name: "a", id: "b", svcMeta: map[string]string{}, nodeMeta: map[string]string{"flag": "", "k": "1"}}},
		// Keys ignore case (RFC 6763 section 6.4), metadata's too: the first wins.
		{[]string{"name=a", "id=b", "Zone=a", "zone=b", "node:ZONE=c", "svc:R=1", "svc:r=2"}, true, txtRecord{name: "a", id: "b", svcMeta: map[string]string{"R": "1"}, nodeMeta: map[string]string{"Zone": "a"}}},
	} {
		got, ok := parseTXT(tc.txt)
		if ok != tc.ok || (ok && !reflect.DeepEqual(got, tc.want)) {
			t.Errorf("parseTXT(%q) = %+v, %v; want %+v, %v", tc.txt, got, ok, tc.want, tc.ok)
		}
	}
}

func TestTXTLimits(t *testing.T) {
	for _, tc := range []struct {
		name string
		mod  func(*record)
		want string
	}{
		{"id over 252 bytes", func(r *record) { r.Node.ID = strings.Repeat("i", 253) }, "id=... is 256 bytes and a TXT string holds 255"},
		{"metadata string over 255 bytes", func(r *record) { r.Node.Metadata["big"] = strings.Repeat("v", 300) }, "big=... is 304 bytes"},
		{"key with =", func(r *record) { r.Node.Metadata["a=b"] = "c" }, "without '='"},
		{"node keys differing in case alone", func(r *record) { r.Node.Metadata["zone"], r.Node.Metadata["Zone"] = "a", "b" }, "differ only in case"},
		{"service keys differing in case alone", func(r *record) { r.Metadata = map[string]string{"K": "1", "k": "2"} }, "differ only in case"},
		{"metadata over the TXT budget", func(r *record) {
			for i := range 40 {
				r.Node.Metadata[fmt.Sprint("k", i)] = strings.Repeat("v", 240)
			}
		}, "TXT record of 9881 bytes (txtvers, name, id, version and metadata, each key=value after a length byte) exceeds the 8000 it may carry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := testRecord("s", "n", "127.0.0.1", 1)
			tc.mod(&r)
			_, err := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
			if err == nil || !strings.Contains(err.Error(), errNotAnnounceable.Error()) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("got %v; want an error wrapping %q and saying %q", err, errNotAnnounceable, tc.want)
			}
		})
	}
}

// roundTrip announces r, parses the packet and feeds it to a fresh cache,
// returning what the cache would put in the table.
func roundTrip(t *testing.T, r record, ttl uint32) (cacheChanges, *mdnsCache, []byte) {
	t.Helper()
	a, err := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
	if err != nil {
		t.Fatal(err)
	}
	data, err := announcePacket(a, ttl)
	if err != nil {
		t.Fatal(err)
	}
	pkt, err := parsePacket(data)
	if err != nil {
		t.Fatal(err)
	}
	c := newMDNSCache(10)
	ch, st := c.apply(pkt, time.Unix(1000, 0), func(string) bool { return false })
	if st != (cacheStats{}) {
		t.Errorf("stats %+v; want none rejected", st)
	}
	return ch, c, data
}

func TestAnnouncementRoundTrip(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct{ name, addr string }{
		{"ipv4", "192.0.2.7"},
		{"ipv6", "2001:db8::7"},
		{"host name", "db.example.com"},
		{".local host name", "johns-mbp.local"}, // no one announces its address: the name is it
		{"100-byte id", "127.0.0.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := "go.micro.srv.example-" + strings.ReplaceAll(tc.name, " ", "-")
			if tc.name == "100-byte id" {
				id = strings.Repeat("z", 100)
			}
			r := testRecord("go.micro.srv.example", id, tc.addr, 8080)
			ch, _, _ := roundTrip(t, r, 30)
			want := r
			want.Expires = now.Add(30 * time.Second)
			if len(ch.upsert) != 1 || len(ch.remove) != 0 {
				t.Fatalf("changes %+v; want one upsert", ch)
			}
			if got := ch.upsert[0]; !got.same(want) || got.Node.ID != id || !got.Expires.Equal(want.Expires) {
				t.Errorf("heard %+v; want %+v", got, want)
			}
		})
	}
}

func TestGoodbyeAndExpiry(t *testing.T) {
	r := testRecord("svc", "n1", "127.0.0.1", 80)
	_, c, _ := roundTrip(t, r, 30)
	local := func(string) bool { return false }
	now := time.Unix(1000, 0)

	if ch := c.expire(now.Add(29*time.Second), local); len(ch.remove) != 0 {
		t.Errorf("expire before the TTL: %+v; want nothing", ch)
	}
	if ch := c.expire(now.Add(30*time.Second), local); !removes(ch, r) || len(c.instances) != 0 || len(c.hosts) != 0 {
		t.Errorf("expire at the TTL: %+v, %d instances, %d hosts; want the node removed and the cache empty", ch, len(c.instances), len(c.hosts))
	}

	_, c, _ = roundTrip(t, r, 30)
	a, _ := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
	bye, _ := announcePacket(a, 0)
	pkt, err := parsePacket(bye)
	if err != nil {
		t.Fatal(err)
	}
	ch, _ := c.apply(pkt, now.Add(time.Second), local)
	if !removes(ch, r) || len(c.instances) != 0 {
		t.Errorf("goodbye: %+v with %d instances left; want the node removed at once", ch, len(c.instances))
	}
	// Our own nodes stay in our table whatever is heard.
	_, c, _ = roundTrip(t, r, 30)
	ch, _ = c.apply(pkt, now, func(k string) bool { return k == r.key() })
	if len(ch.remove) != 0 {
		t.Errorf("a goodbye for a local node must not remove it from our table: %+v", ch)
	}
}

// TestSRVRefreshKeepsAddresses: an SRV heard again with the same target
// leaves the target's address records, which have TTLs of their own.
func TestSRVRefreshKeepsAddresses(t *testing.T) {
	r := testRecord("svc", "n1", "127.0.0.1", 80)
	_, c, data := roundTrip(t, r, 120)
	pkt, _ := parsePacket(data)
	var noAddress []mdnsRR
	for _, rr := range pkt.records {
		if rr.typ != dnsmessage.TypeA && rr.typ != dnsmessage.TypeAAAA {
			noAddress = append(noAddress, rr)
		}
	}
	if len(noAddress) == len(pkt.records) {
		t.Fatal("the announcement has no address record")
	}
	pkt.records = noAddress
	ch, _ := c.apply(pkt, time.Unix(1010, 0), func(string) bool { return false })
	if len(ch.remove) != 0 || len(c.hosts) != 1 {
		t.Errorf("after an SRV and TXT refresh: %+v, %d hosts; want the node kept with its address", ch, len(c.hosts))
	}
}

// TestRestartOnANewAddressIsTakenAtOnce: a node that restarts on another
// address within a second of its last announcement leaves the old address
// in the caches for that second (RFC 6762 section 10.2); the node is built
// with the address heard last, not the lowest, which is gone.
func TestRestartOnANewAddressIsTakenAtOnce(t *testing.T) {
	_, c, _ := roundTrip(t, testRecord("svc", "n1", "127.0.0.5", 80), 120) // heard at 1000
	a, _ := announcementOf(testRecord("svc", "n1", "127.0.0.9", 81), instanceLabel("svc", "n1"))
	data, _ := announcePacket(a, 120)
	pkt, _ := parsePacket(data)
	ch, _ := c.apply(pkt, time.Unix(1000, 500e6), func(string) bool { return false })
	if len(ch.upsert) != 1 || ch.upsert[0].Node.Address != "127.0.0.9" || ch.upsert[0].Node.Port != 81 {
		t.Errorf("after the restart: %+v; want the node at 127.0.0.9:81", ch.upsert)
	}
}

// TestPartLostIsAskedFor: a node that loses one part while the others
// live is asked for again and given time to become whole, however long it
// was known.
func TestPartLostIsAskedFor(t *testing.T) {
	r := testRecord("svc", "n1", "127.0.0.1", 80)
	_, c, data := roundTrip(t, r, 120) // heard at 1000
	local := func(string) bool { return false }
	pkt, _ := parsePacket(data)
	var byeA, srvTXT mdnsPacket
	byeA.response, srvTXT.response = true, true
	for _, rr := range pkt.records {
		if rr.typ == dnsmessage.TypeA {
			rr.ttl = 0
			byeA.records = append(byeA.records, rr)
		}
	}
	lost := time.Unix(1020, 0)
	if ch, _ := c.apply(byeA, lost, local); !removes(ch, r) {
		t.Fatalf("the address's goodbye: %+v; want the node out", ch)
	}
	c.expire(lost.Add(time.Second), local)
	if len(c.instances) != 1 {
		t.Fatal("the instance was forgotten a second after losing its address; want it kept for mdnsPendingLife")
	}
	if qs := c.due(lost.Add(time.Second), local, 100); len(qs) != 3 {
		t.Errorf("questions after the loss: %v; want SRV, TXT and A", qs)
	}
	if ch, _ := c.apply(pkt, lost.Add(2*time.Second), local); len(ch.upsert) != 1 {
		t.Errorf("the node heard whole again: %+v; want it back", ch)
	}
	if ch := c.expire(lost.Add(mdnsPendingLife+3*time.Second), local); len(ch.remove) != 0 {
		t.Errorf("a whole node was expired: %+v", ch)
	}
}

// removes reports whether ch removes r's node and nothing else.
func removes(ch cacheChanges, r record) bool {
	return len(ch.remove) == 1 && ch.remove[0].key() == r.key()
}

// TestOwnNodesLeavePeersTheWholeBound: a sidecar hears its own
// announcements; the instances it caches of them must not take the room
// the bound keeps for peers' nodes.
func TestOwnNodesLeavePeersTheWholeBound(t *testing.T) {
	tb := newTable(3)
	b := newMDNSState(tb, discardLog, 0)
	heard := func(r record) {
		t.Helper()
		a, err := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
		if err != nil {
			t.Fatal(err)
		}
		p, _ := announcePacket(a, 120)
		b.handlePacket(p, netip.MustParseAddrPort("127.0.0.1:5353"))
	}
	for i := range 3 {
		own := Service{Name: "own", Nodes: []Node{{ID: fmt.Sprint("own-", i), Address: "127.0.0.1", Port: 9000 + i}}}
		if err := b.register(own, time.Minute); err != nil {
			t.Fatal(err)
		}
		heard(testRecord("own", fmt.Sprint("own-", i), "127.0.0.1", 9000+i)) // our own, back through the loopback
	}
	for i := range 3 {
		heard(testRecord("peer", fmt.Sprint("peer-", i), "127.0.0.1", 8000+i))
	}
	if own, peers, full := lookupOK(tb, "own"), lookupOK(tb, "peer"), b.stats.cacheFull.Load(); own != 3 || peers != 3 || full != 0 {
		t.Errorf("with a bound of 3: %d own nodes, %d peers' nodes, %d records dropped as over the bound; want 3, 3 and none", own, peers, full)
	}
	heard(testRecord("peer", "peer-3", "127.0.0.1", 8003))
	if peers, full := lookupOK(tb, "peer"), b.stats.cacheFull.Load(); peers != 3 || full == 0 {
		t.Errorf("a fourth peer's node: %d peers' nodes, %d dropped; want the bound kept", peers, full)
	}
}

func TestCacheBoundsAndRefreshQueries(t *testing.T) {
	c := newMDNSCache(2)
	now := time.Unix(1000, 0)
	local := func(string) bool { return false }
	var st cacheStats
	for i := range 3 {
		a, _ := announcementOf(testRecord("svc", fmt.Sprint("n", i), "127.0.0.1", 80), fmt.Sprint("n", i))
		data, _ := announcePacket(a, 10)
		pkt, _ := parsePacket(data)
		_, s := c.apply(pkt, now, local)
		st.full += s.full
	}
	if len(c.instances) != 2 || st.full == 0 {
		t.Errorf("cache of 2: %d instances, %d dropped; want 2 kept and the third dropped", len(c.instances), st.full)
	}
	if qs := c.due(now.Add(7*time.Second), local, 100); len(qs) != 0 {
		t.Errorf("at 70%% of the TTL: %d questions; want none", len(qs))
	}
	if qs := c.due(now.Add(8*time.Second), local, 100); len(qs) != 6 {
		t.Errorf("at 80%% of the TTL: %v; want SRV, TXT and A for both nodes", qs)
	}
	if qs := c.due(now.Add(8500*time.Millisecond), local, 100); len(qs) != 0 {
		t.Errorf("between 80%% and 90%%: %v; want nothing more", qs)
	}
	if qs := c.due(now.Add(9*time.Second), local, 3); len(qs) != 3 {
		t.Errorf("at 90%% with a limit of 3: %d questions; want 3", len(qs))
	}
}

func TestParseMalformed(t *testing.T) {
	a, _ := announcementOf(testRecord("svc", "n1", "127.0.0.1", 80), "n1")
	good, _ := announcePacket(a, 10)
	many := dnsmessage.NewBuilder(nil, dnsmessage.Header{Response: true})
	many.StartAnswers()
	for i := range mdnsMaxRecords + 1 {
		many.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(fmt.Sprint("h", i, ".local.")), Class: dnsmessage.ClassINET, TTL: 1}, dnsmessage.AResource{})
	}
	tooMany, _ := many.Finish()
	loop := append([]byte{0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0}, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4)
	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"empty", nil},
		{"header only, claiming records", []byte{0, 0, 0x84, 0, 0, 1, 0, 1, 0, 0, 0, 0}},
		{"truncated", good[:len(good)-3]},
		{"too many records", tooMany},
		{"pointer loop", loop},
		{"opcode 1", append([]byte{0, 0, 0x88, 0}, good[4:]...)},
		{"too large", make([]byte, mdnsMaxPacket+1)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := parsePacket(tc.data); err == nil {
				t.Errorf("parsePacket(%x...) succeeded; want it dropped", truncate(string(tc.data), 16))
			}
		})
	}
}

func TestAnswers(t *testing.T) {
	r := testRecord("svc", "n1", "127.0.0.1", 80)
	a, _ := announcementOf(r, "n1")
	ttl := func(mdnsAnnouncement) uint32 { return 30 }
	q := func(name string, typ dnsmessage.Type) []dnsmessage.Question {
		return []dnsmessage.Question{question(name, typ)}
	}
	types := func(rs []dnsmessage.Resource) string {
		var s []string
		for _, r := range rs {
			s = append(s, typeOf(r).String()[4:])
		}
		return strings.Join(s, ",")
	}
	for _, tc := range []struct {
		name        string
		qs          []dnsmessage.Question
		known       []mdnsRR
		ans, extra  string
		legacyFlush bool
	}{
		{"browse", q(mdnsServiceType, dnsmessage.TypePTR), nil, "PTR", "SRV,TXT,A", false},
		{"browse with the answer known", q(mdnsServiceType, dnsmessage.TypePTR), []mdnsRR{{name: mdnsServiceType, typ: dnsmessage.TypePTR, target: "n1." + mdnsServiceType, ttl: 20}}, "", "", false},
		{"browse with the answer nearly expired", q(mdnsServiceType, dnsmessage.TypePTR), []mdnsRR{{name: mdnsServiceType, typ: dnsmessage.TypePTR, target: "n1." + mdnsServiceType, ttl: 5}}, "PTR", "SRV,TXT,A", false},
		{"SRV", q("n1."+mdnsServiceType, dnsmessage.TypeSRV), nil, "SRV", "A", false},
		{"ANY of the instance", q("n1."+mdnsServiceType, dnsmessage.TypeALL), nil, "SRV,TXT", "A", false},
		{"A of the host", q("n1.local.", dnsmessage.TypeA), nil, "A", "", false},
		{"AAAA of the host", q("n1.local.", dnsmessage.TypeAAAA), nil, "", "", false},
		{"service enumeration", q(mdnsServicesEnum, dnsmessage.TypePTR), nil, "PTR", "", false},
		{"someone else", q("other."+mdnsServiceType, dnsmessage.TypeSRV), nil, "", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ans, extra := answer(tc.qs, tc.known, []mdnsAnnouncement{a}, ttl, false)
			if types(ans) != tc.ans || types(extra) != tc.extra {
				t.Errorf("answers %s, additional %s; want %s and %s", types(ans), types(extra), tc.ans, tc.extra)
			}
		})
	}
}

func TestLegacyUnicastAndDefence(t *testing.T) {
	tb := newTable(100)
	b := newMDNSState(tb, discardLog, 0)
	if err := b.register(Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80}}}, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	query, _ := buildMessage(dnsmessage.Header{ID: 4242}, []dnsmessage.Question{question(mdnsServiceType, dnsmessage.TypePTR)}, nil, nil)
	src := netip.MustParseAddrPort("127.0.0.1:40000")
	out := b.handlePacket(query, src)
	if len(out) != 1 || out[0].dst != src {
		t.Fatalf("legacy query: %d replies %+v; want one, to the querier", len(out), out)
	}
	var p dnsmessage.Parser
	h, _ := p.Start(out[0].data)
	qs, _ := p.AllQuestions()
	ans, _ := p.AllAnswers()
	if h.ID != 4242 || len(qs) != 1 || len(ans) != 1 || ans[0].Header.TTL > mdnsLegacyTTL || ans[0].Header.Class&classFlush != 0 {
		t.Errorf("legacy answer: id %d, %d questions, answers %+v; want id 4242, the question, TTL <= 10 and no cache-flush bit", h.ID, len(qs), ans)
	}
	// A multicast query is answered to the group, but a record is
	// multicast at most once a second (RFC 6762 section 6): just after the
	// announcement the answer waits for the next tick after the second.
	mq := netip.MustParseAddrPort("127.0.0.1:5353")
	now := time.Now()
	b.now = func() time.Time { return now }
	if out := b.handlePacket(query, mq); len(out) != 0 {
		t.Errorf("multicast query right after the announcement: %d replies; want the answer deferred", len(out))
	}
	now = now.Add(2 * time.Second)
	if out := b.handlePacket(query, mq); len(out) != 1 || out[0].dst.Addr() != mdnsGroup {
		t.Errorf("multicast query: %+v; want one reply to the group", out)
	}
	if out := b.handlePacket(query, mq); len(out) != 0 {
		t.Errorf("second multicast query within the second: %d replies; want none", len(out))
	}

	// Someone says goodbye for our node: we announce it again.
	b.mu.Lock()
	for _, l := range b.locals {
		l.repeatAt = time.Time{}
	}
	ann := b.locals[recordsOf(Service{Name: "svc", Nodes: []Node{{ID: "n1"}}}, time.Time{})[0].key()].ann
	b.mu.Unlock()
	bye, _ := announcePacket(ann, 0)
	b.handlePacket(bye, netip.MustParseAddrPort("127.0.0.2:5353"))
	if b.stats.goodbyesSeen.Load() != 1 || lookupOK(tb, "svc") != 1 {
		t.Errorf("after a stranger's goodbye: %d defended, %d nodes; want 1 defended and the node kept", b.stats.goodbyesSeen.Load(), lookupOK(tb, "svc"))
	}
	// A goodbye for our host's address alone is defended too: other
	// caches would drop the node for want of an address.
	b.mu.Lock()
	for _, l := range b.locals { // as if the answer had gone out long ago
		l.repeatAt, l.rescue, l.rescuedAt = time.Time{}, false, time.Time{}
	}
	b.mu.Unlock()
	addrBye := dnsmessage.NewBuilder(nil, dnsmessage.Header{Response: true, Authoritative: true})
	addrBye.StartAnswers()
	addrBye.AResource(dnsmessage.ResourceHeader{Name: dnsmessage.MustNewName(ann.host), Class: dnsmessage.ClassINET, TTL: 0}, dnsmessage.AResource{A: [4]byte{127, 0, 0, 1}})
	byeA, _ := addrBye.Finish()
	b.handlePacket(byeA, netip.MustParseAddrPort("127.0.0.2:5353"))
	if b.stats.goodbyesSeen.Load() != 2 {
		t.Errorf("after a goodbye for our host's address: %d defended; want 2", b.stats.goodbyesSeen.Load())
	}
	// A response from a port other than 5353 is ignored (RFC 6762 section 6).
	other, _ := announcementOf(testRecord("x", "x1", "127.0.0.1", 1), "x1")
	data, _ := announcePacket(other, 30)
	b.handlePacket(data, src)
	if lookupOK(tb, "x") != 0 || b.stats.ignored.Load() != 1 {
		t.Errorf("response from port 40000 was used")
	}
}

func lookupOK(tb *table, name string) int {
	s, err := tb.lookup(name, time.Now())
	if err != nil {
		return 0
	}
	return len(s[0].Nodes)
}

// TestAnnounceTwice: a new or changed node is announced again one second
// later (RFC 6762 section 8.3); a refresh that changes nothing is not.
func TestAnnounceTwice(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	now := time.Unix(1000, 0)
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	pending := func() time.Time { return soleLocal(b).repeatAt }
	b.register(svc, 30*time.Second)
	if got := pending(); !got.Equal(now.Add(time.Second)) {
		t.Fatalf("after register: repeat at %v; want one second later", got)
	}
	b.tick(now.Add(900 * time.Millisecond))
	if pending().IsZero() {
		t.Error("repeated before the second was up")
	}
	b.tick(now.Add(time.Second))
	if !pending().IsZero() {
		t.Error("not repeated after a second")
	}
	b.register(svc, 30*time.Second)
	if !pending().IsZero() {
		t.Error("an unchanged refresh must be announced once")
	}
	svc.Nodes[0].Port = 81
	b.register(svc, 30*time.Second)
	if pending().IsZero() {
		t.Error("a changed node must be announced twice")
	}
}

// TestGoodbyeForOurNodeIsAnsweredAtOnce: every other cache drops a node
// on a goodbye (a rolling restart's old sidecar, keeping the same
// --server_id), so its keeper announces it again at once, however
// recently it last did; a second goodbye within the second waits for the
// second to pass, so that a flood of goodbyes is answered once a second.
func TestGoodbyeForOurNodeIsAnsweredAtOnce(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	start := time.Unix(1000, 0)
	now := start
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	if err := b.register(svc, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	b.tick(start.Add(time.Second)) // the second announcement (RFC 6762 section 8.3)
	local := func() (time.Time, time.Time) { l := soleLocal(b); return l.lastSent, l.repeatAt }
	ann := soleLocal(b).ann
	bye, _ := announcePacket(ann, 0)
	stranger := netip.MustParseAddrPort("127.0.0.2:5353")

	now = start.Add(1300 * time.Millisecond)
	b.handlePacket(bye, stranger)
	select {
	case <-b.rescueNow:
	default:
		t.Fatal("a goodbye for our node did not wake the loop")
	}
	b.tick(now)
	if sent, _ := local(); !sent.Equal(now) {
		t.Fatalf("a goodbye 300ms after our announcement: last sent %v after start; want at once (%v)", sent.Sub(start), now.Sub(start))
	}

	now = start.Add(1500 * time.Millisecond)
	b.handlePacket(bye, stranger)
	b.tick(now)
	if sent, pending := local(); sent.Equal(now) || !pending.Equal(start.Add(2300*time.Millisecond)) {
		t.Errorf("a second goodbye within the second: sent %v, pending %v after start; want it answered at 2.3s", sent.Sub(start), pending.Sub(start))
	}
	b.tick(start.Add(2300 * time.Millisecond))
	if sent, _ := local(); !sent.Equal(start.Add(2300 * time.Millisecond)) {
		t.Errorf("the second goodbye's answer: last sent %v after start; want 2.3s", sent.Sub(start))
	}
	if n := b.stats.goodbyesSeen.Load(); n != 2 {
		t.Errorf("%d goodbyes defended; want 2", n)
	}
}

// TestRepeatedRegisterAnnouncesOncePerSecond: a client re-registering the
// same node in a loop gets at most one announcement a second (RFC 6762
// section 6); a change is announced at once.
func TestRepeatedRegisterAnnouncesOncePerSecond(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	now := time.Unix(1000, 0)
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	lastSent := func() time.Time { return soleLocal(b).lastSent }
	b.register(svc, 30*time.Second)
	start := now
	for _, at := range []time.Duration{100 * time.Millisecond, 500 * time.Millisecond, 999 * time.Millisecond} {
		now = start.Add(at)
		b.register(svc, 30*time.Second)
		if got := lastSent(); !got.Equal(start) {
			t.Fatalf("an unchanged registration %v after the last announcement was announced again (%v)", at, got)
		}
	}
	now = start.Add(time.Second)
	b.register(svc, 30*time.Second)
	if got := lastSent(); !got.Equal(now) {
		t.Errorf("an unchanged registration a second later: last sent %v; want now", got)
	}
	// Changed within the second, in a loop (a port, a TTL that varies, a
	// heartbeat's counter): the newest state goes once the second is up,
	// and again a second later (RFC 6762 sections 6 and 8.3).
	sentAt := now
	for i := range 50 {
		now = sentAt.Add(time.Duration(i+1) * 10 * time.Millisecond)
		svc.Nodes[0].Port = 81 + i%2
		b.register(svc, time.Duration(30+i%2)*time.Second)
		b.tick(now)
		if got := lastSent(); !got.Equal(sentAt) {
			t.Fatalf("a node changed %v after its announcement went out again at once (%v)", now.Sub(sentAt), got.Sub(sentAt))
		}
	}
	var sent []time.Duration
	for now = now.Add(mdnsTick); now.Before(sentAt.Add(4 * time.Second)); now = now.Add(mdnsTick) {
		b.tick(now)
		if got := lastSent(); !got.Equal(sentAt) && (len(sent) == 0 || got.Sub(sentAt) != sent[len(sent)-1]) {
			sent = append(sent, got.Sub(sentAt))
		}
	}
	if len(sent) != 2 || sent[0] != time.Second || sent[1] != 2*time.Second {
		t.Errorf("the changed node went out %v after the last announcement; want at 1s and 2s", sent)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.locals {
		if l.ann.port != 82 {
			t.Errorf("announced port %d; want the newest, 82", l.ann.port)
		}
	}
}

// TestAnswersCarryTheTimeLeft: a node posted with ?ttl= is announced and
// answered with what is left of its life, so that other caches drop it
// when its own sidecar does; a whole TTL in every answer kept it alive
// elsewhere for up to twice as long.
func TestAnswersCarryTheTimeLeft(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	now := time.Unix(1000, 0)
	b.now = func() time.Time { return now }
	b.register(Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80}}}, 10*time.Second)
	query, _ := queryPacket([]dnsmessage.Question{question(mdnsServiceType, dnsmessage.TypePTR)}, nil)
	now = now.Add(8 * time.Second) // a peer's refresh query, at 80% of the TTL
	out := b.handlePacket(query, netip.MustParseAddrPort("127.0.0.2:5353"))
	if len(out) != 1 {
		t.Fatalf("%d answers; want 1", len(out))
	}
	var p dnsmessage.Parser
	p.Start(out[0].data)
	p.SkipAllQuestions()
	ans, _ := p.AllAnswers()
	if len(ans) == 0 || ans[0].Header.TTL != 2 {
		t.Errorf("answers %+v; want TTL 2, the time left", ans)
	}
}

// TestShortTTLHeartbeatIsAnnounced: a client that posts ?ttl=1s every
// 0.9 s keeps its node alive on other sidecars: a post held back by the
// once-a-second rule goes out when the second is up, with the new expiry.
func TestShortTTLHeartbeatIsAnnounced(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	now := time.Unix(1000, 0)
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	b.register(svc, time.Second)
	now = now.Add(900 * time.Millisecond)
	b.register(svc, time.Second)
	now = time.Unix(1001, 0)
	b.tick(now) // the second announcement of RFC 6762 section 8.3
	now = now.Add(800 * time.Millisecond)
	b.register(svc, time.Second) // under a second after that repeat: held back
	b.mu.Lock()
	var repeatAt time.Time
	for _, l := range b.locals {
		repeatAt = l.repeatAt
	}
	b.mu.Unlock()
	if want := time.Unix(1002, 0); !repeatAt.Equal(want) {
		t.Errorf("the held-back post is due %v; want %v, a second after the last announcement", repeatAt, want)
	}
}

func TestRegisterLabels(t *testing.T) {
	tb := newTable(100)
	b := newMDNSState(tb, discardLog, 0)
	for _, svc := range []string{"topic:a", "topic:b"} {
		if err := b.register(Service{Name: svc, Nodes: []Node{{ID: "sidecar-1", Address: "127.0.0.1", Port: 80}}}, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for _, l := range b.locals {
		seen[l.ann.instance] = true
	}
	if len(seen) != 2 {
		t.Errorf("one id under two services: instances %v; want two distinct", seen)
	}
	err := b.register(Service{Name: "s", Nodes: []Node{{ID: strings.Repeat("i", 253), Address: "127.0.0.1", Port: 80}}}, time.Minute)
	if err == nil || lookupOK(tb, "s") != 0 {
		t.Errorf("an id TXT cannot carry: err %v; want an error and nothing registered", err)
	}
	b.deregister(Service{Name: "topic:a", Nodes: []Node{{ID: "sidecar-1"}}})
	if len(b.locals) != 1 || len(b.labels) != 1 || lookupOK(tb, "topic:a") != 0 {
		t.Errorf("after deregister: %d locals, %d labels; want 1 and 1", len(b.locals), len(b.labels))
	}
}

// TestGoodbyesSharePackets: leaving with many nodes sends their goodbyes
// several to a packet, every one of them.
func TestGoodbyesSharePackets(t *testing.T) {
	b := newMDNSState(newTable(1000), discardLog, 0)
	var keys []string
	for i := range 100 {
		s := Service{Name: "svc", Nodes: []Node{{ID: fmt.Sprint("node-", i), Address: "127.0.0.1", Port: 80}}}
		if err := b.register(s, time.Minute); err != nil {
			t.Fatal(err)
		}
		keys = append(keys, keysOf(s)...)
	}
	b.mu.Lock()
	pkts := b.forgetLocalsLocked(keys)
	b.mu.Unlock()
	if len(pkts) == 0 || len(pkts) > 25 {
		t.Fatalf("%d packets for 100 goodbyes; want several to a packet", len(pkts))
	}
	byes := map[string]bool{}
	for _, data := range pkts {
		pkt, err := parsePacket(data)
		if err != nil || len(data) > mdnsMaxPacket {
			t.Fatalf("a goodbye packet of %d bytes: %v", len(data), err)
		}
		for _, rr := range pkt.records {
			if rr.ttl != 0 {
				t.Errorf("a record with TTL %d among goodbyes", rr.ttl)
			}
			if rr.typ == dnsmessage.TypePTR {
				byes[rr.target] = true
			}
		}
	}
	if len(byes) != 100 {
		t.Errorf("goodbyes for %d instances; want 100", len(byes))
	}
}

func TestChooseInterfaces(t *testing.T) {
	lo := net.Interface{Index: 1, Name: "lo", Flags: net.FlagUp | net.FlagLoopback}
	eth := net.Interface{Index: 2, Name: "eth0", Flags: net.FlagUp | net.FlagMulticast}
	down := net.Interface{Index: 3, Name: "eth1", Flags: net.FlagMulticast}
	tun := net.Interface{Index: 4, Name: "tun0", Flags: net.FlagUp | net.FlagPointToPoint}
	noV4 := net.Interface{Index: 5, Name: "eth2", Flags: net.FlagUp | net.FlagMulticast}
	all := []net.Interface{lo, eth, down, tun, noV4}
	v4 := func(i net.Interface) netip.Addr {
		if i.Name == "eth2" {
			return netip.Addr{}
		}
		return netip.MustParseAddr("192.0.2.1")
	}
	names := func(is []net.Interface) string {
		var s []string
		for _, i := range is {
			s = append(s, i.Name)
		}
		return strings.Join(s, ",")
	}
	for _, tc := range []struct {
		names    []string
		loopback bool
		want     string
		err      string
	}{
		{nil, true, "lo", ""},
		{nil, false, "eth0", ""},
		{[]string{"eth1", "lo"}, false, "eth1,lo", ""},
		{[]string{"lo", "lo"}, false, "lo", ""}, // joined twice, every packet would go out twice
		{[]string{"wlan0"}, false, "", `--registry_interface "wlan0": no such interface (this host has lo, eth0, eth1, tun0, eth2)`},
	} {
		got, err := chooseInterfaces(tc.names, tc.loopback, all, v4)
		if names(got) != tc.want || (err == nil) != (tc.err == "") || (err != nil && err.Error() != tc.err) {
			t.Errorf("chooseInterfaces(%v, loopback %v) = %s, %v; want %s, %q", tc.names, tc.loopback, names(got), err, tc.want, tc.err)
		}
	}
}

func TestAdvertisesLoopback(t *testing.T) {
	for _, tc := range []struct {
		c    config
		want bool
	}{
		{config{Address: "127.0.0.1:0"}, true},
		{config{Address: ":8081"}, false},
		{config{Address: "[::1]:8081"}, true},
		{config{Address: "127.0.0.1:0", ServerName: "a", ServerAddress: "10.0.0.5:80"}, false},
		{config{Address: ":8081", ServerName: "a", ServerAddress: "localhost:80"}, true},
		{config{Address: "LOCALHOST:8081"}, true}, // names ignore case
		{config{Address: ":8081", ServerName: "a", ServerAddress: "LocalHost.:80"}, true},
	} {
		if got := tc.c.advertisesLoopback(); got != tc.want {
			t.Errorf("%+v: advertisesLoopback = %v; want %v", tc.c, got, tc.want)
		}
	}
}

// FuzzMDNSPacket drives the packet-to-registry path with any bytes, as a
// response and as a query, and checks that nothing panics, that only valid
// nodes reach the table, that the cache keeps its bounds and that our own
// node survives whatever is heard.
func FuzzMDNSPacket(f *testing.F) {
	for _, r := range []record{
		testRecord("go.micro.srv.example", "go.micro.srv.example-1", "127.0.0.1", 8080),
		testRecord("v6", "n6", "2001:db8::1", 1),
		testRecord("named", strings.Repeat("q", 100), "db.example.com", 443),
	} {
		a, _ := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
		for _, ttl := range []uint32{120, 0} {
			p, _ := announcePacket(a, ttl)
			f.Add(p)
		}
	}
	q, _ := queryPacket([]dnsmessage.Question{question(mdnsServiceType, dnsmessage.TypePTR), question(mdnsServicesEnum, dnsmessage.TypeALL)}, nil)
	f.Add(q)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, data []byte) {
		tb := newTable(20)
		b := newMDNSState(tb, discardLog, 0)
		b.cache.max = 8
		own := Service{Name: "own", Nodes: []Node{{ID: "own-1", Address: "127.0.0.1", Port: 9}}}
		if err := b.register(own, time.Minute); err != nil {
			t.Fatal(err)
		}
		b.handlePacket(data, netip.MustParseAddrPort("127.0.0.1:5353"))
		b.handlePacket(data, netip.MustParseAddrPort("127.0.0.1:40000"))
		b.tick(time.Now().Add(2 * time.Second))
		if len(b.cache.instances)-b.cache.own > 8 || len(b.cache.hosts) > 8+b.cache.own || b.cache.own > 1 {
			t.Fatalf("cache past its bound: %d instances (%d our own), %d hosts", len(b.cache.instances), b.cache.own, len(b.cache.hosts))
		}
		for _, r := range tb.snapshot() {
			s := Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}
			if err := normalizeService(&s); err != nil {
				t.Fatalf("invalid node in the table: %+v: %v", r, err)
			}
		}
		if lookupOK(tb, "own") != 1 {
			t.Fatal("our own node was lost")
		}
	})
}

func BenchmarkLookup(b *testing.B) {
	tb := newTable(20000)
	be := newMDNSState(tb, discardLog, 0)
	now := time.Now()
	// 1000 services of 3 nodes each, learned the way the network teaches
	// them: announcement packets through the cache.
	for i := range 3000 {
		r := testRecord(fmt.Sprint("svc", i/3), fmt.Sprint("node", i), "10.1.2.3", 8000+i%3)
		a, _ := announcementOf(r, instanceLabel(r.Service, r.Node.ID))
		p, _ := announcePacket(a, 120)
		be.handlePacket(p, netip.MustParseAddrPort("127.0.0.1:5353"))
	}
	if n := len(tb.snapshot()); n != 3000 {
		b.Fatalf("%d nodes learned; want 3000", n)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := tb.lookup(fmt.Sprint("svc", i%1000), now); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
}

// inTestNamespace reports whether this process is a test binary that
// inNamespace re-ran inside a private network namespace.
func inTestNamespace() bool { return os.Getenv("MICRO_TEST_NETNS") == "1" }

// inNamespace runs the calling top-level test again, in a child test
// process inside a private network namespace where only lo is up, and
// reports whether the caller is that child and should
// run the test's body. In the parent it returns false once the child has
// passed, failing or skipping as the child did. Where no namespace can be
// made the test is skipped: multicast tests never touch a real interface.
// A top-level test only: -test.run matches its name.
func inNamespace(t *testing.T) bool {
	t.Helper()
	if inTestNamespace() {
		return true
	}
	for _, tool := range []string{"unshare", "ip"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found (util-linux, iproute2): no network namespace to run the multicast test in", tool)
		}
	}
	unshare := []string{"-n"}
	if os.Geteuid() != 0 {
		unshare = []string{"-r", "-n"}
	}
	if out, err := exec.Command("unshare", append(unshare, "true")...).CombinedOutput(); err != nil {
		t.Skipf("cannot make a network namespace (unshare %s: %v %s); skipping rather than multicasting on a real interface", strings.Join(unshare, " "), err, out)
	}
	// lo is left as it comes, without the MULTICAST flag or a multicast
	// route, as on a developer's machine: the sidecar must work there.
	script := `ip link set lo up || exit 97
exec "$@"`
	args := append(unshare, "--", "/bin/sh", "-c", script, "sh",
		os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v", "-test.timeout=5m")
	cmd := exec.Command("unshare", args...)
	cmd.Env = append(os.Environ(), "MICRO_TEST_NETNS=1", "MICRO_TEST_BIN="+binPath)
	raw, err := cmd.CombinedOutput()
	// Indent the child's report so that it is not read as this process's.
	out := "ns| " + strings.ReplaceAll(strings.TrimRight(string(raw), "\n"), "\n", "\nns| ")
	switch {
	case cmd.ProcessState != nil && cmd.ProcessState.ExitCode() == 97:
		t.Skipf("cannot bring lo up in the namespace:\n%s", out)
	case err != nil:
		t.Fatalf("in a private network namespace: %v\n%s", err, out)
	case strings.Contains(string(raw), "--- SKIP: "+t.Name()):
		t.Skipf("skipped in the namespace:\n%s", out)
	case !strings.Contains(string(raw), "--- PASS: "+t.Name()):
		t.Fatalf("the namespace run did not pass %s:\n%s", t.Name(), out)
	}
	t.Logf("ran in a private network namespace:\n%s", out)
	return false
}

// End-to-end multicast tests: real sidecar processes in a private network
// namespace, found by each other and by a DNS-SD implementation nobody here
// wrote.

// mdnsArgs are the flags of a multicast sidecar in these tests: a short TTL
// so that a killed sidecar's nodes expire within the test.
var mdnsArgs = []string{"--register_ttl=2s", "--register_interval=500ms"}

// TestMDNSThreeSidecars runs three sidecars with the default registry on
// one host: each finds the others' apps; a node posted to one appears on
// the others, with a 100-byte id; SIGTERM takes a sidecar's app away at
// once, SIGKILL within the TTL.
func TestMDNSThreeSidecars(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	var ps []*proc
	var ids []string
	for i := range 3 {
		p := startSidecar(t, append(mdnsArgs, fmt.Sprintf("--server_name=app%d", i), fmt.Sprintf("--server_address=127.0.0.1:%d", 9000+i), "--server_metadata=lang=go,name=meta")...)
		ps = append(ps, p)
		ids = append(ids, appID(t, p))
		if !strings.Contains(p.log.String(), "Multicast registry on lo") {
			t.Errorf("a sidecar for a loopback app must use lo alone; log:\n%s", p.log.String())
		}
	}
	for _, p := range ps {
		for i, id := range ids {
			waitFor(t, 5*time.Second, fmt.Sprintf("%s to see app%d", p.addr, i), func() bool { return hasNode(lookup(t, p, fmt.Sprintf("app%d", i)), id) })
		}
	}
	if s := lookup(t, ps[0], "app2"); s.Nodes[0].Address != "127.0.0.1" || s.Nodes[0].Port != 9002 || s.Nodes[0].Metadata["lang"] != "go" || s.Nodes[0].Metadata["name"] != "meta" {
		t.Errorf("app2 as seen by sidecar 0: %+v; want 127.0.0.1:9002 with its metadata", s)
	}

	longID := "node-" + strings.Repeat("0123456789", 9) + "abcde"
	body := fmt.Sprintf(`{"name":"posted","version":"2.1","metadata":{"team":"x"},"nodes":[{"id":%q,"address":"127.0.0.1:7000","metadata":{"k":"v"}}]}`, longID)
	start := time.Now()
	if code, out := do(t, "POST", ps[0].url("/registry"), "", body); code != 200 {
		t.Fatalf("register: %d %s", code, out)
	}
	waitFor(t, 5*time.Second, "the posted 100-byte id on sidecar 1", func() bool { return hasNode(lookup(t, ps[1], "posted"), longID) })
	t.Logf("register on one sidecar -> seen on another: %v", time.Since(start))
	// Sidecar 2 hears the same packet on its own socket, in its own time.
	waitFor(t, 5*time.Second, "the posted 100-byte id on sidecar 2", func() bool { return hasNode(lookup(t, ps[2], "posted"), longID) })
	if s := lookup(t, ps[2], "posted"); !hasNode(s, longID) || s.Version != "2.1" || s.Metadata["team"] != "x" || s.Nodes[0].Metadata["k"] != "v" {
		t.Errorf("posted service on sidecar 2: %+v; want version, service and node metadata", s)
	}
	tooLong := strings.Repeat("i", 253) // valid for the registry, too long for a TXT string
	code, out := do(t, "POST", ps[0].url("/registry"), "", fmt.Sprintf(`{"name":"toolong","nodes":[{"id":%q,"address":"127.0.0.1:7000"}]}`, tooLong))
	if code != 400 || !strings.Contains(out, "a TXT string holds 255") || lookup(t, ps[0], "toolong") != nil {
		t.Errorf("a 253-byte id: %d %s; want 400 naming the limit, and nothing registered", code, out)
	}
	if code, out := do(t, "DELETE", ps[0].url("/registry"), "", fmt.Sprintf(`{"name":"posted","nodes":[{"id":%q}]}`, longID)); code != 200 {
		t.Fatalf("deregister: %d %s", code, out)
	}
	waitFor(t, time.Second, "the deregistered node to go from sidecar 2", func() bool { return lookup(t, ps[2], "posted") == nil })

	start = time.Now()
	if code := ps[2].stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status after SIGTERM: %d; want 0", code)
	}
	waitFor(t, time.Second, "app2 to go after SIGTERM", func() bool { return lookup(t, ps[0], "app2") == nil })
	t.Logf("SIGTERM -> gone elsewhere: %v", time.Since(start))

	start = time.Now()
	ps[1].stop(syscall.SIGKILL)
	waitFor(t, 5*time.Second, "app1 to expire after SIGKILL", func() bool { return lookup(t, ps[0], "app1") == nil })
	took := time.Since(start)
	t.Logf("SIGKILL -> gone elsewhere: %v (TTL 2s)", took)
	if took > 2*time.Second+500*time.Millisecond {
		t.Errorf("app1 vanished %v after SIGKILL; want within the 2s TTL", took)
	}
	if !hasNode(lookup(t, ps[0], "app0"), ids[0]) {
		t.Error("a live sidecar's own app was lost")
	}
	assertRegistryHealthy(t, ps[0])
	code, metrics := do(t, "GET", ps[0].url("/metrics"), "", "")
	for _, want := range []string{"# TYPE micro_mdns_packets_total counter", `micro_mdns_packets_total{event="received"} `, `micro_mdns_packets_total{event="sent"} `} {
		if code != 200 || !strings.Contains(metrics, want) {
			t.Errorf("/metrics: %d, lacks %q", code, want)
		}
	}
	if strings.Contains(metrics, `micro_mdns_packets_total{event="received"} 0`) {
		t.Error("/metrics: no packet counted as received")
	}
}

func assertRegistryHealthy(t *testing.T, p *proc) {
	t.Helper()
	code, body := do(t, "GET", p.url("/health"), "", "")
	if code != 200 || !strings.Contains(body, `"registry":"mdns"`) || strings.Contains(body, "registry_error") {
		t.Errorf("/health: %d %s; want 200 with the mdns registry and no error", code, body)
	}
	if strings.Contains(p.log.String(), "another host announces") {
		t.Errorf("a conflict where there is none:\n%s", p.log.String())
	}
}

// TestMDNSLateJoiner shows the query on start: a sidecar started after the
// others learns their apps at once, long before their next refresh.
func TestMDNSLateJoiner(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	early := startSidecar(t, "--server_name=early", "--server_address=127.0.0.1:9100", "--register_ttl=1h")
	id := appID(t, early)
	waitFor(t, 5*time.Second, "the early app on its own sidecar", func() bool { return hasNode(lookup(t, early, "early"), id) })
	late := startSidecar(t, "--register_ttl=1h")
	waitFor(t, 3*time.Second, "the late sidecar to learn the early app", func() bool { return hasNode(lookup(t, late, "early"), id) })
}

// TestMDNSPortTakenKeepsServing: when UDP 5353 is held by a program that
// does not share it, the sidecar says why and what to do, /health reports
// it, and the local registry keeps working.
func TestMDNSPortTakenKeepsServing(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	// A socket without SO_REUSEADDR holds the port and does not share it.
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_DGRAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Port: 5353}); err != nil {
		t.Fatalf("holding the port: %v", err)
	}
	p := startSidecar(t, "--server_name=alone", "--server_address=127.0.0.1:9200")
	if lookup(t, p, "alone") == nil {
		t.Fatal("the local registry must keep working")
	}
	code, body := do(t, "GET", p.url("/health"), "", "")
	if code != 503 || !strings.Contains(body, "interface lo") || !strings.Contains(body, "--registry=file") {
		t.Errorf("/health: %d %s; want 503 naming the interface and the way out", code, body)
	}
	if !strings.Contains(p.log.String(), "multicast registry cannot use an interface") {
		t.Errorf("the failure is not logged:\n%s", p.log.String())
	}
	code, out := run(t, "sidecar", "--address=127.0.0.1:0", "--registry=mdns", "--registry_interface=nosuch0")
	if code != 1 || !strings.Contains(out, `--registry_interface "nosuch0": no such interface (this host has lo`) {
		t.Errorf("unknown interface: exit %d, %s; want exit 1 listing the interfaces", code, out)
	}
}

// zeroconfPython is the Debian python3-zeroconf, not whatever python3 is
// first on PATH.
const zeroconfPython = "/usr/bin/python3"

// zeroconfScript browses for an instance whose TXT id= is argv[2], or
// registers one with our TXT keys until stdin closes.
const zeroconfScript = `
import json, socket, sys, time
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, Zeroconf
zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
T = "_micro._tcp.local."
if sys.argv[1] == "browse":
    names = set()
    class L:
        def add_service(self, zc, t, name): names.add(name)
        def update_service(self, zc, t, name): names.add(name)
        def remove_service(self, zc, t, name): names.discard(name)
    ServiceBrowser(zc, T, L())
    deadline = time.time() + 15
    while time.time() < deadline:
        for name in list(names):
            info = zc.get_service_info(T, name, timeout=1000)
            if info and info.properties.get(b"id") == sys.argv[2].encode():
                props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
                print(json.dumps({"name": name, "port": info.port, "addresses": info.parsed_addresses(), "server": info.server, "properties": props}))
                zc.close()
                sys.exit(0)
        time.sleep(0.05)
    print("not found among", sorted(names))
    zc.close()
    sys.exit(1)
info = ServiceInfo(T, "zeroconf node._micro._tcp.local.", addresses=[socket.inet_aton("127.0.0.1")], port=4242,
    properties={"txtvers": "1", "name": "zcsvc", "id": "zc-node-1", "version": "2.0", "color": "blue"}, server="zchost.local.")
zc.register_service(info)
print("registered", flush=True)
sys.stdin.read()
zc.unregister_service(info)
zc.close()
`

// TestMDNSZeroconfInterop proves the wire format against python-zeroconf:
// it browses _micro._tcp and resolves our node with its TXT keys, and a
// service it registers with those keys is found through /registry, then
// goes with its goodbye.
func TestMDNSZeroconfInterop(t *testing.T) {
	if out, err := exec.Command(zeroconfPython, "-c", "import zeroconf").CombinedOutput(); err != nil {
		t.Skipf("%s cannot import zeroconf (apt-get install python3-zeroconf): %v %s", zeroconfPython, err, out)
	}
	if !inNamespace(t) {
		return
	}
	p := startSidecar(t, "--server_name=go.micro.srv.interop", "--server_address=127.0.0.1:9300", "--server_metadata=lang=go")
	id := appID(t, p)
	browse := exec.Command(zeroconfPython, "-c", zeroconfScript, "browse", id)
	out, err := browse.CombinedOutput()
	if err != nil {
		t.Fatalf("zeroconf did not find our node %s: %v\n%s", id, err, out)
	}
	for _, want := range []string{`"port": 9300`, `"addresses": ["127.0.0.1"]`, `"txtvers": "1"`, `"name": "go.micro.srv.interop"`, `"id": "` + id + `"`, `"lang": "go"`} {
		if !strings.Contains(string(out), want) {
			t.Errorf("zeroconf's view of our node lacks %s:\n%s", want, out)
		}
	}

	reg := exec.Command(zeroconfPython, "-c", zeroconfScript, "register")
	stdin, err := reg.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	regOut := &syncBuffer{}
	reg.Stdout, reg.Stderr = regOut, regOut
	if err := reg.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { reg.Wait(); close(done) }()
	t.Cleanup(func() { reg.Process.Kill(); <-done })
	waitFor(t, 15*time.Second, "zeroconf's service in /registry", func() bool { return hasNode(lookup(t, p, "zcsvc"), "zc-node-1") })
	s := lookup(t, p, "zcsvc")
	if n := s.Nodes[0]; n.Address != "127.0.0.1" || n.Port != 4242 || n.Metadata["color"] != "blue" || s.Version != "2.0" {
		t.Errorf("zeroconf's service: %+v; want 127.0.0.1:4242, version 2.0, color=blue", s)
	}
	stdin.Close() // zeroconf unregisters: goodbye
	waitFor(t, 5*time.Second, "zeroconf's goodbye to remove its service", func() bool { return lookup(t, p, "zcsvc") == nil })
	<-done
	if !strings.Contains(regOut.String(), "registered") {
		t.Errorf("zeroconf output: %s", regOut.String())
	}
}

// TestMDNSAcrossNamespaces is three hosts on one link: three network
// namespaces joined by veth pairs to a bridge (inside this test's own
// private namespace), a sidecar in each with a non-loopback app. They find
// each other over the bridge, and a host cut off the link disappears from
// the others within the TTL.
func TestMDNSAcrossNamespaces(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("making network namespaces with ip netns needs root")
	}
	if !inNamespace(t) {
		return
	}
	ip := func(args ...string) {
		t.Helper()
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v %s", strings.Join(args, " "), err, out)
		}
	}
	tag := fmt.Sprint(os.Getpid() % 100000)
	br := "mbr" + tag
	ip("link", "add", br, "type", "bridge")
	t.Cleanup(func() { exec.Command("ip", "link", "del", br).Run() })
	ip("addr", "add", "10.253.0.254/24", "dev", br)
	ip("link", "set", br, "up")
	var ps []*proc
	var ids []string
	for i, host := range []string{"a", "b", "c"} {
		ns := "micro-test-" + tag + host
		ip("netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		in, out := "mv"+tag+host, "mb"+tag+host
		ip("link", "add", in, "type", "veth", "peer", "name", out)
		ip("link", "set", out, "master", br)
		ip("link", "set", out, "up")
		ip("link", "set", in, "netns", ns)
		addr := fmt.Sprintf("10.253.0.%d", i+1)
		ip("-n", ns, "addr", "add", addr+"/24", "dev", in)
		ip("-n", ns, "link", "set", in, "up")
		ip("-n", ns, "link", "set", "lo", "up")
		p := startSidecarIn(t, []string{"ip", "netns", "exec", ns}, nil, append(mdnsArgs, "--address="+addr+":0",
			"--server_name=host-"+host, "--server_address="+addr+":9000")...)
		if !strings.Contains(p.log.String(), "Multicast registry on "+in) {
			t.Errorf("a sidecar with a non-loopback app must use the up multicast interfaces (%s); log:\n%s", in, p.log.String())
		}
		ps = append(ps, p)
		ids = append(ids, appID(t, p))
	}
	for _, p := range ps {
		for i, host := range []string{"a", "b", "c"} {
			waitFor(t, 5*time.Second, fmt.Sprintf("%s to see host-%s", p.addr, host), func() bool { return hasNode(lookup(t, p, "host-"+host), ids[i]) })
		}
	}
	if s := lookup(t, ps[0], "host-c"); s.Nodes[0].Address != "10.253.0.3" {
		t.Errorf("host-c seen from a: %+v; want address 10.253.0.3", s)
	}
	start := time.Now()
	ip("link", "del", "mb"+tag+"b") // host b drops off the link, unannounced
	for _, p := range []*proc{ps[0], ps[2]} {
		waitFor(t, 5*time.Second, "host-b to expire on "+p.addr, func() bool { return lookup(t, p, "host-b") == nil })
	}
	if took := time.Since(start); took > 2*time.Second+500*time.Millisecond {
		t.Errorf("host b vanished %v after leaving the link; want within the 2s TTL", took)
	}
	if !hasNode(lookup(t, ps[2], "host-a"), ids[0]) {
		t.Error("host-a was lost on c")
	}
}

// TestMDNSFigures measures, in a namespace with three sidecars, how long a
// change takes to reach another sidecar, by the time its watch stream
// reports it: registration, SIGTERM (goodbye) and SIGKILL (TTL expiry),
// plus sequential HTTP lookups from the cache. It runs only when asked:
// MICRO_MDNS_FIGURES=trials (bench/mdns-figures.sh).
func TestMDNSFigures(t *testing.T) {
	trials, _ := strconv.Atoi(os.Getenv("MICRO_MDNS_FIGURES"))
	if trials <= 0 {
		t.Skip("set MICRO_MDNS_FIGURES=trials to measure; see bench/mdns-figures.sh")
	}
	if !inNamespace(t) {
		return
	}
	ttl := cmpOr(os.Getenv("MICRO_MDNS_FIGURES_TTL"), "2s")
	args := []string{"--register_ttl=" + ttl}
	a := startSidecar(t, args...)
	b := startSidecar(t, args...)
	startSidecar(t, args...) // the third sidecar on the link
	events := watchEvents(t, b)
	await := func(action, id string, from time.Time) time.Duration {
		t.Helper()
		for {
			select {
			case ev := <-events:
				if ev.Action == action && len(ev.Service.Nodes) == 1 && ev.Service.Nodes[0].ID == id {
					return time.Since(from)
				}
			case <-time.After(time.Minute):
				t.Fatalf("no %s event for %s within a minute", action, id)
			}
		}
	}
	var reg, term, kill []time.Duration
	for i := range trials {
		id := fmt.Sprint("figure-", i)
		start := time.Now()
		if code, out := do(t, "POST", a.url("/registry"), "", fmt.Sprintf(`{"name":"figures","nodes":[{"id":%q,"address":"127.0.0.1:7000"}]}`, id)); code != 200 {
			t.Fatalf("register: %d %s", code, out)
		}
		reg = append(reg, await("create", id, start))

		p := startSidecar(t, append(args, "--server_name=term", "--server_id="+id+"-term", "--server_address=127.0.0.1:7001")...)
		await("create", id+"-term", time.Now())
		start = time.Now()
		p.stop(syscall.SIGTERM)
		term = append(term, await("delete", id+"-term", start))

		p = startSidecar(t, append(args, "--server_name=kill", "--server_id="+id+"-kill", "--server_address=127.0.0.1:7002")...)
		await("create", id+"-kill", time.Now())
		start = time.Now()
		p.stop(syscall.SIGKILL)
		kill = append(kill, await("delete", id+"-kill", start))
	}
	const lookups = 5000
	start := time.Now()
	for range lookups {
		if lookup(t, b, "figures") == nil {
			t.Fatal("lookup failed")
		}
	}
	took := time.Since(start)
	t.Logf("FIGURE register on one sidecar -> seen on another (%d trials): %s", trials, summary(reg))
	t.Logf("FIGURE SIGTERM -> gone on another (%d trials): %s", trials, summary(term))
	t.Logf("FIGURE SIGKILL -> gone on another, TTL %s (%d trials): %s", ttl, trials, summary(kill))
	t.Logf("FIGURE HTTP lookups from the cache, one client, sequential: %d in %v = %.0f/s", lookups, took.Round(time.Millisecond), lookups/took.Seconds())
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// summary is min / median / 90th percentile / max.
func summary(ds []time.Duration) string {
	s := append([]time.Duration{}, ds...)
	slices.Sort(s)
	at := func(q float64) time.Duration { return s[int(q*float64(len(s)-1))] }
	return fmt.Sprintf("min %v, median %v, p90 %v, max %v", s[0], at(0.5), at(0.9), s[len(s)-1])
}

// watchEvents streams a sidecar's registry changes for the rest of the
// test.
func watchEvents(t *testing.T, p *proc) <-chan Event {
	t.Helper()
	ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ws.Close() })
	ch := make(chan Event, 1024)
	go func() {
		defer close(ch)
		for {
			var ev Event
			if err := websocket.JSON.Receive(ws, &ev); err != nil {
				return
			}
			ch <- ev
		}
	}()
	return ch
}

// refusingBackend refuses every registration, as the mdns backend refuses
// what a TXT record cannot carry.
type refusingBackend struct{ memoryBackend }

func (*refusingBackend) register(Service, time.Duration) error { return errNotAnnounceable }

// TestRefusedRegistrationIsNotKeptAlive: a registration the backend
// refuses is not refreshed (and refused again) at every interval.
func TestRefusedRegistrationIsNotKeptAlive(t *testing.T) {
	tb := newTable(10)
	r := &registry{table: tb, backend: &refusingBackend{memoryBackend{t: tb, now: time.Now}}, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	if err := r.Register(Service{Name: "s", Nodes: []Node{{ID: "n", Address: "127.0.0.1", Port: 1}}}, 0); err == nil {
		t.Fatal("want the backend's refusal")
	}
	if len(r.owned) != 0 {
		t.Errorf("owned after a refused registration: %v; want nothing", r.owned)
	}
	if err := r.refresh(t.Context()); err != nil {
		t.Errorf("refresh: %v; want nothing to refresh", err)
	}
}

// TestMDNSShutdownGoodbyesArePacked: a sidecar that shuts down holding
// many nodes says goodbye several nodes to a packet, paced, as a
// multi-node DELETE does; it sent one packet per node in a burst, which
// overflows receivers' buffers on a default host.
func TestMDNSShutdownGoodbyesArePacked(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	a := startSidecar(t, mdnsArgs...)
	b := startSidecar(t, mdnsArgs...)
	const n = 120
	for i := range n {
		body := fmt.Sprintf(`{"name":"many","nodes":[{"id":"n%d","address":"127.0.0.1:%d"}]}`, i, 7000+i)
		if code, out := do(t, "POST", a.url("/registry"), "application/json", body); code != 200 {
			t.Fatalf("register n%d: %d %s", i, code, out)
		}
	}
	waitFor(t, 10*time.Second, "b to learn the nodes", func() bool {
		s := lookup(t, b, "many")
		return s != nil && len(s.Nodes) == n
	})
	before := receivedPackets(t, b)
	a.stop(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "b to drop the nodes", func() bool { return lookup(t, b, "many") == nil })
	if got := receivedPackets(t, b) - before; got > n/2 {
		t.Errorf("b received %d packets for %d goodbyes; want several nodes to a packet", got, n)
	}
}

// receivedPackets reads micro_mdns_packets_total{event="received"}.
func receivedPackets(t *testing.T, p *proc) int {
	t.Helper()
	_, metrics := do(t, "GET", p.url("/metrics"), "", "")
	var n int
	for _, line := range strings.Split(metrics, "\n") {
		if v, ok := strings.CutPrefix(line, `micro_mdns_packets_total{event="received"} `); ok {
			fmt.Sscan(v, &n)
		}
	}
	return n
}

// TestDottedInstanceIsCountedMalformed: an instance label with a dot in it
// cannot be read with Go's DNS parser; its packet is counted, not lost
// without a trace (README, "Deviations from the RFCs").
func TestDottedInstanceIsCountedMalformed(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 5353)
	pkt := []byte{0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0}
	for _, label := range []string{"node v1.2", "_micro", "_tcp", "local"} {
		pkt = append(append(pkt, byte(len(label))), label...)
	}
	pkt = append(pkt, 0, 0, 16, 0, 1, 0, 0, 0, 120, 0, 1, 0) // TXT IN, TTL 120, one empty string
	b.handlePacket(pkt, netip.MustParseAddrPort("127.0.0.2:5353"))
	if b.stats.malformed.Load() != 1 {
		t.Errorf("malformed %d; want the packet counted", b.stats.malformed.Load())
	}
}

// TestConflictingKeeperIsSaid: another host announcing one of our nodes
// with other data (the same --server_id on two sidecars) is logged and
// counted; our own announcements, heard back, are not.
func TestConflictingKeeperIsSaid(t *testing.T) {
	var log bytes.Buffer
	b := newMDNSState(newTable(10), slog.New(slog.NewTextHandler(&log, nil)), 0)
	svc := Service{Name: "foo", Nodes: []Node{{ID: "foo-1", Address: "127.0.0.1", Port: 9090, Metadata: map[string]string{}}}}
	b.register(svc, 30*time.Second)
	own := soleLocal(b).ann
	echo, _ := announcePacket(own, 30)
	b.handlePacket(echo, netip.MustParseAddrPort("127.0.0.1:5353"))
	if n := b.stats.conflicts.Load(); n != 0 {
		t.Fatalf("our own announcement heard back: %d conflicts; want 0", n)
	}
	other := own
	other.port, other.addr = 9091, netip.MustParseAddr("127.0.0.2")
	data, _ := announcePacket(other, 30)
	b.handlePacket(data, netip.MustParseAddrPort("127.0.0.2:5353"))
	b.handlePacket(data, netip.MustParseAddrPort("127.0.0.2:5353"))
	if n := b.stats.conflicts.Load(); n != 4 {
		t.Errorf("%d conflicts; want 4, the SRV and the address of two announcements", n)
	}
	if got := strings.Count(log.String(), "another host announces this sidecar's node"); got != 1 {
		t.Errorf("logged %d times; want once:\n%s", got, log.String())
	}
}

// TestSignedEntrySurvivesMDNS: a broker entry signed over its advertised
// address (--auth_token) still proves the token once heard back over
// mDNS, which spells IP addresses one way and names in lower case: the
// advertised address is spelled so first (canonicalHost).
func TestSignedEntrySurvivesMDNS(t *testing.T) {
	for _, advertised := range []string{"2001:DB8::7", "::ffff:192.0.2.7", "192.0.2.8", "LOCALHOST", "Node-1.Corp.Example"} {
		host := canonicalHost(advertised)
		n := Node{ID: "sc1", Address: host, Port: 8081, Metadata: map[string]string{"broker": "1", "sidecar": "sc1", "scheme": "http"}}
		n.Metadata["auth"] = peerProof("secret", "sc1", "http", n.hostPort(), "orders", "")
		ch, _, _ := roundTrip(t, record{Service: "topic:orders", Node: n}, 30)
		if len(ch.upsert) != 1 || !provesToken(ch.upsert[0].Node, "secret", "orders") {
			t.Errorf("advertised at %s (signed as %s): heard %+v; want the entry, its proof good", advertised, host, ch.upsert)
		}
	}
	for name, want := range map[string]bool{"johns-mbp.local": true, "JOHNS-MBP.LOCAL.": true, "db.example.com": false, "local": false, "192.0.2.1": false} {
		if isLocalName(name) != want {
			t.Errorf("isLocalName(%q) = %v", name, !want)
		}
	}
}

// localLastSent is when the one node b announces last went out.
func localLastSent(b *mdnsBackend) time.Time { return soleLocal(b).lastSent }

// soleLocal is a copy of the one node b announces (zero when none).
func soleLocal(b *mdnsBackend) mdnsLocal {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.locals {
		return *l
	}
	return mdnsLocal{}
}

// TestSentRecordsAreNotRepeatedWithinASecond: a post that goes out while
// a held-back repeat is pending is not followed by that repeat at the next
// tick, well under a second later (RFC 6762 section 6).
func TestSentRecordsAreNotRepeatedWithinASecond(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	start := time.Unix(1000, 0)
	now := start
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	b.register(svc, 2*time.Second) // a ?ttl=2s heartbeat
	now = start.Add(time.Second)
	b.tick(now) // section 8.3's second announcement
	now = start.Add(1500 * time.Millisecond)
	b.register(svc, 2*time.Second) // held back: repeat due at 2.0 s
	now = start.Add(2010 * time.Millisecond)
	b.register(svc, 2*time.Second) // a second after the last: goes out now
	first := localLastSent(b)
	now = start.Add(2050 * time.Millisecond)
	b.tick(now)
	if second := localLastSent(b); !second.Equal(first) {
		t.Errorf("records multicast at %v and again at %v, %v apart; want at most once a second", first.Sub(start), second.Sub(start), second.Sub(first))
	}
}

// TestGoodbyesAreDefendedOnceASecond: goodbyes for our node heard from
// someone else, one every 250 ms, are answered by announcing the node at
// most once a second (RFC 6762 section 6), not at every tick.
func TestGoodbyesAreDefendedOnceASecond(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	start := time.Unix(1000, 0)
	now := start
	b.now = func() time.Time { return now }
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	b.register(svc, 30*time.Second)
	now = start.Add(time.Second)
	b.tick(now)
	ann := soleLocal(b).ann
	bye, _ := announcePacket(ann, 0)
	sends := 0
	for i := 1; i <= 8; i++ { // two seconds of a goodbye every 250 ms
		now = start.Add(time.Second + time.Duration(i)*250*time.Millisecond)
		before := localLastSent(b)
		b.handlePacket(bye, netip.MustParseAddrPort("127.0.0.2:5353"))
		b.tick(now)
		if !localLastSent(b).Equal(before) {
			sends++
		}
	}
	if sends > 2 {
		t.Errorf("2 s of goodbyes every 250 ms: the node was multicast %d times; want at most 2", sends)
	}
}

// TestOwnEchoAfterAChangeIsNoConflict: our own announcement heard back
// after the node changed (the echo still in the socket) is no conflicting
// record of another host's.
func TestOwnEchoAfterAChangeIsNoConflict(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	svc := Service{Name: "foo", Nodes: []Node{{ID: "foo-1", Address: "127.0.0.1", Port: 9090, Metadata: map[string]string{"v": "1"}}}}
	b.register(svc, 30*time.Second)
	v1 := soleLocal(b).ann
	echo, _ := announcePacket(v1, 30)
	svc.Nodes[0].Metadata = map[string]string{"v": "2"}
	b.register(svc, 30*time.Second)
	b.handlePacket(echo, netip.MustParseAddrPort("127.0.0.1:5353")) // our v1 packet, read late
	if n := b.stats.conflicts.Load(); n != 0 {
		t.Errorf("our own previous announcement heard back: %d conflicts; want 0", n)
	}
}

// TestLapsedNodeLeavesEverySidecarAtOnce: a node posted once with ?ttl=
// and not renewed leaves the other sidecars when it leaves its own: its
// sidecar says goodbye, since the last answer a peer got may have carried
// the least TTL announced (2 s) in the node's last moments.
func TestLapsedNodeLeavesEverySidecarAtOnce(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	keeper := startSidecar(t, mdnsArgs...)
	peer := startSidecar(t, mdnsArgs...)
	for _, ttl := range []string{"3s", "5s"} {
		name := "lapsing" + ttl
		posted := time.Now()
		if code, out := do(t, "POST", keeper.url("/registry?ttl="+ttl), "", `{"name":"`+name+`","nodes":[{"id":"l1","address":"127.0.0.1","port":7000}]}`); code != 200 {
			t.Fatalf("register: %d %s", code, out)
		}
		waitFor(t, 5*time.Second, name+" on the peer", func() bool { return hasNode(lookup(t, peer, name), "l1") })
		waitFor(t, 15*time.Second, name+" gone from its keeper", func() bool { return !hasNode(lookup(t, keeper, name), "l1") })
		goneHere := time.Since(posted)
		waitFor(t, 15*time.Second, name+" gone from the peer", func() bool { return !hasNode(lookup(t, peer, name), "l1") })
		if lag := time.Since(posted) - goneHere; lag > time.Second {
			t.Errorf("?ttl=%s: gone from the peer %v after its keeper; want within the second", ttl, lag.Round(10*time.Millisecond))
		}
	}
}

// TestDeletingAPeersNodeOverMDNS: a DELETE through one sidecar of a node
// another announces says goodbye to it on the link. A live keeper
// announces it again at once, as a shared registry's keeper puts back an
// entry deleted elsewhere; a killed keeper's node leaves every sidecar at
// once, not a TTL later.
func TestDeletingAPeersNodeOverMDNS(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	keeper := startSidecar(t, "--register_ttl=60s", "--register_interval=20s") // refreshes too rare to be what brings it back
	b := startSidecar(t, mdnsArgs...)
	c := startSidecar(t, mdnsArgs...)
	node := `{"name":"kept","nodes":[{"id":"k1","address":"127.0.0.1","port":7000}]}`
	if code, out := do(t, "POST", keeper.url("/registry"), "", node); code != 200 {
		t.Fatalf("register: %d %s", code, out)
	}
	for _, p := range []*proc{b, c} {
		waitFor(t, 5*time.Second, "the node on a peer", func() bool { return hasNode(lookup(t, p, "kept"), "k1") })
	}
	if code, out := do(t, "DELETE", b.url("/registry"), "", node); code != 200 {
		t.Fatalf("delete through a peer: %d %s", code, out)
	}
	for _, p := range []*proc{b, c} {
		waitFor(t, 5*time.Second, "the node put back by its live keeper", func() bool { return hasNode(lookup(t, p, "kept"), "k1") })
	}

	keeper.stop(syscall.SIGKILL) // its node would live on for 60 s
	if code, out := do(t, "DELETE", b.url("/registry"), "", node); code != 200 {
		t.Fatalf("delete of a dead keeper's node: %d %s", code, out)
	}
	for _, p := range []*proc{b, c} {
		waitFor(t, 5*time.Second, "the dead keeper's node gone from every sidecar", func() bool { return !hasNode(lookup(t, p, "kept"), "k1") })
	}
}

// TestRollingRestartWithAFixedIDOverMDNS: README's rolling restart that
// keeps the node id (start the new sidecar, stop the old one) leaves the
// node out of a caller's view for moments, not for the up to a second
// the new sidecar waited to announce it again after the old one's
// goodbye (10% of calls got 404 in a review's run).
func TestRollingRestartWithAFixedIDOverMDNS(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	caller := startSidecar(t, mdnsArgs...)
	app := []string{"--server_name=roll", "--server_address=127.0.0.1:7001", "--server_id=roll-1"}
	old := startSidecar(t, app...)
	waitFor(t, 5*time.Second, "the old sidecar's node at the caller", func() bool { return hasNode(lookup(t, caller, "roll"), "roll-1") })
	startSidecar(t, app...) // announces the node as it starts: its last announcement is moments old
	old.cmd.Process.Signal(syscall.SIGTERM)
	var missing time.Duration
	var since time.Time
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); {
		there := hasNode(lookup(t, caller, "roll"), "roll-1")
		switch now := time.Now(); {
		case !there && since.IsZero():
			since = now
		case there && !since.IsZero():
			missing += now.Sub(since)
			since = time.Time{}
		}
	}
	if !since.IsZero() {
		t.Fatal("the node is gone from the caller 2s after the old sidecar's goodbye")
	}
	<-old.done
	if missing > 300*time.Millisecond {
		t.Errorf("the node was missing at the caller for %v after the old sidecar's goodbye; want moments", missing)
	}
	t.Logf("missing for %v", missing)
}

// TestFailingRestartDropsAKilledRunsNodeOverMDNS: a sidecar killed with a
// fixed --server_id leaves its app's node in every other cache for its
// TTL, unheard by the sidecar that replaces it (nobody answers for a dead
// sidecar's nodes); when the replacement's first checks fail, its goodbye
// by the node's instance name takes the node out at once, so that callers
// stop reaching the failing app.
func TestFailingRestartDropsAKilledRunsNodeOverMDNS(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	caller := startSidecar(t, mdnsArgs...)
	app := []string{"--server_name=again", "--server_address=127.0.0.1:7002", "--server_id=again-1"}
	first := startSidecar(t, append(app, "--register_ttl=60s")...)
	waitFor(t, 5*time.Second, "the first run's node at the caller", func() bool { return hasNode(lookup(t, caller, "again"), "again-1") })
	first.stop(syscall.SIGKILL)
	startSidecar(t, append(app, "--healthcheck_url=tcp://"+deadPort(t), "--healthcheck_interval=200ms")...)
	waitFor(t, 10*time.Second, "the killed run's node gone from the caller (its TTL is 60s)", func() bool { return !hasNode(lookup(t, caller, "again"), "again-1") })
}

// TestFailingNewSidecarLeavesALiveNodeOverMDNS: README's rolling restart
// with a health check, the new sidecar's app not up at its first check:
// the old sidecar, alive, answered the new one's startup query, so the
// new one sends no goodbye for the node, which every cache would have
// dropped until the old one announced it again.
func TestFailingNewSidecarLeavesALiveNodeOverMDNS(t *testing.T) {
	if !inNamespace(t) {
		return
	}
	app := []string{"--server_name=live", "--server_address=127.0.0.1:7003", "--server_id=live-1"}
	old := startSidecar(t, app...)
	waitFor(t, 5*time.Second, "the old sidecar's announcement", func() bool { return hasNode(lookup(t, old, "live"), "live-1") })
	freshStart := time.Now()
	fresh := startSidecar(t, append(app, "--healthcheck_url=tcp://"+deadPort(t), "--healthcheck_interval=200ms")...)
	waitFor(t, 5*time.Second, "the new sidecar to hear the live node", func() bool { return hasNode(lookup(t, fresh, "live"), "live-1") })
	waitFor(t, 10*time.Second, "the new sidecar's app to be found failing", func() bool {
		_, body := do(t, "GET", fresh.url("/health"), "", "")
		return strings.Contains(body, `"status":"failing"`)
	})
	// Past the moment an unheard node's goodbye would have gone (and a
	// tick more), the old sidecar has heard none for its node: this waits
	// out a bound, not for an event.
	time.Sleep(time.Until(freshStart.Add(unheardWait + time.Second)))
	if _, m := do(t, "GET", old.url("/metrics"), "", ""); !strings.Contains(m, `micro_mdns_packets_total{event="defended"} 0`) {
		t.Errorf("the old sidecar answered goodbyes for its live node; want none:\n%s", m)
	}
}

// TestLegacyQueriesOnlyFromTheLink: a query from a port other than 5353 is
// answered to its source, so it is taken only from a source on the
// interface's subnets (RFC 6762 section 11): the answer must not leave by
// a route to somewhere else.
func TestLegacyQueriesOnlyFromTheLink(t *testing.T) {
	lo, err := net.InterfaceByName("lo")
	if err != nil {
		t.Skip("no lo here:", err)
	}
	link := linkPrefixes(*lo)
	for addr, want := range map[string]bool{"127.0.0.1": true, "127.9.9.9": true, "::ffff:127.0.0.1": true, "192.0.2.1": false, "2001:db8::1": false} {
		if got := onLink(link, netip.MustParseAddr(addr)); got != want {
			t.Errorf("onLink(%v, %s) = %v; want %v", link, addr, got, want)
		}
	}
	lan := []netip.Prefix{netip.MustParsePrefix("192.168.1.0/24")}
	if !onLink(lan, netip.MustParseAddr("192.168.1.77")) || onLink(lan, netip.MustParseAddr("192.168.2.1")) {
		t.Error("a /24: want its hosts on the link and the next subnet's off it")
	}
}

// TestGoodbyeIsNotOvertaken: a DELETE while an announcement of the node is
// being sent (a paced burst of a thousand takes tens of milliseconds)
// sends its goodbye after that announcement, never before: overtaken, the
// goodbye would leave the deleted node in every cache for its TTL.
func TestGoodbyeIsNotOvertaken(t *testing.T) {
	b := newMDNSState(newTable(10), discardLog, 0)
	now := time.Unix(1000, 0)
	b.now = func() time.Time { return now }
	b.ifaces = []*mdnsIface{{name: "test"}}
	var mu sync.Mutex
	var ttls []uint32 // of every PTR record written, in order
	held, release := make(chan struct{}), make(chan struct{})
	var holding atomic.Bool
	b.write = func(_ *mdnsIface, p []byte, _ netip.AddrPort) error {
		if holding.CompareAndSwap(true, false) {
			close(held)
			<-release
		}
		pkt, err := parsePacket(p)
		if err != nil {
			t.Errorf("wrote a packet that does not parse: %v", err)
		}
		mu.Lock()
		defer mu.Unlock()
		for _, rr := range pkt.records {
			if rr.typ == dnsmessage.TypePTR {
				ttls = append(ttls, rr.ttl)
			}
		}
		return nil
	}
	svc := Service{Name: "svc", Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 80, Metadata: map[string]string{}}}}
	b.register(svc, 30*time.Second) // the first announcement
	holding.Store(true)
	ticked := make(chan struct{})
	go func() { b.tick(now.Add(time.Second)); close(ticked) }() // the second, held mid-send
	<-held
	deleted := make(chan struct{})
	go func() { b.deregister(svc); close(deleted) }()
	select {
	case <-deleted: // without the order kept, the goodbye went out meanwhile
	case <-time.After(100 * time.Millisecond): // else it waits for the held send
	}
	close(release)
	<-deleted
	<-ticked
	mu.Lock()
	defer mu.Unlock()
	if len(ttls) != 3 || ttls[2] != 0 {
		t.Errorf("PTR TTLs written, in order: %v; want two announcements, then the goodbye (0)", ttls)
	}
}

// TestPeersCannotCrowdOutOwnNodes: nodes heard from other hosts and the
// nodes this sidecar registers are bounded apart, each by
// --registry_max_nodes, so that a flood of announcements on the link
// cannot get the app's or the broker's own registrations refused.
func TestPeersCannotCrowdOutOwnNodes(t *testing.T) {
	tb := newTable(2)
	b := newMDNSState(tb, discardLog, 5353)
	peer := func(id string, ttl uint32) {
		a, _ := announcementOf(testRecord("flood", id, "127.0.0.2", 80), id)
		data, _ := announcePacket(a, ttl)
		b.handlePacket(data, netip.MustParseAddrPort("127.0.0.2:5353"))
	}
	for i := range 3 {
		peer(fmt.Sprint("f", i), 120)
	}
	if s, _ := tb.lookup("flood", time.Now()); len(s) != 1 || len(s[0].Nodes) != 2 || b.stats.cacheFull.Load() == 0 {
		t.Fatalf("peers' nodes: %+v, %d dropped; want 2 kept and the third dropped", s, b.stats.cacheFull.Load())
	}
	own := func(id string) Service {
		return Service{Name: "own", Nodes: []Node{{ID: id, Address: "127.0.0.1", Port: 9090}}}
	}
	for _, id := range []string{"o1", "o2"} {
		if err := b.register(own(id), time.Minute); err != nil {
			t.Fatalf("registering %s with the table full of peers' nodes: %v; want it taken", id, err)
		}
	}
	if err := b.register(own("o1"), time.Minute); err != nil {
		t.Errorf("refreshing o1 at the bound: %v", err)
	}
	if err := b.register(own("o3"), time.Minute); !errors.Is(err, errTableFull) || !strings.Contains(err.Error(), "--registry_max_nodes") {
		t.Errorf("a third node of this sidecar's with a bound of 2: %v; want errTableFull naming the flag", err)
	}
	b.deregister(own("o2"))
	if err := b.register(own("o3"), time.Minute); err != nil {
		t.Errorf("o3 after o2 left: %v; want it taken", err)
	}
	// Nor do this sidecar's nodes crowd out its peers': one leaves, and
	// another takes its place in the cache and the table.
	peer("f0", 0)
	peer("f5", 120)
	if s, _ := tb.lookup("flood", time.Now()); len(s) != 1 || len(s[0].Nodes) != 2 || !hasNode(&s[0], "f5") {
		t.Errorf("peers' nodes after f0's goodbye and f5's announcement: %+v; want f1 and f5", s)
	}
}

// TestHeardTTL: a TTL heard is capped at a day, and one with its top bit
// set is 0, as RFC 2181 section 8 has it read (not the cap).
func TestHeardTTL(t *testing.T) {
	for in, want := range map[uint32]uint32{0: 0, 120: 120, 100000: mdnsMaxTTL, 1 << 31: 0, 0xffffffff: 0} {
		if got := heardTTL(in); got != want {
			t.Errorf("heardTTL(%d) = %d; want %d", in, got, want)
		}
	}
}

// TestTXTCaseClashNamesTheClientsKeys: the refusal of keys differing in
// case alone names them as the client sent them, not as TXT carries them.
func TestTXTCaseClashNamesTheClientsKeys(t *testing.T) {
	r := testRecord("s", "n", "127.0.0.1", 1)
	r.Metadata = map[string]string{"Zone": "a", "zone": "b"}
	_, err := txtOf(r)
	if err == nil || !strings.Contains(err.Error(), `service metadata key "Zone" and service metadata key "zone" differ only in case`) {
		t.Errorf("got %v; want the service metadata keys named", err)
	}
}

// TestGoodbyeDeletesAnEntryPostedWithTTL: a goodbye from elsewhere for a
// node this sidecar announces but does not keep alive (posted with ?ttl=)
// is a DELETE through another sidecar: it is final here too, as with the
// file registry, where it was announced again for the rest of its TTL. A
// kept node is defended.
func TestGoodbyeDeletesAnEntryPostedWithTTL(t *testing.T) {
	tb := newTable(100)
	b := newMDNSState(tb, discardLog, 0)
	kept := recordsOf(Service{Name: "app", Nodes: []Node{{ID: "a1"}}}, time.Time{})[0].key()
	b.setKeeps(func(key string) bool { return key == kept }, nil)
	for _, s := range []Service{
		{Name: "app", Nodes: []Node{{ID: "a1", Address: "127.0.0.1", Port: 80}}},
		{Name: "posted", Nodes: []Node{{ID: "p1", Address: "127.0.0.1", Port: 81}}},
	} {
		if err := b.register(s, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"app", "posted"} {
		b.mu.Lock()
		var ann mdnsAnnouncement
		for _, l := range b.locals {
			if l.rec.Service == name {
				ann = l.ann
			}
		}
		b.mu.Unlock()
		bye, _ := announcePacket(ann, 0)
		b.handlePacket(bye, netip.MustParseAddrPort("127.0.0.2:5353"))
	}
	if lookupOK(tb, "app") != 1 || b.stats.goodbyesSeen.Load() != 1 {
		t.Errorf("the kept node: %d nodes, %d defended; want it kept and defended", lookupOK(tb, "app"), b.stats.goodbyesSeen.Load())
	}
	b.mu.Lock()
	n := len(b.locals)
	b.mu.Unlock()
	if lookupOK(tb, "posted") != 0 || n != 1 {
		t.Errorf("the node posted with ?ttl=: %d nodes, %d announced; want it gone", lookupOK(tb, "posted"), n)
	}
}
