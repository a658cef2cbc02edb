package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func newTestFileBackend(t *testing.T, path string, maxNodes int) *fileBackend {
	t.Helper()
	fb, err := newFileBackend(t.Context(), path, newTable(maxNodes), slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.close() })
	return fb
}

func nodeService(name string, ids ...string) Service {
	s := Service{Name: name}
	for _, id := range ids {
		s.Nodes = append(s.Nodes, Node{ID: id, Address: "127.0.0.1", Port: 1})
	}
	return s
}

// TestFileBackendReadsItsOwnWrites: a node a backend registered is in its
// table from then on, although its poll reads the file, which another
// sidecar keeps changing, at the same time.
func TestFileBackendReadsItsOwnWrites(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	a, other := newTestFileBackend(t, path, 0), newTestFileBackend(t, path, 0)
	var ids []string
	for i := range 1000 {
		ids = append(ids, fmt.Sprint(i))
	}
	if err := other.register(nodeService("bulk", ids...), time.Hour); err != nil {
		t.Fatal(err)
	}
	missed := 0
	for i := range 60 {
		// The other sidecar changes the file; a's poll reads that change
		// while a registers.
		if err := other.register(nodeService("churn", fmt.Sprint(i)), time.Hour); err != nil {
			t.Fatal(err)
		}
		polled := make(chan struct{})
		go func() { a.poll(); close(polled) }()
		if err := a.register(nodeService("mine", fmt.Sprint(i)), time.Hour); err != nil {
			t.Fatal(err)
		}
		<-polled
		if !tableHasNode(a.t, "mine", fmt.Sprint(i)) {
			missed++
		}
	}
	if missed > 0 {
		t.Errorf("%d of 60 registrations were missing from the table that made them", missed)
	}
}

func tableHasNode(tb *table, service, id string) bool {
	for _, r := range tb.snapshot() {
		if r.Service == service && r.Node.ID == id {
			return true
		}
	}
	return false
}

// TestFileBackendLimitRefusesOnlyGrowth: a sidecar whose
// --registry_max_nodes is below what the file holds (another sidecar has a
// higher one) still starts and deregisters; it refuses only additions.
func TestFileBackendLimitRefusesOnlyGrowth(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	big := newTestFileBackend(t, path, 0)
	if err := big.register(nodeService("svc", "1", "2", "3"), time.Hour); err != nil {
		t.Fatal(err)
	}
	small := newTestFileBackend(t, path, 2)
	if err := small.register(nodeService("svc", "4"), time.Hour); !errors.Is(err, errTableFull) {
		t.Errorf("an addition past the limit: %v; want errTableFull", err)
	}
	if err := small.deregister(nodeService("svc", "3")); err != nil {
		t.Errorf("a deregistration above the limit: %v; want it done", err)
	}
}

// TestFileBackendSkipsInvalidRecords: one invalid record (a hand edit,
// another version's rules) is skipped, not taken for a corrupt file that
// the next change would move aside with every other record.
func TestFileBackendSkipsInvalidRecords(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	file := `{"format":1,"records":[
		{"service":"a","node":{"id":"1","address":"127.0.0.1","port":1}},
		{"service":"a","node":{"id":"bad","address":"127.0.0.1","port":0}},
		{"service":"a","node":{"id":"typo","address":"127.0.0.1","port":"80"}},
		{"service":"b","node":{"id":"2","address":"127.0.0.1","port":2}}]}`
	if err := os.WriteFile(path, []byte(file), 0o644); err != nil {
		t.Fatal(err)
	}
	fb := newTestFileBackend(t, path, 0)
	if err := fb.register(nodeService("c", "3"), time.Hour); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(path)
	recs, skipped, err := parseRegistryFile(data)
	if err != nil || skipped != 0 || len(recs) != 3 {
		t.Errorf("after a registration the file holds %d records (%d skipped, %v); want the 2 valid ones and the new one", len(recs), skipped, err)
	}
	if matches, _ := filepath.Glob(path + ".corrupt-*"); len(matches) != 0 {
		t.Errorf("the file was moved aside: %v", matches)
	}
}

// TestFileBackendLeavesANewerFormatAlone: a file a newer sidecar wrote is
// neither moved aside nor rewritten; changes are refused saying why.
func TestFileBackendLeavesANewerFormatAlone(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	// The second lays out its records anew: its format must be read
	// before them, or it would look corrupt and be moved aside.
	for _, newer := range []string{`{"format":2,"services":{}}`, `{"records":{"a":[1]},"format":2}`} {
		if err := os.WriteFile(path, []byte(newer), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := newFileBackend(t.Context(), path, newTable(0), slog.New(slog.NewTextHandler(io.Discard, nil)))
		if err == nil || !strings.Contains(err.Error(), "written by a newer sidecar") {
			t.Errorf("start on %s: %v; want a refusal saying it is newer", newer, err)
		}
		if data, _ := os.ReadFile(path); string(data) != newer {
			t.Errorf("the newer file was changed: %s", data)
		}
	}
}

// TestFileBackendLeavesAnUnreadableFileUntilItChanges: a corrupt file is
// parsed once, not at every poll, until it changes.
func TestFileBackendLeavesAnUnreadableFileUntilItChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb := newTestFileBackend(t, path, 0)
	corrupt := []byte(`{"format":1,"records":[{"service":"a","node":{"id":"1","address":"127.0.0.1","port":1}}]` + "  ")
	if err := os.WriteFile(path, corrupt, 0o644); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 2*time.Second, "the corrupt file to be found", func() bool { return fb.status() != nil })
	// The same bytes, made valid in place: size, inode and modification
	// time as they were, so only a reread would see the change.
	fi, _ := os.Stat(path)
	valid := append(corrupt[:len(corrupt)-2:len(corrupt)-2], "}\n"...)
	fh, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	fh.WriteAt(valid, 0)
	fh.Close()
	os.Chtimes(path, fi.ModTime(), fi.ModTime())
	fb.poll()
	fb.poll()
	if ss, _ := fb.t.lookup("a", time.Now()); fb.status() == nil || len(ss) != 0 {
		t.Fatalf("the unchanged corrupt file was parsed again")
	}
	// A real change is read.
	os.Chtimes(path, fi.ModTime().Add(time.Second), fi.ModTime().Add(time.Second))
	waitFor(t, 2*time.Second, "the changed file to be read", func() bool {
		ss, _ := fb.t.lookup("a", time.Now())
		return fb.status() == nil && len(ss) == 1
	})
}

// TestFileBackendStartsAfreshOnAnOversizedFile: a file past the read limit
// (an older sidecar wrote it) is moved aside like a corrupt one, rather
// than failing every change for good.
func TestFileBackendStartsAfreshOnAnOversizedFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	if err := os.WriteFile(path, make([]byte, maxFileBytes+1), 0o644); err != nil {
		t.Fatal(err)
	}
	fb := newTestFileBackend(t, path, 0)
	if err := fb.register(nodeService("a", "1"), time.Hour); err != nil {
		t.Fatalf("a registration after an oversized file: %v", err)
	}
	if matches, _ := filepath.Glob(path + ".corrupt-*"); len(matches) != 1 {
		t.Errorf("kept aside: %v; want the oversized file", matches)
	}
}

// TestFileBackendFollowsASymlink: a registry path that is a symbolic link
// stays one, and the sidecars given the link and the target share one
// registry.
func TestFileBackendFollowsASymlink(t *testing.T) {
	dir := t.TempDir()
	target, link := filepath.Join(dir, "registry.json"), filepath.Join(dir, "link.json")
	if err := os.WriteFile(target, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	viaLink, viaTarget := newTestFileBackend(t, link, 0), newTestFileBackend(t, target, 0)
	if err := viaLink.register(nodeService("a", "1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Errorf("the link was replaced: %v %v", fi, err)
	}
	waitFor(t, 2*time.Second, "the target's backend to see the link's write", func() bool { return tableHasNode(viaTarget.t, "a", "1") })
}

// TestFileBackendKeepsTheFileMode: a registry file its owner made private
// stays private across rewrites.
func TestFileBackendKeepsTheFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb := newTestFileBackend(t, path, 0)
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := fb.register(nodeService("a", "1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode after a rewrite: %v (%v); want 0600", fi.Mode().Perm(), err)
	}
}

// TestFileBackendRemovesStaleTemps: temporary files of writers killed
// mid-write are removed at start once a minute old; a fresh one, maybe
// another sidecar's write in progress, is left.
func TestFileBackendRemovesStaleTemps(t *testing.T) {
	dir := t.TempDir()
	stale, fresh := filepath.Join(dir, ".registry-1.tmp"), filepath.Join(dir, ".registry-2.tmp")
	for _, name := range []string{stale, fresh} {
		if err := os.WriteFile(name, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	old := time.Now().Add(-2 * time.Minute)
	os.Chtimes(stale, old, old)
	newTestFileBackend(t, filepath.Join(dir, "registry.json"), 0)
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a stale temporary file is left: %v", err)
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Errorf("a fresh temporary file was removed: %v", err)
	}
}

// TestFileBackendRecovers: a failure (a lock held too long elsewhere) is
// cleared once the lock can be had, on a sidecar that writes nothing more.
func TestFileBackendRecovers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb := newTestFileBackend(t, path, 0)
	fb.fail(errors.New("file registry: lock: held by another process for over 5s"))
	waitFor(t, 2*time.Second, "the failure to clear", func() bool { return fb.status() == nil })
}

// FuzzParseRegistryFile feeds arbitrary files to the file registry's
// reader: it must never panic, and every record it keeps must be valid.
func FuzzParseRegistryFile(f *testing.F) {
	f.Add([]byte(`{"format":1,"records":[{"service":"a","node":{"id":"1","address":"127.0.0.1","port":1}}]}`))
	f.Add([]byte(`{"format":1,"records":[{"service":"a","node":{"id":"1","address":"127.0.0.1","port":0}},{"service":"b","node":{"id":"2","address":"h","port":2}}]}`))
	f.Add([]byte(`{"format":2}`))
	f.Add([]byte(``))
	f.Fuzz(func(t *testing.T, data []byte) {
		recs, skipped, err := parseRegistryFile(data)
		if skipped > 0 && err == nil {
			t.Fatalf("%d records skipped without a reason", skipped)
		}
		for _, r := range recs {
			s := Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}
			if err := normalizeService(&s); err != nil {
				t.Fatalf("kept an invalid record %+v: %v", r, err)
			}
		}
		if len(recs) == 0 {
			return
		}
		// What was read, written as a sidecar writes it, reads back whole.
		out, err := json.Marshal(fileFormat{Format: fileFormatVersion, Records: recs})
		if err != nil {
			t.Fatalf("the records read cannot be written: %v", err)
		}
		back, skipped, err := parseRegistryFile(out)
		if skipped != 0 || err != nil || len(back) != len(recs) {
			t.Fatalf("written %s, read back %d of %d (skipped %d): %v", out, len(back), len(recs), skipped, err)
		}
		for i := range recs {
			if !recs[i].same(back[i]) || recs[i].Node.ID != back[i].Node.ID || !recs[i].Expires.Equal(back[i].Expires) {
				t.Fatalf("record %d: %+v read back as %+v", i, recs[i], back[i])
			}
		}
	})
}

// TestFileBackendRefusedWriteIsNoRewrite: a change the backend refused (the
// node limit) was never written, and is not what this sidecar last wrote:
// the next refresh of the old value is no rewrite by another writer.
func TestFileBackendRefusedWriteIsNoRewrite(t *testing.T) {
	var log syncBuffer
	fb, err := newFileBackend(t.Context(), filepath.Join(t.TempDir(), "reg.json"), newTable(1), slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.close() })
	fb.setKeeps(func(string) bool { return true }, func() {})
	n1 := Node{ID: "n1", Address: "10.0.0.1", Port: 80}
	if err := fb.register(Service{Name: "s", Nodes: []Node{n1}}, time.Minute); err != nil {
		t.Fatal(err)
	}
	moved := n1
	moved.Port = 81
	if err := fb.register(Service{Name: "s", Nodes: []Node{moved, {ID: "n2", Address: "10.0.0.2", Port: 80}}}, time.Minute); err == nil {
		t.Fatal("two nodes past a limit of one were taken")
	}
	if err := fb.register(Service{Name: "s", Nodes: []Node{n1}}, time.Minute); err != nil { // the refresh of what stands
		t.Fatal(err)
	}
	if strings.Contains(log.String(), "rewritten by another writer") {
		t.Errorf("a warning with no other writer:\n%s", log.String())
	}
}

// TestFileRefreshPutsBackWhatFits: a refresh whose entries include one
// another sidecar removed, on a file at the node limit, still refreshes
// the entries the file holds; refused whole, the app's entry would lapse
// with the one that no longer fits, and stay out for good.
func TestFileRefreshPutsBackWhatFits(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	keeper := newTestFileBackend(t, path, 3)
	other := newTestFileBackend(t, path, 3)
	kept := []Service{nodeService("app", "app-1"), nodeService("client", "c1")}
	if err := keeper.registerAll(kept, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := other.deregister(nodeService("client", "c1")); err != nil {
		t.Fatal(err)
	}
	if err := other.register(nodeService("other", "o1", "o2"), time.Hour); err != nil { // the file is full
		t.Fatal(err)
	}
	expiryOf := func(service, id string) time.Time {
		t.Helper()
		recs, err := keeper.readFile()
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range recs {
			if r.Service == service && r.Node.ID == id {
				return r.Expires
			}
		}
		return time.Time{}
	}
	before := expiryOf("app", "app-1")
	err := keeper.registerAll(kept, 3*time.Second)
	if !errors.Is(err, errTableFull) || !strings.Contains(err.Error(), "c1") {
		t.Errorf("refresh: %v; want the entry that did not fit named", err)
	}
	if after := expiryOf("app", "app-1"); !after.After(before) {
		t.Errorf("the app's entry expires at %v after the refresh, %v before; want it refreshed", after, before)
	}
	if !expiryOf("client", "c1").IsZero() || expiryOf("other", "o2").IsZero() {
		t.Error("want c1 left out and the other sidecar's entries kept")
	}

	// None of its entries fits: the file is not rewritten, which would
	// wake every other sidecar for nothing, at every refresh of each.
	if err := other.deregister(nodeService("app", "app-1")); err != nil {
		t.Fatal(err)
	}
	if err := other.register(nodeService("other", "o3"), time.Hour); err != nil {
		t.Fatal(err)
	}
	sig, _ := statSig(path)
	if err := keeper.registerAll(kept, 3*time.Second); !errors.Is(err, errTableFull) {
		t.Errorf("a refresh of which nothing fits: %v; want errTableFull", err)
	}
	if after, _ := statSig(path); after != sig {
		t.Error("a refresh that changed nothing rewrote the file")
	}
}

// TestFileWriteTellsOfOthersChanges: a write that starts from a file
// another sidecar changed installs that change, and poll, finding the
// file as this write left it, will not see it: the write tells the
// registry, which puts back at once an entry it keeps that the other
// sidecar removed. It also says so when the file was deleted by hand.
func TestFileWriteTellsOfOthersChanges(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	var log syncBuffer
	keeper, err := newFileBackend(t.Context(), path, newTable(0), slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { keeper.close() })
	keeper.stop() // no poll: only writes may find the others' changes
	keeper.wg.Wait()
	var told atomic.Int32
	keeper.setKeeps(func(string) bool { return true }, func() { told.Add(1) })
	other := newTestFileBackend(t, path, 0)

	if err := keeper.register(nodeService("kept", "k1"), time.Minute); err != nil {
		t.Fatal(err)
	}
	told.Store(0) // the other's start wrote the file too
	if err := keeper.register(nodeService("kept", "k1"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if n := told.Load(); n != 0 {
		t.Fatalf("a write over its own told the registry %d times; want none", n)
	}
	if err := other.deregister(nodeService("kept", "k1")); err != nil {
		t.Fatal(err)
	}
	if err := keeper.register(nodeService("heartbeat", "h1"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if n := told.Load(); n != 1 {
		t.Errorf("a write over another sidecar's change told the registry %d times; want once", n)
	}
	if tableHasNode(keeper.t, "kept", "k1") {
		t.Error("k1, which the other sidecar removed, is still in the table")
	}
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	if err := keeper.register(nodeService("heartbeat", "h2"), time.Minute); err != nil {
		t.Fatal(err)
	}
	if n := told.Load(); n != 2 || !strings.Contains(log.String(), "deleted or emptied by hand") {
		t.Errorf("a write after the file was deleted: told %d times, log:\n%s\nwant told twice and the deletion said", n, log.String())
	}
}

// TestRefreshPutsTheSidecarsOwnBackFirst: where a full file has room for
// one of the entries a sidecar keeps, the refresh puts back the sidecar's
// own (its app's), not one of its clients'.
func TestRefreshPutsTheSidecarsOwnBackFirst(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	keeper := newTestFileBackend(t, path, 11)
	other := newTestFileBackend(t, path, 11)
	r := &registry{table: keeper.t, backend: keeper, ttl: time.Minute, now: time.Now, owned: map[string]Service{}}
	if err := r.registerOwn(nodeService("app", "app-1")); err != nil {
		t.Fatal(err)
	}
	clients := nodeService("client", "c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9")
	if err := r.Register(clients, 0); err != nil {
		t.Fatal(err)
	}
	if err := other.deregisterAll([]Service{nodeService("app", "app-1"), clients}); err != nil {
		t.Fatal(err)
	}
	if err := other.register(nodeService("other", "o0", "o1", "o2", "o3", "o4", "o5", "o6", "o7", "o8", "o9"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := r.refreshAll(keeper); !errors.Is(err, errTableFull) {
		t.Fatalf("refresh with room for one of eleven: %v; want errTableFull", err)
	}
	recs, err := keeper.readFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.ContainsFunc(recs, func(r record) bool { return r.Node.ID == "app-1" }) {
		t.Error("the app's entry was left out for a client's")
	}
}

// TestFileDeleteKeepsAnotherVersion: a DELETE naming a version removes no
// node of another version, though the sidecar that takes it has yet to
// read the node from the file (its table's filter then lets it through):
// the version in the file decides, under the lock.
func TestFileDeleteKeepsAnotherVersion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	a, b := newTestFileBackend(t, path, 0), newTestFileBackend(t, path, 0)
	v1 := nodeService("ver", "n1")
	v1.Version = "1.0"
	if err := a.register(v1, time.Hour); err != nil {
		t.Fatal(err)
	}
	v2 := nodeService("ver", "n1")
	v2.Version = "2.0"
	if err := b.deregister(v2); err != nil {
		t.Fatal(err)
	}
	if !tableHasNode(b.t, "ver", "n1") {
		t.Errorf("a DELETE of version 2.0 removed the node registered under 1.0")
	}
	if err := b.deregister(nodeService("ver", "n1")); err != nil {
		t.Fatal(err)
	}
	if tableHasNode(b.t, "ver", "n1") {
		t.Errorf("a DELETE naming no version left the node")
	}
}

// openCount counts this process's descriptors open on path (Linux).
func openCount(t *testing.T, path string) int {
	t.Helper()
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("no /proc/self/fd: %v", err)
	}
	n := 0
	for _, fd := range fds {
		if target, _ := os.Readlink("/proc/self/fd/" + fd.Name()); target == path || target == path+" (deleted)" {
			n++
		}
	}
	return n
}

// TestLockFileDeletedIsNoSecondLock: a lock file deleted while a sidecar
// held it and another waited on it (by hand, or by a cleaner of old files)
// gave two writers the lock: the waiter, once the holder let go of the
// deleted file, and a newcomer, on the new file at the path; each then
// lost the other's changes. The waiter now takes the file at the path.
func TestLockFileDeletedIsNoSecondLock(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json.lock")
	releaseFirst, err := lockFile(path)
	if err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() {
		release, err := lockFileWithin(t.Context(), path, 2*time.Second)
		if err == nil {
			release()
		}
		waited <- err
	}()
	waitFor(t, 5*time.Second, "the waiter to open the lock file", func() bool { return openCount(t, path) == 2 })
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	releaseNew, err := lockFile(path) // a newcomer, on a new file
	if err != nil {
		t.Fatal(err)
	}
	defer releaseNew()
	releaseFirst()
	if err := <-waited; err == nil {
		t.Errorf("the waiter got a lock while the newcomer held the lock file at the path")
	}
}

// TestFileWriteFailureStands: a write that fails (a directory turned
// read-only, a full disk) is the registry's failure until a write works
// again, though the lock can be had and the file read: polls cleared it
// within 100 ms, /health said ok while the app's entry lapsed everywhere.
// It names the registry file, not a temporary file's changing name, and
// clears once writes work, also with nothing more to write.
func TestFileWriteFailureStands(t *testing.T) {
	path := filepath.Join(t.TempDir(), "registry.json")
	fb := newTestFileBackend(t, path, 0)
	if err := fb.register(nodeService("before", "n1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	fb.close() // the polls are this test's from here
	clock := time.Now()
	fb.now = func() time.Time { return clock }
	full := &fs.PathError{Op: "write", Path: "/x/.registry-123.tmp", Err: syscall.ENOSPC}
	fb.createTemp = func(string, string) (*os.File, error) { return nil, full }
	err := fb.register(nodeService("during", "n1"), time.Hour)
	if err == nil || !strings.Contains(err.Error(), "cannot write a new registry.json") || !strings.Contains(err.Error(), "file system is full") || strings.Contains(err.Error(), ".registry-123.tmp") {
		t.Fatalf("the failed write: %v; want it to name the registry file and the full disk", err)
	}
	for range 3 {
		fb.poll()
		clock = clock.Add(2 * time.Second) // past the probes' second
	}
	if fb.status() == nil {
		t.Errorf("polls cleared the write failure while writes still fail")
	}
	fb.createTemp = os.CreateTemp
	// A file written beside it, and its rename into place refused (in a
	// sticky directory, another user's file): writes still fail.
	fb.rename = func(from, to string) error {
		return &os.LinkError{Op: "rename", Old: from, New: to, Err: syscall.EPERM}
	}
	fb.poll()
	clock = clock.Add(2 * time.Second)
	if err := fb.status(); err == nil || strings.Contains(err.Error(), ".tmp") {
		t.Errorf("the rename refused: %v; want the failure standing, naming no temporary file", err)
	}
	fb.rename = os.Rename
	fb.poll() // nothing more to write: the probe finds writes work
	if err := fb.status(); err != nil {
		t.Errorf("writes work again, still failing: %v", err)
	}
}

// TestFileDirectoryGoneIsSaid: a registry whose directory is removed is
// not "deleted or emptied by hand" with "every sidecar writes its own
// entries again": no write can be made until the directory is back.
func TestFileDirectoryGoneIsSaid(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "reg")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var log syncBuffer
	fb, err := newFileBackend(t.Context(), filepath.Join(dir, "reg.json"), newTable(0), slog.New(slog.NewTextHandler(&log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fb.close() })
	if err := fb.register(nodeService("s", "n1"), time.Hour); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the sidecar to notice", func() bool { return strings.Contains(log.String(), "directory is gone") })
	if strings.Contains(log.String(), "deleted or emptied by hand") {
		t.Errorf("the log says the file was emptied by hand:\n%s", log.String())
	}
}
