package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

func TestCheckNames(t *testing.T) {
	for _, tc := range []struct {
		topic, queue string
		want         string // "" for valid
	}{
		{"foo", "", ""},
		{"go.micro.topic.foo", "workers", ""},
		{"a:b_c-d.E9", "g-1", ""},
		{strings.Repeat("t", maxTopicLen), strings.Repeat("q", maxQueueLen), ""},
		{"", "", "topic is required"},
		{"f o", "", `topic "f o"`},
		{"a/b", "", `topic "a/b"`},
		{"naïve", "", "topic"},
		{strings.Repeat("t", maxTopicLen+1), "", "topic"},
		{"foo", "g h", `queue "g h"`},
		{"foo", strings.Repeat("q", maxQueueLen+1), "queue"},
		{"foo", "*", "queue"},
	} {
		err := checkNames(tc.topic, tc.queue)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("checkNames(%q, %q) = %v; want nil", truncate(tc.topic, 20), tc.queue, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("checkNames(%q, %q) = %v; want an error containing %q", truncate(tc.topic, 20), tc.queue, err, tc.want)
		}
	}
}

func TestClassify(t *testing.T) {
	for _, tc := range []struct {
		ct      string
		body    string
		kind    int
		dct     string
		wantErr bool
	}{
		{"", "hello", payloadText, "text/plain", false},
		{"", "\xff\xfe", payloadBinary, "application/octet-stream", false},
		{"text/plain; charset=utf-8", "hé", payloadText, "text/plain; charset=utf-8", false},
		{"text/plain; charset=US-ASCII", "hi", payloadText, "text/plain; charset=US-ASCII", false},
		{"text/plain; charset=iso-8859-1", "\xc3\xa9", payloadBinary, "text/plain; charset=iso-8859-1", false}, // valid UTF-8 too, but Latin-1's "Ã©"
		{"text/plain; charset=utf-16le", "h\x00i\x00", payloadBinary, "text/plain; charset=utf-16le", false},
		{"application/json", `{"a":[1,2]}`, payloadJSON, "application/json", false},
		{"application/cloudevents+json", `"x"`, payloadJSON, "application/cloudevents+json", false},
		{"application/json", `{"a":`, 0, "", true},
		{"application/json", "\"\xe9\"", 0, "", true}, // JSON to json.Valid, not UTF-8
		{"application/json", `"é"`, payloadJSON, "application/json", false},
		{"application/octet-stream", "text", payloadBinary, "application/octet-stream", false},
		{"image/png", "\x89PNG\xff", payloadBinary, "image/png", false},
		{"application/xml", "<a/>", payloadText, "application/xml", false},
		{"not a type;;", "x", 0, "", true},
		{"bogus", "x", 0, "", true},
		{"text/plain; x=" + strings.Repeat("a", maxContentTypeLen), "x", 0, "", true}, // the event would pass what peers take
		{"application/json", strings.Repeat("[", maxJSONDepth) + strings.Repeat("]", maxJSONDepth), 0, "", true},
		{"application/json", strings.Repeat("[", maxJSONDepth-1) + strings.Repeat("]", maxJSONDepth-1), payloadJSON, "application/json", false},
	} {
		kind, dct, err := classify(tc.ct, []byte(tc.body))
		if (err != nil) != tc.wantErr || err == nil && (kind != tc.kind || dct != tc.dct) {
			t.Errorf("classify(%q, %q) = %d, %q, %v; want %d, %q, error %v", tc.ct, tc.body, kind, dct, err, tc.kind, tc.dct, tc.wantErr)
		}
	}
}

// TestDeepPayloadToldTooDeep: JSON nested deeper than a publish takes is
// told so, also past encoding/json's own depth, where json.Valid says
// only that it is not valid.
func TestDeepPayloadToldTooDeep(t *testing.T) {
	for _, depth := range []int{maxJSONDepth, maxJSONDepth + 1, 20000} {
		body := strings.Repeat(`{"a":`, depth) + "1" + strings.Repeat("}", depth)
		_, _, err := classify("application/json", []byte(body))
		if want := fmt.Sprintf("nests deeper than %d levels", maxJSONDepth-1); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("JSON %d levels deep: %v; want %q", depth, err, want)
		}
	}
	if _, _, err := classify("application/json", []byte(`{"a":`)); err == nil || !strings.Contains(err.Error(), "is not valid JSON") {
		t.Errorf("broken JSON: %v; want it called not valid", err)
	}
}

// TestDeepestPayloadReachesPeers: the most deeply nested JSON a publish
// takes still reads as an event at a peer, one level deeper inside it.
func TestDeepestPayloadReachesPeers(t *testing.T) {
	body := []byte(strings.Repeat("[", maxJSONDepth-1) + strings.Repeat("]", maxJSONDepth-1))
	kind, dct, err := classify("application/json", body)
	if err != nil {
		t.Fatal(err)
	}
	event := encodeEvent("id-1", "sidecar-1", "deep", time.Now(), kind, dct, body)
	var head struct{ Topic string }
	if err := json.Unmarshal(event, &head); err != nil || head.Topic != "deep" {
		t.Errorf("the event of the deepest payload taken: %v; want it read", err)
	}
}

func TestEncodeEvent(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 600, time.FixedZone("x", 3600))
	for _, tc := range []struct {
		kind    int
		dct     string
		payload string
		data    string // JSON of data, or "" for none
		b64     string
	}{
		{payloadText, "text/plain", "hello world", `"hello world"`, ""},
		{payloadText, "text/plain", "<\"quoted\"> & more\n", `"<\"quoted\"> & more\n"`, ""}, // no HTML escapes: data's bytes as sent
		{payloadJSON, "application/json", `{"html":"<b>"}`, `{"html":"<b>"}`, ""},
		{payloadJSON, "application/json", `{"a": [1, 2]}`, `{"a":[1,2]}`, ""},
		{payloadBinary, "application/octet-stream", "\x00\x01\xff", "", "AAH/"},
		{payloadText, "text/plain", "", `""`, ""},
	} {
		raw := encodeEvent("id-1", "/micro/s", "foo", at, tc.kind, tc.dct, []byte(tc.payload))
		var ev map[string]json.RawMessage
		if err := json.Unmarshal(raw, &ev); err != nil {
			t.Fatalf("event %s is not JSON: %v", raw, err)
		}
		want := map[string]string{"specversion": `"1.0"`, "id": `"id-1"`, "source": `"/micro/s"`, "type": `"micro.broker.message"`,
			"time": `"2026-01-02T02:04:05.0000006Z"`, "topic": `"foo"`, "datacontenttype": fmt.Sprintf("%q", tc.dct)}
		if tc.data != "" {
			want["data"] = tc.data
		}
		if tc.b64 != "" {
			want["data_base64"] = fmt.Sprintf("%q", tc.b64)
		}
		got := map[string]string{}
		for k, v := range ev {
			got[k] = string(v)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("payload %q: got %v; want %v", tc.payload, got, want)
		}
	}
}

func TestAppendFrameHeader(t *testing.T) {
	for _, tc := range []struct {
		n    int
		want []byte
	}{
		{0, []byte{0x81, 0}},
		{125, []byte{0x81, 125}},
		{126, []byte{0x81, 126, 0, 126}},
		{65535, []byte{0x81, 126, 0xff, 0xff}},
		{65536, []byte{0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0}},
	} {
		if got := appendFrameHeader(nil, websocket.TextFrame, tc.n); !bytes.Equal(got, tc.want) {
			t.Errorf("header for %d bytes: got % x; want % x", tc.n, got, tc.want)
		}
	}
}

func TestPlanDelivery(t *testing.T) {
	peers := []peerNode{
		{addr: "10.0.0.2:8081", queue: ""},
		{addr: "10.0.0.2:8081", queue: "g"},
		{addr: "10.0.0.3:8081", queue: "g"},
		{addr: "10.0.0.3:8081", queue: "h"},
	}
	for _, tc := range []struct {
		name        string
		broadcast   bool
		localGroups []string
		peers       []peerNode
		rr          uint64
		want        deliveryPlan
	}{
		{"alone", true, nil, nil, 0, deliveryPlan{local: localDelivery{broadcast: true}}},
		{"local group only", false, []string{"g"}, nil, 7, deliveryPlan{local: localDelivery{groups: []string{"g"}}}},
		{"turn of this sidecar", true, []string{"g"}, peers, 0, deliveryPlan{
			local: localDelivery{broadcast: true, groups: []string{"g"}},
			forwards: []forwardPlan{
				{addr: "10.0.0.2:8081", localDelivery: localDelivery{broadcast: true}},
				{addr: "10.0.0.3:8081", localDelivery: localDelivery{groups: []string{"h"}}},
			}}},
		{"turn of the first peer", true, []string{"g"}, peers, 1, deliveryPlan{
			local: localDelivery{broadcast: true},
			forwards: []forwardPlan{
				{addr: "10.0.0.2:8081", localDelivery: localDelivery{broadcast: true, groups: []string{"g"}}},
				{addr: "10.0.0.3:8081", localDelivery: localDelivery{groups: []string{"h"}}},
			}}},
		{"turn of the second peer", false, []string{"g"}, peers, 2, deliveryPlan{
			forwards: []forwardPlan{
				{addr: "10.0.0.2:8081", localDelivery: localDelivery{broadcast: true}},
				{addr: "10.0.0.3:8081", localDelivery: localDelivery{groups: []string{"g", "h"}}},
			}}},
		{"no local members", false, nil, peers[1:3], 5, deliveryPlan{
			forwards: []forwardPlan{{addr: "10.0.0.3:8081", localDelivery: localDelivery{groups: []string{"g"}}}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := planDelivery(tc.broadcast, tc.localGroups, tc.peers, tc.rr)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("planDelivery(%v, %v, %v, %d):\n got %+v\nwant %+v", tc.broadcast, tc.localGroups, tc.peers, tc.rr, got, tc.want)
			}
		})
	}
	// Over a full turn every candidate gets the group exactly once.
	counts := map[string]int{}
	for rr := range uint64(3 * 10) {
		p := planDelivery(false, []string{"g"}, peers, rr)
		if slices := p.local.groups; len(slices) == 1 {
			counts["self"]++
		}
		for _, f := range p.forwards {
			if len(f.groups) > 0 && f.groups[0] == "g" {
				counts[f.addr]++
			}
		}
	}
	if want := map[string]int{"self": 10, "10.0.0.2:8081": 10, "10.0.0.3:8081": 10}; !reflect.DeepEqual(counts, want) {
		t.Errorf("group g over 30 messages: got %v; want %v", counts, want)
	}
}

func TestPeersOf(t *testing.T) {
	node := func(id, addr string, port int, md map[string]string) Node {
		md["broker"] = "1"
		return Node{ID: id, Address: addr, Port: port, Metadata: md}
	}
	app := Node{ID: "app", Address: "10.0.0.9", Port: 9090, Metadata: map[string]string{}} // an app that named a service topic:foo
	versions := []Service{{Name: "topic:foo", Nodes: []Node{
		node("me", "10.0.0.1", 8081, map[string]string{"sidecar": "me"}),
		node("old-me", "10.0.0.1", 8081, map[string]string{"sidecar": "old-me"}), // a stale entry of an earlier run here
		node("b:g", "10.0.0.3", 8081, map[string]string{"sidecar": "b", "queue": "g"}),
		node("a", "10.0.0.2", 8081, map[string]string{"sidecar": "a"}),
		node("v6", "::1", 9000, map[string]string{"sidecar": "c"}),
		app,
	}}}
	got, refused := peersOf(versions, "me", "10.0.0.1:8081", "")
	want := []peerNode{{addr: "10.0.0.2:8081", id: "a"}, {addr: "10.0.0.3:8081", queue: "g", id: "b"}, {addr: "[::1]:9000", id: "c"}}
	if !reflect.DeepEqual(got, want) || !reflect.DeepEqual(refused, []Node{app}) {
		t.Errorf("peersOf: got %v, refused %v; want %v, refused the app", got, refused, want)
	}
}

// TestPeersOfWithATokenWantsProof: a sidecar with a token forwards only to
// entries made by a holder of the token for where they send and what for.
// Anyone who can write the registry could otherwise announce an entry and
// receive the token and every message of a topic, in plain HTTP at will.
func TestPeersOfWithATokenWantsProof(t *testing.T) {
	const token = "secret"
	entry := func(id, scheme, host string, port int, queue, proofToken string) Node {
		n := Node{ID: id, Address: host, Port: port, Metadata: map[string]string{"broker": "1", "sidecar": id, "scheme": scheme}}
		if queue != "" {
			n.Metadata["queue"] = queue
		}
		if proofToken != "" {
			n.Metadata["auth"] = peerProof(proofToken, id, scheme, n.hostPort(), "orders", queue)
		}
		return n
	}
	good := entry("b", "https", "10.0.0.2", 8081, "g", token)
	moved := entry("c", "https", "10.0.0.3", 8081, "", token)
	moved.Port = 9999 // the proof of another address
	downgraded := entry("d", "https", "10.0.0.4", 8081, "", token)
	downgraded.Metadata["scheme"] = "http"
	requeued := entry("e", "https", "10.0.0.5", 8081, "g", token)
	requeued.Metadata["queue"] = "h"
	versions := []Service{{Name: "topic:orders", Nodes: []Node{
		good, moved, downgraded, requeued,
		entry("f", "http", "10.0.0.6", 8081, "", ""),      // no proof: no token, or an earlier release
		entry("g", "http", "10.0.0.7", 8081, "", "other"), // another token
	}}}
	got, refused := peersOf(versions, "me", "10.0.0.1:8081", token)
	if want := []peerNode{{addr: "https://10.0.0.2:8081", queue: "g", id: "b"}}; !reflect.DeepEqual(got, want) {
		t.Errorf("peers: got %v; want %v", got, want)
	}
	if len(refused) != 5 {
		t.Errorf("refused %d entries; want 5: %v", len(refused), refused)
	}
	// The proof is for the topic it was made for.
	other := []Service{{Name: "topic:other", Nodes: []Node{good}}}
	if got, _ := peersOf(other, "me", "10.0.0.1:8081", token); len(got) != 0 {
		t.Errorf("an entry moved to another topic: got %v; want none", got)
	}
}

// TestWithoutDownKeepsGroupsOffFailedPeers: a peer that is down gets no
// queue-group messages while the group has another member, and still
// gets its broadcast ones.
func TestWithoutDownKeepsGroupsOffFailedPeers(t *testing.T) {
	peers := []peerNode{
		{addr: "a:1"}, {addr: "a:1", queue: "g"}, {addr: "a:1", queue: "solo"},
		{addr: "b:1", queue: "g"},
	}
	down := func(p peerNode) bool { return p.addr == "a:1" }
	got := withoutDown(peers, nil, down)
	want := []peerNode{{addr: "a:1"}, {addr: "a:1", queue: "solo"}, {addr: "b:1", queue: "g"}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("got %v; want %v (g moves to b; solo, with no other member, and the broadcast entry stay)", got, want)
	}
	if got := withoutDown(peers[1:2], []string{"g"}, down); len(got) != 0 {
		t.Errorf("a local member of g: got %v; want the down peer left out", got)
	}
}

// TestLogLimiter: one line per key and interval, each key on its own.
func TestLogLimiter(t *testing.T) {
	l := logLimiter{every: time.Hour}
	if !l.allow("a") || l.allow("a") || !l.allow("b") {
		t.Error("want the first of each key through and the repeat held back")
	}
	always := logLimiter{every: 0}
	first, second := always.allow("a"), always.allow("a")
	if !first || !second {
		t.Error("with no interval every line goes through")
	}
	// More keys than it holds, over and over (entries refused at every
	// refresh): each is said once in the interval, however many there are.
	many := logLimiter{every: time.Hour}
	said := 0
	for range 5 {
		for i := range maxLogKeys + 100 {
			if many.allow(fmt.Sprint("entry-", i)) {
				said++
			}
		}
	}
	if said != maxLogKeys || len(many.last) > maxLogKeys {
		t.Errorf("%d lines for %d keys, 5 rounds, holding %d; want %d, one per key it holds", said, maxLogKeys+100, len(many.last), maxLogKeys)
	}
	// Once the interval has passed, room is made for new keys.
	for k := range many.last {
		many.last[k] = time.Now().Add(-2 * time.Hour)
	}
	many.fullUntil = time.Time{}
	if !many.allow("late") || len(many.last) != 1 {
		t.Errorf("a new key after the interval: held %d keys; want the lapsed ones gone and it through", len(many.last))
	}
}

// TestPlanNamesTheSidecarsAtEachAddress: a forward names the sidecars the
// registry has at its address, so that one there that is none of them (a
// stale entry, under another spelling of its address) can refuse it.
func TestPlanNamesTheSidecarsAtEachAddress(t *testing.T) {
	peers := []peerNode{
		{addr: "127.0.0.1:8082", id: "new"},
		{addr: "127.0.0.1:8082", id: "old", queue: "g"},
		{addr: "localhost:8082", id: "older"},
	}
	plan := planDelivery(false, nil, peers, 0)
	got := map[string][]string{}
	for _, f := range plan.forwards {
		got[f.addr] = f.ids
	}
	if want := map[string][]string{"127.0.0.1:8082": {"new", "old"}, "localhost:8082": {"older"}}; !reflect.DeepEqual(got, want) {
		t.Errorf("ids by address: got %v; want %v", got, want)
	}
}

func TestForwardBatchRoundTrip(t *testing.T) {
	ev := func(topic string) []byte {
		return encodeEvent("i", "/s", topic, time.Unix(0, 0), payloadText, "text/plain", []byte("line\nbreak"))
	}
	notUTF8 := bytes.Replace(ev("foo"), []byte("line"), []byte("\xff\xfe"), 1)
	items := []forwardItem{
		{topic: "foo", broadcast: true, event: ev("foo")},
		{topic: "bar", groups: []string{"g", "h"}, event: ev("bar")},
	}
	got, err := decodeForward(encodeForward(nil, items), 1<<20)
	if err != nil || !reflect.DeepEqual(got, items) {
		t.Fatalf("round trip: got %+v, %v; want %+v", got, err, items)
	}
	for _, tc := range []struct{ name, body string }{
		{"no newline", "foo b 2"},
		{"short", "foo b 100\n{}\n"},
		{"bad flag", "foo x 2\n{}\n"},
		{"bad topic", "f/o b 2\n{}\n"},
		{"bad group", "foo - 2 g/h\n{}\n"},
		{"not an event", "foo b 2\n{}\n"},
		{"wrong topic", "bar b " + fmt.Sprint(len(ev("foo"))) + "\n" + string(ev("foo")) + "\n"},
		{"negative", "foo b -1\n\n"},
		{"length at the limit of int", "foo b 9223372036854775807\n{}\n"},
		{"not UTF-8", "foo b " + fmt.Sprint(len(notUTF8)) + "\n" + string(notUTF8) + "\n"},
		{"header line too long", "foo - 2" + strings.Repeat(" g", maxForwardLine/2) + "\n{}\n"},
		{"a group named twice", "foo - " + fmt.Sprint(len(ev("foo"))) + " g h g\n" + string(ev("foo")) + "\n"},
	} {
		if _, err := decodeForward([]byte(tc.body), 1<<20); err == nil {
			t.Errorf("%s: decodeForward(%q) succeeded; want an error", tc.name, tc.body)
		}
	}
}

func TestForwardEventOverTheLimit(t *testing.T) {
	ev := encodeEvent("i", "/s", "foo", time.Unix(0, 0), payloadText, "text/plain", []byte(strings.Repeat("x", 100)))
	body := encodeForward(nil, []forwardItem{{topic: "foo", broadcast: true, event: ev}})
	if _, err := decodeForward(body, int64(len(ev))); err != nil {
		t.Errorf("an event at the limit: %v", err)
	}
	if items, err := decodeForward(body, int64(len(ev)-1)); err != nil || len(items) != 1 || items[0].refused == "" {
		t.Errorf("an event past the limit: %+v, %v; want the item refused, not the batch", items, err)
	}
	// A sender of an earlier release reads no refused items: it gets the
	// batch refused whole, as before, and counts the loss itself.
	s, _ := brokerSidecar(t, brokerConfig{MaxPayloadBytes: 16})
	big := encodeEvent("i", "/s", "foo", time.Unix(0, 0), payloadText, "text/plain", []byte(strings.Repeat("x", 200_000)))
	batch := encodeForward(nil, []forwardItem{{topic: "foo", broadcast: true, event: ev}, {topic: "foo", broadcast: true, event: big}})
	if _, err := s.broker.fwd.receive(batch, false); err == nil {
		t.Error("an older sender's batch with an event over the limit was taken; want it refused whole")
	}
	if ans, err := s.broker.fwd.receive(batch, true); err != nil || len(ans.Refused) != 1 || ans.Refused[0].Item != 1 || ans.Delivered != 1 {
		t.Errorf("a rerouting sender's batch: %+v, %v; want item 1 refused and the other delivered", ans, err)
	}
}

// TestSplitGroups: an item for more queue groups than a header line holds
// goes as several, each within the line's limit, each group in one of
// them, the broadcast in the first alone.
func TestSplitGroups(t *testing.T) {
	ev := encodeEvent("i", "/s", "foo", time.Unix(0, 0), payloadText, "text/plain", []byte("x"))
	var groups []string
	for i := range 250 {
		groups = append(groups, fmt.Sprintf("group-%058d", i)) // 64 characters, the longest
	}
	pieces := splitGroups(forwardItem{topic: "foo", broadcast: true, groups: groups, event: ev})
	if len(pieces) < 2 {
		t.Fatalf("%d pieces for %d long groups; want them split", len(pieces), len(groups))
	}
	var got []string
	for i, p := range pieces {
		if p.broadcast != (i == 0) {
			t.Errorf("piece %d: broadcast %v", i, p.broadcast)
		}
		body := encodeForward(nil, []forwardItem{p})
		if line := bytes.IndexByte(body, '\n'); line > maxForwardLine {
			t.Errorf("piece %d: a header line of %d bytes", i, line)
		}
		if len(body) != p.encodedSize() {
			t.Errorf("piece %d: encodedSize %d, encoded %d", i, p.encodedSize(), len(body))
		}
		if _, err := decodeForward(body, 1<<20); err != nil {
			t.Errorf("piece %d does not decode: %v", i, err)
		}
		got = append(got, p.groups...)
	}
	if !reflect.DeepEqual(got, groups) {
		t.Errorf("the pieces carry %d groups; want the %d given, once each", len(got), len(groups))
	}
	one := splitGroups(forwardItem{topic: "foo", groups: groups[:3], event: ev})
	if len(one) != 1 {
		t.Errorf("3 groups in %d pieces; want 1", len(one))
	}
	// A failed batch counts messages lost, not pieces.
	if n := messagesIn(append(pieces, one...)); n != 2 {
		t.Errorf("a batch of one message in %d pieces and one whole: %d messages; want 2", len(pieces), n)
	}
}

// FuzzDecodeForward: a batch from a peer never panics the decoder, and what
// decodes encodes back to the same items.
func FuzzDecodeForward(f *testing.F) {
	ev := encodeEvent("i", "/s", "foo", time.Unix(0, 0), payloadText, "text/plain", []byte("x"))
	f.Add(encodeForward(nil, []forwardItem{{topic: "foo", broadcast: true, groups: []string{"g"}, event: ev}}))
	f.Add([]byte("foo b 2\n{}\n"))
	f.Add([]byte("foo b 9223372036854775807\n{}\n"))
	f.Fuzz(func(t *testing.T, body []byte) {
		items, err := decodeForward(body, 1<<20)
		if err != nil {
			return
		}
		again, err := decodeForward(encodeForward(nil, items), 1<<20)
		if err != nil || len(again) != len(items) {
			t.Fatalf("re-encoded batch does not decode: %v", err)
		}
		for i := range items {
			if !bytes.Equal(items[i].event, again[i].event) || items[i].topic != again[i].topic || items[i].broadcast != again[i].broadcast {
				t.Fatalf("item %d changed in a round trip", i)
			}
		}
	})
}

// FuzzEncodeEvent: whatever a client publishes, with whatever content type
// or frame type, is either refused with an error or becomes a valid
// CloudEvent whose data gives back exactly what was published.
func FuzzEncodeEvent(f *testing.F) {
	f.Add("", []byte("hello world"), false)
	f.Add("application/json", []byte(`{"a":1}`), false)
	f.Add("text/plain", []byte("\xff"), false)
	f.Add("", []byte{0, 1, 2}, true)
	f.Fuzz(func(t *testing.T, contentType string, body []byte, binaryFrame bool) {
		kind, dct, err := classify(contentType, body)
		if binaryFrame { // a WebSocket binary frame
			kind, dct, err = payloadBinary, "application/octet-stream", nil
		}
		if err != nil {
			return
		}
		raw := encodeEvent("id", "/s", "t", time.Unix(1, 0), kind, dct, body)
		// A peer takes it byte for byte, within the bound it sets for a
		// payload the size of body.
		items, err := decodeForward(encodeForward(nil, []forwardItem{{topic: "t", broadcast: true, groups: []string{"g"}, event: raw}}), maxEventFor(max(len(body), 1)))
		if err != nil || len(items) != 1 || items[0].refused != "" || !bytes.Equal(items[0].event, raw) || !slices.Equal(items[0].groups, []string{"g"}) {
			t.Fatalf("a peer refuses the event of %q %q: %v %+v", contentType, body, err, items)
		}
		var ev struct {
			Data       json.RawMessage `json:"data"`
			DataBase64 *string         `json:"data_base64"`
			Topic      string          `json:"topic"`
		}
		if err := json.Unmarshal(raw, &ev); err != nil || ev.Topic != "t" {
			t.Fatalf("event %q is not valid: %v", raw, err)
		}
		switch kind {
		case payloadText:
			var s string
			if err := json.Unmarshal(ev.Data, &s); err != nil || s != string(body) {
				t.Fatalf("text %q came back as %q (%v)", body, s, err)
			}
		case payloadJSON:
			var want, got bytes.Buffer
			json.Compact(&want, body)
			json.Compact(&got, ev.Data)
			var a, b any
			json.Unmarshal(want.Bytes(), &a)
			json.Unmarshal(got.Bytes(), &b)
			if !reflect.DeepEqual(a, b) {
				t.Fatalf("JSON %q came back as %q", body, ev.Data)
			}
		case payloadBinary:
			if ev.DataBase64 == nil {
				t.Fatalf("binary %q has no data_base64: %s", body, raw)
			}
			if got, err := base64.StdEncoding.DecodeString(*ev.DataBase64); err != nil || !bytes.Equal(got, body) {
				t.Fatalf("binary %q came back as %q", body, got)
			}
		}
	})
}

func TestResolveAdvertise(t *testing.T) {
	ifaces := []net.Addr{
		&net.IPNet{IP: net.ParseIP("127.0.0.1"), Mask: net.CIDRMask(8, 32)},
		&net.IPNet{IP: net.ParseIP("fe80::1"), Mask: net.CIDRMask(64, 128)},
		&net.IPNet{IP: net.ParseIP("2001:db8::5"), Mask: net.CIDRMask(64, 128)},
		&net.IPNet{IP: net.ParseIP("192.168.1.7"), Mask: net.CIDRMask(24, 32)},
	}
	any4 := &net.TCPAddr{IP: net.IPv4zero, Port: 8081}
	for _, tc := range []struct {
		name, flag string
		bound      *net.TCPAddr
		server     string
		ifaces     []net.Addr
		want       string
	}{
		{"flag with port", "10.1.1.1:9000", any4, "", ifaces, "10.1.1.1:9000"},
		{"flag host only", "node1.internal", any4, "", ifaces, "node1.internal:8081"},
		{"flag IPv6 in capitals", "[2001:DB8::7]:9000", any4, "", ifaces, "[2001:db8::7]:9000"},
		{"flag IPv4-mapped", "::ffff:192.0.2.7", any4, "", ifaces, "192.0.2.7:8081"},
		{"flag IPv6 in brackets, no port", "[2001:db8::7]", any4, "", ifaces, "[2001:db8::7]:8081"},
		{"all interfaces, app at an IPv6 in capitals", "", any4, "[2001:DB8::9]:9090", ifaces, "[2001:db8::9]:8081"},
		{"specific bind", "", &net.TCPAddr{IP: net.ParseIP("127.0.0.1"), Port: 5555}, "10.0.0.9:80", ifaces, "127.0.0.1:5555"},
		{"ipv6 bind", "", &net.TCPAddr{IP: net.ParseIP("::1"), Port: 5555}, "", ifaces, "[::1]:5555"},
		{"all interfaces, app address", "", any4, "10.0.0.9:9090", ifaces, "10.0.0.9:8081"},
		{"all interfaces, app on all too", "", any4, "0.0.0.0:9090", ifaces, "192.168.1.7:8081"},
		{"all interfaces, no app", "", any4, "", ifaces, "192.168.1.7:8081"},
		{"ipv6 only interfaces", "", any4, "", ifaces[:3], "[2001:db8::5]:8081"},
		{"loopback only", "", any4, "", ifaces[:1], "127.0.0.1:8081"},
	} {
		if got := resolveAdvertise(tc.flag, tc.bound, tc.server, tc.ifaces); got != tc.want {
			t.Errorf("%s: resolveAdvertise(%q, %v, %q) = %q; want %q", tc.name, tc.flag, tc.bound, tc.server, got, tc.want)
		}
	}
	for _, bad := range []string{"0.0.0.0", "[::]:80", "host:99999", "a b", "::::", "a:b:c", "1.2.3.4.5", "[host]", "-bad-", "224.0.0.251"} {
		if checkAdvertise(bad) == nil {
			t.Errorf("checkAdvertise(%q) = nil; want an error", bad)
		}
	}
	for _, good := range []string{"10.0.0.5", "10.0.0.5:8081", "[::1]", "[::1]:8081", "::1", "node-1.internal", "node_1:9000"} {
		if err := checkAdvertise(good); err != nil {
			t.Errorf("checkAdvertise(%q) = %v; want none", good, err)
		}
	}
}

// testSidecar runs a sidecar's routes in this process, so that the race
// detector watches the broker.
// brokerSidecar is an in-process sidecar with broker settings bc (zero
// fields take the defaults), its broker running, served on loopback.
func brokerSidecar(t *testing.T, bc brokerConfig) (*sidecar, string) {
	t.Helper()
	s, srv := testSidecar(t, func(c *config) { c.Broker = bc })
	s.broker.advertise = srv.Listener.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { s.broker.run(ctx); close(done) }()
	t.Cleanup(func() {
		cancel()
		<-done
		sctx, c := context.WithTimeout(context.Background(), 5*time.Second)
		defer c()
		s.conns.closeAll(sctx)
		s.broker.close(sctx)
		// Every message a queue or writer took was given back.
		waitFor(t, 5*time.Second, "the broker to hold no message", func() bool {
			s.broker.fwd.mu.Lock()
			defer s.broker.fwd.mu.Unlock()
			return s.broker.held.Load() == 0 && s.broker.fwd.held == 0
		})
	})
	return s, srv.Listener.Addr().String()
}

// rawWS is a WebSocket client that shows everything the server sends,
// close codes included, which x/net/websocket's client hides.
type rawWS struct {
	conn net.Conn
	br   *bufio.Reader
}

func dialRaw(t *testing.T, addr, path string) *rawWS {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	var key [16]byte
	rand.Read(key[:])
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
		path, addr, base64.StdEncoding.EncodeToString(key[:]))
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake for %s: %v %v", path, resp, err)
	}
	return &rawWS{conn: conn, br: br}
}

// next returns the next frame's opcode and payload.
func (r *rawWS) next(timeout time.Duration) (byte, []byte, error) {
	r.conn.SetReadDeadline(time.Now().Add(timeout))
	var h [2]byte
	if _, err := io.ReadFull(r.br, h[:]); err != nil {
		return 0, nil, err
	}
	n := int(h[1] & 0x7f)
	switch n {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return 0, nil, err
		}
		n = int(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return 0, nil, err
		}
		n = int(binary.BigEndian.Uint64(l[:]))
	}
	p := make([]byte, n)
	_, err := io.ReadFull(r.br, p)
	return h[0] & 0x0f, p, err
}

// closeCode reads until the close frame and returns its code and reason;
// data frames before it are skipped.
func (r *rawWS) closeCode(t *testing.T) (int, string) {
	t.Helper()
	code, reason, err := r.readClose()
	if err != nil {
		t.Fatalf("reading until the close frame: %v", err)
	}
	return code, reason
}

func (r *rawWS) readClose() (int, string, error) {
	for {
		op, p, err := r.next(10 * time.Second)
		if err != nil {
			return 0, "", err
		}
		if op == websocket.CloseFrame && len(p) >= 2 {
			return int(binary.BigEndian.Uint16(p)), string(p[2:]), nil
		}
	}
}

// send writes one masked frame, as a client must.
func (r *rawWS) send(t *testing.T, op byte, p []byte) {
	t.Helper()
	r.sendFrame(t, 0x80|op, p)
}

// sendFrame writes one masked frame whose first byte (FIN, reserved bits,
// opcode) is b0.
func (r *rawWS) sendFrame(t *testing.T, b0 byte, p []byte) {
	t.Helper()
	f := appendFrameHeader(nil, 0, len(p))
	f[0] = b0
	f[1] |= 0x80
	f = append(f, 1, 2, 3, 4)
	for i, b := range p {
		f = append(f, b^[]byte{1, 2, 3, 4}[i%4])
	}
	if _, err := r.conn.Write(f); err != nil {
		t.Fatal(err)
	}
}

func TestInProcessPublishSubscribe(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	var subs []*websocket.Conn
	for _, q := range []string{"", "", "&queue=g", "&queue=g"} {
		c, err := websocket.Dial("ws://"+addr+"/broker?topic=foo"+q, "", "http://"+addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		subs = append(subs, c)
	}
	waitFor(t, 5*time.Second, "four subscribers", func() bool { return s.broker.stats.Published.Load() == 0 && subCount(s.broker) == 4 })
	const n = 20
	for i := range n {
		resp, err := http.Post("http://"+addr+"/broker?topic=foo", "text/plain", strings.NewReader(fmt.Sprint(i)))
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("publish: %v %v", resp, err)
		}
		resp.Body.Close()
	}
	var mu sync.Mutex // guards counts
	counts := make([]int, len(subs))
	for i, c := range subs {
		go func() {
			for {
				var ev cloudEvent
				if websocket.JSON.Receive(c, &ev) != nil {
					return
				}
				mu.Lock()
				counts[i]++
				mu.Unlock()
			}
		}()
	}
	waitFor(t, 10*time.Second, "every message", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return counts[0] == n && counts[1] == n && counts[2]+counts[3] == n
	})
	mu.Lock()
	defer mu.Unlock()
	if counts[2] == 0 || counts[3] == 0 {
		t.Errorf("deliveries per subscriber: %v; want the group's spread over both members", counts)
	}
}

// subscriberAt returns the subscriber whose client is at remote.
func subscriberAt(t *testing.T, b *broker, remote string) *subscriber {
	t.Helper()
	var found *subscriber
	waitFor(t, 5*time.Second, "the subscriber at "+remote, func() bool {
		b.mu.RLock()
		defer b.mu.RUnlock()
		for s := range b.subs {
			if s.remote == remote {
				found = s
			}
		}
		return found != nil
	})
	return found
}

func subCount(b *broker) int {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return len(b.subs)
}

// --broker_memory_bytes bounds what all queues hold together: past it, the
// subscribers holding the most (queued, and in the batch their writer is
// stuck on) are closed as slow, naming the flag, while those that keep up
// stay, even when they are the ones adding the message that passes it.
func TestBrokerMemoryBytesBoundsAllQueues(t *testing.T) {
	const memory = 1 << 20
	s, addr := brokerSidecar(t, brokerConfig{QueueSize: 1000, QueueBytes: 64 << 20, MemoryBytes: memory, MaxPayloadBytes: 64 << 10})
	stuck := []*rawWS{dialRaw(t, addr, "/broker?topic=a"), dialRaw(t, addr, "/broker?topic=b")}
	fast := dialRaw(t, addr, "/broker?topic=c")
	waitFor(t, 5*time.Second, "three subscribers", func() bool { return subCount(s.broker) == 3 })
	var stuckSubs []*subscriber
	for _, c := range stuck {
		stuckSubs = append(stuckSubs, subscriberAt(t, s.broker, c.conn.LocalAddr().String()))
	}
	fastSub := subscriberAt(t, s.broker, fast.conn.LocalAddr().String())
	go func() { // the fast one reads everything, at once
		for {
			if _, _, err := fast.next(10 * time.Second); err != nil {
				return
			}
		}
	}()
	payload := []byte(strings.Repeat("x", 60<<10))
	// The stuck ones fill their sockets, until their writers are blocked
	// with messages waiting behind them ...
	for i, sub := range stuckSubs {
		waitFor(t, 10*time.Second, "a stuck writer to block", func() bool {
			s.broker.publish([]string{"a", "b"}[i], payloadText, "text/plain", payload)
			sub.mu.Lock()
			defer sub.mu.Unlock()
			return sub.writing.Load() && len(sub.q) > 0
		})
	}
	// ... then the memory, while the fast one gets bursts: whichever
	// message passes the bound, the stuck ones hold the most.
	for i := 0; s.broker.stats.SlowClosed.Load() == 0; i++ {
		if i > 2000 {
			t.Fatal("no subscriber was closed as slow")
		}
		s.broker.publish([]string{"a", "b"}[i%2], payloadText, "text/plain", payload)
		for range 4 {
			s.broker.publish("c", payloadText, "text/plain", payload)
		}
		waitFor(t, 5*time.Second, "the fast one to keep up", func() bool { n, _ := fastSub.holding(); return n == 0 })
	}
	if fastSub.isClosing() {
		t.Error("the subscriber that keeps up was closed; want the ones holding the memory")
	}
	closed := 0
	for _, sub := range stuckSubs {
		sub.mu.Lock()
		if sub.closing {
			closed++
			if sub.closeCode != closeTryAgainLater || !strings.Contains(sub.closeReason, "--broker_memory_bytes") {
				t.Errorf("closed with %d %q; want 1013 naming --broker_memory_bytes", sub.closeCode, sub.closeReason)
			}
		}
		sub.mu.Unlock()
	}
	if closed == 0 {
		t.Error("no stuck subscriber closed; want those that held the most")
	}
	// Its stuck writer gives up within closeGrace, and what it held comes back.
	waitFor(t, 10*time.Second, "the memory under the bound", func() bool { return s.broker.held.Load() <= memory })
	s.broker.publish("c", payloadText, "text/plain", payload)
	if fastSub.isClosing() {
		t.Error("the subscriber that keeps up was closed after")
	}
}

// A queue group's message that overflows one member goes to another: it
// is delivered, not dropped. Dropped are the messages that were waiting in
// the slow member's queue, which overflows by count here: QueueSize.
func TestGroupOverflowCountsEachMessageOnce(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{QueueSize: 8, QueueBytes: 64 << 20, MaxPayloadBytes: 64 << 10})
	stuck := dialRaw(t, addr, "/broker?topic=flood&queue=g")
	fast := dialRaw(t, addr, "/broker?topic=flood&queue=g")
	waitFor(t, 5*time.Second, "two members", func() bool { return subCount(s.broker) == 2 })
	go func() { // the fast member reads everything
		for {
			if _, _, err := fast.next(10 * time.Second); err != nil {
				return
			}
		}
	}()
	fastSub := subscriberAt(t, s.broker, fast.conn.LocalAddr().String())
	payload := []byte(strings.Repeat("x", 60<<10))
	published := 0
	publish := func() {
		s.broker.publish("flood", payloadText, "text/plain", payload)
		published++
		waitFor(t, 10*time.Second, "the fast member's queue to empty", func() bool {
			fastSub.mu.Lock()
			defer fastSub.mu.Unlock()
			return len(fastSub.q) == 0
		})
	}
	for s.broker.stats.SlowClosed.Load() == 0 {
		if published > 2000 {
			t.Fatal("the stuck member was never closed as slow")
		}
		publish()
	}
	for range 5 { // and a few after it, all to the fast member
		publish()
	}
	st := &s.broker.stats
	if got := st.Delivered.Load() + st.NoSubscriber.Load(); got != uint64(published) {
		t.Errorf("delivered %d + no_subscriber %d = %d; want the %d published, each once",
			st.Delivered.Load(), st.NoSubscriber.Load(), got, published)
	}
	if got := st.SlowDropped.Load(); got != 8 {
		t.Errorf("slow_dropped %d; want the 8 waiting in the slow member's queue", got)
	}
	stuck.conn.Close()
}

func TestInProcessOverflowAndLimits(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{QueueSize: 8, MaxPayloadBytes: 64 << 10, MaxSubscribers: 3})
	stuck := dialRaw(t, addr, "/broker?topic=flood")
	fast := dialRaw(t, addr, "/broker?topic=flood")
	waitFor(t, 5*time.Second, "two subscribers", func() bool { return subCount(s.broker) == 2 })
	// Fill the stuck subscriber's socket and queue: it never reads.
	payload := strings.Repeat("x", 60<<10)
	got := 0
	for i := 0; s.broker.stats.SlowClosed.Load() == 0; i++ {
		if i > 2000 {
			t.Fatal("the stuck subscriber was never closed as slow")
		}
		s.broker.publish("flood", payloadText, "text/plain", []byte(payload))
		for { // the fast one keeps up
			_, _, err := fast.next(5 * time.Second)
			if err != nil {
				t.Fatalf("fast subscriber after %d messages: %v", got, err)
			}
			got++
			if got == i+1 {
				break
			}
		}
	}
	// Each message was for both: the one that overflowed the stuck
	// queue counts delivered as it counts dropped, so that delivered less
	// slow_dropped is what subscribers got.
	if d := s.broker.stats.Delivered.Load(); d != uint64(2*got) {
		t.Errorf("delivered %d of %d messages for 2 subscribers; want %d", d, got, 2*got)
	}
	waitFor(t, 10*time.Second, "the slow subscriber to go", func() bool { return subCount(s.broker) == 1 })
	stuck.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.Copy(io.Discard, stuck.br) // ends: with a close frame or a reset, depending on where its writer was
	if s.broker.stats.SlowDropped.Load() == 0 {
		t.Error("dropped messages not counted")
	}

	// Oversized frames close with 1009.
	big := dialRaw(t, addr, "/broker?topic=big")
	big.send(t, websocket.TextFrame, make([]byte, 64<<10+1))
	if code, reason := big.closeCode(t); code != closeTooBig || !strings.Contains(reason, "--broker_max_payload_bytes") {
		t.Errorf("oversized frame: close %d %q; want 1009 naming the flag", code, reason)
	}
	big.conn.Close()
	waitFor(t, 5*time.Second, "the oversized sender to go", func() bool { return subCount(s.broker) == 1 })

	// The subscriber limit answers 503 before upgrading.
	dialRaw(t, addr, "/broker?topic=a")
	dialRaw(t, addr, "/broker?topic=b")
	waitFor(t, 5*time.Second, "three subscribers", func() bool { return subCount(s.broker) == 3 })
	c, _, err := websocketDialStatus(addr, "/broker?topic=c")
	if err != nil || c != http.StatusServiceUnavailable {
		t.Errorf("beyond --broker_max_subscribers: got %d %v; want 503", c, err)
	}
}

// websocketDialStatus attempts an upgrade and returns the HTTP status.
func websocketDialStatus(addr, path string) (int, string, error) {
	req, _ := http.NewRequest("GET", "http://"+addr+path, nil)
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body), nil
}

// TestSilentSubscriberReapedAfterThreeQuietChecks: the keepalive check
// runs once a ping interval; a subscriber that sends nothing, not even a
// pong, is pinged at each check it was quiet through and closed at the
// third, so it is never taken for dead before three intervals of silence
// (counted from its handshake, as from any read).
func TestSilentSubscriberReapedAfterThreeQuietChecks(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Hour})
	c := dialRaw(t, addr, "/broker?topic=foo") // answers nothing, pings included
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	waitFor(t, 5*time.Second, "the handshake", subscriberAt(t, s.broker, c.conn.LocalAddr().String()).isReady) // keepalive skips it before
	for check := 1; check <= 3; check++ {
		s.broker.keepalive()
		if subCount(s.broker) != 1 || s.broker.stats.Reaped.Load() != 0 {
			t.Fatalf("reaped at check %d after the handshake; want the fourth", check)
		}
	}
	s.broker.keepalive()
	waitFor(t, 5*time.Second, "the silent subscriber to be reaped", func() bool { return subCount(s.broker) == 0 && s.broker.stats.Reaped.Load() == 1 })
}

// TestFragmentedMessagesAreJoined: a message sent in fragments, with a
// ping between them, is published once, whole; the ping is answered.
func TestFragmentedMessagesAreJoined(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{})
	c := dialRaw(t, addr, "/broker?topic=frag")
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	c.sendFrame(t, websocket.TextFrame, []byte("hel"))                // FIN clear: more to come
	c.sendFrame(t, 0x80|websocket.PingFrame, []byte("are you there")) // control frames may come between fragments
	c.sendFrame(t, websocket.ContinuationFrame, []byte("lo, "))
	c.sendFrame(t, 0x80|websocket.ContinuationFrame, []byte("world"))
	op, p, err := c.next(5 * time.Second)
	if err != nil || op != websocket.PongFrame || string(p) != "are you there" {
		t.Fatalf("after a ping: frame %d %q, %v; want a pong with its payload", op, p, err)
	}
	op, p, err = c.next(5 * time.Second)
	var ev struct{ Data string }
	if err != nil || op != websocket.TextFrame || json.Unmarshal(p, &ev) != nil || ev.Data != "hello, world" {
		t.Fatalf("the fragmented message came back as %d %s, %v; want one event with hello, world", op, p, err)
	}
	if n := s.broker.stats.Published.Load(); n != 1 {
		t.Errorf("%d messages published; want 1", n)
	}
}

// TestBadFramesFailTheConnection: what RFC 6455 says must fail the
// connection does, with 1002; a message over the limit in fragments, each
// under it, with 1009.
func TestBadFramesFailTheConnection(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{MaxPayloadBytes: 1000})
	for _, tc := range []struct {
		name   string
		frames [][2][]byte // first byte, payload
		code   int
	}{
		{"continuation with nothing to continue", [][2][]byte{{{0x80 | websocket.ContinuationFrame}, []byte("x")}}, closeProtocolError},
		{"reserved opcode", [][2][]byte{{{0x80 | 3}, []byte("x")}}, closeProtocolError},
		{"reserved bit", [][2][]byte{{{0x80 | 0x40 | websocket.TextFrame}, []byte("x")}}, closeProtocolError},
		{"long ping", [][2][]byte{{{0x80 | websocket.PingFrame}, bytes.Repeat([]byte("p"), 126)}}, closeProtocolError},
		{"fragmented ping", [][2][]byte{{{websocket.PingFrame}, []byte("p")}}, closeProtocolError},
		{"new message inside another", [][2][]byte{{{websocket.TextFrame}, []byte("a")}, {{0x80 | websocket.TextFrame}, []byte("b")}}, closeProtocolError},
		{"too big in fragments", [][2][]byte{{{websocket.TextFrame}, bytes.Repeat([]byte("a"), 600)}, {{0x80 | websocket.ContinuationFrame}, bytes.Repeat([]byte("a"), 600)}}, closeTooBig},
	} {
		c := dialRaw(t, addr, "/broker?topic=bad")
		for _, f := range tc.frames {
			c.sendFrame(t, f[0][0], f[1])
		}
		if code, reason, err := c.readClose(); err != nil || code != tc.code {
			t.Errorf("%s: close %d %q, %v; want %d", tc.name, code, reason, err, tc.code)
		}
	}
	if n := s.broker.stats.Published.Load(); n != 0 {
		t.Errorf("%d messages published from bad frames; want none", n)
	}
}

// TestWatchReadsFramesAsTheBrokerDoes: the registry watch fails what RFC
// 6455 says must fail the connection, as the broker does, answers a ping
// with its payload, and closes a message over 4 KiB with 1009.
func TestWatchReadsFramesAsTheBrokerDoes(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	for _, tc := range []struct {
		name   string
		frames [][2][]byte // first byte, payload
		code   int
	}{
		{"reserved opcode", [][2][]byte{{{0x80 | 3}, []byte("x")}}, closeProtocolError},
		{"reserved bit", [][2][]byte{{{0x80 | 0x40 | websocket.TextFrame}, []byte("x")}}, closeProtocolError},
		{"long ping", [][2][]byte{{{0x80 | websocket.PingFrame}, bytes.Repeat([]byte("p"), 126)}}, closeProtocolError},
		{"continuation with nothing to continue", [][2][]byte{{{0x80 | websocket.ContinuationFrame}, []byte("x")}}, closeProtocolError},
		{"too big", [][2][]byte{{{0x80 | websocket.TextFrame}, bytes.Repeat([]byte("a"), 5000)}}, closeTooBig},
	} {
		c := dialRaw(t, addr, "/registry?watch=1")
		for _, f := range tc.frames {
			c.sendFrame(t, f[0][0], f[1])
		}
		if code, reason, err := c.readClose(); err != nil || code != tc.code {
			t.Errorf("%s: close %d %q, %v; want %d", tc.name, code, reason, err, tc.code)
		}
	}
	c := dialRaw(t, addr, "/registry?watch=1")
	c.send(t, websocket.PingFrame, []byte("are you there"))
	for {
		op, p, err := c.next(5 * time.Second)
		if err != nil {
			t.Fatalf("waiting for the pong: %v", err)
		}
		if op == websocket.PongFrame {
			if string(p) != "are you there" {
				t.Errorf("pong %q; want the ping's payload", p)
			}
			break
		}
	}
}

// TestClientCloseIsAnswered: a client that closes gets a close frame back
// (RFC 6455 section 5.5.1), on the broker and on the registry watch, so
// that its onclose sees a clean 1000 and not 1006.
func TestClientCloseIsAnswered(t *testing.T) {
	_, addr := brokerSidecar(t, brokerConfig{})
	for _, path := range []string{"/broker?topic=foo", "/registry?watch=1"} {
		c := dialRaw(t, addr, path)
		c.send(t, websocket.CloseFrame, []byte{0x03, 0xe8}) // 1000
		code, _, err := c.readClose()
		if err != nil || code != closeNormal {
			t.Errorf("%s: after the client's close: %d, %v; want a close frame with 1000", path, code, err)
		}
	}
}

func TestInProcessShutdownGoingAwayAndPings(t *testing.T) {
	s, addr := brokerSidecar(t, brokerConfig{PingInterval: time.Hour})
	c := dialRaw(t, addr, "/broker?topic=foo")
	waitFor(t, 5*time.Second, "the subscriber", func() bool { return subCount(s.broker) == 1 })
	sub := subscriberAt(t, s.broker, c.conn.LocalAddr().String())
	// keepalive skips a subscriber still in its handshake: counted is not
	// yet ready, and a round then would leave the next unpinged.
	waitFor(t, 5*time.Second, "the handshake", sub.isReady)
	s.broker.keepalive() // the handshake was read since the last check: not pinged
	s.broker.keepalive() // quiet since: pinged
	if op, _, err := c.next(5 * time.Second); err != nil || op != websocket.PingFrame {
		t.Fatalf("after a quiet round: frame %d, %v; want a ping", op, err)
	}
	c.send(t, websocket.PongFrame, nil)
	waitFor(t, 5*time.Second, "the pong to be read", func() bool { return s.broker.subsSeen() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	go s.conns.closeAll(ctx)
	if code, reason := c.closeCode(t); code != closeGoingAway || reason != "sidecar shutting down" {
		t.Errorf("on shutdown: close %d %q; want 1001", code, reason)
	}
}

// subsSeen reports whether every subscriber was heard from since the last
// keepalive round.
func (b *broker) subsSeen() bool {
	b.mu.RLock()
	defer b.mu.RUnlock()
	for s := range b.subs {
		if !s.readSeen.Load() {
			return false
		}
	}
	return true
}

// FuzzWSRoundTrip: any sequence of messages, framed in any fragments
// with pings between and any length encoding, masked as a client masks,
// reads back as exactly those messages, then the close.
func FuzzWSRoundTrip(f *testing.F) {
	f.Add([]byte("hello"), []byte{3, 0, 1}, uint32(0x01020304))
	f.Add([]byte("\xff\x00abc"), []byte{1, 2, 0x81}, uint32(7))
	f.Fuzz(func(t *testing.T, payload []byte, plan []byte, maskSeed uint32) {
		const limit = 4096
		if len(payload) > limit {
			return
		}
		mask := [4]byte{byte(maskSeed >> 24), byte(maskSeed >> 16), byte(maskSeed >> 8), byte(maskSeed)}
		frame := func(b0 byte, p []byte, ext int) []byte {
			var fr []byte
			fr = append(fr, b0)
			switch { // ext forces a longer length encoding than needed (RFC allows any)
			case len(p) <= 125 && ext == 0:
				fr = append(fr, 0x80|byte(len(p)))
			case len(p) <= 0xffff && ext <= 1:
				fr = append(fr, 0x80|126, byte(len(p)>>8), byte(len(p)))
			default:
				fr = append(fr, 0x80|127, 0, 0, 0, 0, byte(len(p)>>24), byte(len(p)>>16), byte(len(p)>>8), byte(len(p)))
			}
			fr = append(fr, mask[:]...)
			for i, c := range p {
				fr = append(fr, c^mask[i&3])
			}
			return fr
		}
		// Messages: payload cut at the plan's bytes; each plan byte's top bit
		// says binary, bit 6 a ping before the next fragment, low bits the
		// fragment count.
		var stream []byte
		var want []wsMessage
		rest := payload
		for _, p := range plan {
			binaryMsg := p&0x80 != 0 || !utf8.Valid(rest)
			frags := int(p&0x07) + 1
			var msg []byte
			n := min(len(rest), int(p&0x38)*3)
			msg, rest = rest[:n], rest[n:]
			if !binaryMsg && !utf8.Valid(msg) {
				binaryMsg = true
			}
			op := byte(websocket.TextFrame)
			if binaryMsg {
				op = websocket.BinaryFrame
			}
			for i := 0; i < frags; i++ {
				lo, hi := len(msg)*i/frags, len(msg)*(i+1)/frags
				b0 := op
				if i > 0 {
					b0 = websocket.ContinuationFrame
				}
				if i == frags-1 {
					b0 |= 0x80
				}
				stream = append(stream, frame(b0, msg[lo:hi], int(p>>6&1)*(i%3))...)
				if p&0x40 != 0 && i < frags-1 {
					stream = append(stream, frame(0x80|websocket.PingFrame, []byte("p"), 0)...)
				}
			}
			want = append(want, wsMessage{data: append([]byte{}, msg...), binary: binaryMsg})
		}
		stream = append(stream, frame(0x80|websocket.CloseFrame, []byte{0x03, 0xe8}, 0)...)
		pings := 0
		r := &wsReader{br: bufio.NewReader(bytes.NewReader(stream)), max: limit, onPing: func([]byte) error { pings++; return nil }}
		for i, w := range want {
			m, err := r.next()
			if err != nil || m.binary != w.binary || !bytes.Equal(m.data, w.data) {
				t.Fatalf("message %d: %q binary %v, %v; want %q binary %v", i, m.data, m.binary, err, w.data, w.binary)
			}
		}
		if _, err := r.next(); err != errPeerClosed || r.closeCode != 1000 {
			t.Fatalf("after the messages: %v code %d; want the close 1000", err, r.closeCode)
		}
	})
}

// FuzzWSReader feeds any bytes to the broker's frame reader: it must not
// panic, and no message it returns may exceed its limit.
func FuzzWSReader(f *testing.F) {
	masked := func(b0 byte, p string) []byte {
		fr := appendFrameHeader(nil, 0, len(p))
		fr[0], fr[1] = b0, fr[1]|0x80
		fr = append(fr, 1, 2, 3, 4)
		for i := range len(p) {
			fr = append(fr, p[i]^[]byte{1, 2, 3, 4}[i%4])
		}
		return fr
	}
	f.Add(masked(0x80|websocket.TextFrame, "hello"))
	f.Add(append(masked(websocket.TextFrame, "hel"), append(masked(0x80|websocket.PingFrame, "x"), masked(0x80|websocket.ContinuationFrame, "lo")...)...))
	f.Add(masked(0x80|websocket.CloseFrame, "\x03\xe8"))
	f.Add([]byte{0x81, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4})
	// A fragment whose length would wrap the running total past zero.
	f.Add(append(masked(websocket.TextFrame, "0123456789"), 0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfb, 1, 2, 3, 4))
	f.Fuzz(func(t *testing.T, data []byte) {
		const limit = 4096
		r := &wsReader{br: bufio.NewReader(bytes.NewReader(data)), max: limit, onPing: func([]byte) error { return nil }}
		for {
			m, err := r.next()
			if errors.Is(err, errPeerClosed) && r.closeCode != 0 && !sendableCloseCode(r.closeCode) {
				t.Fatalf("a close with code %d taken", r.closeCode)
			}
			if err != nil {
				return
			}
			if len(m.data) > limit {
				t.Fatalf("a message of %d bytes; the limit is %d", len(m.data), limit)
			}
			if !m.binary && !utf8.Valid(m.data) {
				t.Fatalf("a text message not UTF-8: %q", m.data)
			}
		}
	})
}

// TestPeerCacheKeepsTopicsWithPeers: when the forwarder's cache of peer
// lists is full, the topics without peers go, and a topic with peers keeps
// its round-robin position.
func TestPeerCacheKeepsTopicsWithPeers(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	f := s.broker.fwd
	if err := s.reg.Register(Service{Name: topicService + "live", Nodes: []Node{{ID: "peer", Address: "127.0.0.2", Port: 1, Metadata: map[string]string{"broker": "1", "sidecar": "peer"}}}}, 0); err != nil {
		t.Fatal(err)
	}
	peers, rr := f.peersFor("live")
	if len(peers) != 1 {
		t.Fatalf("peers of live: %v; want the registered one", peers)
	}
	rr.Store(7)
	for i := range maxPeerCache {
		f.peersFor(fmt.Sprintf("nobody.%d", i))
	}
	if _, rr := f.peersFor("live"); rr.Load() != 7 {
		t.Errorf("round-robin position %d after the cache filled; want 7 kept", rr.Load())
	}
}

// TestForwardQueuesShareTheMemoryBound: what waits for peers, or is being
// posted to them, counts against --broker_memory_bytes too; past it,
// forwards are refused (and counted as dropped by the caller).
func TestForwardQueuesShareTheMemoryBound(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{MemoryBytes: 1000})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var conns []net.Conn
	var mu sync.Mutex
	go func() { // a peer that takes the batch and never answers
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	defer func() { // the post in flight fails, and the worker ends
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()
	f := s.broker.fwd
	event := []byte(strings.Repeat("x", 600))
	if err := f.enqueue(ln.Addr().String(), forwardItem{topic: "t", broadcast: true, event: event}); err != nil {
		t.Fatal("the first forward was refused:", err)
	}
	if err := f.enqueue("127.0.0.1:1", forwardItem{topic: "t", broadcast: true, event: event}); err != errForwardMemory {
		t.Errorf("a forward past --broker_memory_bytes, with the first in flight: %v; want refused", err)
	}
}

// TestRerouteLeavesOutPeersKnownDown: P's backoff has just ended, Q is
// known to be down, R takes batches. Group messages planned to P, refused
// at connect, go to R, never to Q, where a second refusal would lose them
// (a message is rerouted once).
func TestRerouteLeavesOutPeersKnownDown(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	f := s.broker.fwd
	var atR atomic.Int64
	r := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		items, err := decodeForward(body, 1<<30)
		if err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		for _, it := range items {
			atR.Add(int64(len(it.groups)))
		}
		fmt.Fprintf(w, `{"delivered":%d}`, len(items))
	}))
	defer r.Close()
	closedPort := func() int {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().(*net.TCPAddr).Port
	}
	entry := func(id string, port int) Node {
		return Node{ID: id + ":g", Address: "127.0.0.1", Port: port, Metadata: map[string]string{"broker": "1", "sidecar": id, "scheme": "http", "queue": "g"}}
	}
	pPort, qPort := closedPort(), closedPort()
	if err := s.reg.Register(Service{Name: "topic:orders", Nodes: []Node{
		entry("p", pPort), entry("q", qPort), entry("r", r.Listener.Addr().(*net.TCPAddr).Port),
	}}, time.Minute); err != nil {
		t.Fatal(err)
	}
	f.downMu.Lock()
	f.down = map[string]peerDown{
		fmt.Sprintf("http://127.0.0.1:%d", pPort): {until: time.Now().Add(-time.Millisecond), failures: 1},
		fmt.Sprintf("http://127.0.0.1:%d", qPort): {until: time.Now().Add(time.Minute), failures: 1},
	}
	f.nDown.Store(2)
	f.downMu.Unlock()
	const n = 200
	for range n {
		s.broker.publish("orders", payloadText, "text/plain", []byte("x"))
	}
	waitFor(t, 10*time.Second, "every message delivered or counted lost", func() bool {
		return uint64(atR.Load())+s.broker.stats.ForwardDropped.Load() >= n
	})
	if lost := s.broker.stats.ForwardDropped.Load(); lost != 0 || atR.Load() != n {
		t.Errorf("R got %d of %d, %d lost; want all at R, the live member", atR.Load(), n, lost)
	}
}

// TestDownTableForgetsThePast: once maxPeers addresses have failed over a
// sidecar's life, peers long gone make room for one failing now, which is
// kept out of the groups' rotation. (No traffic: the table alone.)
func TestDownTableForgetsThePast(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	f := s.broker.fwd
	for i := range maxPeers {
		f.markDown(fmt.Sprintf("http://127.0.0.1:%d", 1000+i))
	}
	f.downMu.Lock()
	for k, d := range f.down { // their backoffs ended long ago
		d.until = time.Now().Add(-time.Hour)
		f.down[k] = d
	}
	f.downMu.Unlock()
	now := "http://127.0.0.2:8081"
	f.markDown(now)
	if !f.isDown(now) || f.nDown.Load() != 1 {
		t.Errorf("a peer failing now: down %v, table of %d; want it down and the past forgotten", f.isDown(now), f.nDown.Load())
	}
}

// TestLostSplitMessageCountsOnce: a message for more queue groups at one
// peer than a batch line holds goes as several pieces; when the peer
// cannot be reached and the groups have no other member, the message is
// counted lost once, not once a piece.
func TestLostSplitMessageCountsOnce(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // nothing listens there
	svc := Service{Name: "topic:many"}
	for i := range 70 {
		g := fmt.Sprintf("g%d-%s", i, strings.Repeat("x", 56))
		svc.Nodes = append(svc.Nodes, Node{ID: "peer:" + g, Address: "127.0.0.1", Port: port,
			Metadata: map[string]string{"broker": "1", "sidecar": "peer", "scheme": "http", "queue": g}})
	}
	if err := s.reg.Register(svc, time.Minute); err != nil {
		t.Fatal(err)
	}
	s.broker.publish("many", payloadText, "text/plain", []byte("x"))
	waitFor(t, 10*time.Second, "the message counted lost", func() bool { return s.broker.stats.ForwardDropped.Load() > 0 })
	waitFor(t, 10*time.Second, "the peer's worker done", func() bool {
		s.broker.fwd.mu.Lock()
		defer s.broker.fwd.mu.Unlock()
		return len(s.broker.fwd.peers) == 0
	})
	if n := s.broker.stats.ForwardDropped.Load(); n != 1 {
		t.Errorf("one message lost, counted %d times", n)
	}
}

// TestLostSplitAcrossBatchesCountsOnce: the pieces of one message may go
// in two batches (the peer's worker took a batch while the publisher was
// still queueing); when both fail, the message still counts lost once,
// and a message lost whole in one failed batch once too.
func TestLostSplitAcrossBatchesCountsOnce(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	var groups []string
	for i := range 70 {
		groups = append(groups, fmt.Sprintf("g%d-%s", i, strings.Repeat("x", 56)))
	}
	ev := encodeEvent("i", "/s", "many", time.Unix(0, 0), payloadText, "text/plain", []byte("x"))
	pieces := splitGroups(forwardItem{topic: "many", groups: groups, event: ev})
	if len(pieces) < 2 {
		t.Fatalf("%d pieces; want the message split", len(pieces))
	}
	const addr = "http://127.0.0.1:1"
	lost := s.broker.fwd.reroute(addr, pieces[:1], true) + s.broker.fwd.reroute(addr, pieces[1:], true)
	if lost != 1 {
		t.Errorf("one message in two failed batches counted lost %d times; want once", lost)
	}
	again := splitGroups(forwardItem{topic: "many", groups: groups, event: ev})
	if n := messagesIn(again[:1]) + messagesIn(again[1:]); n != 1 {
		t.Errorf("one message in two batches that failed outright: %d lost; want 1", n)
	}
}

// TestReceiveTellsOnlyARerouter: a batch's group with no member here is
// named in the answer to a sender that says it reroutes, and counted as
// lost here for one that does not (an older sidecar), which would drop the
// answer and the message with it uncounted.
func TestReceiveTellsOnlyARerouter(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{})
	ev := encodeEvent("i", "/s", "t", time.Unix(0, 0), payloadText, "text/plain", []byte("x"))
	body := encodeForward(nil, []forwardItem{{topic: "t", groups: []string{"g"}, event: ev}})
	ans, err := s.broker.fwd.receive(body, true)
	if err != nil || len(ans.NoMember) != 1 || ans.NoMember[0].Item != 0 || !slices.Equal(ans.NoMember[0].Groups, []string{"g"}) || s.broker.stats.NoSubscriber.Load() != 0 {
		t.Errorf("to a rerouter: %+v, %v, %d counted lost; want g named, none counted", ans, err, s.broker.stats.NoSubscriber.Load())
	}
	ans, err = s.broker.fwd.receive(body, false)
	if err != nil || len(ans.NoMember) != 0 || s.broker.stats.NoSubscriber.Load() != 1 {
		t.Errorf("to an older sender: %+v, %v, %d counted lost; want none named, one counted", ans, err, s.broker.stats.NoSubscriber.Load())
	}
}

// TestItemsWithoutMembersTakesEachOnce: a peer's answer that names an item
// or a group twice, or one out of range, reroutes each group of the batch
// once at most, and only its own.
func TestItemsWithoutMembersTakesEachOnce(t *testing.T) {
	batch := []forwardItem{{topic: "t", broadcast: true, groups: []string{"g", "h"}}}
	got := itemsWithoutMembers(batch, []groupsOfItem{{0, []string{"g", "g", "x"}}, {0, []string{"h"}}, {-1, []string{"g"}}, {5, []string{"g"}}})
	if len(got) != 1 || got[0].broadcast || !slices.Equal(got[0].groups, []string{"g"}) {
		t.Errorf("items to reroute: %+v; want item 0 for g alone, without its broadcast", got)
	}
}

// TestForwardLossesAreAllLogged: failures within the log's quiet time are
// added to the next line for the peer, or said when it works again: the
// log tells every message lost, not those of the first failure alone.
func TestForwardLossesAreAllLogged(t *testing.T) {
	f, log := loggedForwarder()
	f.failLog = logLimiter{every: time.Hour}
	const peer = "http://127.0.0.1:1"
	failed := errors.New("connection refused")
	for _, lost := range []int{1, 5, 7} {
		f.logFailure(peer, lost, failed)
	}
	if got := log.String(); strings.Count(got, "messages lost") != 1 || !strings.Contains(got, "messages=1 ") {
		t.Fatalf("after three failures in the quiet time: %s; want one line for the first", got)
	}
	f.failLog = logLimiter{every: time.Hour} // the quiet time is over
	f.logFailure(peer, 2, failed)
	if got := log.String(); !strings.Contains(got, "messages=14 ") {
		t.Errorf("the next line: %s; want the 12 held back added to its 2", got)
	}
	f.logFailure(peer, 3, failed)
	f.markUp(peer)
	if got := log.String(); !strings.Contains(got, "works again") || !strings.Contains(got, "messages=3") {
		t.Errorf("after the peer works again: %s; want the 3 held back said", got)
	}
}

// TestForwardLossesToAGonePeerAreLogged: losses held back by the log's
// quiet time, for a peer that fails no more (it is gone), are said once
// that time is over.
func TestForwardLossesToAGonePeerAreLogged(t *testing.T) {
	f, log := loggedForwarder()
	f.failLog = logLimiter{every: 100 * time.Millisecond}
	const peer = "http://127.0.0.1:1"
	failed := errors.New("connection refused")
	for _, lost := range []int{1, 5, 7} {
		f.logFailure(peer, lost, failed)
	}
	// However the three fell in the quiet time (one line for the first
	// and one for the rest, unless the machine stalled), all 13 are said.
	waitFor(t, 5*time.Second, "all 13 lost to be said", func() bool { return messagesSaid(log.String()) == 13 })
}

// TestRefusedForwardsKeepTheConnection: a peer's refusal (a stale entry's
// 410, a 401, any other) is read to its end, so that the next batch goes
// on the same connection rather than a new one each time.
func TestRefusedForwardsKeepTheConnection(t *testing.T) {
	for _, code := range []int{http.StatusGone, http.StatusUnauthorized, http.StatusServiceUnavailable} {
		var conns atomic.Int32
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			io.Copy(io.Discard, r.Body)
			writeError(w, code, strings.Repeat("a refusal, in the error shape. ", 20))
		}))
		srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
			if st == http.StateNew {
				conns.Add(1)
			}
		}
		srv.Start()
		f := newForwarder(&broker{log: discardLog})
		for range 5 {
			if _, err := f.post(srv.URL, []string{"peer"}, []byte("x")); err == nil {
				t.Fatalf("%d: no error", code)
			}
		}
		srv.Close()
		if n := conns.Load(); n != 1 {
			t.Errorf("five batches refused with %d took %d connections; want one", code, n)
		}
	}
}

// TestHeldBackLossesWaitForAFullLimiter: with the log's limiter full of
// other peers, the losses held back for one more are said once it has
// room, and the wait costs nothing meanwhile (it re-armed at once, and
// spun a core, for up to ten seconds).
func TestHeldBackLossesWaitForAFullLimiter(t *testing.T) {
	f, _ := loggedForwarder()
	now := time.Now()
	f.failLog.last = map[string]time.Time{}
	for i := range maxLogKeys {
		f.failLog.last[fmt.Sprintf("peer%d", i)] = now
	}
	cpu := func() time.Duration {
		var ru syscall.Rusage
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	c0, t0 := cpu(), time.Now()
	f.logFailure("http://127.0.0.1:1", 3, errors.New("refused"))
	time.Sleep(500 * time.Millisecond) // not a wait for a condition: the idle time measured
	if used, took := cpu()-c0, time.Since(t0); used > took/2 {
		t.Errorf("the process used %v of CPU in %v of waiting to log; want next to none", used, took)
	}
}

// TestRedeliveredCountsOnce: a leaving member's message that no other
// member takes (the other is closing) counts once, as without a member,
// not as redelivered too.
func TestRedeliveredCountsOnce(t *testing.T) {
	sc, _ := brokerSidecar(t, brokerConfig{PingInterval: time.Hour})
	b := sc.broker
	leaving := &subscriber{b: b, topic: "T", queue: "g"}
	closing := &subscriber{b: b, topic: "T", queue: "g"}
	for _, s := range []*subscriber{leaving, closing} {
		if err := b.subscribe(s); err != nil {
			t.Fatal(err)
		}
	}
	closing.drop() // its client closed too: it takes nothing
	if taken, _ := leaving.enqueue(newMessage("T", "id1", []byte("event"))); !taken {
		t.Fatal("the message was not queued")
	}
	b.unsubscribe(leaving)
	leaving.drop()
	b.redeliver(leaving)
	if rep := b.report(); rep.Redelivered != 0 || rep.NoSubscriber != 1 {
		t.Errorf("redelivered %d, without a member %d; want 0 and 1", rep.Redelivered, rep.NoSubscriber)
	}
	b.unsubscribe(closing)
}

// TestAbsencesEnd: a peer's word that a group has no member there holds
// until the topics' entries change, and then costs publishes nothing more.
func TestAbsencesEnd(t *testing.T) {
	f := newForwarder(&broker{log: discardLog})
	f.markAbsent("http://127.0.0.1:1", "t", []string{"g"})
	if !f.absences() || !f.isAbsent("http://127.0.0.1:1", "t", "g") || f.isAbsent("http://127.0.0.1:1", "t", "h") {
		t.Fatal("want g absent at that peer, and h not")
	}
	f.gen.Add(1) // an entry of a topic changed: a member may have joined there
	if f.absences() || f.nAbsent.Load() != 0 || f.isAbsent("http://127.0.0.1:1", "t", "g") {
		t.Errorf("after a change: absences %v, %d kept; want none", f.absences(), f.nAbsent.Load())
	}
}

// TestBatchLenKeepsALargeEventApart: an event that would take a batch
// past maxForwardBytes goes alone, so that a peer whose limit it is over
// refuses it alone rather than the batch (413) with the messages queued
// with it; a batch never mixes the sidecars it is for.
func TestBatchLenKeepsALargeEventApart(t *testing.T) {
	small := forwardItem{topic: "t", broadcast: true, event: []byte(`{"data":1}`)}
	large := forwardItem{topic: "t", broadcast: true, event: make([]byte, maxForwardBytes)}
	var items []forwardItem
	for range 50 {
		items = append(items, small)
	}
	items = append(items, large)
	for range 50 {
		items = append(items, small)
	}
	var got []int
	for len(items) > 0 {
		n := batchLen(items)
		got = append(got, n)
		items = items[n:]
	}
	if !slices.Equal(got, []int{50, 1, 50}) {
		t.Errorf("batches of 50 small, a large and 50 small items: %v; want [50 1 50]", got)
	}
	other := small
	other.to = []string{"sidecar-b"}
	if n := batchLen([]forwardItem{small, small, other, small}); n != 2 {
		t.Errorf("a batch took %d items, across the sidecars they are for; want 2", n)
	}
}

// TestForwardTakesALoneLargeMessage: a peer queue with nothing waiting,
// and a broker holding nothing, take a message of any size, as a
// subscriber's empty queue does: a legal message larger than the bounds
// of what waits is not lost for them.
func TestForwardTakesALoneLargeMessage(t *testing.T) {
	s, _ := brokerSidecar(t, brokerConfig{MemoryBytes: 1000})
	f := s.broker.fwd
	ln, err := net.Listen("tcp", "127.0.0.1:0") // a peer that never answers: the message stays held
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := f.enqueue(ln.Addr().String(), forwardItem{topic: "t", broadcast: true, event: make([]byte, 1500)}); err != nil {
		t.Errorf("a lone message over --broker_memory_bytes: %v; want it taken", err)
	}
	if err := f.enqueue(ln.Addr().String(), forwardItem{topic: "t", broadcast: true, event: make([]byte, 10)}); err != errPeerQueueFull && err != errForwardMemory {
		t.Errorf("a message behind it: %v; want refused", err)
	}
}

// TestPeerQueueOverflowIsCountedAndLogged: a message a peer's full queue
// refuses counts as forwarded and as dropped (the difference is what
// reached peers), and is logged, with why.
func TestPeerQueueOverflowIsCountedAndLogged(t *testing.T) {
	f, log := loggedForwarder()
	const peer = "127.0.0.1:1"
	f.peers[peer] = &peerQueue{addr: peer, items: make([]forwardItem, maxPeerQueue), running: true} // a worker stuck on the peer
	f.send(newMessage("t", "id1", []byte(`{}`)), []forwardPlan{{addr: peer, localDelivery: localDelivery{broadcast: true}}})
	if fw, dropped := f.b.stats.Forwarded.Load(), f.b.stats.ForwardDropped.Load(); fw != 1 || dropped != 1 {
		t.Errorf("forwarded %d, dropped %d; want 1 and 1", fw, dropped)
	}
	if got := log.String(); !strings.Contains(got, "dropped before they were sent") || !strings.Contains(got, "queue is full") {
		t.Errorf("log: %q; want the loss and its cause", got)
	}
	// More drops within the quiet time are held back, and the peer's
	// next batch (it works, slowly) does not log them as its return.
	f.send(newMessage("t", "id2", []byte(`{}`)), []forwardPlan{{addr: peer, localDelivery: localDelivery{broadcast: true}}})
	f.markUp(peer)
	if got := log.String(); strings.Count(got, "level=WARN") != 1 || strings.Contains(got, "works again") {
		t.Errorf("log after a second drop and a batch: %q; want the first line alone", got)
	}
}

// TestForwardRefusalsAreAllLogged: refusals of messages too large for a
// peer within the log's quiet time are said by the next line for it, or
// once that time is over: the log tells every message refused.
func TestForwardRefusalsAreAllLogged(t *testing.T) {
	f, log := loggedForwarder()
	f.failLog = logLimiter{every: 100 * time.Millisecond}
	const peer = "http://127.0.0.1:1"
	for range 5 {
		f.logRefused(peer, 1, "too large")
	}
	waitFor(t, 5*time.Second, "all 5 refusals said", func() bool { return messagesSaid(log.String()) == 5 })
	if got := log.String(); strings.Contains(got, "forwarding to a peer sidecar failed") {
		t.Errorf("refusals logged as failures: %s", got)
	}
}

// TestPeer413ForALoneEventIsARefusal: a peer that refuses a batch of one
// event as too large (over its whole bound for a batch) refused that
// event, as it would within a batch: counted and logged as such, and the
// peer, which works, is not marked down.
func TestPeer413ForALoneEventIsARefusal(t *testing.T) {
	peer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		writeError(w, http.StatusRequestEntityTooLarge, "forwarded batch: http: request body too large")
	}))
	defer peer.Close()
	f, log := loggedForwarder()
	f.send(newMessage("t", "id1", []byte(`{}`)), []forwardPlan{{addr: strings.TrimPrefix(peer.URL, "http://"), localDelivery: localDelivery{broadcast: true}}})
	waitFor(t, 5*time.Second, "the refusal counted", func() bool { return f.b.stats.ForwardDropped.Load() == 1 })
	f.close(context.Background())
	if got := log.String(); !strings.Contains(got, "refused messages too large") || strings.Contains(got, "failed") {
		t.Errorf("log: %q; want a refusal, not a failure", got)
	}
	if f.nDown.Load() != 0 {
		t.Error("the peer was marked down for refusing one event")
	}
}

// messagesSaid adds up the messages=N of the lines in log.
func messagesSaid(log string) int {
	n := 0
	for _, m := range regexp.MustCompile(`messages=(\d+)`).FindAllStringSubmatch(log, -1) {
		v, _ := strconv.Atoi(m[1])
		n += v
	}
	return n
}

// loggedForwarder is a forwarder of a broker with the default memory
// bound, whose log is the returned buffer.
func loggedForwarder() (*forwarder, *syncBuffer) {
	log := &syncBuffer{}
	return newForwarder(&broker{log: slog.New(slog.NewTextHandler(log, nil)), cfg: brokerConfig{MemoryBytes: defaultMemoryBytes}}), log
}
