package main

import (
	"net/netip"
	"strings"
	"time"

	"golang.org/x/net/dns/dnsmessage"
)

// mdnsPendingLife is how long an instance that was heard of (a PTR, or an
// SRV without its address) may wait to become a whole node before it is
// forgotten, so that a flood of half-announced instances does not hold the
// cache.
const mdnsPendingLife = 10 * time.Second

// mdnsCache is the passive cache of every _micro._tcp answer heard (RFC
// 6762 section 10), reduced to what a node needs: per instance its SRV and
// TXT, per SRV target its addresses. It is pure: apply and expire return
// the changes for the table and never touch the network.
//
// Bounds: at most max instances of peers (what the table may hold of them)
// and as many host names, each with at most mdnsMaxAddrs addresses; a
// record that would go past them is dropped and counted. This sidecar hears
// its own announcements too: those instances (ownInstance) are cached but
// not counted, so that its own nodes leave peers' the whole bound, as the
// table has it.
type mdnsCache struct {
	max         int
	own         int                        // instances ownInstance said were ours when they were cached
	ownInstance func(name string) bool     // nil: none are
	instances   map[string]*cachedInstance // by lower-cased instance name
	hosts       map[string]*cachedHost     // by lower-cased host name
	targets     map[string]int             // host name -> instances whose SRV points at it
	keyRefs     map[string]int             // record key -> instances that installed it
}

type cachedInstance struct {
	name      string
	firstSeen time.Time

	ptrExp    time.Time // zero: no live PTR
	srvTarget string
	srvPort   uint16
	srvExp    time.Time // zero: no live SRV
	txt       []string
	txtExp    time.Time // zero: no live TXT

	own       bool      // counted in mdnsCache.own, not against max
	installed *record   // what this instance put in the table; nil: nothing
	heard     time.Time // when installed was last extended
	queries   int       // queries sent for it since heard (RFC 6762 section 5.2)
	lastQuery time.Time
}

type cachedHost struct {
	addrs map[netip.Addr]hostAddr
}

type hostAddr struct{ heard, exp time.Time }

func newMDNSCache(max int) *mdnsCache {
	if max <= 0 {
		max = 10000
	}
	return &mdnsCache{max: max, instances: map[string]*cachedInstance{}, hosts: map[string]*cachedHost{}, targets: map[string]int{}, keyRefs: map[string]int{}}
}

// cacheChanges is what the table must do after a packet or a tick.
type cacheChanges struct {
	upsert []record
	remove []record // by key
}

// cacheStats counts what apply refused.
type cacheStats struct {
	rejected int // instances whose records do not make a valid node
	full     int // records dropped because the cache is at its bound
}

func ttlExpiry(now time.Time, ttl uint32) time.Time {
	return now.Add(time.Duration(ttl) * time.Second)
}

// apply learns from one response. Records with TTL 0 are goodbyes and
// remove what they name at once (RFC 6762 section 10.1 asks for a second's
// grace, for another responder to correct a mistaken goodbye; our instance
// names have a single owner, and a node must vanish as soon as its sidecar
// says so). A cache-flush address replaces the host's addresses heard more
// than a second ago (section 10.2). Keys for which local reports true are
// this sidecar's own registrations: the table keeps ours, whatever is heard.
func (c *mdnsCache) apply(pkt mdnsPacket, now time.Time, local func(string) bool) (cacheChanges, cacheStats) {
	var st cacheStats
	touched := map[*cachedInstance]bool{}
	for _, rr := range pkt.records {
		var name string
		switch {
		case rr.typ == dnsmessage.TypePTR && rr.name == mdnsServiceType && instanceOf(rr.target):
			name = rr.target
		case (rr.typ == dnsmessage.TypeSRV || rr.typ == dnsmessage.TypeTXT) && instanceOf(rr.name):
			name = rr.name
		default:
			continue
		}
		inst := c.instances[name]
		if inst == nil {
			if rr.ttl == 0 {
				continue
			}
			own := c.ownInstance != nil && c.ownInstance(name)
			if !own && len(c.instances)-c.own >= c.max {
				st.full++
				continue
			}
			inst = &cachedInstance{name: name, firstSeen: now, own: own}
			c.instances[name] = inst
			if own {
				c.own++
			}
		}
		touched[inst] = true
		exp := ttlExpiry(now, rr.ttl)
		switch rr.typ {
		case dnsmessage.TypePTR:
			if rr.ttl == 0 { // the instance is gone: forget all of it
				inst.ptrExp, inst.txtExp, inst.txt = time.Time{}, time.Time{}, nil
				c.setSRV(inst, "", 0, time.Time{})
				continue
			}
			inst.ptrExp = exp
		case dnsmessage.TypeSRV:
			if rr.ttl == 0 {
				c.setSRV(inst, "", 0, time.Time{})
				continue
			}
			c.setSRV(inst, rr.target, rr.port, exp)
		case dnsmessage.TypeTXT:
			if rr.ttl == 0 {
				inst.txt, inst.txtExp = nil, time.Time{}
				continue
			}
			inst.txt, inst.txtExp = rr.txt, exp
		}
	}
	touchedHosts := map[string]bool{}
	for _, rr := range pkt.records {
		if (rr.typ != dnsmessage.TypeA && rr.typ != dnsmessage.TypeAAAA) || c.targets[rr.name] == 0 {
			continue
		}
		h := c.hosts[rr.name]
		if h == nil {
			if rr.ttl == 0 {
				continue
			}
			h = &cachedHost{addrs: map[netip.Addr]hostAddr{}}
			c.hosts[rr.name] = h
		}
		touchedHosts[rr.name] = true
		if rr.ttl == 0 {
			delete(h.addrs, rr.addr)
			continue
		}
		if rr.flush {
			for a, ha := range h.addrs {
				if now.Sub(ha.heard) > time.Second {
					delete(h.addrs, a)
				}
			}
		}
		if _, ok := h.addrs[rr.addr]; !ok && len(h.addrs) >= mdnsMaxAddrs {
			st.full++
			continue
		}
		h.addrs[rr.addr] = hostAddr{heard: now, exp: ttlExpiry(now, rr.ttl)}
	}
	if len(touchedHosts) > 0 {
		for _, inst := range c.instances {
			if touchedHosts[inst.srvTarget] {
				touched[inst] = true
			}
		}
	}
	var ch cacheChanges
	for inst := range touched {
		if !c.resolve(inst, now, local, &ch) {
			st.rejected++
		}
	}
	return ch, st
}

// setSRV changes an instance's SRV, keeping the count of instances per
// target that decides which addresses are worth keeping.
func (c *mdnsCache) setSRV(inst *cachedInstance, target string, port uint16, exp time.Time) {
	if target == inst.srvTarget {
		// A refresh: the target's addresses stay, with their own TTLs.
		inst.srvPort, inst.srvExp = port, exp
		return
	}
	if inst.srvTarget != "" {
		if c.targets[inst.srvTarget]--; c.targets[inst.srvTarget] <= 0 {
			delete(c.targets, inst.srvTarget)
			delete(c.hosts, inst.srvTarget)
		}
	}
	inst.srvTarget, inst.srvPort, inst.srvExp = target, port, exp
	if target != "" {
		c.targets[target]++
	}
}

// node builds the record an instance describes, with the expiry of the
// first of its parts to run out; ok is false while a part is missing, and
// valid is false when the parts do not make a valid node.
func (c *mdnsCache) node(inst *cachedInstance, now time.Time) (rec record, ok, valid bool) {
	if !now.Before(inst.srvExp) || !now.Before(inst.txtExp) {
		return record{}, false, true
	}
	txt, mine := parseTXT(inst.txt)
	if !mine {
		return record{}, false, false
	}
	exp := inst.srvExp
	if inst.txtExp.Before(exp) {
		exp = inst.txtExp
	}
	var address string
	if strings.HasSuffix(inst.srvTarget, ".local.") {
		best, bestExp, bestHeard := netip.Addr{}, time.Time{}, time.Time{}
		if h := c.hosts[inst.srvTarget]; h != nil {
			for a, ha := range h.addrs {
				if !now.Before(ha.exp) {
					continue
				}
				// Prefer IPv4, then the address heard last (a node that
				// restarted on another address keeps the old one for a
				// second, RFC 6762 section 10.2), then the lowest: stable
				// answers.
				if !best.IsValid() || (a.Is4() && !best.Is4()) ||
					(a.Is4() == best.Is4() && (ha.heard.After(bestHeard) || ha.heard.Equal(bestHeard) && a.Less(best))) {
					best, bestExp, bestHeard = a, ha.exp, ha.heard
				}
			}
		}
		switch {
		case best.IsValid():
			address = best.String()
			if bestExp.Before(exp) {
				exp = bestExp
			}
		case inst.srvTarget == ownHost(inst.name):
			return record{}, false, true // a sidecar's own host: its address is on the way
		default:
			// A node whose address is itself a name under .local (a Mac's
			// host name, an Active Directory domain): nobody announces an
			// address for it, and the name is the address.
			address = strings.TrimSuffix(inst.srvTarget, ".")
		}
	} else {
		address = strings.TrimSuffix(inst.srvTarget, ".")
	}
	s := Service{Name: txt.name, Version: txt.version, Metadata: txt.svcMeta,
		Nodes: []Node{{ID: txt.id, Address: address, Port: int(inst.srvPort), Metadata: txt.nodeMeta}}}
	if err := normalizeService(&s); err != nil {
		return record{}, false, false
	}
	return recordsOf(s, exp)[0], true, true
}

// ownHost is the host a sidecar names for an instance whose node has an IP
// address: <label>.local., the instance's label (see announcementOf).
func ownHost(instance string) string {
	return strings.TrimSuffix(instance, "."+mdnsServiceType) + ".local."
}

// resolve installs, refreshes or withdraws the record of one instance, and
// forgets the instance once nothing of it is left. It reports false when
// the instance's records do not make a valid node.
func (c *mdnsCache) resolve(inst *cachedInstance, now time.Time, local func(string) bool, ch *cacheChanges) bool {
	rec, ok, valid := c.node(inst, now)
	if inst.installed != nil && (!ok || inst.installed.key() != rec.key()) {
		c.withdraw(inst, local, ch)
		if !ok {
			// A part ran out or was withdrawn while the others live: ask
			// for it again (RFC 6762 section 5.2), and give the instance
			// mdnsPendingLife from now to become whole again.
			inst.firstSeen, inst.queries, inst.lastQuery = now, 0, time.Time{}
		}
	}
	if ok {
		if inst.installed == nil {
			c.keyRefs[rec.key()]++
		}
		if inst.installed == nil || rec.Expires.After(inst.installed.Expires) {
			inst.heard, inst.queries = now, 0
		}
		inst.installed = &rec
		if !local(rec.key()) {
			ch.upsert = append(ch.upsert, rec)
		}
	}
	if !now.Before(inst.ptrExp) && !now.Before(inst.srvExp) && !now.Before(inst.txtExp) {
		c.forget(inst, local, ch)
	}
	return valid
}

func (c *mdnsCache) withdraw(inst *cachedInstance, local func(string) bool, ch *cacheChanges) {
	gone := *inst.installed
	k := gone.key()
	inst.installed = nil
	if c.keyRefs[k]--; c.keyRefs[k] <= 0 {
		delete(c.keyRefs, k)
		if !local(k) {
			ch.remove = append(ch.remove, gone)
		}
	}
}

func (c *mdnsCache) forget(inst *cachedInstance, local func(string) bool, ch *cacheChanges) {
	if inst.installed != nil {
		c.withdraw(inst, local, ch)
	}
	c.setSRV(inst, "", 0, time.Time{})
	delete(c.instances, inst.name)
	if inst.own {
		c.own--
	}
}

// expire drops what ran out at now, and instances that never became whole
// nodes within mdnsPendingLife.
func (c *mdnsCache) expire(now time.Time, local func(string) bool) cacheChanges {
	var ch cacheChanges
	for name, h := range c.hosts {
		for a, ha := range h.addrs {
			if !now.Before(ha.exp) {
				delete(h.addrs, a)
			}
		}
		if len(h.addrs) == 0 && c.targets[name] == 0 {
			delete(c.hosts, name)
		}
	}
	for _, inst := range c.instances {
		if inst.installed == nil && now.Sub(inst.firstSeen) >= mdnsPendingLife {
			c.forget(inst, local, &ch)
			continue
		}
		if inst.installed != nil && now.Before(inst.installed.Expires) {
			continue // whole and alive: nothing to do
		}
		c.resolve(inst, now, local, &ch)
	}
	return ch
}

// due returns the questions to ask now to keep the cache (RFC 6762 section
// 5.2): for a node from elsewhere, at 80% and 90% of its lifetime; for an
// instance still missing a part, at once and then every second, three times
// at most. At most limit questions; the rest wait for the next tick.
func (c *mdnsCache) due(now time.Time, local func(string) bool, limit int) []dnsmessage.Question {
	var qs []dnsmessage.Question
	ask := func(inst *cachedInstance) {
		qs = append(qs, question(inst.name, dnsmessage.TypeSRV), question(inst.name, dnsmessage.TypeTXT))
		if strings.HasSuffix(inst.srvTarget, ".local.") {
			qs = append(qs, question(inst.srvTarget, dnsmessage.TypeA))
		}
		inst.queries++
		inst.lastQuery = now
	}
	for _, inst := range c.instances {
		if len(qs) >= limit {
			break
		}
		if inst.installed == nil {
			if inst.queries < 3 && now.Sub(inst.lastQuery) >= time.Second {
				ask(inst)
			}
			continue
		}
		if local(inst.installed.key()) {
			continue
		}
		life := inst.installed.Expires.Sub(inst.heard)
		if (inst.queries == 0 && now.Sub(inst.heard) >= life*8/10) || (inst.queries == 1 && now.Sub(inst.heard) >= life*9/10) {
			ask(inst)
		}
	}
	return qs
}
