//go:build race

package main

// raceEnabled says the race detector is on (see sysRead).
const raceEnabled = true
