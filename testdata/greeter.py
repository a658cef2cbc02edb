#!/usr/bin/env python3
"""A service the micro sidecar can call, in Python's standard library alone.

The sidecar POSTs a JSON-RPC 2.0 request to / with the method in "method"
and the caller's request as the only element of "params"; the reply's
"result" goes back to the caller as it is.

    python3 greeter.py 127.0.0.1 9090 greeter-1
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NODE_ID = sys.argv[3] if len(sys.argv) > 3 else "greeter"


def call(request):
    return {"msg": NODE_ID + ": Hello " + str(request.get("name", "stranger"))}


METHODS = {"Example.Call": call}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep connections alive
    disable_nagle_algorithm = True  # headers and body are two writes: send each at once

    def do_GET(self):  # the health check: --healthcheck_url=http://127.0.0.1:9090/_status/health
        self.send_response(200 if self.path == "/_status/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        req = {}
        try:
            req = json.loads(body)
            method = METHODS.get(req["method"])
            if method is None:
                reply = {"error": {"code": -32601, "message": "unknown method " + req["method"]}}
            else:
                reply = {"result": method(*req.get("params", []))}
        except Exception as e:  # a bad request or a failing method
            req = req if isinstance(req, dict) else {}
            reply = {"error": {"code": -32000, "message": str(e)}}
        reply.update(jsonrpc="2.0", id=req.get("id"))
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # the listen backlog: Python's 5 drops SYNs of a burst of calls


if __name__ == "__main__":
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 9090
    server = Server((host, port), Handler)
    print("listening on %s:%d" % server.server_address[:2], flush=True)
    server.serve_forever()
