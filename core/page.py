"""The page at GET / (SPEC §8) and its files, shipped in the package under web/.

Everything the page needs is served from here: a greenhouse LAN has no internet.
The files are read once, on first use, and answered with an ETag so that a
browser's reload costs a 304.
"""

from __future__ import annotations

import functools
import mimetypes
from importlib import resources

from werkzeug.exceptions import NotFound
from werkzeug.wrappers import Request, Response

# The page loads scripts, styles and data from hydrod itself and nothing else, and
# no other site may frame it.
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate (a 304 when unchanged): an upgrade shows at once
}


@functools.cache
def files() -> dict[str, tuple[bytes, str]]:
    """{name: (bytes, mimetype)} of every file in web/."""
    found = {}
    for entry in resources.files("hydrod").joinpath("web").iterdir():
        if entry.is_file():
            mimetype = mimetypes.guess_type(entry.name)[0] or "application/octet-stream"
            if entry.name.endswith("LICENSE"):
                mimetype = "text/plain"
            found[entry.name] = (entry.read_bytes(), mimetype)
    return found


def response(request: Request, name: str) -> Response:
    try:
        body, mimetype = files()[name]
    except KeyError:
        raise NotFound(f"no file {name!r}") from None
    answer = Response(body, mimetype=mimetype, headers=HEADERS)
    answer.add_etag()
    return answer.make_conditional(request)
