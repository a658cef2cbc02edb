package main

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

// TestSeriesAreCapped: label values come from clients, so a family keeps at
// most maxSeries series and counts the rest under "_other".
func TestSeriesAreCapped(t *testing.T) {
	set := &metrics{}
	c := set.counter("test_total", "Test.", "service")
	h := set.histogram("test_seconds", "Test.", []float64{1}, "service")
	for i := range maxSeries + 10 {
		c.Inc(fmt.Sprint("svc", i))
		h.Observe(0.5, fmt.Sprint("svc", i))
	}
	if got := c.Value("_other"); got != 10 {
		t.Errorf("_other counts %d; want the 10 past the cap", got)
	}
	var b strings.Builder
	w := bufio.NewWriter(&b)
	c.write(w)
	h.write(w)
	w.Flush()
	out := b.String()
	if n := strings.Count(out, "test_total{"); n != maxSeries+1 {
		t.Errorf("%d counter series written; want %d", n, maxSeries+1)
	}
	if !strings.Contains(out, `test_seconds_count{service="_other"} 10`) {
		t.Errorf("histogram overflow series missing")
	}
	if i, j := strings.Index(out, `service="svc0"`), strings.Index(out, `service="svc1"`); i < 0 || j < i {
		t.Errorf("series not in label order")
	}
}

// A request refused before routing is counted under the route it was
// for, not as unmatched.
func TestRefusedRequestsCountUnderTheirRoute(t *testing.T) {
	s, srv := testSidecar(t, func(c *config) { c.AuthToken = "secret" })
	for _, tc := range []struct {
		path, origin string
		code         int
		route        string
	}{
		{"/rpc", "", 401, "/rpc"},                               // no token
		{"/registry", "", 401, "/registry"},                     // no token
		{"/proxy/svc/x", "http://evil.example", 403, "/proxy/"}, // an origin not allowed
	} {
		req, _ := http.NewRequest("POST", srv.URL+tc.path, strings.NewReader("{}"))
		if tc.origin != "" {
			req.Header.Set("Origin", tc.origin)
			req.Header.Set("Authorization", "Bearer secret")
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.code {
			t.Fatalf("POST %s: %d; want %d", tc.path, resp.StatusCode, tc.code)
		}
		if n := s.metrics.requests.Value(tc.route, strconv.Itoa(tc.code)); n != 1 {
			t.Errorf("POST %s: %d requests counted under route %q, code %d; want 1", tc.path, n, tc.route, tc.code)
		}
	}
	if n := s.metrics.requests.Value("unmatched", "401"); n != 0 {
		t.Errorf("%d refused requests counted as unmatched", n)
	}
}

// TestAbandonedRequestsCountAs499: a handler that returns without an
// answer after its caller left is counted as nginx would, not as a 200.
func TestAbandonedRequestsCountAs499(t *testing.T) {
	s, _ := testSidecar(t, nil)
	h := s.metrics.instrument(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {}), func(*http.Request) string { return "/x" })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/x", nil).WithContext(ctx))
	h.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("GET", "/x", nil))
	if n := s.metrics.requests.Value("/x", "499"); n != 1 {
		t.Errorf("%d abandoned requests counted as 499; want 1", n)
	}
	if n := s.metrics.requests.Value("/x", "200"); n != 1 {
		t.Errorf("%d requests answered by writing nothing counted as 200; want 1", n)
	}
}

// TestLabelledFamiliesAppearWithTheirFirstSeries: no HELP or TYPE for a
// family with labels and nothing to report; one without labels is always
// there.
func TestLabelledFamiliesAppearWithTheirFirstSeries(t *testing.T) {
	set := &metrics{}
	c := set.counter("test_total", "Test.", "service")
	h := set.histogram("test_seconds", "Test.", []float64{1}, "service")
	plain := set.counter("plain_total", "Plain.")
	g := &funcFamily{desc: desc{n: "test_up"}, typ: "gauge", read: func() []sample { return nil }}
	write := func() string {
		var b strings.Builder
		w := bufio.NewWriter(&b)
		for _, f := range []interface{ write(*bufio.Writer) }{c, h, plain, g} {
			f.write(w)
		}
		w.Flush()
		return b.String()
	}
	if out := write(); strings.Contains(out, "test_") || !strings.Contains(out, "plain_total 0") {
		t.Errorf("before any series:\n%s\nwant plain_total 0 alone", out)
	}
	c.Inc("a")
	h.Observe(0.5, "a")
	if out := write(); !strings.Contains(out, "# TYPE test_total counter") || !strings.Contains(out, "# TYPE test_seconds histogram") {
		t.Errorf("after the first series:\n%s", out)
	}
}

// TestStatusCodeLabelIsBounded: a status HTTP does not define, which a
// proxied node may send, is counted by its class, so that one node's
// made-up codes cannot fill the requests' series and push the sidecar's
// own into the overflow series.
func TestStatusCodeLabelIsBounded(t *testing.T) {
	for code, want := range map[int]string{200: "200", 418: "418", 499: "499", 503: "503", 299: "2xx", 599: "5xx", 600: "other", 999: "other"} {
		if got := statusCodeString(code); got != want {
			t.Errorf("status %d: label %q; want %q", code, got, want)
		}
	}
	labels := map[string]bool{}
	for code := 100; code < 1000; code++ {
		labels[statusCodeString(code)] = true
	}
	if len(labels) > 80 {
		t.Errorf("%d labels for the statuses 100-999; want the defined ones and a few classes", len(labels))
	}
}
