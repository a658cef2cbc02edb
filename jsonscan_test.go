package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"reflect"
	"strings"
	"testing"
	"testing/iotest"
)

func TestValidJSON(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
	}{
		{`{"name":"John"}`, true},
		{` [1, -2.5e+3, "a\u00e9\n", true, false, null, {}] `, true},
		{`"x"`, true},
		{`0`, true},
		{``, false},
		{`{"a":1,}`, false},
		{`{"a" 1}`, false},
		{`01`, false},
		{`1.`, false},
		{`-`, false},
		{`"\x"`, false},
		{`"\u12g4"`, false},
		{"\"a\tb\"", false},
		{`[1] [2]`, false},
		{`tru`, false},
	} {
		if got := validJSON([]byte(tc.in)); got != tc.want || got != json.Valid([]byte(tc.in)) {
			t.Errorf("validJSON(%q) = %v; want %v", tc.in, got, tc.want)
		}
	}
}

func TestReplyMembers(t *testing.T) {
	for _, tc := range []struct {
		in                 string
		id, result, errVal string
		ok                 bool
	}{
		{`{"jsonrpc":"2.0","id":7,"result":{"msg":"hi"}}`, `7`, `{"msg":"hi"}`, ``, true},
		{` { "id" : "7" , "error" : {"code":-1,"message":"x"} , "result" : null } `, `"7"`, `null`, `{"code":-1,"message":"x"}`, true},
		{`{"result":1,"result":2}`, ``, `2`, ``, true}, // the last counts, as in encoding/json
		{`{}`, ``, ``, ``, true},
		{`{"Result":1}`, ``, ``, ``, false}, // encoding/json matches keys in any case: left to it
		{`{"res\u0075lt":1}`, ``, ``, ``, false},
		{`[1]`, ``, ``, ``, false},
		{`{"result":1} x`, ``, ``, ``, false},
	} {
		id, result, errVal, ok := replyMembers([]byte(tc.in))
		if ok != tc.ok || string(id) != tc.id || string(result) != tc.result || string(errVal) != tc.errVal {
			t.Errorf("replyMembers(%s) = %s, %s, %s, %v; want %s, %s, %s, %v", tc.in, id, result, errVal, ok, tc.id, tc.result, tc.errVal, tc.ok)
		}
	}
}

// FuzzJSONScan: the scanner accepts what encoding/json accepts, and finds
// the members encoding/json decodes.
func TestJSONNestsDeeper(t *testing.T) {
	deep := strings.Repeat(`{"a":`, 20000) + "1" + strings.Repeat("}", 20000)
	for _, tc := range []struct {
		json string
		want bool
	}{
		{`[[1]]`, false},
		{`[[[1]]]`, true},
		{`[[1],[2],{"a":1}]`, false},
		{`{"a":{"b":{}}}`, true},
		{`["[[[[", "\"[[[["]`, false},    // brackets in strings, an escaped quote
		{`["\\", [[1]]]`, true},          // an escaped backslash ends no string
		{`[[[`, true},                    // not JSON, and too deep all the same
		{deep, true},                     // past encoding/json's own depth
		{deep[:len(deep)-1] + "]", true}, // and broken besides
	} {
		if got := jsonNestsDeeper([]byte(tc.json), 2); got != tc.want {
			t.Errorf("jsonNestsDeeper(%.40q, 2) = %v; want %v", tc.json, got, tc.want)
		}
	}
}

func FuzzJSONScan(f *testing.F) {
	for _, s := range []string{`{"jsonrpc":"2.0","id":1,"result":{"a":[1,2,{"b":null}]}}`, `{"id":"1","error":"boom"}`, `[1,"\u00e9",-0.5e-3]`, `{"a":{"b":{"c":{}}}}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if got, want := validJSON(b), json.Valid(b); got != want {
			t.Fatalf("validJSON(%q) = %v; json.Valid says %v", b, got, want)
		}
		for _, limit := range []int{1, 2, 5} {
			// scanJSONValue fails past limit when it starts limit levels
			// short of maxJSONDepth.
			if got, want := jsonNestsDeeper(b, limit), scanJSONValue(b, 0, maxJSONDepth-limit) < 0; json.Valid(b) && got != want {
				t.Fatalf("jsonNestsDeeper(%q, %d) = %v; the scanner says %v", b, limit, got, want)
			}
		}
		id, result, errVal, ok := replyMembers(b)
		if !ok {
			return
		}
		wid, wresult, werr, err := decodeReply(b)
		if err != nil {
			t.Fatalf("replyMembers took %q, which encoding/json refuses: %v", b, err)
		}
		if !bytes.Equal(id, wid) || !bytes.Equal(result, wresult) || !bytes.Equal(errVal, werr) {
			t.Fatalf("%q: members %s %s %s; encoding/json %s %s %s", b, id, result, errVal, wid, wresult, werr)
		}
	})
}

// FuzzResponseHead: the RPC client reads a response head as net/http does,
// where both accept it.
func FuzzResponseHead(f *testing.F) {
	for _, s := range []string{
		"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n",
		"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
		"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n",
		"HTTP/1.1 204 No Content\r\nX-A: b\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		checkHeadWholeOrInPieces(t, b)
		var header []string
		got, err := readResponseHeader(bufio.NewReader(bytes.NewReader(b)), &header)
		if err != nil {
			return
		}
		if got.code < 100 || got.code > 999 || len(header)%2 != 0 {
			t.Fatalf("%q: code %d, %d header strings", b, got.code, len(header))
		}
		want, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(b)), nil)
		if err != nil {
			return // net/http is stricter about some heads; the client then reports what came
		}
		chunked := len(want.TransferEncoding) > 0 && want.TransferEncoding[0] == "chunked"
		if !bodyAllowedForStatus(got.code) {
			chunked = got.chunked // no body is read after these, framed or not
		}
		if got.code != want.StatusCode || got.chunked != chunked || !chunked && bodyAllowedForStatus(got.code) && want.ContentLength >= 0 && got.contentLength != want.ContentLength {
			t.Fatalf("%q: code %d chunked %v length %d; net/http %d %v %d", b, got.code, got.chunked, got.contentLength, want.StatusCode, chunked, want.ContentLength)
		}
		// A body of no stated length ends with the connection: the body
		// readers close after it, net/http says so in Close.
		unbounded := bodyAllowedForStatus(got.code) && !got.chunked && got.contentLength < 0
		if got.close != want.Close && !(unbounded && want.Close) {
			t.Fatalf("%q: close %v; net/http %v", b, got.close, want.Close)
		}
	})
}

// TestResponseHeadFraming: how a node's head frames its body and whether
// its connection may carry another call, as net/http's Transport decides.
func TestResponseHeadFraming(t *testing.T) {
	for _, tc := range []struct {
		head           string
		chunked, close bool
		err            string
	}{
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n", false, true, ""},
		{"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\n\r\n", false, true, ""},
		{"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", false, false, ""},
		{"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", false, true, ""},
		{"HTTP/1.0 200 OK\r\n\r\n", false, true, ""},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n", true, false, ""},
		{"HTTP/1.0 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false, true, ""}, // no codings in HTTP/1.0: ignored
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n", false, false, "Transfer-Encoding other than chunked"},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false, false, "Transfer-Encoding other than chunked"},
		{"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", false, false, "Transfer-Encoding other than chunked"},
		{"HTTP/1.1 200 OK\r\nX-Long: " + strings.Repeat("t", 9000) + "\r\nConnection: close\r\n\r\n", false, true, ""}, // a line longer than bufio's buffer
	} {
		got, err := readResponseHeader(bufio.NewReader(strings.NewReader(tc.head)), nil)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: error %v; want %q", tc.head, err, tc.err)
			}
			continue
		}
		if err != nil || got.chunked != tc.chunked || got.close != tc.close {
			t.Errorf("%q: chunked %v close %v, %v; want chunked %v close %v", tc.head, got.chunked, got.close, err, tc.chunked, tc.close)
		}
	}
}

// A head read where it lies in the buffer and one that arrives a byte at a
// time, line by line through bufio, read the same, errors included.
func TestResponseHeadWholeOrInPieces(t *testing.T) {
	for _, head := range []string{
		"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nDate: Fri, 27 Nov 2026 09:30:00 GMT\r\nContent-Length: 52\r\n\r\n{}",
		"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
		"HTTP/1.0 200 OK\nConnection: keep-alive\nX-A:  b \n\n",
		"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n", // no chunked coding in HTTP/1.0, however it arrives
		"HTTP/1.1 204 No Content\r\nX-A: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
		"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
		"HTTP/2 200\r\n\r\n",
		"HTTP/1.1 200 OK\r\nX-Cut: off",
		"",
		"HTTP/1.1 200 OK\r\nSet-Cookie: s=" + strings.Repeat("t", 9000) + "\r\nContent-Length: 0\r\n\r\n", // a line longer than bufio's buffer
		"HTTP/1.1 200 OK\r\nX-Long: " + strings.Repeat("t", 9000),
	} {
		checkHeadWholeOrInPieces(t, []byte(head))
	}
}

// checkHeadWholeOrInPieces reads head from one buffer and a byte at a time,
// and fails unless both read the same.
func checkHeadWholeOrInPieces(t *testing.T, head []byte) {
	t.Helper()
	read := func(r *bufio.Reader) (responseHead, []string, string) {
		var header []string
		h, err := readResponseHeader(r, &header)
		return h, header, fmt.Sprint(err)
	}
	h1, l1, e1 := read(bufio.NewReader(bytes.NewReader(head)))
	h2, l2, e2 := read(bufio.NewReader(iotest.OneByteReader(bytes.NewReader(head))))
	if h1 != h2 || !reflect.DeepEqual(l1, l2) || e1 != e2 {
		t.Errorf("%q: whole %+v %q %s; in pieces %+v %q %s", head, h1, l1, e1, h2, l2, e2)
	}
}
