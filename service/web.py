"""The try-it page: ``/`` serves ``static/index.html``, ``/static/...`` its script and styles.

Plain files shipped in the package, so the page needs no build step and no network beyond the
service itself; it talks to the same public API as any other client.
"""

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

__all__ = ["mount_web", "STATIC_DIR"]

STATIC_DIR = Path(__file__).with_name("static")


def mount_web(app: FastAPI) -> None:
    """Add the page to ``app``; kept out of the OpenAPI schema, which documents the API only."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # Revalidated on every visit, so a redeployed service never pairs an old page with a new API.
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
