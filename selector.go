package main

import (
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Node selection, shared by RPC and the proxy. The decisions (which node
// next, how long an ejection lasts) are pure functions over values; the
// selector only keeps the state they read under one lock.

// Selection strategies (--selector).
const (
	strategyRoundRobin = "roundrobin"
	strategyRandom     = "random"
)

// selectorConfig tunes a selector. Zero values take the documented defaults.
type selectorConfig struct {
	Strategy   string        // roundrobin (default) or random
	EjectBase  time.Duration // first ejection of a failing node; default 1s
	EjectMax   time.Duration // longest ejection; default 30s
	MaxTracked int           // failing nodes and round-robin cursors remembered; default 4096
}

func (c selectorConfig) withDefaults() selectorConfig {
	if c.Strategy == "" {
		c.Strategy = strategyRoundRobin
	}
	if c.EjectBase <= 0 {
		c.EjectBase = time.Second
	}
	if c.EjectMax < c.EjectBase {
		c.EjectMax = max(30*time.Second, c.EjectBase)
	}
	if c.MaxTracked <= 0 {
		c.MaxTracked = 4096
	}
	return c
}

// nodeKey names a node by where it listens: a failure is a property of the
// address, whatever service or id it was registered under. A struct rather
// than "host:port" so that lookups allocate nothing.
type nodeKey struct {
	host string
	port int
}

func keyOf(n Node) nodeKey { return nodeKey{n.Address, n.Port} }

// nodeState is what the selector remembers of a node that failed.
type nodeState struct {
	failures int        // consecutive failures; reset by a success
	until    time.Time  // not chosen before this time, but as a probe
	probeAt  time.Time  // when it may next be probed (see probeLocked)
	probedAt time.Time  // when it was last picked as a probe
	probe    *probeGate // the gate of the service its probe is out for; nil: none
}

// probeGate is when a service whose every node is ejected may next have
// one probed (see probeLocked). service is the map's key, kept apart from
// any request's head.
type probeGate struct {
	service string
	at      time.Time
}

// ejectFor is how long a node stays out after its n-th consecutive failure:
// base, doubled for each further failure, capped at max.
func ejectFor(failures int, base, max time.Duration) time.Duration {
	if failures < 1 {
		return 0
	}
	d := base
	for i := 1; i < failures; i++ {
		if d >= max/2 {
			return max
		}
		d *= 2
	}
	return min(d, max)
}

// choose returns the index of the node to call, or -1 when none is usable:
// of the nodes neither ejected at now nor already tried in this call, the
// (start mod their number)-th. Round robin passes a cursor as start, random
// a random number. Counting the usable nodes first spreads an ejected
// node's calls over all the others; taking the next one after it would
// hand them all to its neighbour.
func choose(nodes []Node, states map[nodeKey]nodeState, tried []nodeKey, now time.Time, start uint64) int {
	if len(states) == 0 && len(tried) == 0 && len(nodes) > 0 { // the common case: nothing failed
		return int(start % uint64(len(nodes)))
	}
	usable := 0
	for _, n := range nodes {
		if nodeUsable(keyOf(n), states, tried, now) {
			usable++
		}
	}
	if usable == 0 {
		return -1
	}
	want := int(start % uint64(usable))
	for i, n := range nodes {
		if nodeUsable(keyOf(n), states, tried, now) {
			if want == 0 {
				return i
			}
			want--
		}
	}
	return -1
}

// nodeUsable reports whether the node k is neither tried in this call nor
// ejected at now.
func nodeUsable(k nodeKey, states map[nodeKey]nodeState, tried []nodeKey, now time.Time) bool {
	if slices.Contains(tried, k) {
		return false
	}
	st, ok := states[k]
	return !ok || !now.Before(st.until)
}

// selector picks nodes and remembers which failed.
type selector struct {
	cfg selectorConfig
	now func() time.Time

	// tracked mirrors len(states), so that the common case, where nothing
	// has failed, reports a success without taking the lock.
	tracked atomic.Int64

	ejections atomic.Uint64 // nodes ejected so far, for metrics

	mu     sync.Mutex            // guards states, cursors, probes, sweepAt
	states map[nodeKey]nodeState // failing nodes; at most cfg.MaxTracked
	// cursors is the round-robin position by service, and probes the
	// probe gate of services whose every node is ejected; at most
	// cfg.MaxTracked each. Their values are pointers so that an update
	// stores nothing under the key: an assignment would replace the key,
	// a clone, with the request's string, and keep its head's memory.
	cursors map[string]*uint64
	probes  map[string]*probeGate
	sweepAt time.Time // when next to forget the nodes whose ejection ended long ago
}

func newSelector(cfg selectorConfig, now func() time.Time) *selector {
	if now == nil {
		now = time.Now
	}
	return &selector{cfg: cfg.withDefaults(), now: now, states: map[nodeKey]nodeState{}, cursors: map[string]*uint64{}, probes: map[string]*probeGate{}}
}

// next picks a node of service among nodes, skipping those tried in this
// call and those ejected. ok is false when no node is usable.
func (s *selector) next(service string, nodes []Node, tried []nodeKey) (Node, bool) {
	var now time.Time // only ejected nodes need the time
	if s.tracked.Load() > 0 {
		now = s.now()
	}
	s.mu.Lock()
	var start uint64
	if s.cfg.Strategy == strategyRandom {
		start = rand.Uint64()
	} else {
		c := s.cursors[service]
		if c == nil {
			if len(s.cursors) >= s.cfg.MaxTracked {
				clear(s.cursors) // overflow: round robin restarts; nothing else is lost
			}
			c = new(uint64)
			s.cursors[strings.Clone(service)] = c // kept: not a piece of a request's head (see stringArena)
		}
		start = *c
		*c++
	}
	if !now.IsZero() && !now.Before(s.sweepAt) {
		s.forgetLocked(now)
		s.sweepAt = now.Add(s.cfg.EjectMax)
	}
	i := choose(nodes, s.states, tried, now, start)
	if i < 0 && len(tried) == 0 {
		i = s.probeLocked(service, nodes, now)
	}
	s.mu.Unlock()
	if i < 0 {
		return Node{}, false
	}
	return nodes[i], true
}

// probeLocked picks, when every node of service is ejected, one of them
// as a probe: a node that came back would otherwise stay out for what is
// left of a backoff grown while it was down (up to EjectMax, 30 s), with
// nothing else to call. One probe is out at a time for a service, the
// next a while (EjectBase) after it failed, and the nodes take turns,
// the least recently probed first (of those, the one whose ejection ends
// first), so that whichever came back is found. A node is not probed
// within EjectBase of its failure, nor while its probe for another
// service (at the same address) is out. A probe that succeeds ends the
// ejection (succeeded); one that fails within the ejection leaves it as
// it was (failed does not count a node out already), as does one that
// ends otherwise (settled: the caller's deadline, the caller leaving).
// -1 when no node is to be probed now.
func (s *selector) probeLocked(service string, nodes []Node, now time.Time) int {
	g := s.probes[service]
	if g != nil && now.Before(g.at) {
		return -1
	}
	best := -1
	var bestState nodeState
	for i, n := range nodes {
		st, ok := s.states[keyOf(n)]
		if !ok || now.Before(st.probeAt) || st.probe != nil {
			continue
		}
		if best < 0 || st.probedAt.Before(bestState.probedAt) || st.probedAt.Equal(bestState.probedAt) && st.until.Before(bestState.until) {
			best, bestState = i, st
		}
	}
	if best < 0 {
		return -1
	}
	if g == nil {
		if len(s.probes) >= s.cfg.MaxTracked {
			clear(s.probes) // overflow: probes may come sooner; nothing else is lost
		}
		g = &probeGate{service: strings.Clone(service)} // kept: not a piece of a request's head (see stringArena)
		s.probes[g.service] = g
	}
	g.at = now.Add(s.cfg.EjectMax) // until the probe ends; an end never told costs this
	bestState.probedAt, bestState.probe = now, g
	s.states[keyOf(nodes[best])] = bestState
	return best
}

// endProbeLocked ends the node's probe, if one is out, with the service's
// next a while later.
func (s *selector) endProbeLocked(k nodeKey, st nodeState, now time.Time) nodeState {
	if st.probe != nil {
		st.probe.at = now.Add(s.cfg.EjectBase)
		st.probe, st.probeAt = nil, now.Add(s.cfg.EjectBase)
		s.states[k] = st
	}
	return st
}

// settled says an attempt on the node ended neither in success nor in a
// failure of the node (the caller's deadline, the caller leaving, an
// answer the caller's request earned): a probe on it is over.
func (s *selector) settled(n Node) {
	if s.tracked.Load() == 0 {
		return
	}
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.states[keyOf(n)]; ok {
		s.endProbeLocked(keyOf(n), st, now)
	}
}

// succeeded ends any backoff of the node.
func (s *selector) succeeded(n Node) {
	if s.tracked.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if st, ok := s.states[keyOf(n)]; ok {
		if st.probe != nil {
			delete(s.probes, st.probe.service)
		}
		delete(s.states, keyOf(n))
		s.tracked.Store(int64(len(s.states)))
	}
}

// forgetLocked forgets the nodes whose ejection ended over EjectMax before
// now: a node that failed and was then deregistered has no success to
// forget it by, and while any node is remembered, selections read the
// clock and successes take the lock.
func (s *selector) forgetLocked(now time.Time) {
	for k, st := range s.states {
		if now.Sub(st.until) > s.cfg.EjectMax {
			delete(s.states, k)
		}
	}
	for service, g := range s.probes {
		if now.Sub(g.at) > s.cfg.EjectMax {
			delete(s.probes, service)
		}
	}
	s.tracked.Store(int64(len(s.states)))
}

// failed ejects the node for a backoff that grows with each consecutive
// failure, and returns it; 0 when the node was out already, or could not
// be tracked. When cfg.MaxTracked nodes are already remembered, those whose
// ejection ended long ago are forgotten; if none can be, the failure is not
// recorded (the node stays selectable: failing open beats growing without
// bound).
func (s *selector) failed(n Node) time.Duration {
	now := s.now()
	s.mu.Lock()
	defer s.mu.Unlock()
	k := keyOf(n)
	st, ok := s.states[k]
	if ok {
		st = s.endProbeLocked(k, st, now) // a failed probe
	}
	if ok && now.Before(st.until) {
		// Out already: a call that was in flight when another ejected the
		// node. Counted, a burst of such calls would stretch one incident's
		// backoff to the maximum.
		return 0
	}
	if !ok && len(s.states) >= s.cfg.MaxTracked {
		s.forgetLocked(now)
		if len(s.states) >= s.cfg.MaxTracked {
			return 0
		}
	}
	st.failures++
	s.ejections.Add(1)
	d := ejectFor(st.failures, s.cfg.EjectBase, s.cfg.EjectMax)
	st.until, st.probeAt = now.Add(d), now.Add(s.cfg.EjectBase)
	s.states[k] = st
	s.tracked.Store(int64(len(s.states)))
	return d
}
