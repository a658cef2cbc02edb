package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestNextHealth(t *testing.T) {
	type step struct {
		passed  bool
		status  string
		changed bool
	}
	for _, tc := range []struct {
		name                string
		failures, successes int
		steps               []step
	}{
		{"first pass registers at once", 3, 2, []step{{true, healthPassing, true}}},
		{"first failure is failing at once", 3, 1, []step{{false, healthFailing, true}}},
		{"failures below the threshold keep it in", 3, 1, []step{
			{true, healthPassing, true}, {false, healthPassing, false}, {false, healthPassing, false},
			{true, healthPassing, false}, {false, healthPassing, false}, {false, healthPassing, false},
			{false, healthFailing, true}, {false, healthFailing, false},
		}},
		{"an app that never passed comes in on its first pass", 1, 3, []step{
			{false, healthFailing, true}, {false, healthFailing, false}, {true, healthPassing, true},
		}},
		{"successes needed to come back", 1, 3, []step{
			{true, healthPassing, true}, {false, healthFailing, true}, {true, healthFailing, false},
			{true, healthFailing, false}, {false, healthFailing, false}, {true, healthFailing, false},
			{true, healthFailing, false}, {true, healthPassing, true},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := healthState{Status: healthUnknown}
			for i, st := range tc.steps {
				var changed bool
				s, changed = nextHealth(s, st.passed, tc.failures, tc.successes)
				if s.Status != st.status || changed != st.changed {
					t.Fatalf("step %d (passed=%v): got %s changed=%v; want %s changed=%v", i, st.passed, s.Status, changed, st.status, st.changed)
				}
			}
		})
	}
}

func TestValidateHealthURL(t *testing.T) {
	for url, ok := range map[string]bool{
		"http://127.0.0.1:9090/_status/health": true,
		"https://app.local/health":             true,
		"tcp://127.0.0.1:9090":                 true,
		"tcp://127.0.0.1":                      false,
		"http:///health":                       false,
		"ftp://x/":                             false,
		"127.0.0.1:9090":                       false,
		"http://127.0.0.1:99999/h":             false,
		"http://127.0.0.1:0/h":                 false,
		"tcp://127.0.0.1:0":                    false,
		"tcp://127.0.0.1:65536":                false,
		"tcp://127.0.0.1:9090/health":          false,
		"tcp://127.0.0.1:9090?x=1":             false,
		"http://[::1]:9090/h":                  true,
	} {
		if err := validateHealthURL(url); (err == nil) != ok {
			t.Errorf("validateHealthURL(%q) = %v; want ok %v", url, err, ok)
		}
	}
}

// TestCheckStep calls check directly, as the loop would on each tick.
func TestCheckStep(t *testing.T) {
	status := http.StatusOK
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) }))
	defer app.Close()
	var changes []bool
	h := newHealthChecker(healthConfig{URL: app.URL, Interval: time.Hour, Timeout: time.Second, Failures: 2, Successes: 1},
		slog.New(slog.NewTextHandler(io.Discard, nil)), nil, func(p bool) { changes = append(changes, p) })
	ctx := context.Background()
	h.check(ctx)
	status = http.StatusServiceUnavailable
	h.check(ctx)
	if r := h.report(); r.Status != healthPassing || r.ConsecutiveFailures != 1 || !strings.Contains(r.LastError, "503") {
		t.Errorf("after one failure: %+v; want still passing, 1 failure, the status in the error", r)
	}
	h.check(ctx)
	status = http.StatusNoContent
	h.check(ctx)
	if len(changes) != 3 || !changes[0] || changes[1] || !changes[2] {
		t.Errorf("transitions: got %v; want [true false true]", changes)
	}
}

// TestFailingReasonChangeIsLogged: an app failing its checks for a new
// reason (refused, then up with the wrong path) gets a line saying so,
// however long it fails; the same reason again, or a new one within
// reasonChangeEvery of the last line, gets none.
func TestFailingReasonChangeIsLogged(t *testing.T) {
	status := http.StatusNotFound
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(status) }))
	defer app.Close()
	var log syncBuffer
	h := newHealthChecker(healthConfig{URL: app.URL, Interval: time.Hour, Timeout: time.Second, Failures: 1, Successes: 1},
		slog.New(slog.NewTextHandler(&log, nil)), nil, func(bool) {})
	ctx := context.Background()
	h.check(ctx)
	h.check(ctx)
	if n := strings.Count(log.String(), "not healthy yet"); n != 1 {
		t.Fatalf("two checks failing alike: %d lines; want 1:\n%s", n, log.String())
	}
	status = http.StatusInternalServerError
	h.check(ctx)
	if strings.Contains(log.String(), "500") {
		t.Errorf("a new reason within %v of the last line was logged:\n%s", reasonChangeEvery, log.String())
	}
	h.loggedAt = time.Now().Add(-reasonChangeEvery) // that time has passed
	h.check(ctx)
	if got := log.String(); strings.Count(got, "not healthy yet") != 2 || !strings.Contains(got, "500 Internal Server Error") || !strings.Contains(got, "news=") {
		t.Errorf("a new reason after %v: %s; want a second line with it", reasonChangeEvery, got)
	}
}

func TestRedactURL(t *testing.T) {
	for in, want := range map[string]string{
		"http://u:pw@h:1/p?apikey=k&flag&x=": "http://xxxxx:xxxxx@h:1/p?apikey=xxxxx&=xxxxx&x=xxxxx",
		"https://sk_live_KEY@h/health":       "https://xxxxx@h/health",
		"https://sk_live_KEY:@h/health":      "https://xxxxx:xxxxx@h/health",
		"http://h/health?S3CR3T":             "http://h/health?=xxxxx",
		"http://127.0.0.1:9090/health":       "http://127.0.0.1:9090/health",
		"tcp://127.0.0.1:9090":               "tcp://127.0.0.1:9090",
		"http://h/%zz?k=v":                   "(a URL that does not parse)",
	} {
		if got := redactURL(in); got != want {
			t.Errorf("redactURL(%q) = %q; want %q", in, got, want)
		}
	}
}

func TestValidateHealthURLHidesThePassword(t *testing.T) {
	err := validateHealthURL("ftp://user:s3cr3t@127.0.0.1:9090/h")
	if err == nil || strings.Contains(err.Error(), "s3cr3t") {
		t.Fatalf("error %v; want a refusal without the password", err)
	}
}

// TestProbeWantsAWholeAnswer: a check passes on a 2xx the app sent whole,
// and fails on one it broke off or stalled in, and on a redirect, wherever
// it points.
func TestProbeWantsAWholeAnswer(t *testing.T) {
	elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {}))
	defer elsewhere.Close()
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/ok":
			io.WriteString(w, "ok")
		case "/cut", "/stall":
			w.Header().Set("Content-Length", "100")
			io.WriteString(w, "0123456789")
			w.(http.Flusher).Flush()
			if r.URL.Path == "/stall" {
				<-r.Context().Done() // the check gives up
			}
			panic(http.ErrAbortHandler) // the connection breaks off
		case "/moved":
			http.Redirect(w, r, elsewhere.URL+"/", http.StatusFound)
		}
	}))
	defer app.Close()
	for path, want := range map[string]string{"/ok": "", "/cut": "reading the answer", "/stall": "no answer within", "/moved": "status 302"} {
		h := newHealthChecker(healthConfig{URL: app.URL + path, Interval: time.Hour, Timeout: 300 * time.Millisecond, Failures: 1, Successes: 1},
			slog.New(slog.NewTextHandler(io.Discard, nil)), nil, func(bool) {})
		err := h.probe(context.Background())
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("%s: %v; want %q", path, err, want)
		}
	}
}

// TestVerdictsDoNotWaitOnTheRegistry: the health checks hand their verdict
// to the app's registration and go on; a registry write that takes long
// (etcd's timeout, a file lock held elsewhere) holds neither them nor
// /health, which says registered only once the write is done.
func TestVerdictsDoNotWaitOnTheRegistry(t *testing.T) {
	tb := newTable(10)
	b := &pausingBackend{memoryBackend: memoryBackend{t: tb, now: time.Now}, entered: make(chan struct{}), release: make(chan struct{})}
	b.pause.Store(true)
	r := &registry{table: tb, backend: b, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	app := Service{Name: "app", Nodes: []Node{{ID: "app-1", Address: "127.0.0.1", Port: 1}}}
	a := newAppRegistration(r, app, "app-1", discardLog, time.Minute)
	go a.run(t.Context())
	returned := make(chan struct{})
	go func() { a.follow(true); close(returned) }()
	select {
	case <-returned:
	case <-time.After(5 * time.Second): // a deadline on the condition, not a pause
		t.Fatal("follow waited on the registry write")
	}
	<-b.entered // the write is under way, and held
	if a.registered() {
		t.Error("registered while the write is still under way")
	}
	a.follow(false) // the checks go on meanwhile: a later verdict waits its turn
	close(b.release)
	waitFor(t, 5*time.Second, "the app in, then out again", func() bool {
		_, err := r.GetService("app")
		return err != nil && !a.registered()
	})
}

// TestFailingAppLosesAnEarlierRunsEntry: a sidecar restarted with a fixed
// --server_id, whose app fails from the start, takes out the entry its
// earlier run left under that id, rather than let callers reach the
// failing app until the entry's TTL runs out.
func TestFailingAppLosesAnEarlierRunsEntry(t *testing.T) {
	tb := newTable(10)
	r := &registry{table: tb, backend: &memoryBackend{t: tb, now: time.Now}, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	app := Service{Name: "app", Nodes: []Node{{ID: "app-1", Address: "127.0.0.1", Port: 1}}}
	if err := r.backend.register(app, time.Minute); err != nil { // the earlier run's
		t.Fatal(err)
	}
	a := newAppRegistration(r, app, "app-1", discardLog, time.Minute)
	go a.run(t.Context())
	a.follow(false)
	waitFor(t, 5*time.Second, "the earlier run's entry to go", func() bool { return !tb.holds("app", "app-1") })
	if a.registered() {
		t.Errorf("a failing app counts as registered")
	}
}

// TestFailingAppLosesAnEarlierRunsEntryOfAnotherVersion: so it does when
// the earlier run registered another version (an upgrade keeping
// --server_id), in the file registry too, whose removals name a version
// to remove only nodes of that version.
func TestFailingAppLosesAnEarlierRunsEntryOfAnotherVersion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb := newTestFileBackend(t, path, 10)
	r := &registry{table: fb.t, backend: fb, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	old := Service{Name: "app", Version: "1.0", Nodes: []Node{{ID: "app-1", Address: "127.0.0.1", Port: 1}}}
	if err := fb.register(old, time.Minute); err != nil { // the earlier run's
		t.Fatal(err)
	}
	app := old
	app.Version = "2.0"
	a := newAppRegistration(r, app, "app-1", discardLog, time.Minute)
	go a.run(t.Context())
	a.follow(false)
	waitFor(t, 5*time.Second, "the earlier run's entry to go", func() bool { return !fb.t.holds("app", "app-1") })
}

// TestChecksRunEveryIntervalFromTheirStart: the wait after a check is what
// is left of the interval, so that a check hanging to its timeout does not
// put the next one off by as much (Kubernetes' probes run so).
func TestChecksRunEveryIntervalFromTheirStart(t *testing.T) {
	for _, tc := range []struct{ wait, took, want time.Duration }{
		{10 * time.Second, time.Second, 9 * time.Second},
		{10 * time.Second, 0, 10 * time.Second},
		{time.Second, 3 * time.Second, 0}, // a timeout over the interval: the next at once
	} {
		if got := waitLeft(tc.wait, tc.took); got != tc.want {
			t.Errorf("waitLeft(%v, %v) = %v; want %v", tc.wait, tc.took, got, tc.want)
		}
	}
}

// TestAppRegistrationLogsTheOtherRefusedWrite: a refusal is logged once
// for each write in turn: the app's removal refused, then, the app back,
// its registration refused too, is two lines, and not more for retries.
func TestAppRegistrationLogsTheOtherRefusedWrite(t *testing.T) {
	var log syncBuffer
	a := newAppRegistration(nil, Service{Name: "foo"}, "foo-1", slog.New(slog.NewTextHandler(&log, nil)), time.Second)
	refused := errors.New("etcd lease grant: no etcd endpoint answered")
	a.settle(refused, "deregistered", "deregistering")
	a.settle(refused, "deregistered", "deregistering")
	a.settle(refused, "registered", "registering")
	a.settle(refused, "registered", "registering")
	got := log.String()
	if strings.Count(got, "deregistering the app failed") != 1 || strings.Count(got, "msg=\"registering the app failed") != 1 {
		t.Errorf("log: %s; want one line for each refused write", got)
	}
	a.settle(nil, "registered", "registering")
	if !strings.Contains(log.String(), "registered foo-1 after the registry refused it") {
		t.Errorf("log: %s; want the late registration said", log.String())
	}
}

// TestSameReasonOverNewConnectionsIsOneReason: an app failing for one
// reason, each check on a new connection, is not "a reason changed" every
// 10 s for ever: the connection's own end, a new port each time, is no
// part of the reason.
func TestSameReasonOverNewConnectionsIsOneReason(t *testing.T) {
	a := &net.OpError{Op: "read", Net: "tcp", Source: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 41234}, Addr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9090}, Err: syscall.ECONNRESET}
	b := *a
	b.Source = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 52001}
	if reasonOf(a) != reasonOf(&b) {
		t.Errorf("%q and %q: two reasons; want one", reasonOf(a), reasonOf(&b))
	}
	c := b
	c.Addr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9091}
	if reasonOf(a) == reasonOf(&c) {
		t.Errorf("%q: the app's own address is part of the reason", reasonOf(&c))
	}
	if db, cache := errors.New("503: db->down"), errors.New("503: cache->down"); reasonOf(db) == reasonOf(cache) {
		t.Errorf("%q and %q: one reason; want two (an arrow between words is the app's)", reasonOf(db), reasonOf(cache))
	}
}
