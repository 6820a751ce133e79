"""Blob storage (local folder or S3) and fetching of build code artifacts.

``BlobStore`` is the seam core uses for artifacts and snapshots shared between roles;
``fetch_code_artifact`` turns a ``codeArtifact.uri`` into a local zip or a ``BuildFailure``.
"""

from embervm.blobs._fetch import DEFAULT_MAX_BYTES, SYSTEM_DENIED, FilePolicy, fetch_code_artifact
from embervm.blobs._keys import check_key
from embervm.blobs._s3 import S3BlobStore, S3Config, S3Credentials
from embervm.blobs._store import BlobStore, LocalBlobStore, stream_to_file

__all__ = [
    "DEFAULT_MAX_BYTES",
    "SYSTEM_DENIED",
    "BlobStore",
    "FilePolicy",
    "LocalBlobStore",
    "S3BlobStore",
    "S3Config",
    "S3Credentials",
    "check_key",
    "fetch_code_artifact",
    "stream_to_file",
]
