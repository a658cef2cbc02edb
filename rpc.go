package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net"
	"net/http"
	"net/url"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unicode/utf8"
)

// RPC: POST /rpc and POST /{service}/{method} call a service's node with
// JSON-RPC 2.0 over HTTP (https://www.jsonrpc.org/specification). Parsing
// the caller's request, mapping paths, encoding the envelope and decoding
// the reply are pure functions; caller.call does the I/O around them.

// rpcConfig tunes RPC calls. Zero values take the documented defaults.
type rpcConfig struct {
	Namespace     string        // prefix of services named by path (--namespace, go.micro.srv); empty: none
	Retries       int           // further nodes tried when a connection fails before the request is sent
	Timeout       time.Duration // deadline of a call without a Timeout header; default 5s, go-micro's
	MaxBodyBytes  int64         // largest request body; default 1 MiB
	MaxReplyBytes int64         // largest reply read from a node; default 16 MiB
}

func (c rpcConfig) withDefaults() rpcConfig {
	if c.Timeout <= 0 {
		c.Timeout = 5 * time.Second
	}
	if c.MaxBodyBytes <= 0 {
		c.MaxBodyBytes = 1 << 20
	}
	if c.MaxReplyBytes <= 0 {
		c.MaxReplyBytes = 16 << 20
	}
	if c.Retries < 0 {
		c.Retries = 0
	}
	return c
}

// maxTimeout bounds the per-request Timeout header.
const maxTimeout = time.Hour

// reservedPaths are first path segments the sidecar keeps for itself: they
// are never mapped to a service, so that /registry/..., /broker/... and the
// like stay the sidecar's own.
var reservedPaths = map[string]bool{"registry": true, "health": true, "broker": true, "metrics": true, "rpc": true, "proxy": true, "debug": true}

// callError is a failed call: the HTTP status and detail it is reported
// with in the ecosystem's error shape.
type callError struct {
	code   int
	detail string
	cause  error // what went wrong underneath, for errors.Is; may be nil
}

func (e *callError) Error() string { return e.detail }
func (e *callError) Unwrap() error { return e.cause }

func callErrorf(code int, format string, args ...any) *callError {
	return &callError{code: code, detail: fmt.Sprintf(format, args...)}
}

// writeCallError reports err in the error shape; a *callError keeps its
// status, anything else is a 500.
func writeCallError(w http.ResponseWriter, err error) {
	var ce *callError
	if errors.As(err, &ce) {
		writeError(w, ce.code, ce.detail)
		return
	}
	writeError(w, http.StatusInternalServerError, err.Error())
}

// rpcCall is one call as the caller asked for it.
type rpcCall struct {
	Service string
	Method  string
	Address string // host:port of one node to call directly; empty: choose
	Request []byte // one JSON value, sent as the only element of params
}

// apiRoute maps a path to a service and method the way micro's API does
// (its rpc and api handlers' resolver), with namespace prepended:
//
//	/foo            ns.foo        Foo.Call
//	/foo/bar        ns.foo        Foo.Bar
//	/foo/bar/baz    ns.foo        Bar.Baz
//	/foo/bar/baz/x  ns.foo.bar    Baz.X
//	/v1/foo/bar     ns.v1.foo     Foo.Bar
//	/v1/foo/bar/baz ns.v1.foo     Bar.Baz
//
// Path segments become method words in CamelCase, dashes joining words
// (say-hello -> SayHello).
func apiRoute(namespace, p string) (service, method string, err error) {
	p = strings.TrimPrefix(path.Clean("/"+p), "/")
	if p == "" {
		return "", "", errors.New("no service in the path; use /{service}/{method}")
	}
	parts := strings.Split(p, "/")
	if reservedPaths[parts[0]] {
		return "", "", fmt.Errorf("/%s is the sidecar's own path, not a service", parts[0])
	}
	var name string
	switch {
	case len(parts) == 1:
		name, method = parts[0], camel(parts[0])+".Call"
	case len(parts) == 2:
		name, method = parts[0], camel(parts[0])+"."+camel(parts[1])
	case len(parts) == 3 && isVersion(parts[0]):
		name, method = parts[0]+"."+parts[1], camel(parts[1])+"."+camel(parts[2])
	default:
		n := len(parts)
		name, method = strings.Join(parts[:n-2], "."), camel(parts[n-2])+"."+camel(parts[n-1])
	}
	if namespace != "" {
		name = namespace + "." + name
	}
	if len(name) > maxNameLen || len(method) > maxNameLen || !validName(name) || !validName(method) {
		return "", "", fmt.Errorf("path %q does not name a service and method", truncate("/"+p, 128))
	}
	return name, method, nil
}

// proxyRoute maps a path to a service the way micro's proxy handler does:
// the first segment, or a version and the next (/v1/foo/... -> ns.v1.foo).
// The service segment must be letters, digits and inner dashes.
func proxyRoute(namespace, p string) (string, error) {
	p = strings.TrimPrefix(p, "/")
	parts := strings.SplitN(p, "/", 4)
	name, alias := parts[0], parts[0]
	if len(parts) > 1 && isVersion(parts[0]) { // micro's len > 2 counts the empty part before the first slash
		name, alias = parts[0]+"."+parts[1], parts[1]
	}
	if !isAlias(alias) || reservedPaths[parts[0]] {
		return "", fmt.Errorf("path %q does not start with a service name", truncate("/"+p, 128))
	}
	if namespace != "" {
		name = namespace + "." + name
	}
	return name, nil
}

// isVersion matches micro's ^v[0-9]+$.
func isVersion(s string) bool {
	if len(s) < 2 || s[0] != 'v' {
		return false
	}
	for i := 1; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// isAlias matches micro's ^[a-zA-Z0-9]+(-[a-zA-Z0-9]+)*$.
func isAlias(s string) bool {
	if s == "" || s[0] == '-' || s[len(s)-1] == '-' || strings.Contains(s, "--") {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// camel turns a path segment into a method word: say-hello -> SayHello.
func camel(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	up := true
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c == '-' {
			up = true
			continue
		}
		if up && c >= 'a' && c <= 'z' {
			c -= 'a' - 'A'
		}
		up = false
		b.WriteByte(c)
	}
	return b.String()
}

// parseRPCRequest reads the body of POST /rpc: form fields (service,
// method, request, address) or a JSON object with the same keys, where
// request is a JSON value or a string holding JSON. Fields missing from the
// body are taken from the URL query.
func parseRPCRequest(contentType string, query url.Values, body []byte) (rpcCall, error) {
	var c rpcCall
	var request []byte
	var given [4]bool // by rpcFormFields' order: in the body, if empty
	isJSON, err := jsonBody(contentType, body)
	if err != nil {
		return rpcCall{}, err
	}
	if isJSON && startsJSON(body, '[') {
		return rpcCall{}, errors.New(`the body is a JSON array: /rpc takes one call, a JSON object such as {"service":"foo","method":"Foo.Bar","request":{}} (batches are not supported)`)
	}
	if isJSON {
		var in struct {
			Service, Method, Address string
			Request                  json.RawMessage
		}
		if err := json.Unmarshal(body, &in); err != nil {
			return rpcCall{}, fmt.Errorf("body is not a JSON object with service, method and request: %v", jsonErrorText(err))
		}
		if key, ok := unknownMember(body, rpcFormFields[:]...); ok {
			return rpcCall{}, unknownRPCField(key)
		}
		if !utf8.Valid(body) { // Unmarshal reads such bytes as U+FFFD, and RawMessage keeps them
			return rpcCall{}, errors.New("body is not UTF-8, as JSON must be (RFC 8259 section 8.1)")
		}
		if len(query) > 0 { // a member given empty is given, too
			given = [4]bool(membersGiven(body, rpcFormFields[:]))
		}
		c.Service, c.Method, c.Address, request = in.Service, in.Method, in.Address, in.Request
		if len(request) > 0 && request[0] == '"' {
			var s string
			json.Unmarshal(request, &s) // valid: it came through Unmarshal above
			// An empty string holds nothing: the request defaults to {}, as
			// an empty body or field does.
			if request = []byte(s); len(trimJSON(request)) > 0 && !validRequestJSON(request) {
				return rpcCall{}, fmt.Errorf("request %q is a string but not JSON; send an object, or a string holding JSON", truncate(s, 64))
			}
		}
	} else {
		form, err := parseRPCForm(body)
		if err != nil {
			return rpcCall{}, err
		}
		c.Service, c.Method, c.Address, given = form.service, form.method, form.address, form.given
		if len(trimJSON(form.request)) > 0 { // request= alone: {}
			request = form.request
			if !validRequestJSON(request) {
				return rpcCall{}, fmt.Errorf("request %q is not JSON in UTF-8", truncate(string(form.request), 64))
			}
		}
	}
	if len(query) > 0 {
		if err := givenTwice(query, given); err != nil {
			return rpcCall{}, err
		}
	}
	if c.Service == "" {
		c.Service = query.Get("service")
	}
	if c.Method == "" {
		c.Method = query.Get("method")
	}
	if c.Address == "" {
		c.Address = query.Get("address")
	}
	if len(request) == 0 && len(trimJSON([]byte(query.Get("request")))) > 0 {
		request = []byte(query.Get("request"))
		if !validRequestJSON(request) {
			return rpcCall{}, fmt.Errorf("request %q is not JSON in UTF-8", truncate(query.Get("request"), 64))
		}
	}
	c.Request = trimJSON(request)
	return c, c.validate()
}

// givenTwice refuses a field the body gave, if empty, that the query gives
// too: which one counts would be a guess. given is by rpcFormFields' order.
func givenTwice(query url.Values, given [4]bool) error {
	for i, name := range rpcFormFields {
		if given[i] && query.Has(name) {
			return fmt.Errorf("%s is given in both the body and the query; give it once", name)
		}
	}
	return nil
}

// rpcForm is the fields of a form body of POST /rpc.
type rpcForm struct {
	service, method, address string
	request                  []byte
	given                    [4]bool // by rpcFormFields' order: in the body, if empty
}

// unknownRPCField refuses a body field /rpc does not take: a misspelled
// request (reqest=...) would call the app with {}.
func unknownRPCField(name string) error {
	return fmt.Errorf("body field %q is not one /rpc takes (service, method, request, address)", truncate(name, 64))
}

// parseRPCForm reads the fields of a form body as parseForm does, the
// first value of a field counting. A body with nothing escaped, the usual
// case (curl -d sends JSON as it is), is split in place; request then
// shares body's bytes.
func parseRPCForm(body []byte) (rpcForm, error) {
	var f rpcForm
	// Three vectorised scans cost less than ContainsAny's byte-by-byte one.
	if bytes.IndexByte(body, '%') >= 0 || bytes.IndexByte(body, '+') >= 0 || bytes.IndexByte(body, ';') >= 0 {
		form, err := parseForm(string(body), "form body")
		if err != nil {
			return f, errNotForm(err)
		}
		for name := range form {
			if !slices.Contains(rpcFormFields[:], name) {
				return f, unknownRPCField(name)
			}
		}
		var values [4][]string
		for i, name := range rpcFormFields {
			if values[i] = form[name]; len(values[i]) > 1 {
				return f, onceOnly(name, len(values[i]))
			}
		}
		f.service, f.method, f.address = firstValue(values[0]), firstValue(values[1]), firstValue(values[2])
		f.request = []byte(firstValue(values[3]))
		for i := range values {
			f.given[i] = len(values[i]) > 0
		}
		return f, nil
	}
	var seen [4]int // service, method, address, request
	repeated := false
	for rest := body; len(rest) > 0; {
		var pair []byte
		pair, rest, _ = bytes.Cut(rest, []byte("&"))
		key, value, _ := bytes.Cut(pair, []byte("="))
		i := -1
		switch string(key) {
		case "service":
			i = 0
		case "method":
			i = 1
		case "address":
			i = 2
		case "request":
			i = 3
		}
		if i < 0 {
			if len(pair) == 0 {
				continue // a stray &
			}
			return f, unknownRPCField(string(key))
		}
		f.given[i] = true
		if seen[i]++; seen[i] > 1 {
			repeated = true
			continue // counted, and refused below
		}
		switch i {
		case 0:
			f.service = callNames.get(value)
		case 1:
			f.method = callNames.get(value)
		case 2:
			f.address = string(value)
		case 3:
			f.request = value
		}
	}
	if repeated {
		for i, n := range seen {
			if err := onceOnly(rpcFormFields[i], n); err != nil {
				return f, err
			}
		}
	}
	return f, nil
}

// errNotForm is the error for a body that parseForm refused, with the
// two ways around what curl -d sends as written.
func errNotForm(err error) error {
	return fmt.Errorf("body is neither JSON nor form fields: %v; let curl escape form values (--data-urlencode), or send JSON", err)
}

// rpcFormFields are the fields of POST /rpc, in parseRPCForm's order.
var rpcFormFields = [4]string{"service", "method", "address", "request"}

// onceOnly refuses a field given n times, n > 1: a repeated field is
// an error, not one value silently used and the others dropped.
func onceOnly(name string, n int) error {
	if n > 1 {
		return fmt.Errorf("%s is given %d times; give it once", name, n)
	}
	return nil
}

// callNames keeps the service and method names of form calls: a few
// values repeated on every call, looked up rather than allocated each time.
var callNames interner

// interner hands out one string per distinct short value, for the first
// maxInterned values seen; values past those are allocated as usual, so
// that names a caller makes up cannot grow it. It is read without a lock:
// the map is copied when a value is added, which stops once it is full.
type interner struct {
	m  atomic.Pointer[map[string]string] // nil, or never changed once stored
	mu sync.Mutex                        // serialises writers
}

const (
	maxInterned    = 256
	maxInternedLen = 128
)

func (in *interner) get(b []byte) string {
	if s, ok := in.load()[string(b)]; ok {
		return s
	}
	s := string(b)
	if len(b) > maxInternedLen || len(in.load()) >= maxInterned {
		return s
	}
	in.mu.Lock()
	defer in.mu.Unlock()
	cur := in.load()
	if len(cur) >= maxInterned {
		return s
	}
	next := make(map[string]string, len(cur)+1)
	for k, v := range cur {
		next[k] = v
	}
	next[s] = s
	in.m.Store(&next)
	return s
}

func (in *interner) load() map[string]string {
	if p := in.m.Load(); p != nil {
		return *p
	}
	return nil
}

// jsonBody says whether a body is JSON: by a JSON content type, or else
// by its first byte. A form's content type does not settle it, because
// curl -d sends one with whatever it sends, and no form body of /rpc
// starts with '{' or '[' (an array is refused as JSON, not as a strange
// form field). Multipart forms are refused with the fix.
func jsonBody(contentType string, body []byte) (bool, error) {
	switch contentType {
	case "application/json":
		return true, nil
	case "application/x-www-form-urlencoded", "":
		return startsJSON(body, '{', '['), nil
	}
	mt, _, err := mime.ParseMediaType(contentType)
	switch {
	case err != nil:
	case mt == "application/json" || strings.HasSuffix(mt, "+json"):
		return true, nil
	case strings.HasPrefix(mt, "multipart/"):
		return false, errMultipart
	}
	return startsJSON(body, '{', '['), nil
}

// errMultipart refuses a multipart body (curl -F) where form fields or
// JSON are read.
var errMultipart = &callError{http.StatusUnsupportedMediaType, "multipart bodies are not supported; send form fields with curl -d, or a JSON object", nil}

// startsJSON reports whether body's first byte after white space is one of
// opening: the start of a JSON object or array, never of form fields.
func startsJSON(body []byte, opening ...byte) bool {
	b := bytes.TrimLeft(body, " \t\r\n")
	return len(b) > 0 && bytes.IndexByte(opening, b[0]) >= 0
}

// validate checks the names a call will put on the wire.
func (c *rpcCall) validate() error {
	switch {
	case c.Service == "":
		return errors.New("service is required, e.g. service=go.micro.srv.example")
	case c.Method == "":
		return errors.New("method is required, e.g. method=Example.Call")
	case len(c.Service) > maxNameLen || !validName(c.Service):
		return fmt.Errorf("service %q: use up to %d printable ASCII characters without spaces or '/'", truncate(c.Service, 64), maxNameLen)
	case len(c.Method) > maxNameLen || !validName(c.Method):
		return fmt.Errorf("method %q: use up to %d printable ASCII characters without spaces or '/'", truncate(c.Method, 64), maxNameLen)
	}
	if c.Address != "" {
		if _, _, err := net.SplitHostPort(c.Address); err != nil {
			return fmt.Errorf("address %q: want host:port, e.g. address=127.0.0.1:9090", truncate(c.Address, 64))
		}
		if _, _, err := splitAddress(c.Address, 0); err != nil {
			return err // it names the address and what is wrong with it
		}
	}
	if len(c.Request) == 0 {
		c.Request = []byte("{}")
	}
	return nil
}

// requestFromBody is the request of a path call: the body when it is JSON
// (empty means {}), or form fields as an object of strings. A body that
// opens like a JSON object or array is JSON, or an error, whatever its
// content type: curl -d sends JSON as a form.
func requestFromBody(contentType string, body []byte) ([]byte, error) {
	b := trimJSON(body)
	if len(b) == 0 {
		return []byte("{}"), nil
	}
	if validRequestJSON(b) {
		return b, nil
	}
	mt, _, _ := mime.ParseMediaType(contentType)
	switch {
	case mt == "application/x-www-form-urlencoded" && !startsJSON(b, '{', '['):
		return formObject(string(b))
	case strings.HasPrefix(mt, "multipart/"):
		return nil, errMultipart
	}
	return nil, fmt.Errorf("body is not JSON in UTF-8: %q", truncate(string(b), 64))
}

// formObject turns form fields into a JSON object of strings. A field
// given twice, or a word with no "=" (curl -d John), is refused rather
// than half used or sent as {"John":""}.
func formObject(body string) ([]byte, error) {
	for pair := range strings.SplitSeq(body, "&") {
		if pair != "" && !strings.Contains(pair, "=") {
			return nil, fmt.Errorf("body is neither JSON nor form fields: %q is not name=value", truncate(pair, 64))
		}
	}
	form, err := parseForm(body, "form body")
	if err != nil {
		return nil, errNotForm(err)
	}
	obj := make(map[string]string, len(form))
	for k, v := range form {
		if err := onceOnly(k, len(v)); err != nil {
			return nil, err
		}
		if !utf8.ValidString(k) || !utf8.ValidString(v[0]) { // JSON would carry U+FFFD in its place
			return nil, fmt.Errorf("form field %q is not UTF-8", truncate(k, 64))
		}
		obj[k] = v[0]
	}
	return json.Marshal(obj)
}

func trimJSON(b []byte) []byte { return bytes.TrimSpace(b) }

// validRequestJSON reports whether b is a request to send on: JSON, and
// UTF-8 as JSON text must be (RFC 8259 section 8.1), which json.Valid does
// not check and many apps fail on.
func validRequestJSON(b []byte) bool { return validJSON(b) && utf8.Valid(b) }

// appendEnvelope appends the JSON-RPC 2.0 request for one call to dst:
//
//	{"jsonrpc":"2.0","id":N,"method":"M","params":[REQUEST]}
//
// The request goes in as it came, already checked to be JSON; method has
// passed validName, so only quotes and backslashes need escaping.
func appendEnvelope(dst []byte, id uint64, method string, request []byte) []byte {
	dst = append(dst, `{"jsonrpc":"2.0","id":`...)
	dst = strconv.AppendUint(dst, id, 10)
	dst = append(dst, `,"method":"`...)
	for i := 0; i < len(method); i++ {
		if c := method[i]; c == '"' || c == '\\' {
			dst = append(dst, '\\')
		}
		dst = append(dst, method[i])
	}
	dst = append(dst, `","params":[`...)
	dst = append(dst, request...)
	return append(dst, "]}"...)
}

// appError is an error a node answered with, in the error shape's terms.
type appError struct {
	code   int
	detail string
}

// parseReply decodes a JSON-RPC reply to request id and returns its
// result, as it came, or the app's error. JSON-RPC 1.0 replies, where error
// is a string or null, are accepted too. err is set when the body is not a
// JSON-RPC reply at all.
func parseReply(body []byte, id uint64) (result []byte, appErr *appError, err error) {
	rid, result, errVal, ok := replyMembers(body)
	if !ok {
		var err error
		if rid, result, errVal, err = decodeReply(body); err != nil {
			return nil, nil, err
		}
	}
	// An id of null is a server's that could not read ours (JSON-RPC 2.0
	// section 5); any other must be ours, error or not: another call's
	// answer is never this one's.
	if hasValue(rid) && !sameID(rid, id) {
		return nil, nil, fmt.Errorf("reply id %s does not match request id %d", truncate(string(rid), 32), id)
	}
	if hasValue(errVal) {
		if hasValue(result) {
			return nil, nil, errors.New("not a JSON-RPC reply: both a result and an error")
		}
		return nil, decodeAppError(errVal), nil
	}
	if result == nil {
		return nil, nil, errors.New("not a JSON-RPC reply: neither result nor error")
	}
	if !utf8.Valid(result) {
		// It goes to the caller as it came, as application/json, which
		// must be UTF-8 (RFC 8259 section 8.1): JSON parsers refuse it.
		return nil, nil, errors.New("not a JSON-RPC reply: its result is not UTF-8, as JSON text must be")
	}
	return result, nil, nil
}

// decodeReply is replyMembers by encoding/json, for the replies the
// scanner leaves to it; its errors say what is wrong.
func decodeReply(body []byte) (id, result, errVal []byte, err error) {
	var r struct {
		ID     json.RawMessage `json:"id"`
		Result json.RawMessage `json:"result"`
		Error  json.RawMessage `json:"error"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return nil, nil, nil, fmt.Errorf("not a JSON-RPC reply: %v", jsonErrorText(err))
	}
	return r.ID, r.Result, r.Error, nil
}

func hasValue(raw json.RawMessage) bool { return len(raw) > 0 && string(raw) != "null" }

// sameID compares a reply id with ours; servers may echo it as a string.
func sameID(raw json.RawMessage, id uint64) bool {
	s := string(raw)
	if len(s) >= 2 && s[0] == '"' && s[len(s)-1] == '"' {
		s = s[1 : len(s)-1]
	}
	n, err := strconv.ParseUint(s, 10, 64)
	return err == nil && n == id
}

// decodeAppError reads a reply's error member: a JSON-RPC 2.0 error object
// ({"code":-32000,"message":"..."}), a JSON-RPC 1.0 string, or anything
// else, shown as it came. The status is 500, unless the message is itself
// the ecosystem's error shape (go-micro servers send their errors so), whose
// code then becomes the status.
func decodeAppError(raw json.RawMessage) *appError {
	msg := string(raw)
	var s string
	var obj struct {
		Message *string `json:"message"` // whatever the code is: some servers send a string
	}
	switch {
	case json.Unmarshal(raw, &s) == nil:
		msg = s
	case json.Unmarshal(raw, &obj) == nil && obj.Message != nil:
		msg = *obj.Message
	}
	e := &appError{code: http.StatusInternalServerError, detail: msg}
	if strings.HasPrefix(strings.TrimSpace(msg), "{") {
		var me errorBody
		if json.Unmarshal([]byte(msg), &me) == nil && me.Code >= 400 && me.Code <= 599 {
			e.code = me.Code
			if me.Detail != "" {
				e.detail = me.Detail
			}
		}
	}
	if e.detail == "" {
		e.detail = "the service answered with an empty error"
	}
	return e
}

// callTimeout is a call's time to answer: the Timeout header's when there
// is one, and whether that is shorter than def, the flag's.
func callTimeout(values []string, def time.Duration) (time.Duration, bool, error) {
	if err := onceOnly("the Timeout header", len(values)); err != nil {
		return 0, false, err
	}
	if len(values) == 0 || values[0] == "" {
		return def, false, nil
	}
	d, err := parseTimeout(values[0])
	return d, d < def, err
}

// parseTimeout reads a Timeout header. go-micro sends a deadline as an
// integer number of nanoseconds (fmt.Sprintf("%d", time.Duration)); a Go
// duration such as 5s or 250ms is accepted too.
func parseTimeout(s string) (time.Duration, error) {
	var d time.Duration
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		d = time.Duration(n)
	} else if d, err = time.ParseDuration(s); err != nil {
		return 0, fmt.Errorf("the Timeout header %q: want a duration such as 5s or go-micro's integer nanoseconds", truncate(s, 32))
	}
	if d <= 0 || d > maxTimeout {
		return 0, fmt.Errorf("the Timeout header %q: must be positive and at most %v", truncate(s, 32), maxTimeout)
	}
	return d, nil
}

// passHeaders are the caller's headers carried to the node: W3C trace
// context (https://www.w3.org/TR/trace-context/) and request ids.
var passHeaders = []string{"Traceparent", "Tracestate", "X-Request-Id"}

// caller makes RPC calls to nodes.
type caller struct {
	cfg    rpcConfig
	reg    *registry
	sel    *selector
	nodes  *nodeClient // keep-alive connections to the nodes
	log    *slog.Logger
	timing *histogramVec // call durations by service and result; may be nil
	ids    atomic.Uint64
	bufs   sync.Pool // *bytes.Buffer for a call's body, envelope and reply; buffers over 64 KiB are dropped
}

func newCaller(cfg rpcConfig, reg *registry, sel *selector, log *slog.Logger) *caller {
	return &caller{cfg: cfg.withDefaults(), reg: reg, sel: sel, nodes: newNodeClient(), log: log}
}

// newNodeTransport is the proxy's connection pool to nodes. Loopback and LAN apps
// answer many small calls: keeping connections alive matters more than
// anything else here (Go's default keeps 2 idle per host).
func newNodeTransport(connects *connectLog) *http.Transport {
	d := &net.Dialer{Timeout: nodeConnectTimeout, KeepAlive: 30 * time.Second}
	return &http.Transport{
		Proxy: nil, // the sidecar talks to nodes directly, whatever HTTP_PROXY says
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) {
			c, err := connects.dial(ctx, d, addr)
			if err != nil {
				return nil, err
			}
			return &resetSeen{Conn: c}, nil
		},
		MaxIdleConns:           4096,
		MaxIdleConnsPerHost:    512,
		IdleConnTimeout:        90 * time.Second,
		DisableCompression:     true, // pass bodies as they come
		ForceAttemptHTTP2:      false,
		MaxResponseHeaderBytes: 64 << 10,
	}
}

func (c *caller) getBuf() *bytes.Buffer {
	if b, ok := c.bufs.Get().(*bytes.Buffer); ok {
		b.Reset()
		return b
	}
	return new(bytes.Buffer)
}

func (c *caller) putBuf(b *bytes.Buffer) {
	if b.Cap() <= 64<<10 {
		c.bufs.Put(b)
	}
}

// handleRPC serves POST /rpc.
func (s *sidecar) handleRPC(w http.ResponseWriter, r *http.Request) {
	if !allowMethods(w, r, http.MethodPost) {
		return
	}
	buf := s.rpc.getBuf()
	defer s.rpc.putBuf(buf)
	body, ok := readBodyInto(w, r, s.rpc.cfg.MaxBodyBytes, buf)
	if !ok {
		return
	}
	var query url.Values // parsed only when there is one: most calls have none
	if r.URL.RawQuery != "" {
		if query, ok = queryOf(w, r, "service", "method", "address", "request"); !ok {
			return
		}
	}
	call, err := parseRPCRequest(firstValue(r.Header["Content-Type"]), query, body)
	if err != nil {
		writeInputError(w, err)
		return
	}
	s.rpc.serve(w, r, call, buf)
}

// writeInputError answers a request the sidecar cannot take: with err's
// own status when it has one (a 415), else a 400.
func writeInputError(w http.ResponseWriter, err error) {
	var ce *callError
	if !errors.As(err, &ce) {
		err = &callError{http.StatusBadRequest, err.Error(), nil}
	}
	writeCallError(w, err)
}

// serviceHint follows "service X not found": a name is asked for in full,
// as registered, and the registry says which names there are.
const serviceHint = " (names are matched in full, as registered: GET /registry lists them)"

// handlePath serves POST /{service}/{method}, mapped as apiRoute says.
func (s *sidecar) handlePath(w http.ResponseWriter, r *http.Request) {
	service, method, err := apiRoute(s.rpc.cfg.Namespace, r.URL.Path)
	if err == nil && strings.Contains(strings.ToLower(r.URL.RawPath), "%2f") {
		// An escaped slash is no segment boundary; read as one, it would
		// call another method than the client wrote.
		err = fmt.Errorf("path %q: an escaped slash (%%2F) does not name a service or method", truncate(r.URL.RawPath, 128))
	}
	if err != nil || r.Method != http.MethodPost {
		detail := "no endpoint at " + truncate(r.URL.Path, 128) + "; the sidecar serves /registry, /health, /rpc, /proxy/{service}/..., /broker and /metrics, and POST /{service}/{method} calls a service"
		if err != nil && r.Method == http.MethodPost {
			detail = err.Error()
		}
		writeError(w, http.StatusNotFound, detail)
		return
	}
	if r.URL.RawQuery != "" {
		// The request is the body alone; a query left unread would call
		// the app without what the client put there (?name=John).
		if _, err := checkQuery(r); err != nil {
			writeError(w, http.StatusBadRequest, err.Error()+"; the request goes in the body, as JSON or form fields")
			return
		}
	}
	buf := s.rpc.getBuf()
	defer s.rpc.putBuf(buf)
	body, ok := readBodyInto(w, r, s.rpc.cfg.MaxBodyBytes, buf)
	if !ok {
		return
	}
	req, err := requestFromBody(firstValue(r.Header["Content-Type"]), body)
	if err != nil {
		writeInputError(w, err)
		return
	}
	s.rpc.serve(w, r, rpcCall{Service: service, Method: method, Request: req}, buf)
}

// serve makes the call under its deadline and writes the result or error.
// buf holds the request body, which call's fields may share; the envelope
// and the reply are written after it.
func (c *caller) serve(w http.ResponseWriter, r *http.Request, call rpcCall, buf *bytes.Buffer) {
	timeout, shortened, err := callTimeout(r.Header["Timeout"], c.cfg.Timeout)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	start := requestStart(w)
	ready := bodyReadAt(r, start) // a slow upload is no slow node
	deadline := ready.Add(timeout)
	// The deadline is set on the connection to the node, and the call
	// runs to its answer even if the caller goes, as on the fast-path
	// server, whose requests' contexts never end: net/http ends one also
	// when the client only half-closes after sending (nc -N, many
	// scripts), and that client still waits for its answer.
	ctx := r.Context()
	if ctx.Done() != nil {
		ctx = context.WithoutCancel(ctx)
	}
	result, err := c.call(ctx, ready, deadline, r.Header, call, shortened, buf)
	c.observe(requestNow(w).Sub(start), call, err)
	if err != nil {
		var ce *callError
		if errors.As(err, &ce) && ce.code == http.StatusGatewayTimeout {
			ce.detail += " (" + timeoutHint(r.Header.Get("Timeout"), timeout) + ")"
		}
		writeCallError(w, err)
		return
	}
	// The fast-path server takes the one field as a ready line, past its
	// header map.
	if fw, ok := w.(*response); ok {
		fw.writeHeaderLines(http.StatusOK, jsonContentTypeLine, int64(len(result)))
	} else {
		w.Header()["Content-Type"] = jsonContentType
		w.WriteHeader(http.StatusOK)
	}
	w.Write(result)
}

var (
	jsonContentType     = []string{"application/json"}
	jsonContentTypeLine = []byte("Content-Type: application/json\r\n")
)

// observe records a call's duration under its service and result. A
// service the registry does not know (not found, or a call by address
// naming any service) is recorded as unregisteredService: names a client
// makes up must not each take a series. A 404 of a service's own is its.
func (c *caller) observe(took time.Duration, call rpcCall, err error) {
	if c.timing == nil {
		return
	}
	result := "ok"
	service := call.Service
	if err != nil {
		result = "500"
		var ce *callError
		if errors.As(err, &ce) {
			result = strconv.Itoa(ce.code)
		}
		if errors.Is(err, errNotFound) {
			service = unregisteredService
		}
	}
	if isDirect(call) && !c.reg.table.has(service) {
		service = unregisteredService
	}
	c.timing.Observe(took.Seconds(), service, result)
}

// unregisteredService labels the calls of services the registry does not
// know in micro_rpc_duration_seconds.
const unregisteredService = "_unregistered"

// timeoutHint names where a deadline came from, and catches the likely
// mistake of a bare number meant as seconds.
func timeoutHint(header string, d time.Duration) string {
	_, notInteger := strconv.ParseInt(header, 10, 64) // as parseTimeout tells nanoseconds from a duration
	switch {
	case header == "":
		return "deadline " + d.String() + " from --rpc_timeout; a Timeout header sets another"
	case d < time.Millisecond && notInteger == nil:
		return "deadline " + d.String() + " from the Timeout header, read as nanoseconds as go-micro sends it; write 5s for five seconds"
	default:
		return "deadline " + d.String() + " from the Timeout header"
	}
}

// call sends call to a node of its service (or to its address) and
// returns the result, a slice of buf. A node whose connection fails is
// ejected; the call moves to another node only when the request cannot have
// reached the app (the connection was never made), at most cfg.Retries
// times. start is when the call was ready to go, its body read: the node
// is told the time left from there. shortened says the caller asked for a
// deadline below --rpc_timeout: running out of it then says nothing about
// the node, which is not ejected for it.
func (c *caller) call(ctx context.Context, start, deadline time.Time, in http.Header, call rpcCall, shortened bool, buf *bytes.Buffer) ([]byte, error) {
	var nodes []Node
	direct := call.Address != ""
	if direct {
		host, port, _ := splitAddress(call.Address, 0) // checked by validate
		nodes = []Node{{ID: call.Address, Address: host, Port: port}}
	} else {
		versions, err := c.reg.GetServiceAt(call.Service, start)
		if err != nil {
			return nil, &callError{http.StatusNotFound, fmt.Sprintf("service %s not found%s", call.Service, serviceHint), errNotFound}
		}
		nodes = allNodes(versions)
		if len(nodes) == 0 {
			return nil, callErrorf(http.StatusServiceUnavailable, "no nodes available for service %s", call.Service)
		}
	}
	id := c.ids.Add(1)
	mark := buf.Len()
	buf.Write(appendEnvelope(buf.AvailableBuffer(), id, call.Method, call.Request))
	envelope := buf.Bytes()[mark:] // the reply is read into buf after it

	var triedArr [4]nodeKey
	tried := triedArr[:0]
	var lastErr error
	for attempt := 0; attempt <= c.cfg.Retries && !(direct && attempt > 0); attempt++ {
		node := nodes[0]
		if !direct {
			n, ok := c.sel.next(call.Service, nodes, tried)
			if !ok {
				break
			}
			node = n
		}
		tried = append(tried, keyOf(node))
		now := start
		if attempt > 0 {
			now = time.Now()
		}
		result, out, err := c.post(ctx, now, deadline, in, call, node, id, envelope, buf)
		if err == nil {
			return result, nil
		}
		eject := out == notSent && ejectsNotSent(err) || out == lost && isConnFailure(err) || out == timedOut && !shortened && ctx.Err() != context.Canceled
		switch {
		case direct:
		case eject:
			if d := c.sel.failed(node); d > 0 {
				c.log.Warn("node ejected", "service", call.Service, "node", node.ID, "address", node.hostPort(), "for", d, "error", err)
			}
		case out != answered: // the node answered: post told the selector
			c.sel.settled(node)
		}
		if out != notSent {
			return nil, err
		}
		lastErr = err
	}
	switch {
	case lastErr == nil:
		return nil, callErrorf(http.StatusServiceUnavailable, "no nodes available for service %s: all %d ejected after failures", call.Service, len(nodes))
	case len(tried) > 1:
		return nil, callErrorf(http.StatusBadGateway, "service %s unreachable: tried %d nodes; last: %v", call.Service, len(tried), lastErr)
	default:
		return nil, callErrorf(http.StatusBadGateway, "service %s unreachable: %v", call.Service, lastErr)
	}
}

// allNodes flattens the versions of a service into one list of nodes.
func allNodes(versions []Service) []Node {
	if len(versions) == 1 {
		return versions[0].Nodes
	}
	var out []Node
	for _, v := range versions {
		out = append(out, v.Nodes...)
	}
	return out
}

// outcome is how one attempt to call a node failed.
type outcome int

const (
	answered outcome = iota // the node answered, with an error or garbage: final
	notSent                 // no connection was made: safe to try another node
	lost                    // the connection failed after the request may have reached the app: final
	timedOut                // the deadline passed, or the caller went away: final
)

// classifyFailure sorts a transport error. Only a failed dial proves the request
// never left: Go's transport itself already retries a request on a reused
// connection that failed before anything was written. A dial that ran
// into the call's deadline, or was cut short by the caller leaving, ends
// the call as a timeout (connectDeadline ends one that can tell of the
// node before the deadline).
func classifyFailure(ctx context.Context, deadline time.Time, err error) outcome {
	if expired(ctx, deadline) {
		return timedOut
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return notSent
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return timedOut // the connection's deadline, which may fall up to deadlineSlack early
	}
	return lost
}

// expired reports whether a call is over: its deadline passed, or its
// caller went away. A zero deadline is none.
func expired(ctx context.Context, deadline time.Time) bool {
	return ctx.Err() != nil || !deadline.IsZero() && !time.Now().Before(deadline)
}

// isConnFailure reports whether err is a connection refused, reset, cut
// or timed out, the failures that eject a node. A kept-alive connection
// the node closed as the request went out is none of them.
func isConnFailure(err error) bool {
	var ne net.Error
	var kal *keptAliveLost
	var cut *uploadCut
	if errors.As(err, &kal) || errors.As(err, &cut) {
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.As(err, &ne) && ne.Timeout()
}

// post sends the envelope to one node and decodes the reply, read into buf
// after the envelope.
func (c *caller) post(ctx context.Context, now, deadline time.Time, in http.Header, call rpcCall, node Node, id uint64, envelope []byte, buf *bytes.Buffer) ([]byte, outcome, error) {
	addr := c.nodes.addrOf(node)
	var hdrArr [16]string
	h := append(hdrArr[:0], "Content-Type", "application/json", "Micro-Service", call.Service, "Micro-Endpoint", call.Method)
	for _, k := range passHeaders {
		for _, v := range in[k] {
			h = append(h, k, v)
		}
	}
	start := buf.Len()
	resp, n, err := c.nodes.do(ctx, now, deadline, addr, &nodeRequest{header: h, body: envelope}, buf, c.cfg.MaxReplyBytes)
	if err != nil && resp.code == 0 {
		out := classifyFailure(ctx, deadline, err)
		if out == timedOut {
			return nil, out, c.timeoutError(ctx, call, node)
		}
		if out == lost {
			return nil, out, &callError{http.StatusBadGateway, fmt.Sprintf("node %s (%s) of %s: %v", node.ID, addr, call.Service, err), err}
		}
		return nil, out, fmt.Errorf("node %s (%s): %w", node.ID, addr, err)
	}
	if !isDirect(call) {
		c.sel.succeeded(node)
	}
	switch {
	case err != nil && (expired(ctx, deadline) || errors.Is(err, os.ErrDeadlineExceeded)):
		return nil, timedOut, c.timeoutError(ctx, call, node)
	case err != nil:
		return nil, answered, &callError{http.StatusBadGateway, fmt.Sprintf("reading the reply of node %s (%s) of %s: %v", node.ID, addr, call.Service, err), err}
	case n > c.cfg.MaxReplyBytes:
		return nil, answered, callErrorf(http.StatusBadGateway, "node %s of %s answered more than %d bytes", node.ID, call.Service, c.cfg.MaxReplyBytes)
	}
	body := buf.Bytes()[start:]
	if resp.code < 200 || resp.code > 299 {
		// Many JSON-RPC servers send their error objects with a 4xx or
		// 5xx: a JSON-RPC error for this call is the app's answer, whatever
		// the status.
		if _, appErr, err := parseReply(body, id); err == nil && appErr != nil {
			return nil, answered, &callError{appErr.code, appErr.detail, nil}
		}
		return nil, answered, callErrorf(http.StatusBadGateway, "node %s of %s answered %s%s", node.ID, call.Service, resp.status, snippet(resp.contentType, body))
	}
	result, appErr, err := parseReply(body, id)
	if err != nil {
		return nil, answered, callErrorf(http.StatusBadGateway, "node %s of %s answered %s%s: %v", node.ID, call.Service, resp.status, snippet(resp.contentType, body), err)
	}
	if appErr != nil {
		return nil, answered, &callError{appErr.code, appErr.detail, nil}
	}
	return result, answered, nil
}

// timeoutError is the 504 of a call whose deadline passed, or whose caller
// went away (nobody reads that answer).
func (c *caller) timeoutError(ctx context.Context, call rpcCall, node Node) error {
	return callErrorf(http.StatusGatewayTimeout, "no answer from node %s (%s) of %s within the deadline", node.ID, node.hostPort(), call.Service)
}

// unwrapURLError drops the *url.Error wrapper, whose text repeats the URL.
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func isDirect(call rpcCall) bool { return call.Address != "" }

// snippet shows the start of a body that was not what we wanted.
func snippet(contentType string, body []byte) string {
	s := " with"
	if contentType != "" {
		s += " " + truncate(contentType, 64)
	}
	if len(body) == 0 {
		return s + " an empty body"
	}
	return s + " " + strconv.Quote(truncate(string(body), 128))
}
