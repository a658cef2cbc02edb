package main

import (
	"sync"
	"time"
)

// logLimiter lets a warning through at most once per interval for each key
// (a peer, an entry): a failure that repeats with every message is still
// said for each peer it concerns, without filling the log. It holds at
// most maxLogKeys keys, and forgets them all when full.
type logLimiter struct {
	every time.Duration

	mu   sync.Mutex
	last map[string]time.Time
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
	if l.last == nil || len(l.last) >= maxLogKeys {
		l.last = map[string]time.Time{}
	}
	l.last[key] = now
	return true
}
