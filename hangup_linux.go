//go:build linux && !386

package main

import (
	"encoding/binary"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// hangupWatcher learns which pooled connections to nodes the node has
// closed or reset, without a system call per request. Each connection is
// registered at dial, for hang-ups only, on an epoll instance of the
// watcher's own, which Go's network poller watches like a socket: its
// goroutine wakes only when a node hangs up, and marks the connection, and
// the pool drops it rather than write a request on it. Data arriving on a
// connection does not wake it. nginx keeps its upstream connections the
// same way; it saves the pool a liveness peek per request (see nodeSocket).
//
// hung holds a flag per watched connection until the connection closes;
// the pool's limits and the calls in flight bound it.
type hangupWatcher struct {
	file *os.File      // the epoll instance, as the poller sees it
	done chan struct{} // closed when run has returned

	mu     sync.Mutex // guards epfd's use, closed, hung, nextID
	epfd   int
	closed bool
	hung   map[uint64]*atomic.Bool
	nextID uint64 // ids are never reused: an event for a closed connection marks nothing
}

// epollET is EPOLLET as the uint32 of an event mask; syscall's is an int.
const epollET = 1 << 31

// newHangupWatcher starts a watcher; nil when the system will not give one.
func newHangupWatcher() *hangupWatcher {
	fd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil
	}
	if err := syscall.SetNonblock(fd, true); err != nil {
		syscall.Close(fd)
		return nil
	}
	f := os.NewFile(uintptr(fd), "node-hangups")
	rc, err := f.SyscallConn()
	// A file the poller cannot watch takes no deadline.
	if err != nil || f.SetReadDeadline(time.Time{}) != nil {
		f.Close()
		return nil
	}
	w := &hangupWatcher{file: f, done: make(chan struct{}), epfd: fd, hung: map[uint64]*atomic.Bool{}}
	go w.run(rc)
	return w
}

// run marks the connections hung up on, until close. The poller calls back
// when the epoll instance has events; with none left, the callback asks to
// wait.
func (w *hangupWatcher) run(rc syscall.RawConn) {
	defer close(w.done)
	events := make([]syscall.EpollEvent, 64)
	rc.Read(func(fd uintptr) bool {
		for {
			n, err := syscall.EpollWait(int(fd), events, 0)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				return true
			}
			w.mark(events[:n])
			if n < len(events) {
				return false
			}
		}
	})
}

func (w *hangupWatcher) mark(events []syscall.EpollEvent) {
	if len(events) == 0 {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, e := range events {
		if hung := w.hung[uint64(uint32(e.Fd))|uint64(uint32(e.Pad))<<32]; hung != nil {
			hung.Store(true)
		}
	}
}

// watch has hung set when the node hangs up on rc's connection. It returns
// the id to forget it by when the connection closes; 0 when it is not
// watched.
func (w *hangupWatcher) watch(rc syscall.RawConn, hung *atomic.Bool) uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return 0
	}
	w.nextID++
	id := w.nextID
	// The event's data is 64 bits, which syscall splits in two.
	ev := syscall.EpollEvent{Events: syscall.EPOLLRDHUP | epollET, Fd: int32(uint32(id)), Pad: int32(uint32(id >> 32))}
	var err error
	if cerr := rc.Control(func(fd uintptr) { err = syscall.EpollCtl(w.epfd, syscall.EPOLL_CTL_ADD, int(fd), &ev) }); cerr != nil {
		err = cerr
	}
	if err != nil {
		return 0
	}
	w.hung[id] = hung
	return id
}

// forget drops a connection about to close; the kernel drops its
// registration with the descriptor.
func (w *hangupWatcher) forget(id uint64) {
	w.mu.Lock()
	delete(w.hung, id)
	w.mu.Unlock()
}

// close stops the watcher and waits for its goroutine. The file closes
// outside the lock: Close waits for run's read, which may be in mark.
func (w *hangupWatcher) close() {
	w.mu.Lock()
	closed := w.closed
	w.closed = true // watch uses epfd no more
	w.mu.Unlock()
	if !closed {
		w.file.Close()
	}
	<-w.done
}

// bytesAcked returns how many bytes the node's TCP has acknowledged on a
// connection, its SYN counting one: tcpi_bytes_acked of TCP_INFO (RFC
// 4898's HCThruOctetsAcked; Linux 4.1 on). ok is false when the kernel
// does not say.
func bytesAcked(fd uintptr) (acked uint64, ok bool) {
	const at = 120 // tcpi_bytes_acked's offset in struct tcp_info
	var info [at + 8]byte
	size := uint32(len(info))
	_, _, e := syscall.Syscall6(syscall.SYS_GETSOCKOPT, fd, syscall.IPPROTO_TCP, syscall.TCP_INFO, uintptr(unsafe.Pointer(&info[0])), uintptr(unsafe.Pointer(&size)), 0)
	if e != 0 || size < uint32(len(info)) {
		return 0, false
	}
	return binary.NativeEndian.Uint64(info[at:]), true
}
