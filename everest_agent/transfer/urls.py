"""
URLs as the agent shows them and as it decides where its token may go.

L{public_url} is the one function that makes a URL fit for a log line, a
reason sent to the platform or C{status} output: no user information, no
query (signed URLs carry their signature there), no fragment.
"""

from urllib.parse import urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}
#: The WebSocket schemes travel on their HTTP counterparts.
_TRANSPORT = {"ws": "http", "wss": "https"}


def public_url(url):
    """C{url} without user information, query or fragment (nothing secret)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "?"


def origin(url):
    """
    C{(scheme, host, port)} of C{url}: the scheme as it travels (C{wss} is
    C{https}), the host in lower case, the port with its default filled in.
    """
    parts = urlsplit(url)
    scheme = (parts.scheme or "").lower()
    host = (parts.hostname or "").lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return _TRANSPORT.get(scheme, scheme), host, port or _DEFAULT_PORTS.get(scheme)


def same_origin(platform_url, uri):
    """
    Whether C{uri} has the platform URL's scheme, host and port (so the
    platform's token may go with it).  A platform on C{wss://} does not
    send its token over plain C{http://}, whatever the port.
    """
    return origin(platform_url) == origin(uri)
