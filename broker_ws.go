package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"strconv"
	"unicode/utf8"

	"golang.org/x/net/websocket"
)

// The broker reads what its WebSocket clients send with its own frame
// reader (RFC 6455 section 5). x/net/websocket, which does the handshake,
// hands over each fragment of a message as a message of its own (a
// gorilla/websocket client fragments anything over its 4 KiB write buffer)
// and accepts frames the RFC says must fail the connection.

// wsFailure is why a connection must be failed, with the close code to say
// it with (RFC 6455 section 7.4.1).
type wsFailure struct {
	code   int
	reason string
}

func (f *wsFailure) Error() string { return strconv.Itoa(f.code) + " " + f.reason }

// payloadStep is how much of a frame's payload is read, and allocated, at
// a time.
const payloadStep = 64 << 10

// errPeerClosed is a close frame from the peer: the end of its messages.
var errPeerClosed = errors.New("websocket: the peer closed")

// wsMessage is one whole data message.
type wsMessage struct {
	data   []byte
	binary bool
}

// wsReader reads a client's frames and joins them into messages.
type wsReader struct {
	br        *bufio.Reader
	max       int                // largest message, in bytes
	limit     string             // what sets max, for the close reason
	onPing    func([]byte) error // answers a ping with its payload
	closeCode int                // the status code of the peer's close frame, once next returned errPeerClosed; 0 for none
}

// answerCode is the code to answer the peer's close with: its own, as
// RFC 6455 section 5.5.1 has it typically done (a browser reports the
// code it receives), or 1000 for a close that gave none.
func (r *wsReader) answerCode() int {
	if r.closeCode == 0 {
		return closeNormal
	}
	return r.closeCode
}

// frameHead is the fixed part of a frame, as read.
type frameHead struct {
	fin    bool
	opcode byte
	length uint64
	mask   [4]byte
}

// next returns the next data message. Pings are answered on the way and
// pongs skipped; a close frame ends with errPeerClosed; a frame the RFC
// forbids, or a message over max, with a *wsFailure.
func (r *wsReader) next() (wsMessage, error) {
	var msg wsMessage
	started := false
	for {
		h, err := r.readHead()
		if err != nil {
			return wsMessage{}, err
		}
		if h.opcode >= websocket.CloseFrame { // control frames may come between fragments
			payload, err := r.readPayload(h, nil)
			if err != nil {
				return wsMessage{}, err
			}
			switch h.opcode {
			case websocket.CloseFrame:
				code, err := checkClose(payload)
				if err != nil {
					return wsMessage{}, err
				}
				r.closeCode = code
				return wsMessage{}, errPeerClosed
			case websocket.PingFrame:
				if err := r.onPing(payload); err != nil {
					return wsMessage{}, err
				}
			}
			continue
		}
		switch {
		case h.opcode == websocket.ContinuationFrame && !started:
			return wsMessage{}, &wsFailure{closeProtocolError, "continuation frame with no message to continue"}
		case h.opcode != websocket.ContinuationFrame && started:
			return wsMessage{}, &wsFailure{closeProtocolError, "new message before the last one ended"}
		case h.opcode == websocket.TextFrame, h.opcode == websocket.BinaryFrame:
			started, msg.binary = true, h.opcode == websocket.BinaryFrame
		}
		if h.length > uint64(r.max) || uint64(len(msg.data))+h.length > uint64(r.max) { // the first test keeps the sum from wrapping
			return wsMessage{}, &wsFailure{closeTooBig, "message larger than " + strconv.Itoa(r.max) + " bytes (" + r.limit + ")"}
		}
		if msg.data, err = r.readPayload(h, msg.data); err != nil {
			return wsMessage{}, err
		}
		if h.fin {
			if msg.data == nil {
				msg.data = []byte{}
			}
			if !msg.binary && !utf8.Valid(msg.data) {
				return wsMessage{}, &wsFailure{closeInvalidPayload, "a text message must be UTF-8 (RFC 6455 section 8.1); send other bytes in a binary frame"}
			}
			return msg, nil
		}
	}
}

// checkClose reads a close frame's payload: none, or a status code a peer
// may send and a UTF-8 reason (RFC 6455 sections 5.5.1 and 7.4). It returns
// the code, 0 for none.
func checkClose(payload []byte) (int, error) {
	switch {
	case len(payload) == 0:
		return 0, nil
	case len(payload) == 1:
		return 0, &wsFailure{closeProtocolError, "a close frame's payload starts with a 2-byte status code"}
	}
	code := int(binary.BigEndian.Uint16(payload))
	if !sendableCloseCode(code) {
		return 0, &wsFailure{closeProtocolError, "close code " + strconv.Itoa(code) + " may not be sent (RFC 6455 section 7.4)"}
	}
	if !utf8.Valid(payload[2:]) {
		return 0, &wsFailure{closeInvalidPayload, "a close reason must be UTF-8"}
	}
	return code, nil
}

// sendableCloseCode reports whether a peer may send code: the defined ones
// but 1004-1006 and 1015 (reserved, or for reporting only), those IANA
// registered since (1012-1014), and the ones for libraries and
// applications (3000-4999).
func sendableCloseCode(code int) bool {
	return code >= 1000 && code <= 1003 || code >= 1007 && code <= 1014 || code >= 3000 && code <= 4999
}

// readHead reads a frame's head and checks what the RFC requires of a
// client's frame: masked, no reserved bits or opcodes, control frames whole
// and at most 125 bytes.
func (r *wsReader) readHead() (frameHead, error) {
	var b [2]byte
	if _, err := io.ReadFull(r.br, b[:]); err != nil {
		return frameHead{}, err
	}
	h := frameHead{fin: b[0]&0x80 != 0, opcode: b[0] & 0x0f, length: uint64(b[1] & 0x7f)}
	switch {
	case b[0]&0x70 != 0:
		return frameHead{}, &wsFailure{closeProtocolError, "reserved bits set; no extension was agreed"}
	case h.opcode > websocket.BinaryFrame && h.opcode < websocket.CloseFrame, h.opcode > websocket.PongFrame:
		return frameHead{}, &wsFailure{closeProtocolError, "reserved opcode " + strconv.Itoa(int(h.opcode))}
	case b[1]&0x80 == 0:
		return frameHead{}, &wsFailure{closeProtocolError, "a client's frames must be masked"}
	case h.opcode >= websocket.CloseFrame && (!h.fin || h.length > 125):
		return frameHead{}, &wsFailure{closeProtocolError, "control frames must be whole and at most 125 bytes"}
	}
	switch h.length {
	case 126:
		var l [2]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return frameHead{}, err
		}
		h.length = uint64(binary.BigEndian.Uint16(l[:]))
	case 127:
		var l [8]byte
		if _, err := io.ReadFull(r.br, l[:]); err != nil {
			return frameHead{}, err
		}
		h.length = binary.BigEndian.Uint64(l[:])
		if h.length>>63 != 0 {
			return frameHead{}, &wsFailure{closeProtocolError, "the most significant bit of a 64-bit length must be 0"}
		}
	}
	if _, err := io.ReadFull(r.br, h.mask[:]); err != nil {
		return frameHead{}, err
	}
	return h, nil
}

// readPayload appends h's unmasked payload to dst. The caller has checked
// the length against its limit. The buffer grows as the bytes come, so
// that a frame that only claims a large length holds no more memory than
// it sent.
func (r *wsReader) readPayload(h frameHead, dst []byte) ([]byte, error) {
	start := len(dst)
	for left := h.length; left > 0; {
		n := min(left, payloadStep)
		at := len(dst)
		dst = append(dst, make([]byte, n)...)
		if _, err := io.ReadFull(r.br, dst[at:]); err != nil {
			return nil, err
		}
		left -= n
	}
	for i := range dst[start:] {
		dst[start+i] ^= h.mask[i&3]
	}
	return dst, nil
}
