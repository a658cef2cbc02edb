//go:build !linux || 386

package main

import (
	"sync/atomic"
	"syscall"
)

// hangupWatcher has no epoll to wait on here, or (linux/386, where
// getsockopt goes through socketcall) no count of acknowledged bytes to
// fall back on: pooled connections are peeked at before each use instead
// (see nodeSocket).
type hangupWatcher struct{}

func newHangupWatcher() *hangupWatcher { return nil }

func (*hangupWatcher) watch(syscall.RawConn, *atomic.Bool) uint64 { return 0 }

func (*hangupWatcher) forget(uint64) {}

func (*hangupWatcher) close() {}

// bytesAcked is not known here: a failed call on a pooled connection
// counts as reaching the node.
func bytesAcked(uintptr) (uint64, bool) { return 0, false }
