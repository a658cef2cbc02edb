//go:build unix

package main

import (
	"os"
	"syscall"
)

// tryLock takes an exclusive advisory lock (flock) on fh if it is free. The
// lock dies with the process, so a crashed sidecar never leaves the
// registry locked.
func tryLock(fh *os.File) (bool, error) {
	for {
		err := syscall.Flock(int(fh.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		switch err {
		case nil:
			return true, nil
		case syscall.EWOULDBLOCK:
			return false, nil
		case syscall.EINTR:
			continue
		}
		return false, err
	}
}

func unlock(fh *os.File) { syscall.Flock(int(fh.Fd()), syscall.LOCK_UN) }

// inodeOf is fi's inode: a rename changes it even when size and
// modification time happen to match.
func inodeOf(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return uint64(st.Ino)
	}
	return 0
}
