"""The control API: rest-json per the botocore ``lambda-microvms`` model, signed with SigV4.

- ``create_api_app(operations, credentials, *, settings, clock)``: the Starlette app and its
  SigV4 middleware (``_app``); ``_dispatch.ModelDispatch`` calls
  ``operations.invoke(name, params, caller)`` (an ``OperationInvoker``: core's ``Operations``).
- ``sigv4``: verification by botocore's own signer (``SigV4Verifier``).
- ``credentials``: the ``DATA_DIR/credentials`` file (``CredentialStore``).
- ``_routing``/``_parse``/``_serialize``/``_errors``: the model-driven request and response
  mapping; shape rules live in ``embervm.model``.
"""

from embervm.api._app import MAX_BODY_BYTES, create_api_app
from embervm.api._dispatch import CALLER_SCOPE_KEY, OperationInvoker, caller_of
from embervm.api.credentials import Credential, CredentialStore
from embervm.api.sigv4 import SecretLookup, SigV4Verifier, VerifiedIdentity

__all__ = [
    "CALLER_SCOPE_KEY",
    "MAX_BODY_BYTES",
    "Credential",
    "CredentialStore",
    "OperationInvoker",
    "SecretLookup",
    "SigV4Verifier",
    "VerifiedIdentity",
    "caller_of",
    "create_api_app",
]
