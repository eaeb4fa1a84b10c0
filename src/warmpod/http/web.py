"""The browser's side: the playground at ``/``, the OpenAPI UI and their assets, served from the package."""

from __future__ import annotations

from pathlib import Path

from litestar import Response, Router, get
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

STATIC = Path(__file__).parent / "static"
"""The playground's page, script and style, and Swagger UI 5.18.2 (swagger-ui-dist, Apache-2.0)."""
# Nothing a page of this origin loads or calls may come from elsewhere; the program's images come
# back in the result (data:) or are fetched with the key and shown from blob: URLs.
PLAYGROUND_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
# Litestar's Swagger page puts the schema and Swagger UI's start in an inline script.
OPENAPI_POLICY = (
    "default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


@get("/", include_in_schema=False, sync_to_thread=False, media_type="text/html")
def playground() -> Response[bytes]:
    """The playground: write a script, run it, watch its output arrive."""
    return Response(
        (STATIC / "index.html").read_bytes(),
        media_type="text/html",
        headers={**_HEADERS, "Content-Security-Policy": PLAYGROUND_POLICY},
    )


def static_router() -> Router:
    """``/static/...``: the package's assets (nosniff, cached for an hour)."""
    return create_static_files_router(
        path="/static",
        directories=[STATIC],
        name="static",
        # The package directory holds regular files only; nothing it links to is followed.
        resolve_symlinks=False,
        after_request=_static_headers,
    )


def _static_headers(response: Response[object]) -> Response[object]:
    response.headers.update({**_HEADERS, "Cache-Control": "public, max-age=3600"})
    return response


class OfflineSwagger(SwaggerRenderPlugin):
    """Swagger UI at ``/schema/swagger`` (and ``/schema``) from the package's copy, not a CDN."""

    def __init__(self) -> None:
        base = "/static/swagger-ui"
        super().__init__(
            js_url=f"{base}/swagger-ui-bundle.js",
            css_url=f"{base}/swagger-ui.css",
            standalone_preset_js_url=f"{base}/swagger-ui-standalone-preset.js",
            favicon=f"<link rel='icon' type='image/png' href='{base}/favicon-32x32.png'>",
            path=["/swagger", "/"],
        )


def page_headers(response: Response[object]) -> Response[object]:
    """The app's after-request hook: any HTML page without a policy of its own (the OpenAPI UI's)
    gets one that lets it load nothing from elsewhere."""
    if (response.media_type or "").startswith("text/html"):
        for name, value in {**_HEADERS, "Content-Security-Policy": OPENAPI_POLICY}.items():
            response.headers.setdefault(name, value)
    return response
