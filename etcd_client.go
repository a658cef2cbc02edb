package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// etcdClient speaks etcd's v3 HTTP/JSON gateway: the grpc-gateway that etcd
// serves on its client port in front of its gRPC API
// (https://etcd.io/docs/v3.4/dev-guide/api_grpc_gateway/). Every call is a
// POST of a JSON request to /v3/<service>/<method>; in the JSON, int64
// fields are decimal strings and bytes fields are standard base64, as the
// protobuf JSON mapping says (https://protobuf.dev/programming-guides/proto3/#json).
// Streaming calls (watch, lease keepalive) answer with one JSON object per
// line.
//
// The client holds several endpoints of one cluster and fails over: a call
// goes to the endpoint that last answered and, if that endpoint cannot be
// reached or says it is unavailable, to the next, in the order given.
type etcdClient struct {
	eps      *endpointSet
	hc       *http.Client
	username string
	password string
	timeout  time.Duration // per unary call and per watch creation
	maxReply int           // bytes of one unary answer; maxEtcdResponse unless a test lowers it
	maxWatch int           // bytes of one watch message; maxWatchMessage unless a test lowers it

	// onFail, if set, is told when endpoint i failed a call, so that a
	// watch on the same endpoint can move on without waiting for TCP to
	// notice.
	onFail func(i int)

	mu    sync.Mutex // guards token and refusal
	token string     // from /v3/auth/authenticate; empty: none yet
	// refusal is etcd's last refusal of the credentials: until it lapses,
	// calls fail with it and do not ask again. Each authentication costs
	// etcd a bcrypt hash; a fleet with a wrong password, each sidecar
	// asking at every retry of its watch, registrations and refreshes,
	// would keep it busy.
	refusal credentialRefusal
}

// credentialRefusal is a refusal of the credentials, held for a while.
type credentialRefusal struct {
	err   error
	until time.Time     // when the credentials may be tried again
	hold  time.Duration // how long the last one was held: doubled at each further refusal
}

// Holding refused credentials: the first refusal for credRetryMin, each
// further one twice as long as the last, up to credRetryMax, so that a
// password corrected in etcd is taken up within half a minute.
const (
	credRetryMin = 2 * time.Second
	credRetryMax = 30 * time.Second
)

// Defaults of the etcd client, and bounds on what it reads.
const (
	etcdRequestTimeout = 3 * time.Second
	etcdDialTimeout    = 2 * time.Second
	// maxEtcdResponse bounds one unary answer; a range is read in pages of
	// etcdRangePage keys, far below it.
	maxEtcdResponse = 64 << 20
)

// errEtcdCredentials marks etcd's refusal of --registry_username and its
// password: a mistake of configuration, not of the network.
var errEtcdCredentials = errors.New("etcd refused the credentials")

// errEtcdUnavailable is returned when no endpoint answered.
var errEtcdUnavailable = errors.New("no etcd endpoint answered")

// gRPC status codes that etcd's errors carry
// (https://grpc.github.io/grpc/core/md_doc_statuscodes.html).
const (
	grpcCanceled         = 1
	grpcUnknown          = 2
	grpcDeadlineExceeded = 4
	grpcInvalidArgument  = 3 // etcd: "user name is empty", a request without credentials to an etcd with auth on
	grpcNotFound         = 5
	grpcPermissionDenied = 7
	grpcOutOfRange       = 11 // etcd: "required revision has been compacted"
	grpcUnavailable      = 14
	grpcUnauthenticated  = 16
)

// etcdError is an error answer of the gateway: {"error":..,"message":..,"code":N}
// for unary calls, {"error":{"grpc_code":N,"message":..}} inside a stream.
type etcdError struct {
	Code    int // gRPC status code; 0 when the answer was not etcd's JSON
	HTTP    int // HTTP status, 0 inside a stream
	Message string
}

func (e *etcdError) Error() string {
	if e.Code == 0 && e.HTTP != 0 {
		return fmt.Sprintf("etcd: HTTP %d: %s", e.HTTP, e.Message)
	}
	return "etcd: " + e.Message
}

// parseEtcdError reads an error answer of status code httpStatus.
func parseEtcdError(httpStatus int, body []byte) *etcdError {
	var v struct {
		Message string `json:"message"`
		Code    int    `json:"code"`
	}
	if err := json.Unmarshal(body, &v); err != nil || v.Message == "" {
		return &etcdError{HTTP: httpStatus, Message: truncate(strings.TrimSpace(string(body)), 200)}
	}
	return &etcdError{Code: v.Code, HTTP: httpStatus, Message: v.Message}
}

// shouldFailOver reports whether err means "try another endpoint": the
// endpoint could not be reached, timed out, or said it cannot serve (no
// leader, shutting down), as opposed to an answer about the request itself.
func shouldFailOver(err error) bool {
	var ee *etcdError
	if errors.As(err, &ee) {
		switch ee.Code {
		// Canceled: a member shutting down answers "grpc: the client
		// connection is closing"; a call this client gives up on gets
		// no answer at all, so the code is never about our request.
		case grpcUnavailable, grpcDeadlineExceeded, grpcUnknown, grpcCanceled:
			return true
		case 0:
			// A proxy or a broken gateway, or a plain 404: a member
			// started without its gRPC gateway (--enable-grpc-gateway=false)
			// serves none of the sidecar's calls, and another may.
			return ee.HTTP >= 500 || ee.HTTP == http.StatusNotFound
		}
		return false
	}
	return err != nil && !errors.Is(err, errReplyTooLarge) // transport errors: refused, reset, timeout, TLS
}

// isAuthError reports whether err says the token is missing or stale.
func isAuthError(err error) bool {
	var ee *etcdError
	return errors.As(err, &ee) && (ee.Code == grpcUnauthenticated || ee.HTTP == http.StatusUnauthorized)
}

// isAccessRefusal reports whether etcd answered that this sidecar may not
// do what it asked: no user given to an etcd with authentication on, or a
// user without a role on the prefix. etcd is reachable; the settings are
// wrong.
func isAccessRefusal(err error) bool {
	var ee *etcdError
	return errors.As(err, &ee) && ee.Code == grpcPermissionDenied || isUserMissing(err)
}

// isUserMissing reports whether etcd answered that it wants a user, which
// this sidecar did not give: authentication is on.
func isUserMissing(err error) bool {
	var ee *etcdError
	return errors.As(err, &ee) && ee.Code == grpcInvalidArgument && strings.Contains(ee.Message, "user name")
}

// tlsFixOf says which flags to check when err is a failed TLS handshake
// with etcd; "" when it is not one. etcd answers a missing and an
// untrusted client certificate alike ("bad certificate").
func tlsFixOf(err error) string {
	switch tlsFailureOf(err) {
	case tlsUntrusted:
		return "etcd's certificate is not trusted: check --registry_tls_ca, and that the URL's host is one the certificate names"
	case tlsNotSpoken:
		return "etcd does not speak TLS there: use an http:// URL in --registry_address"
	case tlsRefused:
		return "etcd refused this sidecar's certificate, or wants one: check --registry_tls_cert and --registry_tls_key, and that etcd's --trusted-ca-file signed them"
	}
	return ""
}

// answeredRefusal reports whether etcd itself answered err, refusing the
// request, rather than being out of reach.
func answeredRefusal(err error) bool {
	var ee *etcdError
	return !errors.Is(err, errEtcdUnavailable) && errors.As(err, &ee) && !shouldFailOver(err)
}

// isTooLargeForEtcd reports whether etcd refused a request as larger
// than its --max-request-bytes: a refusal for good, of that request only.
func isTooLargeForEtcd(err error) bool {
	var ee *etcdError
	return errors.As(err, &ee) && strings.Contains(ee.Message, "request is too large")
}

// endpointSet is the cluster's endpoints in the order given, with the one
// that last answered first.
type endpointSet struct {
	urls []string

	mu  sync.Mutex // guards cur
	cur int
}

// order returns the endpoint indexes to try: the current one, then the
// others in the configured order, wrapping around.
func (e *endpointSet) order() []int {
	e.mu.Lock()
	cur := e.cur
	e.mu.Unlock()
	return rotation(len(e.urls), cur)
}

// rotation is 0..n-1 starting at start.
func rotation(n, start int) []int {
	out := make([]int, n)
	for k := range out {
		out[k] = (start + k) % n
	}
	return out
}

// use makes i the endpoint tried first.
func (e *endpointSet) use(i int) {
	e.mu.Lock()
	e.cur = i
	e.mu.Unlock()
}

// parseEtcdEndpoints reads --registry_address for etcd: comma-separated
// http(s)://host:port URLs with no path.
func parseEtcdEndpoints(s string) ([]string, error) {
	var out []string
	for _, raw := range splitList(s) {
		u, err := url.Parse(raw)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, fmt.Errorf("--registry_address %q: want etcd client URLs such as http://127.0.0.1:2379, comma separated", raw)
		}
		if u.Path != "" && u.Path != "/" || u.RawQuery != "" || u.User != nil {
			return nil, fmt.Errorf("--registry_address %q: give scheme://host:port only; credentials go in --registry_username and --registry_password", redactURL(raw))
		}
		_, port, err := net.SplitHostPort(u.Host)
		if err != nil || port == "" {
			return nil, fmt.Errorf("--registry_address %q: name the port, e.g. %s://%s:2379", raw, u.Scheme, strings.TrimSuffix(u.Host, ":"))
		}
		if !validPort(port) {
			return nil, fmt.Errorf("--registry_address %q: port must be 1-65535", raw)
		}
		out = append(out, u.Scheme+"://"+u.Host)
	}
	if len(out) == 0 {
		return nil, errors.New("--registry_address is empty; give etcd client URLs such as http://127.0.0.1:2379")
	}
	return out, nil
}

// etcdTLSConfig builds the client TLS configuration from PEM files: a CA
// bundle to verify the servers (default: the system's), and a client
// certificate and key for etcd's --client-cert-auth. nil when none is given.
func etcdTLSConfig(caFile, certFile, keyFile string) (*tls.Config, error) {
	if caFile == "" && certFile == "" && keyFile == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if caFile != "" {
		pem, err := os.ReadFile(caFile)
		if err != nil {
			return nil, fmt.Errorf("--registry_tls_ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("--registry_tls_ca %s: no PEM certificate in it", caFile)
		}
		cfg.RootCAs = pool
	}
	if (certFile == "") != (keyFile == "") {
		return nil, errors.New("--registry_tls_cert and --registry_tls_key go together; give both or neither")
	}
	if certFile != "" {
		cert, err := tls.LoadX509KeyPair(certFile, keyFile)
		if err != nil {
			return nil, fmt.Errorf("--registry_tls_cert/--registry_tls_key: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// newEtcdClient builds a client; timeout 0 means etcdRequestTimeout.
func newEtcdClient(endpoints []string, tlsCfg *tls.Config, username, password string, timeout time.Duration) *etcdClient {
	if timeout <= 0 {
		timeout = etcdRequestTimeout
	}
	tr := &http.Transport{
		// etcd is reached directly: a proxy from the environment is meant
		// for the app's traffic, not for the cluster's own store.
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: etcdDialTimeout, KeepAlive: 15 * time.Second}).DialContext,
		TLSClientConfig:     tlsCfg,
		TLSHandshakeTimeout: etcdDialTimeout,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     90 * time.Second,
	}
	return &etcdClient{
		eps:      &endpointSet{urls: endpoints},
		hc:       &http.Client{Transport: tr},
		username: username,
		password: password,
		timeout:  timeout,
		maxReply: maxEtcdResponse,
		maxWatch: maxWatchMessage,
	}
}

// errReplyTooLarge says etcd answered with more than a client takes: it is
// up, and a range asked for fewer keys may fit.
var errReplyTooLarge = errors.New("etcd answer too large")

func (c *etcdClient) closeIdle() { c.hc.CloseIdleConnections() }

// call sends a unary request to path and decodes the answer into resp,
// failing over between endpoints.
func (c *etcdClient) call(ctx context.Context, path string, req, resp any) error {
	body, err := json.Marshal(req)
	if err != nil {
		return err
	}
	var errs []error
	for _, i := range c.eps.order() {
		err := c.callAuthed(ctx, i, path, body, resp)
		if err == nil {
			c.eps.use(i)
			return nil
		}
		if ctx.Err() != nil || !shouldFailOver(err) {
			c.eps.use(i) // it answered: it is up
			return err
		}
		errs = append(errs, fmt.Errorf("%s: %w", c.eps.urls[i], err))
		if c.onFail != nil {
			c.onFail(i)
		}
	}
	return fmt.Errorf("%w: %w", errEtcdUnavailable, errors.Join(errs...))
}

// callAuthed is one call to endpoint i, authenticating first when
// credentials are configured and there is no token, and once more when
// etcd says the token went stale (simple tokens expire; see etcd's
// --auth-token-ttl).
func (c *etcdClient) callAuthed(ctx context.Context, i int, path string, body []byte, resp any) error {
	if err := c.ensureToken(ctx, i); err != nil {
		return err
	}
	err := c.callOne(ctx, i, path, body, resp)
	if c.username != "" && isAuthError(err) {
		c.dropToken()
		if err := c.ensureToken(ctx, i); err != nil {
			return err
		}
		err = c.callOne(ctx, i, path, body, resp)
	}
	return err
}

// ensureToken authenticates on endpoint i when credentials are configured
// and no token is held.
func (c *etcdClient) ensureToken(ctx context.Context, i int) error {
	if c.username == "" {
		return nil
	}
	c.mu.Lock()
	have := c.token != ""
	held := c.refusal.err
	if time.Now().After(c.refusal.until) {
		held = nil
	}
	c.mu.Unlock()
	switch {
	case have:
		return nil
	case held != nil:
		return held
	}
	body, err := json.Marshal(map[string]string{"name": c.username, "password": c.password})
	if err != nil {
		return err
	}
	var out struct {
		Token string `json:"token"`
	}
	if err := c.callOne(ctx, i, "/v3/auth/authenticate", body, &out); err != nil {
		if shouldFailOver(err) {
			return fmt.Errorf("authenticating as %q: %w", c.username, err)
		}
		// etcd answered: it refused them.
		err = fmt.Errorf("authenticating as %q: %w: %w", c.username, errEtcdCredentials, err)
		c.refuse(err)
		return err
	}
	c.mu.Lock()
	c.token = out.Token
	c.refusal = credentialRefusal{}
	c.mu.Unlock()
	return nil
}

// refuse holds err, etcd's refusal of the credentials, for twice as long
// as the last one, within credRetryMin and credRetryMax.
func (c *etcdClient) refuse(err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.refusal.hold = min(max(2*c.refusal.hold, credRetryMin), credRetryMax)
	c.refusal.err, c.refusal.until = err, time.Now().Add(c.refusal.hold)
}

func (c *etcdClient) dropToken() {
	c.mu.Lock()
	c.token = ""
	c.mu.Unlock()
}

// newRequest builds a POST to endpoint i with the token, if any.
func (c *etcdClient) newRequest(ctx context.Context, i int, path string, body []byte) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.eps.urls[i]+path, bytes.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	c.mu.Lock()
	token := c.token
	c.mu.Unlock()
	if token != "" && path != "/v3/auth/authenticate" {
		req.Header.Set("Authorization", token) // etcd wants the bare token, no "Bearer"
	}
	return req, nil
}

// callOne is one unary call to endpoint i, bounded by the request timeout.
func (c *etcdClient) callOne(ctx context.Context, i int, path string, body []byte, resp any) error {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	req, err := c.newRequest(ctx, i, path, body)
	if err != nil {
		return err
	}
	r, err := c.hc.Do(req)
	if err != nil {
		return err
	}
	defer r.Body.Close()
	data, err := io.ReadAll(io.LimitReader(r.Body, int64(c.maxReply)+1))
	if err != nil {
		return err
	}
	if len(data) > c.maxReply {
		return fmt.Errorf("%w: more than %d bytes", errReplyTooLarge, c.maxReply)
	}
	if r.StatusCode != http.StatusOK {
		return parseEtcdError(r.StatusCode, data)
	}
	if resp == nil {
		return nil
	}
	if err := json.Unmarshal(data, resp); err != nil {
		return fmt.Errorf("etcd answer %s: %w", truncate(string(data), 100), err)
	}
	return nil
}

// openStream starts a streaming call on endpoint i and returns its body;
// ctx bounds the whole stream. A response that is not 200 is an error.
func (c *etcdClient) openStream(ctx context.Context, i int, path string, body []byte, header http.Header) (io.ReadCloser, error) {
	if err := c.ensureToken(ctx, i); err != nil {
		return nil, err
	}
	req, err := c.newRequest(ctx, i, path, body)
	if err != nil {
		return nil, err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	r, err := c.hc.Do(req)
	if err != nil {
		return nil, err
	}
	if r.StatusCode != http.StatusOK {
		data, _ := io.ReadAll(io.LimitReader(r.Body, 64<<10))
		r.Body.Close()
		err := parseEtcdError(r.StatusCode, data)
		if isAuthError(err) {
			c.dropToken()
		}
		return nil, err
	}
	return r.Body, nil
}

// int64s is an int64 as the protobuf JSON mapping writes it: a decimal
// string. A bare number is accepted too.
type int64s int64

func (n int64s) MarshalJSON() ([]byte, error) {
	return []byte(`"` + strconv.FormatInt(int64(n), 10) + `"`), nil
}

func (n *int64s) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if s == "null" || s == "" {
		*n = 0
		return nil
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return fmt.Errorf("int64 %s: %w", truncate(string(b), 32), err)
	}
	*n = int64s(v)
	return nil
}

// The gateway's messages, as far as the registry uses them (etcd's
// api/etcdserverpb/rpc.proto and api/mvccpb/kv.proto).
type (
	etcdHeader struct {
		ClusterID string `json:"cluster_id"`
		Revision  int64s `json:"revision"`
	}
	etcdKV struct {
		Key         []byte `json:"key"`
		Value       []byte `json:"value"`
		ModRevision int64s `json:"mod_revision"`
		Lease       int64s `json:"lease"`
	}
	etcdRangeRequest struct {
		Key      []byte `json:"key"`
		RangeEnd []byte `json:"range_end,omitempty"`
		Limit    int64s `json:"limit,omitempty"`
		Revision int64s `json:"revision,omitempty"`
	}
	etcdRangeResponse struct {
		Header etcdHeader `json:"header"`
		KVs    []etcdKV   `json:"kvs"`
		More   bool       `json:"more"`
	}
	etcdPutRequest struct {
		Key   []byte `json:"key"`
		Value []byte `json:"value"`
		Lease int64s `json:"lease,omitempty"`
	}
	etcdDeleteRequest struct {
		Key []byte `json:"key"`
	}
	etcdHeaderOnly struct {
		Header etcdHeader `json:"header"`
	}
	etcdLeaseGrant struct {
		TTL int64s `json:"TTL"`
		ID  int64s `json:"ID,omitempty"`
	}
	etcdLeaseID struct {
		ID int64s `json:"ID"`
	}
	etcdKeepAliveResponse struct {
		Result *struct {
			ID  int64s `json:"ID"`
			TTL int64s `json:"TTL"` // absent (0) when the lease is gone
		} `json:"result"`
		Error *etcdStreamError `json:"error"`
	}
	etcdStreamError struct {
		GRPCCode int    `json:"grpc_code"`
		HTTPCode int    `json:"http_code"`
		Message  string `json:"message"`
	}
	etcdEvent struct {
		Type string `json:"type"` // "PUT" is the default and usually omitted; "DELETE"
		KV   etcdKV `json:"kv"`
	}
	etcdWatchResult struct {
		Header          etcdHeader  `json:"header"`
		Created         bool        `json:"created"`
		Canceled        bool        `json:"canceled"`
		CompactRevision int64s      `json:"compact_revision"`
		CancelReason    string      `json:"cancel_reason"`
		Events          []etcdEvent `json:"events"`
		Fragment        bool        `json:"fragment"` // more of these events follow
	}
	etcdWatchMessage struct {
		Result *etcdWatchResult `json:"result"`
		Error  *etcdStreamError `json:"error"`
	}
)

func (e *etcdStreamError) err() *etcdError {
	return &etcdError{Code: e.GRPCCode, Message: e.Message}
}
