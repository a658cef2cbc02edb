//go:build !unix

package main

import "net"

// nodeSocket cannot peek at a connection here: an idle connection the node
// closed shows up as a failed call. Requests are written the usual way.
type nodeSocket struct{}

func newNodeSocket(net.Conn) *nodeSocket { return &nodeSocket{} }

func (*nodeSocket) check() bool { return true }

func (*nodeSocket) send(c net.Conn, b []byte) error {
	_, err := c.Write(b)
	return err
}
