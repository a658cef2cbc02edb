// Command brokerload drives a pub/sub broker over WebSockets on loopback and
// reports delivered messages per second, loss and end-to-end latency, or the
// memory an idle subscriber costs. It speaks to the micro sidecar's /broker
// and to nats-server's WebSocket listener with the same minimal client, so
// that both are measured the same way. Bounded in time and count; it only
// dials the addresses it is given.
//
//	brokerload -target=micro -pub=127.0.0.1:8081 -sub=127.0.0.1:8081 -subs=50 -rate=1000 -duration=5s
//	brokerload -target=nats -pub=127.0.0.1:4223 -sub=127.0.0.1:4223 -subs=50 -rate=1000 -duration=5s
//	brokerload -target=micro -sub=127.0.0.1:8081 -idle=2000 -pid=1234
package main

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	target := flag.String("target", "micro", "micro or nats")
	pub := flag.String("pub", "127.0.0.1:8081", "host:port the publisher connects to")
	sub := flag.String("sub", "127.0.0.1:8081", "host:port the subscribers connect to")
	subs := flag.Int("subs", 50, "number of subscribers (at most 5000)")
	rate := flag.Int("rate", 1000, "messages published per second (at most 100000)")
	duration := flag.Duration("duration", 5*time.Second, "how long to publish (at most 60s)")
	size := flag.Int("size", 128, "payload bytes (32 to 65536)")
	idle := flag.Int("idle", 0, "memory mode: open this many idle subscribers (at most 20000) and report the server's memory per subscriber")
	pid := flag.Int("pid", 0, "the server's process id, for memory figures")
	label := flag.String("label", "", "label printed with the result")
	flag.Parse()
	if *subs < 1 || *subs > 5000 || *rate < 1 || *rate > 100000 || *duration > time.Minute || *size < 32 || *size > 65536 || *idle > 20000 {
		fmt.Fprintln(os.Stderr, "brokerload: a limit was exceeded; see -help")
		os.Exit(2)
	}
	for _, a := range []string{*pub, *sub} {
		if h, _, err := net.SplitHostPort(a); err != nil || !net.ParseIP(h).IsLoopback() {
			fmt.Fprintf(os.Stderr, "brokerload: %s: loopback addresses only\n", a)
			os.Exit(2)
		}
	}
	p := proto(microProto{})
	if *target == "nats" {
		p = natsProto{}
	}
	topic := "bench." + strconv.FormatInt(time.Now().UnixNano(), 36)
	if *idle > 0 {
		if err := idleRun(p, *sub, topic, *idle, *pid, *label); err != nil {
			fmt.Fprintln(os.Stderr, "brokerload:", err)
			os.Exit(1)
		}
		return
	}
	if err := loadRun(p, *pub, *sub, topic, *subs, *rate, *duration, *size, *label); err != nil {
		fmt.Fprintln(os.Stderr, "brokerload:", err)
		os.Exit(1)
	}
}

// proto is what differs between the brokers.
type proto interface {
	path(topic string) string
	// subscribe prepares conn to receive topic.
	subscribe(c *wsConn, topic string) error
	// publishFrame is the frame payload that publishes payload to topic.
	publishFrame(topic string, payload []byte) []byte
	// binary reports whether frames are binary.
	binary() bool
	// parse extracts the payloads of the messages in data, keeping what
	// is incomplete for the next call.
	parse(c *wsConn, data []byte, each func(payload []byte)) error
}

type microProto struct{}

func (microProto) path(topic string) string               { return "/broker?topic=" + topic }
func (microProto) subscribe(*wsConn, string) error        { return nil }
func (microProto) publishFrame(_ string, p []byte) []byte { return p }
func (microProto) binary() bool                           { return false }

var dataKey = []byte(`"data":"`)

func (microProto) parse(_ *wsConn, data []byte, each func([]byte)) error {
	i := bytes.Index(data, dataKey)
	if i < 0 {
		return errors.New("event without data: " + string(data))
	}
	rest := data[i+len(dataKey):]
	j := bytes.IndexByte(rest, '"')
	if j < 0 {
		return errors.New("unterminated data")
	}
	each(rest[:j])
	return nil
}

type natsProto struct{}

func (natsProto) path(string) string { return "/" }
func (natsProto) binary() bool       { return true }

func (n natsProto) subscribe(c *wsConn, topic string) error {
	// The server speaks first (INFO); then CONNECT and SUB, and a PING
	// whose PONG says the subscription is in place.
	if err := c.write(2, []byte("CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"protocol\":1}\r\nSUB "+topic+" 1\r\nPING\r\n")); err != nil {
		return err
	}
	for {
		op, data, err := c.read()
		if err != nil {
			return err
		}
		if op != 1 && op != 2 {
			continue
		}
		c.pending = append(c.pending, data...)
		if bytes.Contains(c.pending, []byte("PONG\r\n")) {
			c.pending = c.pending[:0]
			return nil
		}
		if bytes.Contains(c.pending, []byte("-ERR")) {
			return fmt.Errorf("nats: %s", c.pending)
		}
	}
}

func (natsProto) publishFrame(topic string, p []byte) []byte {
	return fmt.Appendf(nil, "PUB %s %d\r\n%s\r\n", topic, len(p), p)
}

func (natsProto) parse(c *wsConn, data []byte, each func([]byte)) error {
	c.pending = append(c.pending, data...)
	buf := c.pending
	for {
		nl := bytes.Index(buf, []byte("\r\n"))
		if nl < 0 {
			break
		}
		line := buf[:nl]
		switch {
		case bytes.HasPrefix(line, []byte("MSG ")):
			f := bytes.Fields(line)
			n, err := strconv.Atoi(string(f[len(f)-1]))
			if err != nil {
				return fmt.Errorf("bad MSG line %q", line)
			}
			if len(buf) < nl+2+n+2 {
				goto done
			}
			each(buf[nl+2 : nl+2+n])
			buf = buf[nl+2+n+2:]
			continue
		case bytes.Equal(line, []byte("PING")):
			c.write(2, []byte("PONG\r\n"))
		case bytes.HasPrefix(line, []byte("-ERR")):
			return fmt.Errorf("nats: %s", line)
		}
		buf = buf[nl+2:]
	}
done:
	c.pending = append(c.pending[:0], buf...)
	return nil
}

// wsConn is a minimal WebSocket client (RFC 6455): enough to measure, with
// no allocation per frame read.
type wsConn struct {
	conn    net.Conn
	br      *bufio.Reader
	wmu     sync.Mutex
	buf     []byte
	pending []byte
}

func dial(addr, path string) (*wsConn, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	var key [16]byte
	rand.Read(key[:])
	fmt.Fprintf(conn, "GET %s HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
		path, addr, base64.StdEncoding.EncodeToString(key[:]))
	br := bufio.NewReaderSize(conn, 64<<10)
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusSwitchingProtocols {
		conn.Close()
		return nil, fmt.Errorf("handshake: %s", resp.Status)
	}
	conn.SetReadDeadline(time.Time{})
	return &wsConn{conn: conn, br: br}, nil
}

// write sends one masked frame.
func (c *wsConn) write(op byte, p []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	f := make([]byte, 0, len(p)+14)
	f = append(f, 0x80|op)
	switch {
	case len(p) <= 125:
		f = append(f, 0x80|byte(len(p)))
	case len(p) <= 0xffff:
		f = binary.BigEndian.AppendUint16(append(f, 0x80|126), uint16(len(p)))
	default:
		f = binary.BigEndian.AppendUint64(append(f, 0x80|127), uint64(len(p)))
	}
	var mask [4]byte
	rand.Read(mask[:])
	f = append(f, mask[:]...)
	for i, b := range p {
		f = append(f, b^mask[i%4])
	}
	_, err := c.conn.Write(f)
	return err
}

// read returns the next data frame; pings are answered, a close ends it.
func (c *wsConn) read() (byte, []byte, error) {
	for {
		var h [2]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return 0, nil, err
		}
		op, n := h[0]&0x0f, int(h[1]&0x7f)
		switch n {
		case 126:
			var l [2]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return 0, nil, err
			}
			n = int(binary.BigEndian.Uint16(l[:]))
		case 127:
			var l [8]byte
			if _, err := io.ReadFull(c.br, l[:]); err != nil {
				return 0, nil, err
			}
			n = int(binary.BigEndian.Uint64(l[:]))
		}
		if n > 64<<20 {
			return 0, nil, errors.New("frame too large")
		}
		if cap(c.buf) < n {
			c.buf = make([]byte, n)
		}
		data := c.buf[:n]
		if _, err := io.ReadFull(c.br, data); err != nil {
			return 0, nil, err
		}
		switch op {
		case 8:
			code := 0
			if n >= 2 {
				code = int(binary.BigEndian.Uint16(data))
			}
			return 0, nil, fmt.Errorf("closed by server: %d %s", code, data[min(2, n):])
		case 9:
			c.write(10, data)
		case 10:
		default:
			return op, data, nil
		}
	}
}

type subStats struct {
	ready    atomic.Bool // a probe arrived: the subscription is in place
	received atomic.Int64
	lat      []int64 // nanoseconds, one per message
	seen     []bool
	dups     int
	err      error
}

func loadRun(p proto, pubAddr, subAddr, topic string, nSubs, rate int, dur time.Duration, size int, label string) error {
	total := int(int64(rate) * int64(dur) / int64(time.Second))
	stats := make([]*subStats, nSubs)
	var wg sync.WaitGroup
	var last atomic.Int64
	conns := make([]*wsConn, nSubs)
	for i := range nSubs {
		c, err := dial(subAddr, p.path(topic))
		if err != nil {
			return fmt.Errorf("subscriber %d: %w", i, err)
		}
		if err := p.subscribe(c, topic); err != nil {
			return fmt.Errorf("subscriber %d: %w", i, err)
		}
		conns[i] = c
		st := &subStats{lat: make([]int64, 0, total), seen: make([]bool, total)}
		stats[i] = st
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				_, data, err := c.read()
				if err != nil {
					st.err = err
					return
				}
				now := time.Now().UnixNano()
				perr := p.parse(c, data, func(pl []byte) {
					seq, ts, ok := parsePayload(pl)
					if ok && seq == -1 {
						st.ready.Store(true)
						return
					}
					if !ok || seq < 0 || seq >= total {
						return
					}
					if st.seen[seq] {
						st.dups++
						return
					}
					st.seen[seq] = true
					st.lat = append(st.lat, now-ts)
					st.received.Add(1)
					last.Store(now)
				})
				if perr != nil {
					st.err = perr
					return
				}
			}
		}()
	}
	pc, err := dial(pubAddr, p.path(topic))
	if err != nil {
		return fmt.Errorf("publisher: %w", err)
	}
	if _, ok := p.(natsProto); ok {
		if err := p.subscribe(pc, "bench.none"); err != nil {
			return fmt.Errorf("publisher: %w", err)
		}
	}
	go func() { // the micro publisher is subscribed too: drain its echo
		for {
			if _, _, err := pc.read(); err != nil {
				return
			}
		}
	}()
	if err := waitReady(p, pc, topic, stats); err != nil {
		return err
	}
	start := time.Now()
	pad := strings.Repeat("x", size)
	op := byte(1)
	if p.binary() {
		op = 2
	}
	sent := 0
	tick := time.NewTicker(time.Millisecond)
	for sent < total {
		<-tick.C
		due := min(total, int(float64(rate)*time.Since(start).Seconds())+1)
		for ; sent < due; sent++ {
			pl := fmt.Appendf(nil, "%d %d ", sent, time.Now().UnixNano())
			pl = append(pl, pad[:size-len(pl)]...)
			if err := pc.write(op, p.publishFrame(topic, pl)); err != nil {
				return fmt.Errorf("publishing: %w", err)
			}
		}
	}
	tick.Stop()
	pubEnd := time.Now()
	// Drain: until everything arrived, or nothing arrived for 2s.
	want := int64(total) * int64(nSubs)
	for {
		var got int64
		for _, st := range stats {
			got += st.received.Load()
		}
		if got >= want || time.Since(time.Unix(0, max(last.Load(), pubEnd.UnixNano()))) > 2*time.Second {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	end := time.Unix(0, last.Load())
	pc.conn.Close()
	for _, c := range conns {
		c.conn.Close()
	}
	wg.Wait()
	var all []int64
	var got int64
	dups, errs := 0, 0
	for _, st := range stats {
		got += st.received.Load()
		all = append(all, st.lat...)
		dups += st.dups
		if st.err != nil && !errors.Is(st.err, net.ErrClosed) && !strings.Contains(st.err.Error(), "use of closed") {
			errs++
			fmt.Fprintln(os.Stderr, "subscriber error:", st.err)
		}
	}
	slices.Sort(all)
	q := func(f float64) time.Duration {
		if len(all) == 0 {
			return 0
		}
		return time.Duration(all[min(len(all)-1, int(f*float64(len(all))))])
	}
	elapsed := end.Sub(start)
	fmt.Printf("%-28s subs=%-5d rate=%-6d published=%-7d delivered=%-9d deliveries/s=%-9.0f lost=%-8d (%.2f%%) dups=%d p50=%-9v p99=%-9v max=%-9v sub_errors=%d\n",
		label, nSubs, rate, total, got, float64(got)/elapsed.Seconds(), want-got, 100*float64(want-got)/float64(want), dups,
		q(0.50).Round(time.Microsecond), q(0.99).Round(time.Microsecond), q(1).Round(time.Microsecond), errs)
	return nil
}

// waitReady publishes probes (sequence -1, not counted) until every
// subscriber has one: subscriptions on another server take a moment to
// propagate.
func waitReady(p proto, pc *wsConn, topic string, stats []*subStats) error {
	deadline := time.Now().Add(15 * time.Second)
	op := byte(1)
	if p.binary() {
		op = 2
	}
	for time.Now().Before(deadline) {
		pc.write(op, p.publishFrame(topic, []byte("-1 0 probe")))
		time.Sleep(100 * time.Millisecond)
		ready := 0
		for _, st := range stats {
			if st.ready.Load() {
				ready++
			}
		}
		if ready == len(stats) {
			time.Sleep(200 * time.Millisecond) // let the last probes drain
			return nil
		}
	}
	return errors.New("subscribers not ready after 15s")
}

func parsePayload(p []byte) (seq int, ts int64, ok bool) {
	a := bytes.IndexByte(p, ' ')
	if a < 0 {
		return 0, 0, false
	}
	b := bytes.IndexByte(p[a+1:], ' ')
	if b < 0 {
		return 0, 0, false
	}
	s, err1 := strconv.Atoi(string(p[:a]))
	t, err2 := strconv.ParseInt(string(p[a+1:a+1+b]), 10, 64)
	return s, t, err1 == nil && err2 == nil
}

func idleRun(p proto, addr, topic string, n, pid int, label string) error {
	if pid == 0 {
		return errors.New("-idle needs -pid of the server")
	}
	before, err := rss(pid)
	if err != nil {
		return err
	}
	conns := make([]*wsConn, 0, n)
	for i := range n {
		c, err := dial(addr, p.path(topic))
		if err != nil {
			return fmt.Errorf("subscriber %d: %w", i, err)
		}
		if err := p.subscribe(c, topic); err != nil {
			return fmt.Errorf("subscriber %d: %w", i, err)
		}
		conns = append(conns, c)
	}
	time.Sleep(3 * time.Second) // let the server settle (and collect garbage) before measuring
	after, err := rss(pid)
	if err != nil {
		return err
	}
	for _, c := range conns {
		c.conn.Close()
	}
	runtime.KeepAlive(conns)
	fmt.Printf("%-28s idle_subscribers=%d rss_before=%dKB rss_after=%dKB per_subscriber=%.1fKB\n", label, n, before/1024, after/1024, float64(after-before)/float64(n)/1024)
	return nil
}

// rss reads a process's resident set size from /proc.
func rss(pid int) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, errors.New("no VmRSS")
}
