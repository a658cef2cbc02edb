//go:build pprof

package main

// Profiling for the benchmarks only: `go build -tags pprof` and
// MICRO_PPROF_ADDRESS=127.0.0.1:6060 serve net/http/pprof there. Normal
// builds have none of this.

import (
	"fmt"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
)

// profilerBuilt says MICRO_PPROF_ADDRESS is read (see unknownVariables).
const profilerBuilt = true

func init() {
	addr := os.Getenv("MICRO_PPROF_ADDRESS")
	if addr == "" {
		return
	}
	// The profiler has no token check: loopback only.
	host, _, err := net.SplitHostPort(addr)
	if ip := net.ParseIP(host); err != nil || host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		fmt.Fprintf(os.Stderr, "MICRO_PPROF_ADDRESS %q: the profiler serves a loopback address only, such as 127.0.0.1:6060; not started\n", addr)
		return
	}
	go http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/debug/pprof/cmdline" {
			// The command line may hold --auth_token.
			http.Error(w, "not served: the command line may hold secrets", http.StatusNotFound)
			return
		}
		http.DefaultServeMux.ServeHTTP(w, r)
	}))
}
