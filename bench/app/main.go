// Command app is the benchmark's JSON-RPC service: it answers every POST
// with a fixed result under the request's id, as cheaply as Go's net/http
// allows, so that the figures measure the hops in front of it.
//
//	go run ./bench/app -address 127.0.0.1:9090
package main

import (
	"bytes"
	"flag"
	"io"
	"log"
	"net/http"
	"strconv"
	"sync"
)

func main() {
	addr := flag.String("address", "127.0.0.1:9090", "Address to listen on, host:port (loopback only in benchmarks).")
	flag.Parse()
	bufs := sync.Pool{New: func() any { return new(bytes.Buffer) }}
	h := func(w http.ResponseWriter, r *http.Request) {
		b := bufs.Get().(*bytes.Buffer)
		defer bufs.Put(b)
		b.Reset()
		io.Copy(b, io.LimitReader(r.Body, 1<<20))
		id := idOf(b.Bytes())
		out := append(b.AvailableBuffer()[:0], `{"jsonrpc":"2.0","id":`...)
		out = append(out, id...)
		out = append(out, `,"result":{"msg":"bench-1: Hello John"}}`...)
		w.Header()["Content-Type"] = []string{"application/json"}
		w.Header()["Content-Length"] = []string{strconv.Itoa(len(out))}
		w.Write(out)
	}
	log.Fatal(http.ListenAndServe(*addr, http.HandlerFunc(h)))
}

// idOf finds the numeric id of a JSON-RPC request without decoding it all;
// 1 when there is none.
func idOf(body []byte) []byte {
	i := bytes.Index(body, []byte(`"id":`))
	if i < 0 {
		return []byte("1")
	}
	j := i + 5
	for j < len(body) && body[j] == ' ' {
		j++
	}
	k := j
	for k < len(body) && body[k] >= '0' && body[k] <= '9' {
		k++
	}
	if k == j {
		return []byte("1")
	}
	return body[j:k]
}
