package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// handleRegistry serves /registry:
//
//	GET    /registry                      every service version
//	GET    /registry?service=X[&version=V] one service, in the seed's shape
//	GET    /registry?watch=1[&service=X]   (WebSocket) a stream of changes
//	POST   /registry[?ttl=30s]             register the service in the body
//	DELETE /registry                       deregister the nodes in the body
func (s *sidecar) handleRegistry(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		q, ok := queryOf(w, r, "service", "version", "watch")
		if !ok {
			return
		}
		switch {
		case q.Has("version") && !q.Has("service") && !q.Has("watch"):
			writeError(w, http.StatusBadRequest, "version needs service: /registry?service=NAME&version=V")
		case q.Has("watch"):
			if err := checkWatchQuery(q); err != nil {
				writeError(w, http.StatusBadRequest, err.Error())
				return
			}
			s.handleWatch(w, r)
		case q.Has("service"):
			s.getService(w, q.Get("service"), q.Get("version"), q.Has("version"))
		default:
			writeJSON(w, http.StatusOK, s.reg.ListServices())
		}
	case http.MethodPost, http.MethodPut:
		s.postService(w, r)
	case http.MethodDelete:
		s.deleteService(w, r)
	default:
		allowMethods(w, r, http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodDelete)
	}
}

// checkWatchQuery refuses what a watch would take and not use: a watch
// other than watch=1 (or true), an empty service, a version (a watch
// streams every version of its service).
func checkWatchQuery(q url.Values) error {
	switch w := q.Get("watch"); {
	case w != "1" && w != "true":
		return fmt.Errorf("watch=%s: use watch=1 to watch, or leave it out to look up", truncate(w, 16))
	case q.Has("service") && q.Get("service") == "":
		return errors.New("service is empty; use /registry?watch=1&service=NAME, or leave service out to watch every service")
	case q.Has("version"):
		return errors.New("a watch streams every version of its service; leave version out and read each event's service version")
	}
	return nil
}

// getService answers a lookup; with a version (hasVersion, "" too: the
// unversioned nodes) only that version.
func (s *sidecar) getService(w http.ResponseWriter, name, version string, hasVersion bool) {
	if name == "" {
		writeError(w, http.StatusBadRequest, "service is empty; use /registry?service=NAME, or /registry for all")
		return
	}
	versions, err := s.reg.GetService(name)
	exists := err == nil
	if exists && hasVersion {
		versions = filterVersion(versions, version)
		if len(versions) == 0 {
			err = errNotFound
		}
	}
	if err != nil {
		detail := "service " + truncate(name, 128) + " not found"
		switch {
		case !exists:
		case hasVersion && version == "":
			detail = "service " + truncate(name, 128) + " has no nodes without a version (version= asks for those)"
		case hasVersion:
			detail = "service " + truncate(name, 128) + " has no nodes of version " + truncate(version, 64)
		}
		writeError(w, http.StatusNotFound, detail)
		return
	}
	writeJSON(w, http.StatusOK, merge(versions))
}

func filterVersion(versions []Service, version string) []Service {
	for _, v := range versions {
		if v.Version == version {
			return []Service{v}
		}
	}
	return nil
}

func (s *sidecar) postService(w http.ResponseWriter, r *http.Request) {
	q, ok := queryOf(w, r, "ttl")
	if !ok {
		return
	}
	ttl, err := parseTTL(q)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	body, ok := readBody(w, r, s.cfg.MaxBodyBytes)
	if !ok {
		return
	}
	svc, err := decodeServiceBody(body)
	if err == nil {
		err = normalizeService(&svc)
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if len(svc.Nodes) == 0 {
		writeError(w, http.StatusBadRequest, "nodes: at least one node is required")
		return
	}
	if s.app != nil && s.app.names(svc) {
		// Taken over, the app's entry would follow the request's ttl and
		// lapse, while the sidecar still counted on keeping it.
		writeError(w, http.StatusConflict, "node "+truncate(s.app.id, 128)+" is this sidecar's app, which the sidecar registers itself (--server_name, --server_id); register another node id")
		return
	}
	if s.refuseBrokerEntry(w, r.Method, svc, ttl) {
		return
	}
	if err := s.reg.Register(svc, ttl); err != nil {
		writeRegistryError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, svc)
}

// refuseBrokerEntry answers 409 when svc names a broker's topic entry
// that the request may not write, and says whether it did. A broker's
// entry is a node of a topic:T service with a broker's id (sidecar-...)
// or its metadata (broker=1). This sidecar's own are its broker's alone:
// it registers each once, and one deleted or taken over would be lost
// for good. A peer's may be deleted (a stale one, cleared by hand) or
// posted with ?ttl (it lapses), but not posted to be kept alive: this
// sidecar would keep it for ever, even past its broker's goodbye (a sync
// script posting what it read), and peers would forward to a sidecar
// with no subscribers left. method is the request's, DELETE or a POST
// (PUT) with ttl, 0 for one to keep alive.
func (s *sidecar) refuseBrokerEntry(w http.ResponseWriter, method string, svc Service, ttl time.Duration) bool {
	deleting := method == http.MethodDelete
	keptAlive := !deleting && ttl == 0
	topic, ok := strings.CutPrefix(svc.Name, topicService)
	if !ok {
		return false
	}
	for _, n := range svc.Nodes {
		own := n.ID == s.broker.id || strings.HasPrefix(n.ID, s.broker.id+":")
		broker := own || strings.HasPrefix(n.ID, "sidecar-") || n.Metadata["broker"] == "1"
		switch {
		case own:
			fix := "register another node id"
			if deleting {
				fix = "it goes when the last of them closes, or the sidecar stops"
			}
			writeError(w, http.StatusConflict, "node "+truncate(n.ID, 128)+" is this sidecar's broker entry for topic "+truncate(topic, 128)+", kept by its broker while it has subscribers; "+fix)
			return true
		case broker && keptAlive:
			writeError(w, http.StatusConflict, "node "+truncate(n.ID, 128)+" is a broker entry for topic "+truncate(topic, 128)+", which its own sidecar keeps alive; this one would keep it past that sidecar's goodbye. Leave it to its sidecar (or post it with ?ttl= for a test)")
			return true
		}
	}
	return false
}

func (s *sidecar) deleteService(w http.ResponseWriter, r *http.Request) {
	if _, ok := queryOf(w, r); !ok {
		return
	}
	body, ok := readBody(w, r, s.cfg.MaxBodyBytes)
	if !ok {
		return
	}
	svc, err := decodeDeregistration(body)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if s.refuseBrokerEntry(w, r.Method, svc, 0) {
		return
	}
	// Before the filter: a refused registration is in no table.
	appNamed := s.app != nil && s.app.names(svc) && (svc.Version == "" || svc.Version == s.app.app.Version)
	// A version named is a version meant, as in go-micro: a node of the
	// service under another version stays. No version: any.
	svc.Nodes = s.reg.table.nodesToDeregister(svc)
	if err := s.reg.Deregister(svc); err != nil {
		writeRegistryError(w, err)
		return
	}
	if appNamed {
		s.app.callOff()
	}
	writeJSON(w, http.StatusOK, svc)
}

// decodeDeregistration reads the body of a DELETE: the same service JSON as
// a registration, but only the name, version and node ids matter.
func decodeDeregistration(body []byte) (Service, error) {
	svc, err := decodeServiceBody(body)
	if err != nil {
		return Service{}, err
	}
	// The limits of a registration: what they refuse is in no registry,
	// and a DELETE of 50,000 ids would be as many backend removals.
	if svc.Name = strings.TrimSpace(svc.Name); svc.Name == "" {
		return Service{}, errors.New("name is required")
	}
	if err := checkNameAndVersion(svc.Name, svc.Version); err != nil {
		return Service{}, err
	}
	if len(svc.Nodes) == 0 {
		return Service{}, errors.New("nodes: give the ids of the nodes to deregister")
	}
	if len(svc.Nodes) > maxNodesPerReq {
		return Service{}, fmt.Errorf("nodes: at most %d per request", maxNodesPerReq)
	}
	seen := make(map[string]bool, len(svc.Nodes))
	for i := range svc.Nodes {
		if err := checkNodeID(&svc.Nodes[i]); err != nil {
			return Service{}, fmt.Errorf("nodes[%d]: %w", i, err)
		}
		id := svc.Nodes[i].ID
		if seen[id] {
			return Service{}, fmt.Errorf("nodes[%d]: id %q appears twice", i, id)
		}
		seen[id] = true
		// Only the id names a node to remove: the answer echoes nothing
		// else, not an address a registration would refuse.
		svc.Nodes[i] = Node{ID: id, Metadata: map[string]string{}}
	}
	svc.Metadata = map[string]string{}
	return svc, nil
}

// writeRegistryError maps a registry failure to its status: a full registry
// and a failing backend are both 503, with what to do in the detail; a
// registration the backend cannot carry (mdns: a TXT string over 255
// bytes) is the client's to fix, 400, and one larger than etcd takes 413.
func writeRegistryError(w http.ResponseWriter, err error) {
	if errors.Is(err, errNotAnnounceable) {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if isTooLargeForEtcd(err) {
		writeError(w, http.StatusRequestEntityTooLarge, err.Error()+" (etcd's --max-request-bytes): register less metadata")
		return
	}
	if !errors.Is(err, errTableFull) {
		w.Header().Set("Retry-After", "5") // a failing backend: etcd may answer again
	}
	writeError(w, http.StatusServiceUnavailable, err.Error())
}

// watchPingInterval keeps idle watch connections alive through proxies and
// NATs that drop silent ones.
const watchPingInterval = 30 * time.Second

// handleWatch streams registry changes over a WebSocket: first a create
// event for every live node, then every change as it happens. A watcher too
// slow to keep up is closed with 1013 (try again later) and should reconnect.
func (s *sidecar) handleWatch(w http.ResponseWriter, r *http.Request) {
	if !isUpgrade(r) {
		writeError(w, http.StatusBadRequest, "watch needs a WebSocket upgrade; connect with a WebSocket client to "+wsScheme(r)+"://HOST/registry?watch=1")
		return
	}
	if !handshakeOK(w, r) {
		return
	}
	if s.watchers.Add(1) > int64(s.cfg.MaxWatchers) {
		s.watchers.Add(-1)
		w.Header().Set("Retry-After", "5")
		writeError(w, http.StatusServiceUnavailable, fmt.Sprintf("too many registry watchers (%d, --registry_max_watchers)", s.cfg.MaxWatchers))
		return
	}
	defer s.watchers.Add(-1)
	service := r.URL.Query().Get("service")
	var br *bufio.Reader // the connection's, taken at the hijack
	var raw net.Conn     // the connection, taken at the hijack
	srv := wsServer(func(c *websocket.Conn) {
		stop, gone := make(chan struct{}), make(chan struct{})
		var once sync.Once
		if !s.conns.add(c, func() { once.Do(func() { close(stop) }) }) {
			writeClose(c, closeGoingAway, "sidecar shutting down")
			return
		}
		defer s.conns.remove(c)
		wt, initial := s.reg.table.watchFrom(service, time.Now())
		defer s.reg.table.unwatch(wt)
		in := watcherInput{pings: make(chan []byte, 1), failed: make(chan *wsFailure, 1), gone: gone, closeCode: new(int), heard: new(atomic.Bool), conn: raw}
		go in.read(br)
		s.streamWatch(c, wt, initial, stop, in)
	})
	srv.ServeHTTP(readerTaker{ResponseWriter: w, br: &br, conn: &raw}, r)
}

// readerTaker keeps the connection's reader at the hijack, for the watch's
// own frame reader: x/net/websocket lets through frames RFC 6455 says
// must fail the connection, and echoes pings of any size. It keeps the
// connection too, whose send queue tells a watcher reading its backlog
// from a silent one.
type readerTaker struct {
	http.ResponseWriter
	br   **bufio.Reader
	conn *net.Conn
}

func (t readerTaker) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	conn, brw, err := http.NewResponseController(t.ResponseWriter).Hijack()
	if err == nil {
		*t.br, *t.conn = brw.Reader, conn
	}
	return conn, brw, err
}

// watcherInput is what a watcher sends, as its writer needs to know it:
// pings to answer, a frame that fails the connection, and the end.
type watcherInput struct {
	pings     chan []byte     // the latest ping's payload; older ones may go unanswered (RFC 6455 section 5.5.3)
	failed    chan *wsFailure // sent before gone closes
	gone      chan struct{}
	closeCode *int         // the code to answer the watcher's close with, set before gone closes
	heard     *atomic.Bool // set by every read; cleared by the writer's pings
	conn      net.Conn     // the connection under the WebSocket
}

// read reads the watcher's frames with the broker's frame reader until the
// connection ends. A watcher has nothing to say: its messages are dropped.
func (in watcherInput) read(br *bufio.Reader) {
	defer close(in.gone)
	br = bufio.NewReaderSize(heardReader{br, in.heard}, 512)
	r := &wsReader{br: br, max: 4 << 10, limit: "a watch takes no messages, only control frames", onPing: func(p []byte) error {
		select {
		case in.pings <- bytes.Clone(p):
		default:
		}
		return nil
	}}
	for {
		_, err := r.next()
		var fail *wsFailure
		if errors.As(err, &fail) {
			in.failed <- fail
		}
		if err != nil {
			*in.closeCode = r.answerCode()
			return
		}
	}
}

// heardReader marks every read that brings bytes.
type heardReader struct {
	r     io.Reader
	heard *atomic.Bool
}

func (h heardReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	if n > 0 {
		h.heard.Store(true)
	}
	return n, err
}

// streamWatch is the watch connection's only writer.
func (s *sidecar) streamWatch(c *websocket.Conn, wt *watcher, initial []record, stop <-chan struct{}, in watcherInput) {
	send := func(ev Event) bool {
		data, _ := json.Marshal(ev)
		c.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, err := c.Write(data)
		return err == nil
	}
	for _, rec := range initial {
		if !send(eventOf("create", rec)) {
			return
		}
	}
	ping := time.NewTicker(s.watchPing)
	defer ping.Stop()
	in.heard.Store(true) // the handshake: silence counts from it
	quiet := 0           // pings without a read since
	var taking sendProgress
	for {
		select {
		case <-in.gone:
			select {
			case fail := <-in.failed:
				writeClose(c, fail.code, fail.reason)
			default:
				answerClose(c, *in.closeCode)
			}
			return
		case p := <-in.pings:
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if writeControl(c, websocket.PongFrame, p) != nil {
				return
			}
		case <-stop:
			writeClose(c, closeGoingAway, "sidecar shutting down")
			return
		case evs, ok := <-wt.ch:
			if !ok {
				writeClose(c, closeTryAgainLater, "watcher fell behind; reconnect")
				return
			}
			for _, ev := range evs {
				if !send(ev) {
					return
				}
			}
		case <-ping.C:
			// A watcher silent, not even a pong, for reapAfter pings is
			// gone (its peer vanished, or froze) and gives back its slot.
			if in.heard.Swap(false) || taking.took(in.conn) {
				quiet = 0
			} else if quiet++; quiet >= reapAfter {
				s.log.Debug("closing a silent registry watch", "remote", c.Request().RemoteAddr)
				return
			}
			c.SetWriteDeadline(time.Now().Add(10 * time.Second))
			if writeControl(c, websocket.PingFrame, nil) != nil {
				return
			}
		}
	}
}

// serviceBody is a service as a request's body: a Service's keys, in any
// case, and go-micro's endpoints, which are taken and ignored.
type serviceBody struct {
	Service
	Endpoints json.RawMessage `json:"endpoints"`
}

// decodeServiceBody decodes a request's service, refusing any other key:
// a misspelled "version" or "metadata" would register, or deregister,
// the node without it. (Values read from a backend are not held to this:
// other tools write them.)
func decodeServiceBody(data []byte) (Service, error) {
	if !utf8.Valid(data) {
		// encoding/json would store U+FFFD for each bad byte: two
		// metadata keys in Latin-1 could become one, a value lost.
		return Service{}, errors.New("body is not UTF-8, as JSON must be (RFC 8259 section 8.1)")
	}
	var b serviceBody
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) { // the path of a field of the embedded Service starts with it
			te.Field = strings.TrimPrefix(te.Field, "Service.")
		}
		if key, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
			return Service{}, fmt.Errorf("unknown key %s: a service has name, version, metadata and nodes, a node id, address, port and metadata", truncate(key, 64))
		}
		return Service{}, serviceJSONError(data, err)
	}
	if dec.More() {
		return Service{}, errors.New("invalid service JSON: trailing data after the object")
	}
	for i, n := range b.Nodes {
		// A lookup's answer gives each node its version when it merges
		// several; posted back, a node would leave its own.
		if n.Version != "" && n.Version != b.Version {
			return Service{}, fmt.Errorf("nodes[%d]: version %q is not the service's %q: register each version's nodes with it as the service's version", i, truncate(n.Version, 64), truncate(b.Version, 64))
		}
	}
	return b.Service, nil
}
