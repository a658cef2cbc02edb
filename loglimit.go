package main

import (
	"sync"
	"time"
)

// logLimiter lets a warning through at most once per interval for each key
// (a peer, an entry): a failure that repeats with every message is still
// said for each peer it concerns, without filling the log. It holds at
// most maxLogKeys keys; when they are all of the last interval, a new key
// waits until the oldest lapses: memory stays bounded, and a flood of keys
// never floods the log.
type logLimiter struct {
	every time.Duration

	mu        sync.Mutex
	last      map[string]time.Time
	fullUntil time.Time // when full: the oldest key lapses then
}

const maxLogKeys = 1024

// allow reports whether a warning about key may be logged now, and if so
// counts it as logged.
func (l *logLimiter) allow(key string) bool {
	now := time.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	if t, ok := l.last[key]; ok && now.Sub(t) < l.every {
		return false
	}
	if l.last == nil {
		l.last = map[string]time.Time{}
	}
	if len(l.last) >= maxLogKeys && !l.makeRoom(now) {
		return false
	}
	l.last[key] = now
	return true
}

// wait is how long until a warning about key may be logged again: 0 when
// it may be now.
func (l *logLimiter) wait(key string) time.Duration {
	l.mu.Lock()
	defer l.mu.Unlock()
	t, ok := l.last[key]
	if !ok {
		return 0
	}
	return max(0, l.every-time.Since(t))
}

// makeRoom forgets the keys whose interval has passed, at most once until
// the oldest of those kept lapses, and reports whether any went.
func (l *logLimiter) makeRoom(now time.Time) bool {
	if now.Before(l.fullUntil) {
		return false
	}
	oldest := now
	for k, t := range l.last {
		if now.Sub(t) >= l.every {
			delete(l.last, k)
		} else if t.Before(oldest) {
			oldest = t
		}
	}
	if len(l.last) < maxLogKeys {
		return true
	}
	l.fullUntil = oldest.Add(l.every)
	return false
}
