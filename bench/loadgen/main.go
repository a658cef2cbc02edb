// Command loadgen sends requests at a fixed rate over a fixed number of
// keep-alive connections and reports the latency distribution, the load
// shape behind Dapr's and Istio's published sidecar overheads (1,000
// requests/s over 16 connections). wrk has no fixed-rate mode.
//
// Latency is measured from each request's scheduled time, not from when a
// connection was free to send it, so a stall shows up in the figures
// instead of being hidden (coordinated omission).
//
//	go run ./bench/loadgen -url http://127.0.0.1:8081/rpc -rate 1000 -conns 16 -duration 10s
package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"
)

func main() {
	var (
		url      = flag.String("url", "", "URL to send requests to (loopback only in benchmarks).")
		body     = flag.String("body", "", "Request body; empty sends a GET.")
		ct       = flag.String("content_type", "application/json", "Content-Type of the body.")
		rate     = flag.Int("rate", 1000, "Requests per second, all connections together.")
		conns    = flag.Int("conns", 16, "Connections, each sending its share of the rate one request at a time.")
		duration = flag.Duration("duration", 10*time.Second, "How long to send; at most 5 minutes.")
	)
	flag.Parse()
	if *url == "" || *rate < 1 || *conns < 1 || *duration <= 0 || *duration > 5*time.Minute {
		fmt.Fprintln(os.Stderr, "loadgen: want -url, a positive -rate and -conns, and -duration up to 5m")
		os.Exit(2)
	}
	tr := &http.Transport{MaxIdleConnsPerHost: *conns, MaxConnsPerHost: *conns, DisableCompression: true}
	client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	interval := time.Duration(int64(time.Second) * int64(*conns) / int64(*rate))
	per := int(int64(*duration) / int64(interval))
	start := time.Now().Add(50 * time.Millisecond)

	var mu sync.Mutex // guards lat, errs
	lat := make([]time.Duration, 0, per**conns)
	errs := 0
	var wg sync.WaitGroup
	for c := range *conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			offset := interval * time.Duration(c) / time.Duration(*conns) // spread the connections over an interval
			mine := make([]time.Duration, 0, per)
			bad := 0
			for i := range per {
				due := start.Add(offset + time.Duration(i)*interval)
				time.Sleep(time.Until(due))
				var req *http.Request
				if *body == "" {
					req, _ = http.NewRequest("GET", *url, nil)
				} else {
					req, _ = http.NewRequest("POST", *url, bytes.NewReader([]byte(*body)))
					req.Header.Set("Content-Type", *ct)
				}
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
				if err != nil || resp.StatusCode != 200 {
					bad++
					continue
				}
				mine = append(mine, time.Since(due))
			}
			mu.Lock()
			lat = append(lat, mine...)
			errs += bad
			mu.Unlock()
		}()
	}
	wg.Wait()
	took := time.Since(start)
	slices.Sort(lat)
	q := func(p float64) float64 {
		if len(lat) == 0 {
			return 0
		}
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	fmt.Printf("requests %d errors %d rate %.0f/s p50 %.3fms p90 %.3fms p99 %.3fms max %.3fms\n",
		len(lat), errs, float64(len(lat))/took.Seconds(), q(0.50), q(0.90), q(0.99), q(1))
}
