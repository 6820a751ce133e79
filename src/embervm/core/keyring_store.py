"""``StoreKeyRing``: the token keys of a fleet, in the store (``store.SecretStore``).

In a fleet the ``api`` processes seal endpoint and shell tokens and ``proxy`` processes on
other machines open them; PostgreSQL is the only thing they all reach, so the keys are a key
ring there (``store.TOKEN_KEYS``: rows of the ``secrets`` table). Use::

    ring = await StoreKeyRing.open(repository)      # loads; the ring's first key if it has none
    tokens = TokenAuthority(ring)
    ...
    await ring.close()                               # stops its poll task

**The proxy's path never waits on the database.** ``loaded`` (what ``TokenAuthority`` reads
on every request) is a value in memory; ``recheck`` does nothing. A task of the ring reads the
ring's version (one primary-key row) every ``KEY_FILE_RECHECK_SECONDS`` and the keys only when
the version changed, then replaces ``loaded`` in one assignment. A ``rotate`` made through
this ring is loaded at once.

**How stale a process can be.** While the store answers, a rotation or revocation committed
by another process is in ``loaded`` at most ``KEY_FILE_RECHECK_SECONDS`` (1 s) plus one poll's
two round trips later, and ``TokenAuthority`` checks against ``loaded`` on every request and
every ``current`` (open sessions ask every few seconds): so a revoked token is refused, and
its sessions end, about a second after the revocation commits. In that second an ``api``
process that has not polled yet may still seal a token with the revoked key; it is refused as
soon as its verifier has polled. While the store does not answer (each poll is bounded by the
store's timeout), the ring keeps serving with the keys it loaded last: tokens sealed before
keep working, a revocation made meanwhile is not seen until the store answers again. That is
logged once when polls start failing and once when they succeed again.

Rotation (``TokenAuthority.rotate_async``, ``keep_rotating``) holds the ring's row lock in the
store, so two ``api`` processes rotating at once keep both keys, and of several rotating on a
schedule one rotates per period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime

from joserfc.jwk import OctKey

from embervm.core.tokens import (
    KEY_FILE_RECHECK_SECONDS,
    RETIRED_KEY_SECONDS,
    KeyRing,
    KeySet,
    new_key_id,
)
from embervm.errors import EmbervmError
from embervm.store.secrets import TOKEN_KEYS, KeyRingState, SecretStore

log = logging.getLogger("embervm.tokens")

KEY_BYTES = 32
_FIRST_KEY_ONLY = datetime.min.replace(tzinfo=UTC)  # due_before: only a ring with no key


def _at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def key_set(state: KeyRingState) -> KeySet:
    """The ring's keys as ``TokenAuthority`` uses them."""
    current = state.current
    if current is None:
        raise EmbervmError("the key ring in the store has no current key")
    return KeySet(
        current=current.key_id,
        keys={k.key_id: OctKey.import_key(k.secret) for k in state.keys},
    )


class StoreKeyRing:
    """A ``KeyRing`` over a ``SecretStore`` (module doc). Make one with ``open``."""

    def __init__(
        self,
        store: SecretStore,
        state: KeyRingState,
        *,
        ring: str = TOKEN_KEYS,
        recheck_seconds: float = KEY_FILE_RECHECK_SECONDS,
    ) -> None:
        """A ring loaded from ``state`` that does not poll yet (``open`` starts it)."""
        self.ring = ring
        self.loaded = key_set(state)
        self._store = store
        self._version = state.version
        self._recheck_seconds = recheck_seconds
        self._failing = False
        self._task: asyncio.Task[None] | None = None
        self._changing = asyncio.Lock()  # a poll and a rotation here load one after the other

    @classmethod
    async def open(
        cls,
        store: SecretStore,
        *,
        ring: str = TOKEN_KEYS,
        recheck_seconds: float = KEY_FILE_RECHECK_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> StoreKeyRing:
        """Load the ring (making its first key if it has none: of processes racing to, one
        does) and start polling it. ``clock``: when that first key is made."""
        state = await store.key_ring(ring)
        if state.current is None:
            now = clock()
            made = await store.rotate_key_ring(
                ring,
                new_key_id(now),
                os.urandom(KEY_BYTES),
                now=_at(now),
                due_before=_FIRST_KEY_ONLY,
            )
            state = made if made is not None else await store.key_ring(ring)
        keyring = cls(store, state, ring=ring, recheck_seconds=recheck_seconds)
        keyring._task = asyncio.create_task(keyring._poll_forever(), name=f"key ring {ring}")
        return keyring

    async def close(self) -> None:
        """Stop polling (``loaded`` stays as it is)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- KeyRing -------------------------------------------------------------------------

    def recheck(self) -> None:
        """Nothing: the poll task keeps ``loaded`` fresh (the proxy's path reads no row)."""

    async def rotate(
        self, *, now: float, revoke: bool = False, due_before: float | None = None
    ) -> KeySet | None:
        async with self._changing:
            state = await self._store.rotate_key_ring(
                self.ring,
                new_key_id(now),
                os.urandom(KEY_BYTES),
                now=_at(now),
                revoke=revoke,
                drop_retired_before=_at(now - RETIRED_KEY_SECONDS),
                due_before=None if due_before is None else _at(due_before),
            )
            if state is None:
                return None
            self._use(state)
            return self.loaded

    # -- polling -------------------------------------------------------------------------

    async def refresh(self) -> bool:
        """One poll now: read the version, and the keys if it changed (True if it did)."""
        async with self._changing:
            version = await self._store.key_ring_version(self.ring)
            if version == self._version:
                return False
            self._use(await self._store.key_ring(self.ring))
            return True

    def _use(self, state: KeyRingState) -> None:
        self.loaded, self._version = key_set(state), state.version

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._recheck_seconds)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving with the keys loaded; say so once
                if not self._failing:
                    log.warning(
                        "cannot read the token keys from the store (%s: %s); serving with the "
                        "keys loaded last until it answers",
                        type(exc).__name__,
                        exc,
                    )
                self._failing = True
            else:
                if self._failing:
                    log.info("the token keys are read from the store again")
                self._failing = False


def _implements_the_protocol(ring: StoreKeyRing) -> KeyRing:
    """Never called: mypy checks here that ``StoreKeyRing`` is a ``KeyRing``."""
    return ring
