"""Step cache keys and the layer cache (key → frozen disk layer).

``key_n = sha256(key_{n-1}, canonical instruction, digest of its inputs)``: the chain starts at
the base image's layer, a COPY's inputs are the selected files (paths, modes, content hashes),
a RUN's are its command with the environment, build args, working directory, user, shell and
whether egress was on. Line numbers are not part of a key, so editing a comment or the app's
code re-runs only the steps from the first one whose inputs changed. The runtime stores the
layers; this module stores only the mapping, one small JSON file per key, written atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from embervm.fileio import atomic_write
from embervm.imagebuild.plan import CopyStep, RunStep, Step, WorkdirStep

KEY_VERSION = "embervm-build-cache-v1"


@dataclass(frozen=True)
class LayerRef:
    """An opaque reference to a frozen disk layer the runtime keeps (``size_bytes``: what the
    layer adds on top of its parent)."""

    id: str
    size_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "size_bytes": self.size_bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LayerRef:
        return cls(str(data["id"]), int(data.get("size_bytes", 0)))


def _sha(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _canon(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def base_key(base_image: str, base_layer: LayerRef) -> str:
    """The chain's start: the managed image and the exact layer it resolved to."""
    return _sha(KEY_VERSION, "base", base_image, base_layer.id)


def step_key(previous: str, instruction: str, inputs: str) -> str:
    return _sha(previous, instruction, inputs)


def describe_step(step: Step, *, egress: bool, copy_digest: str = "") -> tuple[str, str]:
    """(canonical instruction, inputs digest) of ``step``; COPY needs its selection digest."""
    state = step.state
    if isinstance(step, RunStep):
        script = hashlib.sha256(step.script.content).hexdigest() if step.script else ""
        instruction = _canon({"kind": "RUN", "argv": list(step.argv), "script": script})
        inputs = _canon(
            {
                "env": sorted(state.env),
                "args": sorted(state.build_args),
                "workdir": state.workdir,
                "user": state.user,
                "shell": list(state.shell),
                "egress": egress,
            }
        )
    elif isinstance(step, CopyStep):
        instruction = _canon(
            {
                "kind": step.kind,
                "sources": list(step.sources),
                "urls": list(step.urls),
                "dest": step.dest,
                "chown": step.chown,
                "chmod": step.chmod,
            }
        )
        inputs = _canon({"files": copy_digest, "egress": egress if step.urls else None})
    elif isinstance(step, WorkdirStep):
        instruction = _canon({"kind": "WORKDIR", "path": step.path})
        inputs = ""
    else:  # pragma: no cover - the union is closed
        raise TypeError(step)
    return instruction, hashlib.sha256(inputs.encode()).hexdigest()


class LayerCache(Protocol):
    async def get(self, key: str) -> LayerRef | None: ...

    async def put(self, key: str, layer: LayerRef) -> None: ...

    async def forget(self, key: str) -> None: ...


class LocalLayerCache:
    """``root/<key[:2]>/<key>.json``; writes are temp file + fsync + rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key[:80]!r}")
        return self.root / key[:2] / f"{key}.json"

    async def get(self, key: str) -> LayerRef | None:
        """The layer of ``key``; a hit marks the entry used now (``forget_unused_since``)."""
        path = self._path(key)
        try:
            text = await asyncio.to_thread(_read_and_touch, path)
            return LayerRef.from_json(json.loads(text))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged entry is a miss; the step runs again and rewrites it

    async def put(self, key: str, layer: LayerRef) -> None:
        await asyncio.to_thread(self._write, self._path(key), _canon(layer.to_json()))

    async def forget(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(self._path(key).unlink)

    async def forget_unused_since(self, cutoff: float) -> int:
        """Forget the entries no build used (read or wrote) since ``cutoff`` (unix time), so a
        layer collector may delete their layers. Returns how many."""
        return await asyncio.to_thread(self._forget_older, cutoff)

    def _forget_older(self, cutoff: float) -> int:
        forgotten = 0
        for path in self.root.glob("??/*.json"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    forgotten += 1
        return forgotten

    async def layers(self) -> dict[str, LayerRef]:
        """Every readable entry (key → layer): what a layer garbage collector must keep, or
        must ``forget`` before deleting a layer."""
        return await asyncio.to_thread(self._scan)

    def _scan(self) -> dict[str, LayerRef]:
        out: dict[str, LayerRef] = {}
        for path in sorted(self.root.glob("??/*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                out[path.stem] = LayerRef.from_json(json.loads(path.read_text()))
        return out

    @staticmethod
    def _write(path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, text)


def _read_and_touch(path: Path) -> str:
    text = path.read_text()
    with contextlib.suppress(OSError):
        os.utime(path)
    return text
