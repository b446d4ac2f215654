"""
One port for everything: a twisted.web L{Site} whose root serves the
agents' WebSocket at C{/compute/agent/v1}, the file store at C{/files/},
the JSON API at C{/api/} and, at C{/}, a page for people showing the agents
and every task live (L{everest_agent.pages}; open L{page_url}).
"""

from autobahn.twisted.resource import WebSocketResource
from twisted.internet import endpoints
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server

from everest_agent import pages
from everest_agent.platform.api import Api
from everest_agent.platform.files import FileStore, PlatformRequest
from everest_agent.platform.ws import PlatformServerFactory

log = Logger(namespace="everest_agent.platform")


class _Index(resource.Resource):
    """C{/}: the page (C{platform.html}); C{/static/}: its CSS and scripts."""

    def __init__(self, platform):
        super().__init__()
        self.platform = platform
        self.page = pages.StaticFile("platform.html")
        self.putChild(b"static", pages.static_resource())

    def getChild(self, name, request):
        if name == b"":
            return self.page
        return resource.NoResource()


def page_url(platform):
    """
    The address of the platform's page, with the API token (if the platform
    has one) in the fragment, which the browser keeps to itself: the page
    reads it and sends it as C{Authorization: Bearer} to C{/api/}.
    """
    token = getattr(platform, "api_token", "") or ""
    return f"{platform.http_url}/#token={token}" if token else f"{platform.http_url}/"


def make_site(platform, reactor=None, ping_interval=30, ping_timeout=60):
    """
    The L{Site} serving all of the platform.
    """
    root = _Index(platform)
    compute = resource.Resource()
    agent = resource.Resource()
    factory = PlatformServerFactory(platform, reactor=reactor or platform.reactor,
                                    ping_interval=ping_interval, ping_timeout=ping_timeout)
    agent.putChild(b"v1", WebSocketResource(factory))
    compute.putChild(b"agent", agent)
    root.putChild(b"compute", compute)
    root.putChild(b"api", Api(platform))
    if platform.files_dir is not None:
        root.putChild(b"files", FileStore(platform))
    site = server.Site(root)
    site.requestFactory = PlatformRequest
    site.platform = platform
    site.ws_factory = factory
    return site


class ConnectionTracker(WrappingFactory):
    """
    Wraps the site to know every open connection, so that they can all be
    dropped and waited for on shutdown.
    """

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._idle_waiters = []

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    def drop_all(self):
        """
        Abort every connection; a Deferred firing once all are gone.
        """
        if not self.protocols:
            return succeed(None)
        d = Deferred()
        self._idle_waiters.append(d)
        for p in list(self.protocols):
            if p.transport is not None:
                p.transport.abortConnection()
        return d


def _format_host(host):
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    if ":" in host:
        return f"[{host}]"
    return host


def listen(platform, reactor, endpoint, interface="127.0.0.1", tls=None, public_url=None,
           ping_interval=30, ping_timeout=60):
    """
    Serve the platform.

    @param endpoint: a port number (TCP on C{interface}), an endpoint
        description string (C{"tcp:8080:interface=127.0.0.1"}) or an
        L{IStreamServerEndpoint}.
    @param tls: an OpenSSL context factory (e.g. L{CertificateOptions}) to
        serve TLS (wss/https) on that endpoint, or C{None}.
    @param public_url: the http(s) base URL to publish instead of the one
        derived from the listening address.
    @return: a Deferred firing with the listening port, once
        C{platform.ws_url} and C{platform.http_url} are set.
        L{Platform.close} stops listening and drops the connections.
    """
    secure = tls is not None or (
        isinstance(endpoint, str) and endpoint.split(":", 1)[0].lower() in ("ssl", "tls")
    )
    if isinstance(endpoint, int):
        endpoint = endpoints.TCP4ServerEndpoint(reactor, endpoint, interface=interface)
    elif isinstance(endpoint, str):
        endpoint = endpoints.serverFromString(reactor, endpoint)
    elif not IStreamServerEndpoint.providedBy(endpoint):
        raise TypeError(f"not an endpoint: {endpoint!r}")
    site = make_site(platform, reactor, ping_interval=ping_interval, ping_timeout=ping_timeout)
    factory = site
    if tls is not None:
        factory = TLSMemoryBIOFactory(tls, False, site)
    tracker = ConnectionTracker(factory)

    def listening(port):
        address = port.getHost()
        host = getattr(address, "host", "127.0.0.1")
        if public_url:
            http_url = public_url.rstrip("/")
        else:
            http_url = f"{'https' if secure else 'http'}://{_format_host(host)}:{address.port}"
        ws_url = ("wss" if http_url.startswith("https") else "ws") + http_url[http_url.index(":"):]
        platform.set_urls(ws_url + platform.ws_path, http_url)
        log.info("platform listening on {url}", url=http_url)

        def close():
            return DeferredList([maybeDeferred(port.stopListening), tracker.drop_all()],
                                consumeErrors=True)

        platform.add_closer(close)
        return port

    return endpoint.listen(tracker).addCallback(listening)
