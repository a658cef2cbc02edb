package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// fileFormat is the registry file: every node of every sidecar sharing it,
// each with its absolute expiry, so that a crashed sidecar's nodes run out.
type fileFormat struct {
	Format  int      `json:"format"`
	Records []record `json:"records"`
}

const (
	fileFormatVersion = 1
	// filePollInterval bounds how long a change written by another sidecar
	// takes to reach this one's table.
	filePollInterval = 100 * time.Millisecond
	// maxFileBytes bounds what is read from the registry file.
	maxFileBytes = 64 << 20
)

// fileBackend shares the registry through one JSON file. Every change is a
// read-modify-write under an exclusive lock on a sibling lock file, written
// to a temporary file and renamed into place, so readers never see half a
// file and concurrent writers never lose each other's entries.
type fileBackend struct {
	path string
	t    *table
	log  *slog.Logger
	now  func() time.Time

	// ioMu orders poll's read-and-install with update's: a poll that read
	// the file before an update rewrote it must not install what it read
	// after the update installed its own, hiding a node just registered.
	ioMu sync.Mutex

	mu      sync.Mutex // guards lastSig, badSig, lastErr, writeErr, probedAt, started, lastSkipped, changed
	lastSig fileSig
	// badSig is the version of the file last found unreadable (corrupt, or
	// a newer format): polls leave it alone until it changes, rather than
	// parse up to 64 MiB ten times a second to fail the same way.
	badSig  fileSig
	lastErr error
	// writeErr is why the last write failed (a directory turned
	// read-only, a full disk), nil once one succeeds. Reads and the lock
	// may work all the while: a failure cleared by them would report a
	// registry that no write reaches, the app's entry lapsing, as well.
	writeErr   error
	probedAt   time.Time                                   // the last probe of whether writes work again
	createTemp func(dir, pattern string) (*os.File, error) // os.CreateTemp
	rename     func(from, to string) error                 // os.Rename
	// started is set once the first write went through: a failure before
	// it stops the start and is the caller's to report, not fail's too.
	started bool
	// lastSkipped is how many invalid records the last read skipped,
	// logged when it changes.
	lastSkipped int

	// changed is told when another sidecar's change to the file is
	// installed, so that an entry this sidecar keeps and found removed is
	// written again at once (registry.restoreLost); nil: nobody.
	changed func()
	// keeps reports whether the registry keeps a record key alive; nil:
	// none.
	keeps func(key string) bool

	// wrote is what this sidecar last wrote of each entry it keeps alive,
	// by record key, and contested limits the warning that another writer
	// changed one in between (two sidecars keeping one node id with
	// different values overwrite each other at every refresh). Guarded by
	// ioMu: only update's change functions touch wrote.
	wrote     map[string]record
	contested logLimiter

	stop context.CancelFunc
	wg   sync.WaitGroup
	once sync.Once
}

// statSig identifies the file's current version.
func statSig(path string) (fileSig, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return fileSig{}, err
	}
	return fileSig{size: fi.Size(), mtime: fi.ModTime(), inode: inodeOf(fi)}, nil
}

// fileSig identifies one version of the file cheaply, so that polling reads
// it only when it changed.
type fileSig struct {
	size  int64
	mtime time.Time
	inode uint64
}

// defaultRegistryPath is a per-user place for the file registry that also
// works in a scratch image with no /tmp and no environment: the runtime
// directory, then the cache directory, then the working directory.
func defaultRegistryPath() string {
	if d := os.Getenv("XDG_RUNTIME_DIR"); d != "" {
		return filepath.Join(d, "micro", "registry.json")
	}
	if d, err := os.UserCacheDir(); err == nil {
		return filepath.Join(d, "micro", "registry.json")
	}
	return "micro-registry.json"
}

func newFileBackend(ctx context.Context, path string, t *table, log *slog.Logger) (*fileBackend, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("file registry: %w (choose a writable --registry_address)", err)
	}
	// A symbolic link is followed: a rename onto the link would replace it
	// with a file, and sidecars given the link and the target would part.
	if resolved, err := filepath.EvalSymlinks(path); err == nil {
		path = resolved
	}
	if err := checkRegular(path); err != nil {
		return nil, fmt.Errorf("file registry: %w (choose a file's path for --registry_address)", err)
	}
	removeStaleTemps(filepath.Dir(path), time.Now())
	f := &fileBackend{path: path, t: t, log: log, now: time.Now, createTemp: os.CreateTemp, rename: os.Rename,
		wrote: map[string]record{}, contested: logLimiter{every: 10 * time.Minute}}
	// The first write waits for the lock within ctx: a signal stops a
	// start held up by a stuck process's lock at once. A wait is said, as
	// nothing else is until the sidecar listens.
	waiting := time.AfterFunc(lockWaitNotice, func() {
		log.Info("file registry: waiting for the lock, which another process holds", "lock", path+".lock", "timeout", lockTimeout)
	})
	err := f.updateWithin(ctx, func(recs []record) ([]record, bool) { return recs, true })
	waiting.Stop()
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.started = true
	f.mu.Unlock()
	ctx, f.stop = context.WithCancel(ctx)
	f.wg.Add(1)
	go f.pollLoop(ctx)
	return f, nil
}

// register writes every node of s, or none: a registration that would
// take the file past the node limit is refused whole.
func (f *fileBackend) register(s Service, ttl time.Duration) error {
	return f.put([]Service{s}, ttl, false)
}

func (f *fileBackend) deregister(s Service) error { return f.deregisterAll([]Service{s}) }

// registerAll is the registry's refresh of every entry it keeps, in one
// rewrite of the file: a refresh of thousands of entries one by one would
// hold the lock, and have every other sidecar reread the file, thousands
// of times. Entries still in the file are written whatever the node limit
// (they add nothing); those another sidecar removed are put back while
// the limit allows, and the rest are left out and reported. Refused whole,
// one entry that no longer fits would keep every other from its refresh,
// the app's included, until all of them lapsed.
func (f *fileBackend) registerAll(ss []Service, ttl time.Duration) error {
	return f.put(ss, ttl, true)
}

// put writes the nodes of ss; see register and registerAll, which fit
// says it is.
func (f *fileBackend) put(ss []Service, ttl time.Duration, fit bool) error {
	var add []record
	for _, s := range ss {
		add = append(add, recordsOf(s, expiry(f.now(), ttl))...)
	}
	keeps := f.keepsFunc()
	var written, left []record
	err := f.update(func(recs []record) ([]record, bool) {
		present := make(map[string]bool, len(recs))
		for _, r := range recs {
			present[r.key()] = true
		}
		skip := map[string]bool{}
		for _, r := range add {
			skip[r.key()] = true
		}
		out := recs[:0]
		for _, r := range recs {
			if !skip[r.key()] {
				out = append(out, r)
			} else {
				f.noteRewrite(r)
			}
		}
		// Room for nodes the file does not hold: a change that adds none
		// always passes.
		room := len(add)
		if fit && f.t.maxNodes > 0 {
			room = max(f.t.maxNodes, len(recs)) - len(out)
		}
		written, left = written[:0], left[:0]
		for _, r := range add {
			if present[r.key()] {
				room-- // rewritten in place
			}
		}
		for _, r := range add {
			if !present[r.key()] {
				if room <= 0 {
					left = append(left, r)
					continue
				}
				room--
			}
			written = append(written, r)
		}
		// Nothing of ours fits: the file stays as it is. Written all the
		// same, it would wake every other sidecar, whose refresh of an entry
		// of its own that no longer fits would wake this one, and so on.
		return append(out, written...), len(written) > 0
	})
	if err != nil {
		return err // nothing written: what wrote holds stands
	}
	// Writes of owned entries come one at a time (registry.writeMu): no
	// other update of them runs between the write and this.
	f.ioMu.Lock()
	for _, r := range written {
		if keeps(r.key()) {
			f.wrote[r.key()] = r
		} else {
			delete(f.wrote, r.key()) // posted with ?ttl= now: nobody's to defend
		}
	}
	f.ioMu.Unlock()
	if len(left) > 0 {
		return fmt.Errorf("%w: %d of the entries this sidecar keeps could not be put back (node %s of %s among them): %d nodes is the limit (--registry_max_nodes)",
			errTableFull, len(left), left[0].Node.ID, left[0].Service, f.t.maxNodes)
	}
	return nil
}

// noteRewrite warns when old, an entry this sidecar is about to write
// again, is not what it wrote last: another sidecar wrote the entry since.
// Two sidecars keeping one node id with different values (an app's address
// posted through one, a copy of its --server_id on another) overwrite each
// other at every refresh, and lookups answer whichever wrote last.
func (f *fileBackend) noteRewrite(old record) {
	mine, ok := f.wrote[old.key()]
	if !ok || old.same(mine) || !f.contested.allow(old.key()) {
		return
	}
	f.log.Warn("file registry: a node this sidecar keeps alive was rewritten by another writer; it is put back now. If another sidecar keeps the same node id, the two overwrite each other at every refresh: give each its own id",
		"service", old.Service, "node", old.Node.ID, "address", mine.Node.hostPort(), "other_address", old.Node.hostPort())
}

// keepsFunc returns the registry's keeps, or one that keeps nothing.
func (f *fileBackend) keepsFunc() func(string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.keeps == nil {
		return func(string) bool { return false }
	}
	return f.keeps
}

// deregisterAll removes every service of ss in one rewrite of the file.
func (f *fileBackend) deregisterAll(ss []Service) error {
	drop := map[string]string{} // key: the version named, "" for any
	for _, s := range ss {
		for _, k := range keysOf(s) {
			drop[k] = s.Version
		}
	}
	// The version is checked here too, under the lock: the table's filter
	// (nodesToDeregister) may not yet have seen a node another sidecar
	// registered under another version moments ago.
	named := func(r record) bool { v, ok := drop[r.key()]; return ok && (v == "" || v == r.Version) }
	return f.update(func(recs []record) ([]record, bool) {
		for k, r := range f.wrote {
			if named(r) {
				delete(f.wrote, k)
			}
		}
		keep := recs[:0]
		for _, r := range recs {
			if !named(r) {
				keep = append(keep, r)
			}
		}
		return keep, true
	})
}

func (f *fileBackend) status() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.lastErr
}

func (f *fileBackend) close() error {
	f.once.Do(func() {
		if f.stop != nil {
			f.stop()
		}
		f.wg.Wait()
	})
	return nil
}

// lockTimeout bounds the wait for the registry file's lock: a process
// stuck holding it must not hang registrations, refreshes or shutdown.
const lockTimeout = 5 * time.Second

// lockWaitNotice is how long a start waits for the lock before it says so.
const lockWaitNotice = 500 * time.Millisecond

// checkRegular refuses a path that names anything but a regular file (or
// nothing yet): a write renames a new file onto the path, which would
// replace a device such as /dev/null, and reading a named pipe would hang.
func checkRegular(path string) error {
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().IsRegular() {
		return nil // nothing there yet, or the read that follows says what is wrong
	}
	what := "not a regular file"
	switch {
	case fi.IsDir():
		what = "is a directory"
	case fi.Mode()&fs.ModeDevice != 0:
		what = "is a device, not a regular file"
	case fi.Mode()&fs.ModeNamedPipe != 0:
		what = "is a named pipe, not a regular file"
	case fi.Mode()&fs.ModeSocket != 0:
		what = "is a socket, not a regular file"
	}
	return &fs.PathError{Op: "read", Path: path, Err: errors.New(what)}
}

// lockFile takes the exclusive lock on path, creating it, and returns the
// function that releases it. It polls, backing off from 100us to 10ms,
// rather than block: a blocked lock cannot be given up on at the timeout.
func lockFile(path string) (func(), error) {
	return lockFileWithin(context.Background(), path, lockTimeout)
}

// lockFileWithin is lockFile, giving up after timeout, or when ctx ends.
func lockFileWithin(ctx context.Context, path string, timeout time.Duration) (func(), error) {
	deadline := time.Now().Add(timeout)
	for {
		fh, err := openLockFile(path)
		if err != nil {
			return nil, err
		}
		if err := waitLock(ctx, fh, deadline, timeout); err != nil {
			fh.Close()
			return nil, err
		}
		if lockedAtPath(fh, path) {
			return func() { unlock(fh); fh.Close() }, nil
		}
		// The lock file was deleted or replaced while this waited (by
		// hand, by a cleaner of old files): a sidecar that opened the one
		// at path now may hold its lock, and two writers would lose each
		// other's changes. That one is the lock.
		unlock(fh)
		fh.Close()
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("the lock file was deleted or replaced again and again for %v", timeout)
		}
	}
}

// openLockFile opens the lock file at path, creating it.
func openLockFile(path string) (*os.File, error) {
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if errors.Is(err, fs.ErrPermission) {
		// Another user's lock file: a lock needs no write access to it.
		// None there: the directory refuses this user, which the first
		// error says.
		var rerr error
		if fh, rerr = os.Open(path); rerr == nil {
			err = nil
		}
	}
	return fh, err
}

// waitLock takes the lock on fh, polling until deadline or ctx's end.
func waitLock(ctx context.Context, fh *os.File, deadline time.Time, timeout time.Duration) error {
	for wait := 100 * time.Microsecond; ; wait = min(2*wait, 10*time.Millisecond) {
		locked, err := tryLock(fh)
		switch {
		case err != nil:
			return err
		case locked:
			return nil
		case time.Now().After(deadline):
			return fmt.Errorf("held by another process for over %v: is one stuck?", timeout)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
	}
}

// lockedAtPath reports whether fh, locked, is still the file at path.
func lockedAtPath(fh *os.File, path string) bool {
	held, err := fh.Stat()
	if err != nil {
		return false
	}
	now, err := os.Stat(path)
	return err == nil && os.SameFile(held, now)
}

// update applies change to the file's live records under the lock and
// installs the result in the table, unless change says there is nothing to
// write. The table's node limit is checked before anything is written.
func (f *fileBackend) update(change func([]record) ([]record, bool)) error {
	return f.updateWithin(context.Background(), change)
}

// updateWithin is update, giving up the wait for the lock when ctx ends.
func (f *fileBackend) updateWithin(ctx context.Context, change func([]record) ([]record, bool)) error {
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	return f.updateLocked(ctx, change)
}

// updateLocked is updateWithin, with ioMu held.
func (f *fileBackend) updateLocked(ctx context.Context, change func([]record) ([]record, bool)) error {
	unlock, err := lockFileWithin(ctx, f.path+".lock", lockTimeout)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, fs.ErrPermission) {
			err = fmt.Errorf("%w (choose a writable --registry_address)", err)
		}
		return f.fail(fmt.Errorf("file registry: lock %s: %w", f.path+".lock", err))
	}
	defer unlock()
	sig, err := statSig(f.path) // under the lock: no sidecar replaces it now
	if err != nil {
		sig = fileSig{}
	}
	f.mu.Lock()
	others := sig != f.lastSig // what this write starts from is news to poll too
	f.mu.Unlock()
	recs, err := f.readLocked()
	if err != nil {
		return f.fail(err)
	}
	recs = live(recs, f.now())
	before := len(recs)
	held := f.t.nodeCount()
	recs, write := change(recs)
	if !write {
		return nil // what others changed, poll installs
	}
	// Only a change that adds nodes is refused: a sidecar with a lower
	// limit than the others sharing the file must still deregister.
	if f.t.maxNodes > 0 && len(recs) > f.t.maxNodes && len(recs) > before {
		return fmt.Errorf("%w: %d nodes is the limit (--registry_max_nodes)", errTableFull, f.t.maxNodes)
	}
	if err := f.write(recs); err != nil {
		if errors.Is(err, errTableFull) {
			return err // this change is too large, the registry is well
		}
		f.setWriteErr(err)
		return f.fail(err)
	}
	f.t.replace(recs, f.now())
	f.setWriteErr(nil)
	f.fail(nil)
	if others {
		// poll, finding this write, will not see the change before it.
		f.othersInstalled(sig, held)
	}
	return nil
}

// readLocked reads the file while holding the lock. A file that does not
// parse, or is past the read limit (an older sidecar may have written it,
// and failing every change for good would help nobody), is moved aside,
// never overwritten, and the registry starts empty.
func (f *fileBackend) readLocked() ([]record, error) {
	recs, err := f.readFile()
	switch {
	case err == nil:
		return recs, nil
	case errors.As(err, new(*fs.PathError)), errors.Is(err, errNewerFormat):
		return nil, fmt.Errorf("file registry: %w", err)
	}
	aside := fmt.Sprintf("%s.corrupt-%d", f.path, f.now().UnixNano())
	if rerr := os.Rename(f.path, aside); rerr != nil {
		return nil, fmt.Errorf("file registry: %v, and could not be moved aside: %w", err, rerr)
	}
	f.log.Error("registry file was corrupt; kept it aside and started empty", "path", f.path, "kept_as", aside, "error", err)
	return nil, nil
}

// readFile reads and parses the file; one that does not exist is an empty
// registry. Its error says what is at fault: a *fs.PathError the reading,
// errNewerFormat a newer sidecar's file, anything else the content.
func (f *fileBackend) readFile() ([]record, error) {
	data, err := readLimited(f.path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil, nil
	case errors.Is(err, errFileTooLarge):
		return nil, fmt.Errorf("%s is %w", f.path, err)
	case err != nil:
		return nil, err // a *fs.PathError: it names the path
	}
	recs, err := f.parse(data)
	switch {
	case errors.Is(err, errNewerFormat):
		return nil, fmt.Errorf("%s was %w", f.path, err)
	case err != nil:
		return nil, fmt.Errorf("%s is corrupt: %w", f.path, err)
	}
	return recs, nil
}

func readLimited(path string) ([]byte, error) {
	if err := checkRegular(path); err != nil {
		return nil, err
	}
	fh, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer fh.Close()
	data, err := io.ReadAll(io.LimitReader(fh, maxFileBytes+1))
	if err != nil {
		return nil, err
	}
	if len(data) > maxFileBytes {
		return nil, errFileTooLarge
	}
	return data, nil
}

var (
	errFileTooLarge = fmt.Errorf("larger than %d MiB", maxFileBytes>>20)
	// errNewerFormat is a file a newer sidecar wrote: read what it can,
	// never moved aside nor rewritten.
	errNewerFormat = errors.New("written by a newer sidecar")
)

// parse is parseRegistryFile, logging the invalid records it skipped when
// their number changes.
func (f *fileBackend) parse(data []byte) ([]record, error) {
	recs, skipped, err := parseRegistryFile(data)
	f.mu.Lock()
	changed := skipped != f.lastSkipped
	f.lastSkipped = skipped
	f.mu.Unlock()
	if changed && skipped > 0 {
		f.log.Warn("registry file: skipped invalid records; the next change drops them", "path", f.path, "records", skipped, "first_error", err)
	}
	if errors.Is(err, errNewerFormat) || skipped == 0 {
		return recs, err
	}
	return recs, nil
}

// parseRegistryFile decodes the file and validates every record, skipping
// the invalid ones (a hand edit, another version's rules) rather than
// losing the others; err then says why the first was. An empty file is an
// empty registry. A file of a newer format gives errNewerFormat, whatever
// else it holds: its format is read before anything it may lay out anew.
func parseRegistryFile(data []byte) (recs []record, skipped int, err error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, 0, nil
	}
	var head struct {
		Format  int             `json:"format"`
		Records json.RawMessage `json:"records"`
	}
	if err := json.Unmarshal(data, &head); err != nil {
		return nil, 0, err
	}
	if head.Format > fileFormatVersion {
		return nil, 0, fmt.Errorf("%w (format %d; this one knows %d): upgrade this sidecar", errNewerFormat, head.Format, fileFormatVersion)
	}
	if head.Format != fileFormatVersion {
		return nil, 0, fmt.Errorf("format %d, want %d", head.Format, fileFormatVersion)
	}
	var raws []json.RawMessage
	if len(head.Records) > 0 {
		if err := json.Unmarshal(head.Records, &raws); err != nil {
			return nil, 0, fmt.Errorf("records: %w", err)
		}
	}
	for i, raw := range raws {
		r, rerr := parseRecord(raw)
		if rerr != nil {
			if skipped == 0 {
				err = fmt.Errorf("records[%d]: %w", i, rerr)
			}
			skipped++
			continue
		}
		recs = append(recs, r)
	}
	return recs, skipped, err
}

// parseRecord decodes and validates one record of the file, normalised as
// a registration would be.
func parseRecord(raw json.RawMessage) (record, error) {
	var r record
	if err := json.Unmarshal(raw, &r); err != nil {
		return record{}, err
	}
	s := Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}
	if err := normalizeService(&s); err != nil {
		return record{}, err
	}
	r.Metadata, r.Node = s.Metadata, s.Nodes[0] // as normalised: {} where the file has none
	return r, nil
}

func live(recs []record, now time.Time) []record {
	out := recs[:0]
	for _, r := range recs {
		if !r.expired(now) {
			out = append(out, r)
		}
	}
	return out
}

// write replaces the file atomically: temporary file in the same directory,
// fsync, rename.
func (f *fileBackend) write(recs []record) error {
	if recs == nil {
		recs = []record{}
	}
	// Compact: one record per line would be friendlier to read, but the
	// file's size bounds the registry.
	data, err := json.Marshal(fileFormat{Format: fileFormatVersion, Records: recs})
	if err != nil {
		return err
	}
	if len(data) >= maxFileBytes {
		return fmt.Errorf("%w: the registry file would pass %d MiB", errTableFull, maxFileBytes>>20)
	}
	mode := fs.FileMode(0o644)
	if fi, err := os.Stat(f.path); err == nil {
		mode = fi.Mode().Perm() // as its owner set it: metadata may be private
	}
	tmp, err := f.writeTemp(append(data, '\n'))
	if err != nil {
		return err
	}
	defer os.Remove(tmp)
	if err := os.Chmod(tmp, mode); err != nil {
		return f.writeFailure(err)
	}
	if err := f.rename(tmp, f.path); err != nil {
		return f.writeFailure(err)
	}
	f.remember()
	return nil
}

// writeTemp writes data to a new temporary file beside the registry file
// and returns its name. Its error names the registry file, not the
// temporary one, whose name changes with every try (and the log says a
// failure again only when its text changes).
func (f *fileBackend) writeTemp(data []byte) (string, error) {
	tmp, err := f.createTemp(filepath.Dir(f.path), tempPattern)
	if err != nil {
		return "", f.writeFailure(err)
	}
	_, err = tmp.Write(data)
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", f.writeFailure(err)
	}
	return tmp.Name(), nil
}

// writeFailure says that a file could not be written beside the registry
// file, and what may help.
func (f *fileBackend) writeFailure(err error) error {
	var pe *fs.PathError
	var le *os.LinkError
	switch {
	case errors.As(err, &pe):
		err = pe.Err // the temporary file's name is no help
	case errors.As(err, &le):
		err = le.Err
	}
	hint := ""
	switch {
	case errors.Is(err, fs.ErrPermission):
		hint = " (choose a writable --registry_address)"
	case errors.Is(err, syscall.ENOSPC):
		hint = " (its file system is full)"
	}
	return fmt.Errorf("file registry: cannot write a new %s beside it in %s: %w%s", filepath.Base(f.path), filepath.Dir(f.path), err, hint)
}

func (f *fileBackend) setWriteErr(err error) {
	f.mu.Lock()
	f.writeErr = err
	f.mu.Unlock()
}

// fail records the backend's latest error for /health, logging a change of
// state once rather than on every poll, and returns err. A nil err (reads
// work) leaves a write failure standing.
func (f *fileBackend) fail(err error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err == nil {
		err = f.writeErr
	}
	switch {
	case !f.started:
	case err != nil && (f.lastErr == nil || f.lastErr.Error() != err.Error()):
		f.log.Error("file registry failing", "path", f.path, "error", err)
	case err == nil && f.lastErr != nil:
		f.log.Info("file registry recovered", "path", f.path)
	}
	f.lastErr = err
	return err
}

func (f *fileBackend) remember() {
	sig, _ := statSig(f.path)
	f.mu.Lock()
	f.lastSig = sig
	f.mu.Unlock()
}

func (f *fileBackend) pollLoop(ctx context.Context) {
	defer f.wg.Done()
	tick := time.NewTicker(filePollInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			f.poll()
		}
	}
}

// setKeeps tells the backend which record keys the registry keeps alive,
// and whom to tell when another sidecar's change is installed.
func (f *fileBackend) setKeeps(keeps func(key string) bool, changed func()) {
	f.mu.Lock()
	f.keeps, f.changed = keeps, changed
	f.mu.Unlock()
}

// poll rereads the file when another sidecar changed it. Reads need no lock:
// the file is only ever replaced whole by rename.
func (f *fileBackend) poll() {
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	sig, err := statSig(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		sig = fileSig{}
	} else if err != nil {
		f.fail(fmt.Errorf("file registry: stat %s: %w", f.path, err))
		return
	}
	f.mu.Lock()
	unchanged := sig == f.lastSig
	knownBad := sig == f.badSig && sig != (fileSig{})
	f.mu.Unlock()
	if unchanged || knownBad {
		f.t.sweep(f.now())
		if !knownBad {
			f.recheck()
		}
		return
	}
	var recs []record
	if sig != (fileSig{}) {
		recs, err = f.readFile()
		if err != nil {
			if !errors.As(err, new(*fs.PathError)) {
				// The content is at fault, not the reading (which may
				// pass, as a permission fixed does, with the file as it was).
				f.mu.Lock()
				f.badSig = sig
				f.mu.Unlock()
				if !errors.Is(err, errNewerFormat) {
					err = fmt.Errorf("%w (it is moved aside at the next registration)", err)
				}
			}
			f.fail(fmt.Errorf("file registry: %w", err))
			return
		}
	}
	f.mu.Lock()
	f.lastSig = sig
	f.mu.Unlock()
	held := f.t.nodeCount()
	now := f.now()
	f.t.replace(live(recs, now), now)
	f.fail(nil)
	f.othersInstalled(sig, held)
}

// othersInstalled follows the installing of a file others wrote (sig),
// read by poll or by a write of this sidecar's own, which the table held
// held nodes before: it says so when the file had been deleted or emptied
// by hand, and tells the registry, which writes again at once what it
// keeps and finds gone.
func (f *fileBackend) othersInstalled(sig fileSig, held int) {
	if _, err := os.Stat(filepath.Dir(f.path)); sig.size == 0 && held > 0 && errors.Is(err, fs.ErrNotExist) {
		f.log.Warn("file registry: the registry's directory is gone: writes fail until it is back", "path", f.path, "nodes_lost", held)
	} else if sig.size == 0 && held > 0 { // no sidecar writes an empty file, nor deletes it
		f.log.Warn("file registry: the file was deleted or emptied by hand; every sidecar writes its own entries again now, and entries posted with ?ttl= are gone until posted again",
			"path", f.path, "nodes_lost", held)
	}
	f.mu.Lock()
	changed := f.changed
	f.mu.Unlock()
	if changed != nil {
		changed()
	}
}

// recheck clears a failure that nothing else would: a lock held too long
// by another process fails a write, and a sidecar that writes nothing more,
// on a file that does not change, would report it for ever. Once the lock
// can be had and the file read, the registry works again.
func (f *fileBackend) recheck() {
	if f.status() == nil {
		return
	}
	f.probeWrites()
	unlock, err := lockFileWithin(context.Background(), f.path+".lock", 10*time.Millisecond)
	if err != nil {
		return // still held, or still failing: the failure stands
	}
	defer unlock()
	if _, err := f.readFile(); err == nil {
		f.fail(nil)
	}
}

// probeWrites clears a write failure once the file can be written again,
// trying at most once a second: a sidecar with nothing more to write would
// report the failure for ever. poll calls it, with ioMu held.
func (f *fileBackend) probeWrites() {
	now := f.now()
	f.mu.Lock()
	due := f.writeErr != nil && now.Sub(f.probedAt) >= time.Second
	if due {
		f.probedAt = now
	}
	f.mu.Unlock()
	if !due {
		return
	}
	// The file written again as it is: a write works only when all of it
	// does (a file written beside it may be, and the rename into place
	// still refused, as in a sticky directory another user's file). A lock
	// held elsewhere is waited for briefly: the poll waits meanwhile.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	f.updateLocked(ctx, func(recs []record) ([]record, bool) { return recs, true })
}

// tempPattern names the temporary files writes rename into place.
const tempPattern = ".registry-*.tmp"

// removeStaleTemps removes temporary files that writers killed mid-write
// left behind (a minute old: no write takes that long), each as large as
// the registry.
func removeStaleTemps(dir string, now time.Time) {
	names, _ := filepath.Glob(filepath.Join(dir, tempPattern))
	for _, name := range names {
		if fi, err := os.Stat(name); err == nil && now.Sub(fi.ModTime()) > time.Minute {
			os.Remove(name)
		}
	}
}
