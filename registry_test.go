package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestSplitAddress(t *testing.T) {
	for _, tc := range []struct {
		addr     string
		port     int
		wantHost string
		wantPort int
		wantErr  string
	}{
		{"127.0.0.1", 9090, "127.0.0.1", 9090, ""},
		{"127.0.0.1:9090", 0, "127.0.0.1", 9090, ""},
		{"127.0.0.1:9090", 9090, "127.0.0.1", 9090, ""},
		{"[::1]:80", 0, "::1", 80, ""},
		{"::1", 80, "::1", 80, ""},
		{"[::1]", 80, "::1", 80, ""},
		{"example.com", 443, "example.com", 443, ""},
		{"", 80, "", 0, "address is required"},
		{"h", 0, "", 0, "port 0 out of range"},
		{"h", 65536, "", 0, "out of range"},
		{"h:0", 0, "", 0, "port must be 1-65535"},
		{"h:x", 0, "", 0, "port must be 1-65535"},
		{"h:80", 81, "", 0, "disagrees with port 81"},
		{"a b", 80, "", 0, "not a host name"},
		{"0.0.0.0:9090", 0, "", 0, "where a server listens"},
		{"[::]:9090", 0, "", 0, "where a server listens"},
		{"224.0.0.251", 80, "", 0, "multicast"},
		{"255.255.255.255", 80, "", 0, "broadcast"},
		{"[::ffff:0.0.0.0]:9090", 0, "", 0, "where a server listens"}, // other spellings, dialed the same
		{"::%lo", 80, "", 0, "where a server listens"},
		{"::ffff:255.255.255.255", 80, "", 0, "broadcast"},
		{"::ffff:192.0.2.1", 80, "192.0.2.1", 80, ""}, // one spelling, as mDNS peers hear it
		{"[2001:DB8::7]:80", 0, "2001:db8::7", 80, ""},
		{"DB.Example.COM", 80, "db.example.com", 80, ""},
		{"h/x", 80, "", 0, "not a host name"},
		{"myapp_web_1", 80, "myapp_web_1", 80, ""}, // a Docker name
		{"johns-mbp.local.", 80, "johns-mbp.local.", 80, ""},
		{"fe80::1%eth0", 80, "fe80::1%eth0", 80, ""},
		{"999.1.1.1", 80, "", 0, "not a host name"},
		{"1234", 80, "", 0, "not a host name"},
		{"[foo]:80", 0, "", 0, "not a host name"},
		{"-bad-", 80, "", 0, "not a host name"},
		{"a..b", 80, "", 0, "not a host name"},
		{"%", 80, "", 0, "not a host name"},
		{"[1.2.3.4%eth0]:80", 0, "", 0, "not a host name"},
		{"a@b", 80, "", 0, "not a host name"},
	} {
		host, port, err := splitAddress(tc.addr, tc.port)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("splitAddress(%q, %d) error %v; want %q", tc.addr, tc.port, err, tc.wantErr)
			}
			continue
		}
		if err != nil || host != tc.wantHost || port != tc.wantPort {
			t.Errorf("splitAddress(%q, %d) = %q, %d, %v; want %q, %d", tc.addr, tc.port, host, port, err, tc.wantHost, tc.wantPort)
		}
	}
}

func TestParseTTL(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"", 0, false}, // ?ttl= names a ttl, and gives none
		{"30s", 30 * time.Second, true},
		{"86400", 24 * time.Hour, true},
		{"36028797018963998", 0, false}, // 30 + 2^55 seconds: wraps to 30 s when multiplied
		{"-36028797018963938", 0, false},
		{"45", 45 * time.Second, true},
		{"1m", time.Minute, true},
		{"500ms", 0, false},
		{"48h", 0, false},
		{"-5s", 0, false},
		{"soon", 0, false},
	} {
		got, err := parseTTL(url.Values{"ttl": {tc.in}})
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseTTL(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	if got, err := parseTTL(url.Values{}); got != 0 || err != nil {
		t.Errorf("no ttl parameter: %v, %v; want 0 and no error", got, err)
	}
	if _, err := parseTTL(url.Values{"ttl": {"99999999999999999999"}}); err == nil || !strings.Contains(err.Error(), "between 1s and 24h") {
		t.Errorf("a number of seconds past int64: %v; want it called out of range", err)
	}
	for _, body := range []string{"", "  \n"} {
		if _, err := decodeService([]byte(body)); err == nil || !strings.Contains(err.Error(), "the body is empty") {
			t.Errorf("body %q: %v; want it called empty", body, err)
		}
		if _, err := decodeDeregistration([]byte(body)); err == nil || !strings.Contains(err.Error(), "the body is empty") {
			t.Errorf("DELETE body %q: %v; want it called empty", body, err)
		}
	}
}

func TestDecodeServiceAcceptsAnyKeyCase(t *testing.T) {
	s, err := decodeService([]byte(`{"NAME":"a","Version":"1","Nodes":[{"Id":"n","ADDRESS":"10.0.0.1:8080","Metadata":{"k":"v"}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	n := s.Nodes[0]
	if s.Name != "a" || s.Version != "1" || n.ID != "n" || n.Address != "10.0.0.1" || n.Port != 8080 || n.Metadata["k"] != "v" {
		t.Errorf("got %+v", s)
	}
}

func TestDiffReportsCreateUpdateDelete(t *testing.T) {
	r := func(svc, id string, port int) record {
		return record{Service: svc, Node: Node{ID: id, Address: "h", Port: port}}
	}
	old := map[string]record{}
	for _, x := range []record{r("a", "1", 1), r("a", "2", 2), r("b", "1", 1)} {
		old[x.key()] = x
	}
	next := map[string]record{}
	refreshed := r("a", "1", 1)
	refreshed.Expires = time.Now().Add(time.Hour) // a refresh is not an update
	for _, x := range []record{refreshed, r("a", "2", 3), r("c", "1", 1)} {
		next[x.key()] = x
	}
	evs := diff(old, next, time.Now())
	sortEvents(evs)
	var got []string
	for _, ev := range evs {
		got = append(got, ev.Action+" "+ev.Service.Name+"/"+ev.Service.Nodes[0].ID)
	}
	want := "update a/2,delete b/1,create c/1"
	if strings.Join(got, ",") != want {
		t.Errorf("diff: got %v; want %s", got, want)
	}
}

func TestMergeKeepsVersionsApart(t *testing.T) {
	one := merge([]Service{{Name: "s", Version: "1", Nodes: []Node{{ID: "a"}}}})
	if one.Version != "1" || one.Nodes[0].Version != "" {
		t.Errorf("one version: got %+v; want the version on the service", one)
	}
	two := merge([]Service{{Name: "s", Version: "1", Nodes: []Node{{ID: "a"}}}, {Name: "s", Version: "2", Nodes: []Node{{ID: "b"}}}})
	if two.Version != "" || two.Nodes[0].Version != "1" || two.Nodes[1].Version != "2" {
		t.Errorf("two versions: got %+v; want each node to carry its version", two)
	}
}

func TestTableExpiryAndLimit(t *testing.T) {
	tb := newTable(2)
	now := time.Now()
	a := record{Service: "s", Node: Node{ID: "a", Address: "h", Port: 1}, Expires: now.Add(time.Second)}
	b := record{Service: "s", Node: Node{ID: "b", Address: "h", Port: 1}}
	if err := tb.upsert(a, b); err != nil {
		t.Fatal(err)
	}
	if err := tb.upsert(record{Service: "s", Node: Node{ID: "c"}}); err == nil {
		t.Error("a third node in a table of two must be refused")
	}
	if err := tb.upsert(b); err != nil {
		t.Errorf("refreshing an existing node in a full table: %v", err)
	}
	if got, _ := tb.lookup("s", now.Add(2*time.Second)); len(got[0].Nodes) != 1 {
		t.Errorf("expired node still looked up: %+v", got)
	}
	w := tb.watch("s")
	tb.sweep(now.Add(2 * time.Second))
	if evs := <-w.ch; len(evs) != 1 || evs[0].Action != "delete" || evs[0].Service.Nodes[0].ID != "a" {
		t.Errorf("sweep events: got %+v; want the delete of a", evs)
	}
	tb.unwatch(w)
}

// TestTableLimitSweepsTheExpired: records past their expiry, which
// lookups no longer show, do not fill the table until the next sweep.
func TestTableLimitSweepsTheExpired(t *testing.T) {
	tb := newTable(1)
	gone := record{Service: "s", Node: Node{ID: "old", Address: "h", Port: 1}, Expires: time.Now().Add(-time.Second)}
	if err := tb.upsert(gone); err != nil {
		t.Fatal(err)
	}
	if err := tb.upsert(record{Service: "s", Node: Node{ID: "new", Address: "h", Port: 1}}); err != nil {
		t.Errorf("a node in a table full of expired ones: %v; want it taken", err)
	}
}

// TestVersionMoveIsDeleteAndCreate: a node registered again under another
// version reaches watchers as a delete from the old version and a create
// in the new, from a registration and from a reread of the file alike.
func TestVersionMoveIsDeleteAndCreate(t *testing.T) {
	node := func(version string) record {
		return record{Service: "s", Version: version, Node: Node{ID: "n", Address: "h", Port: 1}}
	}
	actions := func(evs []Event) string {
		var out []string
		for _, ev := range evs {
			out = append(out, ev.Action+" "+ev.Service.Version)
		}
		return strings.Join(out, ",")
	}
	tb := newTable(0)
	tb.upsert(node("1"))
	w := tb.watch("s")
	defer tb.unwatch(w)
	tb.upsert(node("2"))
	if got := actions(<-w.ch); got != "delete 1,create 2" {
		t.Errorf("upsert under another version: %s; want delete 1,create 2", got)
	}
	got := actions(diff(map[string]record{"k": node("2")}, map[string]record{"k": node("3")}, time.Now()))
	if got != "delete 2,create 3" {
		t.Errorf("diff across versions: %s; want delete 2,create 3", got)
	}
}

// TestExpiredNodeBackBeforeTheSweep: a node that expired (lookups lost
// it) and came back before the sweep reached it is a delete and a create
// to watchers, through a registration and a reread of the file alike, so
// that watchers see the gap lookups saw.
func TestExpiredNodeBackBeforeTheSweep(t *testing.T) {
	now := time.Now()
	node := func(expires time.Time) record {
		return record{Service: "s", Node: Node{ID: "n", Address: "h", Port: 1}, Expires: expires}
	}
	actions := func(evs []Event) string {
		var out []string
		for _, ev := range evs {
			out = append(out, ev.Action)
		}
		return strings.Join(out, ",")
	}
	tb := newTable(0)
	tb.upsert(node(now.Add(-time.Millisecond)))
	w := tb.watch("s")
	defer tb.unwatch(w)
	queued := func() string { // upsert queues its events before it returns
		select {
		case evs := <-w.ch:
			return actions(evs)
		default:
			return ""
		}
	}
	tb.upsert(node(now.Add(time.Minute)))
	if got := queued(); got != "delete,create" {
		t.Errorf("an expired node posted again: %q; want delete,create", got)
	}
	tb.upsert(node(now.Add(2 * time.Minute)))
	if got := queued(); got != "" {
		t.Errorf("a live node refreshed: %q; want no event", got)
	}
	old := map[string]record{"k": node(now.Add(-time.Millisecond))}
	if got := actions(diff(old, map[string]record{"k": node(now.Add(time.Minute))}, now)); got != "delete,create" {
		t.Errorf("diff of an expired node read back: %s; want delete,create", got)
	}
	if got := actions(diff(old, map[string]record{"k": node(now.Add(-time.Second))}, now)); got != "" {
		t.Errorf("diff of an expired node read back expired: %s; want none", got)
	}
}

// TestWatchStartsSorted: a watch's first events, and a sweep's, come in the
// order answers use, not in map order.
func TestWatchStartsSorted(t *testing.T) {
	tb := newTable(0)
	expires := time.Now().Add(time.Hour)
	var recs []record
	for _, id := range []string{"c", "a", "d", "b", "f", "e"} {
		recs = append(recs, record{Service: "s", Node: Node{ID: id, Address: "h", Port: 1}, Expires: expires})
	}
	tb.upsert(recs...)
	w, initial := tb.watchFrom("s", time.Now())
	defer tb.unwatch(w)
	var ids []string
	for _, r := range initial {
		ids = append(ids, r.Node.ID)
	}
	if got := strings.Join(ids, ""); got != "abcdef" {
		t.Errorf("a watch's first records: %s; want abcdef", got)
	}
	tb.sweep(expires)
	ids = nil
	for _, ev := range <-w.ch {
		ids = append(ids, ev.Service.Nodes[0].ID)
	}
	if got := strings.Join(ids, ""); got != "abcdef" {
		t.Errorf("a sweep's deletes: %s; want abcdef", got)
	}
}

// TestWatchAfterAnExpiry: a node that expired before a watch began, and
// was posted again before the sweep, reaches the watcher as a create.
func TestWatchAfterAnExpiry(t *testing.T) {
	tb := newTable(0)
	now := time.Now()
	r := record{Service: "s", Node: Node{ID: "1", Address: "h", Port: 1}, Expires: now.Add(-time.Millisecond)}
	tb.upsert(r)
	w, initial := tb.watchFrom("", now)
	defer tb.unwatch(w)
	if len(initial) != 0 {
		t.Fatalf("a watch's first records hold the expired node: %+v", initial)
	}
	r.Expires = now.Add(time.Hour)
	tb.upsert(r)
	select {
	case evs := <-w.ch:
		if len(evs) != 1 || evs[0].Action != "create" {
			t.Errorf("the node posted again: %+v; want one create", evs)
		}
	default:
		t.Errorf("the node posted again after its expiry reached the watcher as no event")
	}
}

// TestChangeEventsSorted: a change's events reach watchers by service and
// node id, whatever the order of the request; a move keeps its delete
// before its create.
func TestChangeEventsSorted(t *testing.T) {
	tb := newTable(0)
	tb.upsert(record{Service: "s", Version: "2", Node: Node{ID: "m", Address: "h", Port: 1}})
	w := tb.watch("")
	defer tb.unwatch(w)
	tb.upsert(
		record{Service: "t", Node: Node{ID: "a", Address: "h", Port: 1}},
		record{Service: "s", Node: Node{ID: "z", Address: "h", Port: 1}},
		record{Service: "s", Version: "1", Node: Node{ID: "m", Address: "h", Port: 1}},
		record{Service: "s", Node: Node{ID: "b", Address: "h", Port: 1}},
	)
	var got []string
	for _, ev := range <-w.ch {
		got = append(got, ev.Action+" "+ev.Service.Name+"/"+ev.Service.Nodes[0].ID+"@"+ev.Service.Version)
	}
	want := "create s/b@,delete s/m@2,create s/m@1,create s/z@,create t/a@"
	if strings.Join(got, ",") != want {
		t.Errorf("a change's events: %s; want %s", strings.Join(got, ","), want)
	}
}

func TestSlowWatcherIsCutOff(t *testing.T) {
	tb := newTable(0)
	w := tb.watch("")
	for i := range watchQueue + 1 {
		tb.upsert(record{Service: "s", Node: Node{ID: fmt.Sprint(i), Address: "h", Port: 1}})
	}
	n := 0
	for range w.ch {
		n++
	}
	if n != watchQueue {
		t.Errorf("received %d changes before the cut-off; want %d then a closed channel", n, watchQueue)
	}
	tb.unwatch(w) // idempotent after the cut-off
}

// TestLargeChangeKeepsItsWatchers: one change with more events than the
// watcher queue holds reaches a watcher that keeps up, whole.
func TestLargeChangeKeepsItsWatchers(t *testing.T) {
	tb := newTable(0)
	var recs []record
	for i := range 2 * watchQueue {
		recs = append(recs, record{Service: "s", Node: Node{ID: fmt.Sprint(i), Address: "h", Port: 1}})
	}
	all, one, other := tb.watch(""), tb.watch("s"), tb.watch("t")
	if err := tb.upsert(recs...); err != nil {
		t.Fatal(err)
	}
	tb.remove(recs...)
	for _, w := range []*watcher{all, one} {
		for _, want := range []string{"create", "delete"} {
			evs, ok := <-w.ch
			if !ok || len(evs) != len(recs) || evs[0].Action != want {
				t.Fatalf("watcher %q: %d events (open %v); want %d %s events", w.service, len(evs), ok, len(recs), want)
			}
		}
	}
	select {
	case evs := <-other.ch:
		t.Errorf("a watcher of another service got %d events", len(evs))
	default:
	}
}

// TestFileBackendConcurrentWriters runs several backends on one file, as
// several sidecars would, and checks no registration is lost.
func TestFileBackendConcurrentWriters(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	const writers, each = 6, 20
	var backends []*fileBackend
	for range writers {
		fb, err := newFileBackend(t.Context(), path, newTable(0), log)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { fb.close() })
		backends = append(backends, fb)
	}
	var wg sync.WaitGroup
	for w, fb := range backends {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				s := Service{Name: fmt.Sprintf("svc%d", w), Nodes: []Node{{ID: fmt.Sprint(i), Address: "h", Port: 1}}}
				if err := fb.register(s, time.Minute); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	recs, _, err := parseRegistryFile(data)
	if err != nil || len(recs) != writers*each {
		t.Fatalf("file holds %d records (%v); want %d", len(recs), err, writers*each)
	}
	// Every backend's table catches up with the others' writes.
	for _, fb := range backends {
		waitFor(t, 2*time.Second, "a backend to see every write", func() bool { return len(fb.t.snapshot()) == writers*each })
	}
}

func TestFileBackendPrunesExpired(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb, err := newFileBackend(t.Context(), path, newTable(0), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer fb.close()
	now := time.Now()
	fb.now = func() time.Time { return now }
	fb.register(Service{Name: "old", Nodes: []Node{{ID: "1", Address: "h", Port: 1}}}, time.Second)
	now = now.Add(2 * time.Second)
	fb.register(Service{Name: "new", Nodes: []Node{{ID: "1", Address: "h", Port: 1}}}, time.Second)
	data, _ := os.ReadFile(path)
	if strings.Contains(string(data), `"old"`) || !strings.Contains(string(data), `"new"`) {
		t.Errorf("expired entry not pruned:\n%s", data)
	}
}

// FuzzDecodeService feeds arbitrary bodies to the registration decoders: they
// must never panic, and what they accept must be valid and encodable.
func FuzzDecodeService(f *testing.F) {
	for _, s := range []string{
		`{"name":"a","nodes":[{"id":"n","address":"h","port":1}]}`,
		`{"Name":"a","Nodes":[{"Id":"n","Address":"[::1]:80"}]}`,
		`{"name":"a","metadata":{"k":"v"},"nodes":[{"id":"n","address":"h:1","port":1,"metadata":{}}]}`,
		`{"name":1}`, `[]`, `null`, `{"name":"a","nodes":[{"id":"n","address":"h:99999"}]}`,
		`{"name":"a","endpoints":[{"name":"E.C"}],"verison":"1","nodes":[{"id":"n","address":"h:1"}]}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if d, err := decodeDeregistration(data); err == nil {
			if d.Name == "" || !validName(d.Name) || len(d.Nodes) == 0 || len(d.Nodes) > maxNodesPerReq {
				t.Fatalf("accepted an invalid deregistration %+v", d)
			}
			for _, n := range d.Nodes {
				if n.ID == "" || !validName(n.ID) {
					t.Fatalf("accepted an invalid node id %q to deregister", n.ID)
				}
			}
		}
		s, err := decodeService(data)
		if b, berr := decodeServiceBody(data); berr == nil && normalizeService(&b) == nil {
			// A request's body is held to more than a backend's value.
			if err != nil || !reflect.DeepEqual(s, b) {
				t.Fatalf("a request's service %+v is %+v (%v) read from a backend", b, s, err)
			}
		}
		if err != nil {
			return
		}
		if s.Name == "" || !validName(s.Name) {
			t.Fatalf("accepted invalid name %q", s.Name)
		}
		for _, n := range s.Nodes {
			if n.ID == "" || n.Port < 1 || n.Port > 65535 || n.Address == "" {
				t.Fatalf("accepted invalid node %+v", n)
			}
		}
		if again, err := decodeService(mustJSON(t, s)); err != nil || !reflect.DeepEqual(s, again) {
			t.Fatalf("an accepted service %+v re-decodes as %+v (%v)", s, again, err)
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	data, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// BenchmarkFileRegistryPropagation measures the time from a registration
// through one file backend to its visibility in another's table, as between
// two sidecars sharing a file.
func BenchmarkFileRegistryPropagation(b *testing.B) {
	path := filepath.Join(b.TempDir(), "registry.json")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	writer, err := newFileBackend(b.Context(), path, newTable(0), log)
	if err != nil {
		b.Fatal(err)
	}
	defer writer.close()
	reader, err := newFileBackend(b.Context(), path, newTable(0), log)
	if err != nil {
		b.Fatal(err)
	}
	defer reader.close()
	var worst time.Duration
	i := 0
	for b.Loop() {
		i++
		name := fmt.Sprintf("svc%d", i)
		start := time.Now()
		writer.register(Service{Name: name, Nodes: []Node{{ID: "1", Address: "h", Port: 1}}}, time.Minute)
		for {
			if _, err := reader.t.lookup(name, time.Now()); err == nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
		worst = max(worst, time.Since(start))
	}
	b.ReportMetric(float64(worst.Microseconds())/1000, "worst-ms")
}

// pausingBackend holds its next registration until released, so that a
// test can act while a refresh is writing.
type pausingBackend struct {
	memoryBackend
	entered, release chan struct{}
	pause            atomic.Bool
}

func (b *pausingBackend) register(s Service, ttl time.Duration) error {
	if b.pause.CompareAndSwap(true, false) {
		close(b.entered)
		<-b.release
	}
	return b.memoryBackend.register(s, ttl)
}

// downBackend is an etcd that stopped answering once everything was
// registered: every later registration fails, and its status says so.
type downBackend struct {
	memoryBackend
	down          atomic.Bool
	registrations atomic.Int32
}

func (b *downBackend) register(s Service, ttl time.Duration) error {
	if !b.down.Load() {
		return b.memoryBackend.register(s, ttl)
	}
	b.registrations.Add(1)
	return errors.New("etcd not answering")
}

func (b *downBackend) status() error {
	if b.down.Load() {
		return errors.New("etcd registry unreachable")
	}
	return nil
}

// TestRefreshStopsAtABackendDown: with the backend down, a refresh pass
// ends at its first failure, and a pass asked to stop does not start:
// each entry would wait out the request timeout, holding the shutdown.
func TestRefreshStopsAtABackendDown(t *testing.T) {
	tb := newTable(0)
	b := &downBackend{memoryBackend: memoryBackend{t: tb, now: time.Now}}
	r := &registry{table: tb, backend: b, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	for i := range 10 {
		if err := r.Register(Service{Name: fmt.Sprintf("s%d", i), Nodes: []Node{{ID: "n", Address: "127.0.0.1", Port: 1}}}, 0); err != nil {
			t.Fatal(err)
		}
	}
	b.down.Store(true)
	if err := r.refresh(t.Context()); err == nil || b.registrations.Load() != 1 {
		t.Errorf("a pass with the backend down: %v after %d attempts; want it to end at the first", err, b.registrations.Load())
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	r.refresh(ctx)
	if n := b.registrations.Load(); n != 1 {
		t.Errorf("a pass asked to stop made %d more attempts; want none", n-1)
	}
}

// failingBackend takes registrations and fails every deregistration, as
// an etcd that stopped answering would, counting them.
type failingBackend struct {
	memoryBackend
	deregistrations atomic.Int32
}

func (b *failingBackend) deregister(Service) error {
	b.deregistrations.Add(1)
	return errors.New("etcd not answering")
}

// TestShutdownStopsAtAFailingBackend: at shutdown a backend that fails a
// deregistration is not asked again for every other entry (etcd takes its
// whole timeout for each); what is left lapses within its TTL.
func TestShutdownStopsAtAFailingBackend(t *testing.T) {
	tb := newTable(10)
	b := &failingBackend{memoryBackend: memoryBackend{t: tb, now: time.Now}}
	r := &registry{table: tb, backend: b, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	for i := range 5 {
		if err := r.Register(Service{Name: "s", Nodes: []Node{{ID: fmt.Sprint("n", i), Address: "127.0.0.1", Port: 1}}}, 0); err != nil {
			t.Fatal(err)
		}
	}
	err := r.deregisterOwned()
	if n := b.deregistrations.Load(); n != 1 || err == nil || !strings.Contains(err.Error(), "4 more left") {
		t.Errorf("%d deregistrations, error %v; want 1 and the 4 others named as left to lapse", n, err)
	}
}

// TestRefreshDoesNotUndoADeregistration: a deregistration that comes while
// a refresh is re-registering the same entry is not undone by it, and a
// registration that comes after shutdown let everything go is refused.
func TestRefreshDoesNotUndoADeregistration(t *testing.T) {
	tb := newTable(10)
	b := &pausingBackend{memoryBackend: memoryBackend{t: tb, now: time.Now}, entered: make(chan struct{}), release: make(chan struct{})}
	r := &registry{table: tb, backend: b, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	svc := Service{Name: "s", Nodes: []Node{{ID: "n", Address: "127.0.0.1", Port: 1}}}
	if err := r.Register(svc, 0); err != nil {
		t.Fatal(err)
	}
	b.pause.Store(true)
	refreshed := make(chan error, 1)
	go func() { refreshed <- r.refresh(t.Context()) }()
	<-b.entered // the refresh is writing the entry
	deregistered := make(chan error, 1)
	go func() { deregistered <- r.Deregister(svc) }()
	// Give the deregistration the chance to finish inside the refresh's
	// write, as it could before; now it waits for that write instead.
	select {
	case <-deregistered:
		deregistered <- nil
	case <-time.After(50 * time.Millisecond):
	}
	close(b.release)
	if err := <-refreshed; err != nil {
		t.Fatal(err)
	}
	if err := <-deregistered; err != nil {
		t.Fatal(err)
	}
	if got, err := r.GetService("s"); err == nil {
		t.Errorf("after the deregistration: %v; want the service gone", got)
	}
	if err := r.deregisterOwned(); err != nil {
		t.Fatal(err)
	}
	if err := r.Register(svc, 0); !errors.Is(err, errShuttingDown) {
		t.Errorf("a registration to keep alive after shutdown: %v; want errShuttingDown", err)
	}
	if err := r.Register(svc, time.Second); err != nil {
		t.Errorf("a registration with a ttl after shutdown: %v; want it taken, it expires alone", err)
	}
}

// TestFileLockGivesUp: a registry file lock held elsewhere is waited for
// a bounded time, then refused with a reason; once free it is taken.
func TestFileLockGivesUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "reg.json.lock")
	unlockHeld, err := lockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if unlock, err := lockFileWithin(context.Background(), path, 50*time.Millisecond); err == nil {
		unlock()
		t.Fatal("took a lock another holder has")
	} else if !strings.Contains(err.Error(), "held by another process for over 50ms") {
		t.Errorf("error %v; want it to say the lock is held", err)
	}
	unlockHeld()
	unlock, err := lockFileWithin(context.Background(), path, 50*time.Millisecond)
	if err != nil {
		t.Fatalf("a free lock: %v", err)
	}
	unlock()
}

// TestDeregistrationLimits: a DELETE is held to a registration's limits on
// the number of nodes, too: each is a backend removal.
func TestDeregistrationLimits(t *testing.T) {
	ids := make([]string, maxNodesPerReq+1)
	for i := range ids {
		ids[i] = fmt.Sprintf(`{"id":"n%d"}`, i)
	}
	body := `{"name":"x","nodes":[` + strings.Join(ids, ",") + `]}`
	if _, err := decodeDeregistration([]byte(body)); err == nil || !strings.Contains(err.Error(), "at most 256 per request") {
		t.Errorf("a DELETE of %d nodes: %v; want it refused", len(ids), err)
	}
	body = `{"name":"x","nodes":[` + strings.Join(ids[:maxNodesPerReq], ",") + `]}`
	if _, err := decodeDeregistration([]byte(body)); err != nil {
		t.Errorf("a DELETE of %d nodes: %v; want it taken", maxNodesPerReq, err)
	}
}

// TestDeregistrationAnswersIDsAlone: a DELETE names nodes by id; the answer
// echoes the ids with nothing else (not an address a registration would
// refuse), and an id named twice is a 400, as in a registration.
func TestDeregistrationAnswersIDsAlone(t *testing.T) {
	svc, err := decodeDeregistration([]byte(`{"name":"a","metadata":{"s":"1"},"nodes":[{"id":"x","address":"999.9.9.9","port":5,"metadata":{"k":"v"}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if got, _ := json.Marshal(svc); string(got) != `{"name":"a","version":"","metadata":{},"nodes":[{"id":"x","address":"","port":0,"metadata":{}}]}` {
		t.Errorf("answer %s; want the ids alone", got)
	}
	if _, err := decodeDeregistration([]byte(`{"name":"a","nodes":[{"id":"x"},{"id":"x"}]}`)); err == nil || !strings.Contains(err.Error(), `id "x" appears twice`) {
		t.Errorf("an id named twice: %v; want it refused", err)
	}
}

// TestSidecarsOwnMarksFollowOwned: the marks of the sidecar's own entries
// (refreshed first) go with them: a refused registration leaves none, and
// an entry posted again with ?ttl= is no longer kept, nor marked.
func TestSidecarsOwnMarksFollowOwned(t *testing.T) {
	tb := newTable(0)
	refusing := &registry{table: tb, backend: &refusingBackend{memoryBackend{t: tb, now: time.Now}}, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	if err := refusing.registerOwn(nodeService("topic:t", "s1")); err == nil {
		t.Fatal("the refusing backend took a registration")
	}
	if len(refusing.owned) != 0 || len(refusing.sidecars) != 0 {
		t.Errorf("after a refused registration: %d owned, %d marked; want none", len(refusing.owned), len(refusing.sidecars))
	}
	r := &registry{table: tb, backend: &memoryBackend{t: tb, now: time.Now}, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	if err := r.registerOwn(nodeService("app", "a1")); err != nil {
		t.Fatal(err)
	}
	if err := r.Register(nodeService("app", "a1"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if len(r.owned) != 0 || len(r.sidecars) != 0 {
		t.Errorf("after a ?ttl= registration of it: %d owned, %d marked; want none", len(r.owned), len(r.sidecars))
	}
}
