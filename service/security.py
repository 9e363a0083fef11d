"""Optional API keys, checked before a request's body is read.

The service stores no keys, only their sha256 digests (``api_key_hashes``), so a leaked
configuration does not leak the keys. A client sends its key as ``X-API-Key: KEY`` or
``Authorization: Bearer KEY``. What needs a key:

* everything under ``/v1/`` (restoring, and the model list with its weights' digests);
* ``/healthz`` and ``/readyz`` when ``protect_health`` is set, ``/metrics`` when
  ``protect_metrics`` is: probes and scrapers inside a cluster usually have no key to send;
* never the web page, ``/docs`` and ``/openapi.json``: they describe the API, they do not use it.

With no hashes configured nothing is checked (``require_api_keys`` makes that a start-up
error instead). ``python -m service.security`` reads a key on standard input and prints the
digest to configure.

:class:`SecurityHeaders` puts the browser-facing protections on every response: a Content
Security Policy per kind of resource (the page, ``/docs``, the API), no framing, no MIME
sniffing, no referrer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys
from collections.abc import Callable, Iterable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["hash_key", "requires_key", "route_path", "document_api_keys", "ApiKeyGuard", "SecurityHeaders",
           "security_headers", "PROTECTED_PREFIX", "PAGE_POLICY", "API_POLICY"]

PROTECTED_PREFIX = "/v1/"
_HEALTH_PATHS = frozenset({"/healthz", "/readyz"})
_METRICS_PATHS = frozenset({"/metrics"})
_BEARER = b"bearer "


def hash_key(key: str) -> str:
    """The sha256 hex digest that ``api_key_hashes`` holds for ``key``."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def requires_key(path: str, *, protect_health: bool = False, protect_metrics: bool = False) -> bool:
    """Whether a request for ``path`` must carry a key (when keys are configured at all)."""
    return (path.startswith(PROTECTED_PREFIX) or (protect_health and path in _HEALTH_PATHS)
            or (protect_metrics and path in _METRICS_PATHS))


def document_api_keys(schema: dict, *, protect_health: bool = False, protect_metrics: bool = False) -> dict:
    """``schema`` (an OpenAPI document) with the key's two headers as security schemes and each
    operation that needs one marked so, with its 401: /docs then offers "Authorize", and its
    "Try it out" can send the key."""
    schema.setdefault("components", {})["securitySchemes"] = {
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "bearer": {"type": "http", "scheme": "bearer"},
    }
    unauthorized = {"description": "No key, or not an accepted one (`missing_api_key`, `invalid_api_key`).",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path, operations in schema.get("paths", {}).items():
        if requires_key(path, protect_health=protect_health, protect_metrics=protect_metrics):
            for operation in operations.values():
                operation["security"] = [{"apiKey": []}, {"bearer": []}]
                operation.setdefault("responses", {})["401"] = unauthorized
    return schema


def route_path(scope: Scope) -> str:
    """The path the routes match: behind a ``root_path`` (``uvicorn --root-path /api``) the server
    puts it in front of ``scope["path"]``, and the router strips it again; every layer that decides
    by path must strip it as well, or ``/api/v1/...`` would pass checks written for ``/v1/...``."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def _presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    # Raw header bytes, hashed as they came: a key with non-ASCII characters, sent as UTF-8,
    # matches hash_key() of the same text.
    for name, value in headers:
        name = name.lower()
        if name == b"x-api-key":
            return value.strip()
        if name == b"authorization" and value[:len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER):].strip()
    return None


class ApiKeyGuard:
    """Pure ASGI, so that a request without a valid key is answered 401 before its upload is read.

    Args:
        app: the application behind the guard.
        key_hashes: sha256 hex digests of the accepted keys; empty turns the guard off.
        protect_health: also guard ``/healthz`` and ``/readyz``.
        protect_metrics: also guard ``/metrics``.
        error_response: builds the service's JSON error response from (status, code, message, headers).
    """

    def __init__(self, app: ASGIApp, *, key_hashes: Iterable[str], protect_health: bool = False,
                 protect_metrics: bool = False,
                 error_response: Callable[[int, str, str, dict[str, str]], Response]):
        self.app = app
        # Digests as bytes of equal length: compare_digest then takes the same time for any
        # presented key, whether it is close to a valid one or not.
        self._digests = tuple(bytes.fromhex(digest) for digest in key_hashes)
        self._protected = {"protect_health": protect_health, "protect_metrics": protect_metrics}
        self._error_response = error_response

    def _protects(self, path: str) -> bool:
        return requires_key(path, **self._protected)

    def _accepts(self, key: bytes) -> bool:
        presented = hashlib.sha256(key).digest()
        # Every digest is compared, with no early exit, so timing does not tell which one matched.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # No exception for OPTIONS: a browser's CORS preflight (which carries no key) is answered
        # by the CORS layer outside this one, and any other OPTIONS would reach the refusals of
        # admission, which tell the task list and the upload limit.
        if not self._digests or scope["type"] != "http" or not self._protects(route_path(scope)):
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope["headers"])
        if key is not None and self._accepts(key):
            await self.app(scope, receive, send)
            return
        code, message = (("missing_api_key", "this endpoint needs an API key: send X-API-Key or Authorization: Bearer")
                         if key is None else ("invalid_api_key", "the API key is not valid"))
        entry = scope.get("state", {}).get("log_entry")
        if entry is not None:
            entry["error"] = code
        response = self._error_response(401, code, message, {"WWW-Authenticate": 'Bearer realm="mprnet"'})
        await response(scope, receive, send)


# The try-it page loads its own script and styles, fetches the API on the same origin, and shows
# the chosen and restored images as blob: URLs (which a script may also read back: blob: in
# connect-src; only this origin can create them); its favicon is a data: URL. Nothing else.
PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
               "connect-src 'self' blob:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
# JSON, PNG and metrics are data, never documents that run anything.
API_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"


def security_headers(policy: str = API_POLICY) -> list[tuple[bytes, bytes]]:
    """The headers every answer carries, with ``policy`` as its Content-Security-Policy."""
    return [
        (b"content-security-policy", policy.encode()),
        # frame-ancestors is the modern form; X-Frame-Options covers browsers that predate it.
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
        # The page's and API's URLs carry nothing a third party should see, not even the origin.
        (b"referrer-policy", b"no-referrer"),
    ]


class SecurityHeaders:
    """Adds the security headers to every HTTP response that does not already carry them.

    Args:
        app: the application behind it.
        policies: path -> Content-Security-Policy for that exact path; ``prefixes`` the same for
            paths under a prefix; any other path gets ``API_POLICY``.
    """

    def __init__(self, app: ASGIApp, *, policies: dict[str, str], prefixes: dict[str, str]):
        self.app = app
        self._policies = policies
        self._prefixes = prefixes

    def _policy(self, path: str) -> str:
        if path in self._policies:
            return self._policies[path]
        return next((policy for prefix, policy in self._prefixes.items() if path.startswith(prefix)), API_POLICY)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = security_headers(self._policy(route_path(scope)))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                message["headers"] = [*message.get("headers", ()),
                                      *((name, value) for name, value in added if name not in present)]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def main() -> int:
    if sys.stdin.isatty():
        print("API key (leave empty for a new random one): ", end="", file=sys.stderr, flush=True)
    key = sys.stdin.readline().strip()
    if not (key.isascii() and key.isprintable()):
        # Header values are ASCII by every client's rules (the project's own client refuses anything
        # else); a key of other characters would be sent differently by each, or not at all.
        print("error: an API key must be printable ASCII (letters, digits, punctuation); the key is not shown",
              file=sys.stderr)
        return 2
    if not key:
        key = secrets.token_urlsafe(32)
        print(f"new key, give it to the client and keep it nowhere else: {key}", file=sys.stderr)
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
