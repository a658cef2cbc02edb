// Command micro runs the micro sidecar: it joins an application written in
// any language to a microservice ecosystem over plain HTTP and WebSockets.
package main

import (
	"bytes"
	"cmp"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/signal"
	"path"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
)

// version is set at link time: go build -ldflags "-X main.version=v1.2.3".
var version = ""

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

// runMain dispatches the command line and returns the exit code.
func runMain(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, topUsage)
		return 2
	}
	switch args[0] {
	case "-h", "--help", "-help", "help":
		fmt.Fprint(stdout, topUsage)
		return 0
	case "-v", "--version", "-version", "version":
		fmt.Fprintf(stdout, "micro %s\n", buildVersion())
		return 0
	case "sidecar":
		cfg, err := parseSidecarFlags(args[1:], stdout, os.LookupEnv)
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		if errors.Is(err, errVersionAsked) { // where an operator tries it too
			return runMain([]string{"--version"}, stdout, stderr)
		}
		if err != nil {
			fmt.Fprintf(stderr, "micro sidecar: %v\n", err)
			return 2
		}
		// Logs piped to tee or jq, whose reader a Ctrl-C or a closed
		// terminal ends: a write to the closed pipe must fail, not kill
		// the sidecar (SIGPIPE) before it deregisters the app.
		signal.Ignore(syscall.SIGPIPE)
		say := sayer(cfg, stderr)
		deregistered := make(chan struct{})
		ctx, stop := stopOnSignals(say, deregistered)
		defer stop()
		if err := runSidecar(ctx, cfg, stderr, deregistered); err != nil {
			say(slog.LevelError, nameVariables(err, cfg.given).Error())
			return 1
		}
		return 0
	default:
		fmt.Fprintf(stderr, "micro: unknown command %q\n\n%s", args[0], topUsage)
		return 2
	}
}

const topUsage = `micro joins any application to a microservice ecosystem.

Usage:
  micro sidecar [flags]   run the sidecar next to an app
  micro --version         print the version
  micro --help            print this help

Run 'micro sidecar --help' for the sidecar's flags. Every flag can also be set
with an environment variable: --server_name is MICRO_SERVER_NAME.
`

// buildVersion is the link-time version, else the module version the binary
// was built from, else the VCS revision.
func buildVersion() string {
	if version != "" {
		return version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "(unknown)"
	}
	if v := bi.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			return "devel-" + s.Value[:12]
		}
	}
	return "devel"
}

// config is everything the sidecar needs, built once from flags and
// environment in main and passed down; nothing below reads a flag.
type config struct {
	Address          string // where the sidecar's API listens
	AdvertiseAddress string // where peers reach the API; default: see resolveAdvertise

	ServerName     string // the app's service name; empty: no app
	ServerAddress  string // the app's host:port
	ServerID       string // node id; default name-uuid
	ServerVersion  string
	ServerMetadata map[string]string

	Health healthConfig

	// given names where each flag set was set: "--name" on the command
	// line or its MICRO_NAME variable; validate refuses flags that would
	// have no effect, and notes such variables in ignored.
	given   map[string]string
	ignored []string

	Registry          string     // mdns, file, etcd or memory
	RegistryAddress   string     // file path for the file registry; etcd URLs for etcd
	RegistryInterface []string   // interfaces of the mdns registry; empty: chosen by the advertised address
	Etcd              etcdConfig // --registry=etcd; Endpoints filled by validate
	RegisterTTL       time.Duration
	RegisterInterval  time.Duration
	RegistryMaxNodes  int
	MaxWatchers       int // registry watch connections at once

	MaxBodyBytes       int64
	ShutdownTimeout    time.Duration
	ReadHeaderTimeout  time.Duration
	IdleTimeout        time.Duration
	CORSAllowedOrigins []string
	MaxInFlight        int
	AuthToken          string // empty: no token required
	TLSCertFile        string
	TLSKeyFile         string

	LogFormat string
	LogLevel  slog.Level

	Broker   brokerConfig
	RPC      rpcConfig      // /rpc and /{service}/{method}
	Selector selectorConfig // node choice for RPC and the proxy
	Handler  string         // what /{service}/... does: rpc or proxy

	watchPing time.Duration // between pings to an idle registry watcher; no flag: watchPingInterval, shorter in tests
}

const (
	// minPeriod is the floor of the intervals and timeouts whose every
	// tick costs a write or a request: less is a slip, not a setting.
	minPeriod = 100 * time.Millisecond
	// maxRegisterTTL bounds a registration's lifetime, --register_ttl's
	// as a POST's ?ttl=: etcd refuses a lease past about 285 years at
	// every retry, and an entry that outlives its sidecar by days helps
	// no one.
	maxRegisterTTL = 24 * time.Hour
)

// parseSidecarFlags builds the config from args and the MICRO_*
// environment (a flag on the command line wins) and validates it.
func parseSidecarFlags(args []string, out io.Writer, lookupEnv func(string) (string, bool)) (config, error) {
	var (
		cfg      config
		metadata string
		origins  string
		level    string
		ifaces   string
	)
	fs := flag.NewFlagSet("micro sidecar", flag.ContinueOnError)
	// The flag package would print an error and the whole usage; the
	// caller reports the error once, and usage goes out on --help alone.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	fs.StringVar(&cfg.Address, "address", ":8081", "Address the sidecar's HTTP API listens on, host:port. Port 0 picks a free port; the address bound is logged.")
	fs.StringVar(&cfg.ServerName, "server_name", "", "Service name of the app next to the sidecar, e.g. go.micro.srv.example. Empty: serve the API only.")
	fs.StringVar(&cfg.ServerAddress, "server_address", "", "Address of the app, host:port, as other services should reach it.")
	fs.StringVar(&cfg.ServerID, "server_id", "", "Node id of the app. Default: the server name, a dash and a random UUID.")
	fs.StringVar(&cfg.ServerVersion, "server_version", "", "Version of the app's service, e.g. 1.0.0. Nodes of different versions stay apart in the registry.")
	fs.StringVar(&metadata, "server_metadata", "", "Metadata of the app's node, as key=value pairs separated by commas.")
	fs.StringVar(&cfg.Health.URL, "healthcheck_url", "", "Health check of the app: an http(s) URL where any 2xx passes, or tcp://host:port where a connection passes. Empty: no check; the app is registered at once.")
	fs.DurationVar(&cfg.Health.Interval, "healthcheck_interval", 10*time.Second, "Time between health checks.")
	fs.DurationVar(&cfg.Health.Timeout, "healthcheck_timeout", time.Second, "Time one health check may take before it counts as a failure.")
	fs.IntVar(&cfg.Health.Failures, "healthcheck_failures", 3, "Consecutive failed checks that take a healthy app out of discovery.")
	fs.IntVar(&cfg.Health.Successes, "healthcheck_successes", 1, "Consecutive passed checks that put an unhealthy app back into discovery.")
	fs.StringVar(&cfg.Registry, "registry", "mdns", "Registry backend: mdns (multicast DNS service discovery on the local network, no server needed), file (one JSON file shared by the sidecars of a host), etcd (an etcd v3 cluster, for sidecars across hosts) or memory (this sidecar alone).")
	fs.StringVar(&ifaces, "registry_interface", "", "Network interfaces of the mdns registry, comma separated, e.g. eth0. Default: the loopback interface when the app's address (or, with no app, --address) is a loopback address, else every up, multicast-capable, non-loopback interface with an IPv4 address.")
	fs.StringVar(&cfg.RegistryAddress, "registry_address", "", "Registry location. For the file registry, the file's path; default $XDG_RUNTIME_DIR/micro/registry.json, else the user cache directory, else ./micro-registry.json. For etcd, the cluster's client URLs, comma separated, tried in order; default http://127.0.0.1:2379.")
	fs.StringVar(&cfg.Etcd.Prefix, "registry_prefix", defaultEtcdPrefix, "etcd key prefix under which every node is kept as <prefix><service>/<node id>. Sidecars that should see each other use the same prefix.")
	fs.StringVar(&cfg.Etcd.CAFile, "registry_tls_ca", "", "PEM file of the CA that signed the etcd servers' certificates, for https:// etcd URLs. Default: the system's CAs.")
	fs.StringVar(&cfg.Etcd.CertFile, "registry_tls_cert", "", "PEM client certificate presented to etcd (etcd's --client-cert-auth); needs --registry_tls_key.")
	fs.StringVar(&cfg.Etcd.KeyFile, "registry_tls_key", "", "PEM key of --registry_tls_cert.")
	fs.StringVar(&cfg.Etcd.Username, "registry_username", "", "etcd user to authenticate as, when etcd's authentication is enabled. Empty: none.")
	fs.StringVar(&cfg.Etcd.Password, "registry_password", "", "Password of --registry_username. Prefer the MICRO_REGISTRY_PASSWORD variable: a flag shows in the process list.")
	fs.DurationVar(&cfg.RegisterTTL, "register_ttl", 30*time.Second, "Time-to-live of this sidecar's registrations: if the sidecar dies, its entries vanish within this time.")
	fs.DurationVar(&cfg.RegisterInterval, "register_interval", 0, "Time between refreshes of this sidecar's registrations. Default: a third of --register_ttl.")
	fs.IntVar(&cfg.RegistryMaxNodes, "registry_max_nodes", 10000, "Most nodes the registry holds (with mDNS: of this sidecar's own, and apart, of its peers'); registrations beyond it are refused with 503.")
	fs.IntVar(&cfg.MaxWatchers, "registry_max_watchers", 1000, "Most registry watch WebSockets open at once; more are refused with 503.")
	fs.Int64Var(&cfg.MaxBodyBytes, "max_body_bytes", 1<<20, "Largest request body of the registry API and RPC, in bytes; larger ones are refused with 413. Proxied bodies stream through to the app.")
	fs.DurationVar(&cfg.ShutdownTimeout, "shutdown_timeout", 10*time.Second, "Time allowed on SIGINT, SIGTERM or SIGHUP for in-flight requests to finish.")
	fs.IntVar(&cfg.MaxInFlight, "max_inflight", 1024, "Most requests served at once (WebSockets, /health and /metrics aside); more are refused with 503 and Retry-After.")
	fs.DurationVar(&cfg.ReadHeaderTimeout, "read_header_timeout", 10*time.Second, "Time a client may take to send a request's headers; slower connections are closed.")
	fs.DurationVar(&cfg.IdleTimeout, "idle_timeout", 120*time.Second, "Time an idle keep-alive connection is kept open, and the longest a request body may pause before the request ends with 408.")
	fs.StringVar(&cfg.AuthToken, "auth_token", "", "Token every request but /health must carry as Authorization: Bearer TOKEN (WebSockets may pass ?access_token=TOKEN). Empty: no token. Prefer MICRO_AUTH_TOKEN, which does not show in the process list.")
	fs.StringVar(&cfg.TLSCertFile, "tls_cert_file", "", "PEM certificate (chain) to serve HTTPS and WSS with; needs --tls_key_file.")
	fs.StringVar(&cfg.TLSKeyFile, "tls_key_file", "", "PEM private key for --tls_cert_file.")
	fs.StringVar(&origins, "cors_allowed_origins", "", "Browser origins allowed to call the sidecar, comma separated (e.g. http://localhost:3000), or * for any. Requests from other origins are refused on state-changing endpoints and WebSocket upgrades.")
	fs.StringVar(&cfg.AdvertiseAddress, "advertise_address", "", "Address other sidecars reach this sidecar's API at, host or host:port (the port defaults to the bound one); used for delivering broker messages between sidecars. Default: the --address bound when its host is specific; when it listens on every interface, the host of --server_address if set, else this machine's first non-loopback interface address.")
	fs.IntVar(&cfg.Broker.MaxPayloadBytes, "broker_max_payload_bytes", defaultMaxPayloadBytes, "Largest broker message, a WebSocket frame or a POST body, in bytes. Larger frames close the connection with 1009; larger bodies are refused with 413.")
	fs.IntVar(&cfg.Broker.QueueSize, "broker_queue_size", defaultQueueSize, "Messages a broker subscriber may have waiting. A subscriber that falls further behind is closed with 1013 (slow subscriber) and loses what waited.")
	fs.IntVar(&cfg.Broker.QueueBytes, "broker_queue_bytes", defaultQueueBytes, "Bytes a broker subscriber may have waiting; the same policy as --broker_queue_size.")
	fs.IntVar(&cfg.Broker.MemoryBytes, "broker_memory_bytes", defaultMemoryBytes, "Bytes of messages all broker subscribers together may have waiting (a message waiting for many counts once). Past it, the subscribers holding the most are closed with 1013 (slow subscriber). The queues to peer sidecars together have a bound of the same size; past it, forwards are dropped and counted.")
	fs.DurationVar(&cfg.Broker.PingInterval, "broker_ping_interval", defaultPingInterval, "Time between pings to a quiet broker connection. A connection silent for three intervals is closed as dead.")
	fs.IntVar(&cfg.Broker.MaxTopics, "broker_max_topics", defaultMaxTopics, "Most topics with subscribers on this sidecar; more are refused with 503.")
	fs.IntVar(&cfg.Broker.MaxSubscribers, "broker_max_subscribers", defaultMaxSubscribers, "Most broker WebSocket connections on this sidecar; more are refused with 503.")
	fs.StringVar(&cfg.RPC.Namespace, "namespace", "go.micro.srv", "Namespace of the services that /{service}/{method} calls: /example/call calls go.micro.srv.example's Example.Call.")
	fs.StringVar(&cfg.Selector.Strategy, "selector", strategyRoundRobin, "How RPC and the proxy choose among a service's nodes: roundrobin or random.")
	fs.IntVar(&cfg.RPC.Retries, "rpc_retries", 2, "Further nodes tried when a call's connection fails before the request is sent (a call that may have reached the app is never retried).")
	fs.DurationVar(&cfg.RPC.Timeout, "rpc_timeout", 5*time.Second, "Deadline of a call (for the proxy, of the response headers) when the request has no Timeout header.")
	fs.StringVar(&cfg.Handler, "handler", "rpc", "What /{service}/... does: rpc calls /{service}/{method} over JSON-RPC, proxy forwards the request over HTTP.")
	fs.StringVar(&cfg.LogFormat, "log_format", "text", "Log format: text or json.")
	fs.StringVar(&level, "log_level", "info", "Log level: debug, info, warn or error.")
	versionAsked := fs.Bool("version", false, "Print the version and exit.")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(out, "Usage: micro sidecar [flags]\n\nRuns the sidecar next to an app. Every flag can also be set with an environment\nvariable named MICRO_ and the flag's name in upper case (MICRO_SERVER_NAME);\na flag given on the command line wins.\n\nFlags:\n")
			fs.SetOutput(out)
			fs.PrintDefaults()
			return config{}, err
		}
		return config{}, fmt.Errorf("%v (micro sidecar --help lists the flags)", explainParseError(fs, err))
	}
	if *versionAsked {
		return config{}, errVersionAsked
	}
	if fs.NArg() > 0 {
		return config{}, fmt.Errorf("unexpected argument %q; flags look like --server_name=foo", fs.Arg(0))
	}
	if err := checkFlagWords(fs, args); err != nil {
		return config{}, err
	}
	var err error
	if cfg.given, err = applyEnv(fs, lookupEnv); err != nil {
		return config{}, err
	}
	if cfg.ServerMetadata, err = parseMetadata(metadata); err != nil {
		return config{}, nameVariables(err, cfg.given)
	}
	// slog also takes offsets (error+4, info-2): levels no log line of
	// ours is at, hence not offered.
	if err := cfg.LogLevel.UnmarshalText([]byte(level)); err != nil || strings.ContainsAny(level, "+-") {
		return config{}, nameVariables(fmt.Errorf("--log_level %q: want debug, info, warn or error", level), cfg.given)
	}
	cfg.CORSAllowedOrigins = splitList(origins)
	cfg.RegistryInterface = splitList(ifaces)
	cfg.Broker.AuthToken = cfg.AuthToken
	if cfg.TLSCertFile != "" {
		cfg.Broker.PeerScheme = "https"
	}
	if err := cfg.validate(); err != nil {
		return config{}, nameVariables(err, cfg.given)
	}
	cfg.ignored = append(cfg.ignored, unknownVariables(fs, os.Environ())...)
	return cfg, nil
}

// errVersionAsked is parseSidecarFlags' answer to --version.
var errVersionAsked = errors.New("version asked")

// listFlags take comma-separated lists.
var listFlags = []string{"cors_allowed_origins", "server_metadata", "registry_interface"}

// checkFlagWords walks args as the flag package did (every flag here but
// --version takes a value, after = or as the next word) and refuses what
// it took silently:
// a list flag given twice, whose first list was lost (two
// --cors_allowed_origins allowed the second origin alone), and a flag
// whose value was left out, which took the next flag as its value
// (--registry_address --handler=proxy made a file "--handler=proxy" and
// left the handler as it was). Another flag given twice is the last
// value, as scripts that add "$@" to their defaults expect.
func checkFlagWords(fs *flag.FlagSet, args []string) error {
	seen := map[string]bool{}
	for i := 0; i < len(args); i++ {
		name, ok := flagWord(args[i])
		if !ok {
			return nil // "--" or the first argument: the flag package stopped there
		}
		name, _, inline := strings.Cut(name, "=")
		if seen[name] && slices.Contains(listFlags, name) {
			return fmt.Errorf("--%s is given twice, and would keep the second list alone; give one list, comma separated", name)
		}
		seen[name] = true
		if inline || i+1 >= len(args) || isBoolFlag(fs, name) {
			continue
		}
		i++
		value := args[i]
		if next, ok := flagWord(value); ok && isFlagName(fs, strings.SplitN(next, "=", 2)[0]) {
			return fmt.Errorf("--%s has no value: the next word, %q, is a flag (write --%s=VALUE)", name, value, name)
		}
	}
	return nil
}

// isFlagName says whether name is a flag of fs, or help, which the flag
// package takes besides.
func isFlagName(fs *flag.FlagSet, name string) bool {
	return fs.Lookup(name) != nil || name == "h" || name == "help"
}

// isBoolFlag says whether the flag name of fs takes no value word.
func isBoolFlag(fs *flag.FlagSet, name string) bool {
	f := fs.Lookup(name)
	if f == nil {
		return false
	}
	b, ok := f.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

// flagWord is a command-line word's flag, name and any =value, when the
// word is a flag: one or two dashes and more.
func flagWord(w string) (string, bool) {
	if len(w) < 2 || w[0] != '-' || w == "--" {
		return "", false
	}
	w = w[1:]
	if w[0] == '-' {
		w = w[1:]
	}
	return w, w != "" && w[0] != '-' && w[0] != '='
}

// nameVariables adds to an error that names flags the variables that set
// them: whoever set only MICRO_ADDRESS would look in vain for an
// --address they never passed.
func nameVariables(err error, given map[string]string) error {
	msg := err.Error()
	var from []string
	for name, src := range given {
		if strings.HasPrefix(src, "MICRO_") && mentionsFlag(msg, name) {
			from = append(from, src)
		}
	}
	if len(from) == 0 {
		return err
	}
	slices.Sort(from)
	return fmt.Errorf("%w (set by %s)", err, strings.Join(from, ", "))
}

// mentionsFlag says whether msg names --name itself, not a longer flag it
// begins (--registry is no mention of --registry_max_nodes).
func mentionsFlag(msg, name string) bool {
	for rest := msg; ; {
		i := strings.Index(rest, "--"+name)
		if i < 0 {
			return false
		}
		rest = rest[i+2+len(name):]
		if rest == "" || !isFlagNameByte(rest[0]) {
			return true
		}
	}
}

func isFlagNameByte(c byte) bool {
	return c == '_' || '0' <= c && c <= '9' || 'a' <= c && c <= 'z'
}

// unknownVariables names the MICRO_* variables of environ that are no
// flag's, as a misspelt one (MICRO_SERVR_NAME) would be: ignored silently,
// it would leave the sidecar running without what it was meant to set.
// A variable spelt in another case (micro_namespace, MICRO_Namespace) is
// named too: the environment's names are case-sensitive, and only the
// upper-case one is read. MICRO_VERSION is named too: --version is a
// question asked on the command line, and whoever set the variable
// likely meant the app's version, MICRO_SERVER_VERSION.
func unknownVariables(fs *flag.FlagSet, environ []string) []string {
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		upper := strings.ToUpper(name)
		rest, ok := strings.CutPrefix(upper, "MICRO_")
		if !ok || upper == "MICRO_PPROF_ADDRESS" && profilerBuilt || strings.HasPrefix(upper, "MICRO_TEST") {
			continue // the profiler's; the tests' own
		}
		switch {
		case upper == "MICRO_PPROF_ADDRESS":
			out = append(out, name+" is read only by a build with the profiler (go build -tags pprof); this one has none")
		case upper == "MICRO_VERSION":
			out = append(out, name+" is not read: --version is asked on the command line (the app's version is MICRO_SERVER_VERSION)")
		case fs.Lookup(strings.ToLower(rest)) == nil:
			out = append(out, name+" names no flag (micro sidecar --help lists them)")
		case name != upper && runtime.GOOS != "windows": // where names are read in any case
			out = append(out, name+" is not read: spell it "+upper)
		}
	}
	return out
}

// applyEnv sets every flag not given on the command line from its MICRO_*
// variable, and returns where each flag set was set: "--name" or
// "MICRO_NAME" (when not empty).
func applyEnv(fs *flag.FlagSet, lookupEnv func(string) (string, bool)) (map[string]string, error) {
	given := map[string]string{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = "--" + f.Name })
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] != "" || err != nil || f.Name == "version" { // a question, not a setting
			return
		}
		name := "MICRO_" + strings.ToUpper(f.Name)
		// An empty variable is commonly how one is unset: the default
		// stands, rather than an empty value (MICRO_NAMESPACE= must not
		// empty the namespace).
		if v, ok := lookupEnv(name); ok && v != "" {
			given[f.Name] = name
			if serr := f.Value.Set(v); serr != nil {
				if serr.Error() == "parse error" {
					serr = errors.New(wantOf(f))
				}
				err = fmt.Errorf("%s=%q: %v", name, v, serr)
			}
		}
	})
	return given, err
}

// explainParseError replaces the flag package's bare "parse error", for a
// value of the wrong kind, with what the flag wants.
func explainParseError(fs *flag.FlagSet, err error) error {
	rest, ok := strings.CutSuffix(err.Error(), ": parse error")
	if !ok {
		return err
	}
	i := strings.LastIndex(rest, " -") // "invalid value V for flag -NAME"
	f := fs.Lookup(rest[i+2:])
	if i < 0 || f == nil {
		return err
	}
	return errors.New(rest + ": " + wantOf(f))
}

// wantOf says what kind of value a flag takes.
func wantOf(f *flag.Flag) string {
	g, _ := f.Value.(flag.Getter)
	if g == nil {
		return "parse error"
	}
	switch g.Get().(type) {
	case time.Duration:
		return "want a duration such as 10s, 500ms or 2m"
	case int, int64, uint, uint64:
		return "want a whole number"
	}
	return "parse error"
}

// validate checks flag combinations up front and says how to fix them.
func (c *config) validate() error {
	// Choices are taken in any case, as --log_level's are (slog's).
	for _, v := range []*string{&c.Registry, &c.LogFormat, &c.Selector.Strategy, &c.Handler} {
		*v = strings.ToLower(*v)
	}
	_, port, err := net.SplitHostPort(c.Address)
	if err != nil {
		return fmt.Errorf("--address %q: want host:port, e.g. 127.0.0.1:8081 or :8081", c.Address)
	}
	if n, err := strconv.Atoi(port); port != "" && (err != nil || n < 0 || n > 65535) {
		return fmt.Errorf("--address %q: port must be 0-65535 (0, or none, picks a free one)", c.Address)
	}
	if c.ServerName == "" {
		if err := appFlagsWithoutName(c.ServerAddress != "", c.Health.URL != ""); err != nil {
			return err
		}
	}
	if c.ServerName != "" {
		if c.ServerAddress == "" {
			return errors.New("--server_name needs --server_address, the app's host:port")
		}
		defaultID := c.ServerID == ""
		if defaultID {
			c.ServerID = c.ServerName + "-" + newUUID()
		}
		if host, port, err := net.SplitHostPort(c.ServerAddress); err != nil || host == "" || port == "" {
			return fmt.Errorf("--server_address %q: want the app's host:port, e.g. 127.0.0.1:9090", c.ServerAddress)
		}
		s := c.appService()
		if err := normalizeService(&s); err != nil {
			msg := strings.TrimPrefix(err.Error(), "nodes[0]: ")
			if flag := appFlagOf(msg); flag != "--server_id" || !defaultID {
				return fmt.Errorf("%s: %s", flag, msg)
			}
			return fmt.Errorf("--server_name %q is too long for the default node id, the name, a dash and a 36-character UUID (%s); shorten it or give --server_id", truncate(c.ServerName, 64), msg)
		}
		if c.Registry == "mdns" {
			// As the backend would refuse it, at every retry, for good.
			if _, err := announcementOf(recordsOf(s, time.Time{})[0], "check"); err != nil {
				_, why, _ := strings.Cut(err.Error(), ": ") // past the node's id, which the flags do not give
				if !strings.Contains(why, "--registry=") {
					why += "; use --registry=file or etcd for such an app"
				}
				return fmt.Errorf("%s: the app's %s", mdnsAppFlagOf(why), why)
			}
		}
	}
	if c.Health.URL != "" {
		if err := validateHealthURL(c.Health.URL); err != nil {
			return err
		}
		switch {
		case c.Health.Interval < minPeriod:
			return fmt.Errorf("--healthcheck_interval %v: must be at least %v", c.Health.Interval, minPeriod)
		case c.Health.Timeout <= 0:
			return fmt.Errorf("--healthcheck_timeout %v: must be more than 0", c.Health.Timeout)
		case c.Health.Failures < 1:
			return fmt.Errorf("--healthcheck_failures %d: must be at least 1", c.Health.Failures)
		case c.Health.Successes < 1:
			return fmt.Errorf("--healthcheck_successes %d: must be at least 1", c.Health.Successes)
		}
	}
	switch c.Registry {
	case "memory", "mdns":
		c.RegistryAddress = "" // a MICRO_REGISTRY_ADDRESS for another registry, noted as ignored
	case "file":
		if c.RegistryAddress == "" {
			c.RegistryAddress = defaultRegistryPath() // its directory is made if missing
		} else if err := checkRegistryPath(c.RegistryAddress); err != nil {
			return err
		}
	case "etcd":
		if err := c.validateEtcd(); err != nil {
			return err
		}
	default:
		return fmt.Errorf("--registry %q: want mdns, file, etcd or memory", c.Registry)
	}
	if err := c.checkIneffective(); err != nil {
		return err
	}
	if c.RegisterTTL < time.Second || c.RegisterTTL > maxRegisterTTL {
		return fmt.Errorf("--register_ttl %v: must be between 1s and 24h, as a registration's ?ttl=", c.RegisterTTL)
	}
	if c.RegisterInterval == 0 {
		c.RegisterInterval = c.RegisterTTL / 3
	}
	// The floor keeps a slip (1ns) from rewriting the file registry or
	// refreshing etcd's lease in a busy loop.
	if c.RegisterInterval < minPeriod || c.RegisterInterval >= c.RegisterTTL {
		return fmt.Errorf("--register_interval %v: must be at least %v and shorter than --register_ttl %v", c.RegisterInterval, minPeriod, c.RegisterTTL)
	}
	if (c.TLSCertFile == "") != (c.TLSKeyFile == "") {
		return errors.New("--tls_cert_file and --tls_key_file go together; give both or neither")
	}
	if c.TLSCertFile != "" {
		if _, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile); err != nil {
			if key, _ := os.ReadFile(c.TLSKeyFile); bytes.Contains(key, []byte("ENCRYPTED")) {
				return fmt.Errorf("--tls_key_file %s: an encrypted key, which is not read; decrypt it (openssl pkey -in %s -out key.pem)", c.TLSKeyFile, c.TLSKeyFile)
			}
			return fmt.Errorf("--tls_cert_file/--tls_key_file: %v", err)
		}
		roots, err := peerRoots(c.TLSCertFile)
		if err != nil {
			return fmt.Errorf("--tls_cert_file: %v", err)
		}
		c.Broker.PeerRoots = roots
	}
	for _, f := range []struct {
		name string
		ok   bool
	}{
		{"registry_max_nodes", c.RegistryMaxNodes > 0},
		{"registry_max_watchers", c.MaxWatchers > 0},
		{"max_body_bytes", c.MaxBodyBytes > 0},
		{"max_inflight", c.MaxInFlight > 0},
	} {
		if !f.ok {
			return fmt.Errorf("--%s must be more than 0", f.name)
		}
	}
	// Below these floors every request would fail (1ns answers nothing,
	// and logs nothing): a slip, not a setting.
	for _, f := range []struct {
		name string
		d    time.Duration
	}{{"read_header_timeout", c.ReadHeaderTimeout}, {"idle_timeout", c.IdleTimeout}} {
		if f.d < minPeriod {
			return fmt.Errorf("--%s %v: must be at least %v", f.name, f.d, minPeriod)
		}
	}
	for _, ch := range c.AuthToken {
		if ch <= ' ' || ch > '~' {
			return errors.New("--auth_token (or MICRO_AUTH_TOKEN) holds white space or a character outside printable ASCII, which no Authorization header can carry; a trailing newline from a file is the usual cause")
		}
	}
	if c.ShutdownTimeout < 0 {
		return errors.New("--shutdown_timeout must not be negative; 0 cuts in-flight requests off at once")
	}
	if err := checkAdvertise(c.AdvertiseAddress); err != nil {
		return err
	}
	if c.Registry == "mdns" && strings.Contains(c.AdvertiseAddress, "%") {
		// The broker's topic entries carry it, and mDNS refuses them all.
		return fmt.Errorf("--advertise_address %q: an IPv6 zone, which the mdns registry cannot announce; advertise an address without one, or use --registry=file or etcd", c.AdvertiseAddress)
	}
	for _, o := range c.CORSAllowedOrigins {
		if err := checkOrigin(o); err != nil {
			return err
		}
	}
	if err := c.Broker.validate(); err != nil {
		return err
	}
	if c.Selector.Strategy != strategyRoundRobin && c.Selector.Strategy != strategyRandom {
		return fmt.Errorf("--selector %q: want roundrobin or random", c.Selector.Strategy)
	}
	if c.Handler != "rpc" && c.Handler != "proxy" {
		return fmt.Errorf("--handler %q: want rpc or proxy", c.Handler)
	}
	if c.RPC.Retries < 0 {
		return fmt.Errorf("--rpc_retries %d: must be 0 or more", c.RPC.Retries)
	}
	if c.RPC.Timeout < time.Millisecond || c.RPC.Timeout > maxTimeout {
		return fmt.Errorf("--rpc_timeout %v: want 1ms to %v", c.RPC.Timeout, maxTimeout)
	}
	if c.RPC.Namespace != "" && !validName(c.RPC.Namespace) {
		return fmt.Errorf("--namespace %q: use printable ASCII characters without spaces or '/'", c.RPC.Namespace)
	}
	if strings.HasPrefix(c.RPC.Namespace, ".") || strings.HasSuffix(c.RPC.Namespace, ".") {
		// It is joined to the path's name with a dot of its own.
		return fmt.Errorf("--namespace %q: give it without a leading or trailing dot, e.g. go.micro.srv", c.RPC.Namespace)
	}
	c.RPC.MaxBodyBytes = c.MaxBodyBytes
	if c.LogFormat != "text" && c.LogFormat != "json" {
		return fmt.Errorf("--log_format %q: want text or json", c.LogFormat)
	}
	return nil
}

// checkRegistryPath refuses a file registry path given by mistake, which
// would otherwise be created: an etcd URL from the environment of a family
// of processes (./http:/etcd:2379), a ~ no shell expanded after the =, or a
// mistyped directory, which would make a registry of its own that no
// other sidecar shares.
func checkRegistryPath(path string) error {
	switch {
	case strings.Contains(path, "://"):
		return fmt.Errorf("--registry_address %q: a URL, for --registry=etcd; the file registry takes a file's path", path)
	case strings.HasPrefix(path, "~"):
		return fmt.Errorf("--registry_address %q: ~ is expanded by a shell only at a word's start, not after --registry_address=; give the full path", path)
	}
	dir := filepath.Dir(path)
	fi, err := os.Stat(dir)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("--registry_address %q: directory %s does not exist; create it, or correct the path", path, dir)
	case err == nil && !fi.IsDir():
		return fmt.Errorf("--registry_address %q: %s is not a directory", path, dir)
	}
	return nil // any other failure is the file registry's to report, as it opens the file
}

// checkOrigin refuses an --cors_allowed_origins entry no browser's Origin
// can equal, which would never match and leave its user puzzled by 403s:
// an origin is scheme://host[:port], no path, not even a trailing slash.
func checkOrigin(o string) error {
	if o == "*" {
		return nil
	}
	u, err := url.Parse(o)
	if err != nil || u.Scheme == "" || u.Host == "" || u.Opaque != "" {
		return fmt.Errorf("--cors_allowed_origins %q: want an origin, scheme://host[:port], e.g. http://localhost:3000", o)
	}
	if u.User != nil || u.RawQuery != "" || u.Fragment != "" || u.Path != "" {
		return fmt.Errorf("--cors_allowed_origins %q: an origin is scheme://host[:port] alone; use %s://%s", o, u.Scheme, u.Host)
	}
	host, port := u.Hostname(), u.Port()
	bare := strings.TrimSuffix(strings.TrimSuffix(u.Host, port), ":") // the host as written, brackets and all
	switch {
	case strings.Contains(host, "*"):
		return fmt.Errorf("--cors_allowed_origins %q: origins match whole, without wildcards; list each origin, or give * for any", o)
	case port != "" && !validPort(port):
		return fmt.Errorf("--cors_allowed_origins %q: port must be 1-65535", o)
	case strings.HasSuffix(u.Host, ":"), strings.HasPrefix(port, "0"):
		return fmt.Errorf("--cors_allowed_origins %q: browsers write a port without leading zeros, and leave an empty one out; use %s://%s or %s://%s:PORT", o, u.Scheme, bare, u.Scheme, bare)
	case strings.EqualFold(u.Scheme, "http") && port == "80", strings.EqualFold(u.Scheme, "https") && port == "443":
		return fmt.Errorf("--cors_allowed_origins %q: browsers leave the scheme's default port out of an origin; use %s://%s", o, u.Scheme, bare)
	}
	for _, c := range []byte(host) {
		if c >= utf8.RuneSelf {
			return fmt.Errorf("--cors_allowed_origins %q: browsers send an international host name in its ASCII form (xn--...); give that form", o)
		}
	}
	return nil
}

// checkIneffective refuses a flag that takes effect only with another
// setting when that setting is missing: a health check interval without a
// health check, an etcd password with the mdns registry. Ignored silently,
// such a flag would leave its user believing it worked. A MICRO_*
// variable is only noted, for the log: an environment often sets
// variables for a family of processes, and a command line that chooses
// another registry than the family's must still start.
func (c *config) checkIneffective() error {
	c.ignored = nil
	for _, r := range []struct {
		flags []string
		needs string
		ok    bool
	}{
		{[]string{"healthcheck_interval", "healthcheck_timeout", "healthcheck_failures", "healthcheck_successes"}, "--healthcheck_url", c.Health.URL != ""},
		{[]string{"server_id", "server_version", "server_metadata"}, "--server_name", c.ServerName != ""},
		{[]string{"registry_interface"}, "--registry=mdns", c.Registry == "mdns"},
		{[]string{"registry_address"}, "--registry=file or --registry=etcd", c.Registry == "file" || c.Registry == "etcd"},
		{[]string{"registry_prefix", "registry_username", "registry_password", "registry_tls_ca", "registry_tls_cert", "registry_tls_key"}, "--registry=etcd", c.Registry == "etcd"},
	} {
		if r.ok {
			continue
		}
		for _, name := range r.flags {
			switch src := c.given[name]; {
			case strings.HasPrefix(src, "--"):
				return fmt.Errorf("%s has no effect without %s; drop it, or add %s", src, r.needs, r.needs)
			case src != "":
				c.ignored = append(c.ignored, fmt.Sprintf("%s has no effect without %s", src, r.needs))
			}
		}
	}
	return nil
}

// appFlagsWithoutName refuses the app's address or health check given
// without the app's name, naming only what was given. Unlike the flags
// checkIneffective lets a variable off for, these stop the start from a
// MICRO_* variable too: they say an app is there, and a sidecar that ran
// would register nothing and check nothing while it was meant to.
func appFlagsWithoutName(address, healthURL bool) error {
	var given []string
	if address {
		given = append(given, "--server_address")
	}
	if healthURL {
		given = append(given, "--healthcheck_url")
	}
	switch len(given) {
	case 0:
		return nil
	case 1:
		return fmt.Errorf("%s needs --server_name, the app's service name", given[0])
	}
	return fmt.Errorf("%s need --server_name, the app's service name", strings.Join(given, " and "))
}

// advertisesLoopback reports whether what this sidecar advertises, the
// app's address or else its own, is a loopback address, which is useless
// to other hosts: the mdns registry then stays on the loopback interface.
func (c *config) advertisesLoopback() bool {
	host, _, _ := net.SplitHostPort(c.Address)
	if c.ServerName != "" {
		host, _, _ = net.SplitHostPort(c.ServerAddress)
	}
	if strings.EqualFold(strings.TrimSuffix(host, "."), "localhost") { // names ignore case
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// appService is the app's own registration.
func (c *config) appService() Service {
	s := Service{
		Name:    c.ServerName,
		Version: c.ServerVersion,
		Nodes:   []Node{{ID: c.ServerID, Address: c.ServerAddress, Metadata: c.ServerMetadata}},
	}
	normalizeService(&s) // checked in validate; this fills the defaults
	return s
}

// appFlagOf names the flag behind a refusal of the app's registration, by
// the field the refusal starts with.
func appFlagOf(msg string) string {
	for prefix, flag := range map[string]string{"name ": "--server_name", "version ": "--server_version", "id ": "--server_id", "metadata": "--server_metadata"} {
		if strings.HasPrefix(msg, prefix) {
			return flag
		}
	}
	return "--server_address"
}

// mdnsAppFlagOf names the flag behind the mdns registry's refusal of the
// app's node, why (past the node's id), by its shape (txtOf's and
// announcementOf's messages): a TXT string too long, "KEY=... is N bytes",
// is the name's, the id's, the version's or else a metadata pair's (a
// metadata key spelt like those travels as node:KEY); the address is at
// fault for a zone, or for a DNS name that cannot be the SRV target (the
// instance name, from the id, is cut to fit). The rest is about metadata,
// which alone can make a TXT record too large.
func mdnsAppFlagOf(why string) string {
	if key, _, ok := strings.Cut(why, "=... is "); ok { // keys hold no '='
		switch key {
		case txtName:
			return "--server_name"
		case txtID:
			return "--server_id"
		case txtVersion:
			return "--server_version"
		}
		return "--server_metadata"
	}
	if strings.HasPrefix(why, "address ") || strings.HasPrefix(why, "name ") {
		return "--server_address"
	}
	return "--server_metadata"
}

// parseMetadata reads --server_metadata, key=value pairs separated by
// commas, spaces around each key and value left out.
func parseMetadata(s string) (map[string]string, error) {
	if s == "" {
		return nil, nil
	}
	md := map[string]string{}
	for _, kv := range splitList(s) {
		k, v, ok := strings.Cut(kv, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		if !ok || k == "" {
			return nil, fmt.Errorf("--server_metadata %q: want key=value pairs separated by commas", kv)
		}
		if _, dup := md[k]; dup {
			return nil, fmt.Errorf("--server_metadata: key %q is given twice", k)
		}
		md[k] = v
	}
	return md, nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func newLogger(cfg config, w io.Writer) *slog.Logger {
	opts := &slog.HandlerOptions{Level: cfg.LogLevel}
	if cfg.LogFormat == "json" {
		opts.ReplaceAttr = durationAsText
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}

// durationAsText writes a duration as the text log and the flags do, "10s",
// where slog's JSON handler would write nanoseconds.
func durationAsText(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.String(a.Key, a.Value.Duration().String())
	}
	return a
}

// sidecar is one running sidecar, built from a config. Several can run in
// one process.
type sidecar struct {
	cfg     config
	log     *slog.Logger
	reg     *registry
	app     *appRegistration // nil without --server_name
	health  *healthChecker   // nil without --healthcheck_url
	conns   *connSet
	metrics *sidecarMetrics
	broker  *broker
	rpc     *caller
	proxy   *proxy
	started time.Time
	// stopping is set when shutdown begins: /health then answers 503, so
	// that load balancers stop sending while the deregistration (a file
	// lock, an etcd timeout) and the drain take their time.
	stopping atomic.Bool
	// watchers counts open registry watches, against --registry_max_watchers:
	// an open WebSocket no longer counts against --max_inflight.
	watchers  atomic.Int64
	watchPing time.Duration // between pings to an idle watcher
}

// newSidecar builds the registry for cfg.
func newSidecar(ctx context.Context, cfg config, log *slog.Logger) (*sidecar, error) {
	t := newTable(cfg.RegistryMaxNodes)
	var b backend
	switch cfg.Registry {
	case "memory":
		b = &memoryBackend{t: t, now: time.Now}
	case "file":
		fb, err := newFileBackend(ctx, cfg.RegistryAddress, t, log)
		if err != nil {
			return nil, err
		}
		b = fb
	case "mdns":
		mb, err := newMDNSBackend(ctx, mdnsConfig{Interfaces: cfg.RegistryInterface, Loopback: cfg.advertisesLoopback()}, t, log)
		if err != nil {
			return nil, err
		}
		b = mb
	case "etcd":
		eb, err := newEtcdBackend(ctx, cfg.Etcd, t, log)
		if err != nil {
			return nil, err
		}
		b = eb
	}
	s := &sidecar{
		cfg:       cfg,
		log:       log,
		reg:       &registry{name: cfg.Registry, table: t, backend: b, ttl: cfg.RegisterTTL, now: time.Now, owned: map[string]Service{}, soon: make(chan struct{}, 1)},
		conns:     newConnSet(),
		started:   time.Now(),
		watchPing: cmp.Or(cfg.watchPing, watchPingInterval),
	}
	sel := newSelector(cfg.Selector, time.Now)
	s.rpc = newCaller(cfg.RPC, s.reg, sel, log)
	nodes := newNodeTransport(s.rpc.nodes.connects)
	s.proxy = newProxy(proxyConfig{Retries: cfg.RPC.Retries, Timeout: cfg.RPC.Timeout, BodyIdle: cfg.IdleTimeout}, s.reg, sel, nodes, s.conns, log)
	s.proxy.direct = s.rpc.nodes
	s.broker = newBroker(cfg.Broker, s.reg, s.conns, log)
	s.metrics = newSidecarMetrics(s)
	s.rpc.timing = s.metrics.rpcLatency
	if cfg.ServerName != "" {
		s.app = newAppRegistration(s.reg, cfg.appService(), cfg.ServerID, log, cfg.RegisterInterval)
		if cfg.Health.URL != "" {
			s.health = newHealthChecker(cfg.Health, log, s.metrics.healthCheck, s.app.follow)
		}
	}
	if kb, ok := b.(keepingBackend); ok {
		kb.setKeeps(s.reg.keeps, s.reg.restoreLost)
	}
	if eb, ok := b.(*etcdBackend); ok {
		eb.setOwn(s.reg.ownsAsSidecar)
	}
	if mb, ok := b.(*mdnsBackend); ok {
		s.metrics.set.counterFunc("micro_mdns_packets_total", mdnsPacketsHelp, []string{"event"}, mb.packetSamples)
	}
	return s, nil
}

// certWarning says what is wrong with a certificate that loads but that
// clients will refuse at now: expired, or not valid yet. Empty when
// nothing is.
func certWarning(certFile, keyFile string, now time.Time) string {
	pair, err := tls.LoadX509KeyPair(certFile, keyFile) // checked by validate
	if err != nil || pair.Leaf == nil {
		return ""
	}
	switch leaf := pair.Leaf; {
	case now.After(leaf.NotAfter):
		return fmt.Sprintf("the certificate in --tls_cert_file expired on %s: clients will refuse it (it is read once, at start: restart with a renewed one)", leaf.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(leaf.NotBefore):
		return fmt.Sprintf("the certificate in --tls_cert_file is not valid before %s: clients will refuse it until then (is this machine's clock right?)", leaf.NotBefore.UTC().Format(time.RFC3339))
	}
	return ""
}

// runSidecar runs a sidecar until ctx ends, then shuts it down cleanly.
// It closes deregistered once the sidecar has taken its entries out of
// the registry at shutdown (see stopOnSignals).
func runSidecar(ctx context.Context, cfg config, logOut io.Writer, deregistered chan<- struct{}) error {
	log := newLogger(cfg, logOut)
	// What the standard library logs on its own (net/http's client: "Unsolicited
	// response received on idle HTTP channel") goes through the same logger,
	// so that a JSON log stays one JSON object per line.
	stdlog.SetFlags(0)
	stdlog.SetOutput(&serverErrorLog{log: log})
	for _, note := range cfg.ignored {
		log.Warn("ignoring a variable: " + note)
	}
	if cfg.TLSCertFile != "" {
		if warning := certWarning(cfg.TLSCertFile, cfg.TLSKeyFile, time.Now()); warning != "" {
			log.Warn(warning)
		}
	}
	s, err := newSidecar(ctx, cfg, log)
	if err != nil && ctx.Err() != nil {
		log.Info("Stopped before listening") // a signal ended the wait for the registry
		return nil
	}
	if err != nil {
		return err
	}
	if ctx.Err() != nil {
		// Stopped while the registry was being reached (etcd down takes
		// seconds): nothing listens or is registered yet, and nothing will.
		s.reg.backend.close()
		log.Info("Stopped before listening")
		return nil
	}
	ln, err := net.Listen("tcp", cfg.Address)
	if err != nil {
		s.reg.backend.close()
		return fmt.Errorf("listen on %s: %w (choose another --address)", cfg.Address, err)
	}
	routes := s.routes()
	srv := &http.Server{
		Handler: boundStalledAnswers(cfg.IdleTimeout, closeAfterUnsureFraming(boundStalledBodies(cfg.IdleTimeout, routes))),
		// Slow or stalled clients must not hold connections forever; bodies
		// get their own limits, and long calls their own deadlines.
		ReadHeaderTimeout: cfg.ReadHeaderTimeout,
		IdleTimeout:       cfg.IdleTimeout,
		MaxHeaderBytes:    64 << 10,
		ErrorLog:          stdlog.New(&serverErrorLog{log: log}, "", 0),
		ConnContext:       withConn,
	}
	s.broker.advertise = resolveAdvertise(cfg.AdvertiseAddress, ln.Addr().(*net.TCPAddr), cfg.ServerAddress, interfaceAddrs())
	if host, _, _ := net.SplitHostPort(s.broker.advertise); cfg.AuthToken != "" && cfg.Registry == "mdns" && isLocalName(host) {
		// Peers resolve a .local target when its host's responder answers
		// for it, and then check the entries' signatures against the
		// address, not the name signed.
		log.Warn("the advertise address is a .local name: with --auth_token over mDNS, peers may hear it as an IP address and ignore this sidecar's topic entries; advertise an IP address", "advertise_address", s.broker.advertise)
	}
	serveErr := make(chan error, 1)
	scheme := "http"
	shutdown := srv.Shutdown
	if cfg.TLSCertFile != "" {
		scheme = "https"
		// An HTTP/1.0 client may offer only http/1.0 (curl --http1.0), and
		// crypto/tls refuses a client none of whose protocols it serves.
		srv.TLSConfig = &tls.Config{NextProtos: []string{"h2", "http/1.1", "http/1.0"}}
		srv.Handler = markHeadIn(srv.Handler)
		tln := &headDueListener{Listener: ln, timeout: cfg.ReadHeaderTimeout}
		go func() { serveErr <- srv.ServeTLS(tln, cfg.TLSCertFile, cfg.TLSKeyFile) }()
	} else {
		fast := newServer(routes, srv, log)
		shutdown = fast.Shutdown
		go func() { serveErr <- fast.Serve(ln) }()
	}
	// With port 0 the line is the only place the port is told: it shows
	// at any --log_level, still as information (an error line at every
	// start would set off alerts on errors).
	listenLog := log
	if _, port, _ := net.SplitHostPort(cfg.Address); (port == "0" || port == "") && cfg.LogLevel > slog.LevelInfo { // "host:" binds any port too
		info := cfg
		info.LogLevel = slog.LevelInfo
		listenLog = newLogger(info, logOut)
	}
	listenLog.Info("Listening on "+ln.Addr().String(), "scheme", scheme, "auth_token", cfg.AuthToken != "", "address", ln.Addr().String(), "advertise_address", s.broker.advertise, "registry", cfg.Registry, "registry_address", cfg.RegistryAddress, "version", buildVersion())

	bg, stopBG := context.WithCancel(ctx)
	var bgDone []chan struct{}
	goBG := func(f func()) {
		done := make(chan struct{})
		bgDone = append(bgDone, done)
		go func() { defer close(done); f() }()
	}
	goBG(func() { s.reg.refreshLoop(bg, cfg.RegisterInterval, log) })
	goBG(func() { s.broker.run(bg) })
	goBG(func() { s.broker.fwd.watch(bg) })
	goBG(func() { s.metrics.tidy(bg, seriesTidyInterval, s.reg) })
	if cfg.ServerName != "" {
		s.startApp(bg, goBG)
	}

	select {
	case <-ctx.Done():
	case err := <-serveErr:
		stopBG()
		return fmt.Errorf("serve: %w", err)
	}

	log.Info("Shutting down: deregistering and draining; a second signal ends the drain once deregistered", "timeout", cfg.ShutdownTimeout)
	s.stopping.Store(true)
	stopBG()
	for _, d := range bgDone {
		<-d
	}
	if err := s.reg.deregisterOwned(); err != nil {
		log.Error("deregistering failed; the entries will expire with their TTL", "error", err)
	}
	close(deregistered)
	sctx, cancel := context.WithTimeout(context.Background(), cfg.ShutdownTimeout)
	defer cancel()
	// The WebSockets are told to close while the server stops listening:
	// one whose subscriber stopped reading holds its close for the write
	// timeout, and the listener must not take new connections meanwhile
	// (registrations among them, which this sidecar would then lose).
	wsClosed := make(chan struct{})
	go func() { s.conns.closeAll(sctx); close(wsClosed) }()
	if err := shutdown(sctx); err != nil {
		log.Warn("in-flight requests did not finish in time", "error", err)
	}
	<-wsClosed
	s.broker.close(sctx)
	s.closeNodeConnections()
	s.reg.backend.close()
	log.Info("Stopped")
	return nil
}

// closeNodeConnections closes the idle keep-alive connections to service
// nodes, of RPC and of the proxy, once no call is in flight.
func (s *sidecar) closeNodeConnections() {
	s.rpc.nodes.closeIdle()
	if t, ok := s.proxy.transport.(interface{ CloseIdleConnections() }); ok {
		t.CloseIdleConnections()
	}
}

// startApp registers the app at once, or starts the health checker that
// registers it when it passes.
func (s *sidecar) startApp(ctx context.Context, goBG func(func())) {
	goBG(func() { s.app.run(ctx) })
	if s.health == nil {
		s.app.up()
		return
	}
	s.log.Info("Starting sidecar healthchecker", "url", redactURL(s.cfg.Health.URL), "interval", s.cfg.Health.Interval)
	goBG(func() { s.health.run(ctx) })
}

// stopOnSignals returns a context that ends at the first SIGINT, SIGTERM
// or SIGHUP (a closed terminal or a dropped ssh session must not leave the
// app in discovery until its TTL runs out); the sidecar then drains. A
// second signal ends the process without waiting for the drain, with the
// shell's status for it (128 + the signal's number), once deregistered is
// closed: an exit before would leave the app in discovery after all. A
// third signal, or deregisterWait, ends it even so. Signals are caught
// rather than left to their default: one the process inherited as ignored
// (SIGINT under a script's &, SIGHUP under nohup) would be ignored again.
func stopOnSignals(say func(slog.Level, string), deregistered <-chan struct{}) (context.Context, func()) {
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-sigs
		cancel()
		sig := <-sigs
		select {
		case <-deregistered:
		default:
			say(slog.LevelWarn, fmt.Sprintf("%v during the drain: stopping once deregistered (another signal stops at once)", sig))
			select {
			case <-deregistered:
			case <-sigs:
			case <-time.After(deregisterWait):
			}
		}
		say(slog.LevelWarn, fmt.Sprintf("%v during the drain: stopping at once", sig))
		os.Exit(128 + int(sig.(syscall.Signal)))
	}()
	return ctx, func() { signal.Stop(sigs); cancel() }
}

// sayer returns how the sidecar reports what it says outside its logger
// (why it stopped): "micro sidecar: ..." lines, or, with
// --log_format=json, log objects, so that a collector parsing the stream
// keeps the lines that matter most.
func sayer(cfg config, stderr io.Writer) func(slog.Level, string) {
	if cfg.LogFormat != "json" {
		return func(_ slog.Level, msg string) { fmt.Fprintf(stderr, "micro sidecar: %s\n", msg) }
	}
	cfg.LogLevel = slog.LevelDebug // said at any --log_level, as the plain lines are
	log := newLogger(cfg, stderr)
	return func(level slog.Level, msg string) { log.Log(context.Background(), level, msg) }
}

// deregisterWait bounds how long a second signal waits for the
// deregistration: the file registry's lock waits up to 5 s, an etcd
// request up to its timeout.
const deregisterWait = 10 * time.Second

// routes is the sidecar's API.
func (s *sidecar) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/registry", s.handleRegistry)
	mux.HandleFunc("/health", s.handleHealth)
	mux.Handle("/metrics", s.metrics.set)
	mux.HandleFunc("/broker", s.broker.handle)
	mux.HandleFunc("/broker/stats", s.broker.handleStats)
	mux.HandleFunc("/rpc", s.handleRPC)
	mux.HandleFunc("/proxy/", s.handleProxy)
	if s.cfg.Handler == "proxy" {
		mux.HandleFunc("/", s.handleProxyPath)
	} else {
		mux.HandleFunc("/", s.handlePath) // answers 404 for anything not a call
	}
	routeOf := func(r *http.Request) string {
		_, pattern := mux.Handler(r)
		return pattern
	}
	if s.log.Enabled(context.Background(), slog.LevelDebug) {
		s.metrics.requestLog = s.log
	}
	// The guard comes before the in-flight limit, so that an allowed
	// origin's page can read the limit's 503.
	return s.metrics.instrument(s.guard(limitInFlight(s.cfg.MaxInFlight, s.authenticate(hotRoutes(mux, s.handleRPC, s.handleProxy)))), routeOf)
}

// hotRoutes sends /rpc and /proxy/ paths without dot segments straight to
// their handlers, setting Pattern as the mux would: matching every call
// against the mux's tree costs more than the rest of the routing. Anything
// else, paths with dot segments (which the mux redirects) included, goes
// to the mux.
func hotRoutes(mux *http.ServeMux, rpc, proxy http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch p := r.URL.Path; {
		case r.Method == http.MethodConnect:
			// On any path: the mux would answer with a plain-text 404, /rpc
			// with a 405 as if another method would do.
			writeError(w, http.StatusNotImplemented, "CONNECT is not supported: the sidecar is not a forward proxy")
		case p == "/rpc":
			r.Pattern = "/rpc"
			rpc(w, r)
		case strings.HasPrefix(p, "/proxy/") && noDotSegments(p):
			r.Pattern = "/proxy/"
			proxy(w, r)
		default:
			if clean := muxCleanPath(r.URL.EscapedPath()); clean != r.URL.EscapedPath() {
				redirectToClean(w, r, clean)
				return
			}
			mux.ServeHTTP(w, r)
		}
	})
}

// muxCleanPath is the path, as escaped, that the mux would redirect p to
// (its cleanPath): without "." and ".." segments or empty ones, with a
// trailing slash kept.
func muxCleanPath(p string) string {
	if p == "" || p[0] != '/' {
		p = "/" + p
	}
	np := path.Clean(p)
	if strings.HasSuffix(p, "/") && np != "/" {
		np += "/"
	}
	return np
}

// redirectToClean sends a client to the clean form of its path, as the mux
// would, but with the path's escapes kept as they came: the mux escapes
// the escaped path again (b%2Fc becomes b%252Fc), and a client following
// its redirect asks for another path.
func redirectToClean(w http.ResponseWriter, r *http.Request, clean string) {
	if r.URL.RawQuery != "" {
		clean += "?" + r.URL.RawQuery
	}
	http.Redirect(w, r, clean, http.StatusTemporaryRedirect)
}

// noDotSegments reports whether p, which starts with a slash, has no "."
// or ".." segment. The mux redirects such a path to its clean form, which
// for a proxied path may name another service; an empty segment ("//") is
// the app's business, and goes on as it came.
func noDotSegments(p string) bool {
	for seg := range strings.SplitSeq(p[1:], "/") {
		if seg == "." || seg == ".." {
			return false
		}
	}
	return true
}

// handleHealth reports the sidecar and the app: 200 when all is well, 503
// otherwise.
func (s *sidecar) handleHealth(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	rep := healthReport{Sidecar: sidecarHealth{
		Status:        "ok",
		Version:       buildVersion(),
		UptimeSeconds: int64(time.Since(s.started).Seconds()),
		Registry:      s.reg.name,
		RegistryError: trimErr(s.reg.backend.status()),
	}}
	switch {
	case s.stopping.Load():
		rep.Sidecar.Status = "stopping"
	case rep.Sidecar.RegistryError != "":
		rep.Sidecar.Status = "degraded"
	}
	if s.cfg.ServerName != "" {
		a := appHealth{Status: healthUnchecked}
		if s.health != nil {
			a = s.health.report()
		}
		a.Registered = s.app.registered()
		a.RegistrationError = trimErr(s.app.refused())
		a.Name, a.ID = s.cfg.ServerName, s.cfg.ServerID
		rep.App = &a
	}
	ok := rep.healthy() && !s.stopping.Load()
	rep.Status = statusWord(ok)
	code := http.StatusOK
	if !ok {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, rep)
}
