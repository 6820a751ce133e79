"""Count requests in memory: ``GET /`` → ``count: N`` (or JSON with ``Accept: application/json``).

Also answers the lifecycle hooks under ``/aws/lambda-microvms/runtime/v1/`` with 200, so the
image works with hooks enabled (``ready`` during the build, ``run``/``resume``/``suspend``/
``terminate`` at run time) as well as with hooks off (the build then waits for port 8080).
"""

from __future__ import annotations

import os
import threading

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


@app.post("/aws/lambda-microvms/runtime/v1/<hook>")
def hook(hook: str) -> tuple[str, int]:
    return ("ok\n", 200) if hook in HOOKS else ("unknown hook\n", 404)
