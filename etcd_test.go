package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

func TestEtcdKeyLayout(t *testing.T) {
	const prefix = "/micro/registry/"
	for _, tc := range []struct {
		key         string
		service, id string
		ok          bool
	}{
		{"/micro/registry/foo/foo-1", "foo", "foo-1", true},
		{"/micro/registry/topic:news/sidecar-1", "topic:news", "sidecar-1", true},
		{"/micro/registry/go.micro.srv.example/go.micro.srv.example-c5718d29", "go.micro.srv.example", "go.micro.srv.example-c5718d29", true},
		{"/micro/registry/foo", "", "", false},   // no node id
		{"/micro/registry/foo/", "", "", false},  // empty node id
		{"/micro/registry//n1", "", "", false},   // empty service
		{"/micro/registry/a/b/c", "", "", false}, // too deep
		{"/micro/registry/a b/n", "", "", false}, // space
		{"/micro/registryfoo/n", "", "", false},  // not under the prefix
		{"/other/foo/n", "", "", false},          // elsewhere
		{"/micro/registry/" + strings.Repeat("x", 256) + "/n", "", "", false},
		{"/micro/registry/\xff/n", "", "", false}, // not printable ASCII
	} {
		svc, id, ok := parseEtcdKey(prefix, tc.key)
		if svc != tc.service || id != tc.id || ok != tc.ok {
			t.Errorf("parseEtcdKey(%q) = %q, %q, %v; want %q, %q, %v", tc.key, svc, id, ok, tc.service, tc.id, tc.ok)
		}
	}
	r := record{Service: "topic:news", Node: Node{ID: "n-1"}}
	if got := etcdKey("/p/", r); got != "/p/topic:news/n-1" {
		t.Errorf("etcdKey = %q; want /p/topic:news/n-1", got)
	}
	if svc, id, ok := parseEtcdKey("/p/", etcdKey("/p/", r)); !ok || svc != r.Service || id != r.Node.ID {
		t.Errorf("round trip of %q: %q %q %v", etcdKey("/p/", r), svc, id, ok)
	}
}

func TestPrefixEnd(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"/micro/registry/", "/micro/registry0"},
		{"a", "b"},
		{"a\xff", "b"},
		{"\xff\xff", "\x00"},
	} {
		if got := string(prefixEnd(tc.in)); got != tc.want {
			t.Errorf("prefixEnd(%q) = %q; want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseEtcdEntry(t *testing.T) {
	const prefix = "/micro/registry/"
	good := `{"name":"foo","version":"1.0","metadata":{"a":"b"},"nodes":[{"id":"f1","address":"10.0.0.1:80","metadata":{}}]}`
	for _, tc := range []struct {
		key, value string
		err        string // "" for success
	}{
		{prefix + "foo/f1", good, ""},
		{prefix + "foo/f1", `{"Name":"foo","Nodes":[{"Id":"f1","Address":"10.0.0.1","Port":80}]}`, ""},
		{prefix + "foo/f1", `{not json`, "not a service record"},
		{prefix + "foo/f1", `[1,2]`, "not a service record"},
		{prefix + "foo/f1", `{"name":"foo","nodes":[{"id":"f1","address":"h"}]}`, "port 0 out of range"},
		{prefix + "foo/f1", `{"name":"foo","nodes":[]}`, "0 nodes"},
		{prefix + "foo/f1", `{"name":"foo","nodes":[{"id":"f1","address":"h","port":1},{"id":"f2","address":"h","port":1}]}`, "2 nodes"},
		{prefix + "bar/f1", good, `key says "bar" node "f1"`},
		{prefix + "foo/f2", good, `key says "foo" node "f2"`},
		{prefix + "foo", good, "outside the layout"},
		{"/elsewhere/foo/f1", good, "outside the layout"},
		{prefix + "foo/a/b", good, "outside the layout"},
		{prefix + "foo/f 1", good, `the key's node id "f 1"`},
		{prefix + strings.Repeat("s", maxNameLen+1) + "/f1", good, "the key's service name"},
		{prefix + "foo/f1", `{"name":"foo","metadata":{"k":"` + strings.Repeat("v", maxEtcdValue) + `"}}`, "larger than"},
	} {
		r, err := parseEtcdEntry(prefix, []byte(tc.key), []byte(tc.value))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("parseEtcdEntry(%q, %.60q): %v; want success", tc.key, tc.value, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("parseEtcdEntry(%q, %.60q): %v; want an error containing %q", tc.key, tc.value, err, tc.err)
		case tc.err == "" && (r.Service != "foo" || r.Node.ID != "f1" || r.Node.Address != "10.0.0.1" || r.Node.Port != 80 || !r.Expires.IsZero()):
			t.Errorf("parseEtcdEntry(%q): got %+v", tc.key, r)
		}
	}
	// What the backend writes, it reads back.
	r := record{Service: "topic:x", Version: "2", Metadata: map[string]string{"q": "g"}, Node: Node{ID: "n", Address: "::1", Port: 9, Metadata: map[string]string{}}}
	v, err := etcdValue(r)
	if err != nil {
		t.Fatal(err)
	}
	back, err := parseEtcdEntry("/p/", []byte(etcdKey("/p/", r)), v)
	if err != nil || !back.same(r) {
		t.Errorf("round trip: %+v, %v; want %+v", back, err, r)
	}
}

// Lines as etcd 3.4's gateway sends them on /v3/watch.
const (
	watchCreated   = `{"result":{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"2","raft_term":"2"},"created":true}}`
	watchPut       = `{"result":{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"7","raft_term":"2"},"events":[{"kv":{"key":"L21pY3JvL3JlZ2lzdHJ5L2Zvby9mMQ==","create_revision":"7","mod_revision":"7","version":"1","value":"eyJuYW1lIjoiZm9vIiwibm9kZXMiOlt7ImlkIjoiZjEiLCJhZGRyZXNzIjoiMTI3LjAuMC4xIiwicG9ydCI6ODB9XX0=","lease":"4111120274056555015"}}]}}`
	watchDelete    = `{"result":{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"8","raft_term":"2"},"events":[{"type":"DELETE","kv":{"key":"L21pY3JvL3JlZ2lzdHJ5L2Zvby9mMQ==","mod_revision":"8"}}]}}`
	watchCompacted = `{"result":{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","raft_term":"2"},"canceled":true,"compact_revision":"3"}}`
	watchStreamErr = `{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}`
)

func TestParseWatchMessage(t *testing.T) {
	m, err := parseWatchMessage([]byte(watchCreated))
	if err != nil || !m.Result.Created || m.Result.Header.Revision != 2 || m.Result.Header.ClusterID != "15118495548433857066" {
		t.Errorf("created: %+v %v", m.Result, err)
	}
	m, err = parseWatchMessage([]byte(watchPut))
	if err != nil || len(m.Result.Events) != 1 || m.Result.Events[0].Type != "" || string(m.Result.Events[0].KV.Key) != "/micro/registry/foo/f1" || m.Result.Events[0].KV.Lease != 4111120274056555015 {
		t.Errorf("put: %+v %v", m.Result, err)
	}
	ch := watchChanges("/micro/registry/", m.Result.Events)
	if len(ch.upserts) != 1 || ch.upserts[0].Node.Port != 80 || ch.lastRev != 7 {
		t.Errorf("put changes: %+v", ch)
	}
	m, _ = parseWatchMessage([]byte(watchCompacted))
	if !m.Result.Canceled || m.Result.CompactRevision != 3 {
		t.Errorf("compacted: %+v", m.Result)
	}
	m, _ = parseWatchMessage([]byte(watchStreamErr))
	if m.Error == nil || m.Error.GRPCCode != grpcUnavailable || !shouldFailOver(m.Error.err()) {
		t.Errorf("stream error: %+v", m.Error)
	}
	for _, bad := range []string{``, `null`, `{}`, `{"result":`, `{"result":{"header":{"revision":"x"}}}`, `[]`} {
		if _, err := parseWatchMessage([]byte(bad)); err == nil {
			t.Errorf("parseWatchMessage(%q): no error", bad)
		}
	}
}

func TestWatchChanges(t *testing.T) {
	const prefix = "/micro/registry/"
	val := func(name, id string, port int) []byte {
		return []byte(fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q,"address":"127.0.0.1","port":%d}]}`, name, id, port))
	}
	put := func(key string, value []byte, rev int64) etcdEvent {
		return etcdEvent{KV: etcdKV{Key: []byte(prefix + key), Value: value, ModRevision: int64s(rev)}}
	}
	del := func(key string, rev int64) etcdEvent {
		return etcdEvent{Type: "DELETE", KV: etcdKV{Key: []byte(prefix + key), ModRevision: int64s(rev)}}
	}
	ch := watchChanges(prefix, []etcdEvent{
		put("a/a1", val("a", "a1", 1), 10),
		put("a/a1", val("a", "a1", 2), 11), // the last put wins
		put("b/b1", val("b", "b1", 1), 12),
		del("b/b1", 13), // put then delete: removed
		del("c/c1", 14),
		put("d/d1", val("d", "d1", 1), 15),
		put("d/d1", []byte("junk"), 16), // good then bad: removed, and bad
		put("x/y/z", val("x", "y", 1), 17),
		put("e/e1", []byte("junk"), 18),
		put("e/e1", val("e", "e1", 3), 19), // bad then good: fine
	})
	var ups []string
	for _, r := range ch.upserts {
		ups = append(ups, fmt.Sprintf("%s/%s:%d", r.Service, r.Node.ID, r.Node.Port))
	}
	if got := strings.Join(ups, " "); got != "a/a1:2 e/e1:3" {
		t.Errorf("upserts: %s; want a/a1:2 e/e1:3", got)
	}
	var rms []string
	for _, r := range ch.removes {
		rms = append(rms, r.Service+"/"+r.Node.ID)
	}
	if got := strings.Join(rms, " "); got != "b/b1 c/c1 d/d1" {
		t.Errorf("removes: %s; want b/b1 c/c1 d/d1", got)
	}
	if len(ch.bad) != 2 || ch.bad[prefix+"d/d1"] == "" || ch.bad[prefix+"x/y/z"] == "" {
		t.Errorf("bad: %v; want d/d1 and x/y/z", ch.bad)
	}
	if ch.lastRev != 19 || ch.deleted[prefix+"b/b1"] != 13 {
		t.Errorf("lastRev %d, deleted %v", ch.lastRev, ch.deleted)
	}
}

// FuzzEtcdWatchMessage feeds arbitrary watch lines through the parser and
// the fold into table changes: nothing may panic, and every record that
// comes out is valid and sits at its own key.
func FuzzEtcdWatchMessage(f *testing.F) {
	for _, s := range []string{watchCreated, watchPut, watchDelete, watchCompacted, watchStreamErr} {
		f.Add([]byte(s))
	}
	const prefix = "/micro/registry/"
	f.Fuzz(func(t *testing.T, line []byte) {
		m, err := parseWatchMessage(line)
		if err != nil || m.Result == nil {
			return
		}
		ch := watchChanges(prefix, m.Result.Events)
		for _, r := range ch.upserts {
			s := Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}
			if err := normalizeService(&s); err != nil {
				t.Fatalf("invalid record %+v out of %q: %v", r, line, err)
			}
			v, err := etcdValue(r)
			if err != nil {
				t.Fatal(err)
			}
			back, err := parseEtcdEntry(prefix, []byte(etcdKey(prefix, r)), v)
			if err != nil || !back.same(r) {
				t.Fatalf("record %+v does not round-trip: %+v, %v", r, back, err)
			}
		}
	})
}

func TestShouldFailOver(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want bool
	}{
		{&net.OpError{Op: "dial", Err: errors.New("connection refused")}, true},
		{io.ErrUnexpectedEOF, true},
		{context.DeadlineExceeded, true},
		{&etcdError{Code: grpcUnavailable, HTTP: 503, Message: "etcdserver: no leader"}, true},
		{&etcdError{Code: grpcDeadlineExceeded, Message: "etcdserver: request timed out"}, true},
		{&etcdError{HTTP: 502, Message: "bad gateway"}, true},
		{&etcdError{Code: grpcCanceled, HTTP: 408, Message: "grpc: the client connection is closing"}, true}, // a member shutting down
		{&etcdError{Code: grpcNotFound, HTTP: 404, Message: "etcdserver: requested lease not found"}, false},
		{&etcdError{Code: 3, HTTP: 400, Message: "etcdserver: authentication failed"}, false},
		{&etcdError{Code: grpcOutOfRange, HTTP: 400, Message: "etcdserver: mvcc: required revision has been compacted"}, false},
		{&etcdError{HTTP: 404, Message: "404 page not found"}, true}, // a member without its gateway
		{fmt.Errorf("wrapped: %w", &etcdError{Code: grpcUnavailable}), true},
	} {
		if got := shouldFailOver(tc.err); got != tc.want {
			t.Errorf("shouldFailOver(%v) = %v; want %v", tc.err, got, tc.want)
		}
	}
}

func TestRotation(t *testing.T) {
	for _, tc := range []struct {
		n, start int
		want     string
	}{
		{1, 0, "[0]"}, {3, 0, "[0 1 2]"}, {3, 1, "[1 2 0]"}, {3, 2, "[2 0 1]"},
	} {
		if got := fmt.Sprint(rotation(tc.n, tc.start)); got != tc.want {
			t.Errorf("rotation(%d, %d) = %s; want %s", tc.n, tc.start, got, tc.want)
		}
	}
}

func TestParseEtcdEndpoints(t *testing.T) {
	for _, tc := range []struct {
		in, want, err string
	}{
		{"http://127.0.0.1:2379", "[http://127.0.0.1:2379]", ""},
		{"http://a:2379, https://b:2379/", "[http://a:2379 https://b:2379]", ""},
		{"http://[::1]:2379", "[http://[::1]:2379]", ""},
		{"127.0.0.1:2379", "", "want etcd client URLs"},
		{"http://a", "", "name the port"},
		{"http://127.0.0.1:", "", "name the port, e.g. http://127.0.0.1:2379"},
		{"http://127.0.0.1:0", "", "port must be 1-65535"},
		{"http://127.0.0.1:99999", "", "port must be 1-65535"},
		{"http://u:p@a:2379", "", "credentials go in"},
		{"http://a:2379/v3", "", "scheme://host:port only"},
		{" , ", "", "is empty"},
	} {
		got, err := parseEtcdEndpoints(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("parseEtcdEndpoints(%q): %v; want an error containing %q", tc.in, err, tc.err)
			}
			if err != nil && strings.Contains(err.Error(), ":p@") {
				t.Errorf("parseEtcdEndpoints(%q): the error shows the password: %v", tc.in, err)
			}
			continue
		}
		if err != nil || fmt.Sprint(got) != tc.want {
			t.Errorf("parseEtcdEndpoints(%q) = %v, %v; want %s", tc.in, got, err, tc.want)
		}
	}
}

func TestEtcdFlags(t *testing.T) {
	env := func(string) (string, bool) { return "", false }
	cfg, err := parseSidecarFlags([]string{"--registry=etcd", "--registry_prefix=/svc"}, io.Discard, env)
	if err != nil || fmt.Sprint(cfg.Etcd.Endpoints) != "[http://127.0.0.1:2379]" || cfg.Etcd.Prefix != "/svc/" {
		t.Errorf("defaults: %+v %v; want http://127.0.0.1:2379 and prefix /svc/", cfg.Etcd, err)
	}
	cfg, err = parseSidecarFlags([]string{"--registry=etcd", "--registry_username=u"}, io.Discard,
		func(k string) (string, bool) { return "pw", k == "MICRO_REGISTRY_PASSWORD" })
	if err != nil || cfg.Etcd.Password != "pw" {
		t.Errorf("MICRO_REGISTRY_PASSWORD: %q %v", cfg.Etcd.Password, err)
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--registry=etcd", "--registry_address=etcd:2379"}, "want etcd client URLs"},
		{[]string{"--registry=etcd", "--registry_prefix=micro"}, "--registry_prefix"},
		{[]string{"--registry=etcd", "--registry_password=x"}, "needs --registry_username"},
		{[]string{"--registry=etcd", "--registry_tls_cert=/c.pem"}, "go together"},
		{[]string{"--registry=etcd", "--registry_tls_ca=/nonexistent/ca.pem"}, "--registry_tls_ca"},
	} {
		if _, err := parseSidecarFlags(tc.args, io.Discard, env); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: %v; want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// fakeGateway is an etcd gateway stand-in for client tests: it answers
// /v3/kv/range with an empty result, or with the error its mode says.
type fakeGateway struct {
	srv   *httptest.Server
	hits  atomic.Int32
	mode  atomic.Value // "ok", "unavailable", "invalid"
	token atomic.Value // required Authorization; "" none
}

func newFakeGateway(t *testing.T) *fakeGateway {
	g := &fakeGateway{}
	g.mode.Store("ok")
	g.token.Store("")
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		g.hits.Add(1)
		if r.URL.Path == "/v3/auth/authenticate" {
			var req struct{ Name, Password string }
			json.NewDecoder(r.Body).Decode(&req)
			if req.Name != "u" || req.Password != "pw" {
				w.WriteHeader(400)
				io.WriteString(w, `{"error":"etcdserver: authentication failed, invalid user ID or password","message":"etcdserver: authentication failed, invalid user ID or password","code":3}`)
				return
			}
			tok := fmt.Sprintf("tok%d", g.hits.Load())
			g.token.Store(tok)
			fmt.Fprintf(w, `{"header":{},"token":%q}`, tok)
			return
		}
		if tok := g.token.Load().(string); tok != "" && r.Header.Get("Authorization") != tok {
			w.WriteHeader(401)
			io.WriteString(w, `{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}`)
			return
		}
		switch g.mode.Load().(string) {
		case "unavailable":
			w.WriteHeader(503)
			io.WriteString(w, `{"error":"etcdserver: no leader","message":"etcdserver: no leader","code":14}`)
		case "invalid":
			w.WriteHeader(400)
			io.WriteString(w, `{"error":"etcdserver: mvcc: required revision has been compacted","message":"etcdserver: mvcc: required revision has been compacted","code":11}`)
		default:
			io.WriteString(w, `{"header":{"revision":"5"}}`)
		}
	}))
	t.Cleanup(g.srv.Close)
	return g
}

// TestEtcdClientFailover: a call moves past a refused endpoint and one
// without a leader, sticks to the one that answered, and reports every
// endpoint when none does; an error about the request itself is not a
// reason to fail over.
func TestEtcdClientFailover(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := "http://" + ln.Addr().String()
	ln.Close()
	noLeader, good := newFakeGateway(t), newFakeGateway(t)
	noLeader.mode.Store("unavailable")
	c := newEtcdClient([]string{refused, noLeader.srv.URL, good.srv.URL}, nil, "", "", time.Second)
	var failed []int
	var mu sync.Mutex
	c.onFail = func(i int) { mu.Lock(); failed = append(failed, i); mu.Unlock() }
	ctx := context.Background()
	var resp etcdRangeResponse
	if err := c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, &resp); err != nil || resp.Header.Revision != 5 {
		t.Fatalf("call with two bad endpoints first: %+v, %v", resp, err)
	}
	if fmt.Sprint(failed) != "[0 1]" || fmt.Sprint(c.eps.order()) != "[2 0 1]" {
		t.Errorf("failed %v, order now %v; want [0 1] and [2 0 1]", failed, c.eps.order())
	}
	before := noLeader.hits.Load()
	for range 3 {
		if err := c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); err != nil {
			t.Fatal(err)
		}
	}
	if noLeader.hits.Load() != before || good.hits.Load() != 4 {
		t.Errorf("after failing over, calls must go straight to the good endpoint: bad %d, good %d hits", noLeader.hits.Load()-before, good.hits.Load())
	}

	good.mode.Store("invalid")
	err = c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil)
	var ee *etcdError
	if !errors.As(err, &ee) || ee.Code != grpcOutOfRange || errors.Is(err, errEtcdUnavailable) || noLeader.hits.Load() != before {
		t.Errorf("a request error: %v (other endpoints hit %d times); want the compaction error from the answering endpoint alone", err, noLeader.hits.Load()-before)
	}

	good.mode.Store("unavailable")
	err = c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil)
	if !errors.Is(err, errEtcdUnavailable) || !strings.Contains(err.Error(), refused) || !strings.Contains(err.Error(), "no leader") {
		t.Errorf("all down: %v; want errEtcdUnavailable naming each endpoint", err)
	}
	good.mode.Store("ok")
	if err := c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); err != nil {
		t.Errorf("after recovery: %v", err)
	}
}

// TestEtcdClientAuth: the client authenticates before its first call and
// again when the token goes stale; a wrong password is reported as such.
func TestEtcdClientAuth(t *testing.T) {
	g := newFakeGateway(t)
	g.token.Store("required")
	c := newEtcdClient([]string{g.srv.URL}, nil, "u", "pw", time.Second)
	ctx := context.Background()
	if err := c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); err != nil {
		t.Fatalf("first call: %v", err)
	}
	first := c.token
	g.token.Store("rotated") // the server forgot the token
	if err := c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); err != nil {
		t.Fatalf("call with a stale token: %v", err)
	}
	if c.token == first || c.token == "" {
		t.Errorf("token %q after it went stale; want a new one", c.token)
	}
	bad := newEtcdClient([]string{g.srv.URL}, nil, "u", "nope", time.Second)
	err := bad.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil)
	if err == nil || !strings.Contains(err.Error(), `authenticating as "u"`) || strings.Contains(err.Error(), "nope") || !errors.Is(err, errEtcdCredentials) {
		t.Errorf("wrong password: %v; want an authentication error, told from an unreachable etcd, without the password", err)
	}

	// A refusal is held: further calls fail with it without asking etcd
	// again, until it lapses; each further refusal is held twice as long.
	hits := g.hits.Load()
	for range 3 {
		if err := bad.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); !errors.Is(err, errEtcdCredentials) {
			t.Errorf("a call while the refusal is held: %v; want it", err)
		}
	}
	if n := g.hits.Load() - hits; n != 0 {
		t.Errorf("etcd was asked %d times while a refusal of the credentials was held; want none", n)
	}
	lapse := func() {
		bad.mu.Lock()
		bad.refusal.until = time.Now().Add(-time.Millisecond)
		bad.mu.Unlock()
	}
	lapse()
	if err := bad.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); !errors.Is(err, errEtcdCredentials) || g.hits.Load() != hits+1 {
		t.Errorf("once the refusal lapsed: %v, %d requests; want the credentials tried once more, and refused", err, g.hits.Load()-hits)
	}
	if bad.refusal.hold != 2*credRetryMin {
		t.Errorf("the second refusal is held %v; want %v", bad.refusal.hold, 2*credRetryMin)
	}
	bad.password = "pw" // corrected in etcd, as it were
	lapse()
	if err := bad.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte("k")}, nil); err != nil || bad.refusal.err != nil {
		t.Errorf("the credentials accepted once the refusal lapsed: %v (refusal %v); want a call, and the refusal forgotten", err, bad.refusal.err)
	}
}

// newTestEtcdBackend runs the backend in this process against endpoints.
func newTestEtcdBackend(t *testing.T, endpoints ...string) (*etcdBackend, *table, *syncBuffer) {
	t.Helper()
	logs := &syncBuffer{}
	tb := newTable(1000)
	b, err := newEtcdBackend(context.Background(), etcdConfig{Endpoints: endpoints, Prefix: defaultEtcdPrefix, SyncWait: 5 * time.Second},
		tb, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.close() })
	return b, tb, logs
}

func regOf(b *etcdBackend, key string) etcdReg {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.regs[key]
}

func tableHas(tb *table, service, id string) bool {
	ss, err := tb.lookup(service, time.Now())
	if err != nil {
		return false
	}
	for _, s := range ss {
		if hasNode(&s, id) {
			return true
		}
	}
	return false
}

// TestEtcdBackendReadsAfreshAfterABreak: a watch cut off reads the
// registry afresh when it is back, and sees what changed meanwhile,
// whether or not the revision it had reached was compacted (see
// TestEtcdRecreatedWithTheSameFlags for why it does not resume there).
func TestEtcdBackendReadsAfreshAfterABreak(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	b, tb, logs := newTestEtcdBackend(t, g.srv.URL)
	svc := func(name, id string) string {
		return fmt.Sprintf(`{"name":%q,"nodes":[{"id":%q,"address":"127.0.0.1","port":1}]}`, name, id)
	}
	e.put(t, "/micro/registry/a/a1", svc("a", "a1"))
	waitFor(t, 5*time.Second, "a1 through the watch", func() bool { return tableHas(tb, "a", "a1") })

	for breaks, compact := range []bool{false, true} {
		g.setDown(true)
		waitFor(t, 5*time.Second, "status to report the cut", func() bool { return b.status() != nil })
		name := fmt.Sprintf("during-%v", compact)
		e.put(t, "/micro/registry/"+name+"/n1", svc(name, "n1"))
		if err := e.gw("/v3/kv/deleterange", map[string]string{"key": b64("/micro/registry/a/a1")}, nil); err != nil {
			t.Fatal(err)
		}
		e.put(t, "/micro/registry/a/a1", svc("a", "a1"))
		if compact {
			var h etcdHeaderOnly
			e.gw("/v3/kv/range", map[string]string{"key": b64("x")}, &h)
			if err := e.gw("/v3/kv/compaction", map[string]string{"revision": fmt.Sprint(int64(h.Header.Revision))}, nil); err != nil {
				t.Fatal(err)
			}
		}
		if tableHas(tb, name, "n1") {
			t.Fatal("the table changed while cut off from etcd")
		}
		g.setDown(false)
		waitFor(t, 10*time.Second, "the change made while cut off", func() bool { return tableHas(tb, name, "n1") && b.status() == nil })
		if !tableHas(tb, "a", "a1") {
			t.Error("a1, deleted and put again while cut off, is missing")
		}
		if n, want := strings.Count(logs.String(), "reading the registry afresh"), breaks+1; n != want {
			t.Errorf("compacted %v: read afresh logged %d times for %d breaks; log:\n%s", compact, n, want, logs.String())
		}
	}
}

// TestEtcdPutLostInFlight: a put that etcd applies but never answers, with
// the revoke that would undo it lost too, is reported as what it may be:
// done, and lapsing within its TTL.
func TestEtcdPutLostInFlight(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	b, err := newEtcdBackend(context.Background(), etcdConfig{Endpoints: []string{g.srv.URL}, Prefix: defaultEtcdPrefix, SyncWait: 5 * time.Second, RequestTimeout: 2 * time.Second}, // long enough for the calls not held (a grant waits for etcd's fsync)
		newTable(1000), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.close() })
	g.hold.Store("/v3/kv/put", holdApplied)
	g.hold.Store("/v3/lease/revoke", holdDropped)
	s := Service{Name: "late", Metadata: map[string]string{}, Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 1, Metadata: map[string]string{}}}}
	err = b.register(s, 10*time.Second)
	if err == nil || !strings.Contains(err.Error(), "etcd may still apply it, and the entry would then lapse within 10s") {
		t.Fatalf("register with the put unanswered: %v; want the error to say it may be applied", err)
	}
	waitFor(t, 5*time.Second, "the unanswered put to be in etcd", func() bool { return len(e.keys(t, "/micro/registry/late/")) == 1 })
	g.hold.Delete("/v3/lease/revoke")
	g.hold.Store("/v3/kv/put", holdDropped)
	if err := b.register(s, 10*time.Second); err == nil || strings.Contains(err.Error(), "may still apply") {
		t.Errorf("a put that never reached etcd, revoked after: %v; want a plain error", err)
	}
}

// TestEtcdBackendLeases: a refresh keeps the lease alive with one request;
// a lost lease or key is granted and put again; a changed TTL gets a new
// lease; deregister revokes.
func TestEtcdBackendLeases(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	b, tb, _ := newTestEtcdBackend(t, g.srv.URL)
	s := Service{Name: "svc", Metadata: map[string]string{}, Nodes: []Node{{ID: "n1", Address: "127.0.0.1", Port: 1, Metadata: map[string]string{}}}}
	key := "/micro/registry/svc/n1"
	if err := b.register(s, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	lease := regOf(b, key).lease
	before := g.snapshot()
	if err := b.register(s, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	after := g.snapshot()
	if after["/v3/lease/keepalive"]-before["/v3/lease/keepalive"] != 1 || after["/v3/kv/put"] != before["/v3/kv/put"] || after["/v3/lease/grant"] != before["/v3/lease/grant"] {
		t.Errorf("a refresh: requests before %v after %v; want one keepalive and nothing else", before, after)
	}
	// Lost lease (as after etcd lost its data): granted and put again.
	if err := e.gw("/v3/lease/revoke", map[string]string{"ID": fmt.Sprint(lease)}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the revoked key to leave the table", func() bool { return !tableHas(tb, "svc", "n1") })
	if err := b.register(s, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := e.keys(t, key); len(got) != 1 || regOf(b, key).lease == lease {
		t.Errorf("after the lease was lost: keys %v, lease %d (was %d); want the key back on a new lease", got, regOf(b, key).lease, lease)
	}
	// Key deleted behind our back, lease alive: put again at the refresh.
	if err := e.gw("/v3/kv/deleterange", map[string]string{"key": b64(key)}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the deleted key to leave the table", func() bool { return !tableHas(tb, "svc", "n1") })
	if err := b.register(s, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := e.keys(t, key); len(got) != 1 {
		t.Errorf("after the key was deleted: keys %v; want it put again", got)
	}
	// A different TTL: a new lease, the old one revoked.
	old := regOf(b, key).lease
	if err := b.register(s, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	var ttl struct {
		TTL int64s `json:"TTL"`
	}
	e.gw("/v3/lease/timetolive", map[string]string{"ID": fmt.Sprint(old)}, &ttl)
	if regOf(b, key).lease == old || ttl.TTL != -1 {
		t.Errorf("TTL change: lease %d (was %d), old lease TTL %d; want a new lease and the old revoked (-1)", regOf(b, key).lease, old, ttl.TTL)
	}
	if err := b.deregister(s); err != nil {
		t.Fatal(err)
	}
	if got := e.keys(t, "/micro/registry/"); len(got) != 0 || tableHas(tb, "svc", "n1") {
		t.Errorf("after deregister: keys %v; want none, and none in the table", got)
	}
}

func TestWatchDoneRev(t *testing.T) {
	res := &etcdWatchResult{Events: []etcdEvent{{KV: etcdKV{ModRevision: 7}}, {KV: etcdKV{ModRevision: 9}}}}
	if got := watchDoneRev(res); got != 9 {
		t.Errorf("a whole message up to revision 9: done %d; want 9", got)
	}
	res.Fragment = true
	if got := watchDoneRev(res); got != 8 {
		t.Errorf("a piece ending in revision 9, more to come: done %d; want 8", got)
	}
}

// TestEtcdWatchCatchUpInFragments: a watch cut off while 1,200 revisions
// of 1 KB are written gets them all when it is back, and no message fails
// it for its size. It reads afresh after a break; a watch that starts
// behind (changes between that read and its start) asks etcd to send its
// catch-up in fragments, which etcd splits past its request limit plus
// 512 KiB: up to 1,000 revisions as one message failed the watch again and
// again.
func TestEtcdWatchCatchUpInFragments(t *testing.T) {
	e := startEtcd(t, "--max-request-bytes=8192")
	g := newGatewayProxy(t, e.client)
	b, tb, logs := newTestEtcdBackend(t, g.srv.URL)
	b.c.maxWatch = 1 << 20 // the catch-up below is 1.6 MB whole, pieces of 0.75 MB
	big := strings.Repeat("x", 1000)
	key := func(i int) string { return fmt.Sprintf("/micro/registry/big/n%d", i) }
	node := func(i int) string {
		return fmt.Sprintf(`{"name":"big","nodes":[{"id":"n%d","address":"127.0.0.1","port":1,"metadata":{"pad":%q}}]}`, i, big)
	}
	e.put(t, key(0), node(0))
	waitFor(t, 5*time.Second, "n0 through the watch", func() bool { return tableHas(tb, "big", "n0") })
	g.setDown(true)
	waitFor(t, 5*time.Second, "status to report the cut", func() bool { return b.status() != nil })
	// 200 entries put six times over: 1,200 revisions of 1 KB.
	const n = 200
	for round := 0; round < 6; round++ {
		for i := 1; i <= n; i += 5 { // five to a transaction, within etcd's request limit
			var ops []map[string]any
			for j := i; j < i+5; j++ {
				ops = append(ops, map[string]any{"request_put": map[string]string{"key": b64(key(j)), "value": b64(node(j))}})
			}
			if err := e.gw("/v3/kv/txn", map[string]any{"success": ops}, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	g.setDown(false)
	waitFor(t, 10*time.Second, "the entries put while cut off", func() bool {
		for i := 1; i <= n; i++ {
			if !tableHas(tb, "big", fmt.Sprint("n", i)) {
				return false
			}
		}
		return true
	})
	if strings.Contains(logs.String(), "token too long") {
		t.Errorf("the watch failed on a long message:\n%s", logs.String())
	}
}

// TestEtcdResyncPagesLargeValues: a page of the registry larger than an
// answer may be is asked for again in smaller pages, not given up on.
func TestEtcdResyncPagesLargeValues(t *testing.T) {
	e := startEtcd(t)
	b, tb, _ := newTestEtcdBackend(t, e.client)
	big := strings.Repeat("x", 1000) // within a metadata field's limit
	for i := range 40 {
		e.put(t, fmt.Sprintf("/micro/registry/big/n%d", i),
			fmt.Sprintf(`{"name":"big","nodes":[{"id":"n%d","address":"127.0.0.1","port":1,"metadata":{"pad":%q}}]}`, i, big))
	}
	b.c.maxReply = 16 << 10 // a few entries to an answer
	if _, err := b.resync(context.Background()); err != nil {
		t.Fatalf("resync with 40 entries of 1 KB and answers of 16 KB: %v", err)
	}
	for i := range 40 {
		if !tableHas(tb, "big", fmt.Sprint("n", i)) {
			t.Fatalf("n%d missing after the resync", i)
		}
	}
}

// TestEscapedMetadataIsReadBack: a registration at the metadata limits,
// every byte of which JSON escapes, is stored so that sidecars read it
// back: escaped for HTML, < and > took six bytes each, and such an entry
// was refused by every reader, the writer included.
func TestEscapedMetadataIsReadBack(t *testing.T) {
	for _, fill := range []string{"<", "\x01"} {
		md := map[string]string{}
		for i := range maxMetadata {
			key := fmt.Sprintf("k%02d", i)
			md[key] = strings.Repeat(fill, maxMetadataLen-len(key))
		}
		s := Service{Name: "big", Metadata: md, Nodes: []Node{{ID: "big-1", Address: "127.0.0.1", Port: 9000, Metadata: md}}}
		if err := normalizeService(&s); err != nil {
			t.Fatalf("the API refuses it: %v", err)
		}
		rec := recordsOf(s, time.Time{})[0]
		value, err := etcdValue(rec)
		if err != nil {
			t.Fatalf("%q: %v", fill, err)
		}
		got, err := parseEtcdEntry(defaultEtcdPrefix, []byte(etcdKey(defaultEtcdPrefix, rec)), value)
		if err != nil || !got.same(rec) {
			t.Errorf("metadata of %q: the stored %d bytes read back as %v; want the record", fill, len(value), err)
		}
	}
}

// TestAccessRefusalIsNoUnreachableEtcd: an etcd that answers that this
// sidecar may not read the prefix (no user given, a user without a role)
// is said to refuse access, not to be unreachable.
func TestAccessRefusalIsNoUnreachableEtcd(t *testing.T) {
	for _, err := range []error{
		&etcdError{Code: grpcPermissionDenied, HTTP: 403, Message: "etcdserver: permission denied"},
		&etcdError{Code: grpcInvalidArgument, HTTP: 400, Message: "etcdserver: user name is empty"},
	} {
		var logs syncBuffer
		b := &etcdBackend{log: slog.New(slog.NewTextHandler(&logs, nil))}
		b.watchDown(context.Background(), fmt.Errorf("etcd range /micro/registry/: %w", err))
		if out := logs.String(); !strings.Contains(out, "refuses this sidecar access") || strings.Contains(out, "unreachable") {
			t.Errorf("%v: logged\n%s\nwant an access refusal", err, out)
		}
	}
	if isAccessRefusal(&etcdError{Code: grpcInvalidArgument, Message: "etcdserver: key is not provided"}) {
		t.Error("a malformed request taken for an access refusal")
	}
}

// TestFailedDeleteOfAnothersNodeKeepsIt: a DELETE of a node another sidecar
// put, while etcd does not answer, fails (503) and leaves the node where it
// is, here as on every other sidecar; a node this sidecar put leaves its
// table at once, its lease running out in etcd.
func TestFailedDeleteOfAnothersNodeKeepsIt(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	b, tb, _ := newTestEtcdBackend(t, g.srv.URL)
	e.put(t, "/micro/registry/theirs/t1", `{"name":"theirs","nodes":[{"id":"t1","address":"127.0.0.1","port":1}]}`)
	ours := Service{Name: "ours", Nodes: []Node{{ID: "o1", Address: "127.0.0.1", Port: 2}}}
	if err := b.register(ours, time.Minute); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "theirs through the watch", func() bool { return tableHas(tb, "theirs", "t1") })
	g.setDown(true)
	if err := b.deregister(Service{Name: "theirs", Nodes: []Node{{ID: "t1"}}}); err == nil {
		t.Fatal("a delete with etcd down succeeded")
	}
	if !tableHas(tb, "theirs", "t1") {
		t.Error("another's node left this sidecar's table on a failed delete")
	}
	b.deregister(ours)
	if tableHas(tb, "ours", "o1") {
		t.Error("our own node stayed in the table while its lease runs out")
	}
}

// TestWatchDownLogsANewReason: a registry that stays out of sync logs
// again when the reason changes (unreachable while etcd restarts, then
// refused access), and not again for the same reason.
func TestWatchDownLogsANewReason(t *testing.T) {
	var log syncBuffer
	b := &etcdBackend{log: slog.New(slog.NewTextHandler(&log, nil))}
	ctx := context.Background()
	unreachable := fmt.Errorf("etcd range: %w", errEtcdUnavailable)
	refused := &etcdError{Code: grpcInvalidArgument, HTTP: 400, Message: "etcdserver: user name is empty"}
	for _, err := range []error{unreachable, unreachable, refused, refused} {
		b.watchDown(ctx, err)
	}
	got := log.String()
	if strings.Count(got, "unreachable") != 1 || strings.Count(got, "refuses this sidecar access") != 1 {
		t.Errorf("log: %s; want one line for each reason", got)
	}
}

// appliedRev is the revision of etcd b's table holds.
func appliedRev(b *etcdBackend) int64 {
	b.applyMu.Lock()
	defer b.applyMu.Unlock()
	return b.applied
}

// TestEtcdWriteRacingOthersKeepsTheirChanges: a registration or
// deregistration of several nodes puts its result in this sidecar's table
// as it returns, for its caller to read its writes; a node another writer
// changed in between, already in the table through the watch, keeps that
// change. A DELETE of nodes another sidecar keeps lost their put back
// here (for good: a kept node is not written again), and a POST with
// ?ttl= brought back a node deleted meanwhile (for its TTL).
func TestEtcdWriteRacingOthersKeepsTheirChanges(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	b, tb, _ := newTestEtcdBackend(t, g.srv.URL)
	value := func(id string) string {
		return fmt.Sprintf(`{"name":"race","nodes":[{"id":%q,"address":"127.0.0.1","port":1}]}`, id)
	}
	nodes := []Node{{ID: "n1", Address: "127.0.0.1", Port: 1, Metadata: map[string]string{}}, {ID: "n2", Address: "127.0.0.1", Port: 1, Metadata: map[string]string{}}}
	s := Service{Name: "race", Metadata: map[string]string{}, Nodes: nodes}
	// others does what another writer does to n1 in etcd, and waits for
	// the watch to bring it to the table.
	others := func(path string, req any) func(int) {
		return func(n int) {
			if n != 2 { // between this sidecar's writes of n1 and n2
				return
			}
			var resp etcdHeaderOnly
			if err := e.gw(path, req, &resp); err != nil {
				t.Error(err)
				return
			}
			waitFor(t, 5*time.Second, "the watch to apply the other writer's change", func() bool { return appliedRev(b) >= int64(resp.Header.Revision) })
		}
	}

	// Another sidecar, keeping n1, puts it back as soon as it sees it deleted.
	for _, n := range nodes {
		e.put(t, "/micro/registry/race/"+n.ID, value(n.ID))
	}
	waitFor(t, 5*time.Second, "both nodes in the table", func() bool { return tableHas(tb, "race", "n1") && tableHas(tb, "race", "n2") })
	g.before.Store("/v3/kv/deleterange", others("/v3/kv/put", map[string]string{"key": b64("/micro/registry/race/n1"), "value": b64(value("n1"))}))
	if err := b.deregister(s); err != nil {
		t.Fatal(err)
	}
	g.before.Delete("/v3/kv/deleterange")
	if !tableHas(tb, "race", "n1") || tableHas(tb, "race", "n2") {
		t.Errorf("after a DELETE of n1 and n2, with n1 put back meanwhile: n1 %v, n2 %v; want n1 alone", tableHas(tb, "race", "n1"), tableHas(tb, "race", "n2"))
	}

	// Another sidecar deletes n1 as this one registers both with a TTL.
	e.gw("/v3/kv/deleterange", map[string]string{"key": b64("/micro/registry/race/n1")}, nil)
	waitFor(t, 5*time.Second, "n1 gone", func() bool { return !tableHas(tb, "race", "n1") })
	g.before.Store("/v3/kv/put", others("/v3/kv/deleterange", map[string]string{"key": b64("/micro/registry/race/n1")}))
	if err := b.register(s, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	g.before.Delete("/v3/kv/put")
	if tableHas(tb, "race", "n1") || !tableHas(tb, "race", "n2") {
		t.Errorf("after a POST of n1 and n2, with n1 deleted meanwhile: n1 %v, n2 %v; want n2 alone, as etcd has it", tableHas(tb, "race", "n1"), tableHas(tb, "race", "n2"))
	}
	if got := e.keys(t, "/micro/registry/race/"); len(got) != 1 {
		t.Errorf("etcd holds %q; want n2 alone", got)
	}
}
