//go:build !linux

package main

import "net"

// unsentBytes: see sendqueue_linux.go; unknown here.
func unsentBytes(net.Conn) int { return -1 }
