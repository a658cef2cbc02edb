package main

import (
	"bufio"
	"fmt"
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
