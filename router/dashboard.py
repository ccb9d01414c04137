"""The dashboard page: plain HTML, JavaScript and CSS kept in router/static/, served as they are (no CDN, no
build step, nothing fetched from anywhere but this router).

The page itself holds no data and no secret, so it is served without a token. It asks for the admin token, keeps
it in the browser tab's sessionStorage (gone when the tab closes; never in a URL, a cookie or a log) and sends it
as `Authorization: Bearer` with each call to the admin API (/admin/experiments, /admin/report, /admin/series, and
the weight and reset actions), which checks it exactly as for any other client. A strict Content-Security-Policy
allows only this router's own script, style and API: an event's text can never run as code.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from router.errors import NotFound, quoted

STATIC = Path(__file__).parent / "static"
PAGE = "index.html"
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def page(request: web.Request) -> web.Response:
    return _file(PAGE, "text/html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["asset"]
    if name not in ASSETS:  # a fixed list: no path from the URL ever reaches the file system
        raise NotFound(f"the dashboard has no file {quoted(name)} (it has: {', '.join(ASSETS)})")
    return _file(name, ASSETS[name])


def _file(name: str, content_type: str) -> web.Response:
    return web.Response(body=(STATIC / name).read_bytes(), content_type=content_type, charset="utf-8",
                        headers=HEADERS)
