"""The errors of the explanation service: each carries the HTTP status the web layer answers with."""

from __future__ import annotations

from teachx.errors import TeachxError


class ServiceError(TeachxError):
    status = 400


class NotFound(ServiceError):
    status = 404


class Unavailable(ServiceError):
    """The model or its data cannot be used (damaged checkpoint, dataset not present)."""

    status = 409


class MethodFailed(ServiceError):
    status = 422


class BadClass(ServiceError):
    status = 422


class BadUpload(ServiceError):
    def __init__(self, message: str, status: int = 415):
        super().__init__(message)
        self.status = status
