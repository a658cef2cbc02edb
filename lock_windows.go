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

const (
	lockfileFailImmediately = 0x1 // LOCKFILE_FAIL_IMMEDIATELY
	lockfileExclusiveLock   = 0x2 // LOCKFILE_EXCLUSIVE_LOCK
	errorLockViolation      = syscall.Errno(33)
)

// tryLock takes an exclusive lock (LockFileEx) on the first byte of fh if
// it is free. Windows drops a process's locks when it ends, so a crashed
// sidecar never leaves the registry locked.
func tryLock(fh *os.File) (bool, error) {
	ol := new(syscall.Overlapped)
	r, _, err := procLockFileEx.Call(fh.Fd(), lockfileExclusiveLock|lockfileFailImmediately, 0, 1, 0, uintptr(unsafe.Pointer(ol)))
	switch {
	case r != 0:
		return true, nil
	case err == errorLockViolation:
		return false, nil
	}
	return false, os.NewSyscallError("LockFileEx", err)
}

func unlock(fh *os.File) {
	ol := new(syscall.Overlapped)
	procUnlockFileEx.Call(fh.Fd(), 0, 1, 0, uintptr(unsafe.Pointer(ol)))
}

// inodeOf is 0: Windows has no inode to show a rename, so two versions of
// the file written in the same tick with the same size look alike until
// the next write.
func inodeOf(os.FileInfo) uint64 { return 0 }
