"""What the server does before a request reaches a handler: OpenAI-shaped errors, the body-size limit, the API key."""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable

from fastapi.responses import JSONResponse

from .protocol import ErrorBody, ErrorResponse

__all__ = ["error_response", "BodyLimit", "ApiKey", "DEFAULT_MAX_BODY_BYTES"]

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024


class _AsciiJSON(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote what a client sent, and a lone surrogate
    in it (valid in JSON's escapes, not in UTF-8) would otherwise fail the response itself."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An error as OpenAI's API sends it: ``{"error": {"message", "type", "param", "code"}}``."""
    body = ErrorResponse(error=ErrorBody(message=message, type=type_, param=param, code=code))
    return _AsciiJSON(body.model_dump(), status)


class BodyLimit:
    """ASGI middleware: read a request body up to ``max_bytes`` and hand it on; refuse a larger one with 413 as soon
    as its declared length or the bytes received say so, before anything parses it."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[str], None]) -> None:
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(scope, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # afterwards: the disconnect notice

        await self.app(scope, replay, send)

    async def _refuse(self, scope, send) -> None:
        self.on_refused(scope["path"])
        response = error_response(
            413,
            f"the request body is larger than {self.max_bytes} bytes (acb serve --max-body-bytes)",
            "invalid_request_error",
            code="request_too_large",
        )
        response.headers["Connection"] = "close"
        await response(scope, None, send)


class ApiKey:
    """ASGI middleware: every ``/v1`` request must carry ``Authorization: Bearer <key>`` (compared in constant
    time); others get 401. ``/health`` and ``/metrics`` stay open for probes and scrapers."""

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, given = header.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                response = error_response(
                    401, "a valid API key is needed: 'Authorization: Bearer <key>'", "invalid_request_error",
                    code="invalid_api_key",
                )  # fmt: skip
                return await response(scope, receive, send)
        await self.app(scope, receive, send)
