"""What every HTTP request passes before and after its route, as plain ASGI middleware.

Before: a POST must declare JSON and stay under `max_body_bytes` (the body is read
here, counted, and replayed to the route); `/v1/*` needs a valid API key when
`api_keys` is set (the key's tenant goes into the request state); `/metrics` needs
`metrics_api_key` when set. After: the request is counted by route template and
status, and an unhandled error becomes a 500 with OpenAI's error body.

Plain ASGI rather than Starlette's `BaseHTTPMiddleware`, which hides the client's
disconnect from the route (a non-streamed request could not notice its client left).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match

from kvcake.config import KvcakeConfig
from kvcake.server.metrics import ServerMetrics

RETRY_AFTER_S = 1
CLIENT_GONE = 499
"""Status counted for a request whose client left before it was answered."""
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class Guard:
    def __init__(self, app: Callable, config: KvcakeConfig, metrics: ServerMetrics, routes: Callable[[], list[BaseRoute]]):
        self.app = app
        self.config = config
        self.metrics = metrics
        self.routes = routes
        self.tenants = config.tenants_by_key()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: list[int] = []

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            receive = await self._admit(scope, receive)
            await self.app(scope, receive, counted_send)
        except ApiError as error:
            if not status:
                await error.response()(scope, receive, counted_send)
        except ClientDisconnect:
            status.append(CLIENT_GONE)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not status:
                await ApiError(500, "internal error", kind="server_error").response()(scope, receive, counted_send)
        self.metrics.requests.labels(self._route_label(scope), str(status[0] if status else 500)).inc()

    async def _admit(self, scope: Scope, receive: Receive) -> Receive:
        """Check the request's headers and body; the `receive` the route should use."""
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope.get("headers", [])}
        path = scope["path"]
        if path.startswith("/v1/"):
            scope.setdefault("state", {})["tenant"] = self._tenant(headers)
        if path == "/metrics" and self.config.metrics_api_key:
            _check_key(headers, self.config.metrics_api_key)
        if scope["method"] != "POST":
            return receive
        _check_content_type(headers)
        return await self._buffered_body(headers, receive)

    def _tenant(self, headers: dict[str, str]) -> str:
        if not self.tenants:
            return self.config.tenant
        key = _bearer(headers)
        if key not in self.tenants:
            raise _unauthorized()
        return self.tenants[key]

    async def _buffered_body(self, headers: dict[str, str], receive: Receive) -> Receive:
        """Read the whole body (413 past the limit), then replay it; later calls reach the client (disconnects)."""
        limit = self.config.max_body_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {declared} bytes; the limit is {limit}", code="body_too_large")
        parts: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise ClientDisconnect
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > limit:
                raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="body_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        return replay

    def _route_label(self, scope: Scope) -> str:
        """The route's template (never the raw path, which a client could vary without end); `unknown` otherwise."""
        for route in self.routes():
            if route.matches(scope)[0] == Match.FULL:
                return getattr(route, "path", "unknown")
        return "unknown"


def _check_content_type(headers: dict[str, str]) -> None:
    media_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        given = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise ApiError(415, f"the request body must be JSON sent with Content-Type: application/json (got {given})", code="unsupported_media_type")


def _bearer(headers: dict[str, str]) -> str | None:
    scheme, _, key = headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


def _check_key(headers: dict[str, str], expected: str) -> None:
    if not hmac.compare_digest((_bearer(headers) or "").encode(), expected.encode()):
        raise _unauthorized()


def _unauthorized() -> ApiError:
    return ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", kind="authentication_error", code="invalid_api_key")
