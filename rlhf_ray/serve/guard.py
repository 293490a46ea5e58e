"""The outermost layer of the HTTP API: the API key, the size of request bodies and the time they take to
arrive, and a last catch so that no traceback ever reaches a client. Pure ASGI, so it sees every request
before FastAPI parses anything.
"""

from __future__ import annotations

import asyncio
import hmac
import logging

from fastapi.responses import JSONResponse

logger = logging.getLogger("rlhf_ray.serve")

PUBLIC_PATHS = frozenset({"/health"})
# the feedback pages and their routes check annotator keys themselves (serve/pages), all but the admin view's
PAGE_PREFIX, ADMIN_PREFIX = "/ui", "/ui/api/admin"


def _public(path: str) -> bool:
    pages = path == PAGE_PREFIX or path.startswith(PAGE_PREFIX + "/")
    return path in PUBLIC_PATHS or (pages and not path.startswith(ADMIN_PREFIX))


def _printable(text: str | None) -> str | None:
    """`text` as UTF-8 can carry it: a lone surrogate echoed from a request becomes `\\ud800`, not a 500."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": _printable(message), "type": type, "param": _printable(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# Answers sent before the body was read: the rest of the body may still be on its way, so the connection
# cannot carry another request.
CLOSE = {"Connection": "close"}


def _has_body(scope) -> bool:
    headers = dict(scope["headers"])
    return headers.get(b"content-length", b"0").strip() not in (b"0", b"") or b"transfer-encoding" in headers


def _client_went_away(err: Exception) -> bool:
    """Whether `err` is Serve telling the replica that the HTTP client disconnected (not a server fault)."""
    try:
        from ray.exceptions import TaskCancelledError
    except ImportError:
        return False
    return isinstance(err, TaskCancelledError)


def _route_path(scope) -> str:
    """The path below the app's mount point (Serve's route_prefix arrives as `root_path`)."""
    path, root = scope["path"], scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


class GuardMiddleware:
    """Outermost ASGI layer: API key, request size, and a last catch so no traceback reaches a client.

    The body is read here, up to `max_request_bytes` (413 beyond, whatever Content-Length claims) and
    within `body_timeout_s` of the request's start (408 beyond: a slow or stalled upload), and replayed to
    the app, which therefore sees only whole requests; authentication is checked before a byte of the
    body is read."""

    def __init__(self, app, api_key: str | None, max_request_bytes: int, body_timeout_s: float = 10.0):
        self.app, self.api_key, self.max_request_bytes = app, api_key, max_request_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            rejection = self._authenticate(scope)
            if rejection is None:
                body, rejection = await self._read_body(scope, receive)
            if rejection is not None:
                return await rejection(scope, receive, send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()  # after the body: wait for the disconnect

            await self.app(scope, replay, send_tracked)
        except Exception as err:
            if _client_went_away(err):
                logger.info("client left during %s %s", scope.get("method"), scope.get("path"))
                return
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await error_response(500, "internal error", "server_error")(scope, receive, send)

    def _authenticate(self, scope):
        if not self.api_key or _public(_route_path(scope)):
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            return None
        message = ("missing API key: send 'Authorization: Bearer <key>'" if not given
                   else "invalid API key in the Authorization header")
        return error_response(401, message, "authentication_error", code="invalid_api_key",
                              headers={"WWW-Authenticate": "Bearer", **(CLOSE if _has_body(scope) else {})})

    async def _read_body(self, scope, receive):
        """(body, None), or (b"", the response that rejects the request)."""
        limit = self.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    return b"", self._too_large()
            except ValueError:
                return b"", error_response(400, f"Content-Length {declared.decode('latin-1')[:40]!r} is not a number",
                                           headers=CLOSE)
        chunks: list[bytes] = []
        try:
            # one deadline for the whole body, not one per chunk: a byte every few seconds must not hold a
            # request open for ever
            return await asyncio.wait_for(self._receive_body(receive, chunks), self.body_timeout_s)
        except asyncio.TimeoutError:
            got = sum(map(len, chunks))
            expected = f"of {int(declared)} " if declared is not None else ""
            return b"", error_response(
                408, f"request body not received within {self.body_timeout_s:g} s ({got} {expected}bytes arrived); "
                     "send the whole body at once", code="request_timeout", headers=CLOSE)

    async def _receive_body(self, receive, chunks: list[bytes]):
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # the client left: nobody reads the answer
                return b"", JSONResponse({}, status_code=400)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_request_bytes:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_large(self):
        return error_response(413, f"request body larger than {self.max_request_bytes} bytes",
                              code="request_too_large", headers=CLOSE)
