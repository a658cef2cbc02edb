//go:build !pprof

package main

// profilerBuilt says MICRO_PPROF_ADDRESS is read: only with -tags pprof
// (pprof.go).
const profilerBuilt = false
