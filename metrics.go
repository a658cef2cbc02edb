package main

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/http"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// This file writes /metrics in the Prometheus text exposition format
// (version 0.0.4) with the standard library: counters, gauges read at scrape
// time, and histograms, each family with fixed label names.

// maxSeries bounds the label combinations of one family: label values come
// from client input (service names), and a flood of names must not grow
// memory without end. Combinations past it are counted under "_other".
const maxSeries = 1000

// metrics is one sidecar's set of metric families.
type metrics struct {
	mu       sync.Mutex // guards families
	families []family
}

// family is one metric: it writes its HELP, TYPE and samples.
type family interface {
	name() string
	write(w *bufio.Writer)
}

func (m *metrics) add(f family) {
	m.mu.Lock()
	m.families = append(m.families, f)
	m.mu.Unlock()
}

// counter registers a counter family with the given label names.
func (m *metrics) counter(name, help string, labels ...string) *counterVec {
	c := &counterVec{desc: desc{n: name, help: help, labels: labels},
		series: seriesSet[counterSeries]{newFn: func(values []string) *counterSeries { return &counterSeries{values: values} }}}
	m.add(c)
	return c
}

// gauge registers a gauge family whose samples are read at scrape time.
func (m *metrics) gauge(name, help string, labels []string, read func() []sample) {
	m.add(&funcFamily{desc: desc{n: name, help: help, labels: labels}, typ: "gauge", read: read})
}

// counterFunc registers a counter family whose samples are read at scrape
// time from counters kept elsewhere (the broker's, the mDNS backend's).
func (m *metrics) counterFunc(name, help string, labels []string, read func() []sample) {
	m.add(&funcFamily{desc: desc{n: name, help: help, labels: labels}, typ: "counter", read: read})
}

// histogram registers a histogram family with the given bucket bounds.
func (m *metrics) histogram(name, help string, buckets []float64, labels ...string) *histogramVec {
	h := &histogramVec{desc: desc{n: name, help: help, labels: labels}, buckets: buckets,
		series: seriesSet[histSeries]{newFn: func(values []string) *histSeries {
			return &histSeries{values: values, counts: make([]uint64, len(buckets))}
		}}}
	m.add(h)
	return h
}

// ServeHTTP writes every family, sorted by name.
func (m *metrics) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodGet, http.MethodHead) {
		return
	}
	m.mu.Lock()
	fams := append([]family(nil), m.families...)
	m.mu.Unlock()
	sort.Slice(fams, func(i, j int) bool { return fams[i].name() < fams[j].name() })
	w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
	bw := bufio.NewWriter(w)
	for _, f := range fams {
		f.write(bw)
	}
	bw.Flush()
}

type desc struct {
	n, help string
	labels  []string
}

func (d desc) name() string { return d.n }

func (d desc) header(w *bufio.Writer, typ string) {
	fmt.Fprintf(w, "# HELP %s %s\n# TYPE %s %s\n", d.n, escapeHelp(d.help), d.n, typ)
}

// labelString renders {a="x",b="y"} for the family's labels and values.
func (d desc) labelString(values []string, extra ...string) string {
	if len(d.labels) == 0 && len(extra) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteByte('{')
	for i, l := range d.labels {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(l + `="` + escapeLabel(values[i]) + `"`)
	}
	for i := 0; i+1 < len(extra); i += 2 {
		if b.Len() > 1 {
			b.WriteByte(',')
		}
		b.WriteString(extra[i] + `="` + escapeLabel(extra[i+1]) + `"`)
	}
	b.WriteByte('}')
	return b.String()
}

// seriesKey joins label values; \xff cannot occur in valid UTF-8 values.
func seriesKey(values []string) string { return string(appendSeriesKey(nil, values)) }

func appendSeriesKey(b []byte, values []string) []byte {
	for i, v := range values {
		if i > 0 {
			b = append(b, 0xff)
		}
		b = append(b, v...)
	}
	return b
}

func overflowValues(n int) []string {
	v := make([]string, n)
	for i := range v {
		v[i] = "_other"
	}
	return v
}

// seriesSet holds the series of one family, keyed by label values and
// capped at maxSeries: past the cap, new combinations share the "_other"
// series. Every request looks series up and almost none adds one, so the
// map is copied on write and read without a lock.
type seriesSet[T any] struct {
	series atomic.Pointer[map[string]*T] // nil, or never changed once stored
	mu     sync.Mutex                    // serialises writers
	newFn  func(values []string) *T
}

// load returns the current map, nil before the first series.
func (ss *seriesSet[T]) load() map[string]*T {
	if p := ss.series.Load(); p != nil {
		return *p
	}
	return nil
}

// get returns the series for values, creating it if needed.
func (ss *seriesSet[T]) get(values []string) *T {
	var arr [128]byte // the key of an existing series is built here, not on the heap
	kb := appendSeriesKey(arr[:0], values)
	if s := ss.load()[string(kb)]; s != nil {
		return s
	}
	k := string(kb)
	ss.mu.Lock()
	defer ss.mu.Unlock()
	old := ss.load()
	if s := old[k]; s != nil {
		return s
	}
	if len(old) >= maxSeries {
		values = overflowValues(len(values))
		k = seriesKey(values)
		if s := old[k]; s != nil {
			return s
		}
	}
	kept := make([]string, len(values)) // not pieces of a request's head (see stringArena)
	for i, v := range values {
		kept[i] = strings.Clone(v)
	}
	s := ss.newFn(kept)
	m := make(map[string]*T, len(old)+1)
	for key, v := range old {
		m[key] = v
	}
	m[k] = s
	ss.series.Store(&m)
	return s
}

// sorted returns every series in label-value order, for stable output.
func (ss *seriesSet[T]) sorted() []*T {
	series := ss.load()
	keys := make([]string, 0, len(series))
	for k := range series {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	out := make([]*T, len(keys))
	for i, k := range keys {
		out[i] = series[k]
	}
	return out
}

// prune drops the series keep does not want.
func (ss *seriesSet[T]) prune(keep func(*T) bool) {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	old := ss.load()
	m := make(map[string]*T, len(old))
	for k, s := range old {
		if keep(s) {
			m[k] = s
		}
	}
	if len(m) < len(old) {
		ss.series.Store(&m)
	}
}

type counterSeries struct {
	values []string
	n      atomic.Uint64
}

// counterVec is a counter family. Add is safe for concurrent use.
type counterVec struct {
	desc
	series seriesSet[counterSeries]
}

// Add adds n to the series with the given label values.
func (c *counterVec) Add(n uint64, values ...string) { c.series.get(values).n.Add(n) }

// Inc adds one.
func (c *counterVec) Inc(values ...string) { c.Add(1, values...) }

// Value returns a series' count, for tests.
func (c *counterVec) Value(values ...string) uint64 { return c.series.get(values).n.Load() }

func (c *counterVec) write(w *bufio.Writer) {
	list := c.series.sorted()
	if len(list) == 0 && len(c.labels) > 0 {
		return // a family with labels appears with its first series
	}
	c.header(w, "counter")
	if len(list) == 0 {
		fmt.Fprintf(w, "%s 0\n", c.n)
	}
	for _, s := range list {
		fmt.Fprintf(w, "%s%s %d\n", c.n, c.labelString(s.values), s.n.Load())
	}
}

// sample is one gauge value with its label values.
type sample struct {
	values []string
	v      float64
}

// funcFamily is a gauge or counter family read at scrape time.
type funcFamily struct {
	desc
	typ  string // gauge or counter
	read func() []sample
}

func (g *funcFamily) write(w *bufio.Writer) {
	samples := g.read()
	if len(samples) == 0 {
		return // nothing to report yet, or ever (micro_app_healthy without an app)
	}
	g.header(w, g.typ)
	for _, s := range samples {
		fmt.Fprintf(w, "%s%s %s\n", g.n, g.labelString(s.values), formatFloat(s.v))
	}
}

type histSeries struct {
	values  []string
	mu      sync.Mutex // guards counts, sum, count, counted
	counts  []uint64   // per bucket, not cumulative
	sum     float64
	count   uint64
	counted uint64 // count at the last pruneIdle
}

// histogramVec is a histogram family.
type histogramVec struct {
	desc
	buckets []float64
	series  seriesSet[histSeries]
}

// Observe records v (in the family's unit, seconds for durations).
func (h *histogramVec) Observe(v float64, values ...string) {
	s := h.series.get(values)
	i := sort.SearchFloat64s(h.buckets, v)
	s.mu.Lock()
	if i < len(s.counts) {
		s.counts[i]++
	}
	s.sum += v
	s.count++
	s.mu.Unlock()
}

// pruneIdle drops the series that observed nothing since the last pruneIdle
// that keep does not want: a series for what has gone (a deregistered
// service) must not stay, or fill maxSeries, for good. Prometheus takes a
// series that comes back for a counter reset.
func (h *histogramVec) pruneIdle(keep func(values []string) bool) {
	h.series.prune(func(s *histSeries) bool {
		s.mu.Lock()
		idle := s.count == s.counted
		s.counted = s.count
		s.mu.Unlock()
		return !idle || keep(s.values)
	})
}

// ObserveSince records the seconds since start.
func (h *histogramVec) ObserveSince(start time.Time, values ...string) {
	h.Observe(time.Since(start).Seconds(), values...)
}

func (h *histogramVec) write(w *bufio.Writer) {
	list := h.series.sorted()
	if len(list) == 0 {
		return // a family with labels appears with its first series
	}
	h.header(w, "histogram")
	for _, s := range list {
		s.mu.Lock()
		var cum uint64
		for i, b := range h.buckets {
			cum += s.counts[i]
			fmt.Fprintf(w, "%s_bucket%s %d\n", h.n, h.labelString(s.values, "le", formatFloat(b)), cum)
		}
		fmt.Fprintf(w, "%s_bucket%s %d\n", h.n, h.labelString(s.values, "le", "+Inf"), s.count)
		fmt.Fprintf(w, "%s_sum%s %s\n", h.n, h.labelString(s.values), formatFloat(s.sum))
		fmt.Fprintf(w, "%s_count%s %d\n", h.n, h.labelString(s.values), s.count)
		s.mu.Unlock()
	}
}

// latencyBuckets suit calls on a LAN: 100 us to 10 s.
var latencyBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}

func formatFloat(v float64) string {
	switch {
	case math.IsInf(v, 1):
		return "+Inf"
	case math.IsInf(v, -1):
		return "-Inf"
	case math.IsNaN(v):
		return "NaN"
	}
	return strconv.FormatFloat(v, 'g', -1, 64)
}

// escapeLabel escapes a label value as the text format requires: backslash,
// double quote and newline.
func escapeLabel(s string) string {
	if !strings.ContainsAny(s, "\\\"\n") {
		return s
	}
	return strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`).Replace(s)
}

func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}

// statusCodes holds the code label of each status, so that counting a
// request does not format one. A status HTTP does not define (a proxied
// node may send any of 100-999) is counted by its class, "4xx": one node
// sending hundreds of made-up codes must not fill the series' bound and
// push the sidecar's own 503s and 502s into the overflow series.
var statusCodes = func() (t [600]string) {
	for i := range t {
		switch {
		case http.StatusText(i) != "" || i == statusClientClosed:
			t[i] = strconv.Itoa(i)
		default:
			t[i] = strconv.Itoa(i/100) + "xx"
		}
	}
	return t
}()

func statusCodeString(code int) string {
	if code >= 0 && code < len(statusCodes) {
		return statusCodes[code]
	}
	return "other"
}

// statusWriter is a ResponseWriter that reports the status it sent: 0
// before any, 101 once hijacked.
type statusWriter interface {
	http.ResponseWriter
	Status() int
}

// statusRecorder remembers the status code a handler wrote, and still lets
// WebSocket handlers hijack the connection and streaming handlers flush.
type statusRecorder struct {
	http.ResponseWriter
	code int
}

func (r *statusRecorder) WriteHeader(code int) {
	if r.code == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) { // an interim 1xx is not the answer
		r.code = code
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *statusRecorder) Status() int { return r.code }

func (r *statusRecorder) Write(p []byte) (int, error) {
	if r.code == 0 {
		r.code = http.StatusOK
	}
	return r.ResponseWriter.Write(p)
}

func (r *statusRecorder) Flush() {
	if f, ok := r.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func (r *statusRecorder) Hijack() (c net.Conn, rw *bufio.ReadWriter, err error) {
	h, ok := r.ResponseWriter.(http.Hijacker)
	if !ok {
		return nil, nil, fmt.Errorf("connection cannot be hijacked")
	}
	if r.code == 0 {
		r.code = http.StatusSwitchingProtocols
	}
	return h.Hijack()
}

func (r *statusRecorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

// sidecarMetrics are the families the core records into; the RPC, broker
// and registry backends add their own to the same set.
type sidecarMetrics struct {
	set         *metrics
	requests    *counterVec   // by route and code
	latency     *histogramVec // by route
	healthCheck *histogramVec // by result
	rpcLatency  *histogramVec // by service and result
	// requestLog, set at --log_level=debug alone, gets a line per request:
	// what an operator chasing a 502 needs, and a cost nobody else pays.
	requestLog *slog.Logger
}

// tidy prunes, every interval until ctx ends, the RPC series of services
// no longer registered that saw no call since the last round.
func (m *sidecarMetrics) tidy(ctx context.Context, interval time.Duration, reg *registry) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			m.rpcLatency.pruneIdle(func(values []string) bool { return reg.table.has(values[0]) })
		}
	}
}

// seriesTidyInterval is how often tidy runs: a series of a service gone
// stays between one and two of it.
const seriesTidyInterval = 10 * time.Minute

func newSidecarMetrics(s *sidecar) *sidecarMetrics {
	set := &metrics{}
	m := &sidecarMetrics{
		set:         set,
		requests:    set.counter("micro_http_requests_total", "HTTP requests served by the sidecar, by route and status code.", "route", "code"),
		latency:     set.histogram("micro_http_request_duration_seconds", "Time to serve HTTP requests, by route; WebSocket connections are not timed.", latencyBuckets, "route"),
		healthCheck: set.histogram("micro_healthcheck_duration_seconds", "Time taken by health checks of the app, by result.", latencyBuckets, "result"),
		rpcLatency:  set.histogram("micro_rpc_duration_seconds", "Time of RPC calls through /rpc and /{service}/{method}, by service and result (ok or the HTTP status of the error).", latencyBuckets, "service", "result"),
	}
	set.counterFunc("micro_rpc_node_ejections_total", "Nodes taken out of selection after a failed connection, by RPC and the proxy.", nil, func() []sample {
		return []sample{{v: float64(s.rpc.sel.ejections.Load())}}
	})
	set.counterFunc("micro_broker_messages_total", "Broker messages by what became of them: published here, delivered to local subscribers, received from peers, forwarded (sent on to peers, again when rerouted; those lost on the way count in forward_dropped too), forward_dropped on the way to a peer, no_subscriber (a group found empty), slow_dropped (lost with a slow subscriber; counted delivered too), redelivered (waiting for a group member that left, given to another).", []string{"event"}, func() []sample {
		r := s.broker.report()
		return []sample{
			{[]string{"delivered"}, float64(r.Delivered)}, {[]string{"forward_dropped"}, float64(r.ForwardDropped)},
			{[]string{"forwarded"}, float64(r.Forwarded)}, {[]string{"no_subscriber"}, float64(r.NoSubscriber)},
			{[]string{"published"}, float64(r.Published)}, {[]string{"received"}, float64(r.Received)},
			{[]string{"redelivered"}, float64(r.Redelivered)}, {[]string{"slow_dropped"}, float64(r.SlowDropped)},
		}
	})
	set.counterFunc("micro_broker_connections_closed_total", "Broker WebSockets the sidecar closed, by reason: slow (queue overflow), reaped (silent), too_big (oversized frame).", []string{"reason"}, func() []sample {
		r := s.broker.report()
		return []sample{{[]string{"reaped"}, float64(r.Reaped)}, {[]string{"slow"}, float64(r.SlowClosed)}, {[]string{"too_big"}, float64(r.TooBig)}}
	})
	set.counterFunc("micro_broker_registry_failures_total", "Registrations and removals of the broker's topic entries that failed (each is retried); while they fail, peers do not forward the topic here.", nil, func() []sample {
		return []sample{{v: float64(s.broker.report().RegistryFailure)}}
	})
	set.gauge("micro_broker_subscribers", "Broker WebSocket connections on this sidecar.", nil, func() []sample {
		return []sample{{v: float64(s.broker.report().Subscribers)}}
	})
	set.gauge("micro_broker_held_bytes", "Bytes of messages waiting for this sidecar's broker subscribers, each message once (bounded by --broker_memory_bytes).", nil, func() []sample {
		return []sample{{v: float64(s.broker.report().HeldBytes)}}
	})
	set.gauge("micro_broker_topics", "Topics with local subscribers.", nil, func() []sample {
		return []sample{{v: float64(s.broker.report().Topics)}}
	})
	set.gauge("micro_registry_services", "Services (names) in the registry.", nil, func() []sample {
		return []sample{{v: float64(s.reg.table.serviceCount())}}
	})
	set.gauge("micro_registry_nodes", "Nodes in the registry.", nil, func() []sample {
		return []sample{{v: float64(s.reg.table.nodeCount())}}
	})
	set.gauge("micro_registry_backend_up", "1 when the registry backend works, 0 when it is failing.", []string{"backend"}, func() []sample {
		return []sample{{values: []string{s.reg.name}, v: boolFloat(s.reg.backend.status() == nil)}}
	})
	set.gauge("micro_app_healthy", "1 when the app is registered (passing or unchecked), 0 otherwise; absent without an app.", []string{"service"}, func() []sample {
		if s.cfg.ServerName == "" {
			return nil
		}
		return []sample{{values: []string{s.cfg.ServerName}, v: boolFloat(s.app.registered())}}
	})
	set.gauge("micro_goroutines", "Goroutines in the sidecar process.", nil, func() []sample {
		return []sample{{v: float64(runtime.NumGoroutine())}}
	})
	set.gauge("micro_heap_inuse_bytes", "Bytes in in-use heap spans.", nil, func() []sample {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return []sample{{v: float64(ms.HeapInuse)}}
	})
	return m
}

func boolFloat(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// instrument counts every request by the route that served it. A request
// refused before routing (by the origin guard, the token check or the
// in-flight limit) is counted under the route it was for, as routeOf finds
// it, and under "unmatched" when there is none.
func (m *sidecarMetrics) instrument(next http.Handler, routeOf func(*http.Request) string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		start := requestStart(w)
		sw, ok := w.(statusWriter) // the fast path's writer knows its status: no wrapper to allocate
		if !ok {
			rec := &statusRecorder{ResponseWriter: w}
			sw, w = rec, rec
		}
		defer func() {
			// A handler that aborts (its caller left, or an answer broke
			// off) is counted with what it had written, or 499, nginx's
			// "client closed request"; the abort then goes on.
			if v := recover(); v != nil {
				if v == http.ErrAbortHandler {
					code := sw.Status()
					if code == 0 {
						code = statusClientClosed
					}
					m.count(w, r, routeOf, start, code)
				}
				panic(v)
			}
		}()
		next.ServeHTTP(w, r)
		code := sw.Status()
		switch {
		case code != 0:
		case r.Context().Err() != nil:
			code = statusClientClosed // its caller left before any answer
		default:
			code = http.StatusOK
		}
		m.count(w, r, routeOf, start, code)
	})
}

// statusClientClosed counts the requests that ended without an answer.
const statusClientClosed = 499

// count records a request served: its count by route and status, and its
// duration.
func (m *sidecarMetrics) count(w http.ResponseWriter, r *http.Request, routeOf func(*http.Request) string, start time.Time, code int) {
	route := r.Pattern
	if route == "" {
		route = routeOf(r)
	}
	if route == "" {
		route = "unmatched"
	}
	m.requests.Inc(route, statusCodeString(code))
	took := requestNow(w).Sub(start)
	if code != http.StatusSwitchingProtocols { // a WebSocket's time is its lifetime
		m.latency.Observe(took.Seconds(), route)
	}
	if m.requestLog != nil {
		m.requestLog.Debug("request", "method", r.Method, "path", r.URL.Path, "route", route, "status", code, "duration", took, "remote", r.RemoteAddr)
	}
}
