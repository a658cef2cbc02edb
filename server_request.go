package main

import (
	"cmp"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"unsafe"
)

// requestHead is a request line and header block the fast path serves. A
// connection parses every request into the same one: its header map and
// value slice are reused.
type requestHead struct {
	method, target, host string
	url                  url.URL
	header               http.Header // without Host, as net/http leaves it
	contentLength        int64       // 0 when there is no body
	close                bool        // Connection: close
	values               []string    // backs the header's one-value slices
	text                 stringArena // holds the heads the strings above are cut from
}

// parseRequestHead parses head, which ends in its blank line, and returns
// errHandOff for anything it leaves to net/http: another protocol version,
// a target that is not a path, a body framed other than by one
// Content-Length, an upgrade, an Expect, an event stream, a client that
// takes trailers, or a byte that RFC 9110 does not allow where it stands.
// Whatever it accepts, it reads as net/http's server reads it
// (FuzzParseRequestHead compares the two). A head that states both a
// Content-Length and a Transfer-Encoding is errBothLengths, wherever the
// two stand: net/http, given it, would frame the body by the
// Transfer-Encoding and serve what follows as a request of its own. An
// HTTP/1.0 request with a Transfer-Encoding is errTransferEncodingOn10:
// net/http, given it, would ignore the field, pass on an empty body and
// read the chunks as the next request.
func parseRequestHead(head []byte, req *requestHead) error {
	err := parseHeadFields(head, req)
	if err == errHandOff {
		return cmp.Or(faultyFraming(string(head)), err)
	}
	return err
}

// parseHeadFields is parseRequestHead but for the check of both lengths.
func parseHeadFields(head []byte, req *requestHead) error {
	s := req.text.copy(head) // names and values are substrings of it
	line, rest, ok := cutLine(s)
	if !ok {
		return errHandOff
	}
	method, line, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(line, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" || !validToken(method) || method == http.MethodConnect ||
		!strings.HasPrefix(target, "/") || !validTarget(target) || parseTarget(target, &req.url) != nil {
		return errHandOff
	}
	req.method, req.target, req.host, req.contentLength, req.close = method, target, "", 0, false
	if req.header == nil {
		req.header = make(http.Header, 8)
	}
	clear(req.header)
	if req.values == nil {
		req.values = make([]string, 0, 16) // grows, once, for heads with more fields
	}
	values := req.values[:0]
	hosts, lengths := 0, 0
	// The names added so far, to tell a repeated field without a map
	// lookup before every insertion; past len(names), the map tells.
	var names [16]string
	nNames := 0
	for !strings.HasPrefix(rest, "\r\n") {
		name, value, canonical, after, ok := cutField(rest)
		if !ok {
			return errHandOff
		}
		rest = after
		if !canonical {
			name = http.CanonicalHeaderKey(name)
		}
		switch name {
		case "Host":
			hosts++
			req.host = value
			continue
		case "Content-Length":
			lengths++
			n, err := strconv.ParseInt(value, 10, 64)
			if err != nil || value[0] < '0' || value[0] > '9' { // digits only, as net/http reads it: no sign, not even "-0"
				return errHandOff
			}
			req.contentLength = n
		case "Transfer-Encoding", "Upgrade", "Expect":
			return errHandOff
		case "Connection":
			if hasToken(value, "upgrade") {
				return errHandOff
			}
			req.close = req.close || hasToken(value, "close")
		case "Accept":
			if strings.Contains(value, "text/event-stream") {
				return errHandOff // streams are for net/http, which notices a client leaving
			}
		case "Te":
			if hasToken(value, "trailers") {
				return errHandOff // the fast path's responses carry no trailers
			}
		}
		repeated := false
		if nNames < len(names) {
			repeated = slices.Contains(names[:nNames], name)
			if !repeated {
				names[nNames] = name
				nNames++
			}
		} else {
			_, repeated = req.header[name]
		}
		if repeated {
			req.header[name] = append(req.header[name], value)
		} else {
			values = append(values, value)
			req.header[name] = values[len(values)-1 : len(values) : len(values)]
		}
	}
	if hosts != 1 || lengths > 1 || !validHost(req.host) {
		return errHandOff
	}
	req.values = values[:0]
	// As net/http does (RFC 7234, section 5.4).
	if p, ok := req.header["Pragma"]; ok && len(p) > 0 && p[0] == "no-cache" {
		if _, ok := req.header["Cache-Control"]; !ok {
			req.header["Cache-Control"] = []string{"no-cache"}
		}
	}
	return nil
}

// errBothLengths is a request that states a Content-Length and a
// Transfer-Encoding: RFC 9112 section 6.1 lets a server refuse it, and
// wants the connection closed after it either way. Behind a front proxy
// that framed it by the other field, its body's rest would be read as a
// request of its own (request smuggling).
var errBothLengths = errors.New("the request states both Content-Length and Transfer-Encoding: its length is ambiguous (RFC 9112 section 6.1)")

// errTransferEncodingOn10 is an HTTP/1.0 request with a Transfer-Encoding,
// which RFC 9112 section 6.1 says to take as faulty framing, closing the
// connection after it: HTTP/1.0 has no chunked bodies.
var errTransferEncodingOn10 = errors.New("an HTTP/1.0 request has no Transfer-Encoding (RFC 9112 section 6.1): send HTTP/1.1, or the body with a Content-Length")

// faultyFraming returns errBothLengths when head, a request line and its
// header block, has a Content-Length field and a Transfer-Encoding field,
// errTransferEncodingOn10 when it is an HTTP/1.0 request with a
// Transfer-Encoding, and nil otherwise.
func faultyFraming(head string) error {
	line, block, _ := cutLine(head)
	switch {
	case !hasFieldLine(block, "Transfer-Encoding"):
		return nil
	case hasFieldLine(block, "Content-Length"):
		return errBothLengths
	case strings.HasSuffix(line, " HTTP/1.0"):
		return errTransferEncodingOn10
	}
	return nil
}

// hasFieldLine reports whether a header block, after its first line
// (lines end in CRLF; the block in a blank line), has a field named name,
// in any case.
func hasFieldLine(block, name string) bool {
	for block != "" && !strings.HasPrefix(block, "\r\n") {
		line, rest, ok := cutLine(block)
		if !ok {
			return false
		}
		if len(line) > len(name) && line[len(name)] == ':' && strings.EqualFold(line[:len(name)], name) {
			return true
		}
		block = rest
	}
	return false
}

// stringArena makes strings by copying bytes into chunks of memory whose
// bytes it never writes twice: a string stays as it was for as long as
// anything holds it, as a string must, and a chunk serves many requests
// with one allocation. A string held after its request keeps its whole
// chunk, and the other heads in it, from the garbage collector: what keeps
// a request's string for long (a selector cursor, a cached lookup, a
// metrics label) clones it.
type stringArena struct{ buf []byte }

// arenaChunk is the size of the arena's chunks: some twenty small heads.
const arenaChunk = 2 << 10

func (a *stringArena) copy(b []byte) string {
	if len(b) == 0 {
		return ""
	}
	if len(b) > cap(a.buf)-len(a.buf) {
		a.buf = make([]byte, 0, max(arenaChunk, len(b)))
	}
	start := len(a.buf)
	a.buf = append(a.buf, b...)
	return unsafe.String(&a.buf[start], len(b))
}

// cutField cuts the field line that starts s, in one pass: its name, its
// value without the white space around it, and the rest of s after the
// line's CRLF. ok is false when the name is not an RFC 9110 token, the
// value holds a control character other than tab, or the line does not end
// in CRLF; canonical says whether the name is in net/http's canonical form,
// Like-This.
func cutField(s string) (name, value string, canonical bool, rest string, ok bool) {
	canonical = true
	upper := true
	i := 0
	for ; i < len(s) && s[i] != ':'; i++ {
		c := s[i]
		if byteClass[c]&classToken == 0 {
			return "", "", false, "", false
		}
		if upper && 'a' <= c && c <= 'z' || !upper && 'A' <= c && c <= 'Z' {
			canonical = false
		}
		upper = c == '-'
	}
	if i == 0 || i == len(s) {
		return "", "", false, "", false
	}
	j := i + 1
	for ; j < len(s); j++ {
		if c := s[j]; c < ' ' && c != '\t' || c == 0x7f {
			break
		}
	}
	if j+1 >= len(s) || s[j] != '\r' || s[j+1] != '\n' {
		return "", "", false, "", false
	}
	return s[:i], trimOWS(s[i+1 : j]), canonical, s[j+2:], true
}

// cutLine cuts s after its first line, which must end in CRLF: a bare LF
// is for net/http to judge.
func cutLine(s string) (line, rest string, ok bool) {
	i := strings.IndexByte(s, '\n')
	if i < 1 || s[i-1] != '\r' {
		return "", "", false
	}
	return s[:i-1], s[i+1:], true
}

// parseTarget sets u from a request target as url.ParseRequestURI does,
// without allocating when the path has nothing to unescape or escape.
func parseTarget(target string, u *url.URL) error {
	path, query, hasQuery := strings.Cut(target, "?")
	if plainPath(path) {
		*u = url.URL{Path: path, RawQuery: query, ForceQuery: hasQuery && query == ""}
		return nil
	}
	p, err := url.ParseRequestURI(target)
	if err != nil {
		return err
	}
	*u = *p
	return nil
}

// plainPath reports whether a path is the same escaped and unescaped: only
// letters, digits and the characters RFC 3986 allows in a path that Go's
// url package leaves as they are.
func plainPath(p string) bool {
	for i := 0; i < len(p); i++ {
		if byteClass[p[i]]&classPath == 0 {
			return false
		}
	}
	return true
}

// byteClass says, for every byte, where the fast path accepts it as it is.
var byteClass = func() (t [256]uint8) {
	for c := 0; c < 256; c++ {
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		if alnum || strings.IndexByte("!#$%&'*+-.^_`|~", byte(c)) >= 0 {
			t[c] |= classToken
		}
		if alnum || strings.IndexByte("-_.~$&+,/:;=@", byte(c)) >= 0 {
			t[c] |= classPath
		}
		if alnum || strings.IndexByte(".-_:[]", byte(c)) >= 0 {
			t[c] |= classHost
		}
	}
	return t
}()

const (
	classToken = 1 << iota // RFC 9110 tchar
	classPath              // kept as it is by url.URL.EscapedPath
	classHost              // in the Host values the fast path takes
)

// trimOWS trims the optional white space around a field value.
func trimOWS[T string | []byte](s T) T {
	for len(s) > 0 && (s[0] == ' ' || s[0] == '\t') {
		s = s[1:]
	}
	for len(s) > 0 && (s[len(s)-1] == ' ' || s[len(s)-1] == '\t') {
		s = s[:len(s)-1]
	}
	return s
}

// validToken reports whether s is an RFC 9110 token: a method or a field
// name.
func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if byteClass[s[i]]&classToken == 0 {
			return false
		}
	}
	return true
}

// validTarget reports whether a request target has only visible ASCII.
func validTarget(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// validFieldValue is RFC 9110's field-value as net/http checks it: no
// control characters but tab.
func validFieldValue(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' && c != '\t' || c == 0x7f {
			return false
		}
	}
	return true
}

// validHost accepts the Host values the fast path serves: a name or an
// address with an optional port. Anything else, net/http judges.
func validHost(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if byteClass[s[i]]&classHost == 0 {
			return false
		}
	}
	return true
}

// hasToken reports whether a comma-separated header value lists token,
// in any case.
func hasToken(value, token string) bool {
	for value != "" {
		var t string
		t, value, _ = strings.Cut(value, ",")
		if strings.EqualFold(strings.Trim(t, " \t"), token) {
			return true
		}
	}
	return false
}
