// Command hello is the baseline for the sidecar's benchmarks: the smallest
// net/http server answering a fixed JSON body, the best any Go HTTP endpoint
// on this machine can do.
package main

import (
	"flag"
	"log"
	"net/http"
)

func main() {
	addr := flag.String("address", "127.0.0.1:0", "address to listen on")
	flag.Parse()
	body := []byte(`{"name":"foo","version":"","metadata":{},"nodes":[{"id":"foo-1","address":"127.0.0.1","port":9090,"metadata":{}}]}` + "\n")
	http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(body)
	})
	log.Fatal(http.ListenAndServe(*addr, nil))
}
