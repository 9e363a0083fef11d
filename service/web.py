"""The try-it page (``/`` serves ``static/index.html``, ``/static/...`` its script and styles) and
the API's interactive documentation (``/docs``).

Plain files shipped in the packages, so neither needs a build step nor any network beyond the
service itself: the page talks to the same public API as any other client, and ``/docs`` runs
Swagger UI from the ``swagger-ui-bundle-v2`` package's files rather than from a CDN.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from swagger_ui_bundle import swagger_ui_path

from .security import PAGE_POLICY

__all__ = ["mount_web", "STATIC_DIR", "DOCS_PATH", "SWAGGER_UI_PREFIX", "content_policies"]

STATIC_DIR = Path(__file__).with_name("static")
DOCS_PATH = "/docs"
SWAGGER_UI_PREFIX = "/swagger-ui/"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


# The files /docs loads; the package's others include its own demo page, which points a browser
# at the public Petstore example.
_SWAGGER_UI_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")


def _docs_page(openapi_url: str, title: str) -> HTMLResponse:
    script, stylesheet, icon = (f"{SWAGGER_UI_PREFIX}{name}" for name in _SWAGGER_UI_FILES)
    return get_swagger_ui_html(
        openapi_url=openapi_url, title=title,
        swagger_js_url=script, swagger_css_url=stylesheet, swagger_favicon_url=icon,
        # Swagger UI would otherwise send the document to an online validator for its badge.
        swagger_ui_parameters={"validatorUrl": None})


def _docs_policy(page: HTMLResponse) -> str:
    # The page starts Swagger UI with one inline script; allowing exactly that script by its
    # hash keeps every other inline script (an injected one, say) blocked.
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                      for script in _INLINE_SCRIPT.findall(page.body.decode()))
    # Swagger UI's stylesheet draws its icons from data: URLs; its styles otherwise come from
    # that stylesheet and the CSSOM, which style-src does not restrict.
    return (f"default-src 'none'; script-src 'self' {hashes}; style-src 'self'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def content_policies(app: FastAPI) -> tuple[dict[str, str], dict[str, str]]:
    """The Content-Security-Policy of the page and the docs: (exact paths, path prefixes), for
    :class:`service.security.SecurityHeaders`; everything else is API."""
    docs = _docs_policy(_docs_page(app.openapi_url, app.title))
    return {"/": PAGE_POLICY, DOCS_PATH: docs}, {"/static/": PAGE_POLICY, SWAGGER_UI_PREFIX: docs}


class _RevalidatedFiles(StaticFiles):
    """The page's script and styles, revalidated on every visit as the page is (their ETag makes
    that a 304 when nothing changed): cached by the browser's own guess, a redeployed page could
    run the old script against the new API."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_web(app: FastAPI) -> None:
    """Add the page and the docs to ``app`` (created with ``docs_url=None``); kept out of the
    OpenAPI schema, which documents the API only."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # Revalidated on every visit, so a redeployed service never pairs an old page with a new API.
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    docs_html = _docs_page(app.openapi_url, app.title).body

    @app.get(DOCS_PATH, include_in_schema=False)
    async def docs() -> HTMLResponse:
        # A new response each time: middleware may add headers to a response's own header list.
        return HTMLResponse(docs_html)

    @app.get(SWAGGER_UI_PREFIX + "{name}", include_in_schema=False)
    async def swagger_ui_file(name: str) -> FileResponse:
        if name not in _SWAGGER_UI_FILES:
            raise HTTPException(404, "Not Found")
        return FileResponse(Path(swagger_ui_path) / name)

    app.mount("/static", _RevalidatedFiles(directory=STATIC_DIR), name="static")
