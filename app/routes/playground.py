"""The playground page: ``GET /`` serves ``app/static/index.html``; its script and style sheet are
served under ``/playground/``. The page calls the API from the browser (``/generate_stream``,
``/v1/chat/completions``, ``/refine``), so it needs nothing else from the server and nothing from outside
it (works offline).

The page and its files are open even with ``REFINER_API_KEY`` set (see ``app.auth``): it is the page that
asks for the key and sends it with each API call.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"  # shipped as package data (pyproject.toml)
STATIC_PREFIX = "/playground"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    """The playground page (``POST /`` stays the TGI compatibility route)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")


def install_playground(app: FastAPI) -> None:
    """Add ``GET /`` and the page's static files under ``/playground``."""
    app.include_router(router)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="playground")
