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

	mu      sync.Mutex // guards lastSig, lastErr
	lastSig fileSig
	lastErr error

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
	f := &fileBackend{path: path, t: t, log: log, now: time.Now}
	if err := f.update(func(recs []record) []record { return recs }); err != nil {
		return nil, err
	}
	ctx, f.stop = context.WithCancel(ctx)
	f.wg.Add(1)
	go f.pollLoop(ctx)
	return f, nil
}

func (f *fileBackend) register(s Service, ttl time.Duration) error {
	add := recordsOf(s, expiry(f.now(), ttl))
	return f.update(func(recs []record) []record {
		keep := recs[:0]
		skip := map[string]bool{}
		for _, r := range add {
			skip[r.key()] = true
		}
		for _, r := range recs {
			if !skip[r.key()] {
				keep = append(keep, r)
			}
		}
		return append(keep, add...)
	})
}

func (f *fileBackend) deregister(s Service) error {
	drop := map[string]bool{}
	for _, k := range keysOf(s) {
		drop[k] = true
	}
	return f.update(func(recs []record) []record {
		keep := recs[:0]
		for _, r := range recs {
			if !drop[r.key()] {
				keep = append(keep, r)
			}
		}
		return keep
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

// lockFile takes the exclusive lock on path, creating it, and returns the
// function that releases it. It polls, backing off from 100us to 10ms,
// rather than block: a blocked lock cannot be given up on at the timeout.
func lockFile(path string) (func(), error) { return lockFileWithin(path, lockTimeout) }

// lockFileWithin is lockFile, giving up after timeout.
func lockFileWithin(path string, timeout time.Duration) (func(), error) {
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	deadline := time.Now().Add(timeout)
	for wait := 100 * time.Microsecond; ; wait = min(2*wait, 10*time.Millisecond) {
		locked, err := tryLock(fh)
		switch {
		case err != nil:
			fh.Close()
			return nil, err
		case locked:
			return func() { unlock(fh); fh.Close() }, nil
		case time.Now().After(deadline):
			fh.Close()
			return nil, fmt.Errorf("held by another process for over %v: is one stuck?", timeout)
		}
		time.Sleep(wait)
	}
}

// update applies change to the file's live records under the lock and
// installs the result in the table. The table's node limit is checked
// before anything is written.
func (f *fileBackend) update(change func([]record) []record) error {
	unlock, err := lockFile(f.path + ".lock")
	if err != nil {
		return f.fail(fmt.Errorf("file registry: lock %s: %w", f.path+".lock", err))
	}
	defer unlock()
	recs, err := f.readLocked()
	if err != nil {
		return f.fail(err)
	}
	recs = change(live(recs, f.now()))
	if f.t.maxNodes > 0 && len(recs) > f.t.maxNodes {
		return fmt.Errorf("%w: %d nodes is the limit (--registry_max_nodes)", errTableFull, f.t.maxNodes)
	}
	if err := f.write(recs); err != nil {
		return f.fail(err)
	}
	f.t.replace(recs)
	f.fail(nil)
	return nil
}

// readLocked reads the file while holding the lock. A file that does not
// parse is moved aside, never overwritten, and the registry starts empty.
func (f *fileBackend) readLocked() ([]record, error) {
	data, err := readLimited(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	var pathErr *fs.PathError
	if errors.As(err, &pathErr) {
		return nil, fmt.Errorf("file registry: %w", err) // it names the path
	}
	if err != nil {
		return nil, fmt.Errorf("file registry: read %s: %w", f.path, err)
	}
	recs, perr := parseRegistryFile(data)
	if perr == nil {
		return recs, nil
	}
	aside := fmt.Sprintf("%s.corrupt-%d", f.path, f.now().UnixNano())
	if err := os.Rename(f.path, aside); err != nil {
		return nil, fmt.Errorf("file registry: %s is corrupt (%v) and could not be moved aside: %w", f.path, perr, err)
	}
	f.log.Error("registry file was corrupt; kept it aside and started empty", "path", f.path, "kept_as", aside, "error", perr)
	return nil, nil
}

func readLimited(path string) ([]byte, error) {
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
		return nil, fmt.Errorf("larger than %d bytes", maxFileBytes)
	}
	return data, nil
}

// parseRegistryFile decodes the file and validates every record; an empty
// file is an empty registry.
func parseRegistryFile(data []byte) ([]record, error) {
	if len(bytes.TrimSpace(data)) == 0 {
		return nil, nil
	}
	var ff fileFormat
	if err := json.Unmarshal(data, &ff); err != nil {
		return nil, err
	}
	if ff.Format != fileFormatVersion {
		return nil, fmt.Errorf("format %d, want %d", ff.Format, fileFormatVersion)
	}
	for i := range ff.Records {
		r := &ff.Records[i]
		s := Service{Name: r.Service, Version: r.Version, Metadata: r.Metadata, Nodes: []Node{r.Node}}
		if err := normalizeService(&s); err != nil {
			return nil, fmt.Errorf("records[%d]: %w", i, err)
		}
		r.Metadata, r.Node = s.Metadata, s.Nodes[0] // as normalised: {} where the file has none
	}
	return ff.Records, nil
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
	data, err := json.MarshalIndent(fileFormat{Format: fileFormatVersion, Records: recs}, "", "  ")
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.path), ".registry-*.tmp")
	if err != nil {
		return fmt.Errorf("file registry: %w", err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(append(data, '\n')); err != nil {
		tmp.Close()
		return fmt.Errorf("file registry: write: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("file registry: sync: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("file registry: %w", err)
	}
	if err := os.Chmod(tmp.Name(), 0o644); err != nil {
		return fmt.Errorf("file registry: %w", err)
	}
	if err := os.Rename(tmp.Name(), f.path); err != nil {
		return fmt.Errorf("file registry: rename into place: %w", err)
	}
	f.remember()
	return nil
}

// fail records the backend's latest error for /health, logging a change of
// state once rather than on every poll, and returns err.
func (f *fileBackend) fail(err error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
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

// poll rereads the file when another sidecar changed it. Reads need no lock:
// the file is only ever replaced whole by rename.
func (f *fileBackend) poll() {
	sig, err := statSig(f.path)
	if errors.Is(err, fs.ErrNotExist) {
		sig = fileSig{}
	} else if err != nil {
		f.fail(fmt.Errorf("file registry: stat %s: %w", f.path, err))
		return
	}
	f.mu.Lock()
	unchanged := sig == f.lastSig
	f.mu.Unlock()
	if unchanged {
		f.t.sweep(f.now())
		return
	}
	var recs []record
	if sig != (fileSig{}) {
		data, err := readLimited(f.path)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			f.fail(fmt.Errorf("file registry: read %s: %w", f.path, err))
			return
		}
		recs, err = parseRegistryFile(data)
		if err != nil {
			f.fail(fmt.Errorf("file registry: %s is corrupt: %w (it is moved aside at the next registration)", f.path, err))
			return
		}
	}
	f.mu.Lock()
	f.lastSig = sig
	f.mu.Unlock()
	f.t.replace(live(recs, f.now()))
	f.fail(nil)
}
