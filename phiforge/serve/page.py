"""The chat page at `/`: static files from phiforge/serve/static (no build step, nothing fetched from elsewhere), and
CORS for browser clients on other origins (off unless `--cors-origins` names some).

Caching: index.html is revalidated on every load (`no-cache` + ETag), so a new phiforge shows its new page at once.
It links its assets as `/static/NAME?v=HASH`, the hash of the file's bytes; a URL with the current hash can never
change, so the browser keeps it for a year without asking (`immutable`). Any other asset URL is revalidated.

The page itself needs no key (it has to load to ask for one); the API routes it calls check `--api-key` as ever.
"""
from __future__ import annotations

import hashlib
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

STATIC = "static"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}
# The page runs only its own script and talks only to this server: model text that slipped into the DOM as HTML
# could still not run script or load anything (defence in depth; the renderer never inserts HTML to begin with).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
IMMUTABLE = "public, max-age=31536000, immutable"


class Asset:
    def __init__(self, name: str, data: bytes):
        self.name, self.data = name, data
        self.type = TYPES[name[name.rindex("."):]]
        self.hash = hashlib.sha256(data).hexdigest()[:16]
        self.etag = f'"{self.hash}"'


def load_assets() -> dict[str, Asset]:
    """The files of phiforge/serve/static; index.html with its asset links versioned by content hash."""
    folder = resources.files("phiforge.serve").joinpath(STATIC)
    assets = {f.name: Asset(f.name, f.read_bytes()) for f in folder.iterdir()
              if f.is_file() and "." in f.name and f.name[f.name.rindex("."):] in TYPES}
    index = assets["index.html"].data.decode()
    for name, a in assets.items():
        if name != "index.html":
            index = index.replace(f'"/static/{name}"', f'"/static/{name}?v={a.hash}"')
    assets["index.html"] = Asset("index.html", index.encode())
    return assets


def _respond(request: Request, asset: Asset, cache: str) -> Response:
    headers = {"Cache-Control": cache, "ETag": asset.etag, **SECURITY_HEADERS}
    if asset.etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    return Response(asset.data, media_type=asset.type, headers=headers)


def add_page(app: FastAPI, cors_origins: list[str] | None = None) -> None:
    """Serve the chat page on `app`; with cors_origins, let pages on those origins ("*" = any) call the API."""
    assets = load_assets()

    @app.get("/", include_in_schema=False)
    async def index(request: Request):
        return _respond(request, assets["index.html"], "no-cache")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request, v: str | None = None):
        asset = assets.get(name)
        if asset is None or name == "index.html":
            # api.py's handler turns it into the API's error body ("GET /static/x: no such file"); raising its
            # ApiError here would make page.py and api.py import each other
            raise HTTPException(404, "no such file")
        return _respond(request, asset, IMMUTABLE if v == asset.hash else "no-cache")

    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # added last, so outermost: preflights are answered before the routes, and 401s carry the headers too
        # (a page elsewhere must be able to read "invalid API key" to ask for one)
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
