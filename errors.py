"""The proxy's small exception hierarchy; one handler in app.py renders it as the SPEC's error JSON."""
from __future__ import annotations


class APIError(Exception):
    """An error with an HTTP status and an error type, safe to show to the client."""

    status = 500
    type = "internal_error"
    retryable = False

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, details: list | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.param = param
        self.details = details
        self.headers = headers or {}

    def to_dict(self) -> dict:
        """The SPEC's error body: type and code carry the same name, param is always present."""
        err = {"message": self.message, "type": self.type, "code": self.type, "param": self.param}
        if self.details:
            err["details"] = self.details
        return {"error": err}


class ValidationError(APIError):
    status, type = 400, "validation_error"

    def __init__(self, details: list[dict], message: str | None = None):
        message = message or "; ".join(f"{d['path']}: {d['message']}" for d in details)
        super().__init__(message, details=details, param=details[0]["path"] if details else None)


class InvalidJSON(APIError):
    status, type = 400, "invalid_json"


class InvalidRequest(APIError):
    status, type = 400, "invalid_request_error"


class ModelNotFound(APIError):
    status, type = 400, "model_not_found"


class ProviderNotConfigured(APIError):
    status, type = 400, "provider_not_configured"


class AuthenticationError(APIError):
    status, type = 401, "authentication_error"


class BudgetExceeded(APIError):
    status, type = 402, "budget_exceeded"


class PermissionDenied(APIError):
    status, type = 403, "permission_error"


class AdminDisabled(APIError):
    status, type = 403, "admin_disabled"


class NotFound(APIError):
    status, type = 404, "not_found"


class RateLimited(APIError):
    status, type = 429, "rate_limit_exceeded"


class ServiceUnavailable(APIError):
    status, type = 503, "service_unavailable"


class UpstreamError(APIError):
    """The provider failed (5xx, garbage, dropped connection) or refused; retryable unless said otherwise."""

    status, type, retryable = 502, "upstream_error", True

    def __init__(self, message: str, *, upstream_status: int | None = None, retry_after: float | None = None,
                 retryable: bool | None = None, **kw):
        super().__init__(message, **kw)
        self.upstream_status = upstream_status
        self.retry_after = retry_after
        if retryable is not None:
            self.retryable = retryable


class UpstreamTimeout(UpstreamError):
    status, type = 504, "upstream_timeout"
