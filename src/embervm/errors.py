"""The one exception tree of Embervm.

    EmbervmError                      base of everything raised on purpose
    ├── ApiError                      visible through the control API; maps to exactly one
    │   │                             error shape of the botocore model (``code``, ``status``)
    │   ├── ValidationError           400 ValidationException
    │   ├── AccessDeniedError         403 AccessDeniedException
    │   ├── NotFoundError             404 ResourceNotFoundException
    │   ├── ConflictError             409 ConflictException
    │   ├── QuotaExceededError        402 ServiceQuotaExceededException
    │   ├── ThrottledError            429 ThrottlingException (carries ``retry_after``)
    │   ├── InsufficientCapacityError 500 InsufficientCapacityException
    │   └── InternalError             500 InternalServerException
    ├── ConfigError                   bad settings or host set-up (the message says the fix)
    ├── RuntimeFailure                the machinery under a VM failed
    │   ├── ArtifactError             building/finding kernel, initramfs or base image
    │   ├── VmmError                  QEMU would not start, QMP failed, the VMM died
    │   ├── SnapshotError             missing/corrupt/incompatible snapshot, or write failed
    │   ├── GuestError                the guest agent misbehaved or did not answer in time
    │   ├── NetworkSetupError         netns/tap/veth/nftables/dnsmasq failed
    │   └── JailError                 cgroup or sandbox set-up failed
    └── BuildFailure                  an image build failed; ``reason`` is shown to the user

Foreign exceptions are translated at the boundary of the module that meets them
(``raise VmmError(...) from exc``); nothing else escapes to the API or the CLI.
"""

from __future__ import annotations


class EmbervmError(Exception):
    """Base of every error Embervm raises on purpose."""


class ApiError(EmbervmError):
    """An error the control API reports with one of the model's error shapes."""

    code: str = "InternalServerException"
    status: int = 500

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class ValidationError(ApiError):
    code = "ValidationException"
    status = 400


class AccessDeniedError(ApiError):
    code = "AccessDeniedException"
    status = 403


class NotFoundError(ApiError):
    code = "ResourceNotFoundException"
    status = 404


class ConflictError(ApiError):
    code = "ConflictException"
    status = 409


class QuotaExceededError(ApiError):
    code = "ServiceQuotaExceededException"
    status = 402


class ThrottledError(ApiError):
    code = "ThrottlingException"
    status = 429

    def __init__(self, message: str, retry_after: int = 1, **fields: object) -> None:
        super().__init__(message, **fields)
        self.retry_after = retry_after


class InsufficientCapacityError(ApiError):
    code = "InsufficientCapacityException"
    status = 500


class InternalError(ApiError):
    code = "InternalServerException"
    status = 500


class ConfigError(EmbervmError):
    """Settings or host set-up are wrong; the message says how to fix it."""


class RuntimeFailure(EmbervmError):
    """The machinery under a VM failed."""


class ArtifactError(RuntimeFailure):
    """A guest artifact (kernel, initramfs, base image) could not be built or found."""


class VmmError(RuntimeFailure):
    """The VMM could not be started, driven over QMP, or died."""


class SnapshotError(RuntimeFailure):
    """A snapshot is missing, corrupt, incompatible, or could not be written."""


class GuestError(RuntimeFailure):
    """The guest agent misbehaved or did not answer in time."""


class NetworkSetupError(RuntimeFailure):
    """Network namespace, tap, veth, nftables or resolver set-up failed."""


class JailError(RuntimeFailure):
    """cgroup or sandbox set-up failed."""


class BuildFailure(EmbervmError):
    """An image build failed; ``reason`` is the one line shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
