"""Interactive API documentation (Swagger UI) for ``<base>/docs``.

:func:`docs_resource` returns a Twisted web resource that answers its own
path with the Swagger UI page and its children ``swagger-ui.css``,
``swagger-ui-bundle.js``, ``swagger-ui-standalone-preset.js`` and the
favicons with the files of the installed ``swagger-ui-py`` distribution, so
the page works without internet access.  The page loads the API description
from ``<base>/openapi.json`` and never contacts another host (the online
spec validator badge is switched off).

Mount it so that requests below ``<base>/docs/`` reach it, e.g. a Klein route
``@app.route(base + "/docs", branch=True)`` returning the resource.
"""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource, NoResource, Resource
from twisted.web.static import File

__all__ = [
    "ASSETS",
    "SwaggerUIMissing",
    "docs_resource",
    "render_missing_page",
    "render_page",
    "swagger_ui_directory",
]

#: Files served below ``<base>/docs/`` and their content types.
ASSETS: dict[str, str] = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui-standalone-preset.js": "text/javascript; charset=utf-8",
    "favicon-16x16.png": "image/png",
    "favicon-32x32.png": "image/png",
}

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>NodePass API</title>
  <link rel="icon" type="image/png" href="{docs}/favicon-32x32.png" sizes="32x32">
  <link rel="icon" type="image/png" href="{docs}/favicon-16x16.png" sizes="16x16">
  <link rel="stylesheet" href="{docs}/swagger-ui.css">
  <style>body {{ margin: 0; background: #fafafa; }}</style>
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{docs}/swagger-ui-bundle.js"></script>
  <script src="{docs}/swagger-ui-standalone-preset.js"></script>
  <script>
    window.onload = function () {{
      window.ui = SwaggerUIBundle({{
        url: {spec_url},
        dom_id: "#swagger-ui",
        deepLinking: true,
        validatorUrl: null,
        presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
        plugins: [SwaggerUIBundle.plugins.DownloadUrl],
        layout: "StandaloneLayout"
      }});
    }};
  </script>
</body>
</html>
"""


class SwaggerUIMissing(RuntimeError):
    """The Swagger UI files (package ``swagger-ui-py``) are not installed."""


def swagger_ui_directory() -> Path:
    """Folder holding the Swagger UI files; raises :class:`SwaggerUIMissing` if absent."""
    spec = importlib.util.find_spec("swagger_ui")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        folder = Path(location) / "static"
        if all((folder / name).is_file() for name in ASSETS):
            return folder
    raise SwaggerUIMissing(
        "Swagger UI files not found: install the swagger-ui-py package "
        "(pip install swagger-ui-py) to serve the API documentation page"
    )


def render_page(base: str) -> bytes:
    """The HTML of the documentation page for route base ``base`` (e.g. ``/api/v1``)."""
    docs = html.escape(f"{base}/docs", quote=True)
    # json.dumps makes a valid JS string; "<" is escaped so "</script>" cannot occur.
    spec_url = json.dumps(f"{base}/openapi.json").replace("<", "\\u003c")
    return _PAGE.format(docs=docs, spec_url=spec_url).encode("utf-8")


def render_missing_page(base: str) -> bytes:
    """The page served instead of Swagger UI when its files are not installed."""
    spec = html.escape(f"{base}/openapi.json", quote=True)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\">"
        "<title>NodePass API</title></head>\n<body>\n"
        "<p>The interactive documentation needs the swagger-ui-py package, "
        "which is not installed on this host.</p>\n"
        f"<p>The API description is at <a href=\"{spec}\">{spec}</a>.</p>\n"
        "</body>\n</html>\n"
    ).encode()


class _Asset(File):
    """One Swagger UI file, sent with a fixed content type and cache header."""

    def __init__(self, path: Path, content_type: str, not_found: IResource) -> None:
        super().__init__(str(path), defaultType=content_type)  # type: ignore[no-untyped-call]
        self.type = content_type
        self.encoding = None
        self.childNotFound = not_found  # type: ignore[assignment]

    def render_GET(self, request: IRequest) -> bytes | int:  # type: ignore[override]
        request.setHeader(b"Cache-Control", b"public, max-age=86400")  # type: ignore[no-untyped-call]
        result: bytes | int = super().render_GET(request)  # type: ignore[no-untyped-call]
        return result

    render_HEAD = render_GET  # File.render_GET sends no body for HEAD


class _DocsPage(Resource):
    """The documentation page; its children are the Swagger UI files."""

    def __init__(self, base: str, folder: Path | None, not_found: IResource) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._not_found = not_found
        if folder is None:
            self._page = render_missing_page(base)
        else:
            self._page = render_page(base)
            for name, content_type in ASSETS.items():
                self.putChild(name.encode("ascii"), _Asset(folder / name, content_type, not_found))

    def getChild(self, path: bytes, request: IRequest) -> IResource:
        if path == b"":
            return self
        return self._not_found

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")  # type: ignore[no-untyped-call]
        request.setHeader(b"Content-Length", str(len(self._page)).encode("ascii"))  # type: ignore[no-untyped-call]
        return b"" if request.method == b"HEAD" else self._page

    render_HEAD = render_GET


def docs_resource(base: str, not_found: IResource | None = None) -> IResource:
    """The Swagger UI resource for route base ``base`` (e.g. ``/api/v1``).

    Its own path serves the page, whose API description URL is
    ``<base>/openapi.json`` and whose assets are ``<base>/docs/<file>``.
    When the Swagger UI files are not installed the page says so and links
    to the API description, and the assets answer 404.  *not_found* answers
    paths below the page that are no asset (Twisted's 404 page by default).
    ``HEAD`` is answered like ``GET`` without a body; the resource serves no
    other method (the caller refuses them first).
    """
    try:
        folder: Path | None = swagger_ui_directory()
    except SwaggerUIMissing:
        folder = None
    return _DocsPage(base, folder, not_found if not_found is not None else NoResource())
