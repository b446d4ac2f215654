"""
The pages people open in a browser: the agent's (on its C{[monitor]}
listener) and the reference platform's, both at C{/}.

They are plain HTML, CSS and JavaScript files in C{everest_agent/static},
shipped as package data and served from memory (read once, when the site
is built); no CDN, no build step.  Each page fetches its figures from a JSON
endpoint of the same server and redraws itself.  The scripts put data into
the page only as text (C{textContent}, never C{innerHTML}), and every page
is served with a Content-Security-Policy that allows only the server's own
scripts and styles, so nothing a task, an agent or a platform sends can run
in the page.
"""

import os

from twisted.web import resource

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")

CONTENT_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".svg": b"image/svg+xml",
}

HEADERS = {
    b"content-security-policy": (
        b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-cache",
}


def read_static(name):
    """The bytes of the packaged file C{name} (in C{everest_agent/static})."""
    with open(os.path.join(STATIC_DIR, name), "rb") as f:
        return f.read()


class StaticFile(resource.Resource):
    """One packaged file, read once, served with L{HEADERS}."""

    isLeaf = True

    def __init__(self, name):
        super().__init__()
        self.body = read_static(name)
        self.content_type = CONTENT_TYPES.get(os.path.splitext(name)[1], b"application/octet-stream")

    def render_GET(self, request):
        request.setHeader(b"content-type", self.content_type)
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        return self.body

    render_HEAD = render_GET


def static_resource():
    """C{/static/}: the packaged CSS and scripts (a fixed set, no directory listing)."""
    root = resource.Resource()
    for name in sorted(os.listdir(STATIC_DIR)):
        if os.path.splitext(name)[1] in (".css", ".js", ".svg"):
            root.putChild(name.encode("ascii"), StaticFile(name))
    return root
