// Command soak runs three sidecars with apps on loopback under mixed load
// (lookups, RPC, publish and subscribe) for a bounded time while it kills
// and restarts apps and sidecars, then checks what a production tool must
// guarantee: no sidecar crashed on its own, every call either succeeded or
// failed with a proper error, no broker message was delivered twice, and
// memory and goroutines came back to their baseline once the load stopped.
//
//	go build -o /tmp/micro . && go run ./bench/soak -micro=/tmp/micro -duration=3m
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/websocket"
)

func main() {
	bin := flag.String("micro", "./micro", "path to the micro binary")
	duration := flag.Duration("duration", 3*time.Minute, "how long the load and the chaos run (bounded)")
	workers := flag.Int("workers", 8, "concurrent request workers")
	flag.Parse()
	if *duration > 30*time.Minute {
		log.Fatal("-duration is capped at 30m")
	}
	dir, err := os.MkdirTemp("", "micro-soak-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	s := &soak{bin: *bin, registry: filepath.Join(dir, "registry.json"), seen: map[string]map[string]int{}}
	os.Exit(s.run(*duration, *workers))
}

type soak struct {
	bin      string
	registry string
	cars     [3]*sidecar
	apps     [3]*app

	ok, failedProperly, improper, published atomic.Int64

	mu   sync.Mutex                // guards seen, dups
	seen map[string]map[string]int // subscriber -> message -> deliveries
	dups int
}

// sidecar is one sidecar process on a fixed port, restartable.
type sidecar struct {
	port   int
	args   []string
	mu     sync.Mutex // guards cmd, killed, exits
	cmd    *exec.Cmd
	killed bool     // we killed it on purpose
	exits  []string // unexpected exits
}

func freePort() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

func (c *sidecar) url(path string) string { return fmt.Sprintf("http://127.0.0.1:%d%s", c.port, path) }

func (c *sidecar) start(bin string) {
	cmd := exec.Command(bin, append([]string{"sidecar", fmt.Sprintf("--address=127.0.0.1:%d", c.port)}, c.args...)...)
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		log.Fatal(err)
	}
	c.mu.Lock()
	c.cmd, c.killed = cmd, false
	c.mu.Unlock()
	go func() {
		err := cmd.Wait()
		c.mu.Lock()
		defer c.mu.Unlock()
		if !c.killed {
			c.exits = append(c.exits, fmt.Sprintf("port %d: %v", c.port, err))
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if resp, err := http.Get(c.url("/health")); err == nil {
			resp.Body.Close()
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	log.Fatalf("sidecar on %d did not start", c.port)
}

func (c *sidecar) kill() {
	c.mu.Lock()
	c.killed = true
	cmd := c.cmd
	c.mu.Unlock()
	cmd.Process.Kill()
	for cmd.ProcessState == nil { // Wait runs in start's goroutine
		time.Sleep(10 * time.Millisecond)
	}
}

func (c *sidecar) pid() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cmd.Process.Pid
}

// app is a JSON-RPC echo service that can go away and come back.
type app struct {
	port int
	mu   sync.Mutex // guards srv
	srv  *http.Server
}

func (a *app) start() {
	ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", a.port))
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/health" {
			return
		}
		var req struct {
			ID     json.RawMessage   `json:"id"`
			Params []json.RawMessage `json:"params"`
		}
		json.NewDecoder(r.Body).Decode(&req)
		var p json.RawMessage = []byte("null")
		if len(req.Params) > 0 {
			p = req.Params[0]
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"jsonrpc":"2.0","id":%s,"result":{"echo":%s,"port":%d}}`, req.ID, p, a.port)
	})}
	a.mu.Lock()
	a.srv = srv
	a.mu.Unlock()
	go srv.Serve(ln)
}

func (a *app) stop() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.srv.Close()
}

func (s *soak) run(duration time.Duration, workers int) int {
	for i := range s.apps {
		s.apps[i] = &app{port: freePort()}
		s.apps[i].start()
		port := freePort()
		s.cars[i] = &sidecar{port: port, args: []string{
			"--registry=file", "--registry_address=" + s.registry, "--register_ttl=3s", "--register_interval=1s",
			"--server_name=soak.echo", fmt.Sprintf("--server_address=127.0.0.1:%d", s.apps[i].port),
			fmt.Sprintf("--healthcheck_url=http://127.0.0.1:%d/health", s.apps[i].port),
			"--healthcheck_interval=200ms", "--healthcheck_failures=1",
		}}
		s.cars[i].start(s.bin)
	}
	time.Sleep(2 * time.Second) // let registrations settle before the baseline
	base := s.sample()
	log.Printf("baseline: %s", base)

	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() { defer wg.Done(); s.worker(ctx, w) }()
	}
	for i := range s.cars {
		for g := range 2 {
			wg.Add(1)
			go func() { defer wg.Done(); s.subscriber(ctx, i, g) }()
		}
	}
	wg.Add(1)
	go func() { defer wg.Done(); s.chaos(ctx) }()
	wg.Wait()

	// Load stopped: wait for every sidecar to come back to its baseline.
	// Keep-alive connections to the apps close after the sidecar's idle
	// timeout (90 s), so allow two minutes.
	http.DefaultClient.CloseIdleConnections()
	stopped := time.Now()
	after := s.sample()
	for !after.near(base) && time.Since(stopped) < 2*time.Minute {
		time.Sleep(time.Second)
		after = s.sample()
	}
	log.Printf("after load: %s, %v after it stopped", after, time.Since(stopped).Round(time.Second))
	return s.report(base, after)
}

// worker sends lookups, RPC calls and publishes at random.
func (s *soak) worker(ctx context.Context, w int) {
	client := &http.Client{Timeout: 10 * time.Second}
	defer client.CloseIdleConnections() // what stays open after the load is ours, not the sidecars'
	for n := 0; ctx.Err() == nil; n++ {
		car := s.cars[rand.IntN(len(s.cars))]
		var resp *http.Response
		var err error
		switch rand.IntN(3) {
		case 0:
			resp, err = client.Get(car.url("/registry?service=soak.echo"))
		case 1:
			body := fmt.Sprintf(`{"service":"soak.echo","method":"Echo.Call","request":{"n":%d}}`, n)
			resp, err = client.Post(car.url("/rpc"), "application/json", strings.NewReader(body))
		case 2:
			id := fmt.Sprintf("w%d-%d", w, n)
			resp, err = client.Post(car.url("/broker?topic=soak"), "text/plain", strings.NewReader(id))
			if err == nil && resp.StatusCode == 200 {
				s.published.Add(1)
			}
		}
		s.judge(resp, err)
	}
}

var errorShape = regexp.MustCompile(`"id":"go.micro.sidecar","code":\d{3},"detail":"[^"]`)

// judge sorts an answer: success, a proper error (the error shape with a
// 4xx/5xx, or a refused connection to a sidecar we killed), or improper.
func (s *soak) judge(resp *http.Response, err error) {
	if err != nil {
		if strings.Contains(err.Error(), "connection refused") || strings.Contains(err.Error(), "connection reset") ||
			strings.Contains(err.Error(), "EOF") || strings.Contains(err.Error(), "server closed idle connection") {
			s.failedProperly.Add(1) // the sidecar is down on purpose
			return
		}
		s.improper.Add(1)
		log.Printf("improper: %v", err)
		return
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	switch {
	case resp.StatusCode == 200 && json.Valid(body):
		s.ok.Add(1)
	case resp.StatusCode >= 400 && errorShape.Match(body):
		s.failedProperly.Add(1)
	default:
		s.improper.Add(1)
		log.Printf("improper: %d %s", resp.StatusCode, body)
	}
}

// subscriber stays subscribed to the topic on one sidecar, reconnecting when
// the sidecar goes, and records every delivery.
func (s *soak) subscriber(ctx context.Context, i, g int) {
	name := fmt.Sprintf("car%d-sub%d", i, g)
	for ctx.Err() == nil {
		ws, err := websocket.Dial(fmt.Sprintf("ws://127.0.0.1:%d/broker?topic=soak", s.cars[i].port), "", s.cars[i].url(""))
		if err != nil {
			time.Sleep(100 * time.Millisecond)
			continue
		}
		go func() { <-ctx.Done(); ws.Close() }()
		for {
			var ev struct {
				Data string `json:"data"`
			}
			if err := websocket.JSON.Receive(ws, &ev); err != nil {
				break
			}
			s.mu.Lock()
			if s.seen[name] == nil {
				s.seen[name] = map[string]int{}
			}
			s.seen[name][ev.Data]++
			if s.seen[name][ev.Data] == 2 {
				s.dups++
			}
			s.mu.Unlock()
		}
		ws.Close()
	}
}

// chaos stops and restarts an app every 7 s and SIGKILLs and restarts a
// sidecar every 19 s.
func (s *soak) chaos(ctx context.Context) {
	apps := time.NewTicker(7 * time.Second)
	cars := time.NewTicker(19 * time.Second)
	defer apps.Stop()
	defer cars.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-apps.C:
			a := s.apps[rand.IntN(len(s.apps))]
			a.stop()
			time.Sleep(time.Second)
			a.start()
		case <-cars.C:
			c := s.cars[rand.IntN(len(s.cars))]
			c.kill()
			time.Sleep(500 * time.Millisecond)
			c.start(s.bin)
		}
	}
}

type sample struct{ goroutines, rssKB [3]int }

// near reports whether x is back to base: a few goroutines of slack for
// timers and connections in passing, and RSS within twice the baseline (Go
// returns freed memory to the system lazily).
func (x sample) near(base sample) bool {
	for i := range x.goroutines {
		if x.goroutines[i] > base.goroutines[i]+3 || x.rssKB[i] > base.rssKB[i]*2 {
			return false
		}
	}
	return true
}

func (x sample) String() string {
	return fmt.Sprintf("goroutines %v, RSS KB %v", x.goroutines, x.rssKB)
}

func (s *soak) sample() sample {
	var x sample
	re := regexp.MustCompile(`(?m)^micro_goroutines (\d+)`)
	for i, c := range s.cars {
		if resp, err := http.Get(c.url("/metrics")); err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if m := re.FindSubmatch(body); m != nil {
				x.goroutines[i], _ = strconv.Atoi(string(m[1]))
			}
		}
		if status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", c.pid())); err == nil {
			for _, line := range bytes.Split(status, []byte("\n")) {
				if f := strings.Fields(string(line)); len(f) >= 2 && f[0] == "VmRSS:" {
					x.rssKB[i], _ = strconv.Atoi(f[1])
				}
			}
		}
	}
	return x
}

func (s *soak) report(base, after sample) int {
	var crashes []string
	for _, c := range s.cars {
		c.mu.Lock()
		crashes = append(crashes, c.exits...)
		c.mu.Unlock()
		c.kill()
	}
	for _, a := range s.apps {
		a.stop()
	}
	s.mu.Lock()
	deliveries := 0
	for _, m := range s.seen {
		for _, n := range m {
			deliveries += n
		}
	}
	dups := s.dups
	s.mu.Unlock()
	fmt.Printf("requests: %d ok, %d failed with a proper error, %d improper\n", s.ok.Load(), s.failedProperly.Load(), s.improper.Load())
	fmt.Printf("broker: %d published, %d deliveries to 6 subscribers (at most once: a subscriber misses what is published while its sidecar is down), %d delivered twice\n", s.published.Load(), deliveries, dups)
	fmt.Printf("sidecars crashed on their own: %d %v\n", len(crashes), crashes)
	fmt.Printf("baseline %s\nafter    %s\n", base, after)
	failed := len(crashes) > 0 || s.improper.Load() > 0 || dups > 0
	if !after.near(base) {
		fmt.Println("the sidecars did not come back to their baseline")
		failed = true
	}
	if failed {
		fmt.Println("FAIL")
		return 1
	}
	fmt.Println("PASS")
	return 0
}
