package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"
)

// The etcd registry keeps one key per node of a service version:
//
//	<prefix><service>/<node id>  ->  the service JSON with that one node
//
// Names and ids never hold '/' (validName), so the layout is unambiguous;
// service names may hold ':' (the broker's topic:NAME). Each key is attached
// to its own lease, granted with the registration's TTL: a registration
// refreshed in time keeps its lease alive (POST /v3/lease/keepalive), one
// that is not refreshed vanishes with its lease, and a sidecar that dies
// takes its nodes with it within one TTL. One lease per key, not one per
// TTL, because a registration posted with ?ttl= must expire on its own when
// its poster stops refreshing it, even if the sidecar lives on.
//
// The table is filled by a range read of the prefix and kept current by a
// watch from the revision after it; a broken watch resumes from the last
// revision seen, and a compacted revision, a restored or replaced cluster
// means a fresh range read. Lookups read the table only.

// Defaults and bounds of the etcd registry.
const (
	defaultEtcdPrefix = "/micro/registry/"
	// etcdRangePage is how many keys one range request reads.
	etcdRangePage = 500
	// maxEtcdValue bounds a value the registry will parse. A service
	// record with the largest metadata allowed (two sets of 64 keys of
	// 1 KiB) is below it even when every byte is written escaped, six
	// bytes for one.
	maxEtcdValue = 1 << 20
	// maxWatchMessage bounds one line of the watch stream. The watch asks
	// etcd to split its messages at its --max-request-bytes (1.5 MiB by
	// default), so only a single event larger than this fails.
	maxWatchMessage = 32 << 20
	// maxBadKeys bounds the set of bad keys remembered so that each is
	// logged once; past it, further bad keys are counted and not logged.
	maxBadKeys = 1024
	// Backoff between attempts to reach etcd while none answers.
	etcdMinBackoff = 100 * time.Millisecond
	etcdMaxBackoff = 2 * time.Second
)

// etcdConfig is what the etcd backend needs, built in main from flags.
type etcdConfig struct {
	Endpoints      []string // http(s)://host:port, tried in this order
	Prefix         string   // ends in '/'; default defaultEtcdPrefix
	CAFile         string   // PEM CA bundle; default the system's
	CertFile       string   // client certificate, PEM
	KeyFile        string   // its key, PEM
	Username       string   // etcd user; empty: no authentication
	Password       string   // never logged
	RequestTimeout time.Duration
	// SyncWait is how long start-up waits for the first full read, so that
	// the sidecar's first answers are complete; it starts anyway after it.
	SyncWait time.Duration
}

// etcdReg is a key this sidecar put, with the lease that holds it.
type etcdReg struct {
	node  string // the record's key, for keeps
	lease int64
	ttl   time.Duration
	value []byte
	rev   int64 // revision of the put
}

// holds reports whether kv is the key as this sidecar put it: with its
// value, on its lease or on another's. Another sidecar keeping the same
// node alike (the new one of a rolling restart) holds it as well, and
// neither writes it again: revoking one lease at the old one's stop leaves
// the key on the other. A key rewritten without a lease (by hand) would
// outlive the node, and is not held.
func (r etcdReg) holds(kv etcdKV) bool {
	return (int64(kv.Lease) == r.lease || kv.Lease != 0) && bytes.Equal(kv.Value, r.value)
}

// etcdBackend is the registry over etcd.
type etcdBackend struct {
	prefix string
	c      *etcdClient
	t      *table
	log    *slog.Logger

	// opMu serialises register and deregister, so that the lease
	// bookkeeping of a key is never raced by two registrations of it.
	opMu sync.Mutex

	// applyMu orders the table's changes from etcd (the watch, a full
	// read) with those a write of this sidecar makes at once, for its
	// callers to read their writes. applied is the revision of etcd the
	// table holds: a write at that revision or before is in it already,
	// with whatever others wrote after it (a keeper putting back a node a
	// DELETE here removed), which the write's own change must not undo.
	applyMu sync.Mutex
	applied int64

	mu             sync.Mutex             // guards the fields below
	regs           map[string]etcdReg     // by etcd key; bounded by the table's node limit
	watchErr       error                  // why the watch is not running; nil when it is
	reqErr         error                  // the last call's failure to reach etcd; nil after a success
	down           bool                   // logged as not synchronised; cleared when synchronised again
	downReason     string                 // the kind of failure logged last (watchDownReason), while down
	refusalRestart time.Time              // when a refused call last made the watch start again
	clusterID      string                 // of the cluster last synchronised with
	watchEP        int                    // endpoint the watch runs on, -1: none
	watchCancel    context.CancelFunc     // stops the current watch stream
	bad            map[string]string      // bad keys already logged, with the reason
	badMore        bool                   // more than maxBadKeys: logged once
	contested      logLimiter             // kept keys seen rewritten by another writer: each logged at most every 10 minutes
	keeps          func(node string) bool // whether the registry keeps a node alive (refreshes it); nil: all
	own            func(node string) bool // whether a node is the sidecar's own (the app, the broker's topics); nil: none
	removed        func()                 // told when others' changes removed nodes (registry.restoreLost); nil: nobody
	unrevoked      map[int64]bool         // leases of deleted nodes etcd did not revoke when asked; revoked when it answers again
	leftOut        map[string]record      // by record key: nodes left out at the table's limit, taken as room frees up; at most its limit

	synced chan struct{} // closed after the first full read
	stop   context.CancelFunc
	wg     sync.WaitGroup
	once   sync.Once
}

// newEtcdBackend starts the backend: it waits up to cfg.SyncWait for the
// first read of the registry, then keeps it current in the background.
// etcd being unreachable at start is not an error: the sidecar serves an
// empty registry, says so in /health, and catches up when etcd answers.
func newEtcdBackend(ctx context.Context, cfg etcdConfig, t *table, log *slog.Logger) (*etcdBackend, error) {
	tlsCfg, err := etcdTLSConfig(cfg.CAFile, cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, err
	}
	if cfg.Prefix == "" {
		cfg.Prefix = defaultEtcdPrefix
	}
	b := &etcdBackend{
		prefix:    cfg.Prefix,
		c:         newEtcdClient(cfg.Endpoints, tlsCfg, cfg.Username, cfg.Password, cfg.RequestTimeout),
		t:         t,
		log:       log,
		regs:      map[string]etcdReg{},
		unrevoked: map[int64]bool{},
		leftOut:   map[string]record{},
		watchEP:   -1,
		bad:       map[string]string{},
		contested: logLimiter{every: 10 * time.Minute},
		synced:    make(chan struct{}),
		watchErr:  errors.New("etcd registry: not synchronised yet"),
	}
	b.c.onFail = b.endpointFailed
	ctx, b.stop = context.WithCancel(ctx)
	b.wg.Add(1)
	go b.run(ctx)
	if cfg.SyncWait > 0 {
		select {
		case <-b.synced:
		case <-ctx.Done(): // stopped while starting: the caller gives up
		case <-time.After(cfg.SyncWait):
			log.Warn("etcd registry: not synchronised yet; starting with an empty registry and retrying in the background",
				"endpoints", strings.Join(cfg.Endpoints, ","), "error", trimErr(b.status()))
		}
	}
	return b, nil
}

// etcdKey is the key of one record.
func etcdKey(prefix string, r record) string { return prefix + r.Service + "/" + r.Node.ID }

// parseEtcdKey splits a key of the layout into service name and node id.
func parseEtcdKey(prefix, key string) (service, id string, ok bool) {
	rest, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return "", "", false
	}
	service, id, ok = strings.Cut(rest, "/")
	if !ok || service == "" || id == "" || len(service) > maxNameLen || len(id) > maxIDLen || !validName(service) || !validName(id) {
		return "", "", false
	}
	return service, id, true
}

// etcdKeyProblem says why parseEtcdKey refused key: outside the layout,
// or a service name or node id no registration could have.
func etcdKeyProblem(prefix, key string) error {
	rest, _ := strings.CutPrefix(key, prefix)
	service, id, _ := strings.Cut(rest, "/")
	switch {
	case !strings.HasPrefix(key, prefix) || service == "" || id == "" || strings.Contains(id, "/"):
		return fmt.Errorf("key is outside the layout %s<service>/<node id>", prefix)
	case len(service) > maxNameLen || !validName(service):
		return fmt.Errorf("the key's service name %q: a name has up to %d printable ASCII characters without spaces or '/'", truncate(service, 64), maxNameLen)
	}
	return fmt.Errorf("the key's node id %q: an id has up to %d printable ASCII characters without spaces or '/'", truncate(id, 64), maxIDLen)
}

// etcdValue is the value stored for r: the service JSON with one node,
// with <, > and & as they are (json.Marshal would write six bytes for
// each, for the benefit of HTML, which etcd is not).
func etcdValue(r record) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}); err != nil {
		return nil, err
	}
	value := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	if len(value) > maxEtcdValue { // the metadata limits keep it below; kept so that no entry is written that none would read
		return nil, fmt.Errorf("node %q: the record is %d bytes as stored, over the %d an etcd entry of the registry may hold", truncate(r.Node.ID, 64), len(value), maxEtcdValue)
	}
	return value, nil
}

// parseEtcdEntry turns one key and value of the store into a record, or
// says why it is not one of ours.
func parseEtcdEntry(prefix string, key, value []byte) (record, error) {
	svc, id, ok := parseEtcdKey(prefix, string(key))
	if !ok {
		return record{}, etcdKeyProblem(prefix, string(key))
	}
	if len(value) > maxEtcdValue {
		return record{}, fmt.Errorf("value larger than %d bytes", maxEtcdValue)
	}
	s, err := decodeService(value)
	if err != nil {
		return record{}, fmt.Errorf("value is not a service record: %w", err)
	}
	if len(s.Nodes) != 1 {
		return record{}, fmt.Errorf("value holds %d nodes; want exactly one", len(s.Nodes))
	}
	if s.Name != svc || s.Nodes[0].ID != id {
		return record{}, fmt.Errorf("value is service %q node %q but the key says %q node %q", truncate(s.Name, 64), truncate(s.Nodes[0].ID, 64), svc, id)
	}
	return recordsOf(s, time.Time{})[0], nil
}

// prefixEnd is the range_end that makes a range cover every key starting
// with prefix: the prefix with its last byte incremented (etcd's
// clientv3.GetPrefixRangeEnd).
func prefixEnd(prefix string) []byte {
	end := []byte(prefix)
	for i := len(end) - 1; i >= 0; i-- {
		if end[i] < 0xff {
			end[i]++
			return end[:i+1]
		}
	}
	return []byte{0} // every key
}

// etcdChange is the net effect of a batch of watch events on the table.
type etcdChange struct {
	upserts []record
	removes []record          // service and node id only: what the table's remove needs
	bad     map[string]string // etcd key -> reason, for entries skipped
	good    []string          // etcd keys that are now fine (or gone)
	deleted map[string]int64  // etcd key -> revision of its deletion
	puts    map[string]etcdKV // etcd key -> its last write in the batch
	lastRev int64             // highest mod_revision seen
}

// watchChanges folds a batch of watch events, in order, into the change to
// apply. A key's last event wins; a bad value removes the key's earlier
// record, since the store no longer holds it.
func watchChanges(prefix string, events []etcdEvent) etcdChange {
	ch := etcdChange{bad: map[string]string{}, deleted: map[string]int64{}, puts: map[string]etcdKV{}}
	type final struct {
		rec     record // the record, or just its service and node id when absent
		present bool
	}
	last := map[string]final{} // by table key
	var order []string
	set := func(k string, f final) {
		if _, ok := last[k]; !ok {
			order = append(order, k)
		}
		last[k] = f
	}
	for _, ev := range events {
		key := string(ev.KV.Key)
		if int64(ev.KV.ModRevision) > ch.lastRev {
			ch.lastRev = int64(ev.KV.ModRevision)
		}
		svc, id, inLayout := parseEtcdKey(prefix, key)
		gone := record{Service: svc, Node: Node{ID: id}}
		tkey := gone.key()
		if ev.Type == "DELETE" {
			delete(ch.puts, key)
			ch.deleted[key] = int64(ev.KV.ModRevision)
			delete(ch.bad, key)
			ch.good = append(ch.good, key)
			if inLayout {
				set(tkey, final{rec: gone})
			}
			continue
		}
		delete(ch.deleted, key)
		ch.puts[key] = ev.KV
		r, err := parseEtcdEntry(prefix, ev.KV.Key, ev.KV.Value)
		if err != nil {
			ch.bad[key] = err.Error()
			if inLayout {
				set(tkey, final{rec: gone})
			}
			continue
		}
		delete(ch.bad, key)
		ch.good = append(ch.good, key)
		set(r.key(), final{rec: r, present: true})
	}
	for _, k := range order {
		if f := last[k]; f.present {
			ch.upserts = append(ch.upserts, f.rec)
		} else {
			ch.removes = append(ch.removes, f.rec)
		}
	}
	return ch
}

// parseWatchMessage decodes one line of the watch stream.
func parseWatchMessage(line []byte) (etcdWatchMessage, error) {
	var m etcdWatchMessage
	if err := json.Unmarshal(line, &m); err != nil {
		return etcdWatchMessage{}, fmt.Errorf("etcd watch: bad message %s: %w", truncate(string(line), 100), err)
	}
	if m.Result == nil && m.Error == nil {
		return etcdWatchMessage{}, fmt.Errorf("etcd watch: message with neither result nor error: %s", truncate(string(line), 100))
	}
	return m, nil
}

func (b *etcdBackend) register(s Service, ttl time.Duration) error {
	b.opMu.Lock()
	defer b.opMu.Unlock()
	if b.status() == nil { // else a call would only wait for etcd once more
		b.revokeUnrevoked(context.Background())
	}
	recs := recordsOf(s, time.Time{})
	if err := b.t.room(recs); err != nil && !b.makeRoomForOwn(recs) {
		return err // before any write: others' watchers must not see it come and go
	}
	var added []string
	revs := make([]int64, len(recs))
	for i, r := range recs {
		key := etcdKey(b.prefix, r)
		value, err := etcdValue(r)
		if err != nil {
			return err
		}
		b.mu.Lock()
		_, had := b.regs[key]
		b.mu.Unlock()
		rev, err := b.registerOne(key, r.key(), value, ttl)
		if err != nil {
			if answeredRefusal(err) {
				// Refused for good (a node too large): the nodes this
				// call wrote must not outlive the refusal by a TTL.
				for _, key := range added {
					b.unregisterOne(key)
				}
			}
			return b.noteReq(err)
		}
		if !had {
			added = append(added, key)
		}
		revs[i] = rev
	}
	b.noteReq(nil)
	if err := b.upsertWritten(recs, revs); err != nil {
		// Over the node limit, filled meanwhile: take back what this call added.
		for _, key := range added {
			b.unregisterOne(key) // best effort: its lease runs out
		}
		return err
	}
	return nil
}

// upsertWritten puts in the table the records a registration wrote to
// etcd, each at its revision, that the table does not hold yet: those the
// watch has passed are there already, or were changed since by others.
func (b *etcdBackend) upsertWritten(recs []record, revs []int64) error {
	b.applyMu.Lock()
	defer b.applyMu.Unlock()
	var fresh []record
	for i, r := range recs {
		if revs[i] > b.applied {
			fresh = append(fresh, r)
		}
	}
	return b.t.upsert(fresh...)
}

// registerOne puts key with value on a lease of ttl: it keeps the key's
// lease alive when it has one of that TTL, and grants a new one when the
// lease is gone (it expired, or etcd lost it) or the TTL changed. It
// returns the revision at which etcd holds the key as asked: that of the
// put, or of the earlier put a refresh found in place.
func (b *etcdBackend) registerOne(key, node string, value []byte, ttl time.Duration) (int64, error) {
	ctx := context.Background() // not the lifecycle context: shutdown deregisters after it ends
	b.mu.Lock()
	cur, ok := b.regs[key]
	b.mu.Unlock()
	if ok && cur.ttl == ttl {
		alive, err := b.keepAlive(ctx, cur.lease)
		if err != nil {
			return 0, err
		}
		if alive && bytes.Equal(cur.value, value) {
			return cur.rev, nil
		}
		if alive {
			rev, err := b.put(ctx, key, value, cur.lease)
			if err != nil {
				return 0, err
			}
			b.remember(key, etcdReg{node: node, lease: cur.lease, ttl: ttl, value: value, rev: rev})
			return rev, nil
		}
	}
	var grant etcdLeaseGrant
	if err := b.c.call(ctx, "/v3/lease/grant", etcdLeaseGrant{TTL: int64s(ttlSeconds(ttl))}, &grant); err != nil {
		return 0, fmt.Errorf("etcd lease grant: %w", err)
	}
	rev, err := b.put(ctx, key, value, int64(grant.ID))
	if err != nil {
		if _, rerr := b.revoke(ctx, int64(grant.ID)); rerr != nil && errors.Is(err, context.DeadlineExceeded) {
			// The put may be waiting in etcd, and the revoke that would undo
			// it did not get through: the caller should know both.
			return 0, fmt.Errorf("%w; etcd may still apply it, and the entry would then lapse within %v unless registered again", err, ttl)
		}
		return 0, err
	}
	b.remember(key, etcdReg{node: node, lease: int64(grant.ID), ttl: ttl, value: value, rev: rev})
	if ok && cur.lease != int64(grant.ID) {
		b.revoke(ctx, cur.lease) // the TTL changed; the old lease holds nothing now
	}
	return rev, nil
}

// ttlSeconds rounds a TTL up to whole seconds, etcd's unit. etcd raises a
// TTL below its minimum (about 1.5 election timeouts) to that minimum.
func ttlSeconds(ttl time.Duration) int64 {
	s := int64((ttl + time.Second - 1) / time.Second)
	if s < 1 {
		s = 1
	}
	return s
}

func (b *etcdBackend) remember(key string, r etcdReg) {
	b.mu.Lock()
	b.regs[key] = r
	b.mu.Unlock()
}

func (b *etcdBackend) put(ctx context.Context, key string, value []byte, lease int64) (int64, error) {
	var resp etcdHeaderOnly
	if err := b.c.call(ctx, "/v3/kv/put", etcdPutRequest{Key: []byte(key), Value: value, Lease: int64s(lease)}, &resp); err != nil {
		return 0, fmt.Errorf("etcd put %s: %w", key, err)
	}
	return int64(resp.Header.Revision), nil
}

// keepAlive refreshes a lease and reports whether it still exists.
func (b *etcdBackend) keepAlive(ctx context.Context, lease int64) (bool, error) {
	var resp etcdKeepAliveResponse
	if err := b.c.call(ctx, "/v3/lease/keepalive", etcdLeaseID{ID: int64s(lease)}, &resp); err != nil {
		return false, fmt.Errorf("etcd lease keepalive: %w", err)
	}
	if resp.Error != nil {
		return false, fmt.Errorf("etcd lease keepalive: %w", resp.Error.err())
	}
	return resp.Result != nil && resp.Result.TTL > 0, nil
}

// revoke drops a lease and the keys attached to it, and returns the
// revision of that; a lease already gone is not an error (revision 0).
func (b *etcdBackend) revoke(ctx context.Context, lease int64) (int64, error) {
	var resp etcdHeaderOnly
	err := b.c.call(ctx, "/v3/lease/revoke", etcdLeaseID{ID: int64s(lease)}, &resp)
	var ee *etcdError
	if errors.As(err, &ee) && ee.Code == grpcNotFound {
		return 0, nil
	}
	return int64(resp.Header.Revision), err
}

func (b *etcdBackend) deregister(s Service) error {
	b.opMu.Lock()
	defer b.opMu.Unlock()
	var errs []error
	var gone []record
	var revs []int64
	for _, r := range recordsOf(s, time.Time{}) {
		rev, ours, err := b.unregisterOne(etcdKey(b.prefix, r))
		if err != nil {
			errs = append(errs, err)
		}
		// A node this sidecar put leaves the local table at once even
		// when etcd is unreachable: it is going, and its lease will run
		// out in etcd. Another's stays until etcd has removed it, as it
		// stays on every other sidecar: the caller got a 503.
		if err == nil || ours {
			gone, revs = append(gone, r), append(revs, rev)
		}
	}
	b.removeDeleted(gone, revs)
	return b.noteReq(errors.Join(errs...))
}

// removeDeleted takes out of the table the records a deregistration
// deleted, each at its revision (0: unknown, or not deleted in etcd yet;
// below 0: still in etcd, on another sidecar's lease), that the watch has
// not passed: past it, the table holds what came after the delete (a
// keeper's put back), which must stay.
func (b *etcdBackend) removeDeleted(recs []record, revs []int64) {
	b.applyMu.Lock()
	defer b.applyMu.Unlock()
	var stale []record
	for i, r := range recs {
		if revs[i] == 0 || revs[i] > 0 && revs[i] > b.applied {
			stale = append(stale, r)
		}
	}
	b.t.remove(stale...)
}

// unregisterOne deletes key: by revoking its lease when this sidecar put
// it (which deletes it too, and ours says so, unless another sidecar holds
// it now), else by deleting it. rev is a revision at which etcd no longer
// holds the key, 0 when unknown, -1 when etcd still holds it.
func (b *etcdBackend) unregisterOne(key string) (rev int64, ours bool, err error) {
	ctx := context.Background()
	b.mu.Lock()
	cur, ok := b.regs[key]
	delete(b.regs, key)
	b.mu.Unlock()
	if ok {
		// Revoking the lease deletes the key with it: one request.
		rev, err := b.revoke(ctx, cur.lease)
		if err != nil {
			// The node left this sidecar's view; it must not come back
			// with etcd, for a whole TTL, when etcd answers again.
			b.mu.Lock()
			if len(b.unrevoked) < maxUnrevoked {
				b.unrevoked[cur.lease] = true
			}
			b.mu.Unlock()
			return 0, true, fmt.Errorf("etcd lease revoke: %w", err)
		}
		// The revoke deletes the key only if it was still on this
		// lease; another sidecar keeping the node alike may hold it on
		// its own (see holds). etcd's answer does not say which, and
		// carries the store's revision, not the key's.
		var now etcdRangeResponse
		if err := b.c.call(ctx, "/v3/kv/range", etcdRangeRequest{Key: []byte(key)}, &now); err != nil {
			return rev, true, nil // gone from here as asked; the watch tells if it is not
		}
		if len(now.KVs) > 0 {
			return -1, true, nil
		}
		return int64(now.Header.Revision), true, nil
	}
	var resp etcdHeaderOnly
	if err := b.c.call(ctx, "/v3/kv/deleterange", etcdDeleteRequest{Key: []byte(key)}, &resp); err != nil {
		return 0, false, fmt.Errorf("etcd delete %s: %w", key, err)
	}
	return int64(resp.Header.Revision), false, nil
}

// maxUnrevoked bounds the leases kept to revoke later: past it, a deleted
// node's lease runs out in etcd.
const maxUnrevoked = 4096

// revokeUnrevoked revokes the leases of deleted nodes that etcd did not
// revoke when asked, and forgets those it has revoked (or no longer
// holds). It is called after each full read, and by each registration
// (the refreshes too) while etcd answers, in case the watch outlived the
// failure.
func (b *etcdBackend) revokeUnrevoked(ctx context.Context) {
	b.mu.Lock()
	leases := slices.Collect(maps.Keys(b.unrevoked))
	b.mu.Unlock()
	for _, lease := range leases {
		if _, err := b.revoke(ctx, lease); err != nil {
			return // etcd does not answer yet: the next time
		}
		b.mu.Lock()
		delete(b.unrevoked, lease)
		b.mu.Unlock()
	}
}

// status is nil while the watch runs and etcd answers; otherwise it says
// that the registry served is the last one known.
func (b *etcdBackend) status() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.watchErr != nil {
		return fmt.Errorf("etcd registry not synchronised, serving the last known registry: %w", b.watchErr)
	}
	if b.reqErr != nil {
		return fmt.Errorf("etcd registry not synchronised, serving the last known registry: %w", b.reqErr)
	}
	return nil
}

// noteReq records whether a call reached etcd, for status, and returns err.
func (b *etcdBackend) noteReq(err error) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch {
	case err == nil:
		b.reqErr = nil
	case errors.Is(err, errEtcdUnavailable):
		b.reqErr = err
	case isUserMissing(err) || errors.Is(err, errEtcdCredentials):
		// etcd turned authentication on, or refuses this sidecar's
		// password now: a watch made before runs on (etcd checks it at
		// its start), keepalives need no user, and nothing would say so.
		// The watch is made again; the fresh read before it fails the
		// same way, and says so in the log and /health. (A user that may
		// read but not write is refused writes alone: its reads go on.)
		// At most every 10 s.
		if b.watchCancel != nil && time.Since(b.refusalRestart) >= 10*time.Second {
			b.refusalRestart = time.Now()
			b.watchCancel()
		}
	}
	return err
}

// close stops the watch. Owned registrations were deregistered (their
// leases revoked) before it; registrations posted with ?ttl= are left to
// run out, as with the file registry.
func (b *etcdBackend) close() error {
	b.once.Do(func() {
		b.stop()
		b.wg.Wait()
		b.c.closeIdle()
	})
	return nil
}

// endpointFailed is told when a call failed on endpoint i: a watch on the
// same endpoint is probably dead too, so it moves on at once.
func (b *etcdBackend) endpointFailed(i int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.watchEP == i && b.watchCancel != nil {
		b.watchCancel()
	}
}

// errResync asks the loop for a fresh range read.
var errResync = errors.New("etcd watch: revision compacted or cluster replaced; reading the registry afresh")

// run keeps the table current until ctx ends: a range read, then a watch
// from the revision after it, resumed where it broke, with a fresh range
// read when that is no longer possible.
func (b *etcdBackend) run(ctx context.Context) {
	defer b.wg.Done()
	var rev int64 // last revision applied; 0: read everything
	backoff := etcdMinBackoff
	for ctx.Err() == nil {
		if rev == 0 {
			r, err := b.resync(ctx)
			if err != nil {
				b.watchDown(ctx, err)
				if !wait(ctx, backoff) {
					return
				}
				backoff = min(2*backoff, etcdMaxBackoff)
				continue
			}
			rev = r
			b.revokeUnrevoked(ctx)
		}
		established, err := b.watch(ctx, &rev)
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, errResync) {
			b.log.Info("etcd registry: reading the registry afresh", "reason", err)
			rev = 0
			continue
		}
		if established {
			// Read afresh at once, and watch on, from another endpoint if
			// need be; status turns to an error only if none answers. Not
			// a resume at rev: a cluster recreated empty meanwhile, with
			// the same flags (so the same cluster id) and more writes than
			// the old one saw, would pass for the one left.
			b.log.Info("etcd registry: watch broke; reading the registry afresh", "revision", rev, "error", err)
			rev = 0
			backoff = etcdMinBackoff
			continue
		}
		b.watchDown(ctx, err)
		if !wait(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, etcdMaxBackoff)
	}
}

// wait waits d or until ctx ends, and reports whether to go on.
func wait(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// watchDown records that the watch is not running, logging the change of
// state once.
func (b *etcdBackend) watchDown(ctx context.Context, err error) {
	if ctx.Err() != nil || err == nil {
		return
	}
	reason := watchDownReason(err)
	b.mu.Lock()
	b.watchErr = err
	// Said again when the reason changes (unreachable while etcd
	// restarted, then refused: the log must not keep saying the first).
	logIt := !b.down || reason != b.downReason
	b.down, b.downReason = true, reason
	b.mu.Unlock()
	switch {
	case !logIt:
	case errors.Is(err, errEtcdCredentials):
		b.log.Error("etcd registry refused to authenticate this sidecar (check --registry_username, MICRO_REGISTRY_PASSWORD, and that etcd has authentication on); serving the last known registry and retrying", "error", err)
	case isAccessRefusal(err):
		b.log.Error("etcd registry refuses this sidecar access (give --registry_username and MICRO_REGISTRY_PASSWORD when etcd has authentication on, and the user a role on the prefix); serving the last known registry and retrying", "error", err)
	case tlsFixOf(err) != "":
		b.log.Error("etcd registry's TLS handshake failed ("+tlsFixOf(err)+"); serving the last known registry and retrying", "error", err)
	default:
		b.log.Error("etcd registry unreachable; serving the last known registry and retrying", "error", err)
	}
}

// watchDownReason is the kind of failure watchDown logs err as.
func watchDownReason(err error) string {
	switch {
	case errors.Is(err, errEtcdCredentials):
		return "credentials"
	case isAccessRefusal(err):
		return "access"
	case tlsFixOf(err) != "":
		return "tls"
	}
	return "unreachable"
}

// watchUp records that the table is synchronised again. etcd has just
// answered, so a call that failed to reach it before says nothing now.
func (b *etcdBackend) watchUp() {
	b.mu.Lock()
	b.watchErr, b.reqErr = nil, nil
	logIt := b.down
	b.down = false
	b.mu.Unlock()
	if logIt {
		b.log.Info("etcd registry reachable again; registry synchronised")
	}
	select {
	case <-b.synced:
	default:
		close(b.synced)
	}
}

// resync reads the whole prefix at one revision, page by page, installs it
// in the table and returns the revision.
func (b *etcdBackend) resync(ctx context.Context) (int64, error) {
	var (
		rev   int64
		kvs   []etcdKV
		from  = []byte(b.prefix)
		end   = prefixEnd(b.prefix)
		cid   string
		limit = int64s(etcdRangePage)
	)
	for {
		var resp etcdRangeResponse
		req := etcdRangeRequest{Key: from, RangeEnd: end, Limit: limit, Revision: int64s(rev)}
		if err := b.c.call(ctx, "/v3/kv/range", req, &resp); err != nil {
			if errors.Is(err, errReplyTooLarge) && limit > 1 {
				// Large values (etcd takes up to 1.5 MiB each): ask for
				// fewer at a time.
				limit /= 2
				continue
			}
			return 0, fmt.Errorf("etcd range %s: %w", b.prefix, err)
		}
		if rev == 0 {
			rev, cid = int64(resp.Header.Revision), resp.Header.ClusterID
		}
		kvs = append(kvs, resp.KVs...)
		if !resp.More || len(resp.KVs) == 0 {
			break
		}
		from = append(append([]byte{}, resp.KVs[len(resp.KVs)-1].Key...), 0)
	}
	recs := make([]record, 0, len(kvs))
	bad := map[string]string{}
	present := make(map[string]etcdKV, len(kvs))
	b.mu.Lock()
	unrevoked := maps.Clone(b.unrevoked)
	b.mu.Unlock()
	for _, kv := range kvs {
		present[string(kv.Key)] = kv
		if unrevoked[int64(kv.Lease)] {
			continue // deleted here; its lease is revoked next (run)
		}
		r, err := parseEtcdEntry(b.prefix, kv.Key, kv.Value)
		if err != nil {
			bad[string(kv.Key)] = err.Error()
			continue
		}
		recs = append(recs, r)
	}
	leftOut := map[string]record{}
	if limit := b.t.maxNodes; limit > 0 && len(recs) > limit {
		// This sidecar's own first (were one left out, its refresh would
		// be refused as the registry full, and it would lapse for all),
		// then the first by name.
		b.mu.Lock()
		own := func(r record) bool { _, ok := b.regs[etcdKey(b.prefix, r)]; return ok }
		sort.Slice(recs, func(i, j int) bool {
			if oi, oj := own(recs[i]), own(recs[j]); oi != oj {
				return oi
			}
			return recs[i].key() < recs[j].key()
		})
		logIt := len(b.leftOut) == 0
		b.mu.Unlock()
		if logIt {
			b.log.Error("etcd registry holds more nodes than --registry_max_nodes; serving this sidecar's own and the first others by name", "nodes", len(recs), "limit", limit)
		}
		for _, r := range recs[limit:min(len(recs), 2*limit)] {
			leftOut[r.key()] = r
		}
		recs = recs[:limit]
	}
	b.applyMu.Lock()
	b.t.replace(recs, time.Now())
	b.applied = rev
	b.applyMu.Unlock()
	b.mu.Lock()
	b.clusterID = cid
	b.leftOut = leftOut
	for key := range b.bad {
		if _, ok := present[key]; !ok {
			delete(b.bad, key)
		}
	}
	// A key this sidecar put that the store does not hold as it was put
	// (deleted or rewritten by hand, lost with a replaced cluster, older
	// in a restored one) is put again, at once when the registry keeps it
	// (removed, as after a watched delete), else at the next refresh. One
	// put after this read is put again too, for nothing but a spare lease.
	lost := false
	for key, r := range b.regs {
		if kv, ok := present[key]; !ok || !r.holds(kv) {
			delete(b.regs, key)
			lost = true
		}
	}
	removed := b.removed
	b.mu.Unlock()
	if lost && removed != nil {
		removed()
	}
	b.noteBad(bad)
	return rev, nil
}

// noteBad logs each bad entry once.
func (b *etcdBackend) noteBad(bad map[string]string) {
	if len(bad) == 0 {
		return
	}
	keys := make([]string, 0, len(bad))
	for k := range bad {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.mu.Lock()
	var fresh []string
	tooMany := false
	for _, k := range keys {
		if old, ok := b.bad[k]; ok && old == bad[k] {
			continue
		}
		if _, ok := b.bad[k]; !ok && len(b.bad) >= maxBadKeys {
			if !b.badMore {
				b.badMore, tooMany = true, true
			}
			continue
		}
		b.bad[k] = bad[k]
		fresh = append(fresh, k)
	}
	b.mu.Unlock()
	for _, k := range fresh {
		b.log.Warn("etcd registry: skipping an entry that is not a service node", "key", truncate(k, 300), "reason", bad[k])
	}
	if tooMany {
		b.log.Warn("etcd registry: more bad entries than can be listed; skipping them without logging each", "listed", maxBadKeys)
	}
}

// watch runs one watch from *rev+1 on the first endpoint that takes it,
// applying events and advancing *rev, until the stream breaks. established
// says whether a stream was running.
func (b *etcdBackend) watch(ctx context.Context, rev *int64) (established bool, err error) {
	create := map[string]any{"create_request": map[string]any{
		"key":             []byte(b.prefix),
		"range_end":       prefixEnd(b.prefix),
		"start_revision":  int64s(*rev + 1),
		"progress_notify": true,
		// A catch-up after a break sends up to 1,000 revisions as one
		// message, which can exceed any bound; fragments stay within
		// etcd's request limit (etcd 3.4 and later).
		"fragment": true,
	}}
	body, err := json.Marshal(create)
	if err != nil {
		return false, err
	}
	// hasleader: etcd cancels the watch when its member loses the leader,
	// instead of leaving it silently stale (etcd's rpctypes.MetadataRequireLeaderKey;
	// the gateway passes Grpc-Metadata-* headers on as gRPC metadata).
	header := http.Header{"Grpc-Metadata-Hasleader": {"true"}}
	var errs []error
	for _, i := range b.c.eps.order() {
		established, err := b.watchOn(ctx, i, body, header, rev)
		if established || ctx.Err() != nil || errors.Is(err, errResync) {
			return established, err
		}
		errs = append(errs, fmt.Errorf("%s: %w", b.c.eps.urls[i], err))
	}
	return false, fmt.Errorf("etcd watch: %w: %w", errEtcdUnavailable, errors.Join(errs...))
}

// watchOn runs the watch on endpoint i. The stream must confirm creation
// within the request timeout.
func (b *etcdBackend) watchOn(ctx context.Context, i int, body []byte, header http.Header, rev *int64) (established bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	timer := time.AfterFunc(b.c.timeout, cancel)
	defer timer.Stop()
	stream, err := b.c.openStream(ctx, i, "/v3/watch", body, header)
	if err != nil {
		return false, err
	}
	defer stream.Close()
	b.mu.Lock()
	b.watchEP, b.watchCancel = i, cancel
	b.mu.Unlock()
	defer func() {
		b.mu.Lock()
		if b.watchEP == i {
			b.watchEP, b.watchCancel = -1, nil
		}
		b.mu.Unlock()
	}()
	sc := bufio.NewScanner(stream)
	sc.Buffer(make([]byte, 0, 64<<10), b.c.maxWatch)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		m, err := parseWatchMessage(line)
		if err != nil {
			return established, err
		}
		if m.Error != nil {
			if m.Error.GRPCCode == grpcUnauthenticated {
				b.c.dropToken()
			}
			return established, m.Error.err()
		}
		res := m.Result
		switch {
		case res.Canceled && res.CompactRevision > 0:
			return established, errResync
		case res.Canceled:
			if b.c.username != "" {
				b.c.dropToken() // a stale token is one reason; a new one costs little
			}
			return established, fmt.Errorf("etcd watch canceled: %s", res.CancelReason)
		case res.Created:
			b.mu.Lock()
			cid := b.clusterID
			b.mu.Unlock()
			if (cid != "" && res.Header.ClusterID != "" && res.Header.ClusterID != cid) || int64(res.Header.Revision) < *rev {
				return false, errResync // a different or restored cluster: revisions do not carry over
			}
			timer.Stop()
			if !established {
				go b.watchdog(ctx, i, cancel)
			}
			established = true
			b.c.eps.use(i)
			b.watchUp()
		case len(res.Events) > 0:
			*rev = max(*rev, watchDoneRev(res))
			b.apply(watchChanges(b.prefix, res.Events), *rev)
		default: // progress notification: nothing of ours changed up to here
			*rev = max(*rev, int64(res.Header.Revision))
		}
	}
	if err := sc.Err(); err != nil {
		return established, err
	}
	return established, errors.New("etcd watch stream ended")
}

// etcdWatchProbe is how often the member a watch runs on is asked whether
// it still answers.
const etcdWatchProbe = 5 * time.Second

// watchdog asks the member a watch runs on for its status every
// etcdWatchProbe while ctx lasts, and cancels the watch when it does not
// answer within the request timeout. A frozen member (stopped, or its
// machine stalled) keeps the stream open, its kernel still acknowledging,
// and sends nothing more: without this the sidecar would serve a stale
// registry with /health at 200 until the member woke.
func (b *etcdBackend) watchdog(ctx context.Context, i int, cancel context.CancelFunc) {
	tick := time.NewTicker(etcdWatchProbe)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var status struct{}
		err := b.c.callAuthed(ctx, i, "/v3/maintenance/status", []byte("{}"), &status)
		var answered *etcdError // any answer, a refusal included, says the member is awake
		if err != nil && ctx.Err() == nil && !errors.As(err, &answered) {
			b.log.Warn("etcd registry: the watched member does not answer; moving the watch", "endpoint", b.c.eps.urls[i], "error", err)
			cancel()
			return
		}
	}
}

// watchDoneRev is the last revision whose events a watch message
// completes: its last event's, or, when etcd split the message and more
// pieces follow, the one before, since that revision may go on in the next
// piece. Should the stream break first, the watch resumes at it and applies
// its events again, which changes nothing.
func watchDoneRev(res *etcdWatchResult) int64 {
	var r int64
	for _, ev := range res.Events {
		r = max(r, int64(ev.KV.ModRevision))
	}
	if res.Fragment {
		r--
	}
	return r
}

// apply installs a batch of watch changes in the table, which then holds
// etcd as of revision rev.
func (b *etcdBackend) apply(ch etcdChange, rev int64) {
	b.applyMu.Lock()
	if len(ch.removes) > 0 {
		b.t.remove(ch.removes...)
	}
	if recs := b.withLeftOut(ch); len(recs) > 0 {
		b.keepLeftOut(recs, b.t.upsertFitting(recs))
	}
	b.applied = max(b.applied, rev)
	b.applyMu.Unlock()
	b.mu.Lock()
	for _, k := range ch.good {
		delete(b.bad, k)
	}
	for key, drev := range ch.deleted {
		if r, ok := b.regs[key]; ok && r.rev < drev {
			delete(b.regs, key) // gone from etcd: put it again at the next refresh
		}
	}
	contested := map[string]string{} // etcd key -> node
	for key, kv := range ch.puts {
		if r, ok := b.regs[key]; ok && int64(kv.ModRevision) > r.rev && !r.holds(kv) {
			// Someone else wrote the key since this sidecar did: put ours
			// again at the next refresh, on a lease of ours.
			delete(b.regs, key)
			contested[key] = r.node
		}
	}
	keeps, removed := b.keeps, b.removed
	b.mu.Unlock()
	if len(ch.removes) > 0 && removed != nil {
		removed() // one this sidecar keeps goes back at once, not at the next refresh
	}
	for key, node := range contested {
		// An entry posted with ?ttl= through two sidecars (a client that
		// heartbeats through either) is nobody's to put back: no fight.
		if keeps != nil && !keeps(node) {
			continue
		}
		if !b.contested.allow(key) {
			continue
		}
		b.log.Warn("etcd registry: a node this sidecar keeps alive was rewritten by another writer; it is put back at the next refresh. If another sidecar keeps the same node id, the two overwrite each other at every refresh: give each its own id", "key", key)
	}
	b.noteBad(ch.bad)
}

// withLeftOut is what ch puts, and, when it removes nodes, the nodes left
// out at the table's limit, by name, to take as far as there is room now:
// no later event brings them (a kept-alive key is not written again).
func (b *etcdBackend) withLeftOut(ch etcdChange) []record {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, r := range ch.removes {
		delete(b.leftOut, r.key())
	}
	if len(ch.removes) == 0 || len(b.leftOut) == 0 {
		return ch.upserts
	}
	recs := slices.Clone(ch.upserts)
	put := map[string]bool{}
	for _, r := range ch.upserts {
		put[r.key()] = true
	}
	for _, k := range slices.Sorted(maps.Keys(b.leftOut)) {
		if !put[k] { // a newer write of it is in ch
			recs = append(recs, b.leftOut[k])
		}
	}
	return recs
}

// keepLeftOut records which of recs the table left out (left), and logs
// when nodes first are.
func (b *etcdBackend) keepLeftOut(recs, left []record) {
	b.mu.Lock()
	had := len(b.leftOut)
	for _, r := range recs {
		delete(b.leftOut, r.key())
	}
	for _, r := range left {
		if len(b.leftOut) < b.t.maxNodes {
			b.leftOut[r.key()] = r
		}
	}
	logIt := had == 0 && len(b.leftOut) > 0
	b.mu.Unlock()
	if logIt {
		b.log.Error("etcd registry holds more nodes than --registry_max_nodes; the others are left out until some leave", "left_out", len(left), "limit", b.t.maxNodes)
	}
}

// makeRoomForOwn makes room in a full table for recs when they are the
// sidecar's own, by leaving out as many of others' nodes, the last by
// name, as a fresh read at the limit would have (see resync): the app's
// registration must not be refused because others filled the table
// before it registered. It reports whether it did.
func (b *etcdBackend) makeRoomForOwn(recs []record) bool {
	b.mu.Lock()
	own := b.own
	b.mu.Unlock()
	need := 0
	for _, r := range recs {
		if own == nil || !own(r.key()) {
			return false
		}
		if !b.t.holds(r.Service, r.Node.ID) {
			need++
		}
	}
	var others []record
	for _, r := range b.t.snapshot() {
		if !own(r.key()) {
			others = append(others, r)
		}
	}
	if len(others) < need {
		return false
	}
	slices.SortFunc(others, func(x, y record) int { return strings.Compare(y.key(), x.key()) })
	out := others[:need]
	b.t.remove(out...)
	b.keepLeftOut(nil, out)
	return true
}

// setOwn tells the backend which nodes are the sidecar's own.
func (b *etcdBackend) setOwn(own func(node string) bool) {
	b.mu.Lock()
	b.own = own
	b.mu.Unlock()
}

// setKeeps tells the backend which nodes the registry keeps alive, and
// whom to tell when nodes were removed.
func (b *etcdBackend) setKeeps(keeps func(node string) bool, removed func()) {
	b.mu.Lock()
	b.keeps, b.removed = keeps, removed
	b.mu.Unlock()
}

// validateEtcd checks the etcd flags up front and fills cfg.Etcd.
func (c *config) validateEtcd() error {
	if c.RegistryAddress == "" {
		c.RegistryAddress = "http://127.0.0.1:2379"
	}
	eps, err := parseEtcdEndpoints(c.RegistryAddress)
	if err != nil {
		return err
	}
	c.Etcd.Endpoints = eps
	p := c.Etcd.Prefix
	if p == "" || !strings.HasPrefix(p, "/") || strings.ContainsAny(p, "\x00") {
		return fmt.Errorf("--registry_prefix %q: want a key prefix such as %s", p, defaultEtcdPrefix)
	}
	if !strings.HasSuffix(p, "/") {
		c.Etcd.Prefix = p + "/"
	}
	if c.Etcd.Password != "" && c.Etcd.Username == "" {
		return errors.New("--registry_password needs --registry_username")
	}
	tlsCfg, err := etcdTLSConfig(c.Etcd.CAFile, c.Etcd.CertFile, c.Etcd.KeyFile)
	if err != nil {
		return err
	}
	if tlsCfg != nil {
		for _, ep := range eps {
			if strings.HasPrefix(ep, "http://") {
				return fmt.Errorf("--registry_tls_* given but %s is plain http; use https:// etcd URLs", ep)
			}
		}
	}
	if c.Etcd.SyncWait == 0 {
		c.Etcd.SyncWait = etcdRequestTimeout
	}
	return nil
}
