"""Count requests in memory: ``GET /`` → ``count: N`` (or JSON with ``Accept: application/json``).

``GET /headers`` shows the request headers the app received (the endpoint proxy strips its
own ``x-aws-proxy-*`` headers); ``GET /events?n=3`` streams server-sent events, one per 0.2 s.

Also answers the lifecycle hooks under ``/aws/lambda-microvms/runtime/v1/`` with 200, so the
image works with hooks enabled (``ready`` during the build, ``run``/``resume``/``suspend``/
``terminate`` at run time) as well as with hooks off (the build then waits for port 8080).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request

app = Flask(__name__)
_lock = threading.Lock()
_count = 0
HOOKS = {"ready", "validate", "run", "resume", "suspend", "terminate"}


@app.get("/")
def count() -> Response | str:
    global _count
    with _lock:
        _count += 1
        value = _count
    if request.accept_mimetypes.best == "application/json":
        return jsonify(count=value, pid=os.getpid())
    return f"count: {value}\n"


@app.get("/headers")
def headers() -> Response:
    return jsonify({key.lower(): value for key, value in request.headers.items()})


@app.get("/events")
def events() -> Response:
    n = min(int(request.args.get("n", "3")), 100)

    def stream() -> Iterator[str]:
        for i in range(1, n + 1):
            yield f"data: {json.dumps({'event': i, 'at': time.time()})}\n\n"
            time.sleep(0.2)

    return Response(stream(), mimetype="text/event-stream", headers={"cache-control": "no-cache"})


@app.post("/aws/lambda-microvms/runtime/v1/<hook>")
def hook(hook: str) -> tuple[str, int]:
    return ("ok\n", 200) if hook in HOOKS else ("unknown hook\n", 404)


@app.get("/healthz")
def healthz() -> str:
    return "ok\n"


# Warm the request path once at start-up (imports, URL map, response code), before the build
# takes the snapshot: every MicroVM restored from it then answers its first request at once
# instead of paying that first-request cost (about a second under TCG). It does not count.
with app.test_client() as _client:
    _client.get("/healthz")
