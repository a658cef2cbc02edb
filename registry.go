package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Service is the ecosystem's service record: one name and version with the
// nodes that serve it. The JSON keys are the seed's, lower case; decoding is
// case-insensitive, as encoding/json already is, so the "Name"/"Nodes"/"Id"
// of older micro examples decode too.
type Service struct {
	Name     string            `json:"name"`
	Version  string            `json:"version"`
	Metadata map[string]string `json:"metadata"`
	Nodes    []Node            `json:"nodes"`
}

// Node is one instance of a service. Version is set when a lookup merges the
// nodes of several versions, so that they stay distinguishable.
type Node struct {
	ID       string            `json:"id"`
	Address  string            `json:"address"`
	Port     int               `json:"port"`
	Metadata map[string]string `json:"metadata"`
	Version  string            `json:"version,omitempty"`
}

// Limits on what one service record may hold. They keep a single POST from
// filling memory; the node count of the whole table is bounded separately.
const (
	maxNameLen     = 255 // a DNS name's length, the longest name any backend can carry
	maxIDLen       = 255
	maxMetadata    = 64
	maxMetadataLen = 1024 // per key plus value
	maxNodesPerReq = 256
)

// errNotFound is returned by lookups of a service nobody has registered.
var errNotFound = errors.New("service not found")

// serviceJSONError explains why a service body did not decode: a body that
// is no JSON object at all (a form, from curl -d name=foo) is told what
// one looks like rather than where the JSON parser stumbled.
func serviceJSONError(data []byte, err error) error {
	const example = `{"name":"foo","nodes":[{"id":"foo-1","address":"127.0.0.1:9090"}]}`
	switch b := bytes.TrimSpace(data); {
	case len(b) == 0:
		return errors.New("the body is empty: send a service as a JSON object, such as " + example)
	case b[0] != '{':
		return fmt.Errorf("the body must be a service as a JSON object, such as %s; got %q", example, truncate(string(b), 64))
	}
	return fmt.Errorf("invalid service JSON: %s", jsonErrorText(err))
}

// decodeService parses and validates a service record from a request body.
// Errors name the offending field.
func decodeService(data []byte) (Service, error) {
	var s Service
	dec := json.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&s); err != nil {
		return Service{}, serviceJSONError(data, err)
	}
	if dec.More() {
		return Service{}, errors.New("invalid service JSON: trailing data after the object")
	}
	if err := normalizeService(&s); err != nil {
		return Service{}, err
	}
	return s, nil
}

// normalizeService validates s in place and fills what the older shapes
// leave out: an address given as host:port with no port is split.
func normalizeService(s *Service) error {
	s.Name = strings.TrimSpace(s.Name)
	if s.Name == "" {
		return errors.New("name is required")
	}
	if err := checkNameAndVersion(s.Name, s.Version); err != nil {
		return err
	}
	if err := checkMetadata("metadata", s.Metadata); err != nil {
		return err
	}
	if s.Metadata == nil {
		s.Metadata = map[string]string{}
	}
	if s.Nodes == nil {
		s.Nodes = []Node{}
	}
	if len(s.Nodes) > maxNodesPerReq {
		return fmt.Errorf("nodes: at most %d per request", maxNodesPerReq)
	}
	seen := make(map[string]bool, len(s.Nodes))
	for i := range s.Nodes {
		n := &s.Nodes[i]
		if err := normalizeNode(n); err != nil {
			return fmt.Errorf("nodes[%d]: %w", i, err)
		}
		if seen[n.ID] {
			return fmt.Errorf("nodes[%d]: id %q appears twice", i, n.ID)
		}
		seen[n.ID] = true
		n.Version = ""
	}
	return nil
}

// checkNameAndVersion applies the rules of a service's name and version.
func checkNameAndVersion(name, version string) error {
	if len(name) > maxNameLen || !validName(name) {
		return fmt.Errorf("name %q: use up to %d printable ASCII characters without spaces or '/'", truncate(name, 64), maxNameLen)
	}
	if len(version) > maxNameLen || !validName(version) {
		return fmt.Errorf("version %q: use printable ASCII characters without spaces or '/'", truncate(version, 64))
	}
	return nil
}

// checkNodeID trims a node's id and applies its rules.
func checkNodeID(n *Node) error {
	n.ID = strings.TrimSpace(n.ID)
	if n.ID == "" {
		return errors.New("id is required")
	}
	if len(n.ID) > maxIDLen || !validName(n.ID) {
		return fmt.Errorf("id %q: use up to %d printable ASCII characters without spaces or '/'", truncate(n.ID, 64), maxIDLen)
	}
	return nil
}

func normalizeNode(n *Node) error {
	if err := checkNodeID(n); err != nil {
		return err
	}
	host, port, err := splitAddress(n.Address, n.Port)
	if err != nil {
		return err
	}
	n.Address, n.Port = host, port
	if n.Metadata == nil {
		n.Metadata = map[string]string{}
	}
	return checkMetadata("metadata", n.Metadata)
}

// validNodeHost reports whether h is an IP address or a host name a resolver
// could look up (RFC 1123 labels; underscores too, as Docker's names have
// them). A node at 999.1.1.1, a@b or -bad- would only fail every call.
func validNodeHost(h string) bool {
	if _, err := netip.ParseAddr(h); err == nil {
		return true
	}
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return false
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for _, c := range []byte(l) {
			if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	// A last label of digits alone makes an IP address that is not one.
	return strings.Trim(labels[len(labels)-1], "0123456789") != ""
}

// validPort says whether p, digits, is a port a connection can be made to.
func validPort(p string) bool {
	n, err := strconv.Atoi(p)
	return err == nil && n >= 1 && n <= 65535
}

// splitAddress accepts "host" with a separate port, or "host:port" with port
// 0, and returns the host and port. IPv6 literals may come bracketed.
func splitAddress(address string, port int) (string, int, error) {
	address = strings.TrimSpace(address)
	original := address
	if address == "" {
		return "", 0, errors.New("address is required")
	}
	if h, p, err := net.SplitHostPort(address); err == nil {
		pn, perr := strconv.Atoi(p)
		if perr != nil || pn < 1 || pn > 65535 || p[0] < '1' || p[0] > '9' { // no sign, no leading zero
			return "", 0, fmt.Errorf("address %q: port must be 1-65535", address)
		}
		if port != 0 && port != pn {
			return "", 0, fmt.Errorf("address %q disagrees with port %d", address, port)
		}
		address, port = h, pn
	}
	bracketed := strings.HasPrefix(original, "[")
	address = strings.TrimSuffix(strings.TrimPrefix(address, "["), "]")
	if len(address) > maxNameLen || !validNodeHost(address) || bracketed && !strings.Contains(address, ":") { // brackets hold IPv6 alone

		return "", 0, fmt.Errorf("address %q is not a host name or IP address", truncate(address, 64))
	}
	if why := unreachableIP(address); why != "" {
		return "", 0, fmt.Errorf("address %q cannot be called: %s", address, why)
	}
	if port < 1 || port > 65535 {
		return "", 0, fmt.Errorf("port %d out of range 1-65535 (or give address as host:port)", port)
	}
	return canonicalHost(address), port, nil
}

// canonicalHost spells an address as peers will hear it back: an IP
// address in lower case, IPv4 without its IPv6 mapping, and a name in
// lower case (names ignore case, RFC 4343). The broker's entries are
// signed over their address as written (see peerProof), and the multicast
// registry gives back addresses in this one form: an entry advertised as
// LOCALHOST would fail its proof at every peer.
func canonicalHost(host string) string {
	if ip, err := netip.ParseAddr(host); err == nil {
		return ip.Unmap().String()
	}
	return strings.ToLower(host)
}

// unreachableIP says why an IP address names no node another host can
// call, or "" when it may. 0.0.0.0, dialed, reaches the dialer's own
// host: a node registered so would have every sidecar call itself. Its
// other spellings (IPv4-mapped, with a zone) are dialed the same way.
func unreachableIP(host string) string {
	a, err := netip.ParseAddr(host)
	a = a.WithZone("").Unmap()
	switch {
	case err != nil:
		return ""
	case a.IsUnspecified():
		return "it is where a server listens (every interface), not where others reach it; give the host's address"
	case a.IsMulticast():
		return "it is a multicast address"
	case a == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
		return "it is the broadcast address"
	}
	return ""
}

// hostPort joins a node's address and port for dialing.
func (n Node) hostPort() string { return net.JoinHostPort(n.Address, strconv.Itoa(n.Port)) }

func checkMetadata(field string, md map[string]string) error {
	if len(md) > maxMetadata {
		return fmt.Errorf("%s: at most %d keys", field, maxMetadata)
	}
	for k, v := range md {
		if k == "" || len(k)+len(v) > maxMetadataLen {
			return fmt.Errorf("%s: key %q: keys must be non-empty and key plus value at most %d bytes", field, truncate(k, 64), maxMetadataLen)
		}
	}
	return nil
}

// validName reports whether s is printable ASCII without spaces or slashes:
// names travel in URL paths, file names, DNS labels and etcd keys.
func validName(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c <= ' ' || c >= 0x7f || c == '/' {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// record is one node of one service version in the table: the unit every
// backend stores, announces and expires.
type record struct {
	Service  string            `json:"service"`
	Version  string            `json:"version,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"` // the service's metadata
	Node     Node              `json:"node"`
	Expires  time.Time         `json:"expires"` // zero: never
}

func (r record) key() string { return r.Service + "\x00" + r.Node.ID }

func (r record) expired(now time.Time) bool { return !r.Expires.IsZero() && !now.Before(r.Expires) }

// same reports whether a and b describe the same node in the same way,
// ignoring expiry, so that a refresh is not reported as an update.
func (r record) same(o record) bool {
	return r.Service == o.Service && r.Version == o.Version && r.Node.Address == o.Node.Address &&
		r.Node.Port == o.Node.Port && mapsEqual(r.Metadata, o.Metadata) && mapsEqual(r.Node.Metadata, o.Node.Metadata)
}

func mapsEqual(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

// recordsOf splits a service into its per-node records, expiring at expires.
func recordsOf(s Service, expires time.Time) []record {
	out := make([]record, 0, len(s.Nodes))
	for _, n := range s.Nodes {
		n.Version = ""
		out = append(out, record{Service: s.Name, Version: s.Version, Metadata: s.Metadata, Node: n, Expires: expires})
	}
	return out
}

// assemble groups records into services, one per name and version, sorted by
// name, version and node id so that answers are stable.
func assemble(recs []record) []Service {
	sortRecords(recs)
	var out []Service
	for _, r := range recs {
		if len(out) == 0 || out[len(out)-1].Name != r.Service || out[len(out)-1].Version != r.Version {
			out = append(out, Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata})
		}
		last := &out[len(out)-1]
		last.Nodes = append(last.Nodes, r.Node)
	}
	return out
}

// merge joins the versions of one service into a single record in the seed's
// shape. With one version it is that version's record; with several, the
// service's version is empty, every node carries its own, and the
// service's metadata is that of the node whose id sorts first, as within
// one version (assemble).
func merge(versions []Service) Service {
	if len(versions) == 1 {
		return versions[0]
	}
	first := versions[0]
	for _, v := range versions[1:] {
		if len(v.Nodes) > 0 && (len(first.Nodes) == 0 || v.Nodes[0].ID < first.Nodes[0].ID) {
			first = v
		}
	}
	out := Service{Name: versions[0].Name, Metadata: first.Metadata, Nodes: []Node{}}
	if out.Metadata == nil {
		out.Metadata = map[string]string{}
	}
	for _, v := range versions {
		for _, n := range v.Nodes {
			n.Version = v.Version
			out.Nodes = append(out.Nodes, n)
		}
	}
	return out
}

// Event is one change in the table, as sent to watchers.
type Event struct {
	Action  string  `json:"action"` // create, update or delete
	Service Service `json:"service"`
}

// diff compares two snapshots of the table and returns the events that turn
// old into new, in key order.
func diff(old, new map[string]record, now time.Time) []Event {
	var evs []Event
	for k, n := range new {
		o, ok := old[k]
		evs = append(evs, putEvents(o, ok, n, now)...)
	}
	for k, o := range old {
		if _, ok := new[k]; !ok {
			evs = append(evs, eventOf("delete", o))
		}
	}
	return evs
}

// sortEvents puts a change's events in the order watchers get them: by
// service name and node id. Stable: a node's move to another version
// keeps its delete before its create.
func sortEvents(evs []Event) {
	slices.SortStableFunc(evs, func(a, b Event) int {
		if c := strings.Compare(a.Service.Name, b.Service.Name); c != 0 {
			return c
		}
		return strings.Compare(a.Service.Nodes[0].ID, b.Service.Nodes[0].ID)
	})
}

// changeEvents tells watchers that a node changed: an update, or, when it
// moved to another version, a delete from the old one and a create in the
// new, since a watcher may keep nodes by service and version (go-micro's
// cache does) and would keep a ghost in the old.
func changeEvents(old, new record) []Event {
	if old.Version != new.Version {
		return []Event{eventOf("delete", old), eventOf("create", new)}
	}
	return []Event{eventOf("update", new)}
}

func eventOf(action string, r record) Event {
	return Event{Action: action, Service: Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}}
}

// errTableFull is returned when a registration would take the table past its
// node limit.
var errTableFull = errors.New("registry is full")

// watchQueue is how many changes a watcher may fall behind before it is
// cut off; a watcher that slow learns of it by its channel closing and
// reconnects. A change is one write to the table, with all its events (a
// DELETE of 300 nodes, a sweep of what expired), so that a watcher that
// keeps up is not cut off by one large change.
const watchQueue = 256

// watcher receives the events of one service, or of all when service is "",
// a change's events at a time.
type watcher struct {
	service string
	ch      chan []Event // closed when the watcher is stopped or overflows
}

// table is the in-memory registry every lookup reads. Backends keep it
// current; it never touches the network or the disk. Records are indexed by
// service name, so a lookup costs the size of one service, not the table.
type table struct {
	maxNodes int // bound on the number of records; 0 means no bound

	mu       sync.RWMutex                 // guards services, count, watchers, lookups, gen
	services map[string]map[string]record // service name -> record key -> record
	count    int
	watchers map[*watcher]struct{}
	// lookups holds assembled answers of lookup, so that a call does not
	// sort and copy a service's records each time; an entry is dropped when
	// its service changes and ignored once one of its records expires. It
	// holds at most one entry per service in the table.
	lookups map[string]lookupEntry
	gen     uint64 // counts changes, so that a stale answer is not cached
}

// lookupEntry is an assembled answer, valid until its first record expires.
type lookupEntry struct {
	services []Service
	until    time.Time // zero: no record expires
}

func newTable(maxNodes int) *table {
	return &table{maxNodes: maxNodes, services: map[string]map[string]record{}, watchers: map[*watcher]struct{}{}, lookups: map[string]lookupEntry{}}
}

// upsert adds or refreshes records; it adds none if that would take the
// table past its limit.
func (t *table) upsert(recs ...record) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	evs, err := t.roomLocked(recs)
	if err == nil {
		evs = append(evs, t.putLocked(recs)...)
	}
	t.notifyLocked(evs)
	return err
}

// put adds or refreshes records whatever the table's limit: for a backend
// that bounds them itself (mDNS keeps its own nodes and its peers' apart).
func (t *table) put(recs ...record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.notifyLocked(t.putLocked(recs))
}

// putLocked sets recs and returns the events of what changed.
func (t *table) putLocked(recs []record) []Event {
	var evs []Event
	now := time.Now()
	for _, r := range recs {
		old, ok := t.services[r.Service][r.key()]
		t.setLocked(r)
		evs = append(evs, putEvents(old, ok, r, now)...)
	}
	return evs
}

// putEvents tells watchers what setting r over old (held: ok) changed. A
// record that expired before the sweep came to it had already left
// lookups, so its return is a delete and a create: watchers following
// lookups must not miss the gap.
func putEvents(old record, ok bool, r record, now time.Time) []Event {
	switch {
	case !ok:
		return []Event{eventOf("create", r)}
	case old.expired(now) && !r.expired(now):
		return []Event{eventOf("delete", old), eventOf("create", r)}
	case !old.same(r):
		return changeEvents(old, r)
	}
	return nil
}

// room says whether recs would fit under the table's limit, as upsert
// would find it: a backend that writes elsewhere first (etcd) asks before,
// so that a refused registration is seen by no other sidecar.
func (t *table) room(recs []record) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	evs, err := t.roomLocked(recs)
	t.notifyLocked(evs)
	return err
}

// roomLocked is room; it returns the deletes of the expired records it
// swept to make room, for the caller to notify.
func (t *table) roomLocked(recs []record) ([]Event, error) {
	added := t.newKeysLocked(recs)
	if t.maxNodes == 0 || added == 0 || t.count+added <= t.maxNodes {
		return nil, nil
	}
	// Expired records are swept once a second; until then they must
	// not fill the table that lookups already show without them.
	evs := t.sweepLocked(time.Now())
	if t.count+t.newKeysLocked(recs) > t.maxNodes {
		return evs, fmt.Errorf("%w: %d nodes is the limit (--registry_max_nodes)", errTableFull, t.maxNodes)
	}
	return evs, nil
}

// upsertFitting adds or refreshes what of recs fits under the table's
// limit, for a backend whose changes cannot be refused (a watch's): every
// record the table holds already, and new ones, in order, while there is
// room. It returns those it left out.
func (t *table) upsertFitting(recs []record) (left []record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	evs, err := t.roomLocked(recs) // sweeps what expired, if that makes room
	if err == nil {
		t.notifyLocked(append(evs, t.putLocked(recs)...))
		return nil
	}
	room := t.maxNodes - t.count
	fit := make([]record, 0, len(recs))
	for _, r := range recs {
		_, held := t.services[r.Service][r.key()]
		switch {
		case held:
			fit = append(fit, r)
		case room > 0:
			room--
			fit = append(fit, r)
		default:
			left = append(left, r)
		}
	}
	t.notifyLocked(append(evs, t.putLocked(fit)...))
	return left
}

// newKeysLocked counts the records of recs the table does not hold.
func (t *table) newKeysLocked(recs []record) int {
	n := 0
	for _, r := range recs {
		if _, ok := t.services[r.Service][r.key()]; !ok {
			n++
		}
	}
	return n
}

// remove deletes the records with the keys of recs.
func (t *table) remove(recs ...record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var evs []Event
	for _, r := range recs {
		if old, ok := t.services[r.Service][r.key()]; ok {
			t.deleteLocked(old)
			evs = append(evs, eventOf("delete", old))
		}
	}
	t.notifyLocked(evs)
}

// replace makes the table hold exactly recs, as read from a backend that
// holds the whole registry (the file).
func (t *table) replace(recs []record, now time.Time) {
	next := make(map[string]record, len(recs))
	for _, r := range recs {
		next[r.key()] = r
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	old := make(map[string]record, t.count)
	for _, byKey := range t.services {
		for k, r := range byKey {
			old[k] = r
		}
	}
	t.services = map[string]map[string]record{}
	t.count = 0
	clear(t.lookups)
	for _, r := range next {
		t.setLocked(r)
	}
	t.notifyLocked(diff(old, next, now))
}

// sweep drops the records expired at now.
func (t *table) sweep(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.notifyLocked(t.sweepLocked(now))
}

// sweepLocked removes the records expired at now and returns their delete
// events.
func (t *table) sweepLocked(now time.Time) []Event {
	var gone []record
	for _, byKey := range t.services {
		for _, r := range byKey {
			if r.expired(now) {
				gone = append(gone, r)
			}
		}
	}
	evs := make([]Event, 0, len(gone))
	for _, r := range gone {
		t.deleteLocked(r)
		evs = append(evs, eventOf("delete", r))
	}
	return evs
}

// sortRecords orders records as answers are: by service name, version
// and node id.
func sortRecords(recs []record) {
	slices.SortFunc(recs, func(a, b record) int {
		if c := strings.Compare(a.Service, b.Service); c != 0 {
			return c
		}
		if c := strings.Compare(a.Version, b.Version); c != 0 {
			return c
		}
		return strings.Compare(a.Node.ID, b.Node.ID)
	})
}

func (t *table) setLocked(r record) {
	delete(t.lookups, r.Service)
	t.gen++
	byKey := t.services[r.Service]
	if byKey == nil {
		byKey = map[string]record{}
		t.services[r.Service] = byKey
	}
	if _, ok := byKey[r.key()]; !ok {
		t.count++
	}
	byKey[r.key()] = r
}

func (t *table) deleteLocked(r record) {
	byKey := t.services[r.Service]
	if _, ok := byKey[r.key()]; !ok {
		return
	}
	delete(byKey, r.key())
	delete(t.lookups, r.Service)
	t.gen++
	t.count--
	if len(byKey) == 0 {
		delete(t.services, r.Service)
	}
}

// notifyLocked tells the watchers what changed. A watcher whose queue is
// full is dropped rather than allowed to block the table.
func (t *table) notifyLocked(evs []Event) {
	if len(t.watchers) == 0 || len(evs) == 0 {
		return
	}
	sortEvents(evs)
	for w := range t.watchers {
		mine := evs
		if w.service != "" {
			mine = nil
			for _, ev := range evs {
				if ev.Service.Name == w.service {
					mine = append(mine, ev)
				}
			}
		}
		if len(mine) == 0 {
			continue
		}
		select {
		case w.ch <- mine:
		default:
			delete(t.watchers, w)
			close(w.ch)
		}
	}
}

// lookup returns the live versions of a service, sorted by version.
// The answer is shared: callers must not modify it.
func (t *table) lookup(name string, now time.Time) ([]Service, error) {
	t.mu.RLock()
	if e, ok := t.lookups[name]; ok && (e.until.IsZero() || now.Before(e.until)) {
		t.mu.RUnlock()
		return e.services, nil
	}
	gen := t.gen
	byKey := t.services[name]
	recs := make([]record, 0, len(byKey))
	var until time.Time
	for _, r := range byKey {
		if !r.expired(now) {
			recs = append(recs, r)
			if !r.Expires.IsZero() && (until.IsZero() || r.Expires.Before(until)) {
				until = r.Expires
			}
		}
	}
	t.mu.RUnlock()
	if len(recs) == 0 {
		return nil, errNotFound
	}
	out := assemble(recs)
	t.mu.Lock()
	if t.gen == gen && len(t.services[name]) > 0 {
		t.lookups[strings.Clone(name)] = lookupEntry{services: out, until: until} // kept: not a piece of a request's head
	}
	t.mu.Unlock()
	return out, nil
}

// list returns every live service version.
func (t *table) list(now time.Time) []Service {
	recs := t.snapshot()
	out := assemble(live(recs, now))
	if out == nil {
		out = []Service{}
	}
	return out
}

// has reports whether name has records, live or not yet swept.
func (t *table) has(name string) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.services[name]) > 0
}

// holds reports whether the table has node id of service name, in any
// version, that has not expired.
func (t *table) holds(name, id string) bool {
	t.mu.RLock()
	defer t.mu.RUnlock()
	r, ok := t.services[name][record{Service: name, Node: Node{ID: id}}.key()]
	return ok && !r.expired(time.Now()) // an expired record waits for the sweep, unseen
}

// serviceCount and nodeCount size the table, for metrics.
func (t *table) serviceCount() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return len(t.services)
}

func (t *table) nodeCount() int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	return t.count
}

// snapshot returns a copy of every record, expired or not.
func (t *table) snapshot() []record {
	t.mu.RLock()
	defer t.mu.RUnlock()
	out := make([]record, 0, t.count)
	for _, byKey := range t.services {
		for _, r := range byKey {
			out = append(out, r)
		}
	}
	return out
}

// nodesToDeregister returns the nodes of s a DELETE removes: all when s
// names no version, else those not in the table under another version
// (one not in the table at all is kept: deleting it changes nothing).
func (t *table) nodesToDeregister(s Service) []Node {
	if s.Version == "" {
		return s.Nodes
	}
	t.mu.RLock()
	defer t.mu.RUnlock()
	keep := make([]Node, 0, len(s.Nodes))
	for _, n := range s.Nodes {
		if r, ok := t.services[s.Name][record{Service: s.Name, Node: n}.key()]; ok && r.Version != s.Version {
			continue
		}
		keep = append(keep, n)
	}
	return keep
}

// watchFrom subscribes to changes of one service ("" for all) and returns
// its live records at that moment, sorted, taken under the same lock: no
// change falls between the two, to be missed or told twice. The caller
// must call unwatch when done.
func (t *table) watchFrom(service string, now time.Time) (*watcher, []record) {
	w := &watcher{service: service, ch: make(chan []Event, watchQueue)}
	t.mu.Lock()
	defer t.mu.Unlock()
	// Records expired but not yet swept go first, their deletes to the
	// other watchers: left in the table, a node posted again before the
	// sweep would be no change, and this watcher, whose first records
	// leave it out, would never hear of it.
	t.notifyLocked(t.sweepLocked(now))
	t.watchers[w] = struct{}{}
	var recs []record
	for name, byKey := range t.services {
		if service != "" && name != service {
			continue
		}
		for _, r := range byKey {
			if !r.expired(now) {
				recs = append(recs, r)
			}
		}
	}
	sortRecords(recs)
	return w, recs
}

// watch subscribes to changes of one service ("" for all). The caller must
// call unwatch when done.
func (t *table) watch(service string) *watcher {
	w := &watcher{service: service, ch: make(chan []Event, watchQueue)}
	t.mu.Lock()
	t.watchers[w] = struct{}{}
	t.mu.Unlock()
	return w
}

func (t *table) unwatch(w *watcher) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.watchers[w]; ok {
		delete(t.watchers, w)
		close(w.ch)
	}
}

// backend synchronises the table with the world. register and deregister
// act on the backend's store and then on the table, so that a registration
// is visible locally as soon as they return.
type backend interface {
	register(s Service, ttl time.Duration) error
	deregister(s Service) error
	// status says whether the backend is working, for /health.
	status() error
	close() error
}

// goodbyeUnheard asks the backend to drop, from other sidecars' views,
// entries of s it has not heard of (see mdnsBackend.goodbyeUnheard), and
// reports whether it does; a shared store's backend has nothing unheard.
func (r *registry) goodbyeUnheard(s Service) bool {
	b, ok := r.backend.(interface{ goodbyeUnheard(Service) })
	if ok {
		b.goodbyeUnheard(s)
	}
	return ok
}

// batchBackend is a backend for which a change of many entries costs
// about what a change of one does (the file registry rewrites its whole
// file for either): refresh and shutdown hand it every entry at once.
type batchBackend interface {
	registerAll(ss []Service, ttl time.Duration) error
	deregisterAll(ss []Service) error
}

// keepingBackend is a backend shared with other sidecars, which needs to
// know which entries the registry keeps alive (record keys), to warn when
// another writer changes one, and whom to tell when others' changes came
// in, so that a kept entry they removed is written again at once.
type keepingBackend interface {
	setKeeps(keeps func(key string) bool, changed func())
}

// memoryBackend keeps the registry in this sidecar alone.
type memoryBackend struct {
	t   *table
	now func() time.Time
}

func (m *memoryBackend) register(s Service, ttl time.Duration) error {
	return m.t.upsert(recordsOf(s, expiry(m.now(), ttl))...)
}

func (m *memoryBackend) deregister(s Service) error {
	m.t.remove(recordsOf(s, time.Time{})...)
	return nil
}

func (m *memoryBackend) status() error { return nil }
func (m *memoryBackend) close() error  { return nil }

func keysOf(s Service) []string {
	keys := make([]string, 0, len(s.Nodes))
	for _, r := range recordsOf(s, time.Time{}) {
		keys = append(keys, r.key())
	}
	return keys
}

// expiry is when a registration made at now with ttl runs out; a zero ttl
// never does.
func expiry(now time.Time, ttl time.Duration) time.Time {
	if ttl <= 0 {
		return time.Time{}
	}
	return now.Add(ttl)
}

// parseTTL reads the ?ttl= of a registration: a Go duration ("30s") or a
// number of seconds, from 1s to a day.
func parseTTL(q url.Values) (time.Duration, error) {
	if !q.Has("ttl") {
		return 0, nil
	}
	s := q.Get("ttl")
	if s == "" {
		// Not "no ttl": a client that sent the parameter meant one, and
		// the entry would otherwise live as long as this sidecar.
		return 0, errors.New("ttl is empty: give a duration such as 30s, or leave the parameter out for an entry this sidecar keeps alive")
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		n, nerr := strconv.Atoi(s)
		if errors.Is(nerr, strconv.ErrRange) {
			n = -1 // a number of seconds, past any bound: out of range below
		} else if nerr != nil {
			return 0, fmt.Errorf("ttl %q: want a duration such as 30s or a number of seconds", truncate(s, 32))
		}
		if n < 1 || n > int(maxRegisterTTL/time.Second) { // before the multiplication, which could wrap
			return 0, fmt.Errorf("ttl %q: must be between 1s and 24h", truncate(s, 32))
		}
		d = time.Duration(n) * time.Second
	}
	if d < time.Second || d > maxRegisterTTL {
		return 0, fmt.Errorf("ttl %q: must be between 1s and 24h", truncate(s, 32))
	}
	return d, nil
}

// registry is what the rest of the sidecar uses: the table for lookups, the
// backend for changes, and the registrations this sidecar owns. An owned
// registration (the app's own, or one posted without a ttl) lives as long as
// the sidecar: it is refreshed before its TTL runs out and removed on
// shutdown, so a crashed sidecar's entries expire everywhere.
type registry struct {
	name    string // backend name, for /health and logs
	table   *table
	backend backend
	ttl     time.Duration // TTL of owned registrations
	now     func() time.Time

	mu    sync.Mutex         // guards owned, sidecars and closed
	owned map[string]Service // by record key, one node each
	// sidecars marks the keys of owned that are the sidecar's own (the
	// app, the broker's topics), refreshed first where room is short.
	sidecars map[string]bool
	closed   bool // deregisterOwned ran: nothing more is owned
	// renewed is when each entry of owned was last written through the
	// backend: one not renewed for a TTL while the backend fails may have
	// run out there (lapsed), though the table, not synchronised, holds it.
	renewed map[string]time.Time

	// writeMu orders the backend writes of owned entries: a refresh's
	// re-registration against a deregistration of the same entry, which
	// would otherwise be undone by a refresh that read owned just before.
	// It is held for one entry's write at a time.
	writeMu sync.Mutex

	soon chan struct{} // restoreLost's request to refreshLoop; nil: none taken
}

// restoreEvery spaces the refreshes restoreLost asks for: an entry
// missing for a reason a refresh cannot fix (a full table) would
// otherwise cost a whole refresh at every change others make.
const restoreEvery = time.Second

// restoreLost asks refreshLoop to write this sidecar's entries again at
// once, rather than at the next interval, when one it keeps is missing
// from the table: another sidecar removed it (one that kept the same node
// id and stopped, as in a rolling restart with a fixed --server_id; a
// DELETE through another sidecar; a registry file deleted by hand).
func (r *registry) restoreLost() {
	if !r.lostOwned() {
		return
	}
	select {
	case r.soon <- struct{}{}:
	default: // one is due already, or nobody takes them
	}
}

// lostOwned reports whether an entry this sidecar keeps is missing from
// the table.
func (r *registry) lostOwned() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range r.owned {
		if !r.table.holds(s.Name, s.Nodes[0].ID) {
			return true
		}
	}
	return false
}

// errShuttingDown refuses a registration the sidecar would have to keep
// alive after it has let go of everything it keeps alive.
var errShuttingDown = errors.New("the sidecar is shutting down and keeps nothing alive any more; register with ?ttl= or on another sidecar")

// maxOwned bounds the registrations one sidecar refreshes for its clients.
// The sidecar's own (the app, the broker's topics) may pass it: they are
// bounded elsewhere (one app, --broker_max_subscribers), and clients that
// filled the table must not cut the app or a subscription off unseen.
const maxOwned = 4096

// Register adds s for a client. With ttl 0 the sidecar owns it and keeps
// it alive; with a ttl it expires unless registered again in time.
func (r *registry) Register(s Service, ttl time.Duration) error { return r.register(s, ttl, false) }

// registerOwn adds s, one of the sidecar's own registrations, and keeps
// it alive; maxOwned does not hold it back.
func (r *registry) registerOwn(s Service) error { return r.register(s, 0, true) }

func (r *registry) register(s Service, ttl time.Duration, own bool) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	if r.closed && ttl == 0 {
		r.mu.Unlock()
		return errShuttingDown
	}
	prev := map[string]*Service{} // what owned held for each key, to undo a refused registration
	undoLocked := func() {
		for k, old := range prev {
			if old == nil {
				delete(r.owned, k)
				delete(r.sidecars, k)
			} else {
				r.owned[k] = *old
			}
		}
	}
	for _, n := range s.Nodes {
		one := Service{Name: s.Name, Version: s.Version, Metadata: s.Metadata, Nodes: []Node{n}}
		k := recordsOf(one, time.Time{})[0].key()
		if old, ok := r.owned[k]; ok {
			prev[k] = &old
		} else {
			prev[k] = nil
		}
		if ttl > 0 {
			delete(r.owned, k)
			delete(r.sidecars, k)
			delete(r.renewed, k)
			continue
		}
		if _, ok := r.owned[k]; !ok && !own && len(r.owned) >= maxOwned {
			undoLocked()
			r.mu.Unlock()
			return fmt.Errorf("%w: this sidecar already keeps %d registrations alive; pass ?ttl= to register without it", errTableFull, maxOwned)
		}
		r.owned[k] = one
		if own {
			if r.sidecars == nil {
				r.sidecars = map[string]bool{}
			}
			r.sidecars[k] = true
		}
	}
	r.mu.Unlock()
	kept := ttl == 0
	if kept {
		ttl = r.ttl
	}
	if err := r.backend.register(s, ttl); err != nil {
		// A refused registration is not kept alive by refresh.
		r.mu.Lock()
		undoLocked()
		r.mu.Unlock()
		return err
	}
	if kept {
		r.markRenewed(keysOf(s))
	}
	return nil
}

// markRenewed records that the owned entries under keys were written now.
func (r *registry) markRenewed(keys []string) {
	now := r.now()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.renewed == nil {
		r.renewed = map[string]time.Time{}
	}
	for _, k := range keys {
		if _, ok := r.owned[k]; ok {
			r.renewed[k] = now
		}
	}
}

// lapsed reports whether the entry owned under key k may have run out in
// the registry: the backend fails, and the entry was not renewed for a
// TTL.
func (r *registry) lapsed(k string) bool {
	if r.backend.status() == nil {
		return false
	}
	r.mu.Lock()
	at, ok := r.renewed[k]
	r.mu.Unlock()
	return ok && r.now().Sub(at) >= r.ttl
}

// Deregister removes s's nodes.
func (r *registry) Deregister(s Service) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	for _, k := range keysOf(s) {
		delete(r.owned, k)
		delete(r.sidecars, k)
		delete(r.renewed, k)
	}
	r.mu.Unlock()
	return r.backend.deregister(s)
}

// ownsAsSidecar reports whether the node of a record key is the sidecar's
// own (the app's, a broker topic's), not a client's.
func (r *registry) ownsAsSidecar(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.sidecars[key]
}

// keeps reports whether this sidecar keeps the node of a record key alive.
func (r *registry) keeps(key string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.owned[key]
	return ok
}

// owns reports whether this sidecar keeps every node of s alive.
func (r *registry) owns(s Service) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, k := range keysOf(s) {
		if _, ok := r.owned[k]; !ok {
			return false
		}
	}
	return len(s.Nodes) > 0
}

// GetService returns the live versions of a service.
func (r *registry) GetService(name string) ([]Service, error) { return r.table.lookup(name, r.now()) }

// GetServiceAt is GetService as of now, for a request that has read the
// clock already.
func (r *registry) GetServiceAt(name string, now time.Time) ([]Service, error) {
	return r.table.lookup(name, now)
}

// ListServices returns every live service version.
func (r *registry) ListServices() []Service { return r.table.list(r.now()) }

// refresh re-registers every owned entry with a fresh TTL. It is the step of
// refreshLoop; tests call it directly. A pass ends early when ctx ends (a
// shutdown waits for it before it deregisters) and at a failure that the
// backend reports as its own (etcd unreachable): each further entry would
// wait out the request timeout too, holding writes and the shutdown.
func (r *registry) refresh(ctx context.Context) error {
	if bb, ok := r.backend.(batchBackend); ok {
		err := r.refreshAll(bb)
		r.table.sweep(r.now())
		return err
	}
	r.mu.Lock()
	keys := make([]string, 0, len(r.owned))
	for k := range r.owned {
		keys = append(keys, k)
	}
	r.mu.Unlock()
	var errs []error
	for _, k := range keys {
		if ctx.Err() != nil {
			break
		}
		if err := r.refreshOne(k); err != nil {
			errs = append(errs, err)
			if r.backend.status() != nil {
				break
			}
		}
	}
	r.table.sweep(r.now())
	return errors.Join(errs...)
}

// refreshOne re-registers the entry owned under key k, as it is now: not
// at all when it was deregistered, or registered with a ttl, since refresh
// listed it.
func (r *registry) refreshOne(k string) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	s, ok := r.owned[k]
	r.mu.Unlock()
	if !ok {
		return nil
	}
	if err := r.backend.register(s, r.ttl); err != nil {
		return err
	}
	r.markRenewed([]string{k})
	return nil
}

// refreshAll re-registers every owned entry in one change, holding writeMu
// so that the entries are as they are now.
func (r *registry) refreshAll(bb batchBackend) error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	owned := make([]Service, 0, len(r.owned))
	for k, s := range r.owned { // the sidecar's own first: a full file takes them back first
		if r.sidecars[k] {
			owned = append(owned, s)
		}
	}
	for k, s := range r.owned {
		if !r.sidecars[k] {
			owned = append(owned, s)
		}
	}
	r.mu.Unlock()
	if len(owned) == 0 {
		return nil
	}
	if err := bb.registerAll(owned, r.ttl); err != nil {
		return err
	}
	var keys []string
	for _, s := range owned {
		keys = append(keys, keysOf(s)...)
	}
	r.markRenewed(keys)
	return nil
}

// refreshLoop calls refresh every interval until ctx ends, and sweeps
// expired entries every second so that watchers hear of them promptly.
func (r *registry) refreshLoop(ctx context.Context, interval time.Duration, log *slog.Logger) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	sweep := time.NewTicker(time.Second)
	defer sweep.Stop()
	failing := false           // logged when it starts and when it ends, not at every interval
	var last time.Time         // of the last refresh
	var later <-chan time.Time // a restore asked for within restoreEvery of the last refresh
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-r.soon:
			if wait := restoreEvery - time.Since(last); wait > 0 {
				if later == nil {
					later = time.After(wait)
				}
				continue
			}
		case <-later:
			later = nil
		case <-sweep.C:
			r.table.sweep(r.now())
			continue
		}
		last = time.Now()
		if ctx.Err() != nil {
			return // both were ready: a stop goes first
		}
		err := r.refresh(ctx)
		switch {
		case err != nil && !failing:
			log.Warn("refreshing registrations failed; retrying every interval until it works", "error", err)
		case err == nil && failing:
			log.Info("refreshing registrations works again")
		}
		failing = err != nil
	}
}

// deregisterOwned removes every registration this sidecar keeps alive, at
// shutdown.
func (r *registry) deregisterOwned() error {
	r.writeMu.Lock()
	defer r.writeMu.Unlock()
	r.mu.Lock()
	owned := slices.Collect(maps.Values(r.owned))
	r.owned, r.sidecars, r.renewed = map[string]Service{}, nil, nil
	r.closed = true
	r.mu.Unlock()
	if bb, ok := r.backend.(batchBackend); ok && len(owned) > 0 {
		return bb.deregisterAll(owned)
	}
	for i, s := range owned {
		if err := r.backend.deregister(s); err != nil {
			// The backend is failing (etcd not answering takes its whole
			// timeout per call): stop rather than hold the shutdown once
			// per entry. What is left lapses within its TTL.
			if left := len(owned) - i - 1; left > 0 {
				return fmt.Errorf("%w; %d more left to lapse within --register_ttl", err, left)
			}
			return err
		}
	}
	return nil
}
