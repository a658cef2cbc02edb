package main

import "net"

// sendProgress tells a client working through what was written to it from
// a silent one. What a writer handed to the socket waits in its buffers,
// and the pings behind it: a client reading through a backlog sends no
// pong for a while, and is alive.
type sendProgress struct{ unsent int }

// took reports whether the client took some of what was written to c
// since the last call (always false where the send queue cannot be read).
func (p *sendProgress) took(c net.Conn) bool {
	n := unsentBytes(c)
	took := n >= 0 && n < p.unsent
	p.unsent = n
	return took
}
