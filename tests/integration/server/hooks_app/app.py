"""Records every lifecycle hook call (``GET /calls``); prints each one to stdout too.

``/run`` with the payload ``slow`` answers after 5 s (past a 2 s timeout); ``/ready`` answers
503 twice before 200 (the build must retry it).
"""

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CALLS = []
READY_ATTEMPTS = [0]
PREFIX = "/aws/lambda-microvms/runtime/v1/"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(CALLS).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        payload = self.rfile.read(length).decode()
        hook = self.path[len(PREFIX) :] if self.path.startswith(PREFIX) else "?"
        status = 200
        if hook == "ready":
            READY_ATTEMPTS[0] += 1
            status = 503 if READY_ATTEMPTS[0] <= 2 else 200
        if hook == "run" and payload == "slow":
            time.sleep(5)
        CALLS.append({"hook": hook, "payload": payload, "status": status})
        print(f"hook {hook} payload={payload!r} status={status}", flush=True)
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
