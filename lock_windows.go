//go:build windows

package main

import (
	"os"
	"syscall"
	"unsafe"
)

var (
	kernel32         = syscall.NewLazyDLL("kernel32.dll")
	procLockFileEx   = kernel32.NewProc("LockFileEx")
	procUnlockFileEx = kernel32.NewProc("UnlockFileEx")
)

const lockfileExclusiveLock = 0x2 // LOCKFILE_EXCLUSIVE_LOCK; without LOCKFILE_FAIL_IMMEDIATELY it waits

// lockFile takes an exclusive lock (LockFileEx) on the first byte of path,
// creating it, and returns the function that releases it. Windows drops a
// process's locks when it ends, so a crashed sidecar never leaves the
// registry locked.
func lockFile(path string) (func(), error) {
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, err
	}
	ol := new(syscall.Overlapped)
	if r, _, err := procLockFileEx.Call(fh.Fd(), lockfileExclusiveLock, 0, 1, 0, uintptr(unsafe.Pointer(ol))); r == 0 {
		fh.Close()
		return nil, os.NewSyscallError("LockFileEx", err)
	}
	return func() {
		procUnlockFileEx.Call(fh.Fd(), 0, 1, 0, uintptr(unsafe.Pointer(ol)))
		fh.Close()
	}, nil
}

// inodeOf is 0: Windows has no inode to show a rename, so two versions of
// the file written in the same tick with the same size look alike until
// the next write.
func inodeOf(os.FileInfo) uint64 { return 0 }
