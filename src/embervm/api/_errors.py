"""``ApiError`` → the model's error shape, so botocore raises the right exception class.

botocore's rest-json parser takes the error code from ``x-amzn-ErrorType`` and the message from
the body's ``message``; the modeled members of the shape travel in the body (or, like
``retryAfterSeconds``, in their header). When an operation does not declare the error's own
shape, the one it declares for the same meaning is used (the tag operations speak Lambda's older
dialect: ``TooManyRequestsException``, ``ResourceConflictException``,
``InvalidParameterValueException``, ``ServiceException``).
"""

from __future__ import annotations

import json

from botocore.model import NoShapeFoundError, OperationModel, StructureShape

from embervm.errors import ApiError, ThrottledError
from embervm.model import service_model

from ._serialize import Serialized, serialize_structure

# Same meaning, other name: tried in order when an operation does not declare the error's code.
_EQUIVALENTS: dict[str, tuple[str, ...]] = {
    "ThrottlingException": ("TooManyRequestsException",),
    "ConflictException": ("ResourceConflictException",),
    "ValidationException": ("InvalidParameterValueException",),
    "InternalServerException": ("ServiceException",),
}


def error_shape_for(operation: OperationModel | None, code: str) -> StructureShape | None:
    """The error shape to answer ``code`` with: the operation's own if it declares it."""
    if operation is not None:
        declared = {shape.name: shape for shape in operation.error_shapes}
        if code in declared:
            return declared[code]
        for other in _EQUIVALENTS.get(code, ()):
            if other in declared:
                return declared[other]
    try:
        found = service_model().shape_for(code)
    except NoShapeFoundError:
        return None
    return found if isinstance(found, StructureShape) else None


def serialize_error(operation: OperationModel | None, error: ApiError) -> Serialized:
    """Status, headers and body for ``error`` answered on behalf of ``operation``."""
    shape = error_shape_for(operation, error.code)
    code = shape.name if shape is not None else error.code
    status = int(shape.metadata["error"]["httpStatusCode"]) if shape is not None else error.status
    values: dict[str, object] = {"message": error.message, **error.fields}
    retry_after: int | None = None
    if isinstance(error, ThrottledError):
        retry_after = max(0, int(error.retry_after))
        values["retryAfterSeconds"] = retry_after
    if shape is not None:
        result = serialize_structure(shape, values, status)
    else:
        result = Serialized(status)
        result.body = b'{"message":' + _json_string(error.message) + b"}"
        result.headers["content-type"] = "application/json"
    if retry_after is not None:
        result.headers["retry-after"] = str(retry_after)
    result.headers["x-amzn-errortype"] = code
    return result


def _json_string(text: str) -> bytes:
    return json.dumps(text, ensure_ascii=False).encode()
