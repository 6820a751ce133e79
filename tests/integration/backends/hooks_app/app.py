"""Records every runtime hook call (``GET /calls``) and prints it; ``GET /`` counts in memory.

``/run`` with the payload ``slow`` answers after 6 s (past the test's 3 s timeout).
``/suspend`` answers 503 the first time (the host must retry it), unless ``GET /slow-suspend``
was called first: then it answers only after 30 s (the test cancels the suspend meanwhile).
``/resume`` answers 500 after ``GET /fail-resume``.
"""

import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CALLS = []
STATE = {"count": 0, "slow_suspend": False, "fail_resume": False}
PREFIX = "/aws/lambda-microvms/runtime/v1/"


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body=b""):
        self.send_response(status)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/calls":
            self.reply(200, json.dumps(CALLS).encode())
        elif self.path in ("/slow-suspend", "/fail-resume"):
            STATE[self.path[1:].replace("-", "_")] = True
            self.reply(200)
        else:
            STATE["count"] += 1
            self.reply(200, f"count {STATE['count']}".encode())

    def do_POST(self):
        length = int(self.headers.get("content-length") or 0)
        payload = self.rfile.read(length).decode()
        hook = self.path[len(PREFIX) :] if self.path.startswith(PREFIX) else "?"
        status = 200
        if hook == "suspend" and STATE["slow_suspend"]:
            status = "slow"
        elif hook == "suspend" and not any(c["hook"] == "suspend" for c in CALLS):
            status = 503
        elif hook == "resume" and STATE["fail_resume"]:
            status = 500
        CALLS.append({"hook": hook, "payload": payload, "status": status})
        print(f"hook {hook} payload={payload!r} status={status}", flush=True)
        if hook == "run" and payload == "slow":
            time.sleep(6)
        if status == "slow":
            time.sleep(30)
            status = 200
        self.reply(status)

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
