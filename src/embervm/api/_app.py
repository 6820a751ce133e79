"""The control API: a Starlette app that turns signed rest-json requests into
``operations.invoke(name, params, caller)`` calls and their results into responses.

Per request: SigV4's head checks (key id, scope, date: no body is read for a client without
credentials) → bounded body read, hashed as it arrives → SigV4's signature check (this
module's ``_SigV4Middleware``) → the extra routes, or ``_dispatch.ModelDispatch`` for the
model's operations (route, parse, shape rules, one call into core, serialize). Bad input is
always a 4xx: nothing reaches core before it passed the model's rules.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embervm.config import Settings
from embervm.errors import (
    AccessDeniedError,
    ValidationError,
)

from ._dispatch import (
    BODY_SCOPE_KEY,
    CALLER_SCOPE_KEY,
    ModelDispatch,
    OperationInvoker,
    is_public_path,
    raw_path_of,
    send_serialized,
)
from ._errors import serialize_error
from .sigv4 import Admitted, SecretLookup, SigV4Verifier, VerifiedIdentity

if TYPE_CHECKING:
    from embervm.core.caller import Caller

log = logging.getLogger("embervm.api")

MAX_BODY_BYTES = 6 * 1024 * 1024
BODY_READ_TIMEOUT = 30.0
INVOKE_TIMEOUT = 120.0


class _BodyTooLarge(Exception):
    pass


def create_api_app(
    operations: OperationInvoker,
    credentials: SecretLookup,
    *,
    settings: Settings,
    clock: Callable[[], float] = time.time,
    extra_routes: Sequence[BaseRoute] = (),
    streamed_paths: frozenset[str] = frozenset(),
    max_body_bytes: int = MAX_BODY_BYTES,
    invoke_timeout: float = INVOKE_TIMEOUT,
    check_outputs: bool = False,
) -> Starlette:
    """The control API app.

    ``credentials`` is usually a ``CredentialStore``; ``clock`` (epoch seconds) is what SigV4's
    ±15 min skew is measured against. ``extra_routes`` (e.g. the log-streaming endpoints) are
    matched before the model's routes and are SigV4-protected the same way: their handlers find
    the ``Caller`` with :func:`caller_of`; a ``PUT`` to one of ``streamed_paths`` reaches its
    handler with the body unread (signed by its declared ``x-amz-content-sha256``, which the
    handler must check). ``check_outputs`` holds every result of core against
    its output shape (a 500 if it does not fit) — meant for tests.
    """
    verifier = SigV4Verifier(credentials, service="lambda", clock=clock)
    dispatch = ModelDispatch(operations, invoke_timeout=invoke_timeout, check_outputs=check_outputs)

    app = Starlette(routes=list(extra_routes))
    # Not a catch-all route: Starlette's path patterns stop at a decoded newline, the model's
    # routes must see every path (unmatched ones get a model 404, not a plain-text one).
    app.router.default = dispatch
    # Imported here, not at module level: the credentials file (and so the CLI) must not need
    # core to be importable.
    from embervm.core.caller import Caller

    app.add_middleware(
        _SigV4Middleware,
        caller_type=Caller,
        verifier=verifier,
        settings=settings,
        max_body_bytes=max_body_bytes,
        streamed_paths=streamed_paths,
    )
    return app


class _SigV4Middleware:
    """Checks what the head of a request proves (SigV4's key id, scope and date), then reads
    the body (bounded, with a timeout, hashed as it arrives), checks the signature and puts the
    ``Caller`` into the scope; everything but ``PUBLIC_PATHS`` needs a valid signature."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        verifier: SigV4Verifier,
        settings: Settings,
        max_body_bytes: int,
        caller_type: type[Caller],
        streamed_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.streamed_paths = streamed_paths
        self.caller_type = caller_type
        self.verifier = verifier
        self.settings = settings
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http" or is_public_path(scope):
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["method"] == "PUT" and scope["path"] in self.streamed_paths:
            await self._streamed(scope, receive, send, request_id)
            return
        try:
            admitted = self.verifier.admit(_headers(scope))
        except AccessDeniedError as err:
            log.info("%s denied: %s", request_id, err.message)
            await send_serialized(send, serialize_error(None, err), request_id)
            return
        try:
            body, digest = await self._read_body(scope, receive)
        except _BodyTooLarge:
            error = ValidationError(
                f"Request body is larger than the limit of {self.max_body_bytes} bytes"
            )
            result = serialize_error(None, error)
            result.status = 413
            await send_serialized(send, result, request_id)
            return
        except TimeoutError:
            result = serialize_error(None, ValidationError("Request body was not received in time"))
            await send_serialized(send, result, request_id)
            return
        try:
            identity = self._finish(scope, admitted, scope["method"], digest)
        except AccessDeniedError as err:
            log.info("%s denied: %s", request_id, err.message)
            await send_serialized(send, serialize_error(None, err), request_id)
            return
        scope[CALLER_SCOPE_KEY] = self._caller(identity)
        scope[BODY_SCOPE_KEY] = body
        await self.app(scope, _replay(body, receive), send)

    async def _streamed(self, scope: Scope, receive: Receive, send: Send, request_id: str) -> None:
        """An upload: the signature covers the declared body hash; the handler checks it."""
        try:
            identity = self._verify(scope, "PUT", None)
        except AccessDeniedError as err:
            log.info("%s denied: %s", request_id, err.message)
            await send_serialized(send, serialize_error(None, err), request_id)
            return
        scope[CALLER_SCOPE_KEY] = self._caller(identity)
        await self.app(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """WebSocket handshakes (extra routes) are signed GETs without a body."""
        try:
            identity = self._verify(scope, "GET", b"")
        except AccessDeniedError as err:
            log.info("websocket denied: %s", err.message)
            await send({"type": "websocket.close", "code": 1008})
            return
        scope[CALLER_SCOPE_KEY] = self._caller(identity)
        await self.app(scope, receive, send)

    def _verify(self, scope: Scope, method: str, body: bytes | None) -> VerifiedIdentity:
        digest = None if body is None else hashlib.sha256(body).hexdigest()
        return self._finish(scope, self.verifier.admit(_headers(scope)), method, digest)

    def _finish(
        self, scope: Scope, admitted: Admitted, method: str, body_sha256: str | None
    ) -> VerifiedIdentity:
        return self.verifier.finish(
            admitted,
            method=method,
            raw_path=raw_path_of(scope),
            raw_query=bytes(scope.get("query_string", b"")).decode("latin-1"),
            body_sha256=body_sha256,
        )

    def _caller(self, identity: VerifiedIdentity) -> Caller:
        return self.caller_type(
            access_key_id=identity.access_key_id,
            account_id=self.settings.account_id,
            region=identity.region,
        )

    async def _read_body(self, scope: Scope, receive: Receive) -> tuple[bytes, str]:
        """The body and its hex SHA-256 (hashed piece by piece as it arrives)."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise _BodyTooLarge
        chunks: list[bytes] = []
        digest = hashlib.sha256()
        size = 0
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(chunk)
                digest.update(chunk)
                if not message.get("more_body", False):
                    break
        return b"".join(chunks), digest.hexdigest()


def _headers(scope: Scope) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, then whatever the server sends next (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
