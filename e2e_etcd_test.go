package main

// End-to-end tests of the etcd registry: they start Debian's etcd-server
// (/usr/bin/etcd) on loopback ports with data under t.TempDir(), and drive
// the built sidecar binary against it.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// etcdBin finds the etcd server, skipping the test when it is missing.
func etcdBin(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("etcd"); err == nil {
		return p
	}
	if _, err := os.Stat("/usr/bin/etcd"); err == nil {
		return "/usr/bin/etcd"
	}
	t.Skip("etcd is not installed (apt-get install etcd-server, as .ci/run does); skipping the etcd end-to-end test")
	return ""
}

// freePort returns a loopback port nobody listens on right now. It is
// taken from below the kernel's ephemeral range: a port from 127.0.0.1:0
// is free only until the kernel hands it to the next test's listener or
// outgoing connection, and etcd binds it a moment later (CI once saw
// "bind: address already in use"). Below that range only fixed-port
// binders compete, and within this process nextFixedPort never repeats.
func freePort(t *testing.T) int {
	t.Helper()
	for range 2000 {
		port := nextFixedPort()
		if port == 0 {
			break
		}
		ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err == nil {
			ln.Close()
			return port
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

var fixedPorts struct {
	sync.Mutex
	next, end int
}

// nextFixedPort hands out ports just below the ephemeral range, once each;
// 0 when none are left or the range is unknown.
func nextFixedPort() int {
	fixedPorts.Lock()
	defer fixedPorts.Unlock()
	if fixedPorts.end == 0 {
		fixedPorts.end = ephemeralLow()
		fixedPorts.next = max(fixedPorts.end-10000, 1024) + int(time.Now().UnixNano()%5000)
	}
	if fixedPorts.next >= fixedPorts.end {
		return 0
	}
	fixedPorts.next++
	return fixedPorts.next - 1
}

// ephemeralLow reads the low end of Linux's ephemeral port range.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	var low, high int
	if _, err := fmt.Sscan(string(b), &low, &high); err != nil || low <= 2048 {
		return 0
	}
	return low
}

// etcdMember is one etcd process of a test cluster, all on loopback.
type etcdMember struct {
	t          *testing.T
	name, dir  string
	client     string // http://127.0.0.1:port
	peer       string
	cluster    string // --initial-cluster
	token      string
	extraFlags []string
	hc         *http.Client // for https members; nil: http.DefaultClient

	mu   sync.Mutex // guards cmd, done, log
	cmd  *exec.Cmd
	done chan struct{}
	log  *syncBuffer
}

// newEtcdCluster describes n members with fresh ports and data dirs; start
// them with startAll.
func newEtcdCluster(t *testing.T, n int, extraFlags ...string) []*etcdMember {
	t.Helper()
	etcdBin(t)
	var ms []*etcdMember
	var parts []string
	token := fmt.Sprintf("micro-test-%d", time.Now().UnixNano())
	for i := range n {
		scheme := "http"
		if len(extraFlags) > 0 && containsFlag(extraFlags, "--cert-file") {
			scheme = "https"
		}
		m := &etcdMember{
			t:          t,
			name:       fmt.Sprintf("m%d", i),
			dir:        filepath.Join(t.TempDir(), fmt.Sprintf("m%d.etcd", i)),
			client:     fmt.Sprintf("%s://127.0.0.1:%d", scheme, freePort(t)),
			peer:       fmt.Sprintf("http://127.0.0.1:%d", freePort(t)),
			token:      token,
			extraFlags: extraFlags,
		}
		parts = append(parts, m.name+"="+m.peer)
		ms = append(ms, m)
	}
	for _, m := range ms {
		m.cluster = strings.Join(parts, ",")
	}
	t.Cleanup(func() {
		for _, m := range ms {
			m.kill()
		}
	})
	return ms
}

func containsFlag(flags []string, prefix string) bool {
	for _, f := range flags {
		if strings.HasPrefix(f, prefix) {
			return true
		}
	}
	return false
}

// startEtcd runs a one-member cluster and waits until it serves.
func startEtcd(t *testing.T, extraFlags ...string) *etcdMember {
	t.Helper()
	m := newEtcdCluster(t, 1, extraFlags...)[0]
	m.start("new")
	m.waitHealthy()
	return m
}

func startAll(ms []*etcdMember) {
	for _, m := range ms {
		m.start("new")
	}
	for _, m := range ms {
		m.waitHealthy()
	}
}

// start runs the member; state is etcd's --initial-cluster-state.
func (m *etcdMember) start(state string) {
	m.t.Helper()
	args := []string{
		"--name", m.name, "--data-dir", m.dir,
		"--listen-client-urls", m.client, "--advertise-client-urls", m.client,
		"--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
		"--initial-cluster", m.cluster, "--initial-cluster-state", state,
		"--initial-cluster-token", m.token,
		"--logger", "zap", "--log-level", "warn",
	}
	cmd := exec.Command(etcdBin(m.t), append(args, m.extraFlags...)...)
	log := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		m.t.Fatalf("starting etcd: %v", err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	m.mu.Lock()
	m.cmd, m.done, m.log = cmd, done, log
	m.mu.Unlock()
	m.t.Cleanup(func() {
		if m.t.Failed() {
			m.t.Logf("etcd %s log:\n%s", m.name, truncate(log.String(), 8000))
		}
	})
}

// waitHealthy waits until the member answers its /health with true.
func (m *etcdMember) waitHealthy() {
	m.t.Helper()
	hc := m.httpClient()
	waitFor(m.t, 20*time.Second, "etcd "+m.name+" to be healthy", func() bool {
		resp, err := hc.Get(m.client + "/health")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		var h struct{ Health string }
		json.NewDecoder(resp.Body).Decode(&h)
		return h.Health == "true"
	})
}

// httpClient talks to the member.
func (m *etcdMember) httpClient() *http.Client {
	if m.hc != nil {
		return m.hc
	}
	return http.DefaultClient
}

// stop ends the member with sig and waits.
func (m *etcdMember) stop(sig syscall.Signal) {
	m.t.Helper()
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.mu.Unlock()
	if cmd == nil {
		return
	}
	cmd.Process.Signal(sig)
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		m.t.Fatalf("etcd %s did not exit within 20s of %v", m.name, sig)
	}
}

func (m *etcdMember) kill() {
	m.mu.Lock()
	cmd, done := m.cmd, m.done
	m.mu.Unlock()
	if cmd != nil {
		cmd.Process.Kill()
		<-done
	}
}

// gw posts to the member's gateway and decodes the answer.
func (m *etcdMember) gw(path string, req, resp any) error {
	body, _ := json.Marshal(req)
	r, err := m.httpClient().Post(m.client+path, "application/json", strings.NewReader(string(body)))
	if err != nil {
		return err
	}
	defer r.Body.Close()
	if r.StatusCode != 200 {
		var e map[string]any
		json.NewDecoder(r.Body).Decode(&e)
		return fmt.Errorf("%s: %d %v", path, r.StatusCode, e)
	}
	if resp != nil {
		return json.NewDecoder(r.Body).Decode(resp)
	}
	return nil
}

type gatewayCall struct {
	path string
	req  any
}

// enableAuth turns etcd's authentication on, with a root user.
func (m *etcdMember) enableAuth(t *testing.T) {
	t.Helper()
	for _, step := range []gatewayCall{
		{"/v3/auth/user/add", map[string]string{"name": "root", "password": "rootpw"}},
		{"/v3/auth/role/add", map[string]string{"name": "root"}},
		{"/v3/auth/user/grant", map[string]string{"user": "root", "role": "root"}},
		{"/v3/auth/enable", map[string]string{}},
	} {
		if err := m.gw(step.path, step.req, nil); err != nil {
			t.Fatalf("turning authentication on: %v", err)
		}
	}
}

func (m *etcdMember) put(t *testing.T, key, value string) {
	t.Helper()
	if err := m.gw("/v3/kv/put", map[string]string{"key": b64(key), "value": b64(value)}, nil); err != nil {
		t.Fatalf("etcd put %s: %v", key, err)
	}
}

// keys lists the keys under prefix.
func (m *etcdMember) keys(t *testing.T, prefix string) []string {
	t.Helper()
	var resp etcdRangeResponse
	if err := m.gw("/v3/kv/range", etcdRangeRequest{Key: []byte(prefix), RangeEnd: prefixEnd(prefix)}, &resp); err != nil {
		t.Fatalf("etcd range: %v", err)
	}
	var out []string
	for _, kv := range resp.KVs {
		out = append(out, string(kv.Key))
	}
	return out
}

func b64(s string) string { return base64.StdEncoding.EncodeToString([]byte(s)) }

func clientURLs(ms ...*etcdMember) string {
	var u []string
	for _, m := range ms {
		u = append(u, m.client)
	}
	return strings.Join(u, ",")
}

// gatewayProxy stands between sidecars and etcd: it counts the requests by
// path, and can be cut (every request and open stream fails as if the
// network went away) and restored.
type gatewayProxy struct {
	srv  *httptest.Server
	down atomic.Bool
	hold sync.Map // path -> holdApplied or holdDropped: no answer until the client gives up
	// before maps a path to a func(n int) run before its n-th request
	// (from 1) is passed on: what others do in etcd meanwhile.
	before sync.Map

	mu      sync.Mutex // guards counts, streams
	counts  map[string]int
	streams map[*http.Request]context.CancelFunc
}

func newGatewayProxy(t *testing.T, target string) *gatewayProxy {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	g := &gatewayProxy{counts: map[string]int{}, streams: map[*http.Request]context.CancelFunc{}}
	rp := httputil.NewSingleHostReverseProxy(u)
	rp.FlushInterval = -1 // pass the watch stream through as it comes
	rp.ErrorLog = nil
	g.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if g.down.Load() {
			if hj, ok := w.(http.Hijacker); ok {
				if c, _, err := hj.Hijack(); err == nil {
					c.Close()
					return
				}
			}
			http.Error(w, "down", http.StatusBadGateway)
			return
		}
		if how, ok := g.hold.Load(r.URL.Path); ok {
			if how == holdApplied { // etcd does it; the answer never comes back
				rp.ServeHTTP(httptest.NewRecorder(), r.WithContext(context.WithoutCancel(r.Context())))
			}
			io.Copy(io.Discard, r.Body) // so that the server notices the client giving up
			<-r.Context().Done()
			return
		}
		ctx, cancel := context.WithCancel(r.Context())
		r = r.WithContext(ctx)
		g.mu.Lock()
		g.counts[r.URL.Path]++
		n := g.counts[r.URL.Path]
		g.mu.Unlock()
		if f, ok := g.before.Load(r.URL.Path); ok {
			f.(func(int))(n)
		}
		g.mu.Lock()
		g.streams[r] = cancel
		g.mu.Unlock()
		defer func() {
			g.mu.Lock()
			delete(g.streams, r)
			g.mu.Unlock()
			cancel()
		}()
		rp.ServeHTTP(w, r)
	}))
	t.Cleanup(func() { g.setDown(true); g.srv.CloseClientConnections(); g.srv.Close() })
	return g
}

// How the proxy holds a call to a path (gatewayProxy.hold).
const (
	holdApplied = "applied" // passed on to etcd
	holdDropped = "dropped" // never reaches etcd
)

// setDown cuts or restores the proxy; cutting ends every open stream.
func (g *gatewayProxy) setDown(down bool) {
	g.down.Store(down)
	if !down {
		return
	}
	g.mu.Lock()
	for _, cancel := range g.streams {
		cancel()
	}
	g.mu.Unlock()
	g.srv.CloseClientConnections()
}

func (g *gatewayProxy) snapshot() map[string]int {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := make(map[string]int, len(g.counts))
	for k, v := range g.counts {
		out[k] = v
	}
	return out
}

// healthOf returns the sidecar's /health status code and registry error.
func healthOf(t *testing.T, p *proc) (int, string) {
	t.Helper()
	code, body := do(t, "GET", p.url("/health"), "", "")
	var rep healthReport
	json.Unmarshal([]byte(body), &rep)
	return code, rep.Sidecar.RegistryError
}

// waitHealthy waits until the sidecar's /health is 200.
func waitSidecarHealthy(t *testing.T, p *proc, timeout time.Duration) {
	t.Helper()
	waitFor(t, timeout, p.addr+" /health to be 200", func() bool { c, _ := healthOf(t, p); return c == 200 })
}

// register posts a service with one node to a sidecar.
func registerNode(t *testing.T, p *proc, query, name, id string, port int) {
	t.Helper()
	registerAddrQuery(t, p, query, name, id, fmt.Sprintf("127.0.0.1:%d", port))
}

func etcdSidecarArgs(endpoints string, extra ...string) []string {
	return append([]string{"--registry=etcd", "--registry_address=" + endpoints}, extra...)
}

// TestEtcdSidecarsDiscoverEachOther: three sidecars on one etcd see each
// other's apps and hand-registered services (names with ':' too); SIGKILL
// takes an app away when its lease runs out, SIGTERM at once.
func TestEtcdSidecarsDiscoverEachOther(t *testing.T) {
	e := startEtcd(t)
	const ttl = 2 * time.Second
	var ps []*proc
	var ids []string
	for i := range 3 {
		p := startSidecar(t, etcdSidecarArgs(e.client, "--register_ttl=2s", "--register_interval=500ms",
			fmt.Sprintf("--server_name=app%d", i), fmt.Sprintf("--server_address=127.0.0.1:%d", 9000+i))...)
		ps = append(ps, p)
		ids = append(ids, appID(t, p))
	}
	registerNode(t, ps[0], "", "topic:news", "news-1", 7001)
	for _, p := range ps {
		for i, id := range ids {
			waitFor(t, 5*time.Second, fmt.Sprintf("%s to see app%d", p.addr, i), func() bool { return hasNode(lookup(t, p, fmt.Sprintf("app%d", i)), id) })
		}
		waitFor(t, 5*time.Second, p.addr+" to see topic:news", func() bool { return hasNode(lookup(t, p, "topic:news"), "news-1") })
		if c, msg := healthOf(t, p); c != 200 {
			t.Errorf("%s /health: %d %s; want 200", p.addr, c, msg)
		}
	}
	if got := e.keys(t, "/micro/registry/"); len(got) != 4 || !strings.HasPrefix(got[3], "/micro/registry/topic:news/news-1") {
		t.Errorf("keys in etcd: %q; want <prefix><service>/<node id> for the 3 apps and topic:news", got)
	}

	start := time.Now()
	ps[1].stop(syscall.SIGKILL)
	waitFor(t, 10*time.Second, "the killed sidecar's app to expire", func() bool { return lookup(t, ps[0], "app1") == nil })
	took := time.Since(start)
	t.Logf("SIGKILL to disappearance: %v (TTL %v)", took.Round(10*time.Millisecond), ttl)
	// etcd checks lease expiry every 500ms and rounds TTLs up to its minimum.
	if took > ttl+2*time.Second {
		t.Errorf("app1 vanished %v after SIGKILL; want within the %v TTL and etcd's expiry check", took, ttl)
	}
	// The live apps outlasted the killed one's TTL: their leases are kept alive.
	for _, i := range []int{0, 2} {
		if !hasNode(lookup(t, ps[2-i], fmt.Sprintf("app%d", i)), ids[i]) {
			t.Errorf("live app%d lost after a TTL", i)
		}
	}

	if code := ps[2].stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status after SIGTERM: %d; want 0", code)
	}
	waitFor(t, 1*time.Second, "app2 to go at once after SIGTERM (lease revoked)", func() bool { return lookup(t, ps[0], "app2") == nil })
}

// TestEtcdBadDataSkipped: entries that are not service nodes, present at
// start or written later, are skipped and logged once each; good entries
// around them are served.
// TestEtcdPubSub: the broker's topic registrations ride on etcd, so a
// message published on one sidecar reaches subscribers on another, and the
// registration goes with the last subscriber.
func TestEtcdPubSub(t *testing.T) {
	e := startEtcd(t)
	a := startSidecar(t, etcdSidecarArgs(e.client)...)
	b := startSidecar(t, etcdSidecarArgs(e.client)...)
	sub := subscribeWS(t, b, "B", "topic=news")
	member := subscribeWS(t, b, "B.g", "topic=news&queue=g")
	waitFor(t, 10*time.Second, "b's topic registrations to reach a through etcd", func() bool {
		s := lookup(t, a, "topic:news")
		return s != nil && len(s.Nodes) == 2
	})
	for i := range 20 {
		publish(t, a, "news", "text/plain", fmt.Sprintf("m%d", i))
	}
	waitFor(t, 10*time.Second, "every message on b", func() bool { return sub.total() == 20 && member.total() == 20 })
	if got := len(e.keys(t, "/micro/registry/topic:news/")); got != 2 {
		t.Errorf("topic keys in etcd: %d; want 2 (broadcast and group g)", got)
	}
	sub.ws.Close()
	member.ws.Close()
	waitFor(t, 10*time.Second, "the topic registrations to leave etcd", func() bool { return lookup(t, a, "topic:news") == nil })
}

// TestEtcdAtTheNodeLimit: at --registry_max_nodes, a watched batch that
// moves a node the sidecar holds and adds one more moves the node (it was
// dropped whole, the old address served for good), and the nodes left out
// are read again once others leave (they never came back).
func TestEtcdAtTheNodeLimit(t *testing.T) {
	e := startEtcd(t)
	const prefix = "/micro/registry/"
	node := func(id, address string) string {
		return `{"name":"a","nodes":[{"id":"` + id + `","address":"` + address + `","port":80}]}`
	}
	for _, id := range []string{"n1", "n2", "n3"} {
		e.put(t, prefix+"a/"+id, node(id, "10.0.0.1"))
	}
	p := startSidecar(t, etcdSidecarArgs(e.client, "--registry_max_nodes=3")...)
	waitFor(t, 10*time.Second, "the 3 nodes", func() bool { s := lookup(t, p, "a"); return s != nil && len(s.Nodes) == 3 })
	put := func(key, value string) map[string]any {
		return map[string]any{"requestPut": map[string]string{"key": b64(key), "value": b64(value)}}
	}
	txn := map[string]any{"success": []any{put(prefix+"a/n1", node("n1", "10.9.9.9")), put(prefix+"a/n4", node("n4", "10.0.0.1")), put(prefix+"a/n5", node("n5", "10.0.0.1"))}}
	if err := e.gw("/v3/kv/txn", txn, nil); err != nil {
		t.Fatal(err)
	}
	addressOf := func(id string) string {
		for _, n := range lookup(t, p, "a").Nodes {
			if n.ID == id {
				return n.Address
			}
		}
		return ""
	}
	waitFor(t, 10*time.Second, "n1 to move in a full table", func() bool { return addressOf("n1") == "10.9.9.9" })
	if err := e.gw("/v3/kv/deleterange", map[string]string{"key": b64(prefix + "a/n2")}, nil); err != nil {
		t.Fatal(err)
	}
	if err := e.gw("/v3/kv/deleterange", map[string]string{"key": b64(prefix + "a/n3")}, nil); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "n4 and n5, left out, to be served once n2 and n3 left", func() bool {
		return addressOf("n4") != "" && addressOf("n5") != "" && addressOf("n2") == "" && addressOf("n3") == ""
	})
	if n := strings.Count(p.log.String(), "more nodes than --registry_max_nodes"); n != 1 {
		t.Errorf("the limit logged %d times; want once:\n%s", n, p.log.String())
	}
	if strings.Contains(p.log.String(), "reading the registry afresh") {
		t.Error("nodes left out were taken by reading the whole registry again; want them kept")
	}
}

// TestEtcdDeleteOfANodeAnotherHoldsKeepsItInView: a node two sidecars
// keep alike sits on the lease of the one that wrote it last; a DELETE
// through the other revokes its own lease, which deletes nothing, and the
// node, still in etcd, stays in its view. It was dropped from that
// sidecar's table for good when etcd's revision had moved on (any write
// elsewhere in etcd), etcd's answer to a revoke carrying the store's
// revision, not the key's.
func TestEtcdDeleteOfANodeAnotherHoldsKeepsItInView(t *testing.T) {
	e := startEtcd(t)
	a := startSidecar(t, etcdSidecarArgs(e.client)...)
	b := startSidecar(t, etcdSidecarArgs(e.client)...)
	const node = `{"name":"svc","nodes":[{"id":"n1","address":"127.0.0.1","port":9999}]}`
	for _, p := range []*proc{a, b} {
		if code, out := do(t, "POST", p.url("/registry"), "application/json", node); code != 200 {
			t.Fatalf("register through %s: %d %s", p.addr, code, out)
		}
	}
	waitFor(t, 5*time.Second, "both to see n1", func() bool { return hasNode(lookup(t, a, "svc"), "n1") && hasNode(lookup(t, b, "svc"), "n1") })
	e.put(t, "/elsewhere/x", "v") // the store's revision moves on
	if code, out := do(t, "DELETE", a.url("/registry"), "application/json", node); code != 200 {
		t.Fatalf("delete through a: %d %s", code, out)
	}
	if got := e.keys(t, "/micro/registry/svc/"); len(got) != 1 {
		t.Fatalf("etcd holds %q; want n1, on b's lease", got)
	}
	// A change seen by both after the DELETE: a's watch has passed it.
	registerNode(t, b, "", "marker", "m1", 7001)
	waitFor(t, 5*time.Second, "a to see the marker", func() bool { return lookup(t, a, "marker") != nil })
	if !hasNode(lookup(t, a, "svc"), "n1") {
		t.Error("n1, in etcd on b's lease, is gone from a's view")
	}
}

// TestEtcdAppRegistersIntoATableFullOfOthers: a sidecar started on an
// etcd holding more nodes than --registry_max_nodes fills its table with
// others' before its app registers; the app's node takes the place of the
// last other by name, where it was refused as the registry full (/health
// 503 for good). A client's registration is refused still.
func TestEtcdAppRegistersIntoATableFullOfOthers(t *testing.T) {
	e := startEtcd(t)
	for _, n := range []string{"a1", "a2", "a3"} {
		e.put(t, "/micro/registry/a/"+n, `{"name":"a","nodes":[{"id":"`+n+`","address":"10.0.0.1","port":80}]}`)
	}
	p := startSidecar(t, etcdSidecarArgs(e.client, "--registry_max_nodes=2", "--server_name=zz", "--server_address=127.0.0.1:9000")...)
	id := appID(t, p)
	waitFor(t, 10*time.Second, "the app registered", func() bool { return hasNode(lookup(t, p, "zz"), id) })
	waitSidecarHealthy(t, p, 10*time.Second)
	if got := lookup(t, p, "a"); got == nil || len(got.Nodes) != 1 || got.Nodes[0].ID != "a1" {
		t.Errorf("others served beside the app: %+v; want a1, the first by name", got)
	}
	if code, body := do(t, "POST", p.url("/registry"), "application/json", `{"name":"c","nodes":[{"id":"c1","address":"10.0.0.2","port":80}]}`); code != http.StatusServiceUnavailable {
		t.Errorf("a client's registration into the full table: %d %s; want 503", code, body)
	}
}

// TestEtcdAtTheNodeLimitKeepsItsOwn: a fresh read of a registry over
// --registry_max_nodes serves this sidecar's own nodes first: left out,
// the app's refresh would be refused as the registry full, and its entry
// would lapse for every sidecar.
func TestEtcdAtTheNodeLimitKeepsItsOwn(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client, "--registry_max_nodes=2", "--server_name=zz", "--server_address=127.0.0.1:9000")...)
	id := appID(t, p)
	waitFor(t, 10*time.Second, "the app registered", func() bool { return hasNode(lookup(t, p, "zz"), id) })
	for _, n := range []string{"a1", "a2"} {
		e.put(t, "/micro/registry/a/"+n, `{"name":"a","nodes":[{"id":"`+n+`","address":"10.0.0.1","port":80}]}`)
	}
	waitFor(t, 10*time.Second, "the table full", func() bool { return lookup(t, p, "a") != nil })
	e.stop(syscall.SIGTERM) // the watch breaks; the registry is read afresh once etcd is back
	e.start("existing")
	e.waitHealthy()
	waitFor(t, 15*time.Second, "the fresh read", func() bool { return strings.Contains(p.log.String(), "reachable again") })
	if !hasNode(lookup(t, p, "zz"), id) {
		t.Errorf("the app's node was left out of a fresh read at the limit; want it served first")
	}
}

func TestEtcdBadDataSkipped(t *testing.T) {
	e := startEtcd(t)
	const prefix = "/micro/registry/"
	good := `{"name":"good","nodes":[{"id":"g1","address":"127.0.0.1","port":80}]}`
	e.put(t, prefix+"good/g1", good)
	e.put(t, prefix+"junk/j1", "{not json")
	e.put(t, prefix+"deep/a/b", good)
	e.put(t, prefix+"mismatch/m1", good)
	e.put(t, "/micro/registryX/other", "unrelated, outside the prefix")
	p := startSidecar(t, etcdSidecarArgs(e.client, "--server_name=app", "--server_address=127.0.0.1:9000")...)
	if !hasNode(lookup(t, p, "good"), "g1") {
		t.Fatal("the good entry is not served beside bad ones")
	}
	// Written after start: seen through the watch.
	e.put(t, prefix+"two/t1", `{"name":"two","nodes":[{"id":"t1","address":"a","port":1},{"id":"t2","address":"a","port":2}]}`)
	e.put(t, prefix+"arr/a1", `[1,2,3]`)
	e.put(t, prefix+"later/l1", `{"name":"later","nodes":[{"id":"l1","address":"127.0.0.1","port":81}]}`)
	waitFor(t, 5*time.Second, "the later good entry", func() bool { return hasNode(lookup(t, p, "later"), "l1") })
	// The same bad value again is not logged again; a good one replaces it.
	e.put(t, prefix+"junk/j1", "{not json")
	e.put(t, prefix+"good/g1", "garbage over a good entry")
	waitFor(t, 5*time.Second, "a good entry overwritten with garbage to go", func() bool { return lookup(t, p, "good") == nil })
	e.put(t, prefix+"later/l2", `{"name":"later","nodes":[{"id":"l2","address":"127.0.0.1","port":82}]}`)
	waitFor(t, 5*time.Second, "l2", func() bool { return hasNode(lookup(t, p, "later"), "l2") })

	log := p.log.String()
	for _, key := range []string{"junk/j1", "deep/a/b", "mismatch/m1", "two/t1", "arr/a1", "good/g1"} {
		if n := strings.Count(log, "key="+prefix+key+" "); n != 1 {
			t.Errorf("bad entry %s logged %d times; want once", key, n)
		}
	}
	if strings.Contains(log, "registryX") {
		t.Error("a key outside the prefix must not even be read")
	}
	if c, msg := healthOf(t, p); c != 200 {
		t.Errorf("/health with bad data in the store: %d %s; want 200", c, msg)
	}
	var all []Service
	_, body := do(t, "GET", p.url("/registry"), "", "")
	json.Unmarshal([]byte(body), &all)
	var names []string
	for _, s := range all {
		names = append(names, s.Name)
	}
	sort.Strings(names)
	if strings.Join(names, ",") != "app,later" {
		t.Errorf("services listed: %v; want app,later", names)
	}
}

// TestEtcdClusterMemberDown: a three-member cluster keeps serving the
// sidecars while one member is down (first one, then another after the
// first returns), whichever member each sidecar was using.
// memberDownWait bounds each wait while a member is down or coming back:
// killing the leader costs an election, and one run of the whole suite on
// a busy 2-core machine failed here with 10s (not reproduced in five more).
const memberDownWait = 25 * time.Second

func TestEtcdClusterMemberDown(t *testing.T) {
	ms := newEtcdCluster(t, 3)
	startAll(ms)
	common := []string{"--register_ttl=3s", "--register_interval=500ms"}
	a := startSidecar(t, append(etcdSidecarArgs(clientURLs(ms[0], ms[1], ms[2]), "--server_name=alpha", "--server_address=127.0.0.1:9001"), common...)...)
	b := startSidecar(t, append(etcdSidecarArgs(clientURLs(ms[1], ms[2], ms[0]), "--server_name=beta", "--server_address=127.0.0.1:9002"), common...)...)
	ida, idb := appID(t, a), appID(t, b)
	seeBoth := func(what string) {
		t.Helper()
		for _, p := range []*proc{a, b} {
			waitFor(t, memberDownWait, fmt.Sprintf("%s: %s to see alpha and beta", what, p.addr), func() bool {
				return hasNode(lookup(t, p, "alpha"), ida) && hasNode(lookup(t, p, "beta"), idb)
			})
		}
	}
	seeBoth("start")

	for round, down := range []int{0, 1} {
		ms[down].stop(syscall.SIGKILL)
		// Registrations made now travel through the remaining members.
		name := fmt.Sprintf("during%d", round)
		registerNode(t, b, "", name, name+"-b", 7000+round)
		registerNode(t, a, "", name, name+"-a", 7100+round)
		for _, p := range []*proc{a, b} {
			waitFor(t, memberDownWait, p.addr+" to see "+name+" with member "+ms[down].name+" down", func() bool {
				s := lookup(t, p, name)
				return hasNode(s, name+"-a") && hasNode(s, name+"-b")
			})
			waitSidecarHealthy(t, p, memberDownWait)
		}
		// Two TTLs later the apps are still kept alive through the others.
		deadline := time.Now().Add(6 * time.Second)
		waitFor(t, 10*time.Second, "two TTLs to pass", func() bool { return time.Now().After(deadline) })
		seeBoth(fmt.Sprintf("%s down for two TTLs", ms[down].name))

		ms[down].start("existing")
		ms[down].waitHealthy()
		seeBoth(ms[down].name + " back")
	}
	// With all members back, a sidecar using only the returned member sees
	// everything.
	c := startSidecar(t, etcdSidecarArgs(ms[0].client)...)
	waitFor(t, memberDownWait, "a sidecar on the returned member to see all", func() bool {
		return hasNode(lookup(t, c, "alpha"), ida) && hasNode(lookup(t, c, "during1"), "during1-a")
	})
}

// TestEtcdRestart: etcd stopped entirely: the sidecars keep serving what
// they knew and say so in /health; when it returns (with its data, then
// wiped) they re-register and watch again.
func TestEtcdRestart(t *testing.T) {
	e := startEtcd(t)
	common := []string{"--register_ttl=3s", "--register_interval=500ms"}
	a := startSidecar(t, append(etcdSidecarArgs(e.client, "--server_name=alpha", "--server_address=127.0.0.1:9001"), common...)...)
	b := startSidecar(t, append(etcdSidecarArgs(e.client, "--server_name=beta", "--server_address=127.0.0.1:9002"), common...)...)
	ida, idb := appID(t, a), appID(t, b)
	seeAll := func(what string, extra ...string) {
		t.Helper()
		for _, p := range []*proc{a, b} {
			waitFor(t, 15*time.Second, what+": "+p.addr+" to see everything", func() bool {
				if !hasNode(lookup(t, p, "alpha"), ida) || !hasNode(lookup(t, p, "beta"), idb) {
					return false
				}
				for _, name := range extra {
					if lookup(t, p, name) == nil {
						return false
					}
				}
				return true
			})
		}
	}
	seeAll("start")

	for _, wipe := range []bool{false, true} {
		what := "restart"
		if wipe {
			what = "restart with a wiped data dir"
		}
		e.stop(syscall.SIGTERM)
		for _, p := range []*proc{a, b} {
			waitFor(t, 10*time.Second, p.addr+" /health to report etcd down", func() bool {
				c, msg := healthOf(t, p)
				return c == 503 && strings.Contains(msg, "serving the last known registry")
			})
			if !hasNode(lookup(t, p, "alpha"), ida) || !hasNode(lookup(t, p, "beta"), idb) {
				t.Fatalf("%s: the last known registry must still be served while etcd is down", p.addr)
			}
		}
		if wipe {
			if err := os.RemoveAll(e.dir); err != nil {
				t.Fatal(err)
			}
			e.token += "-again"
			e.start("new")
		} else {
			e.start("existing")
		}
		e.waitHealthy()
		if wipe {
			// Everything the sidecars own (both apps, and after-false posted
			// to a without a ttl) is put again into the empty cluster.
			want := strings.Join([]string{"/micro/registry/after-false/after-false-1", "/micro/registry/alpha/" + ida, "/micro/registry/beta/" + idb}, " ")
			waitFor(t, 15*time.Second, "the sidecars to register again in the new cluster", func() bool { return strings.Join(e.keys(t, "/micro/registry/"), " ") == want })
		}
		name := "after-" + strconv.FormatBool(wipe)
		registerNode(t, a, "", name, name+"-1", 7000)
		seeAll(what, name)
		for _, p := range []*proc{a, b} {
			waitSidecarHealthy(t, p, 10*time.Second)
		}
	}
	if !strings.Contains(a.log.String(), "reading the registry afresh") {
		t.Error("a replaced cluster must be read afresh, not resumed by revision")
	}
}

// TestEtcdHealthRecoversAfterAFailedCall: a registration refused while
// etcd is down marks /health 503; once etcd is back and the watch has read
// the registry afresh, /health is 200 again, with no further call needed
// (a sidecar without an app makes none of its own).
func TestEtcdHealthRecoversAfterAFailedCall(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client)...)
	waitSidecarHealthy(t, p, 10*time.Second)
	e.stop(syscall.SIGTERM)
	code, body := do(t, "POST", p.url("/registry"), "application/json", `{"name":"late","nodes":[{"id":"late-1","address":"127.0.0.1","port":7100}]}`)
	if code != 503 {
		t.Fatalf("registering while etcd is down: %d %s; want 503", code, body)
	}
	e.start("existing")
	e.waitHealthy()
	waitSidecarHealthy(t, p, 15*time.Second)
	// The line follows the state /health reads, a moment after it.
	waitFor(t, 5*time.Second, "the sidecar to log that etcd is reachable again", func() bool {
		return strings.Contains(p.log.String(), "reachable again")
	})
}

// TestEtcdDeleteRefusedIsFinal: a node this sidecar put, deleted while
// etcd was down (503, gone from its view at once), stays deleted once etcd
// is back: its lease is revoked then, rather than the node coming back
// into discovery everywhere, this sidecar included, for a whole TTL.
func TestEtcdDeleteRefusedIsFinal(t *testing.T) {
	e := startEtcd(t)
	a := startSidecar(t, etcdSidecarArgs(e.client, "--register_ttl=60s")...)
	b := startSidecar(t, etcdSidecarArgs(e.client)...)
	registerNode(t, a, "", "doomed", "doomed-1", 7200)
	waitFor(t, 10*time.Second, "b to see doomed", func() bool { return lookup(t, b, "doomed") != nil })
	e.stop(syscall.SIGTERM)
	code, body := do(t, "DELETE", a.url("/registry"), "application/json", `{"name":"doomed","nodes":[{"id":"doomed-1"}]}`)
	if code != 503 || lookup(t, a, "doomed") != nil {
		t.Fatalf("DELETE while etcd is down: %d %s, and a still sees it: %v; want 503 and the node gone from a's view", code, body, lookup(t, a, "doomed") != nil)
	}
	e.start("existing")
	e.waitHealthy()
	waitSidecarHealthy(t, a, 15*time.Second)
	waitFor(t, 15*time.Second, "the deleted node to leave etcd", func() bool { return len(e.keys(t, "/micro/registry/doomed/")) == 0 })
	waitSidecarHealthy(t, b, 15*time.Second)
	for _, p := range []*proc{a, b} {
		waitFor(t, 5*time.Second, p.addr+" to see no doomed node", func() bool { return lookup(t, p, "doomed") == nil })
	}
	if !strings.Contains(a.log.String(), "etcd registry reachable again") {
		t.Error("a never read the registry afresh after etcd came back")
	}
}

// TestEtcdLapsedAppIsNotRegistered: an app whose entry was not renewed
// for a TTL while etcd could not be reached is reported unregistered in
// /health (its lease ran out in etcd, though the table the sidecar serves,
// not synchronised, still holds it), and registered again once etcd
// answers and the entry is put back.
func TestEtcdLapsedAppIsNotRegistered(t *testing.T) {
	e := startEtcd(t)
	g := newGatewayProxy(t, e.client)
	p := startSidecar(t, etcdSidecarArgs(g.srv.URL, "--server_name=lapse", "--server_address=127.0.0.1:9000", "--register_ttl=2s", "--register_interval=500ms")...)
	appID(t, p)
	waitSidecarHealthy(t, p, 10*time.Second)
	registered := func() bool {
		registered, _, _ := p.appRegistration()
		return registered
	}
	if !registered() {
		t.Fatal("a healthy app with etcd up is not reported registered")
	}
	g.setDown(true)
	waitFor(t, 10*time.Second, "registered false, the entry not renewed for a TTL", func() bool { return !registered() })
	g.setDown(false)
	waitFor(t, 15*time.Second, "registered again", registered)
}

// TestEtcdAuth: with etcd's authentication on, a sidecar with the
// password (from MICRO_REGISTRY_PASSWORD) registers and discovers; one
// without says so in /health. The password never reaches the log.
func TestEtcdAuth(t *testing.T) {
	e := startEtcd(t)
	const password = "s3cret-pa55"
	for _, step := range []gatewayCall{
		{"/v3/auth/user/add", map[string]string{"name": "micro", "password": password}},
		{"/v3/auth/role/add", map[string]string{"name": "registry"}},
		{"/v3/auth/role/grant", map[string]any{"name": "registry", "perm": map[string]string{
			"permType": "READWRITE", "key": b64("/micro/registry/"), "range_end": base64.StdEncoding.EncodeToString(prefixEnd("/micro/registry/"))}}},
		{"/v3/auth/user/grant", map[string]string{"user": "micro", "role": "registry"}},
	} {
		if err := e.gw(step.path, step.req, nil); err != nil {
			t.Fatalf("setting up auth: %v", err)
		}
	}
	e.enableAuth(t)
	p := startSidecarEnv(t, []string{"MICRO_REGISTRY_PASSWORD=" + password},
		etcdSidecarArgs(e.client, "--registry_username=micro", "--server_name=authed", "--server_address=127.0.0.1:9000")...)
	q := startSidecarEnv(t, []string{"MICRO_REGISTRY_PASSWORD=" + password},
		etcdSidecarArgs(e.client, "--registry_username=micro")...)
	id := appID(t, p)
	waitFor(t, 5*time.Second, "the authenticated sidecar's app on another", func() bool { return hasNode(lookup(t, q, "authed"), id) })
	waitSidecarHealthy(t, p, 5*time.Second)

	anon := startSidecar(t, etcdSidecarArgs(e.client)...)
	if c, msg := healthOf(t, anon); c != 503 || !strings.Contains(msg, "etcd") {
		t.Errorf("a sidecar without credentials: /health %d %q; want 503 naming etcd", c, msg)
	}
	wrong := startSidecarEnv(t, []string{"MICRO_REGISTRY_PASSWORD=wrong"}, etcdSidecarArgs(e.client, "--registry_username=micro")...)
	if c, msg := healthOf(t, wrong); c != 503 || !strings.Contains(msg, "authenticating as \"micro\"") {
		t.Errorf("a wrong password: /health %d %q; want 503 naming the failed authentication", c, msg)
	}
	for _, s := range []*proc{p, q, wrong} {
		if strings.Contains(s.log.String(), password) {
			t.Errorf("the password appears in %s's log", s.addr)
		}
	}
}

// TestEtcdAuthTurnedOnUnderARunningSidecar: a sidecar without credentials
// whose watch predates etcd's authentication notices it at its first
// refused call: its /health turns 503 and its log says access is refused
// (a watch etcd admitted before runs on, and keepalives need no user).
func TestEtcdAuthTurnedOnUnderARunningSidecar(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client)...)
	waitSidecarHealthy(t, p, 10*time.Second)
	e.enableAuth(t)
	code, body := do(t, "POST", p.url("/registry"), "application/json", `{"name":"late","nodes":[{"id":"late-1","address":"127.0.0.1","port":7100}]}`)
	if code != 503 {
		t.Fatalf("registering with auth on and no user: %d %s; want 503", code, body)
	}
	waitFor(t, 10*time.Second, "/health to say etcd refuses access", func() bool {
		c, msg := healthOf(t, p)
		return c == 503 && strings.Contains(msg, "user name")
	})
	waitFor(t, 5*time.Second, "the log to say etcd refuses access", func() bool {
		return strings.Contains(p.log.String(), "refuses this sidecar access")
	})
}

// TestEtcdFigures measures what the README reports. It runs only with
// MICRO_ETCD_FIGURES=1 (it takes MICRO_ETCD_IDLE, default 60s, to count an
// idle sidecar's requests).
func TestEtcdFigures(t *testing.T) {
	if os.Getenv("MICRO_ETCD_FIGURES") == "" {
		t.Skip("set MICRO_ETCD_FIGURES=1 to measure the etcd registry's figures")
	}
	idle := time.Minute
	if v := os.Getenv("MICRO_ETCD_IDLE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil {
			t.Fatal(err)
		}
		idle = d
	}
	e := startEtcd(t)

	// Registration on one sidecar to visibility on another, observed on
	// the other's watch stream.
	a := startSidecar(t, etcdSidecarArgs(e.client)...)
	b := startSidecar(t, etcdSidecarArgs(e.client)...)
	ws, err := websocket.Dial("ws://"+b.addr+"/registry?watch=1", "", "http://"+b.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	var lat []time.Duration
	for i := range 50 {
		start := time.Now()
		registerNode(t, a, "", fmt.Sprintf("fig%d", i), fmt.Sprintf("fig%d-1", i), 8000+i)
		ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		var ev Event
		if err := websocket.JSON.Receive(ws, &ev); err != nil || ev.Service.Name != fmt.Sprintf("fig%d", i) {
			t.Fatalf("watch on b: %+v %v", ev, err)
		}
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	t.Logf("FIGURE registration on A to visibility on B (POST to watch event, 50 runs): median %v, p90 %v, max %v",
		lat[len(lat)/2].Round(10*time.Microsecond), lat[len(lat)*9/10].Round(10*time.Microsecond), lat[len(lat)-1].Round(10*time.Microsecond))

	// SIGKILL to disappearance, for the default TTL and a short one.
	for _, ttl := range []string{"30s", "5s"} {
		k := startSidecar(t, etcdSidecarArgs(e.client, "--register_ttl="+ttl, "--server_name=victim"+ttl, "--server_address=127.0.0.1:9000")...)
		id := appID(t, k)
		waitFor(t, 5*time.Second, "victim visible", func() bool { return hasNode(lookup(t, b, "victim"+ttl), id) })
		start := time.Now()
		k.stop(syscall.SIGKILL)
		waitFor(t, 60*time.Second, "victim gone", func() bool { return lookup(t, b, "victim"+ttl) == nil })
		t.Logf("FIGURE SIGKILL to disappearance with --register_ttl=%s: %v", ttl, time.Since(start).Round(10*time.Millisecond))
	}

	// Idle cost: one sidecar with one app and defaults (TTL 30s, refresh
	// every 10s), through a counting proxy.
	g := newGatewayProxy(t, e.client)
	s := startSidecar(t, etcdSidecarArgs(g.srv.URL, "--server_name=idle", "--server_address=127.0.0.1:9000")...)
	appID(t, s)
	waitSidecarHealthy(t, s, 5*time.Second)
	before := g.snapshot()
	start := time.Now()
	deadline := start.Add(idle)
	waitFor(t, idle+10*time.Second, "the idle period", func() bool { return time.Now().After(deadline) })
	after := g.snapshot()
	total := 0
	var parts []string
	for path, n := range after {
		if d := n - before[path]; d > 0 {
			total += d
			parts = append(parts, fmt.Sprintf("%s=%d", path, d))
		}
	}
	sort.Strings(parts)
	perMin := float64(total) / time.Since(start).Minutes()
	t.Logf("FIGURE idle sidecar with one app, defaults: %d requests in %v = %.1f requests/minute (%s); the watch is one long-lived request opened at start",
		total, time.Since(start).Round(time.Second), perMin, strings.Join(parts, " "))
}

// testPKI writes a CA, a server certificate for 127.0.0.1 and a client
// certificate, PEM, into dir.
func testPKI(t *testing.T, dir string) (ca, serverCert, serverKey, clientCert, clientKey string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "micro test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, typ string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	leaf := func(serial int64, cn string, usage ...x509.ExtKeyUsage) (string, string) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: usage,
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return write(cn+".pem", "CERTIFICATE", der), write(cn+"-key.pem", "EC PRIVATE KEY", kder)
	}
	ca = write("ca.pem", "CERTIFICATE", caDER)
	// etcd's gateway dials etcd's own gRPC server with the server
	// certificate, so under --client-cert-auth it must be good for client
	// authentication too.
	serverCert, serverKey = leaf(2, "server", x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth)
	clientCert, clientKey = leaf(3, "client", x509.ExtKeyUsageClientAuth)
	return
}

// TestEtcdTLS: etcd serving https and wanting client certificates; a
// sidecar with --registry_tls_* registers and discovers, one without the
// client certificate says so in /health.
func TestEtcdTLS(t *testing.T) {
	etcdBin(t)
	ca, sc, sk, cc, ck := testPKI(t, t.TempDir())
	m := newEtcdCluster(t, 1, "--cert-file", sc, "--key-file", sk, "--trusted-ca-file", ca, "--client-cert-auth")[0]
	tlsCfg, err := etcdTLSConfig(ca, cc, ck)
	if err != nil {
		t.Fatal(err)
	}
	m.hc = &http.Client{Transport: &http.Transport{TLSClientConfig: tlsCfg}}
	m.start("new")
	m.waitHealthy()

	args := etcdSidecarArgs(m.client, "--registry_tls_ca="+ca, "--registry_tls_cert="+cc, "--registry_tls_key="+ck)
	p := startSidecar(t, append(args, "--server_name=secure", "--server_address=127.0.0.1:9000")...)
	q := startSidecar(t, args...)
	id := appID(t, p)
	waitFor(t, 5*time.Second, "the app over TLS on another sidecar", func() bool { return hasNode(lookup(t, q, "secure"), id) })
	waitSidecarHealthy(t, q, 5*time.Second)
	if got := m.keys(t, "/micro/registry/"); len(got) != 1 {
		t.Errorf("keys over TLS: %v; want the app's", got)
	}

	nocert := startSidecar(t, etcdSidecarArgs(m.client, "--registry_tls_ca="+ca)...)
	if c, msg := healthOf(t, nocert); c != 503 || !strings.Contains(msg, "etcd") {
		t.Errorf("without a client certificate: /health %d %q; want 503 naming etcd", c, msg)
	}
	// TLS failures say which flags to check, not "unreachable".
	waitFor(t, 5*time.Second, "the missing client certificate's log line", func() bool {
		return strings.Contains(nocert.log.String(), "check --registry_tls_cert and --registry_tls_key")
	})
	untrusting := startSidecar(t, etcdSidecarArgs(m.client, "--registry_tls_cert="+cc, "--registry_tls_key="+ck)...)
	waitFor(t, 5*time.Second, "the untrusted server certificate's log line", func() bool {
		return strings.Contains(untrusting.log.String(), "check --registry_tls_ca")
	})
	if code, out := run(t, "sidecar", "--registry=etcd", "--registry_address=http://127.0.0.1:2379", "--registry_tls_ca="+ca); code != 2 || !strings.Contains(out, "use https:// etcd URLs") {
		t.Errorf("TLS flags with http:// URLs: exit %d, %q; want 2 naming the fix", code, out)
	}
}

// TestEtcdOwnedKeyRewrittenIsPutBack: a key a sidecar keeps alive that
// someone else rewrites (here without a lease, so that it would outlive
// the sidecar) is put back as the sidecar keeps it at its next refresh,
// and SIGTERM then takes it away.
func TestEtcdOwnedKeyRewrittenIsPutBack(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client, "--register_ttl=3s", "--register_interval=500ms",
		"--server_name=owned", "--server_address=127.0.0.1:9100")...)
	id := appID(t, p)
	waitFor(t, 5*time.Second, "the app in etcd", func() bool { return len(e.keys(t, "/micro/registry/owned/")) == 1 })
	key := "/micro/registry/owned/" + id
	e.put(t, key, `{"name":"owned","version":"","metadata":{},"nodes":[{"id":"`+id+`","address":"127.0.0.1","port":9999,"metadata":{}}]}`)
	leaseOf := func() (int64, string) {
		var resp etcdRangeResponse
		if err := e.gw("/v3/kv/range", etcdRangeRequest{Key: []byte(key)}, &resp); err != nil || len(resp.KVs) != 1 {
			return -1, ""
		}
		return int64(resp.KVs[0].Lease), string(resp.KVs[0].Value)
	}
	waitFor(t, 10*time.Second, "the sidecar's entry put back on a lease", func() bool {
		lease, value := leaseOf()
		return lease > 0 && strings.Contains(value, `"port":9100`)
	})
	if code := p.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status after SIGTERM: %d; want 0", code)
	}
	if keys := e.keys(t, "/micro/registry/owned/"); len(keys) != 0 {
		t.Errorf("after SIGTERM etcd still holds %q", keys)
	}
}

// TestEtcdFrozenMemberIsNoticed: a member that stops answering (SIGSTOP:
// its kernel still holds the watch's connection open) is noticed by a
// sidecar with nothing of its own to refresh: /health turns 503, and back
// to 200 when the member wakes.
func TestEtcdFrozenMemberIsNoticed(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client)...)
	waitSidecarHealthy(t, p, 10*time.Second)
	e.mu.Lock()
	pid := e.cmd.Process.Pid
	e.mu.Unlock()
	syscall.Kill(pid, syscall.SIGSTOP)
	t.Cleanup(func() { syscall.Kill(pid, syscall.SIGCONT) })
	waitFor(t, 20*time.Second, "/health to turn 503 with the member frozen", func() bool { c, _ := healthOf(t, p); return c == 503 })
	syscall.Kill(pid, syscall.SIGCONT)
	waitSidecarHealthy(t, p, 20*time.Second)
}

// TestStoppedWhileReachingEtcd: a sidecar stopped while it waits for an
// unreachable etcd at start exits at once, without listening or
// registering its app.
func TestStoppedWhileReachingEtcd(t *testing.T) {
	stopWhileStarting(t, "etcd registry unreachable", "--address=127.0.0.1:0", "--registry=etcd", "--registry_address=http://127.0.0.1:1",
		"--server_name=early", "--server_address=127.0.0.1:9")
}

// TestEtcdRecreatedWithTheSameFlags: etcd recreated empty with the same
// flags keeps its cluster id, and may pass the revision a sidecar had seen
// before the sidecar is back (a paused host, a partition). Resumed at that
// revision, the sidecar would miss what was written before it, for good;
// it reads the registry afresh instead.
func TestEtcdRecreatedWithTheSameFlags(t *testing.T) {
	e := startEtcd(t)
	p := startSidecar(t, etcdSidecarArgs(e.client, "--register_ttl=60s", "--register_interval=30s")...) // refreshes too rare to be what puts "old" back
	registerNode(t, p, "", "old", "old-1", 7001)
	var before etcdRangeResponse
	if err := e.gw("/v3/kv/range", etcdRangeRequest{Key: []byte("/")}, &before); err != nil {
		t.Fatal(err)
	}
	oldRev := int64(before.Header.Revision)

	p.cmd.Process.Signal(syscall.SIGSTOP) // the sidecar's host pauses
	defer p.cmd.Process.Signal(syscall.SIGCONT)
	e.stop(syscall.SIGTERM)
	if err := os.RemoveAll(e.dir); err != nil {
		t.Fatal(err)
	}
	e.start("new") // the same flags and token: the same cluster id
	e.waitHealthy()
	e.put(t, "/micro/registry/early/early-1", `{"name":"early","nodes":[{"id":"early-1","address":"127.0.0.1","port":7002}]}`)
	for i := int64(0); i <= oldRev; i++ { // the new cluster passes the old revision
		e.put(t, "/filler", strconv.FormatInt(i, 10))
	}
	p.cmd.Process.Signal(syscall.SIGCONT)
	waitFor(t, 20*time.Second, "the sidecar to see what the new cluster holds", func() bool { return lookup(t, p, "early") != nil })
	// What it keeps, which the new cluster lost, it puts back at once.
	waitFor(t, 5*time.Second, "the node the sidecar keeps in the new cluster", func() bool {
		var got etcdRangeResponse
		return e.gw("/v3/kv/range", etcdRangeRequest{Key: []byte("/micro/registry/old/old-1")}, &got) == nil && len(got.KVs) == 1
	})
}

// TestEtcdRollingRestartKeepsTheNode: as with the file registry, a new
// sidecar started with the app's fixed --server_id before the old one
// stops writes the node again at once after the old one's goodbye.
func TestEtcdRollingRestartKeepsTheNode(t *testing.T) {
	rollingRestart(t, false, etcdSidecarArgs(startEtcd(t).client)...)
}

// TestEtcdNodeKeptByTwoSidecarsIsSaid: one node id kept alive through two
// sidecars, with different values, is overwritten by each at every
// refresh; the sidecars say so in their logs, once. A ?ttl= entry posted
// through both, which neither keeps alive, is no such fight.
func TestEtcdNodeKeptByTwoSidecarsIsSaid(t *testing.T) {
	e := startEtcd(t)
	common := []string{"--register_ttl=3s", "--register_interval=300ms"}
	a := startSidecar(t, append(etcdSidecarArgs(e.client), common...)...)
	b := startSidecar(t, append(etcdSidecarArgs(e.client), common...)...)
	registerNode(t, a, "?ttl=30s", "leased", "l1", 3333)
	registerNode(t, b, "?ttl=30s", "leased", "l1", 4444) // seen by a before b's write of dup below
	registerNode(t, a, "", "dup", "d1", 1111)
	registerNode(t, b, "", "dup", "d1", 2222)
	const warning = "rewritten by another writer"
	waitFor(t, 10*time.Second, "both sidecars to say the node is contested", func() bool {
		return strings.Contains(a.log.String(), warning) && strings.Contains(b.log.String(), warning)
	})
	// A few more refreshes, each a rewrite the other sees.
	revision := func() int64 {
		var r etcdRangeResponse
		if err := e.gw("/v3/kv/range", etcdRangeRequest{Key: []byte("/")}, &r); err != nil {
			t.Fatal(err)
		}
		return int64(r.Header.Revision)
	}
	rev0 := revision()
	waitFor(t, 10*time.Second, "six more rewrites", func() bool { return revision() >= rev0+6 })
	for _, p := range []*proc{a, b} {
		if n := strings.Count(p.log.String(), warning); n != 1 {
			t.Errorf("%s said it %d times; want once", p.addr, n)
		}
	}
	if strings.Contains(a.log.String(), "leased") {
		t.Errorf("a ?ttl= entry posted through two sidecars was called contested:\n%s", a.log.String())
	}
}

// TestEtcdRefusedRegistrationIsSeenByNobody: a registration refused for
// --registry_max_nodes is refused before it is written: other sidecars'
// watchers do not see its nodes come and go.
func TestEtcdRefusedRegistrationIsSeenByNobody(t *testing.T) {
	e := startEtcd(t)
	a := startSidecar(t, etcdSidecarArgs(e.client, "--registry_max_nodes=3")...)
	b := startSidecar(t, etcdSidecarArgs(e.client)...)
	events := watchEvents(t, b)
	var nodes []string
	for i := range 5 {
		nodes = append(nodes, fmt.Sprintf(`{"id":"n%d","address":"127.0.0.1","port":%d}`, i, 7000+i))
	}
	if code, body := do(t, "POST", a.url("/registry?ttl=30s"), "application/json", `{"name":"many","nodes":[`+strings.Join(nodes, ",")+`]}`); code != http.StatusServiceUnavailable {
		t.Fatalf("5 nodes past a limit of 3: %d %s; want 503", code, body)
	}
	registerNode(t, a, "", "one", "o1", 7100)
	deadline := time.After(10 * time.Second)
	for {
		select {
		case ev, ok := <-events:
			switch {
			case !ok:
				t.Fatal("the watch ended before the next registration arrived")
			case ev.Service.Name == "one":
				return // the next registration arrived, and nothing of the refused one before it
			}
			t.Errorf("a watcher on another sidecar saw %s of %s/%s, which was refused", ev.Action, ev.Service.Name, ev.Service.Nodes[0].ID)
		case <-deadline:
			t.Fatal("timed out waiting for the next registration on the other sidecar's watch")
		}
	}
}

// TestEtcdRefusesARegistrationTooLargeForIt: a registration larger than
// etcd takes (its --max-request-bytes) is the client's to change, a 413
// saying so, not a 503 to retry for ever.
func TestEtcdRefusesARegistrationTooLargeForIt(t *testing.T) {
	m := startEtcd(t, "--max-request-bytes=4096")
	p := startSidecar(t, etcdSidecarArgs(m.client)...)
	var meta []string
	for i := range 8 {
		meta = append(meta, fmt.Sprintf(`"k%d":"%s"`, i, strings.Repeat("v", 1000)))
	}
	code, out := do(t, "POST", p.url("/registry"), "", `{"name":"big","metadata":{`+strings.Join(meta, ",")+`},"nodes":[{"id":"b1","address":"127.0.0.1","port":1}]}`)
	if code != http.StatusRequestEntityTooLarge || !strings.Contains(out, "--max-request-bytes") {
		t.Errorf("a registration over etcd's limit: %d %s; want 413 naming etcd's --max-request-bytes", code, out)
	}
	if code, out := do(t, "POST", p.url("/registry"), "", `{"name":"small","nodes":[{"id":"s1","address":"127.0.0.1","port":1}]}`); code != 200 {
		t.Errorf("a small registration after it: %d %s", code, out)
	}
	// Refused with its second node: the first, written, is taken back.
	code, out = do(t, "POST", p.url("/registry"), "", `{"name":"pair","nodes":[{"id":"p1","address":"127.0.0.1","port":1},{"id":"p2","address":"127.0.0.1","port":2,"metadata":{`+strings.Join(meta, ",")+`}}]}`)
	if code != http.StatusRequestEntityTooLarge {
		t.Fatalf("a registration whose second node is too large: %d %s; want 413", code, out)
	}
	if keys := m.keys(t, "/micro/registry/pair/"); len(keys) != 0 {
		t.Errorf("after the 413, etcd holds %v; want nothing of it", keys)
	}
}
