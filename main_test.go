package main

// End-to-end tests: they build the real binary once and drive real sidecar
// processes over loopback sockets, as a user would.

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/websocket"
)

// binPath is the sidecar binary built by TestMain.
var binPath string

func TestMain(m *testing.M) {
	if inTestNamespace() {
		// Re-executed inside a private network namespace by inNamespace:
		// the parent built the binary, and here the default registry
		// (multicast) may run.
		binPath = os.Getenv("MICRO_TEST_BIN")
		os.Unsetenv("MICRO_REGISTRY")
		os.Unsetenv("MICRO_REGISTRY_ADDRESS")
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "micro-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "micro")
	build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w -X main.version=test", "-o", binPath, ".")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building the binary: %v\n%s", err, out)
		os.Exit(1)
	}
	// Outside a namespace no test may multicast, not even on the host's
	// loopback: a sidecar started without --registry gets a file registry
	// private to this run, not the multicast default. The multicast tests
	// re-run themselves in a namespace (inNamespace), where this is undone.
	os.Setenv("MICRO_REGISTRY", "file")
	os.Setenv("MICRO_REGISTRY_ADDRESS", filepath.Join(dir, "registry.json"))
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// proc is one running sidecar process.
type proc struct {
	t    *testing.T
	cmd  *exec.Cmd
	addr string // host:port the API listens on
	log  *syncBuffer
	done chan struct{} // closed when the process has exited
}

// syncBuffer collects a process's log while tests read it.
type syncBuffer struct {
	mu  sync.Mutex // guards buf
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

var listeningRE = regexp.MustCompile(`Listening on (\S+?)"`)

// startSidecar runs `micro sidecar` on a free loopback port with args and
// waits until it listens. The process is killed at the end of the test.
func startSidecar(t *testing.T, args ...string) *proc {
	t.Helper()
	return startSidecarEnv(t, nil, args...)
}

func startSidecarEnv(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	return startSidecarIn(t, nil, env, args...)
}

// startSidecarIn is startSidecarEnv with a command prefix, such as
// `ip netns exec NAME`, to run the sidecar in another network namespace.
func startSidecarIn(t *testing.T, prefix []string, env []string, args ...string) *proc {
	t.Helper()
	full := append(append(append([]string{}, prefix...), binPath, "sidecar", "--address=127.0.0.1:0"), args...)
	cmd := exec.Command(full[0], full[1:]...)
	cmd.Env = append(os.Environ(), env...)
	p := &proc{t: t, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout = p.log
	cmd.Stderr = p.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting sidecar: %v", err)
	}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("sidecar %s log:\n%s", p.addr, p.log.String())
		}
	})
	waitFor(t, 10*time.Second, "sidecar to listen", func() bool {
		if m := listeningRE.FindStringSubmatch(p.log.String()); m != nil {
			p.addr = m[1]
			return true
		}
		select {
		case <-p.done:
			t.Fatalf("sidecar exited before listening: %s", p.log.String())
		default:
		}
		return false
	})
	if prefix == nil && appUnchecked(args, env) {
		p.waitFirstRegistration()
	}
	return p
}

// appUnchecked reports whether the sidecar's app is registered without a
// health check, which the sidecar does a moment after it listens.
func appUnchecked(args, env []string) bool {
	named := false
	for _, a := range append(append([]string{}, env...), args...) {
		switch {
		case strings.HasPrefix(a, "--healthcheck_url="), strings.HasPrefix(a, "MICRO_HEALTHCHECK_URL="),
			strings.HasPrefix(a, "--tls_cert_file="), strings.HasPrefix(a, "MICRO_TLS_CERT_FILE="):
			return false // checked later; or served over TLS, which url does not speak
		case strings.HasPrefix(a, "--server_name="), strings.HasPrefix(a, "MICRO_SERVER_NAME="):
			named = !strings.HasSuffix(a, "=")
		}
	}
	return named
}

// waitFirstRegistration waits until the sidecar's first write of its app
// settled, registered or refused, so that a test looking the app up right
// after the start does not race that write. A sidecar that stops
// answering ends the wait: the test that started it sees why.
func (p *proc) waitFirstRegistration() {
	p.t.Helper()
	waitFor(p.t, 20*time.Second, "the app's first registration attempt", func() bool {
		registered, refusal, ok := p.appRegistration()
		return !ok || registered || refusal != ""
	})
}

// appRegistration reads the app's registration from /health: whether it
// is registered, and the registry's refusal; ok is false when the sidecar
// does not answer, or reports no app.
func (p *proc) appRegistration() (registered bool, refusal string, ok bool) {
	resp, err := http.Get(p.url("/health"))
	if err != nil {
		return false, "", false
	}
	defer resp.Body.Close()
	var h struct {
		App *struct {
			Registered        bool   `json:"registered"`
			RegistrationError string `json:"registration_error"`
		} `json:"app"`
	}
	if json.NewDecoder(resp.Body).Decode(&h) != nil || h.App == nil {
		return false, "", false
	}
	return h.App.Registered, h.App.RegistrationError, true
}

func (p *proc) url(path string) string { return "http://" + p.addr + path }

// stop sends sig and returns the exit code.
func (p *proc) stop(sig syscall.Signal) int {
	p.t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		p.t.Fatalf("sidecar did not exit within 15s of %v", sig)
	}
	return p.cmd.ProcessState.ExitCode()
}

// waitFor polls cond until it holds, failing the test after timeout. The
// timeout is generous: it never fires when things work.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// do sends a request and returns the status and body.
func do(t *testing.T, method, url, contentType string, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data)
}

// lookup returns the service as the sidecar answers it, or nil on 404.
func lookup(t *testing.T, p *proc, name string) *Service {
	t.Helper()
	code, body := do(t, "GET", p.url("/registry?service="+name), "", "")
	if code == http.StatusNotFound {
		return nil
	}
	if code != http.StatusOK {
		t.Fatalf("lookup %s: %d %s", name, code, body)
	}
	var s Service
	if err := json.Unmarshal([]byte(body), &s); err != nil {
		t.Fatalf("lookup %s: %v in %s", name, err, body)
	}
	return &s
}

func hasNode(s *Service, id string) bool {
	if s == nil {
		return false
	}
	for _, n := range s.Nodes {
		if n.ID == id {
			return true
		}
	}
	return false
}

// appID extracts the node id a sidecar logged when registering its app.
func appID(t *testing.T, p *proc) string {
	t.Helper()
	re := regexp.MustCompile(`Registering (\S+?)"`)
	var id string
	waitFor(t, 10*time.Second, "the app's registration", func() bool {
		if m := re.FindStringSubmatch(p.log.String()); m != nil {
			id = m[1]
			return true
		}
		return false
	})
	return id
}

func run(t *testing.T, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(binPath, args...)
	out, _ := cmd.CombinedOutput()
	return cmd.ProcessState.ExitCode(), string(out)
}

func TestCommandLine(t *testing.T) {
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--help"}, 0, "micro sidecar [flags]"},
		{[]string{"--version"}, 0, "micro test"},
		{[]string{"sidecar", "--version"}, 0, "micro test"},
		{[]string{"sidecar", "--registry=bogus", "--version"}, 0, "micro test"}, // a bad flag beside: never starts
		{[]string{"sidecar", "--version", "--registry=bogus"}, 0, "micro test"},
		{[]string{"sidecar", "--help"}, 0, "-healthcheck_url"},
		{[]string{}, 2, "Usage"},
		{[]string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{[]string{"sidecar", "--nope"}, 2, "flag provided but not defined: -nope (micro sidecar --help lists the flags)"},
		{[]string{"sidecar", "--healthcheck_interval=10"}, 2, `invalid value "10" for flag -healthcheck_interval: want a duration such as 10s`},
		{[]string{"sidecar", "--rpc_retries=x"}, 2, "want a whole number"},
		{[]string{"sidecar", "--log_level=error+4"}, 2, `--log_level "error+4": want debug, info, warn or error`},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--server_version=1 0"}, 2, `--server_version: version "1 0": use printable ASCII characters`},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--server_id=a/b"}, 2, `--server_id: id "a/b": use up to`},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--server_metadata=a=1,a=2"}, 2, `--server_metadata: key "a" is given twice`},
		{[]string{"sidecar", "--max_inflight=0"}, 2, "--max_inflight must be more than 0"},
		{[]string{"sidecar", "--address=127.0.0.1:99999"}, 2, `--address "127.0.0.1:99999": port must be 0-65535`},
		{[]string{"sidecar", "--address=127.0.0.1:-1"}, 2, `--address "127.0.0.1:-1": port must be 0-65535`},
		{[]string{"sidecar", "--shutdown_timeout=-1s"}, 2, "--shutdown_timeout must not be negative"},
		{[]string{"sidecar", "--auth_token=s3cret\n"}, 2, "a trailing newline from a file is the usual cause"},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--healthcheck_url=http://127.0.0.1:99999/h"}, 2, "port must be 1-65535"},
		{[]string{"sidecar", "--server_name=foo", "--server_address=9090"}, 2, `--server_address "9090": want the app's host:port`},
		{[]string{"sidecar", "--server_name=foo", "--server_address=:9090"}, 2, `--server_address ":9090": want the app's host:port`},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--healthcheck_url=127.0.0.1:1/h"}, 2, "want a URL with its scheme"},
		{[]string{"sidecar", "--healthcheck_url=http://127.0.0.1:1/"}, 2, "--healthcheck_url needs --server_name"},
		{[]string{"sidecar", "--server_name=foo"}, 2, "--server_name needs --server_address"},
		{[]string{"sidecar", "--server_name=foo", "--server_address=127.0.0.1:99999"}, 2, "port must be 1-65535"},
		{[]string{"sidecar", "--server_name=foo", "--server_address=0.0.0.0:9090"}, 2, "give the host's address"},
		{[]string{"sidecar", "--registry=zookeeper"}, 2, `--registry "zookeeper": want mdns, file, etcd or memory`},
		{[]string{"sidecar", "--registry=memory", "--registry_interface=lo"}, 2, "--registry_interface has no effect without --registry=mdns"},
		{[]string{"sidecar", "--help"}, 0, "-registry_interface"},
		{[]string{"sidecar", "--cors_allowed_origins=http://localhost:3000/"}, 2, `--cors_allowed_origins "http://localhost:3000/": an origin is scheme://host[:port] alone; use http://localhost:3000`},
		{[]string{"sidecar", "--cors_allowed_origins=*,localhost:3000"}, 2, `--cors_allowed_origins "localhost:3000": want an origin, scheme://host[:port]`},
		{[]string{"sidecar", "--healthcheck_interval=2s"}, 2, "--healthcheck_interval has no effect without --healthcheck_url"},
		{[]string{"sidecar", "--server_version=1.0"}, 2, "--server_version has no effect without --server_name"},
		{[]string{"sidecar", "--registry=file", "--registry_username=u"}, 2, "--registry_username has no effect without --registry=etcd"},
		{[]string{"sidecar", "--registry=memory", "--registry_address=/tmp/r.json"}, 2, "--registry_address has no effect without --registry=file or --registry=etcd"},
		{[]string{"sidecar", "--server_name=f", "--server_address=127.0.0.1:1", "--healthcheck_url=ftp://x"}, 2, "scheme must be http, https or tcp"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			code, out := run(t, tc.args...)
			if code != tc.code || !strings.Contains(out, tc.want) {
				t.Errorf("micro %v: exit %d, output %q; want exit %d and %q", tc.args, code, out, tc.code, tc.want)
			}
		})
	}
}

// TestUnannounceableAppRefusedAtStart: an app mDNS cannot announce is
// refused at start, not at every retry of its registration for good
// (checked in process: a start that passed would announce), naming the
// flag at fault, or the variable that set it.
func TestUnannounceableAppRefusedAtStart(t *testing.T) {
	for _, tc := range []struct {
		args, env  []string
		flag, want string
	}{
		{[]string{"--server_address=[fe80::1%lo]:9"}, nil, "--server_address", "the app's address fe80::1%lo has a zone, which an AAAA record cannot carry: cannot be announced over mDNS; use --registry=file or etcd"},
		{[]string{"--server_address=127.0.0.1:9", "--server_metadata=k=" + strings.Repeat("v", 300)}, nil, "--server_metadata", "a TXT string holds 255"},
		{[]string{"--server_address=127.0.0.1:9", "--server_metadata=address x=" + strings.Repeat("v", 300)}, nil, "--server_metadata", "a TXT string holds 255"},
		{[]string{"--server_address=127.0.0.1:9", "--server_name=" + strings.Repeat("s", 251), "--server_id=x1"}, nil, "--server_name", "the app's name=... is 256 bytes and a TXT string holds 255"},
		{[]string{"--server_address=127.0.0.1:9", "--server_id=" + strings.Repeat("i", 253)}, nil, "--server_id", "the app's id=... is 256 bytes"},
		{[]string{"--server_address=127.0.0.1:9", "--server_version=" + strings.Repeat("v", 250)}, nil, "--server_version", "the app's version=... is 258 bytes"},
		{[]string{"--server_address=127.0.0.1:9", "--server_id=x1"}, []string{"MICRO_SERVER_NAME=" + strings.Repeat("s", 251)}, "--server_name", "(set by MICRO_SERVER_NAME)"},
		{[]string{"--server_address=127.0.0.1:9", "--advertise_address=fe80::1%lo"}, nil, "--advertise_address", "an IPv6 zone, which the mdns registry cannot announce"},
	} {
		env := envOf(tc.env...)
		args := append([]string{"--registry=mdns"}, tc.args...)
		if len(tc.env) == 0 {
			args = append([]string{"--registry=mdns", "--server_name=z"}, tc.args...)
		}
		if _, err := parseSidecarFlags(args, io.Discard, env); err == nil || !strings.HasPrefix(err.Error(), tc.flag+" ") && !strings.HasPrefix(err.Error(), tc.flag+":") || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%.80q with %.40q: %.300v; want it to start with %s and say %q", args, tc.env, err, tc.flag, tc.want)
		}
		args[0] = "--registry=file"
		if _, err := parseSidecarFlags(args, io.Discard, env); err != nil {
			t.Errorf("%.80q: %v; want it taken", args, err)
		}
	}
}

// TestAppFlagsWithoutName: the app's address or health check without its
// name stops the start, whether a flag or a variable gave it, and the
// error names what was given alone.
func TestAppFlagsWithoutName(t *testing.T) {
	for _, tc := range []struct {
		args, env []string
		want      string
	}{
		{[]string{"--server_address=127.0.0.1:1"}, nil, "--server_address needs --server_name, the app's service name"},
		{[]string{"--healthcheck_url=ftp://x"}, nil, "--healthcheck_url needs --server_name, the app's service name"},
		{[]string{"--server_address=127.0.0.1:1", "--healthcheck_url=tcp://127.0.0.1:1"}, nil, "--server_address and --healthcheck_url need --server_name, the app's service name"},
		{nil, []string{"MICRO_SERVER_ADDRESS=127.0.0.1:1"}, "--server_address needs --server_name, the app's service name (set by MICRO_SERVER_ADDRESS)"},
		{nil, []string{"MICRO_HEALTHCHECK_URL=http://127.0.0.1:1/"}, "--healthcheck_url needs --server_name, the app's service name (set by MICRO_HEALTHCHECK_URL)"},
	} {
		env := envOf(tc.env...)
		args := append([]string{"--registry=memory"}, tc.args...)
		if _, err := parseSidecarFlags(args, io.Discard, env); err == nil || err.Error() != tc.want {
			t.Errorf("%q with %q: %v; want %q", args, tc.env, err, tc.want)
		}
	}
}

// envOf is an environment of NAME=value pairs, as parseSidecarFlags reads one.
func envOf(vars ...string) func(string) (string, bool) {
	return func(name string) (string, bool) {
		for _, v := range vars {
			if n, val, _ := strings.Cut(v, "="); n == name {
				return val, true
			}
		}
		return "", false
	}
}

func TestIneffectiveFlagFromEnvironment(t *testing.T) {
	env := envOf
	// A variable set for a family of processes must not stop one that
	// chooses another registry on its command line: it is noted, for the log.
	cfg, err := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, env("MICRO_REGISTRY_PASSWORD=pw"))
	if err != nil || len(cfg.ignored) != 1 || cfg.ignored[0] != "MICRO_REGISTRY_PASSWORD has no effect without --registry=etcd" {
		t.Errorf("MICRO_REGISTRY_PASSWORD with the memory registry: %v, noted %q; want it noted by name", err, cfg.ignored)
	}
	if cfg, err := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, env("MICRO_REGISTRY_PASSWORD=")); err != nil || len(cfg.ignored) != 0 {
		t.Errorf("an empty MICRO_REGISTRY_PASSWORD is no setting: %v, noted %q", err, cfg.ignored)
	}
	if cfg, err := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, env("MICRO_NAMESPACE=", "MICRO_RPC_TIMEOUT=")); err != nil || cfg.RPC.Namespace != "go.micro.srv" || cfg.RPC.Timeout != 5*time.Second {
		t.Errorf("empty MICRO_NAMESPACE and MICRO_RPC_TIMEOUT: %v, namespace %q, timeout %v; want the defaults", err, cfg.RPC.Namespace, cfg.RPC.Timeout)
	}
	_, err = parseSidecarFlags(nil, io.Discard, env("MICRO_REGISTRY=memory", "MICRO_ADDRESS=8081"))
	if err == nil || !strings.HasSuffix(err.Error(), "(set by MICRO_ADDRESS)") {
		t.Errorf("a bad MICRO_ADDRESS: %v; want the error to name the variable", err)
	}
	for _, v := range []string{"MICRO_LOG_LEVEL=debug+4", "MICRO_SERVER_METADATA=a"} {
		name, _, _ := strings.Cut(v, "=")
		if _, err := parseSidecarFlags(nil, io.Discard, env("MICRO_REGISTRY=memory", v)); err == nil || !strings.HasSuffix(err.Error(), "(set by "+name+")") {
			t.Errorf("a bad %s: %v; want the error to name the variable", name, err)
		}
	}
	t.Setenv("MICRO_SERVR_NAME", "typo")
	t.Setenv("micro_namespace", "lower")
	cfg, err = parseSidecarFlags([]string{"--registry=MEMORY", "--log_format=JSON"}, io.Discard, env())
	if err != nil || !slices.Contains(cfg.ignored, "MICRO_SERVR_NAME names no flag (micro sidecar --help lists them)") {
		t.Errorf("a misspelt variable: %v, noted %q; want it noted", err, cfg.ignored)
	}
	if !slices.Contains(cfg.ignored, "micro_namespace is not read: spell it MICRO_NAMESPACE") {
		t.Errorf("a variable in lower case: noted %q; want it noted", cfg.ignored)
	}
	t.Setenv("MICRO_VERSION", "1.0.0")
	versioned, _ := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, env())
	if !slices.Contains(versioned.ignored, "MICRO_VERSION is not read: --version is asked on the command line (the app's version is MICRO_SERVER_VERSION)") {
		t.Errorf("MICRO_VERSION: noted %q; want it noted, with the variable meant", versioned.ignored)
	}
	t.Setenv("MICRO_PPROF_ADDRESS", "127.0.0.1:6060")
	profiled, _ := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, env())
	if noted := slices.ContainsFunc(profiled.ignored, func(s string) bool {
		return strings.HasPrefix(s, "MICRO_PPROF_ADDRESS is read only by a build with the profiler")
	}); noted == profilerBuilt {
		t.Errorf("MICRO_PPROF_ADDRESS, profiler built %v: noted %q", profilerBuilt, profiled.ignored)
	}
	if cfg.Registry != "memory" || cfg.LogFormat != "json" {
		t.Errorf("choices in upper case: registry %q, log format %q; want them taken", cfg.Registry, cfg.LogFormat)
	}
	args := []string{"--registry=memory", "--server_name=a", "--server_address=127.0.0.1:1", "--healthcheck_url=tcp://127.0.0.1:1", "--healthcheck_failures=2", "--server_id=a-1"}
	if _, err := parseSidecarFlags(args, io.Discard, env()); err != nil {
		t.Errorf("flags with what they need: %v", err)
	}
}

// TestSignals: SIGHUP (a closed terminal, a dropped ssh session) shuts
// down as SIGTERM does, taking the app out of discovery; and a second
// signal during the drain ends the process at once, whatever
// --shutdown_timeout says.
func TestSignals(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	other := startSidecar(t, "--registry=file", "--registry_address="+file)
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--server_name=hup", "--server_address=127.0.0.1:9090")
	waitFor(t, 5*time.Second, "hup on the other sidecar", func() bool { return lookup(t, other, "hup") != nil })
	if code := p.stop(syscall.SIGHUP); code != 0 {
		t.Errorf("exit status after SIGHUP: %d; want 0\n%s", code, p.log.String())
	}
	// Deregistered, not left to its 30 s TTL.
	waitFor(t, 5*time.Second, "hup to leave the other sidecar's view", func() bool { return lookup(t, other, "hup") == nil })

	arrived, release := make(chan struct{}, 1), make(chan struct{})
	app := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrived <- struct{}{}
		<-release
	}))
	defer app.Close()
	defer close(release) // before Close, which waits for the handler
	q := startSidecar(t, "--registry=memory", "--shutdown_timeout=60s", "--rpc_timeout=60s")
	registerAddr(t, q, "slow", "s1", strings.TrimPrefix(app.URL, "http://"))
	go http.Get(q.url("/proxy/slow/"))
	<-arrived
	q.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the drain to start", func() bool { return strings.Contains(q.log.String(), "Shutting down") })
	if code := q.stop(syscall.SIGTERM); code == 0 { // stop fails the test unless it exits within 15 s
		t.Errorf("exit status after a second SIGTERM: 0; want the signal's")
	}

	// SIGINT inherited as ignored, as a script's & leaves it: the second
	// one still ends the drain (it was handed back to being ignored).
	ignoring := []string{"sh", "-c", `trap "" INT; exec "$0" "$@"`}
	r := startSidecarIn(t, ignoring, nil, "--registry=memory", "--shutdown_timeout=60s", "--rpc_timeout=60s")
	registerAddr(t, r, "slow", "s1", strings.TrimPrefix(app.URL, "http://"))
	go http.Get(r.url("/proxy/slow/"))
	<-arrived
	r.cmd.Process.Signal(syscall.SIGINT)
	waitFor(t, 5*time.Second, "the drain to start", func() bool { return strings.Contains(r.log.String(), "Shutting down") })
	if code := r.stop(syscall.SIGINT); code != 130 {
		t.Errorf("exit status after a second SIGINT: %d; want 130", code)
	}
}

// TestHealthSaysStopping: from the signal on, /health answers 503, also
// while the deregistration waits (here for the file registry's lock), so
// that load balancers stop sending.
func TestHealthSaysStopping(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--server_name=stopper", "--server_address=127.0.0.1:9090")
	assertHealth(t, p, 200, "unchecked")
	unlock, err := lockFile(file + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "/health to say stopping", func() bool {
		code, body := do(t, "GET", p.url("/health"), "", "")
		return code == 503 && strings.Contains(body, `"status":"stopping"`)
	})
	unlock()
	if code := p.stop(syscall.Signal(0)); code != 0 {
		t.Errorf("exit status: %d; want 0", code)
	}
}

// TestPortZeroIsToldAtAnyLogLevel: with --address=...:0 the log line
// naming the port shows even at --log_level=error, as information
// (startSidecar finds the address in it).
func TestPortZeroIsToldAtAnyLogLevel(t *testing.T) {
	for _, address := range []string{"127.0.0.1:0", "127.0.0.1:"} { // an empty port binds any too
		p := startSidecar(t, "--address="+address, "--registry=memory", "--log_level=error")
		if code, _ := do(t, "GET", p.url("/health"), "", ""); code != 200 {
			t.Errorf("--address=%s: /health at the logged address: %d", address, code)
		}
		// As information: an error line at every start would set off
		// alerts on errors.
		if !strings.Contains(p.log.String(), `level=INFO msg="Listening on`) {
			t.Errorf("--address=%s: the Listening line is not at level INFO:\n%s", address, p.log.String())
		}
	}
}

// TestDebugLogsRequests: at --log_level=debug each request is logged with
// its status and time; at info, none is.
func TestDebugLogsRequests(t *testing.T) {
	debug := startSidecar(t, "--registry=memory", "--log_level=debug")
	info := startSidecar(t, "--registry=memory")
	for _, p := range []*proc{debug, info} {
		if code, _ := do(t, "GET", p.url("/registry?service=nope"), "", ""); code != 404 {
			t.Fatalf("lookup of an unknown service: %d", code)
		}
	}
	if !regexp.MustCompile(`msg=request method=GET path=/registry route=/registry status=404 duration=\S+ remote=127\.0\.0\.1:\d+`).MatchString(debug.log.String()) {
		t.Errorf("no request line at debug level:\n%s", debug.log.String())
	}
	if strings.Contains(info.log.String(), "msg=request") {
		t.Errorf("a request line at info level:\n%s", info.log.String())
	}
}

// TestRegistryVersions: a lookup of version= finds the unversioned
// nodes; version without service, and an empty ttl, are refused; a DELETE
// naming a version leaves a node registered under another.
func TestRegistryVersions(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	for _, body := range []string{
		`{"name":"v","nodes":[{"id":"plain","address":"127.0.0.1","port":1}]}`,
		`{"name":"v","version":"2","nodes":[{"id":"two","address":"127.0.0.1","port":2}]}`,
	} {
		if code, out := do(t, "POST", p.url("/registry"), "", body); code != 200 {
			t.Fatalf("register: %d %s", code, out)
		}
	}
	code, body := do(t, "GET", p.url("/registry?service=v&version="), "", "")
	if code != 200 || !strings.Contains(body, `"plain"`) || strings.Contains(body, `"two"`) {
		t.Errorf("version= lookup: %d %s; want the unversioned node alone", code, body)
	}
	for _, tc := range []struct{ method, path, body string }{
		{"GET", "/registry?version=2", ""},
		{"POST", "/registry?ttl=", `{"name":"v","nodes":[{"id":"x","address":"127.0.0.1","port":3}]}`},
	} {
		if code, body := do(t, tc.method, p.url(tc.path), "", tc.body); code != 400 {
			t.Errorf("%s %s: %d %s; want 400", tc.method, tc.path, code, body)
		}
	}
	if code, body := do(t, "DELETE", p.url("/registry"), "", `{"name":"v","version":"99","nodes":[{"id":"two"}]}`); code != 200 || strings.Contains(body, `"two"`) {
		t.Errorf("DELETE of version 99: %d %s; want 200 removing nothing", code, body)
	}
	if s := lookup(t, p, "v"); s == nil || len(s.Nodes) != 2 {
		t.Fatalf("after a DELETE naming another version: %+v; want both nodes", s)
	}
	if code, _ := do(t, "DELETE", p.url("/registry"), "", `{"name":"v","version":"2","nodes":[{"id":"two"}]}`); code != 200 {
		t.Errorf("DELETE of version 2: %d", code)
	}
	if s := lookup(t, p, "v"); s == nil || len(s.Nodes) != 1 || s.Nodes[0].ID != "plain" {
		t.Errorf("after a DELETE naming the node's version: %+v; want plain alone", s)
	}
}

// TestRegistryWatchersAreBounded: watches beyond --registry_max_watchers
// are refused with 503 before the upgrade; a closed one frees its slot.
func TestRegistryWatchersAreBounded(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--registry_max_watchers=2")
	var open []*websocket.Conn
	for range 2 {
		ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://"+p.addr)
		if err != nil {
			t.Fatal(err)
		}
		open = append(open, ws)
	}
	resp := request(t, "GET", p.url("/registry?watch=1"), map[string]string{"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}, "")
	if resp.StatusCode != 503 || resp.Header.Get("Retry-After") == "" {
		t.Errorf("a third watcher: %d %v; want 503 with Retry-After", resp.StatusCode, resp.Header)
	}
	open[0].Close()
	waitFor(t, 5*time.Second, "a slot to free", func() bool {
		ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://"+p.addr)
		if err == nil {
			ws.Close()
		}
		return err == nil
	})
	open[1].Close()
}

// TestAppNodeIsTheSidecars: the registry API may not take over the app's
// own node, which the sidecar keeps; other nodes of its service it may add.
func TestAppNodeIsTheSidecars(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--server_name=own", "--server_id=own-1", "--server_address=127.0.0.1:9090")
	code, body := do(t, "POST", p.url("/registry?ttl=30s"), "", `{"name":"own","nodes":[{"id":"own-1","address":"127.0.0.1","port":9091}]}`)
	if code != 409 || !strings.Contains(body, "this sidecar's app") {
		t.Errorf("POST of the app's node: %d %s; want 409 saying why", code, body)
	}
	if code, body := do(t, "POST", p.url("/registry?ttl=30s"), "", `{"name":"own","nodes":[{"id":"own-2","address":"127.0.0.1","port":9092}]}`); code != 200 {
		t.Errorf("POST of another node of the app's service: %d %s", code, body)
	}
	if s := lookup(t, p, "own"); s == nil || len(s.Nodes) != 2 || s.Nodes[0].Port != 9090 {
		t.Errorf("the app's service: %+v; want the app at 9090 and own-2", s)
	}
}

func TestPortInUse(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	code, out := run(t, "sidecar", "--address="+ln.Addr().String(), "--registry=memory")
	if code != 1 || !strings.Contains(out, "choose another --address") {
		t.Errorf("port in use: exit %d, %q; want exit 1 naming the fix", code, out)
	}
}

// TestFatalErrorInTheLogFormat: with --log_format=json, why the sidecar
// stopped is a log object too, which a collector parsing the stream keeps.
func TestFatalErrorInTheLogFormat(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	code, out := run(t, "sidecar", "--address="+ln.Addr().String(), "--registry=memory", "--log_format=json", "--log_level=error")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	var last struct{ Level, Msg string }
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || code != 1 || last.Level != "ERROR" || !strings.Contains(last.Msg, "choose another --address") {
		t.Errorf("port in use with JSON logs: exit %d, last line %q (%v); want exit 1 and an ERROR object naming the fix", code, lines[len(lines)-1], err)
	}
}

// TestClosedLogPipe: logs piped to a reader that goes (tee or jq ended by
// a Ctrl-C or a closed terminal) neither kill the sidecar nor keep it from
// deregistering the app when it is told to stop.
func TestClosedLogPipe(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	other := startSidecar(t, "--registry=file", "--registry_address="+file)
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binPath, "sidecar", "--address=127.0.0.1:0", "--registry=file", "--registry_address="+file, "--server_name=piped", "--server_address=127.0.0.1:9090")
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	p := &proc{t: t, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-p.done })
	go io.Copy(p.log, pr)
	waitFor(t, 10*time.Second, "piped on the other sidecar", func() bool { return lookup(t, other, "piped") != nil })
	pr.Close()
	if code := p.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status after SIGTERM with the log pipe closed: %d; want 0", code)
	}
	waitFor(t, 5*time.Second, "piped to leave the other sidecar's view", func() bool { return lookup(t, other, "piped") == nil })
}

func TestEnvironmentVariablesAndFlagPrecedence(t *testing.T) {
	p := startSidecarEnv(t, []string{"MICRO_SERVER_NAME=fromenv", "MICRO_SERVER_ADDRESS=127.0.0.1:9090", "MICRO_REGISTRY=memory"})
	if s := lookup(t, p, "fromenv"); s == nil || s.Nodes[0].Port != 9090 {
		t.Fatalf("service from MICRO_SERVER_NAME: got %+v", s)
	}
	// TestMain sets MICRO_REGISTRY_ADDRESS, which the memory registry has
	// no use for: the sidecar says so, and starts.
	if !strings.Contains(p.log.String(), "ignoring a variable: MICRO_REGISTRY_ADDRESS has no effect without --registry=file or --registry=etcd") {
		t.Errorf("no warning about MICRO_REGISTRY_ADDRESS; log: %s", p.log.String())
	}
	q := startSidecarEnv(t, []string{"MICRO_SERVER_NAME=fromenv", "MICRO_SERVER_ADDRESS=127.0.0.1:9090", "MICRO_REGISTRY=memory"}, "--server_name=fromflag")
	if lookup(t, q, "fromflag") == nil || lookup(t, q, "fromenv") != nil {
		t.Fatalf("the flag must win over MICRO_SERVER_NAME; registry: %v", q.log.String())
	}
	cmd := exec.Command(binPath, "sidecar")
	cmd.Env = append(os.Environ(), "MICRO_HEALTHCHECK_INTERVAL=soon")
	out, _ := cmd.CombinedOutput()
	if cmd.ProcessState.ExitCode() != 2 || !strings.Contains(string(out), `MICRO_HEALTHCHECK_INTERVAL="soon": want a duration such as 10s`) {
		t.Errorf("a bad variable must be named: exit %d, %s", cmd.ProcessState.ExitCode(), out)
	}
}

// TestSeedDiscovery follows the seed README: a sidecar for app foo, and a
// lookup of a service registered by hand in the older key spelling, with
// go-micro's endpoints (taken and ignored).
func TestSeedDiscovery(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--server_name=foo", "--server_address=127.0.0.1:9090")
	id := appID(t, p)
	if !regexp.MustCompile(`^foo-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`).MatchString(id) {
		t.Errorf("app id %q: want foo-<uuid>", id)
	}
	code, body := do(t, "POST", p.url("/registry"), "application/json",
		`{"Name":"go.micro.srv.example","Endpoints":[{"Name":"Example.Call"}],"Nodes":[{"Id":"go.micro.srv.example-c5718d29","Address":"127.0.0.1:60728"}]}`)
	if code != 200 {
		t.Fatalf("register: %d %s", code, body)
	}
	code, body = do(t, "GET", p.url("/registry?service=go.micro.srv.example"), "", "")
	want := `{"name":"go.micro.srv.example","version":"","metadata":{},"nodes":[{"id":"go.micro.srv.example-c5718d29","address":"127.0.0.1","port":60728,"metadata":{}}]}`
	if code != 200 || strings.TrimSpace(body) != want {
		t.Errorf("lookup: got %d %s; want 200 %s", code, body, want)
	}
	if s := lookup(t, p, "foo"); !hasNode(s, id) || s.Nodes[0].Address != "127.0.0.1" || s.Nodes[0].Port != 9090 {
		t.Errorf("app foo: got %+v; want node %s at 127.0.0.1:9090", s, id)
	}
	code, body = do(t, "GET", p.url("/registry"), "", "")
	var all []Service
	if err := json.Unmarshal([]byte(body), &all); code != 200 || err != nil || len(all) != 2 {
		t.Errorf("list: got %d %s; want both services", code, body)
	}
}

func TestRegistryVersionsStayApart(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	for _, body := range []string{
		`{"name":"greeter","version":"1.0.0","metadata":{"protocol":"json"},"nodes":[{"id":"g2","address":"10.0.0.1","port":80}]}`,
		`{"name":"greeter","version":"2.0.0","metadata":{"protocol":"json","since":"2"},"nodes":[{"id":"g1","address":"10.0.0.2","port":80}]}`,
	} {
		if code, out := do(t, "POST", p.url("/registry"), "", body); code != 200 {
			t.Fatalf("register: %d %s", code, out)
		}
	}
	merged := lookup(t, p, "greeter")
	if merged == nil || len(merged.Nodes) != 2 || merged.Nodes[0].Version != "1.0.0" || merged.Nodes[1].Version != "2.0.0" {
		t.Errorf("merged lookup: got %+v; want both nodes, each with its version", merged)
	}
	if merged != nil && !reflect.DeepEqual(merged.Metadata, map[string]string{"protocol": "json", "since": "2"}) {
		t.Errorf("merged lookup's metadata: %v; want that of g1, the node whose id sorts first", merged.Metadata)
	}
	code, body := do(t, "GET", p.url("/registry?service=greeter&version=2.0.0"), "", "")
	var v2 Service
	json.Unmarshal([]byte(body), &v2)
	if code != 200 || v2.Version != "2.0.0" || len(v2.Nodes) != 1 || v2.Nodes[0].ID != "g1" {
		t.Errorf("version 2.0.0: got %d %s", code, body)
	}
	for query, want := range map[string]string{
		"&version=3": "service greeter has no nodes of version 3",
		"&version=":  "service greeter has no nodes without a version",
		"x&version=": "service greeterx not found",
	} {
		if code, body := do(t, "GET", p.url("/registry?service=greeter"+query), "", ""); code != 404 || !strings.Contains(body, want) {
			t.Errorf("%s: got %d %s; want 404 saying %q", query, code, body, want)
		}
	}
}

func TestRegistryErrors(t *testing.T) {
	p := startSidecar(t, "--registry=memory", "--max_body_bytes=1000")
	for _, tc := range []struct {
		method, path, body string
		code               int
		detail             string
	}{
		{"POST", "/registry", `{"name":`, 400, "invalid service JSON"},
		{"GET", "/broker/stats?x=1", "", 400, `query parameter "x" is not one GET /broker/stats takes (it takes none)`},
		{"POST", "/registry", `name=x`, 400, `the body must be a service as a JSON object, such as {"name":"foo",`},
		{"DELETE", "/registry", `name=x`, 400, `the body must be a service as a JSON object`},
		{"POST", "/registry", `{"nodes":[{"id":"a","address":"h","port":1}]}`, 400, "name is required"},
		{"POST", "/registry", `{"name":"x","nodes":[{"address":"h","port":1}]}`, 400, "nodes[0]: id is required"},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","port":1}]}`, 400, "nodes[0]: address is required"},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h","port":70000}]}`, 400, "port 70000 out of range"},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h"}]}`, 400, "port 0 out of range"},
		{"POST", "/registry", `{"name":"x","nodes":[]}`, 400, "at least one node"},
		{"POST", "/registry", `{"name":"сервис","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `use up to 255 printable ASCII characters`},
		{"POST", "/registry", `{"name":"x","version":"1\n2","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `version "1\n2": use printable ASCII characters`},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h:+80"}]}`, 400, "port must be 1-65535"},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h:080"}]}`, 400, "port must be 1-65535"},
		{"POST", "/registry", `{"name":"x"} {}`, 400, "trailing data"},
		{"POST", "/registry", "{\"name\":\"x\",\"nodes\":[{\"id\":\"a\",\"address\":\"h\",\"port\":1,\"metadata\":{\"k\":\"caf\xe9\"}}]}", 400, "not UTF-8"},
		{"POST", "/registry?ttl=soon", `{"name":"x","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `ttl "soon"`},
		{"POST", "/registry?ttl=0s", `{"name":"x","nodes":[{"id":"a","address":"h","port":1}]}`, 400, "between 1s and 24h"},
		{"POST", "/registry?ttl=%zz", `{"name":"x","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `invalid URL escape "%zz"`},
		{"GET", "/registry?service=a&service=b", "", 400, "service is given 2 times"},
		{"GET", "/registry?servce=a", "", 400, `query parameter "servce" is not one GET /registry takes (it takes service, version, watch)`},
		{"POST", "/registry?TTL=5s", `{"name":"x","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `query parameter "TTL" is not one POST /registry takes (it takes ttl)`},
		{"DELETE", "/registry?ttl=1s", `{"name":"x","nodes":[{"id":"a"}]}`, 400, "(it takes none)"},
		{"POST", "/registry", `{"name":"x","metadata":{"k":"` + strings.Repeat("v", 2000) + `"}}`, 413, "larger than 1000 bytes"},
		{"DELETE", "/registry", `{"name":"x"}`, 400, "ids of the nodes"},
		{"POST", "/registry", `{"name":"x","verison":"1","nodes":[{"id":"a","address":"h","port":1}]}`, 400, `unknown key "verison": a service has name, version`},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h","port":1,"metdata":{}}]}`, 400, `unknown key "metdata"`},
		{"DELETE", "/registry", `{"name":"x","verison":"1","nodes":[{"id":"a"}]}`, 400, `unknown key "verison"`},
		{"POST", "/registry", `{"name":"x","nodes":[{"id":"a","address":"h","port":1.5}]}`, 400, `nodes.port: the JSON number 1.5 where an integer should be`},
		{"POST", "/registry", `{"name":"x","nodes":[5]}`, 400, `nodes: a JSON number where an object should be`},
		{"POST", "/registry", `{"name":"x","version":"1","nodes":[{"id":"a","address":"h","port":1,"version":"2"}]}`, 400, `nodes[0]: version "2" is not the service's "1"`},
		{"DELETE", "/registry", `{"name":"a b","nodes":[{"id":"a"}]}`, 400, `name "a b": use up to`},
		{"DELETE", "/registry", `{"name":"x","nodes":[{"id":"a/b"}]}`, 400, `nodes[0]: id "a/b": use up to`},
		{"GET", "/registry?service=missing", "", 404, "service missing not found"},
		{"GET", "/registry?watch=1", "", 400, "WebSocket upgrade"},
		{"GET", "/registry?watch=0", "", 400, "use watch=1 to watch"},
		{"GET", "/registry?watch=1&service=", "", 400, "service is empty"},
		{"GET", "/registry?watch=1&service=a&version=1", "", 400, "leave version out"},
		{"PATCH", "/registry", "", 405, "method PATCH not allowed"},
		{"GET", "/nowhere", "", 404, "no endpoint at /nowhere"},
	} {
		t.Run(tc.method+" "+tc.path+" "+truncate(tc.body, 40), func(t *testing.T) {
			code, body := do(t, tc.method, p.url(tc.path), "application/json", tc.body)
			var e errorBody
			if err := json.Unmarshal([]byte(body), &e); err != nil {
				t.Fatalf("answer is not the error shape: %s", body)
			}
			if code != tc.code || e.Code != tc.code || e.ID != "go.micro.sidecar" || e.Status != http.StatusText(tc.code) || !strings.Contains(e.Detail, tc.detail) {
				t.Errorf("got %d %s; want %d with detail containing %q", code, body, tc.code, tc.detail)
			}
		})
	}
	resp, err := http.Post(p.url("/health"), "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 405 || resp.Header.Get("Allow") != "GET, HEAD" {
		t.Errorf("POST /health: got %d Allow %q; want 405 Allow \"GET, HEAD\"", resp.StatusCode, resp.Header.Get("Allow"))
	}
	if lookup(t, p, "x") != nil {
		t.Error("a refused registration must leave nothing behind")
	}
}

func TestRegistrationTTLAndDeregister(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	svc := `{"name":"short","nodes":[{"id":"s1","address":"127.0.0.1","port":7000}]}`
	if code, body := do(t, "POST", p.url("/registry?ttl=1s"), "", svc); code != 200 {
		t.Fatalf("register: %d %s", code, body)
	}
	if !hasNode(lookup(t, p, "short"), "s1") {
		t.Fatal("registered node not found")
	}
	waitFor(t, 5*time.Second, "the 1s registration to expire", func() bool { return lookup(t, p, "short") == nil })

	do(t, "POST", p.url("/registry"), "", svc)
	if code, body := do(t, "DELETE", p.url("/registry"), "", `{"name":"short","nodes":[{"id":"s1"}]}`); code != 200 || strings.Contains(body, "null") {
		t.Fatalf("deregister: %d %s; want 200 echoing the service with {} for empty metadata", code, body)
	}
	if lookup(t, p, "short") != nil {
		t.Error("deregistered node still found")
	}
}

// TestFileRegistrySharedBySidecars runs three sidecars on one registry file:
// each sees the others' apps; SIGKILL takes an app away within one TTL and
// SIGTERM at once, with exit status 0.
// TestAppEntryLapsedIsNotRegistered: when the registry refuses the
// refreshes (a newer sidecar took the file over) and the app's entry
// lapses, /health and /metrics stop saying the app is registered.
func TestAppEntryLapsedIsNotRegistered(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--register_ttl=2s", "--register_interval=300ms",
		"--server_name=lapsing", "--server_address=127.0.0.1:9090")
	appRegistered := func() bool {
		_, body := do(t, "GET", p.url("/health"), "", "")
		var rep healthReport
		if err := json.Unmarshal([]byte(body), &rep); err != nil || rep.App == nil {
			t.Fatalf("/health: %v %s", err, body)
		}
		return rep.App.Registered
	}
	if !appRegistered() {
		t.Fatal("the app is not registered at the start")
	}
	if err := os.WriteFile(file, []byte(`{"format":2,"records":[]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the app's entry to lapse", func() bool { return lookup(t, p, "lapsing") == nil })
	if appRegistered() {
		t.Error("/health says registered while the app's entry is gone from the registry")
	}
	if _, body := do(t, "GET", p.url("/metrics"), "", ""); !strings.Contains(body, `micro_app_healthy{service="lapsing"} 0`) {
		t.Errorf("micro_app_healthy while the entry is gone: want 0 in\n%s", body)
	}
}

// TestFileRegistryDeletedByHand: a registry file deleted or emptied by
// hand under running sidecars is said in their logs, and each writes its
// own entries again at once rather than at its next refresh (20 s here).
func TestFileRegistryDeletedByHand(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	common := []string{"--registry=file", "--registry_address=" + file, "--register_ttl=60s"}
	a := startSidecar(t, append(common, "--server_name=kept", "--server_address=127.0.0.1:9090")...)
	b := startSidecar(t, common...)
	waitFor(t, 5*time.Second, "b to see kept", func() bool { return lookup(t, b, "kept") != nil })
	for _, wipe := range []func() error{
		func() error { return os.Remove(file) },
		func() error { return os.WriteFile(file, nil, 0o644) },
	} {
		if err := wipe(); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 5*time.Second, "kept written again", func() bool {
			data, _ := os.ReadFile(file)
			return strings.Contains(string(data), `"kept"`)
		})
		waitFor(t, 5*time.Second, "b to see kept again", func() bool { return lookup(t, b, "kept") != nil })
	}
	if !strings.Contains(a.log.String(), "deleted or emptied") {
		t.Errorf("the wipe is not said in the log:\n%s", a.log.String())
	}
}

// TestFileRegistryRollingRestartKeepsTheNode: a new sidecar started with
// the app's fixed --server_id before the old one stops keeps the node in
// discovery: the old one's goodbye removes the entry, and the new one
// writes it again at once, not at its next refresh (20 s here).
func TestFileRegistryRollingRestartKeepsTheNode(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	fresh := rollingRestart(t, true, "--registry=file", "--registry_address="+file)
	if !hasNode(lookup(t, fresh, "web"), "web-1") {
		t.Error("web-1 is not in discovery after the old sidecar stopped")
	}
}

// TestFileRegistryNodeKeptByTwoSidecarsIsSaid: as with etcd, one node id
// kept alive through two sidecars sharing a file, with different values,
// is overwritten by each at every refresh; each sidecar says so in its
// log, once. A ?ttl= entry posted through both is no such fight.
func TestFileRegistryNodeKeptByTwoSidecarsIsSaid(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	common := []string{"--registry=file", "--registry_address=" + file, "--register_ttl=3s", "--register_interval=300ms"}
	a, b := startSidecar(t, common...), startSidecar(t, common...)
	registerNode(t, a, "?ttl=30s", "leased", "l1", 3333)
	registerNode(t, b, "?ttl=30s", "leased", "l1", 4444)
	registerNode(t, a, "?ttl=30s", "leased", "l1", 3333) // a client heartbeating through either
	registerNode(t, a, "", "dup", "d1", 1111)
	registerNode(t, b, "", "dup", "d1", 2222)
	const warning = "rewritten by another writer"
	waitFor(t, 10*time.Second, "both sidecars to say the node is contested", func() bool {
		return strings.Contains(a.log.String(), warning) && strings.Contains(b.log.String(), warning)
	})
	events := watchEvents(t, a)        // the entries as they are (creates), then changes
	for rewrites := 0; rewrites < 6; { // a few more refreshes, each a rewrite the other sees
		select {
		case ev := <-events:
			switch {
			case ev.Service.Name == "leased" && ev.Action != "create":
				t.Errorf("the ?ttl= entry changed: %+v", ev)
			case ev.Service.Name == "dup" && ev.Action == "update":
				rewrites++
			}
		case <-time.After(10 * time.Second):
			t.Fatal("no rewrite of the contested node within 10 s")
		}
	}
	for _, p := range []*proc{a, b} {
		if n := strings.Count(p.log.String(), warning); n != 1 {
			t.Errorf("%s said it %d times; want once:\n%s", p.addr, n, p.log.String())
		}
	}
	if strings.Contains(a.log.String(), "leased") || strings.Contains(b.log.String(), "leased") {
		t.Errorf("a ?ttl= entry posted through two sidecars was called contested:\n%s\n%s", a.log.String(), b.log.String())
	}
}

// rollingRestart starts two sidecars of app web with a fixed
// --server_id, a long refresh interval and the registry flags given,
// stops the first, and wants the second to see the goodbye (a delete)
// and put the node back (a create) within 5 s, or with blip false, to
// see nothing of it. It returns the second.
func rollingRestart(t *testing.T, blip bool, registry ...string) *proc {
	t.Helper()
	args := append(registry, "--register_ttl=60s", "--server_name=web", "--server_id=web-1", "--server_address=127.0.0.1:9090")
	old := startSidecar(t, args...)
	fresh := startSidecar(t, args...)
	events := watchEvents(t, fresh)
	if ev := <-events; ev.Action != "create" || !hasNode(&ev.Service, "web-1") {
		t.Fatalf("first event: %+v; want web-1 created", ev)
	}
	if code := old.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("the old sidecar's exit status: %d", code)
	}
	timeout := time.After(5 * time.Second)
	if !blip {
		// No event of web-1 comes before a marker registered after the
		// old sidecar ended: a watch's events come in order.
		registerNode(t, fresh, "", "marker", "m1", 7001)
		for {
			select {
			case ev := <-events:
				if hasNode(&ev.Service, "m1") {
					for _, p := range []*proc{old, fresh} {
						if strings.Contains(p.log.String(), "another writer") {
							t.Errorf("two sidecars keeping web-1 alike were said to fight:\n%s", p.log.String())
						}
					}
					return fresh
				}
				t.Errorf("event %+v; want web-1 kept as it was through the restart", ev)
			case <-timeout:
				t.Fatal("no create of the marker within 5 s")
			}
		}
	}
	for _, want := range []string{"delete", "create"} {
		select {
		case ev := <-events:
			if ev.Action != want || !hasNode(&ev.Service, "web-1") {
				t.Fatalf("event %+v; want web-1's %s", ev, want)
			}
		case <-timeout:
			t.Fatalf("no %s of web-1 within 5 s", want)
		}
	}
	return fresh
}

func TestFileRegistrySharedBySidecars(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	common := []string{"--registry=file", "--registry_address=" + file, "--register_ttl=2s", "--register_interval=300ms"}
	var ps []*proc
	var ids []string
	for i := range 3 {
		p := startSidecar(t, append(common, fmt.Sprintf("--server_name=app%d", i), fmt.Sprintf("--server_address=127.0.0.1:%d", 9000+i))...)
		ps = append(ps, p)
		ids = append(ids, appID(t, p))
	}
	for _, p := range ps {
		for i, id := range ids {
			waitFor(t, 2*time.Second, fmt.Sprintf("%s to see app%d", p.addr, i), func() bool { return hasNode(lookup(t, p, fmt.Sprintf("app%d", i)), id) })
		}
	}
	// Read back from the file, an entry looks as every other registry shows it.
	if _, body := do(t, "GET", ps[0].url("/registry?service=app1"), "", ""); strings.Contains(body, "null") || !strings.Contains(body, `"metadata":{}`) {
		t.Errorf("app1 as read from the file: %s; want metadata {} and no null", body)
	}

	start := time.Now()
	ps[1].stop(syscall.SIGKILL)
	waitFor(t, 5*time.Second, "the killed sidecar's app to expire", func() bool { return lookup(t, ps[0], "app1") == nil })
	if took := time.Since(start); took > 2*time.Second+500*time.Millisecond {
		t.Errorf("app1 vanished %v after SIGKILL; want within the 2s TTL", took)
	}
	if !hasNode(lookup(t, ps[0], "app2"), ids[2]) {
		t.Error("a live sidecar's app was lost")
	}

	if code := ps[2].stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status after SIGTERM: %d; want 0", code)
	}
	waitFor(t, 500*time.Millisecond, "app2 to go at once after SIGTERM", func() bool { return lookup(t, ps[0], "app2") == nil })
	if !strings.Contains(ps[2].log.String(), "Shutting down") {
		t.Error("shutdown not logged")
	}
}

func TestCorruptRegistryFileIsKeptAside(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "registry.json")
	os.WriteFile(file, []byte("{not json"), 0o644)
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--server_name=foo", "--server_address=127.0.0.1:9090")
	// The sidecar registers its app just after it starts listening.
	waitFor(t, 5*time.Second, "the sidecar to keep working after a corrupt file, with foo registered", func() bool { return lookup(t, p, "foo") != nil })
	aside, _ := filepath.Glob(file + ".corrupt-*")
	if len(aside) != 1 {
		t.Fatalf("corrupt file not kept aside: %v", aside)
	}
	if data, _ := os.ReadFile(aside[0]); string(data) != "{not json" {
		t.Errorf("kept-aside content: %q", data)
	}
	if !strings.Contains(p.log.String(), "registry file was corrupt") {
		t.Error("corruption not reported in the log")
	}
}

// TestUnreadableRegistryFileStopsTheStart: a registry path that cannot be
// read at start is a wrong flag; the sidecar says so, naming the path once.
func TestUnreadableRegistryFileStopsTheStart(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	os.Mkdir(file, 0o755)
	code, out := run(t, "sidecar", "--address=127.0.0.1:0", "--registry=file", "--registry_address="+file)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if last := lines[len(lines)-1]; code == 0 || !strings.Contains(last, "is a directory") || strings.Count(last, file) != 1 {
		t.Errorf("start with a directory as the registry file: exit %d, output %q; want a failure naming the path once", code, out)
	}
}

// TestRegistryPathThatIsNoFileStopsTheStart: a registry path naming a
// named pipe (or a device, such as /dev/null) stops the start with the
// reason, and is left as it was: a write renames a file onto the path,
// and a pipe's read would hang the start.
func TestRegistryPathThatIsNoFileStopsTheStart(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "registry.json")
	if err := syscall.Mkfifo(fifo, 0o644); err != nil {
		t.Skipf("no named pipe: %v", err)
	}
	code, out := run(t, "sidecar", "--address=127.0.0.1:0", "--registry=file", "--registry_address="+fifo)
	if code == 0 || !strings.Contains(out, "is a named pipe, not a regular file") {
		t.Errorf("start with a named pipe as the registry file: exit %d, output %q; want a failure saying so", code, out)
	}
	if fi, err := os.Lstat(fifo); err != nil || fi.Mode()&os.ModeNamedPipe == 0 {
		t.Errorf("the named pipe is no longer one: %v %v", fi.Mode(), err)
	}
}

// TestStoppedWhileWaitingForTheRegistryLock: a sidecar stopped while it
// waits at start for the file registry's lock, held by a stuck process,
// exits at once, without listening.
func TestStoppedWhileWaitingForTheRegistryLock(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	unlock, err := lockFile(file + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	stopWhileStarting(t, "waiting for the lock", "--address=127.0.0.1:0", "--registry=file", "--registry_address="+file)
}

// stopWhileStarting starts a sidecar with args, waits for its log to say
// waiting (it waits at start for its registry, at most 3 s), sends it
// SIGTERM, and wants it to exit 0 at once, without listening or
// registering.
func stopWhileStarting(t *testing.T, waiting string, args ...string) {
	t.Helper()
	cmd := exec.Command(binPath, append([]string{"sidecar"}, args...)...)
	log := &syncBuffer{}
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waitFor(t, 4*time.Second, "the sidecar to say "+waiting, func() bool { return strings.Contains(log.String(), waiting) })
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("exit after SIGTERM at start: %v\n%s", err, log.String())
		}
	case <-time.After(2 * time.Second): // the waits at start last 3 s and more
		cmd.Process.Kill()
		t.Fatalf("still running 2 s after SIGTERM:\n%s", log.String())
	}
	if !strings.Contains(log.String(), "Stopped before listening") || strings.Contains(log.String(), "Listening on") || strings.Contains(log.String(), "Registering") {
		t.Errorf("want a stop before listening or registering:\n%s", log.String())
	}
}

// healthyApp is an HTTP app whose health endpoint can fail or hang.
type healthyApp struct {
	srv   *httptest.Server
	state atomic.Int32 // 0 healthy, 1 failing, 2 hanging
}

func newHealthyApp(t *testing.T) *healthyApp {
	a := &healthyApp{}
	release := make(chan struct{})
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch a.state.Load() {
		case 1:
			http.Error(w, "down", http.StatusInternalServerError)
		case 2:
			select {
			case <-release:
			case <-r.Context().Done():
			}
		default:
			io.WriteString(w, "ok")
		}
	}))
	t.Cleanup(func() { close(release); a.srv.Close() })
	return a
}

func TestHealthCheckTakesAppOutAndBack(t *testing.T) {
	app := newHealthyApp(t)
	addr := strings.TrimPrefix(app.srv.URL, "http://")
	p := startSidecar(t, "--registry=memory", "--server_name=web", "--server_address="+addr,
		"--healthcheck_url="+app.srv.URL+"/_status/health", "--healthcheck_interval=100ms",
		"--healthcheck_timeout=300ms", "--healthcheck_failures=2", "--healthcheck_successes=2")
	if !strings.Contains(p.log.String(), "Starting sidecar healthchecker") {
		t.Error("the health checker's start is not logged")
	}
	waitFor(t, 5*time.Second, "registration after the first pass", func() bool { return lookup(t, p, "web") != nil })
	assertHealth(t, p, 200, "passing")

	for _, state := range []int32{1, 2} { // failing, then hanging
		app.state.Store(state)
		waitFor(t, 5*time.Second, fmt.Sprintf("deregistration in state %d", state), func() bool { return lookup(t, p, "web") == nil })
		assertHealth(t, p, 503, "failing")
		app.state.Store(0)
		waitFor(t, 5*time.Second, "registration after recovery", func() bool { return lookup(t, p, "web") != nil })
	}
	if n := strings.Count(p.log.String(), "app is unhealthy"); n != 2 {
		t.Errorf("logged 'app is unhealthy' %d times for 2 outages; want once each", n)
	}
	if !strings.Contains(p.log.String(), "no answer within 300ms") {
		t.Error("a hanging check should fail with its timeout")
	}
}

func TestTCPHealthCheckAndStartUnhealthy(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens yet: the app starts unhealthy
	p := startSidecar(t, "--registry=memory", "--server_name=tcpapp", "--server_address="+addr,
		"--healthcheck_url=tcp://"+addr, "--healthcheck_interval=100ms")
	waitFor(t, 5*time.Second, "the first failed check", func() bool { return strings.Contains(p.log.String(), "app is not healthy yet") })
	if lookup(t, p, "tcpapp") != nil {
		t.Fatal("an app that never passed must not be registered")
	}
	assertHealth(t, p, 503, "failing")
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Skipf("could not listen on %s again: %v", addr, err)
	}
	defer ln.Close()
	waitFor(t, 5*time.Second, "registration once the port accepts", func() bool { return lookup(t, p, "tcpapp") != nil })
	if strings.Contains(p.log.String(), "Deregistering") {
		t.Error("an app that failed before it ever passed was reported as deregistered")
	}
}

// TestAppRegistrationIsRetried: a registration of the app the registry
// refuses (here a full table) is tried again until it goes through, and
// /health says so meanwhile.
func TestAppRegistrationIsRetried(t *testing.T) {
	app := newHealthyApp(t)
	app.state.Store(1) // failing until the table is full
	addr := strings.TrimPrefix(app.srv.URL, "http://")
	p := startSidecar(t, "--registry=memory", "--registry_max_nodes=1", "--server_name=web", "--server_address="+addr,
		"--healthcheck_url="+app.srv.URL+"/h", "--healthcheck_interval=100ms", "--healthcheck_failures=1")
	filler := `{"name":"filler","nodes":[{"id":"f1","address":"127.0.0.1","port":1}]}`
	if c, body := do(t, "POST", p.url("/registry"), "application/json", filler); c != 200 {
		t.Fatalf("filling the table: %d %s", c, body)
	}
	app.state.Store(0)
	report := func() appHealth {
		var rep healthReport
		_, body := do(t, "GET", p.url("/health"), "", "")
		json.Unmarshal([]byte(body), &rep)
		if rep.App == nil {
			return appHealth{}
		}
		return *rep.App
	}
	waitFor(t, 5*time.Second, "the refusal in /health", func() bool {
		a := report()
		return a.Status == healthPassing && !a.Registered && strings.Contains(a.RegistrationError, "full")
	})
	if c, _ := do(t, "GET", p.url("/health"), "", ""); c != 503 {
		t.Errorf("/health %d while the app is refused; want 503", c)
	}
	if c, body := do(t, "DELETE", p.url("/registry"), "application/json", filler); c != 200 {
		t.Fatalf("emptying the table: %d %s", c, body)
	}
	waitFor(t, 5*time.Second, "the retried registration", func() bool { return lookup(t, p, "web") != nil })
	if a := report(); !a.Registered || a.RegistrationError != "" {
		t.Errorf("/health app after the retry: %+v; want registered, no error", a)
	}
	if n := strings.Count(p.log.String(), "retrying until it succeeds"); n != 1 {
		t.Errorf("the refusal was logged %d times; want once", n)
	}
	if !strings.Contains(p.log.String(), "after the registry refused it") {
		t.Error("the late registration is not logged")
	}
	if !strings.Contains(p.log.String(), "address="+addr) {
		t.Errorf("the registration's log line does not give the app's host:port %s", addr)
	}
	id := appID(t, p)
	do(t, "DELETE", p.url("/registry"), "application/json", `{"name":"web","nodes":[{"id":"`+id+`","address":"`+addr+`"}]}`)
	if a := report(); a.Registered {
		t.Errorf("/health says registered after a DELETE of the app's node: %+v", a)
	}

	// A DELETE while a refused registration waits for its retry calls the
	// retry off: the DELETE is final until the app's health changes.
	app.state.Store(1)
	waitFor(t, 5*time.Second, "the app failing", func() bool { return report().Status == healthFailing })
	if c, body := do(t, "POST", p.url("/registry"), "application/json", filler); c != 200 {
		t.Fatalf("filling the table again: %d %s", c, body)
	}
	app.state.Store(0)
	waitFor(t, 5*time.Second, "the refusal in /health again", func() bool { return report().RegistrationError != "" })
	if c, body := do(t, "DELETE", p.url("/registry"), "application/json", `{"name":"web","nodes":[{"id":"`+id+`"}]}`); c != 200 {
		t.Fatalf("DELETE of the app's node: %d %s", c, body)
	}
	if a := report(); a.RegistrationError != "" {
		t.Errorf("/health after the DELETE: %+v; want the retry called off, no registration_error", a)
	}
	do(t, "DELETE", p.url("/registry"), "application/json", filler)
	// The first retry comes 1 s after the refusal: over twice that, the app
	// must stay out (a wait for something not to happen).
	for end := time.Now().Add(2500 * time.Millisecond); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if s := lookup(t, p, "web"); s != nil {
			t.Fatalf("a retry registered the app after a DELETE of its node: %+v", s)
		}
	}
}

// TestHealthCheckHidesThePassword: a password or a query value (an API
// key) in --healthcheck_url shows in no log line and not in /health, which
// answers without the token, not even in a failed connection's error; and
// /health gives the last check's duration even when it took under a
// millisecond.
func TestHealthCheckHidesThePassword(t *testing.T) {
	app := newHealthyApp(t)
	addr := strings.TrimPrefix(app.srv.URL, "http://")
	p := startSidecar(t, "--registry=memory", "--server_name=pw", "--server_address="+addr,
		"--healthcheck_url=http://user:s3cr3t@"+addr+"/h?apikey=t0ken&v=1", "--healthcheck_interval=100ms", "--healthcheck_failures=1")
	assertHealth(t, p, 200, "passing")
	app.state.Store(1)
	assertHealth(t, p, 503, "failing")
	if !strings.Contains(p.log.String(), "app is unhealthy") || !strings.Contains(p.log.String(), "xxxxx:xxxxx@") || !strings.Contains(p.log.String(), "apikey=xxxxx&v=xxxxx") {
		t.Errorf("the health changes are not logged with the redacted URL:\n%s", p.log.String())
	}
	_, body := do(t, "GET", p.url("/health"), "", "")
	if !strings.Contains(body, `"last_duration_ms":`) {
		t.Errorf("/health without last_duration_ms after checks: %s", body)
	}
	app.srv.Close() // refused connections: an error that quotes the URL
	waitFor(t, 5*time.Second, "a refused check in /health", func() bool {
		_, body = do(t, "GET", p.url("/health"), "", "")
		return strings.Contains(body, "refused")
	})
	for what, text := range map[string]string{"log": p.log.String(), "/health": body} {
		if strings.Contains(text, "s3cr3t") || strings.Contains(text, "t0ken") {
			t.Errorf("a secret of the URL is in the %s:\n%s", what, text)
		}
	}
}

// TestHealthCheckOverHTTPS: an https:// check passes on an app with a
// self-signed certificate, as Kubernetes' probes do: it asks whether the
// app answers, not who it is.
func TestHealthCheckOverHTTPS(t *testing.T) {
	app := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok") }))
	defer app.Close()
	addr := strings.TrimPrefix(app.URL, "https://")
	p := startSidecar(t, "--registry=memory", "--server_name=tls", "--server_address="+addr,
		"--healthcheck_url="+app.URL+"/health", "--healthcheck_interval=100ms")
	assertHealth(t, p, 200, "passing")
}

func assertHealth(t *testing.T, p *proc, code int, appStatus string) {
	t.Helper()
	var rep healthReport
	waitFor(t, 5*time.Second, fmt.Sprintf("/health %d with app %s", code, appStatus), func() bool {
		c, body := do(t, "GET", p.url("/health"), "", "")
		rep = healthReport{}
		json.Unmarshal([]byte(body), &rep)
		return c == code && rep.App != nil && rep.App.Status == appStatus
	})
}

func TestWatchStreamsChanges(t *testing.T) {
	p := startSidecar(t, "--registry=memory")
	do(t, "POST", p.url("/registry"), "", `{"name":"early","nodes":[{"id":"e1","address":"127.0.0.1","port":1}]}`)
	ws, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1", "", "http://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	next := func() Event {
		t.Helper()
		ws.SetReadDeadline(time.Now().Add(5 * time.Second))
		var ev Event
		if err := websocket.JSON.Receive(ws, &ev); err != nil {
			t.Fatalf("reading event: %v", err)
		}
		return ev
	}
	if ev := next(); ev.Action != "create" || ev.Service.Name != "early" {
		t.Errorf("first event: got %+v; want create of the existing service", ev)
	}
	do(t, "POST", p.url("/registry"), "", `{"name":"late","nodes":[{"id":"l1","address":"127.0.0.1","port":2}]}`)
	if ev := next(); ev.Action != "create" || ev.Service.Name != "late" || ev.Service.Nodes[0].ID != "l1" {
		t.Errorf("after register: got %+v; want create late/l1", ev)
	}
	do(t, "POST", p.url("/registry"), "", `{"name":"late","nodes":[{"id":"l1","address":"127.0.0.1","port":3}]}`)
	if ev := next(); ev.Action != "update" || ev.Service.Nodes[0].Port != 3 {
		t.Errorf("after re-register on a new port: got %+v; want update", ev)
	}
	do(t, "DELETE", p.url("/registry"), "", `{"name":"late","nodes":[{"id":"l1"}]}`)
	if ev := next(); ev.Action != "delete" || ev.Service.Name != "late" {
		t.Errorf("after deregister: got %+v; want delete", ev)
	}

	// A watch of one service sees only that service; shutdown closes it
	// with going-away.
	one, err := websocket.Dial("ws://"+p.addr+"/registry?watch=1&service=only", "", "http://"+p.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer one.Close()
	do(t, "POST", p.url("/registry"), "", `{"name":"other","nodes":[{"id":"o1","address":"127.0.0.1","port":2}]}`)
	do(t, "POST", p.url("/registry"), "", `{"name":"only","nodes":[{"id":"x1","address":"127.0.0.1","port":2}]}`)
	one.SetReadDeadline(time.Now().Add(5 * time.Second))
	var ev Event
	if err := websocket.JSON.Receive(one, &ev); err != nil || ev.Service.Name != "only" {
		t.Errorf("filtered watch: got %+v, %v; want only the watched service", ev, err)
	}
	if code := p.stop(syscall.SIGTERM); code != 0 {
		t.Errorf("exit status %d with watchers connected; want 0", code)
	}
	if _, err := io.ReadAll(one); err != nil && !strings.Contains(err.Error(), "EOF") {
		t.Logf("read after shutdown: %v", err)
	}
}

// TestDependencies guards the design card: the standard library and
// golang.org/x/net, nothing else.
func TestDependencies(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if pkg := sc.Text(); pkg != "micro" && !strings.HasPrefix(pkg, "golang.org/x/net/") {
			t.Errorf("dependency %s is outside the standard library and golang.org/x/net", pkg)
		}
	}
	mod, _ := os.ReadFile("go.mod")
	if n := strings.Count(string(mod), "\t") + strings.Count(string(mod), "require "); n != 1 {
		t.Errorf("go.mod must require golang.org/x/net alone:\n%s", mod)
	}
}

// TestScratchImage shows the binary runs in an empty root with an empty
// environment, as in a FROM scratch image: no /tmp, no /etc, no HOME; and
// with HOME=/, as Docker sets it there, where the README says its file
// registry is.
func TestScratchImage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root; skipping the scratch-image test")
	}
	data, err := os.ReadFile(binPath)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		env  []string
		file string // the file registry's default path
	}{
		{[]string{}, "micro-registry.json"},
		{[]string{"HOME=/"}, ".cache/micro/registry.json"},
	} {
		t.Run(fmt.Sprint(c.env), func(t *testing.T) {
			root := t.TempDir()
			if err := os.WriteFile(filepath.Join(root, "micro"), data, 0o755); err != nil {
				t.Fatal(err)
			}
			p := startChrooted(t, root, c.env)
			if code, body := do(t, "POST", p.url("/registry"), "", `{"name":"inside","nodes":[{"id":"i1","address":"127.0.0.1:1"}]}`); code != 200 {
				t.Fatalf("register in scratch: %d %s", code, body)
			}
			if lookup(t, p, "inside") == nil || lookup(t, p, "scratchy") == nil {
				t.Fatalf("lookups in scratch failed; log:\n%s", p.log.String())
			}
			if _, err := os.Stat(filepath.Join(root, c.file)); err != nil {
				t.Errorf("with environment %q the file registry belongs at /%s: %v", c.env, c.file, err)
			}
			if code := p.stop(syscall.SIGTERM); code != 0 {
				t.Errorf("exit status %d; want 0", code)
			}
		})
	}
}

// startChrooted runs the sidecar copied into root, chrooted there, with env.
func startChrooted(t *testing.T, root string, env []string) *proc {
	t.Helper()
	cmd := exec.Command("/micro", "sidecar", "--address=127.0.0.1:0", "--registry=file", "--server_name=scratchy", "--server_address=127.0.0.1:9999")
	cmd.Env = env
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: root}
	p := &proc{t: t, cmd: cmd, log: &syncBuffer{}, done: make(chan struct{})}
	cmd.Stdout, cmd.Stderr = p.log, p.log
	if err := cmd.Start(); err != nil {
		t.Fatalf("chroot start: %v", err)
	}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() { cmd.Process.Kill(); <-p.done })
	waitFor(t, 10*time.Second, "the chrooted sidecar to listen", func() bool {
		m := listeningRE.FindStringSubmatch(p.log.String())
		if m != nil {
			p.addr = m[1]
		}
		select {
		case <-p.done:
			t.Fatalf("chrooted sidecar exited: %s", p.log.String())
		default:
		}
		return m != nil
	})
	p.waitFirstRegistration()
	return p
}

// BenchmarkStartToFirstLookup measures the time from exec to the first
// successful lookup of the sidecar's own app.
func BenchmarkStartToFirstLookup(b *testing.B) {
	client := &http.Client{Timeout: time.Second}
	for b.Loop() {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		start := time.Now()
		cmd := exec.Command(binPath, "sidecar", "--address="+addr, "--registry=memory", "--server_name=foo", "--server_address=127.0.0.1:9090")
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		for {
			resp, err := client.Get("http://" + addr + "/registry?service=foo")
			if err == nil {
				resp.Body.Close()
				if resp.StatusCode == 200 {
					break
				}
			}
			if time.Since(start) > 10*time.Second {
				b.Fatal("sidecar not ready within 10s")
			}
			time.Sleep(200 * time.Microsecond)
		}
		b.ReportMetric(float64(time.Since(start).Microseconds())/1000, "ms-to-ready")
		cmd.Process.Kill()
		cmd.Wait()
	}
}

// BenchmarkTableLookup is the in-memory part of a lookup, with 1,000
// services of three nodes each in the table.
func BenchmarkTableLookup(b *testing.B) {
	tb := newTable(0)
	for i := range 1000 {
		for j := range 3 {
			tb.upsert(record{Service: fmt.Sprintf("svc%d", i), Node: Node{ID: fmt.Sprint(j), Address: "10.0.0.1", Port: 8080}})
		}
	}
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := tb.lookup("svc500", now); err != nil {
			b.Fatal(err)
		}
	}
}

// TestSecondSignalWaitsForTheDeregistration: a second signal during the
// drain ends the process without waiting for the drain, but not before
// the app is out of the registry: here another process holds the file
// registry's lock as the deregistration runs, and the sidecar exits only
// once it could write. A third signal would end it at once.
func TestSecondSignalWaitsForTheDeregistration(t *testing.T) {
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--server_name=held", "--server_address=127.0.0.1:9")
	id := appID(t, p)
	other := startSidecar(t, "--registry=file", "--registry_address="+file)
	waitFor(t, 5*time.Second, "the app in the shared registry", func() bool { return hasNode(lookup(t, other, "held"), id) })
	unlock, err := lockFile(file + ".lock") // as a sidecar in the middle of a write
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the drain", func() bool { return strings.Contains(p.log.String(), "Shutting down") })
	p.cmd.Process.Signal(syscall.SIGTERM)
	waitFor(t, 5*time.Second, "the second signal's word", func() bool { return strings.Contains(p.log.String(), "stopping once deregistered") })
	select {
	case <-p.done:
		t.Fatal("the sidecar exited with the registry's lock held: its app stays registered")
	default:
	}
	unlock()
	select {
	case <-p.done:
	case <-time.After(15 * time.Second):
		t.Fatal("the sidecar did not exit once the lock was free")
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 143 {
		t.Errorf("exit code %d; want 143, the shell's for SIGTERM", code)
	}
	// Well within the TTL (30 s), which would take it out anyway.
	waitFor(t, 5*time.Second, "the app out of the shared registry", func() bool { return !hasNode(lookup(t, other, "held"), id) })
}

// TestAppRemovalIsRetried: an app that fails its check while the registry
// refuses writes (another process holds the file registry's lock past its
// 5 s wait) is taken out once the registry takes writes again, not when
// its TTL runs out, and other sidecars stop finding it.
func TestAppRemovalIsRetried(t *testing.T) {
	app := newHealthyApp(t)
	addr := strings.TrimPrefix(app.srv.URL, "http://")
	file := filepath.Join(t.TempDir(), "registry.json")
	p := startSidecar(t, "--registry=file", "--registry_address="+file, "--server_name=flaky", "--server_address="+addr,
		"--healthcheck_url="+app.srv.URL+"/h", "--healthcheck_interval=100ms", "--healthcheck_failures=1")
	id := appID(t, p)
	other := startSidecar(t, "--registry=file", "--registry_address="+file)
	waitFor(t, 5*time.Second, "the app on the other sidecar", func() bool { return hasNode(lookup(t, other, "flaky"), id) })
	unlock, err := lockFile(file + ".lock")
	if err != nil {
		t.Fatal(err)
	}
	app.state.Store(1)
	waitFor(t, 15*time.Second, "the refused removal", func() bool {
		return strings.Contains(p.log.String(), "deregistering the app failed; retrying until it succeeds")
	})
	unlock()
	// Well within the TTL (30 s), which would take it out anyway.
	waitFor(t, 8*time.Second, "the app out of the other sidecar's view", func() bool { return !hasNode(lookup(t, other, "flaky"), id) })
	if !strings.Contains(p.log.String(), "deregistered "+id+" after the registry refused it") {
		t.Error("the late removal is not logged")
	}
}

// TestServerMetadataSpaces: spaces around a key or value are left out, as
// they are around each pair.
func TestServerMetadataSpaces(t *testing.T) {
	md, err := parseMetadata("a=1, b = 2 ,c=")
	if err != nil || len(md) != 3 || md["a"] != "1" || md["b"] != "2" || md["c"] != "" {
		t.Errorf("parseMetadata: %q, %v; want a=1, b=2, c empty", md, err)
	}
}

// TestLateAppRegisteredWithinASecond: an app that comes up after its
// sidecar (they usually start together) is checked every second until it
// first passes, not every --healthcheck_interval: here an hour.
func TestLateAppRegisteredWithinASecond(t *testing.T) {
	app := newHealthyApp(t)
	app.state.Store(1) // not up yet
	addr := strings.TrimPrefix(app.srv.URL, "http://")
	p := startSidecar(t, "--registry=memory", "--server_name=late", "--server_address="+addr,
		"--healthcheck_url="+app.srv.URL+"/h", "--healthcheck_interval=1h")
	assertHealth(t, p, 503, "failing")
	app.state.Store(0)
	assertHealth(t, p, 200, "passing")
	if lookup(t, p, "late") == nil {
		t.Errorf("the late app is passing but not registered")
	}
}

// TestCheckOriginRefusesWhatNoBrowserSends: an allowed origin no browser's
// Origin can equal is refused with the form to use.
func TestCheckOriginRefusesWhatNoBrowserSends(t *testing.T) {
	for o, want := range map[string]string{
		"http://app.example:80":     "use http://app.example",
		"http://[::1]:80":           "use http://[::1]",
		"http://app.example:":       "use http://app.example or",
		"http://app.example:0080":   "without leading zeros",
		"https://app.example:443":   "use https://app.example",
		"http://*.good.example":     "without wildcards",
		"http://ünïcode.example":    "ASCII form",
		"http://localhost:3000/":    "use http://localhost:3000",
		"http://app.example":        "",
		"https://app.example:8443":  "",
		"http://app.example:443":    "",
		"*":                         "",
		"http://xn--ncode-cta3g.ex": "",
		"http://app.example:99999":  "port must be 1-65535",
		"http://app.example:0":      "port must be 1-65535",
	} {
		err := checkOrigin(o)
		if want == "" && err != nil || want != "" && (err == nil || !strings.Contains(err.Error(), want)) {
			t.Errorf("checkOrigin(%q) = %v; want %q", o, err, want)
		}
	}
}

// TestFlagSlips: what the flag package takes silently, a flag given twice
// or one whose value was left out, and values that would make every tick
// or request fail, are refused at start, naming the flag (in process: a
// start that passed would listen).
func TestFlagSlips(t *testing.T) {
	dir := t.TempDir()
	env := func(string) (string, bool) { return "", false }
	long := strings.Repeat("n", 230)
	for _, tc := range []struct {
		args []string
		want string // "": taken
	}{
		{[]string{"--registry=file", "--registry_address", "--handler=proxy"}, `--registry_address has no value: the next word, "--handler=proxy", is a flag (write --registry_address=VALUE)`},
		{[]string{"--auth_token", "-namespace=foo"}, `--auth_token has no value: the next word, "-namespace=foo", is a flag`},
		{[]string{"--auth_token", "-not-a-flag"}, ""},
		{[]string{"--namespace", "--help"}, `--namespace has no value: the next word, "--help", is a flag`},
		{[]string{"--namespace", "--version"}, `--namespace has no value: the next word, "--version", is a flag`},
		{[]string{"--namespace", "foo", "--selector", "random"}, ""},
		{[]string{"--cors_allowed_origins=http://a.example", "--cors_allowed_origins=http://b.example"}, "--cors_allowed_origins is given twice"},
		{[]string{"--server_name=a", "--server_address=127.0.0.1:9", "-server_metadata=a=1", "--server_metadata", "b=2"}, "--server_metadata is given twice"},
		{[]string{"-selector=roundrobin", "--selector", "random"}, ""},
		{[]string{"--register_interval=1ns"}, "--register_interval 1ns: must be at least 100ms"},
		{[]string{"--register_interval=100ms"}, ""},
		{[]string{"--register_ttl=25h"}, "--register_ttl 25h0m0s: must be between 1s and 24h"},
		{[]string{"--read_header_timeout=1ns"}, "--read_header_timeout 1ns: must be at least 100ms"},
		{[]string{"--idle_timeout=50ms"}, "--idle_timeout 50ms: must be at least 100ms"},
		{[]string{"--rpc_timeout=1ns"}, "--rpc_timeout 1ns: want 1ms to"},
		{[]string{"--broker_max_topics=0"}, "--broker_max_topics 0: must be more than 0"},
		{[]string{"--broker_queue_bytes=-1"}, "--broker_queue_bytes -1: must be more than 0"},
		{[]string{"--namespace=go.micro.srv."}, "without a leading or trailing dot"},
		{[]string{"--namespace="}, ""},
		{[]string{"--server_name=" + long, "--server_address=127.0.0.1:9"}, "--server_name \"" + long[:64]},
		{[]string{"--server_name=" + long, "--server_address=127.0.0.1:9", "--server_id=x"}, ""},
		{[]string{"--registry=file", "--registry_address=http://127.0.0.1:2379"}, "a URL, for --registry=etcd"},
		{[]string{"--registry=file", "--registry_address=~/reg.json"}, "give the full path"},
		{[]string{"--registry=file", "--registry_address=" + dir + "/typo/reg.json"}, "directory " + dir + "/typo does not exist"},
		{[]string{"--registry=file", "--registry_address=" + dir + "/reg.json"}, ""},
	} {
		args := append([]string{"--registry=memory"}, tc.args...)
		if strings.HasPrefix(tc.args[0], "--registry=") {
			args = tc.args
		}
		_, err := parseSidecarFlags(args, io.Discard, env)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%q: %v; want %q", tc.args, err, tc.want)
		}
	}
}

// TestVariableNamedForWholeFlagsOnly: an error names the variable that
// set the flag it names, not one whose flag begins another's name, and an
// error found at start, past validation, names it too.
func TestVariableNamedForWholeFlagsOnly(t *testing.T) {
	env := func(name string) (string, bool) {
		return map[string]string{"MICRO_REGISTRY": "memory"}[name], name == "MICRO_REGISTRY"
	}
	_, err := parseSidecarFlags([]string{"--registry_max_nodes=0"}, io.Discard, env)
	if err == nil || strings.Contains(err.Error(), "set by") {
		t.Errorf("--registry_max_nodes=0 with MICRO_REGISTRY set: %v; want no variable named", err)
	}
	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	cmd := exec.Command(binPath, "sidecar", "--registry=memory")
	cmd.Env = append(os.Environ(), "MICRO_ADDRESS="+held.Addr().String())
	out, _ := cmd.CombinedOutput()
	if code := cmd.ProcessState.ExitCode(); code != 1 || !strings.Contains(string(out), "(set by MICRO_ADDRESS)") {
		t.Errorf("MICRO_ADDRESS at a port in use: exit %d, %q; want exit 1 naming the variable", code, out)
	}
}

// TestHealthFlagErrorsNameTheFlag: a bad health check setting is refused
// naming the one flag at fault, with its value.
func TestHealthFlagErrorsNameTheFlag(t *testing.T) {
	base := []string{"--registry=memory", "--server_name=foo", "--server_address=127.0.0.1:9090", "--healthcheck_url=http://127.0.0.1:9090/health"}
	for flag, want := range map[string]string{
		"--healthcheck_timeout=-1s":   "--healthcheck_timeout -1s: must be more than 0",
		"--healthcheck_interval=50ms": "--healthcheck_interval 50ms: must be at least 100ms",
		"--healthcheck_failures=0":    "--healthcheck_failures 0: must be at least 1",
		"--healthcheck_successes=-2":  "--healthcheck_successes -2: must be at least 1",
	} {
		_, err := parseSidecarFlags(append(slices.Clone(base), flag), io.Discard, func(string) (string, bool) { return "", false })
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v; want %q", flag, err, want)
		}
	}
}
