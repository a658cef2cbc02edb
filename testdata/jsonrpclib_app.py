"""A JSON-RPC app built on jsonrpclib-pelix (Debian: python3-jsonrpclib-pelix),
for the end-to-end tests: a server nobody here wrote.

    /usr/bin/python3 jsonrpclib_app.py NODE_NAME
"""
import sys

from jsonrpclib.SimpleJSONRPCServer import SimpleJSONRPCServer

name = sys.argv[1]
server = SimpleJSONRPCServer(("127.0.0.1", 0), logRequests=False)
server.register_function(lambda request: {"msg": name + ": Hello " + request["name"]}, "Example.Call")
print("listening on %s:%d" % server.server_address[:2], flush=True)
server.serve_forever()
