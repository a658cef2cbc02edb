//go:build !unix

package main

import "net"

// connAlive cannot peek at a connection here: an idle connection the node
// closed shows up as a failed call.
func connAlive(net.Conn) bool { return true }
