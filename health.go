package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"
)

// healthConfig says how to check the app. The defaults are Kubernetes'
// probe defaults (period 10s, timeout 1s, failureThreshold 3,
// successThreshold 1), which Consul and Envoy users will find familiar.
type healthConfig struct {
	URL       string        // http(s)://... (any 2xx passes) or tcp://host:port
	Interval  time.Duration // between checks
	Timeout   time.Duration // per check; a check that hangs longer fails
	Failures  int           // consecutive failures that take a passing app out
	Successes int           // consecutive passes that bring a failing app back
}

// Health states of the app.
const (
	healthUnknown   = "unknown"   // not checked yet
	healthPassing   = "passing"   // registered
	healthFailing   = "failing"   // deregistered
	healthUnchecked = "unchecked" // no check configured; registered
)

// healthState is the checker's memory between checks.
type healthState struct {
	Status   string
	Passes   int  // consecutive, since the last failure
	Failures int  // consecutive, since the last pass
	Passed   bool // ever: until then, one pass registers the app
}

// nextHealth is the state machine: the first check decides at once; after
// that a passing app needs `failures` consecutive failures to be taken out
// and a failing app `successes` consecutive passes to come back. An app
// that has never passed (still starting when the sidecar did) comes in on
// its first pass: `successes` guards against a flapping app, which one
// that never ran is not. changed reports a transition between passing and
// failing.
func nextHealth(s healthState, passed bool, failures, successes int) (next healthState, changed bool) {
	next = s
	if passed {
		next.Passes++
		next.Failures = 0
		next.Passed = true
	} else {
		next.Failures++
		next.Passes = 0
	}
	switch {
	case s.Status == healthUnknown && passed:
		next.Status = healthPassing
	case s.Status == healthUnknown:
		next.Status = healthFailing
	case s.Status == healthPassing && !passed && next.Failures >= failures:
		next.Status = healthFailing
	case s.Status == healthFailing && passed && (next.Passes >= successes || !s.Passed):
		next.Status = healthPassing
	}
	return next, next.Status != s.Status
}

// validateHealthURL checks a --healthcheck_url up front.
func validateHealthURL(raw string) error {
	shown := redactURL(raw)
	u, err := url.Parse(raw)
	if err != nil {
		// Not echoed: it may hold a password that redactURL cannot find.
		return errors.New("--healthcheck_url does not parse as a URL: want a URL with its scheme, http://host:port/path or tcp://host:port")
	}
	if u.Scheme == "" {
		return fmt.Errorf("--healthcheck_url %q: want a URL with its scheme, http://host:port/path or tcp://host:port", shown)
	}
	switch u.Scheme {
	case "http", "https":
		if u.Host == "" {
			return fmt.Errorf("--healthcheck_url %q has no host; want e.g. http://127.0.0.1:9090/health", shown)
		}
	case "tcp":
		if _, _, err := net.SplitHostPort(u.Host); err != nil || u.Port() == "" {
			return fmt.Errorf("--healthcheck_url %q: want tcp://host:port", shown)
		}
		if u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			return fmt.Errorf("--healthcheck_url %q: a tcp check only connects; want tcp://host:port and nothing more", shown)
		}
	default:
		return fmt.Errorf("--healthcheck_url %q: scheme must be http, https or tcp", shown)
	}
	if p := u.Port(); p != "" {
		if !validPort(p) {
			return fmt.Errorf("--healthcheck_url %q: port must be 1-65535", shown)
		}
	}
	return nil
}

// healthChecker checks the app and calls onChange(passing) once per
// transition. The loop only ticks; check does the work.
type healthChecker struct {
	cfg      healthConfig
	log      *slog.Logger
	client   *http.Client
	timings  *histogramVec // check durations by result; may be nil
	onChange func(passing bool)

	mu           sync.Mutex // guards state, lastErr, lastCheck, lastDuration
	state        healthState
	lastErr      string
	lastCheck    time.Time
	lastDuration time.Duration

	// The reason the last line about a failing app gave, and when: a
	// failing app's changed reason is logged too (connection refused,
	// then 404 once the app is up at the wrong path), at most once every
	// reasonChangeEvery, as errors may name a changing local port.
	loggedReason string
	loggedAt     time.Time
}

const reasonChangeEvery = 10 * time.Second

func newHealthChecker(cfg healthConfig, log *slog.Logger, timings *histogramVec, onChange func(bool)) *healthChecker {
	return &healthChecker{
		cfg: cfg,
		log: log,
		// A fresh connection per check, as Kubernetes probes make: a reused
		// connection would hide an app that stopped accepting new ones.
		client: &http.Client{
			// An https:// check does not verify the app's certificate, as
			// Kubernetes' probes do not: it asks whether the app answers,
			// and apps often serve a self-signed or internal certificate
			// (a FROM scratch image has no CAs at all).
			Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
			// The app answers for itself: a 3xx fails, as the README says
			// any answer but a 2xx does, rather than pass on whatever
			// another server says at the Location.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		timings:  timings,
		onChange: onChange,
		state:    healthState{Status: healthUnknown},
	}
}

// run checks at once and then every interval until ctx ends, counted
// from the start of one check to the next, as Kubernetes' probes run: a
// check that hangs until its timeout does not put the next one off.
func (h *healthChecker) run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
			start := time.Now()
			h.check(ctx)
			timer.Reset(waitLeft(h.nextWait(), time.Since(start)))
		}
	}
}

// waitLeft is what is left of wait once a check took took: nothing when
// the check took longer (a timeout over the interval), which runs the
// next at once.
func waitLeft(wait, took time.Duration) time.Duration { return max(wait-took, 0) }

// startCheckInterval is how often an app that has not passed yet is
// checked: the app and its sidecar usually start together, the app a
// moment later, and its registration should not wait a whole interval.
const startCheckInterval = time.Second

// nextWait is the time to the next check: the interval, or, until the
// app first passes, at most startCheckInterval.
func (h *healthChecker) nextWait() time.Duration {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.state.Passed {
		return min(h.cfg.Interval, startCheckInterval)
	}
	return h.cfg.Interval
}

// check probes the app once and applies the result.
func (h *healthChecker) check(ctx context.Context) {
	start := time.Now()
	err := h.probe(ctx)
	if ctx.Err() != nil {
		return // shutting down: not the app's fault
	}
	if h.timings != nil {
		h.timings.ObserveSince(start, map[bool]string{true: "pass", false: "fail"}[err == nil])
	}
	h.mu.Lock()
	next, changed := nextHealth(h.state, err == nil, h.cfg.Failures, h.cfg.Successes)
	h.state = next
	h.lastCheck = start
	h.lastDuration = time.Since(start)
	h.lastErr = ""
	if err != nil {
		h.lastErr = err.Error()
	}
	h.mu.Unlock()
	if !changed {
		if err != nil && next.Status != healthPassing && reasonOf(err) != h.loggedReason && time.Since(h.loggedAt) >= reasonChangeEvery {
			h.logFailing(next, err, "the reason changed")
		}
		return
	}
	if next.Status == healthPassing {
		h.log.Info("app is healthy", "url", redactURL(h.cfg.URL))
	} else {
		h.logFailing(next, err, "")
	}
	h.onChange(next.Status == healthPassing)
}

// reasonOf is err's text without connections' own ends, which differ from
// one check to the next for the same reason: a new port at every check
// ("read tcp 127.0.0.1:41234->127.0.0.1:9090: ...") tells nothing of why
// it failed.
func reasonOf(err error) string {
	s := err.Error()
	var out strings.Builder
	for {
		i := strings.Index(s, "->")
		if i < 0 {
			out.WriteString(s)
			return out.String()
		}
		start := strings.LastIndexAny(s[:i], " \t>") + 1 // the local end starts after a space
		if _, port, err := net.SplitHostPort(s[start:i]); err == nil && port != "" && strings.Trim(port, "0123456789") == "" {
			out.WriteString(s[:start]) // an address: dropped
		} else {
			out.WriteString(s[:i+2]) // words of the app's ("db->down"): kept
		}
		s = s[i+2:]
	}
}

// logFailing says that the app fails its checks, and why; news says what
// is new when the app was failing already.
func (h *healthChecker) logFailing(st healthState, err error, news string) {
	h.loggedReason, h.loggedAt = "", time.Now()
	if err != nil {
		h.loggedReason = reasonOf(err)
	}
	args := []any{"url", redactURL(h.cfg.URL), "error", err}
	if news != "" {
		args = append(args, "news", news)
	}
	if !st.Passed {
		// The app and the sidecar usually start together: not yet up is
		// no alarm.
		h.log.Info("app is not healthy yet; it is registered at its first passing check", args...)
		return
	}
	h.log.Warn("app is unhealthy", append(args, "consecutive_failures", st.Failures)...)
}

// probe runs one check with the configured timeout.
func (h *healthChecker) probe(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, h.cfg.Timeout)
	defer cancel()
	u, err := url.Parse(h.cfg.URL)
	if err != nil {
		return err
	}
	if u.Scheme == "tcp" {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", u.Host)
		if err != nil {
			return err
		}
		return c.Close()
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, h.cfg.URL, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "micro-sidecar-healthcheck")
	resp, err := h.client.Do(req)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			ue.URL = redactURL(h.cfg.URL) // the error goes to the log and /health
		}
		return h.timedOut(ctx, err)
	}
	defer resp.Body.Close()
	// The answer must arrive whole: an app that sends a 2xx head and then
	// stalls or breaks off is not well. Past 64 KiB it is not read.
	_, err = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("status %s", resp.Status)
	}
	if err != nil {
		return fmt.Errorf("reading the answer: %w", h.timedOut(ctx, err))
	}
	return nil
}

// timedOut names a check cut off by its timeout as such.
func (h *healthChecker) timedOut(ctx context.Context, err error) error {
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		return fmt.Errorf("no answer within %v", h.cfg.Timeout)
	}
	return err
}

// appHealth is the app's part of /health.
type appHealth struct {
	Name                string `json:"name"`
	ID                  string `json:"id"`
	Status              string `json:"status"`
	Registered          bool   `json:"registered"`
	RegistrationError   string `json:"registration_error,omitempty"` // the registry refused the app; retrying
	HealthcheckURL      string `json:"healthcheck_url,omitempty"`
	LastCheck           string `json:"last_check,omitempty"`
	LastDurationMS      *int64 `json:"last_duration_ms,omitempty"` // present once a check ran, 0 included
	LastError           string `json:"last_error,omitempty"`
	ConsecutiveFailures int    `json:"consecutive_failures"`
}

func (h *healthChecker) report() appHealth {
	h.mu.Lock()
	defer h.mu.Unlock()
	a := appHealth{
		Status:              h.state.Status,
		HealthcheckURL:      redactURL(h.cfg.URL),
		LastError:           h.lastErr,
		ConsecutiveFailures: h.state.Failures,
	}
	if !h.lastCheck.IsZero() {
		a.LastCheck = h.lastCheck.UTC().Format(time.RFC3339Nano)
		ms := h.lastDuration.Milliseconds()
		a.LastDurationMS = &ms
	}
	return a
}

// redactURL hides what a URL may carry as a secret before it is shown: a
// password, and the query's values (?apikey=...); the names stay.
func redactURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(a URL that does not parse)"
	}
	if u.RawQuery != "" {
		pairs := strings.Split(u.RawQuery, "&")
		for i, p := range pairs {
			// A bare member (?SECRETKEY) may be the secret itself.
			name, _, ok := strings.Cut(p, "=")
			if !ok {
				name = ""
			}
			pairs[i] = name + "=xxxxx"
		}
		u.RawQuery = strings.Join(pairs, "&")
	}
	if u.User != nil {
		// The user part may be the key itself (https://KEY@host, or
		// KEY: with an empty password): all of it goes.
		if _, ok := u.User.Password(); ok {
			u.User = url.UserPassword("xxxxx", "xxxxx")
		} else {
			u.User = url.User("xxxxx")
		}
	}
	return u.String()
}

// healthReport is the body of GET /health.
type healthReport struct {
	Status  string        `json:"status"` // ok or unhealthy
	Sidecar sidecarHealth `json:"sidecar"`
	App     *appHealth    `json:"app,omitempty"`
}

type sidecarHealth struct {
	Status        string `json:"status"`
	Version       string `json:"version"`
	UptimeSeconds int64  `json:"uptime_seconds"`
	Registry      string `json:"registry"`
	RegistryError string `json:"registry_error,omitempty"`
}

// healthy reports whether the report is all well: the registry works and the
// app, if there is one, passes and is registered when it should be.
func (r healthReport) healthy() bool {
	if r.Sidecar.RegistryError != "" || r.App != nil && r.App.RegistrationError != "" {
		return false
	}
	return r.App == nil || r.App.Status == healthPassing || r.App.Status == healthUnchecked
}

func statusWord(ok bool) string {
	if ok {
		return "ok"
	}
	return "unhealthy"
}

// trimErr shortens an error for a report.
func trimErr(err error) string {
	if err == nil {
		return ""
	}
	return strings.TrimSpace(truncate(err.Error(), 512))
}
