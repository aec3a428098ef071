"""The one error hierarchy of mqserve, named after TorchServe's Java exceptions.

Every error a client can see is a :class:`ModelServerError`. Its ``type`` is the
simple class name TorchServe puts in the ``type`` field of the error body, and its
``code`` is the HTTP status TorchServe maps that exception to
(``docs/torchserve-compat.md#errors``). Rendering to ``{"code", "type", "message"}`` happens in
one place, :func:`control.http.common.render_error`.

    ModelServerError
    ├── ResourceNotFoundException          404 (fixed message)
    ├── ModelNotFoundException             404
    ├── ModelVersionNotFoundException      404
    ├── WorkflowNotFoundException          404
    ├── JobNotFoundException               404 (mqserve's batch jobs)
    ├── BadRequestException                400
    ├── InvalidModelException              400
    ├── InvalidKeyException                400 (token failures)
    ├── DownloadArchiveException           400
    ├── ModelException                     400
    ├── ConflictStatusException            409
    ├── RequestTimeoutException            408
    ├── MethodNotAllowedException          405 (fixed message)
    ├── RequestTooLargeException           413
    ├── ServiceUnavailableException        503
    ├── InvalidModelVersionException       403
    └── InternalServerException            500 (code may be overridden, e.g. 507)

Messages never carry filesystem paths outside the model store, tokens or stack traces.
"""

from __future__ import annotations

from typing import ClassVar


class ModelServerError(Exception):
    """Root of every error mqserve reports to a client."""

    code: ClassVar[int] = 500

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = code if code is not None else self.code

    @property
    def type(self) -> str:
        """The TorchServe exception name written in the ``type`` field."""
        return type(self).__name__


class ResourceNotFoundException(ModelServerError):
    code = 404

    def __init__(self) -> None:
        super().__init__("Requested resource is not found, please refer to API document.")


class ModelNotFoundException(ModelServerError):
    code = 404


class ModelVersionNotFoundException(ModelServerError):
    code = 404


class WorkflowNotFoundException(ModelServerError):
    code = 404


class JobNotFoundException(ModelServerError):
    """A batch job id that is unknown or has expired (beyond TorchServe)."""

    code = 404


class BadRequestException(ModelServerError):
    code = 400


class InvalidModelException(ModelServerError):
    code = 400


class InvalidKeyException(ModelServerError):
    code = 400


class DownloadArchiveException(ModelServerError):
    code = 400


class ModelException(ModelServerError):
    code = 400


class ConflictStatusException(ModelServerError):
    code = 409


class RequestTimeoutException(ModelServerError):
    code = 408


class MethodNotAllowedException(ModelServerError):
    code = 405

    def __init__(self) -> None:
        super().__init__("Requested method is not allowed, please refer to API document.")


class RequestTooLargeException(ModelServerError):
    code = 413


class ServiceUnavailableException(ModelServerError):
    code = 503


class InvalidModelVersionException(ModelServerError):
    code = 403


class InternalServerException(ModelServerError):
    code = 500


AUTHORIZATION_FAILED = (
    "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
)
AUTHENTICATION_FAILED = (
    "Token Authentication failed. Token either incorrect, expired, or not provided correctly"
)
