"""Loading the botocore ``lambda-microvms`` service model, once per process.

The model file shipped with botocore is the contract (docs/API.md): nothing here restates it.
The API version is pinned so that a botocore upgrade which adds a new version cannot silently
change what the server speaks; ``scripts/gen_model.py --check`` notices a changed model.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from botocore.loaders import Loader
from botocore.model import OperationModel, ServiceModel, Shape

SERVICE_NAME = "lambda-microvms"
API_VERSION = "2025-09-09"
SIGNING_NAME = "lambda"


@functools.cache
def _raw_model() -> dict[str, Any]:
    loader = Loader()
    data: dict[str, Any] = loader.load_service_model(SERVICE_NAME, "service-2", API_VERSION)
    return data


@functools.cache
def service_model() -> ServiceModel:
    """The botocore ``ServiceModel`` of ``lambda-microvms`` ``2025-09-09``."""
    return ServiceModel(_raw_model(), service_name=SERVICE_NAME)


def operation_model(name: str) -> OperationModel:
    """The ``OperationModel`` named ``name`` (e.g. ``"RunMicrovm"``); KeyError-free lookups
    go through :func:`operation_names` first."""
    return service_model().operation_model(name)


@functools.cache
def operation_names() -> tuple[str, ...]:
    """Every operation of the model, sorted by name."""
    return tuple(sorted(service_model().operation_names))


def shape(name: str) -> Shape:
    """A named shape of the model (e.g. ``"MicrovmState"``)."""
    return service_model().shape_for(name)


@functools.cache
def error_shape_names() -> frozenset[str]:
    """Names of every error (exception) shape in the model."""
    return frozenset(
        name for name, body in _raw_model()["shapes"].items() if body.get("exception") is True
    )


def model_file() -> Path:
    """Where botocore keeps the model file (gzipped JSON)."""
    loader = Loader()
    for base in loader.search_paths:
        candidate = Path(base) / SERVICE_NAME / API_VERSION / "service-2.json.gz"
        if candidate.exists():
            return candidate
        plain = candidate.with_suffix("")
        if plain.exists():
            return plain
    raise FileNotFoundError(f"botocore has no {SERVICE_NAME} {API_VERSION} model")


def model_sha256() -> str:
    """sha256 of the model's canonical JSON (independent of gzip and key order)."""
    path = model_file()
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
