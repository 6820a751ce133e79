"""Embervm's own endpoints beside the model's operations, mounted together everywhere."""

from __future__ import annotations

from starlette.routing import BaseRoute

from embervm.api.logs import LogLines, log_routes
from embervm.api.uploads import UPLOAD_PATH, UploadSink, upload_routes


def extension_routes(logs: LogLines, uploads: UploadSink) -> tuple[list[BaseRoute], frozenset[str]]:
    """The log and upload endpoints, and the paths whose bodies stream (``create_api_app``'s
    ``extra_routes`` and ``streamed_paths``)."""
    return [*log_routes(logs), *upload_routes(uploads)], frozenset({UPLOAD_PATH})
