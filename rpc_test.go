package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

func TestAPIRoute(t *testing.T) {
	for _, tc := range []struct {
		ns, path        string
		service, method string
	}{
		// micro's table (its API docs, "Request Mapping"), in our namespace.
		{"go.micro.srv", "/foo/bar", "go.micro.srv.foo", "Foo.Bar"},
		{"go.micro.srv", "/foo/bar/baz", "go.micro.srv.foo", "Bar.Baz"},
		{"go.micro.srv", "/foo/bar/baz/cat", "go.micro.srv.foo.bar", "Baz.Cat"},
		{"go.micro.srv", "/v1/foo/bar", "go.micro.srv.v1.foo", "Foo.Bar"},
		{"go.micro.srv", "/v1/foo/bar/baz", "go.micro.srv.v1.foo", "Bar.Baz"},
		{"go.micro.srv", "/v2/foo/bar", "go.micro.srv.v2.foo", "Foo.Bar"},
		{"go.micro.srv", "/v2/foo/bar/baz", "go.micro.srv.v2.foo", "Bar.Baz"},
		// The examples and the edges.
		{"go.micro.srv", "/example/call", "go.micro.srv.example", "Example.Call"},
		{"go.micro.srv", "/example", "go.micro.srv.example", "Example.Call"},
		{"go.micro.srv", "/greeter/say-hello", "go.micro.srv.greeter", "Greeter.SayHello"},
		{"go.micro.srv", "/foo/bar/", "go.micro.srv.foo", "Foo.Bar"},
		{"go.micro.srv", "//foo//bar", "go.micro.srv.foo", "Foo.Bar"},
		{"go.micro.srv", "/vx/foo/bar", "go.micro.srv.vx", "Foo.Bar"},
		{"go.micro.api", "/foo/bar", "go.micro.api.foo", "Foo.Bar"},
		{"", "/foo/bar", "foo", "Foo.Bar"},
	} {
		t.Run(tc.ns+tc.path, func(t *testing.T) {
			s, m, err := apiRoute(tc.ns, tc.path)
			if err != nil || s != tc.service || m != tc.method {
				t.Errorf("apiRoute(%q, %q) = %q, %q, %v; want %q, %q", tc.ns, tc.path, s, m, err, tc.service, tc.method)
			}
		})
	}
	for _, p := range []string{"/", "", "/registry/x", "/health/x/y", "/broker", "/metrics/a", "/rpc/x", "/proxy/x", "/a b/c", "/foo/" + strings.Repeat("m", 300)} {
		if s, m, err := apiRoute("go.micro.srv", p); err == nil {
			t.Errorf("apiRoute(%q) = %q, %q; want an error", p, s, m)
		}
	}
}

// TestPathCallWithEscapedSlash: %2F is no segment boundary, so a path
// with one names no service and method (it called Bar.Call for
// /foo%2Fbar/call).
func TestPathCallWithEscapedSlash(t *testing.T) {
	_, srv := testSidecar(t, nil)
	for _, p := range []string{"/foo%2Fbar/call", "/foo/ca%2fll"} {
		code, body := post(t, srv.URL+p, "application/json", "{}")
		if code != http.StatusNotFound || !strings.Contains(body, "escaped slash") {
			t.Errorf("POST %s: %d %s; want 404 naming the escaped slash", p, code, body)
		}
	}
}

func TestProxyRoute(t *testing.T) {
	for _, tc := range []struct {
		path, want string
	}{
		{"/foo", "go.micro.srv.foo"},
		{"/foo/bar/baz", "go.micro.srv.foo"},
		{"/v1/foo/bar", "go.micro.srv.v1.foo"},
		{"/v1/foo", "go.micro.srv.v1.foo"}, // as micro's proxy handler maps it
		{"/v1", "go.micro.srv.v1"},
		{"/v1/", ""},
		{"/my-app/x", "go.micro.srv.my-app"},
		{"/", ""},
		{"/-x/y", ""},
		{"/a.b/c", ""},
		{"/registry/x", ""},
		{"/proxy/x", ""},
	} {
		got, err := proxyRoute("go.micro.srv", tc.path)
		if got != tc.want || (err != nil) != (tc.want == "") {
			t.Errorf("proxyRoute(%q) = %q, %v; want %q", tc.path, got, err, tc.want)
		}
	}
}

const form = "application/x-www-form-urlencoded"

func TestParseRPCRequest(t *testing.T) {
	for _, tc := range []struct {
		name, ct, query, body string
		want                  rpcCall
		err                   string
	}{
		{"seed form", form, "", "service=go.micro.srv.example&method=Example.Call&request=%7B%22name%22%3A+%22John%22%7D",
			rpcCall{Service: "go.micro.srv.example", Method: "Example.Call", Request: []byte(`{"name": "John"}`)}, ""},
		{"json object", "application/json", "", `{"service":"s","method":"M.N","request":{"a":[1,2]}}`,
			rpcCall{Service: "s", Method: "M.N", Request: []byte(`{"a":[1,2]}`)}, ""},
		{"json string holding json", "application/json", "", `{"service":"s","method":"M.N","request":"{\"a\":1}"}`,
			rpcCall{Service: "s", Method: "M.N", Request: []byte(`{"a":1}`)}, ""},
		{"json sniffed without content type", "", "", ` {"Service":"s","Method":"M.N","Address":"127.0.0.1:1"}`,
			rpcCall{Service: "s", Method: "M.N", Address: "127.0.0.1:1", Request: []byte(`{}`)}, ""},
		{"no request is an empty object", form, "", "service=s&method=M.N", rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"array request", form, "", "service=s&method=M.N&request=[1]", rpcCall{Service: "s", Method: "M.N", Request: []byte(`[1]`)}, ""},
		{"empty request field is an empty object", form, "", "service=s&method=M.N&request=", rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"empty request string is an empty object", "application/json", "", `{"service":"s","method":"M.N","request":""}`, rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"empty request in the query is an empty object", form, "service=q&method=Q.R&request=", "", rpcCall{Service: "q", Method: "Q.R", Request: []byte(`{}`)}, ""},
		{"query fallback", form, "service=q&method=Q.R&request=2", "", rpcCall{Service: "q", Method: "Q.R", Request: []byte(`2`)}, ""},
		{"body and query share the fields", form, "service=q", "method=M.N", rpcCall{Service: "q", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"a field in both body and query", form, "service=q", "service=s&method=M.N", rpcCall{}, "service is given in both the body and the query"},
		{"request in both", "application/json", "request=1", `{"service":"s","method":"M.N","request":2}`, rpcCall{}, "request is given in both"},
		{"an empty form field in both", form, "service=q", "service=&method=M.N", rpcCall{}, "service is given in both"},
		{"an empty request field in both", form, "request=1", "service=s&method=M.N&request=", rpcCall{}, "request is given in both"},
		{"an escaped empty field in both", form, "address=a", "service=s%2Ex&method=M.N&address=", rpcCall{}, "address is given in both"},
		{"an empty JSON member in both", "application/json", "request=1", `{"service":"s","method":"M.N","request":""}`, rpcCall{}, "request is given in both"},
		{"an empty JSON service in both", "application/json", "service=q", `{"service":"","method":"M.N"}`, rpcCall{}, "service is given in both"},
		{"a body of another JSON type", "application/json", "", `"x"`, rpcCall{}, "the body is a JSON string, not an object"},
		{"a member of another JSON type", "application/json", "", `{"service":1,"method":"M.N"}`, rpcCall{}, "service: a JSON number where a string should be"},
		{"missing service", form, "", "method=M.N", rpcCall{}, "service is required"},
		{"missing method", form, "", "service=s", rpcCall{}, "method is required"},
		{"request not json", form, "", "service=s&method=M.N&request={name:John}", rpcCall{}, "is not JSON"},
		{"string request not json", "application/json", "", `{"service":"s","method":"M.N","request":"John"}`, rpcCall{}, "a string but not JSON"},
		{"broken json", "application/json", "", `{"service":`, rpcCall{}, "not a JSON object"},
		{"bad service", form, "", "service=a b&method=M.N", rpcCall{}, "service \"a b\""},
		{"bad method", "application/json", "", `{"service":"s","method":"M N"}`, rpcCall{}, `method "M N"`},
		{"bad address", form, "", "service=s&method=M.N&address=nohost", rpcCall{}, `address "nohost": want host:port`},
		{"bad address port", form, "", "service=s&method=M.N&address=h:0", rpcCall{}, `address "h:0": port must be 1-65535`},
		{"multipart", "multipart/form-data; boundary=x", "", "--x--", rpcCall{}, "multipart bodies are not supported"},
		{"bad form", form, "", "service=%zz", rpcCall{}, "neither JSON nor form"},
		{"a semicolon in a form", form, "", `service=s&method=M.N&request={"x":"a;b"}`, rpcCall{}, "a ';' in a form body must be escaped, as %3B"},
		{"service twice", form, "", "service=a&service=b&method=M.N", rpcCall{}, "service is given 2 times"},
		{"request three times", form, "", "service=s&method=M.N&request=1&request=2&request=3", rpcCall{}, "request is given 3 times"},
		{"method twice, escaped", form, "", "service=s&method=M.N&method=M%2EO", rpcCall{}, "method is given 2 times"},
		{"address twice, empty", form, "", "service=s&method=M.N&address=&address=", rpcCall{}, "address is given 2 times"},
		{"a field /rpc does not take", form, "", "service=s&method=M.N&reqest={}", rpcCall{}, `body field "reqest" is not one /rpc takes`},
		{"a field /rpc does not take, escaped", form, "", "service=s&method=M.N&x=%7B%7D", rpcCall{}, `body field "x" is not one /rpc takes`},
		{"a JSON member /rpc does not take", "application/json", "", `{"service":"s","method":"M.N","reqest":{}}`, rpcCall{}, `body field "reqest" is not one /rpc takes`},
		{"JSON keys in any case", "application/json", "", `{"Service":"s","METHOD":"M.N"}`, rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"a JSON key escaped", "application/json", "", `{"serv\u0069ce":"s","method":"M.N"}`, rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"an unknown JSON key escaped", "application/json", "", `{"service":"s","method":"M.N","x\u0041":1}`, rpcCall{}, `body field "xA" is not one /rpc takes`},
		{"a stray &", form, "", "service=s&&method=M.N&", rpcCall{Service: "s", Method: "M.N", Request: []byte(`{}`)}, ""},
		{"json sent as a form (curl -d)", form, "", ` {"service":"s","method":"M.N","request":{"a":1}}`,
			rpcCall{Service: "s", Method: "M.N", Request: []byte(`{"a":1}`)}, ""},
		{"broken json sent as a form", form, "", `{"service":"s",`, rpcCall{}, "not a JSON object"},
		{"request not UTF-8, form", form, "", "service=s&method=M.N&request=%22%FF%22", rpcCall{}, "not JSON in UTF-8"},
		{"request not UTF-8, json", "application/json", "", "{\"service\":\"s\",\"method\":\"M.N\",\"request\":{\"a\":\"\xff\"}}", rpcCall{}, "not UTF-8"},
		{"string request not UTF-8, json", "application/json", "", "{\"service\":\"s\",\"method\":\"M.N\",\"request\":\"\\\"\xff\\\"\"}", rpcCall{}, "not UTF-8"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q, _ := url.ParseQuery(tc.query)
			got, err := parseRPCRequest(tc.ct, q, []byte(tc.body))
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("parseRPCRequest(%q, %q) error = %v; want one containing %q", tc.ct, tc.body, err, tc.err)
				}
				return
			}
			if err != nil || got.Service != tc.want.Service || got.Method != tc.want.Method || got.Address != tc.want.Address || !bytes.Equal(got.Request, tc.want.Request) {
				t.Errorf("parseRPCRequest(%q, %q) = %+v (request %s), %v; want %+v (request %s)", tc.ct, tc.body, got, got.Request, err, tc.want, tc.want.Request)
			}
		})
	}
}

func TestInternerIsBounded(t *testing.T) {
	var in interner
	first := in.get([]byte("go.micro.srv.example"))
	if again := in.get([]byte("go.micro.srv.example")); unsafe.StringData(again) != unsafe.StringData(first) {
		t.Error("a name seen before was allocated again")
	}
	for i := range maxInterned + 10 {
		v := fmt.Sprintf("name-%d", i)
		if got := in.get([]byte(v)); got != v {
			t.Fatalf("get(%q) = %q", v, got)
		}
	}
	if n := len(in.load()); n != maxInterned {
		t.Errorf("%d names kept; want the first %d", n, maxInterned)
	}
	long := strings.Repeat("a", maxInternedLen+1)
	if got := in.get([]byte(long)); got != long {
		t.Errorf("a long name came back as %q", got)
	}
	if _, kept := in.load()[long]; kept {
		t.Error("a name longer than maxInternedLen was kept")
	}
}

func TestRequestFromBody(t *testing.T) {
	for _, tc := range []struct {
		ct, body, want, err string
	}{
		{"application/json", `{"name":"John"}`, `{"name":"John"}`, ""},
		{form, ` {"name": "John"} `, `{"name": "John"}`, ""},
		{"", "", `{}`, ""},
		{form, "name=John&age=3", `{"age":"3","name":"John"}`, ""},
		{"text/plain", "name=John", "", "body is not JSON"},
		{"application/json", "{", "", "body is not JSON"},
		{form, "{not json", "", "body is not JSON"}, // not the form field "{not json"
		{form, " [1,", "", "body is not JSON"},
		{form, "a={b}", `{"a":"{b}"}`, ""},
		{form, "name=a&name=b", "", "name is given 2 times"},
		{form, "name=%zz", "", "neither JSON nor form fields: invalid URL escape"},
		{form, `name=a;b`, "", "neither JSON nor form fields: a ';' in a form body must be escaped, as %3B; let curl escape form values (--data-urlencode), or send JSON"},
		{form, "John", "", `"John" is not name=value`},
		{form, "name=John&", `{"name":"John"}`, ""},
		{form, "name=John\n", `{"name":"John"}`, ""},
		{form, "a=%ff", "", `form field "a" is not UTF-8`},               // was sent as U+FFFD
		{"application/json", "{\"a\":\"\xff\"}", "", "body is not JSON"}, // JSON text is UTF-8
	} {
		got, err := requestFromBody(tc.ct, []byte(tc.body))
		if string(got) != tc.want || (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
			t.Errorf("requestFromBody(%q, %q) = %s, %v; want %s, %q", tc.ct, tc.body, got, err, tc.want, tc.err)
		}
	}
}

func TestAppendEnvelope(t *testing.T) {
	for _, tc := range []struct {
		id      uint64
		method  string
		request string
		want    string
	}{
		{1, "Example.Call", `{"name": "John"}`, `{"jsonrpc":"2.0","id":1,"method":"Example.Call","params":[{"name": "John"}]}`},
		{18446744073709551615, `A"B\C`, `null`, `{"jsonrpc":"2.0","id":18446744073709551615,"method":"A\"B\\C","params":[null]}`},
	} {
		got := appendEnvelope([]byte("x"), tc.id, tc.method, []byte(tc.request))
		if string(got) != "x"+tc.want {
			t.Errorf("appendEnvelope(%d, %q, %s) = %s; want x%s", tc.id, tc.method, tc.request, got, tc.want)
		}
		var env struct {
			JSONRPC string            `json:"jsonrpc"`
			ID      uint64            `json:"id"`
			Method  string            `json:"method"`
			Params  []json.RawMessage `json:"params"`
		}
		if err := json.Unmarshal(got[1:], &env); err != nil || env.ID != tc.id || env.Method != tc.method || len(env.Params) != 1 || string(env.Params[0]) != tc.request {
			t.Errorf("envelope %s decodes to %+v, %v", got[1:], env, err)
		}
	}
}

func TestParseReply(t *testing.T) {
	for _, tc := range []struct {
		name, body string
		result     string
		code       int
		detail     string
		err        string
	}{
		{"2.0 result", `{"jsonrpc":"2.0","id":7,"result":{"msg":"hi"}}`, `{"msg":"hi"}`, 0, "", ""},
		{"result bytes as they came", `{"id":7,"result": { "msg" : "hi" } ,"error":null}`, `{ "msg" : "hi" }`, 0, "", ""},
		{"1.0 result with null error", `{"id":7,"result":"x","error":null}`, `"x"`, 0, "", ""},
		{"null result", `{"id":7,"result":null,"error":null}`, `null`, 0, "", ""},
		{"id as string", `{"id":"7","result":1}`, `1`, 0, "", ""},
		{"no id", `{"result":1}`, `1`, 0, "", ""},
		{"2.0 error object", `{"jsonrpc":"2.0","id":7,"error":{"code":-32601,"message":"Method not found"}}`, "", 500, "Method not found", ""},
		{"1.0 error string", `{"id":7,"result":null,"error":"boom"}`, "", 500, "boom", ""},
		{"micro error in a string", `{"id":7,"error":"{\"id\":\"go.micro.srv.x\",\"code\":404,\"detail\":\"no such user\",\"status\":\"Not Found\"}"}`, "", 404, "no such user", ""},
		{"micro error in a message", `{"id":7,"error":{"code":-32000,"message":"{\"code\":429,\"detail\":\"slow down\"}"}}`, "", 429, "slow down", ""},
		{"micro-like code out of range", `{"id":7,"error":"{\"code\":200,\"detail\":\"ok?\"}"}`, "", 500, `{"code":200,"detail":"ok?"}`, ""},
		{"error of another type", `{"id":7,"error":42}`, "", 500, "42", ""},
		{"error object with a string code", `{"id":7,"error":{"code":"E1","message":"human message"}}`, "", 500, "human message", ""},
		{"empty error string", `{"id":7,"error":""}`, "", 500, "empty error", ""},
		{"error with null id", `{"id":null,"error":{"code":-32700,"message":"Parse error"}}`, "", 500, "Parse error", ""},
		{"wrong id", `{"id":8,"result":1}`, "", 0, "", "does not match request id 7"},
		{"wrong id on an error", `{"id":8,"error":"another call's"}`, "", 0, "", "does not match request id 7"},
		{"result and error both", `{"id":7,"result":1,"error":"boom"}`, "", 0, "", "both a result and an error"},
		{"neither", `{"id":7}`, "", 0, "", "neither result nor error"},
		{"not json", `<html>oops</html>`, "", 0, "", "not a JSON-RPC reply"},
		{"array", `[1]`, "", 0, "", "not a JSON-RPC reply: the body is a JSON array, not an object"},
		{"string", `"just a string"`, "", 0, "", "not a JSON-RPC reply: the body is a JSON string, not an object"},
		{"empty", ``, "", 0, "", "not a JSON-RPC reply"},
		{"result not UTF-8", "{\"id\":7,\"result\":\"\xff\xfe\"}", "", 0, "", "its result is not UTF-8"},
		{"result not UTF-8, deeper", "{\"id\":7,\"result\":{\"a\":[\"ok\",\"\xc3\"]}}", "", 0, "", "its result is not UTF-8"},
		{"result in UTF-8", `{"id":7,"result":"hé ☺"}`, `"hé ☺"`, 0, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			result, appErr, err := parseReply([]byte(tc.body), 7)
			switch {
			case tc.err != "":
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("parseReply(%s) error = %v; want %q", tc.body, err, tc.err)
				}
			case tc.code != 0:
				if err != nil || appErr == nil || appErr.code != tc.code || !strings.Contains(appErr.detail, tc.detail) {
					t.Errorf("parseReply(%s) = %+v, %v; want app error %d %q", tc.body, appErr, err, tc.code, tc.detail)
				}
			default:
				if err != nil || appErr != nil || string(result) != tc.result {
					t.Errorf("parseReply(%s) = %s, %+v, %v; want %s", tc.body, result, appErr, err, tc.result)
				}
			}
		})
	}
}

func TestParseTimeout(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
	}{
		{"5000000000", 5 * time.Second}, // go-micro's form: nanoseconds
		{"5s", 5 * time.Second},
		{"250ms", 250 * time.Millisecond},
		{"1h", time.Hour},
		{"0", 0}, {"-1s", 0}, {"2h", 0}, {"soon", 0}, {"", 0},
	} {
		got, err := parseTimeout(tc.in)
		if got != tc.want || (err == nil) != (tc.want > 0) {
			t.Errorf("parseTimeout(%q) = %v, %v; want %v", tc.in, got, err, tc.want)
		}
	}
}

// FuzzParseRPCRequest: whatever comes in, parsing does not panic, and what
// it accepts makes a valid envelope carrying the same names and request.
func FuzzParseRPCRequest(f *testing.F) {
	f.Add(form, []byte(`service=go.micro.srv.example&method=Example.Call&request={"name": "John"}`))
	f.Add("application/json", []byte(`{"service":"s","method":"M.N","request":"{\"a\":1}"}`))
	f.Add("", []byte(`{"service":"s","method":"M","request":[1,{"b":null}],"address":"[::1]:80"}`))
	f.Fuzz(func(t *testing.T, ct string, body []byte) {
		c, err := parseRPCRequest(ct, nil, body)
		if err != nil {
			return
		}
		env := appendEnvelope(nil, 1, c.Method, c.Request)
		var e struct {
			Method string
			Params []json.RawMessage
		}
		if err := json.Unmarshal(env, &e); err != nil {
			t.Fatalf("envelope %q of %q is not JSON: %v", env, body, err)
		}
		if e.Method != c.Method || len(e.Params) != 1 || !bytes.Equal(bytes.TrimSpace(e.Params[0]), c.Request) {
			t.Fatalf("envelope %q does not carry method %q and request %q", env, c.Method, c.Request)
		}
	})
}

// FuzzParseReply: any reply decodes without panicking to exactly one of a
// valid JSON result, an app error with a 4xx/5xx status, or an error.
func FuzzParseReply(f *testing.F) {
	f.Add([]byte(`{"jsonrpc":"2.0","id":1,"result":{"msg":"hi"}}`))
	f.Add([]byte(`{"id":1,"result":null,"error":"boom"}`))
	f.Add([]byte(`{"id":"1","error":{"code":-32000,"message":"{\"code\":404,\"detail\":\"x\"}"}}`))
	f.Fuzz(func(t *testing.T, body []byte) {
		result, appErr, err := parseReply(body, 1)
		n := 0
		for _, set := range []bool{result != nil, appErr != nil, err != nil} {
			if set {
				n++
			}
		}
		if n != 1 {
			t.Fatalf("parseReply(%q) = %q, %v, %v; want exactly one", body, result, appErr, err)
		}
		if result != nil && !json.Valid(result) {
			t.Fatalf("parseReply(%q): result %q is not JSON", body, result)
		}
		if appErr != nil && (appErr.code < 400 || appErr.code > 599 || appErr.detail == "") {
			t.Fatalf("parseReply(%q): app error %+v", body, appErr)
		}
	})
}

func BenchmarkAPIRoute(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		apiRoute("go.micro.srv", "/example/call")
	}
}

func BenchmarkParseRPCRequestForm(b *testing.B) {
	body := []byte(`service=go.micro.srv.example&method=Example.Call&request=%7B%22name%22%3A+%22John%22%7D`)
	b.ReportAllocs()
	for b.Loop() {
		parseRPCRequest(form, nil, body)
	}
}

func BenchmarkParseRPCRequestJSON(b *testing.B) {
	body := []byte(`{"service":"go.micro.srv.example","method":"Example.Call","request":{"name":"John"}}`)
	b.ReportAllocs()
	for b.Loop() {
		parseRPCRequest("application/json", nil, body)
	}
}

func BenchmarkAppendEnvelope(b *testing.B) {
	req := []byte(`{"name": "John"}`)
	buf := make([]byte, 0, 256)
	b.ReportAllocs()
	for b.Loop() {
		buf = appendEnvelope(buf[:0], 12345, "Example.Call", req)
	}
}

func BenchmarkParseReply(b *testing.B) {
	body := []byte(`{"jsonrpc":"2.0","id":12345,"result":{"msg":"go.micro.srv.example-1: Hello John"}}`)
	b.ReportAllocs()
	for b.Loop() {
		parseReply(body, 12345)
	}
}

// testSidecar runs a sidecar's API in this process, on a memory registry.
func testSidecar(t testing.TB, mod func(*config)) (*sidecar, *httptest.Server) {
	t.Helper()
	cfg, err := parseSidecarFlags([]string{"--registry=memory", "--rpc_timeout=2s"}, io.Discard, func(string) (string, bool) { return "", false })
	if err != nil {
		t.Fatal(err)
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := newSidecar(context.Background(), cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.closeNodeConnections) // runs after srv.Close: no call is in flight
	srv := httptest.NewServer(s.routes())
	t.Cleanup(srv.Close)
	return s, srv
}

// register adds nodes at addrs (host:port) to service.
func register(t testing.TB, s *sidecar, service string, addrs ...string) {
	t.Helper()
	svc := Service{Name: service}
	for i, a := range addrs {
		svc.Nodes = append(svc.Nodes, Node{ID: fmt.Sprintf("%s-%d", service, i), Address: a})
	}
	if err := normalizeService(&svc); err != nil {
		t.Fatal(err)
	}
	if err := s.reg.Register(svc, time.Minute); err != nil {
		t.Fatal(err)
	}
}

// jsonrpcApp is an in-process JSON-RPC app that records what it was sent.
type jsonrpcApp struct {
	srv    *httptest.Server
	calls  atomic.Int32
	mu     sync.Mutex // guards last
	last   *http.Request
	answer func(w http.ResponseWriter, r *http.Request, env map[string]json.RawMessage)
}

func newJSONRPCApp(t testing.TB, name string) *jsonrpcApp {
	a := &jsonrpcApp{}
	a.answer = func(w http.ResponseWriter, r *http.Request, env map[string]json.RawMessage) {
		fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":{"node":%q,"params":%s}}`, env["id"], name, env["params"])
	}
	a.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.calls.Add(1)
		body, _ := io.ReadAll(r.Body)
		var env map[string]json.RawMessage
		json.Unmarshal(body, &env)
		a.mu.Lock()
		a.last = r
		a.mu.Unlock()
		a.answer(w, r, env)
	}))
	t.Cleanup(a.srv.Close)
	return a
}

func (a *jsonrpcApp) addr() string { return strings.TrimPrefix(a.srv.URL, "http://") }

func (a *jsonrpcApp) lastHeader(k string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.last.Header.Get(k)
}

func post(t *testing.T, url, ct, body string, hdr ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, strings.NewReader(body))
	req.Header.Set("Content-Type", ct)
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(data)
}

// deadPort is a loopback address nothing listens on.
func deadPort(t *testing.T) string {
	// Port 1 of an address of its own in 127/8, where nothing listens: a
	// port freed by a listener could be the next test server's, which the
	// selector, keeping nodes by address, would then find ejected.
	n := deadPorts.Add(1)
	return fmt.Sprintf("127.0.%d.%d:1", n/250, 2+n%250)
}

var deadPorts atomic.Int64

func TestCallHeadersAndResult(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := newJSONRPCApp(t, "a")
	register(t, s, "go.micro.srv.greeter", app.addr())
	code, body := post(t, srv.URL+"/greeter/say-hello", "application/json", `{"name": "John"}`,
		"Traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "X-Request-Id", "r1", "Timeout", "1500ms")
	if code != 200 || body != `{"node":"a","params":[{"name": "John"}]}` {
		t.Fatalf("got %d %s; want 200 and the result as the app wrote it", code, body)
	}
	for k, want := range map[string]string{
		"Content-Type": "application/json", "Micro-Service": "go.micro.srv.greeter", "Micro-Endpoint": "Greeter.SayHello",
		"Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "X-Request-Id": "r1",
	} {
		if got := app.lastHeader(k); got != want {
			t.Errorf("header %s at the app: %q; want %q", k, got, want)
		}
	}
	var ns int64
	fmt.Sscan(app.lastHeader("Timeout"), &ns)
	if d := time.Duration(ns); d <= time.Second || d > 1500*time.Millisecond {
		t.Errorf("Timeout at the app: %q; want the remaining deadline in nanoseconds, under 1.5s", app.lastHeader("Timeout"))
	}
}

// TestCallBodiesShareNoBuffer makes calls whose bodies, envelopes and
// replies come from pooled buffers: long and short bodies in turn, with a
// stated length and chunked, form and JSON. Each reply must carry its own
// request, not bytes left in a buffer by the call before.
func TestCallBodiesShareNoBuffer(t *testing.T) {
	// The deadline is generous because this test is about buffers, not time:
	// under -race the app takes a second or more to decode a large body.
	s, srv := testSidecar(t, func(c *config) {
		c.MaxBodyBytes, c.RPC.MaxBodyBytes, c.RPC.Timeout = 16<<20, 16<<20, 30*time.Second
	})
	app := newJSONRPCApp(t, "a")
	register(t, s, "go.micro.srv.echo", app.addr())
	long := strings.Repeat("x", 3000)
	huge := strings.Repeat("y", 1<<20) // past the pool's 64 KiB buffers
	for i, body := range []string{`{"n":"` + long + `"}`, `{"n":1}`, `{"n":"` + huge + `"}`, `{"n":"` + long[:700] + `"}`, `{}`} {
		want := `{"node":"a","params":[` + body + `]}`
		if code, got := post(t, srv.URL+"/rpc", form, "service=go.micro.srv.echo&method=Echo.Call&request="+body); code != 200 || got != want {
			t.Fatalf("call %d by form: %d %.80s; want 200 %.80s", i, code, got, want)
		}
		if code, got := post(t, srv.URL+"/echo/call", "application/json", body); code != 200 || got != want {
			t.Fatalf("call %d by path: %d %.80s; want 200 %.80s", i, code, got, want)
		}
		req, _ := http.NewRequest("POST", srv.URL+"/rpc", io.MultiReader(strings.NewReader(`{"service":"go.micro.srv.echo","method":"Echo.Call","request":`), strings.NewReader(body+"}")))
		req.Header.Set("Content-Type", "application/json")
		resp, err := http.DefaultClient.Do(req) // no length: sent chunked
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 || string(got) != want {
			t.Fatalf("call %d chunked: %d %.80s; want 200 %.80s", i, resp.StatusCode, got, want)
		}
	}
}

func TestCallErrors(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.MaxBodyBytes, c.RPC.MaxBodyBytes = 200, 200 })
	answering := func(status int, ct, body string) string {
		a := newJSONRPCApp(t, "x")
		a.answer = func(w http.ResponseWriter, r *http.Request, env map[string]json.RawMessage) {
			w.Header().Set("Content-Type", ct)
			w.WriteHeader(status)
			io.WriteString(w, strings.ReplaceAll(body, "ID", string(env["id"])))
		}
		return a.addr()
	}
	register(t, s, "garbage", answering(200, "text/html", "<html>hello</html>"))
	register(t, s, "teapot", answering(418, "text/plain", "short and stout"))
	register(t, s, "failing", answering(200, "application/json", `{"jsonrpc":"2.0","id":ID,"error":{"code":-32000,"message":"database on fire"}}`))
	register(t, s, "failing500", answering(500, "application/json", `{"jsonrpc":"2.0","id":ID,"error":{"code":-32601,"message":"method not found"}}`))
	register(t, s, "othercall500", answering(500, "application/json", `{"jsonrpc":"2.0","id":999999,"error":{"code":-32000,"message":"not this call's"}}`))
	register(t, s, "microerr", answering(200, "application/json", `{"id":ID,"result":null,"error":"{\"id\":\"x\",\"code\":403,\"detail\":\"not yours\",\"status\":\"Forbidden\"}"}`))
	register(t, s, "microerr499", answering(200, "application/json", `{"id":ID,"result":null,"error":"{\"id\":\"x\",\"code\":499,\"detail\":\"gone\"}"}`))
	register(t, s, "switching", rawNode(t, func(c net.Conn, _ *http.Request) {
		// A 101 nobody asked for, on a connection the node then keeps open.
		io.WriteString(c, "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n")
		io.Copy(io.Discard, c)
	}))
	register(t, s, "dead", deadPort(t))
	for _, tc := range []struct {
		name, path, ct, body string
		code                 int
		detail               string
	}{
		{"a code without a name", "/rpc", form, "service=microerr499&method=A.B", 499, "gone"},
		{"101 to a call", "/rpc", form, "service=switching&method=A.B", 502, "answered 101 Switching Protocols"},
		{"unknown service", "/rpc", form, "service=nope&method=A.B", 404, "service nope not found"},
		{"unknown path service", "/nope/call", "application/json", "{}", 404, "service go.micro.srv.nope not found"},
		{"a query on a path call", "/nope/call?name=John", form, "", 400, `query parameter "name" is not one POST /nope/call takes (it takes none); the request goes in the body, as JSON or form fields`},
		{"a bad query on a path call", "/nope/call?name=%zz", form, "", 400, `query "name=%zz": invalid URL escape "%zz"; the request goes in the body`},
		{"an access token on a path call", "/nope/call?access_token=x", "application/json", "{}", 404, "service go.micro.srv.nope not found"},
		{"garbage", "/rpc", form, "service=garbage&method=A.B", 502, `answered 200 OK with text/html "<html>hello</html>"`},
		{"non-2xx", "/rpc", form, "service=teapot&method=A.B", 502, `answered 418 I'm a teapot with text/plain "short and stout"`},
		{"app error", "/rpc", form, "service=failing&method=A.B", 500, "database on fire"},
		{"micro error", "/rpc", form, "service=microerr&method=A.B", 403, "not yours"},
		{"app error with a 500", "/rpc", form, "service=failing500&method=A.B", 500, "method not found"},
		{"another call's error with a 500", "/rpc", form, "service=othercall500&method=A.B", 502, "answered 500 Internal Server Error"},
		{"unreachable", "/rpc", form, "service=dead&method=A.B", 502, "service dead unreachable"},
		{"ejected", "/rpc", form, "service=dead&method=A.B", 503, "no nodes available for service dead"},
		{"bad input", "/rpc", form, "service=x", 400, "method is required"},
		{"not json", "/rpc", form, "service=x&method=A.B&request=John", 400, "is not JSON"},
		{"bad query", "/rpc?service=%zz", form, "method=A.B", 400, `invalid URL escape "%zz"`},
		{"a semicolon in the query", "/rpc?service=a;b", form, "method=A.B", 400, `query "service=a;b": a ';' in a query must be escaped, as %3B`},
		{"a semicolon in the body", "/rpc", form, `service=a&method=A.B&request={"x":"a;b"}`, 400, "a ';' in a form body must be escaped, as %3B"},
		{"broken json labelled a form", "/some/call", form, "{not json", 400, "body is not JSON"},
		{"json labelled a form", "/rpc", form, `{"service":"nope","method":"A.B"}`, 404, "service nope not found"},
		{"a batch labelled a form", "/rpc", form, `[{"service":"nope","method":"A.B"}]`, 400, "the body is a JSON array: /rpc takes one call"},
		{"too big", "/rpc", form, strings.Repeat("x", 300), 413, "larger than 200 bytes"},
		{"bad timeout", "/rpc", form, "service=failing&method=A.B", 400, "Timeout header"},
		{"two timeouts", "/rpc", form, "service=failing&method=A.B", 400, "the Timeout header is given 2 times; give it once"},
		{"two proxy timeouts", "/proxy/failing/", form, "", 400, "the Timeout header is given 2 times; give it once"},
		{"GET", "/rpc", "", "", 405, "method GET not allowed"},
		{"GET path", "/foo/bar", "", "", 404, "no endpoint at /foo/bar"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("POST", srv.URL+tc.path, strings.NewReader(tc.body))
			if tc.name == "GET" || tc.name == "GET path" {
				req.Method = "GET"
			}
			req.Header.Set("Content-Type", tc.ct)
			if tc.name == "bad timeout" {
				req.Header.Set("Timeout", "soon")
			}
			if strings.HasPrefix(tc.name, "two") {
				req.Header["Timeout"] = []string{"1s", "2s"}
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			data, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var e errorBody
			if err := json.Unmarshal(data, &e); err != nil || resp.StatusCode != tc.code || e.Code != tc.code || e.ID != "go.micro.sidecar" || !strings.Contains(e.Detail, tc.detail) || e.Status == "" {
				t.Errorf("got %d %s; want %d with detail containing %q, and a status", resp.StatusCode, data, tc.code, tc.detail)
			}
			if want := fmt.Sprintf("%d %s", tc.code, e.Status); resp.Status != want {
				t.Errorf("status line %q; want %q", resp.Status, want)
			}
		})
	}
}

func TestCallRetriesRefusedNodesOnly(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.RPC.Retries = 2 })
	app := newJSONRPCApp(t, "live")
	dead1, dead2 := deadPort(t), deadPort(t)
	register(t, s, "mixed", dead1, dead2, app.addr())
	for i := range 6 {
		if code, body := post(t, srv.URL+"/rpc", form, "service=mixed&method=A.B"); code != 200 {
			t.Fatalf("call %d: %d %s; want every call to reach the live node", i, code, body)
		}
	}
	if n := s.rpc.sel.tracked.Load(); n != 2 {
		t.Errorf("%d nodes ejected; want the 2 dead ones", n)
	}

	// A node that cuts the connection after reading the request may have
	// acted on it: the call is not retried.
	var cut atomic.Int32
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			cut.Add(1)
			c.Read(make([]byte, 4096))
			c.Close()
		}
	}()
	other := newJSONRPCApp(t, "other")
	register(t, s, "cutter", ln.Addr().String(), other.addr())
	s.rpc.sel.cursors["cutter"] = new(uint64) // the cutting node first
	code, body := post(t, srv.URL+"/rpc", form, "service=cutter&method=A.B")
	if code != 502 || cut.Load() != 1 || other.calls.Load() != 0 {
		t.Errorf("cut after sending: got %d %s, %d cuts, %d calls elsewhere; want 502 and no retry", code, body, cut.Load(), other.calls.Load())
	}
}

func TestCallDeadline(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.RPC.Timeout = 300 * time.Millisecond })
	release := make(chan struct{})
	defer close(release)
	hang := newJSONRPCApp(t, "hang")
	hang.answer = func(w http.ResponseWriter, r *http.Request, _ map[string]json.RawMessage) {
		select {
		case <-release:
		case <-r.Context().Done():
		}
	}
	register(t, s, "go.micro.srv.slow", hang.addr())
	start := time.Now()
	code, body := post(t, srv.URL+"/slow/call", "application/json", "{}")
	if took := time.Since(start); code != 504 || !strings.Contains(body, "from --rpc_timeout") || took < 300*time.Millisecond || took > 3*time.Second {
		t.Errorf("hanging node: %d %s after %v; want 504 after the 300ms deadline", code, body, took)
	}
	if s.rpc.sel.tracked.Load() != 1 {
		t.Error("a node that timed out under the default deadline should be ejected")
	}

	// A caller's shorter deadline says nothing about the node: no ejection.
	hang2 := newJSONRPCApp(t, "hang2")
	hang2.answer = hang.answer
	register(t, s, "slow2", hang2.addr())
	code, body = post(t, srv.URL+"/rpc", form, "service=slow2&method=A.B", "Timeout", "100000000") // 100ms, go-micro's form
	if code != 504 || !strings.Contains(body, "deadline 100ms from the Timeout header") {
		t.Errorf("Timeout header: %d %s; want 504 naming the header's deadline", code, body)
	}
	if s.rpc.sel.tracked.Load() != 1 {
		t.Error("a node that ran out of a caller's shortened deadline must not be ejected")
	}
}

// BenchmarkRPCThroughSidecar is the whole /rpc path in one process: client,
// sidecar and app on loopback. Profile it with -cpuprofile.
func BenchmarkRPCThroughSidecar(b *testing.B) {
	s, srv := testSidecar(b, nil)
	app := newJSONRPCApp(b, "a")
	register(b, s, "go.micro.srv.bench", app.addr())
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	body := `service=go.micro.srv.bench&method=Example.Call&request={"name":"John"}`
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			resp, err := client.Post(srv.URL+"/rpc", form, strings.NewReader(body))
			if err != nil {
				b.Error(err)
				return
			}
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	})
}

func TestRPCFlags(t *testing.T) {
	noEnv := func(string) (string, bool) { return "", false }
	for _, tc := range []struct {
		args []string
		err  string
	}{
		{[]string{"--selector=leastconn"}, `--selector "leastconn": want roundrobin or random`},
		{[]string{"--handler=grpc"}, `--handler "grpc": want rpc or proxy`},
		{[]string{"--rpc_timeout=0s"}, "--rpc_timeout 0s: want 1ms to 1h0m0s"},
		{[]string{"--rpc_timeout=2h"}, "--rpc_timeout 2h0m0s: want 1ms to 1h0m0s"},
		{[]string{"--rpc_retries=-1"}, "--rpc_retries -1: must be 0 or more"},
		{[]string{"--namespace=a b"}, `--namespace "a b"`},
	} {
		_, err := parseSidecarFlags(append([]string{"--registry=memory"}, tc.args...), io.Discard, noEnv)
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("flags %v: error %v; want %q", tc.args, err, tc.err)
		}
	}
	cfg, err := parseSidecarFlags([]string{"--registry=memory"}, io.Discard, noEnv)
	if err != nil || cfg.RPC.Namespace != "go.micro.srv" || cfg.Selector.Strategy != "roundrobin" || cfg.RPC.Retries != 2 || cfg.RPC.Timeout != 5*time.Second || cfg.Handler != "rpc" {
		t.Errorf("defaults: %+v, %v", cfg, err)
	}
	cfg, err = parseSidecarFlags([]string{"--registry=memory", "--namespace="}, io.Discard, noEnv)
	if err != nil || cfg.RPC.Namespace != "" {
		t.Errorf("an empty --namespace must be allowed: %q, %v", cfg.RPC.Namespace, err)
	}
}

// Connections to nodes are reused, and a connection the node closed while
// idle, or after an HTTP/1.0 answer, is never mistaken for a failing node.
func TestCallConnectionReuse(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := newJSONRPCApp(t, "a")
	var mu sync.Mutex
	remotes := map[string]bool{}
	answer := app.answer
	app.answer = func(w http.ResponseWriter, r *http.Request, env map[string]json.RawMessage) {
		mu.Lock()
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		answer(w, r, env)
	}
	register(t, s, "reuse", app.addr())
	for i := range 5 {
		if code, body := post(t, srv.URL+"/rpc", form, "service=reuse&method=A.B"); code != 200 {
			t.Fatalf("call %d: %d %s", i, code, body)
		}
	}
	mu.Lock()
	n := len(remotes)
	mu.Unlock()
	if n != 1 {
		t.Errorf("%d connections for 5 calls in a row; want 1, kept alive", n)
	}
	app.srv.CloseClientConnections() // the node drops its idle connections
	waitIdleUnfit(t, s, "the node's close")
	if code, body := post(t, srv.URL+"/rpc", form, "service=reuse&method=A.B"); code != 200 {
		t.Fatalf("after the node closed idle connections: %d %s; want 200", code, body)
	}

	// An HTTP/1.0 server (Python's http.server by default) closes after each answer.
	old := rawNode(t, func(c net.Conn, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		var env map[string]json.RawMessage
		json.Unmarshal(body, &env)
		fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"id\":%s,\"result\":\"old\"}", env["id"])
	})
	register(t, s, "old", old)
	for i := range 3 {
		if code, body := post(t, srv.URL+"/rpc", form, "service=old&method=A.B"); code != 200 || body != `"old"` {
			t.Fatalf("HTTP/1.0 node, call %d: %d %s", i, code, body)
		}
	}
	if n := s.rpc.sel.tracked.Load(); n != 0 {
		t.Errorf("%d nodes ejected; want none", n)
	}
}

// oneShotNode answers the first request on each connection, keeping the
// connection alive, and closes it when the next request arrives: a node
// whose idle timeout ends as a request goes out. With reset set it closes
// with a reset rather than a FIN.
func oneShotNode(t *testing.T, reset bool) string {
	t.Helper()
	return tcpNode(t, func(c net.Conn) {
		defer c.Close()
		br := bufio.NewReader(c)
		req, err := http.ReadRequest(br)
		if err != nil {
			return
		}
		var env struct{ ID json.RawMessage }
		json.NewDecoder(req.Body).Decode(&env)
		body := fmt.Sprintf(`{"jsonrpc":"2.0","id":%s,"result":"once"}`, env.ID)
		fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		br.Peek(1)
		if reset {
			c.(*net.TCPConn).SetLinger(0)
		}
	})
}

// A kept-alive connection that the node closes as a request goes out
// (after the peek found it open) fails that call, which may have reached
// the node; but the node is not failing and is not ejected: the next call
// gets a new connection and an answer. So on /rpc, on the proxy's direct
// path, and on its transport (a chunked body).
func TestKeptAliveConnectionLostIsNoNodeFailure(t *testing.T) {
	s, srv := testSidecar(t, nil)
	for _, reset := range []bool{false, true} {
		for _, via := range []string{"rpc", "proxy", "chunked"} {
			name := fmt.Sprintf("oneshot-%s-%v", via, reset)
			register(t, s, name, oneShotNode(t, reset))
			path := "/rpc"
			if via != "rpc" {
				path = "/proxy/" + name + "/"
			}
			const envelope = `{"jsonrpc":"2.0","id":1,"method":"A.B","params":[{}]}`
			call := func() (int, string) {
				switch via {
				case "rpc":
					return post(t, srv.URL+"/rpc", form, "service="+name+"&method=A.B")
				case "proxy":
					return post(t, srv.URL+path, "application/json", envelope)
				}
				// A body of unknown length goes out chunked.
				resp, err := http.Post(srv.URL+path, "application/json", io.NopCloser(strings.NewReader(envelope)))
				if err != nil {
					t.Fatal(err)
				}
				defer resp.Body.Close()
				data, _ := io.ReadAll(resp.Body)
				return resp.StatusCode, string(data)
			}
			// Every call on a kept-alive connection meets the node's close:
			// usually the second, but net/http's transport may dial a second
			// connection before the first is back in its pool.
			lost := 0
			for i := 0; i < 10 && lost < 2; i++ {
				code, body := call()
				switch {
				case code == 502 && strings.Contains(body, "the node closed the connection before any answer"):
					lost++
				case code != 200:
					t.Fatalf("reset %v, %s, call %d: %d %s; want 200, or a 502 naming the lost connection", reset, path, i, code, body)
				}
			}
			if lost < 2 {
				t.Errorf("reset %v, %s: %d calls of 10 met the node's close; want the second and more", reset, path, lost)
			}
			if n := s.rpc.sel.tracked.Load(); n != 0 {
				t.Errorf("reset %v, %s: %d nodes ejected; want none", reset, path, n)
			}
		}
	}
}

// A node that answers a new connection at once, before the request is
// even sent (a server refusing work as it accepts), and then closes it
// with a lingering close, draining what comes: the answer is read at once,
// not after the call's deadline. The answer can land before the sidecar's
// poller is set to wait, which then wakes for nothing more.
func TestNodeAnsweringBeforeTheRequestIsReadAtOnce(t *testing.T) {
	s, srv := testSidecar(t, nil)
	refuser := tcpNode(t, func(c net.Conn) {
		defer c.Close()
		io.WriteString(c, "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy")
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		io.Copy(io.Discard, c) // the lingering close
	})
	register(t, s, "refuser", refuser)
	for i := range 20 {
		// Missed, the answer would wait out the deadline: a 504.
		code, body := post(t, srv.URL+"/rpc", form, "service=refuser&method=A.B", "Timeout", "2s")
		if code != 502 || !strings.Contains(body, "503") {
			t.Fatalf("call %d: %d %s; want the node's 503, reported as a 502", i, code, body)
		}
		code, body = post(t, srv.URL+"/proxy/refuser/", "application/json", "{}", "Timeout", "2s")
		if code != 503 || body != "busy" {
			t.Fatalf("proxied call %d: %d %s; want the node's 503", i, code, body)
		}
	}
}

// TestNodePoolReusesItsLists: taking the last idle connection to an
// address and putting it back allocates nothing, and a sweep drops the
// lists left empty.
func TestNodePoolReusesItsLists(t *testing.T) {
	nc := newNodeClient()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	now := time.Now()
	nc.put("127.0.0.1:1", &nodeConn{conn: a, sock: newNodeSocket(a), since: now})
	allocs := testing.AllocsPerRun(100, func() {
		c := nc.get("127.0.0.1:1", now)
		if c == nil {
			t.Fatal("the idle connection is gone")
		}
		nc.put("127.0.0.1:1", c)
	})
	if allocs != 0 {
		t.Errorf("%.1f allocations to take and put back a connection; want 0", allocs)
	}
	nc.get("127.0.0.1:1", now)
	nc.sweep()
	nc.mu.Lock()
	defer nc.mu.Unlock()
	if len(nc.idle) != 0 || nc.nIdle != 0 {
		t.Errorf("after a sweep: %d lists, %d idle; want none", len(nc.idle), nc.nIdle)
	}
}

// waitIdleUnfit waits until no idle connection of s's RPC client is fit
// for a request: what the node did to them has reached the sidecar.
func waitIdleUnfit(t *testing.T, s *sidecar, what string) {
	t.Helper()
	waitFor(t, 5*time.Second, what+" to reach the sidecar's idle connections", func() bool {
		nc := s.rpc.nodes
		nc.mu.Lock()
		defer nc.mu.Unlock()
		for _, list := range nc.idle {
			for _, c := range list {
				if c.sock.check() {
					return false
				}
			}
		}
		return true
	})
}

// TestCallSkipsIdleConnectionsTheNodeSpokeOn: bytes a node sends on an
// idle connection, such as a 408 before it closes it, are never read as
// the answer to the next call; that call goes out on a new connection.
func TestCallSkipsIdleConnectionsTheNodeSpokeOn(t *testing.T) {
	s, srv := testSidecar(t, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	conns := make(chan net.Conn, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns <- c
			go serveRequests(c, func(_ *http.Request, body []byte) {
				var env map[string]json.RawMessage
				json.Unmarshal(body, &env)
				fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"id\":%s,\"result\":1}", len(`{"id":,"result":1}`)+len(env["id"]), env["id"])
			})
		}
	}()
	register(t, s, "talky", ln.Addr().String())
	if code, body := post(t, srv.URL+"/rpc", form, "service=talky&method=A.B"); code != 200 || body != "1" {
		t.Fatalf("first call: %d %s", code, body)
	}
	first := <-conns
	io.WriteString(first, "HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
	waitIdleUnfit(t, s, "the node's 408")
	if code, body := post(t, srv.URL+"/rpc", form, "service=talky&method=A.B"); code != 200 || body != "1" {
		t.Fatalf("after the node spoke on the idle connection: %d %s; want 200 and its answer", code, body)
	}
	if len(conns) != 1 {
		t.Errorf("%d new connections for the second call; want 1", len(conns))
	}
	if n := s.rpc.sel.tracked.Load(); n != 0 {
		t.Errorf("%d nodes ejected; want none", n)
	}
}

// TestNodeSocketExchangeWithAFullSocket: a request the socket cannot take
// at once (its buffer is full) is written in full, and the answer read.
func TestNodeSocketExchangeWithAFullSocket(t *testing.T) {
	c, peer := socketPair(t)
	// Fill the socket: writes block once the peer's and our buffers are full.
	c.SetWriteDeadline(time.Now().Add(200 * time.Millisecond))
	junk := make([]byte, 64<<10)
	filled := 0
	for {
		n, err := c.Write(junk)
		filled += n
		if err != nil {
			break
		}
	}
	c.SetWriteDeadline(time.Time{})
	req := bytes.Repeat([]byte("r"), 1<<20)
	got := make(chan []byte, 1)
	go func() { // the node: reads all, then answers
		b := make([]byte, filled+len(req))
		_, err := io.ReadFull(peer, b)
		if err == nil {
			io.WriteString(peer, "answer")
		}
		got <- b[filled:]
	}()
	s := newNodeSocket(c)
	s.queue(req, false)
	p := make([]byte, 64)
	n, err := s.exchange(p)
	if err != nil || string(p[:n]) != "answer" {
		t.Fatalf("exchange: %q, %v; want the answer", p[:n], err)
	}
	if b := <-got; !bytes.Equal(b, req) {
		t.Errorf("the node got %d bytes of the request, not the %d sent", len(b), len(req))
	}
}

// TestShutdownClosesNodeConnections: the keep-alive connections RPC and the
// proxy hold to nodes are closed at shutdown, not left to their idle timeout.
func TestShutdownClosesNodeConnections(t *testing.T) {
	s, srv := testSidecar(t, nil)
	var open atomic.Int32
	app := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"jsonrpc":"2.0","id":1,"result":{}}`)
	}))
	app.Config.ConnState = func(c net.Conn, st http.ConnState) {
		switch st {
		case http.StateNew:
			open.Add(1)
		case http.StateClosed, http.StateHijacked:
			open.Add(-1)
		}
	}
	app.Start()
	defer app.Close()
	port := app.Listener.Addr().(*net.TCPAddr).Port
	if err := s.reg.Register(Service{Name: "go.micro.srv.kept", Nodes: []Node{{ID: "k1", Address: "127.0.0.1", Port: port}}}, 0); err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/kept/call", "/proxy/go.micro.srv.kept/x"} {
		// A body of unknown length (sent chunked) takes the proxy through
		// ReverseProxy's transport rather than the pool it shares with RPC.
		resp, err := http.Post(srv.URL+path, "application/json", io.MultiReader(strings.NewReader(`{}`)))
		if err != nil {
			t.Fatalf("POST %s: %v", path, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("POST %s: %d %s", path, resp.StatusCode, body)
		}
	}
	if n := open.Load(); n != 2 {
		t.Fatalf("%d connections open to the node; want one kept alive by RPC and one by the proxy's transport", n)
	}
	s.closeNodeConnections()
	waitFor(t, 5*time.Second, "the node's connections to close", func() bool { return open.Load() == 0 })
}

// BenchmarkParseRPCRequestFormRaw is the form as curl -d sends it: nothing
// escaped, the usual case.
func BenchmarkParseRPCRequestFormRaw(b *testing.B) {
	body := []byte(`service=go.micro.srv.example&method=Example.Call&request={"name": "John"}`)
	b.ReportAllocs()
	for b.Loop() {
		parseRPCRequest(form, nil, body)
	}
}

func TestClassifyFailure(t *testing.T) {
	later := time.Now().Add(time.Hour)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name     string
		ctx      context.Context
		deadline time.Time
		err      error
		want     outcome
	}{
		{"refused dial", context.Background(), later, &net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}, notSent},
		{"reset after sending", context.Background(), later, &net.OpError{Op: "read", Err: syscall.ECONNRESET}, lost},
		{"end of stream", context.Background(), later, io.EOF, lost},
		// A connection's deadline may fall up to deadlineSlack before the
		// call's: its timeout is the call's deadline all the same.
		{"connection deadline", context.Background(), later, &net.OpError{Op: "read", Err: os.ErrDeadlineExceeded}, timedOut},
		{"past the deadline", context.Background(), time.Now().Add(-time.Second), io.EOF, timedOut},
		{"caller gone", cancelled, later, io.EOF, timedOut},
	} {
		if got := classifyFailure(tc.ctx, tc.deadline, tc.err); got != tc.want {
			t.Errorf("%s: classifyFailure = %v; want %v", tc.name, got, tc.want)
		}
	}
}

// BenchmarkReadResponseHead reads a node's typical reply head, as RPC does
// (fields kept: none) and as the proxy does (every field kept).
func BenchmarkReadResponseHead(b *testing.B) {
	head := "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Fri, 27 Nov 2026 09:30:00 GMT\r\nContent-Length: 52\r\n\r\n"
	for _, keep := range []bool{false, true} {
		b.Run(map[bool]string{false: "rpc", true: "proxy"}[keep], func(b *testing.B) {
			r := strings.NewReader(head)
			br := bufio.NewReader(r)
			var header []string
			b.ReportAllocs()
			for b.Loop() {
				r.Reset(head)
				br.Reset(r)
				hp := (*[]string)(nil)
				if keep {
					header = header[:0]
					hp = &header
				}
				if _, err := readResponseHeader(br, hp); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestRPCAnswersAlikeOnBothServers calls /rpc through the fast-path server
// (which takes the answer's one field as a ready line) and through
// net/http: same status, fields and body, for a result and an error.
func TestRPCAnswersAlikeOnBothServers(t *testing.T) {
	s, viaNetHTTP := testSidecar(t, nil)
	_, fastAddr := startFastServer(t, s.routes(), nil)
	app := newJSONRPCApp(t, "n1")
	register(t, s, "go.micro.srv.alike", app.addr())
	ask := func(base, form string) string {
		t.Helper()
		resp, err := http.Post(base+"/rpc", "application/x-www-form-urlencoded", strings.NewReader(form))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		h := resp.Header.Clone()
		h.Del("Date")
		return fmt.Sprint(resp.StatusCode, " ", h, " ", resp.ContentLength, " ", string(b))
	}
	for _, form := range []string{
		`service=go.micro.srv.alike&method=Example.Call&request={"name":"John"}`,
		`service=go.micro.srv.missing&method=Example.Call&request={}`,
	} {
		fast, netHTTP := ask("http://"+fastAddr, form), ask(viaNetHTTP.URL, form)
		if fast != netHTTP {
			t.Errorf("%s:\nfast-path server: %s\nnet/http:         %s", form, fast, netHTTP)
		}
		if strings.Contains(form, "alike") && !strings.HasPrefix(fast, "200 map[Content-Length:[40] Content-Type:[application/json]] 40 ") {
			t.Errorf("%s: %s; want 200 with its length and Content-Type: application/json", form, fast)
		}
	}
}

// TestNodeClosingIdleConnectionsCostsNoCalls: a node that closes its idle
// kept-alive connections (as net/http's Shutdown does in a graceful
// restart) costs the callers of /rpc and of the proxy no failed call:
// calls that would have gone out on those connections go on new ones, or
// to another node: the pool checks a kept-alive connection before it uses
// it (see nodeSocket). The calls start again as soon as the node has
// closed them. (A request the node's server has already read when it
// closes the connection is another matter: it counts as reached, and is
// not retried.)
func TestNodeClosingIdleConnectionsCostsNoCalls(t *testing.T) {
	s, srv := testSidecar(t, nil)
	var served [2]atomic.Int64
	node := func(i int) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			served[i].Add(1)
			var env struct{ ID json.RawMessage }
			json.NewDecoder(r.Body).Decode(&env)
			if env.ID == nil {
				env.ID = json.RawMessage("null")
			}
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":1}`, env.ID)
		})
	}
	serve := func(ln net.Listener, h http.Handler) *http.Server {
		hs := &http.Server{Handler: h}
		go hs.Serve(ln)
		t.Cleanup(func() { hs.Close() })
		return hs
	}
	listen := func() net.Listener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		return ln
	}
	lnA, lnB := listen(), listen()
	a := serve(lnA, node(0))
	serve(lnB, node(1))
	register(t, s, "restart", lnA.Addr().String(), lnB.Addr().String())

	// calls makes 8 callers call n times each, half by /rpc and half by the
	// proxy, and reports every failure.
	calls := func(n int) {
		t.Helper()
		failures := make(chan string, 8*n)
		var wg sync.WaitGroup
		for w := range 8 {
			wg.Go(func() {
				for i := range n {
					path, ct, body := "/rpc", form, "service=restart&method=A.B"
					if (w+i)%2 == 1 {
						path, ct, body = "/proxy/restart/x", "application/json", `{}`
					}
					resp, err := http.Post(srv.URL+path, ct, strings.NewReader(body))
					if err != nil {
						failures <- path + ": " + err.Error()
						continue
					}
					got, _ := io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						failures <- fmt.Sprintf("%s: %d %s", path, resp.StatusCode, got)
					}
				}
			})
		}
		wg.Wait()
		close(failures)
		for f := range failures {
			t.Error(f)
		}
	}
	calls(50)
	if served[0].Load() == 0 {
		t.Fatal("no call reached node A")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := a.Shutdown(ctx); err != nil { // closes A's idle connections, and its listener
		t.Fatalf("node A's shutdown: %v", err)
	}
	calls(50)
}

func TestTimeoutHint(t *testing.T) {
	for _, tc := range []struct {
		header string
		d      time.Duration
		want   string
	}{
		{"", 5 * time.Second, "deadline 5s from --rpc_timeout; a Timeout header sets another"},
		{"5", 5, "deadline 5ns from the Timeout header, read as nanoseconds as go-micro sends it; write 5s for five seconds"},
		{"5µs", 5 * time.Microsecond, "deadline 5µs from the Timeout header"}, // a unit was given: no hint
		{"2s", 2 * time.Second, "deadline 2s from the Timeout header"},
	} {
		if got := timeoutHint(tc.header, tc.d); got != tc.want {
			t.Errorf("timeoutHint(%q, %v) = %q; want %q", tc.header, tc.d, got, tc.want)
		}
	}
}

func TestConnectDeadline(t *testing.T) {
	now := time.Unix(1000, 0)
	for _, tc := range []struct {
		left, want time.Duration // the call's time left (0: no deadline); the attempt's
	}{
		{0, 3 * time.Second},
		{10 * time.Second, 3 * time.Second},
		{5 * time.Second, 2500 * time.Millisecond}, // half: another node may still be tried
		{time.Second, 500 * time.Millisecond},
		{150 * time.Millisecond, 150 * time.Millisecond}, // too short to tell of the node: the whole time
		{5, 5},
	} {
		deadline := time.Time{}
		if tc.left > 0 {
			deadline = now.Add(tc.left)
		}
		if got := connectDeadline(now, deadline).Sub(now); got != tc.want {
			t.Errorf("%v left: the attempt gets %v; want %v", tc.left, got, tc.want)
		}
	}
}

// TestNodeCuttingItsReplyIsNotEjected: a node that sent the head of its
// reply answered, though its body broke off: the caller gets a 502, and
// the node stays in selection, as any node that answers does.
func TestNodeCuttingItsReplyIsNotEjected(t *testing.T) {
	s, srv := testSidecar(t, nil)
	register(t, s, "go.micro.srv.cut", brokenNode(t, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"jsonrpc\""))
	for i := range 3 {
		code, body := post(t, srv.URL+"/rpc", "application/json", `{"service":"go.micro.srv.cut","method":"Cut.Call","request":{}}`)
		if code != http.StatusBadGateway || !strings.Contains(body, "reading the reply") {
			t.Fatalf("call %d: %d %s; want 502 naming the cut reply, not the node ejected", i, code, body)
		}
	}
	if n := s.rpc.sel.ejections.Load(); n != 0 {
		t.Errorf("%d ejections; want none", n)
	}
}

// TestNodeCuttingItsHeadIsNotEjected: a node that sends part of its
// answer's head and closes answered, if brokenly: a 502 naming the cut
// head, on /rpc and both proxy paths, and no ejection. It was ejected as a
// failing connection, with a bare "EOF", unless its garbage ended in a
// line end.
func TestNodeCuttingItsHeadIsNotEjected(t *testing.T) {
	for _, partial := range []string{"hello", "HTTP/1.1 200 OK\r\n", "HTTP/1.1 200 OK\r\nContent-Type: app"} {
		s, srv := testSidecar(t, nil)
		register(t, s, "go.micro.srv.cut", brokenNode(t, partial))
		for i := range 2 {
			code, body := post(t, srv.URL+"/rpc", "application/json", `{"service":"go.micro.srv.cut","method":"Cut.Call","request":{}}`)
			if code != http.StatusBadGateway || !strings.Contains(body, "in the middle of its head") {
				t.Errorf("%q, call %d: %d %s; want 502 naming the cut head", partial, i, code, body)
			}
		}
		for _, te := range []string{"", "trailers"} { // the direct path; ReverseProxy
			req, _ := http.NewRequest("GET", srv.URL+"/proxy/go.micro.srv.cut/x", nil)
			req.Header.Set("TE", te)
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadGateway || !strings.Contains(string(body), "malformed HTTP response") { // Go's transport names "hello" itself
				t.Errorf("%q, proxied, TE %q: %d %s; want 502 naming the cut head", partial, te, resp.StatusCode, body)
			}
		}
		if n := s.rpc.sel.ejections.Load(); n != 0 {
			t.Errorf("%q: %d ejections; want none", partial, n)
		}
	}
}

// TestCodedAndMultipartBodiesAre415: no route reads a body in a content
// coding: a 415 naming the coding, with Accept-Encoding: identity, where a
// gzip body was a 400 about a bad form escape or bad JSON; a multipart body
// on POST /{service}/{method} is a 415, as on /rpc, not "not JSON".
func TestCodedAndMultipartBodiesAre415(t *testing.T) {
	s, srv := testSidecar(t, nil)
	register(t, s, "go.micro.srv.example", newJSONRPCApp(t, "a").addr())
	gz := "\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\xabV\xcaK\xccMU\xb2R\xf0\xca\xcf\xcbS\xaa\x05\x00"
	for _, tc := range []struct{ path, ct, ce, body, want string }{
		{"/rpc", "", "gzip", gz, "Content-Encoding gzip"},
		{"/rpc", "application/json", "gzip", gz, "Content-Encoding gzip"},
		{"/example/call", "application/json", "gzip", gz, "Content-Encoding gzip"},
		{"/registry", "application/json", "identity, br", gz, "Content-Encoding br"},
		{"/example/call", "multipart/form-data; boundary=x", "", "--x\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nJohn\r\n--x--\r\n", "multipart bodies are not supported"},
	} {
		req, _ := http.NewRequest("POST", srv.URL+tc.path, strings.NewReader(tc.body))
		req.Header.Set("Content-Type", tc.ct)
		if tc.ce != "" {
			req.Header.Set("Content-Encoding", tc.ce)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusUnsupportedMediaType || !strings.Contains(string(body), tc.want) {
			t.Errorf("%s, %q, coding %q: %d %s; want 415 saying %q", tc.path, tc.ct, tc.ce, resp.StatusCode, body, tc.want)
		}
		if got := resp.Header.Get("Accept-Encoding"); tc.ce != "" && got != "identity" {
			t.Errorf("%s, coding %q: Accept-Encoding %q; want identity", tc.path, tc.ce, got)
		}
	}
	if code, body := post(t, srv.URL+"/example/call", "application/json", `{"name":"John"}`, "Content-Encoding", "identity"); code != http.StatusOK {
		t.Errorf("Content-Encoding identity: %d %s; want the call made", code, body)
	}
}

// TestRPCSeriesAreBounded: calls to services the registry does not know
// share one series, whatever names clients make up, and the series of a
// service gone are dropped once idle for a round of tidying.
func TestRPCSeriesAreBounded(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := newJSONRPCApp(t, "a")
	register(t, s, "go.micro.srv.kept", app.addr())
	register(t, s, "go.micro.srv.gone", app.addr())
	call := func(body string) {
		t.Helper()
		post(t, srv.URL+"/rpc", "application/json", body)
	}
	for i := range 50 {
		call(fmt.Sprintf(`{"service":"made.up.%d","method":"A.B"}`, i))
		call(fmt.Sprintf(`{"service":"made.up.direct.%d","method":"A.B","address":%q}`, i, app.addr()))
	}
	call(`{"service":"go.micro.srv.kept","method":"A.B"}`)
	call(`{"service":"go.micro.srv.gone","method":"A.B"}`)
	services := func() []string {
		var out []string
		for _, series := range s.metrics.rpcLatency.series.sorted() {
			out = append(out, series.values[0])
		}
		return slices.Compact(out)
	}
	if got, want := services(), []string{"_unregistered", "go.micro.srv.gone", "go.micro.srv.kept"}; !slices.Equal(got, want) {
		t.Fatalf("series for %v; want %v", got, want)
	}
	if err := s.reg.Deregister(Service{Name: "go.micro.srv.gone", Nodes: []Node{{ID: "go.micro.srv.gone-0"}}}); err != nil {
		t.Fatal(err)
	}
	keep := func(values []string) bool { return s.reg.table.has(values[0]) }
	s.metrics.rpcLatency.pruneIdle(keep) // all were used since they began: kept
	if got := services(); len(got) != 3 {
		t.Fatalf("after a first round: %v; want all three, each used since", got)
	}
	s.metrics.rpcLatency.pruneIdle(keep) // idle since: the gone service's goes
	if got, want := services(), []string{"go.micro.srv.kept"}; !slices.Equal(got, want) {
		t.Errorf("after an idle round: %v; want %v", got, want)
	}
}

// TestSweepDropsConnectionsTheNodeClosed: an idle connection whose node
// closed it (an app that exited) is closed at the next sweep, not held
// with its file descriptor until it is old.
func TestSweepDropsConnectionsTheNodeClosed(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := newJSONRPCApp(t, "a")
	register(t, s, "go.micro.srv.a", app.addr())
	if code, body := post(t, srv.URL+"/rpc", "application/json", `{"service":"go.micro.srv.a","method":"A.B"}`); code != 200 {
		t.Fatalf("call: %d %s", code, body)
	}
	nc := s.rpc.nodes
	// A healthy connection stays, though the deadline its last call left
	// on it has passed.
	nc.mu.Lock()
	for _, list := range nc.idle {
		for _, c := range list {
			c.conn.SetDeadline(time.Now().Add(-time.Second))
		}
	}
	nc.mu.Unlock()
	nc.sweep()
	nc.mu.Lock()
	kept := nc.nIdle
	nc.mu.Unlock()
	if kept != 1 {
		t.Fatalf("%d idle connections after a sweep; want the healthy one kept", kept)
	}
	app.srv.CloseClientConnections() // the app goes; its end of the kept connection closes
	waitIdleUnfit(t, s, "the app's close")
	nc.sweep()
	nc.mu.Lock()
	defer nc.mu.Unlock()
	if nc.nIdle != 0 {
		t.Errorf("%d idle connections after the sweep; want the closed one dropped", nc.nIdle)
	}
}

// TestAppsOwnNotFoundIsItsService: a registered service that answers its
// own 404 (a go-micro NotFound) is counted under its name; only a service
// the registry does not know is _unregistered.
func TestAppsOwnNotFoundIsItsService(t *testing.T) {
	s, srv := testSidecar(t, nil)
	app := appServer(t, func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		msg, _ := json.Marshal(`{"id":"go.micro.srv.users","code":404,"detail":"user 7 not found","status":"Not Found"}`)
		fmt.Fprintf(w, `{"jsonrpc":"2.0","id":1,"error":{"code":-32000,"message":%s}}`, msg)
	})
	register(t, s, "go.micro.srv.users", hostOf(app))
	if code, body := post(t, srv.URL+"/rpc", "application/json", `{"service":"go.micro.srv.users","method":"Users.Get"}`); code != 404 || !strings.Contains(body, "user 7 not found") {
		t.Fatalf("call: %d %s; want the app's 404", code, body)
	}
	for _, series := range s.metrics.rpcLatency.series.sorted() {
		if got := strings.Join(series.values, ","); got != "go.micro.srv.users,404" {
			t.Errorf("series %q; want go.micro.srv.users,404 alone", got)
		}
	}
}
