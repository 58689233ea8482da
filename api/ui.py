"""The web view's static shell: ``/ui`` serves the files of ``api/ui/`` (plain HTML, CSS and ES
modules, the graph layout library vendored under ``api/ui/vendor/``), nothing else.

Why the shell is a public route: it holds no data. Every piece of data the page shows comes
from the ordinary API routes, which the page calls with ``Authorization: Bearer`` (the token the
user typed into its login form), so the door and the auth middleware judge those calls as they
judge any client's. A browser cannot send a header when it merely loads a page, so the shell
itself must be reachable without one.

Only the files found in the directory at import are served, looked up by name in that index,
so no request path can reach a file outside it (``..``, encoded slashes or symlinks included).
The responses carry a strict Content-Security-Policy: the page runs only its own scripts and
talks only to its own origin, so a filename or log line shown in it cannot become script.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .errors import error

UI_DIR = Path(__file__).with_name("ui")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}

HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # revalidate every time: an upgrade of the service must never leave an old page running
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


def _index(root: Path) -> dict[str, Asset]:
    """Every servable file under ``root`` by its path relative to it (``vendor/dagre.esm.js``).
    Read once: the files are part of the installed package and never change while it runs."""
    assets: dict[str, Asset] = {}
    for path in sorted(root.rglob("*")):
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is not None and path.is_file() and not path.is_symlink():
            assets[path.relative_to(root).as_posix()] = Asset(path.read_bytes(), content_type)
    return assets


ASSETS = _index(UI_DIR)
FILE_NAMES = sorted(n for n in ASSETS if "/" not in n)
"""What ``/ui/{name}`` serves."""
VENDOR_NAMES = sorted(n.removeprefix("vendor/") for n in ASSETS if n.startswith("vendor/") and n.count("/") == 1)
"""What ``/ui/vendor/{name}`` serves."""
MEDIA_TYPES = tuple(sorted({t.split(";")[0] for t in CONTENT_TYPES.values()}))


def _serve(name: str) -> web.Response:
    asset = ASSETS.get(name)
    if asset is None:
        return error(404, f"the web view has no file {name!r}", None)
    return web.Response(body=asset.body, headers={**HEADERS, "Content-Type": asset.content_type})


async def ui_redirect(request: web.Request) -> web.Response:
    """``/ui`` → ``/ui/``, so the page's relative module imports resolve under ``/ui/``."""
    raise web.HTTPPermanentRedirect("/ui/")


async def ui_index(request: web.Request) -> web.Response:
    return _serve("index.html")


async def ui_file(request: web.Request) -> web.Response:
    return _serve(request.match_info["name"])


async def ui_vendor_file(request: web.Request) -> web.Response:
    return _serve("vendor/" + request.match_info["name"])


async def swagger_page(request: web.Request) -> web.Response:
    """``/api``: Swagger UI (vendored, ``vendor/swagger-ui-*``) on ``/api-json``, where the
    original Mlynar (NestJS) has its. Public like the document it shows; trying a call out needs
    the token (its Authorize button)."""
    return _serve("swagger.html")
