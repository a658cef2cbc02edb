//go:build pprof

package main

// Profiling for the benchmarks only: `go build -tags pprof` and
// MICRO_PPROF_ADDRESS=127.0.0.1:6060 serve net/http/pprof there. Normal
// builds have none of this.

import (
	"net/http"
	_ "net/http/pprof"
	"os"
)

func init() {
	if addr := os.Getenv("MICRO_PPROF_ADDRESS"); addr != "" {
		go http.ListenAndServe(addr, http.DefaultServeMux)
	}
}
