"""Identifiers, ARNs and network connectors: formats the model's patterns accept (docs/API.md).

- MicroVM ids: ``mvm-`` + 20 lowercase hex digits — a valid DNS label, so the endpoint host
  ``<id>.<domain>`` works as is.
- Image ARN: ``arn:aws:lambda:<region>:<account>:microvm-image:<name>``; managed base images
  live under the account ``aws``.
- Image versions are decimal numbers ("1", "2", ...) in creation order.
- Connectors: ``arn:aws:lambda:<region>:aws:network-connector:aws-network-connector:<NAME>``
  (docs/API.md); the bare ``<NAME>`` is accepted too and stored as the full ARN.
- ``state_reason``: the model's microVM ``stateReason`` is a NonBlankString (``[^\\s]+``), so a
  reason is a code, optionally with a detail whose whitespace became underscores.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass

from embervm.errors import ValidationError

MANAGED_ACCOUNT = "aws"
IMAGE_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:lambda:(?P<region>[a-z0-9-]*):(?P<account>[a-z0-9]*):"
    r"microvm-image:(?P<name>[a-zA-Z0-9_-]{1,64})$"
)
IMAGE_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
CONNECTOR_ARN_RE = re.compile(
    r"^arn:aws[a-z-]*:lambda:(?P<region>[a-z0-9-]*):aws:network-connector:"
    r"aws-network-connector:(?P<name>[A-Z_]+)$"
)
INGRESS_CONNECTORS = ("ALL_INGRESS", "HTTP_INGRESS", "SHELL_INGRESS", "NO_INGRESS")
EGRESS_CONNECTORS = ("INTERNET_EGRESS",)


def new_microvm_id() -> str:
    return "mvm-" + secrets.token_hex(10)


def new_build_id() -> str:
    return str(uuid.uuid4())


def image_arn(region: str, account_id: str, name: str) -> str:
    return f"arn:aws:lambda:{region}:{account_id}:microvm-image:{name}"


def connector_arn(region: str, name: str) -> str:
    return f"arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:{name}"


def connector_name(arn: str) -> str:
    return arn.rsplit(":", 1)[-1]


@dataclass(frozen=True)
class ImageRef:
    """An image named by a request: its account (``aws`` for managed images) and name."""

    account_id: str
    name: str

    @property
    def managed(self) -> bool:
        return self.account_id == MANAGED_ACCOUNT


def parse_image_identifier(identifier: str, account_id: str) -> ImageRef:
    """A name or an image ARN. ARNs of other accounts name nothing we hold (NotFound later)."""
    match = IMAGE_ARN_RE.match(identifier)
    if match:
        return ImageRef(match["account"], match["name"])
    if IMAGE_NAME_RE.match(identifier):
        return ImageRef(account_id, identifier)
    raise ValidationError(f"'{identifier}' is neither a MicroVM image name nor an image ARN")


def parse_version(version: str) -> int:
    """Versions are positive decimal numbers; anything else names no version."""
    if not version.isdigit() or len(version) > 9 or int(version) < 1:
        raise ValidationError(f"'{version}' is not a MicroVM image version (1, 2, ...)")
    return int(version)


def normalize_connectors(
    values: list[str] | None, *, region: str, allowed: tuple[str, ...], field: str
) -> list[str]:
    """Full connector ARNs for ``values``; unknown names and foreign ARN forms are refused."""
    out: list[str] = []
    for value in values or []:
        match = CONNECTOR_ARN_RE.match(value)
        name = match["name"] if match else value
        if name not in allowed:
            raise ValidationError(
                f"{field}: '{value}' is not a supported network connector "
                f"(use one of {', '.join(allowed)} or its ARN "
                f"{connector_arn(region, allowed[0])})"
            )
        arn = value if match else connector_arn(region, name)
        if arn not in out:
            out.append(arn)
    return out


def state_reason(code: str, detail: str | None = None) -> str:
    """A microVM ``stateReason`` the model accepts (no whitespace): ``Code`` or ``Code:detail``."""
    if not detail:
        return code
    return f"{code}:{'_'.join(detail.split())}"[:2048]
