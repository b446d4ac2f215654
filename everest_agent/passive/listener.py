"""
The passive listener as a service of the agent's tree: the site of
L{everest_agent.passive.server.passive_site} on the configured address,
over TLS when a certificate and key are configured (C{wss://}, C{https://}).
"""

from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from everest_agent.passive.server import passive_site

log = Logger(namespace="everest_agent.passive.listener")


def tls_options(cert_file, key_file):
    """
    Server TLS options from PEM files (read once, at start): the first
    certificate of C{cert_file} is the listener's, the others its chain.
    """
    with open(cert_file, "rb") as f:
        pem = f.read()
    with open(key_file, "rb") as f:
        key = f.read()
    marker = b"-----END CERTIFICATE-----"
    blocks = [block + marker for block in pem.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]
    if not blocks:
        raise ValueError(f"{cert_file}: no PEM certificate in it")
    private = ssl.PrivateCertificate.loadPEM(blocks[0] + b"\n" + key)
    chain = [ssl.Certificate.loadPEM(block).original for block in blocks[1:]]
    return ssl.CertificateOptions(
        privateKey=private.privateKey.original, certificate=private.original, extraCertChain=chain or None,
    )


class PassiveListener(Service):
    """
    @param tasks: the L{everest_agent.passive.tasks.PassiveTasks}.
    @param settings: the C{[passive]} section (with its C{tokens}).
    """

    def __init__(self, tasks, settings, reactor):
        self.tasks = tasks
        self.settings = settings
        self.reactor = reactor
        self.port = None
        self.site = None
        # File requests open and read task files in threads of their own.
        self._pool = ThreadPool(minthreads=0, maxthreads=4, name="everest-passive-files")

    @property
    def url(self):
        """C{http(s)://host:port} of the listener, once listening."""
        if self.port is None:
            return None
        address = self.port.getHost()
        scheme = "https" if self.settings.tls_cert else "http"
        host = address.host if ":" not in address.host else f"[{address.host}]"
        return f"{scheme}://{host}:{address.port}"

    def startService(self):
        super().startService()
        settings = self.settings
        self._pool.start()
        self.site = passive_site(self.tasks, settings.tokens, self.reactor, self._pool,
                                 ping_interval=settings.ping_interval, ping_timeout=settings.ping_timeout)
        host, port = settings.listen
        if settings.tls_cert:
            options = tls_options(settings.tls_cert, settings.tls_key)
            self.port = self.reactor.listenSSL(port, self.site, options, interface=host)
        else:
            self.port = self.reactor.listenTCP(port, self.site, interface=host)
        log.info("Passive mode: clients connect to {url}/agent/ws", url=self.url)

    @defer.inlineCallbacks
    def stopService(self):
        super().stopService()
        if self.port is not None:
            yield self.port.stopListening()
        # Close the open client sessions: they reconnect to the next start.
        for session in list(getattr(self.tasks, "sessions", {}).values()):
            for protocol in list(session):
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.loseConnection()
        if self._pool.started:
            self._pool.stop()
