package main

import (
	"fmt"
	"slices"
	"testing"
	"time"
	"unsafe"
)

func TestEjectFor(t *testing.T) {
	base, max := time.Second, 30*time.Second
	for _, tc := range []struct {
		failures int
		want     time.Duration
	}{
		{0, 0},
		{1, time.Second},
		{2, 2 * time.Second},
		{3, 4 * time.Second},
		{5, 16 * time.Second},
		{6, 30 * time.Second},
		{100, 30 * time.Second},
	} {
		if got := ejectFor(tc.failures, base, max); got != tc.want {
			t.Errorf("ejectFor(%d, %v, %v) = %v; want %v", tc.failures, base, max, got, tc.want)
		}
	}
}

func nodesAt(ports ...int) []Node {
	var ns []Node
	for _, p := range ports {
		ns = append(ns, Node{ID: fmt.Sprint("n", p), Address: "127.0.0.1", Port: p})
	}
	return ns
}

func TestChoose(t *testing.T) {
	now := time.Unix(1000, 0)
	nodes := nodesAt(1, 2, 3)
	k := func(p int) nodeKey { return nodeKey{"127.0.0.1", p} }
	ejected := func(ps ...int) map[nodeKey]nodeState {
		m := map[nodeKey]nodeState{}
		for _, p := range ps {
			m[k(p)] = nodeState{failures: 1, until: now.Add(time.Second)}
		}
		return m
	}
	for _, tc := range []struct {
		name   string
		nodes  []Node
		states map[nodeKey]nodeState
		tried  []nodeKey
		start  uint64
		want   int
	}{
		{"no nodes", nil, nil, nil, 0, -1},
		{"first", nodes, nil, nil, 0, 0},
		{"cursor wraps", nodes, nil, nil, 4, 1},
		{"ejected skipped", nodes, ejected(2), nil, 1, 2},
		{"ejected at end wraps", nodes, ejected(3), nil, 2, 0},
		{"tried skipped", nodes, nil, []nodeKey{k(1), k(2)}, 0, 2},
		{"all ejected", nodes, ejected(1, 2, 3), nil, 0, -1},
		{"all tried or ejected", nodes, ejected(1), []nodeKey{k(2), k(3)}, 0, -1},
		{"ejection over", nodes, map[nodeKey]nodeState{k(1): {failures: 3, until: now}}, nil, 0, 0},
		{"other address not confused", nodes, map[nodeKey]nodeState{{"127.0.0.2", 1}: {until: now.Add(time.Hour)}}, nil, 0, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := choose(tc.nodes, tc.states, tc.tried, now, tc.start); got != tc.want {
				t.Errorf("choose(%d nodes, states %v, tried %v, start %d) = %d; want %d", len(tc.nodes), tc.states, tc.tried, tc.start, got, tc.want)
			}
		})
	}
}

func TestSelectorRoundRobinEjectionAndRecovery(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newSelector(selectorConfig{}, func() time.Time { return now })
	nodes := nodesAt(1, 2, 3)
	var got []int
	for range 6 {
		n, _ := s.next("svc", nodes, nil)
		got = append(got, n.Port)
	}
	if fmt.Sprint(got) != "[1 2 3 1 2 3]" {
		t.Errorf("round robin: got %v; want [1 2 3 1 2 3]", got)
	}

	if d := s.failed(nodes[1]); d != time.Second {
		t.Errorf("first ejection: %v; want 1s", d)
	}
	got = got[:0]
	for range 4 {
		n, _ := s.next("svc", nodes, nil)
		got = append(got, n.Port)
	}
	for _, p := range got {
		if p == 2 {
			t.Fatalf("ejected node chosen: %v", got)
		}
	}
	now = now.Add(time.Second) // the ejection ends; the node is tried again
	if d := s.failed(nodes[1]); d != 2*time.Second {
		t.Errorf("second consecutive ejection: %v; want 2s", d)
	}
	now = now.Add(2 * time.Second)
	s.succeeded(nodes[1])
	if d := s.failed(nodes[1]); d != time.Second {
		t.Errorf("ejection after a success: %v; want the backoff to start over at 1s", d)
	}
	s.succeeded(nodes[1])
	if s.tracked.Load() != 0 {
		t.Errorf("tracked %d nodes after all recovered; want 0", s.tracked.Load())
	}

	for _, n := range nodes {
		s.failed(n)
	}
	if n, ok := s.next("svc", nodes, nil); ok {
		t.Errorf("all ejected: got %v; want none", n)
	}
}

// TestSelectorProbesAnAllEjectedService: a service whose every node is
// ejected has one call a second sent to the node whose ejection ends
// first, so that a node back from a long failure is found within a
// second, not after what is left of its backoff (up to 30 s); a failed
// probe does not lengthen the backoff, and a node with usable others is
// never probed.
func TestSelectorProbesAnAllEjectedService(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newSelector(selectorConfig{}, func() time.Time { return now })
	one := nodesAt(1)
	var d time.Duration
	for range 5 { // down a while: ejected for 1, 2, 4, 8, then 16 s
		d = s.failed(one[0])
		now = now.Add(d)
	}
	now = now.Add(-d) // just ejected for 16 s
	if d != 16*time.Second {
		t.Fatalf("fifth ejection: %v; want 16s", d)
	}
	if n, ok := s.next("svc", one, nil); ok {
		t.Errorf("at once after the ejection: got %v; want none", n)
	}
	now = now.Add(time.Second)
	if n, ok := s.next("svc", one, nil); !ok || n.Port != 1 {
		t.Fatalf("a second after the ejection: %v %v; want the node as a probe", n, ok)
	}
	if n, ok := s.next("svc", one, nil); ok {
		t.Errorf("a second call in the same second: got %v; want none (one probe a second)", n)
	}
	if d := s.failed(one[0]); d != 0 {
		t.Errorf("a failed probe ejected the node again for %v; want its backoff as it was", d)
	}
	if _, ok := s.next("svc", one, []nodeKey{keyOf(one[0])}); ok {
		t.Error("a retry after a failed probe chose the node again")
	}
	now = now.Add(time.Second)
	if n, ok := s.next("svc", one, nil); !ok {
		t.Fatalf("two seconds after the ejection: %v %v; want the next probe", n, ok)
	}
	s.succeeded(one[0])
	for range 3 {
		if _, ok := s.next("svc", one, nil); !ok {
			t.Fatal("after a probe succeeded: no node; want the node back")
		}
	}

	// Two nodes out for 16 s: the probes take turns, so that the one
	// that comes back is found, whichever it is.
	s = newSelector(selectorConfig{}, func() time.Time { return now })
	pair := nodesAt(1, 2)
	for range 5 {
		s.failed(pair[0])
		now = now.Add(s.failed(pair[1]))
	}
	now = now.Add(-16 * time.Second)
	var probed []int
	for range 4 {
		now = now.Add(time.Second)
		n, ok := s.next("pair", pair, nil)
		if !ok {
			t.Fatalf("two nodes out: no probe at %v", now)
		}
		probed = append(probed, n.Port)
		s.failed(n)
	}
	if !slices.Equal(probed, []int{1, 2, 1, 2}) {
		t.Errorf("two nodes out: probed %v; want them in turn", probed)
	}
	now = now.Add(time.Second)
	n, _ := s.next("pair", pair, nil)
	if n.Port != 1 {
		t.Fatalf("probe %v; want node 1's turn", n)
	}
	now = now.Add(time.Second)
	if n, ok := s.next("pair", pair, nil); ok {
		t.Errorf("a second probe while the first is out: %v", n)
	}
	// It ended on the caller's own deadline (settled): the next probe a
	// second later, not after EjectMax.
	s.settled(n)
	now = now.Add(time.Second)
	if n, ok := s.next("pair", pair, nil); !ok || n.Port != 2 {
		t.Errorf("a second after a probe settled: %v %v; want node 2 probed", n, ok)
	}

	// One address under two services: a probe out for one is not taken
	// over by the other, which probes once it is over.
	s = newSelector(selectorConfig{}, func() time.Time { return now })
	shared := nodesAt(7)
	for range 4 { // out for 8 s
		now = now.Add(s.failed(shared[0]))
	}
	now = now.Add(-7 * time.Second)
	if _, ok := s.next("x", shared, nil); !ok {
		t.Fatal("service x: no probe")
	}
	if n, ok := s.next("y", shared, nil); ok {
		t.Errorf("service y took x's probe out: %v", n)
	}
	s.failed(shared[0])
	now = now.Add(time.Second)
	if _, ok := s.next("y", shared, nil); !ok {
		t.Error("service y: no probe once x's failed")
	}

	two := nodesAt(1, 2)
	s = newSelector(selectorConfig{}, func() time.Time { return now })
	for range 5 {
		now = now.Add(s.failed(two[1]))
	}
	if d := s.failed(two[1]); d != 30*time.Second {
		t.Fatalf("sixth ejection: %v; want 30s", d)
	}
	for range 20 { // within its 30 s
		now = now.Add(time.Second)
		if n, _ := s.next("svc", two, nil); n.Port == 2 {
			t.Fatal("an ejected node with a usable other was chosen as a probe")
		}
	}
}

// TestSelectorKeepsNoRequestString: the service names the selector keeps
// are its own copies, not the strings of requests (pieces of a request
// head's memory, which they would keep), also after later calls.
func TestSelectorKeepsNoRequestString(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newSelector(selectorConfig{}, func() time.Time { return now })
	one := nodesAt(1)
	var given []string
	for range 3 {
		name := string([]byte("svc")) // a fresh string each call, as a request's
		given = append(given, name)
		s.next(name, one, nil)
		s.failed(one[0])
		now = now.Add(time.Minute)
	}
	kept := func(key string) bool {
		for _, g := range given {
			if unsafe.StringData(g) == unsafe.StringData(key) {
				return true
			}
		}
		return false
	}
	for key := range s.cursors {
		if kept(key) {
			t.Error("a cursor's key is a request's string")
		}
	}
	for key, g := range s.probes {
		if kept(key) || kept(g.service) {
			t.Error("a probe gate's key is a request's string")
		}
	}
}

// TestSelectorSpreadsAnEjectedNodesShare: with a node out, its calls are
// spread over the others, not handed to its neighbour; failures of calls
// that were in flight when it went out do not lengthen its backoff.
func TestSelectorSpreadsAnEjectedNodesShare(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, strategy := range []string{strategyRoundRobin, strategyRandom} {
		s := newSelector(selectorConfig{Strategy: strategy}, func() time.Time { return now })
		nodes := nodesAt(1, 2, 3)
		if d := s.failed(nodes[1]); d != time.Second {
			t.Fatalf("first ejection: %v", d)
		}
		for range 7 { // the other calls that were in flight to it
			if d := s.failed(nodes[1]); d != 0 {
				t.Errorf("%s: a failure while out ejected it again for %v; want nothing", strategy, d)
			}
		}
		counts := map[int]int{}
		for range 3000 {
			n, _ := s.next("svc", nodes, nil)
			counts[n.Port]++
		}
		if counts[2] != 0 || counts[1] < 1300 || counts[3] < 1300 {
			t.Errorf("%s with node 2 out: %v; want the calls spread evenly over 1 and 3", strategy, counts)
		}
		now = now.Add(time.Second)
		if d := s.failed(nodes[1]); d != 2*time.Second {
			t.Errorf("%s: the next incident: %v; want 2s, one doubling", strategy, d)
		}
	}
}

func TestSelectorRandomSpreads(t *testing.T) {
	s := newSelector(selectorConfig{Strategy: strategyRandom}, nil)
	nodes := nodesAt(1, 2, 3)
	seen := map[int]int{}
	for range 300 {
		n, ok := s.next("svc", nodes, nil)
		if !ok {
			t.Fatal("no node")
		}
		seen[n.Port]++
	}
	for _, n := range nodes {
		if seen[n.Port] < 50 {
			t.Errorf("random: node %d chosen %d times of 300; want about 100 (%v)", n.Port, seen[n.Port], seen)
		}
	}
}

func TestSelectorBounds(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newSelector(selectorConfig{MaxTracked: 2}, func() time.Time { return now })
	nodes := nodesAt(1, 2, 3)
	for _, n := range nodes {
		s.failed(n)
	}
	if len(s.states) != 2 {
		t.Errorf("tracked %d failing nodes; want the bound 2", len(s.states))
	}
	now = now.Add(time.Hour) // old ejections may now be forgotten
	s.failed(nodes[2])
	if _, ok := s.states[keyOf(nodes[2])]; !ok || len(s.states) > 2 {
		t.Errorf("after old ejections expired: states %v; want node 3 tracked within the bound", s.states)
	}
	for i := range 5 {
		s.next(fmt.Sprint("svc", i), nodes, nil)
	}
	if len(s.cursors) > 2 {
		t.Errorf("%d round-robin cursors; want at most 2", len(s.cursors))
	}
}

func BenchmarkSelectorNext(b *testing.B) {
	s := newSelector(selectorConfig{}, nil)
	nodes := nodesAt(1, 2, 3)
	b.ReportAllocs()
	for b.Loop() {
		n, _ := s.next("go.micro.srv.example", nodes, nil)
		s.succeeded(n)
	}
}

func BenchmarkSelectorNextWithEjected(b *testing.B) {
	s := newSelector(selectorConfig{}, nil)
	nodes := nodesAt(1, 2, 3)
	s.failed(nodes[0])
	b.ReportAllocs()
	for b.Loop() {
		n, _ := s.next("go.micro.srv.example", nodes, nil)
		s.succeeded(n)
	}
}

// TestSelectorForgetsNodesGoneLongAgo: a node that failed and was never
// called again (deregistered) is forgotten once its ejection ended over
// EjectMax ago, and the lock-free path comes back.
func TestSelectorForgetsNodesGoneLongAgo(t *testing.T) {
	now := time.Unix(1000, 0)
	s := newSelector(selectorConfig{}, func() time.Time { return now })
	gone, live := nodesAt(1), nodesAt(2)
	s.failed(gone[0])
	if s.tracked.Load() != 1 {
		t.Fatal("the failed node is not tracked")
	}
	now = now.Add(20 * time.Second) // its 1s ejection ended, not long ago
	s.next("live", live, nil)
	if s.tracked.Load() != 1 {
		t.Error("forgotten too soon")
	}
	now = now.Add(40 * time.Second) // over EjectMax (30s) after its ejection ended
	s.next("live", live, nil)
	if n := s.tracked.Load(); n != 0 {
		t.Errorf("%d nodes tracked; want the gone one forgotten", n)
	}
}
