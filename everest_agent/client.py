"""
The WebSocket connection to the platform.

L{AgentProtocolClient} is deliberately thin: it says C{HELLO}, decodes each
frame and dispatches it through a dict to the agent's parts; the work lives
elsewhere.  L{AgentClientFactory} mixes Autobahn's client factory with
Twisted's L{ReconnectingClientFactory}: the backoff delay is reset only after
C{WELCOME}, so a platform that keeps rejecting the token is retried at the
capped delay instead of every second.  L{ConnectionService} owns the
connector and closes the session cleanly when the agent stops.
"""

from urllib.parse import urlsplit

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.service import Service
from twisted.internet import defer, ssl
from twisted.internet.protocol import ReconnectingClientFactory
from twisted.logger import Logger

from everest_agent import protocol
from everest_agent.protocol import ProtocolError


class AgentProtocolClient(WebSocketClientProtocol):
    agent_log = Logger()  # not 'log': Autobahn's own debug logging uses that name

    welcomed = False
    _welcome_timer = None

    def onOpen(self):
        agent = self.factory.agent
        self._dispatch = agent.dispatch_table()
        self.send([protocol.HELLO, agent.hello()])
        self._welcome_timer = self.factory.clock.callLater(
            self.factory.welcome_timeout, self._no_welcome
        )

    def _no_welcome(self):
        self._welcome_timer = None
        self.agent_log.warn("No WELCOME within {timeout} s; reconnecting", timeout=self.factory.welcome_timeout)
        self.dropConnection(abort=True)

    def send(self, message):
        if self.state != self.STATE_OPEN:
            return  # closing: reliable messages stay in the outbox for the next session
        self.sendMessage(protocol.encode(message), isBinary=False)

    def onMessage(self, payload, isBinary):
        if isBinary:
            self.agent_log.warn("Binary frame from the platform; closing the connection")
            # 1003 (unsupported data) is for the protocol layer to send;
            # Autobahn's sendClose only takes application codes.
            self._fail_connection(1003, "binary frames are not part of the protocol")
            return
        try:
            kind, args = protocol.parse_platform_message(protocol.decode(payload))
            if kind == protocol.WELCOME:
                self._on_welcome(*args)
            elif not self.welcomed:
                self.agent_log.warn("Ignoring {kind} received before WELCOME", kind=kind)
            else:
                self._dispatch[kind](*args)
        except ProtocolError as e:
            self.factory.agent.sender.error(e)
        except Exception:
            # A bug in handling one message must not take the session down.
            self.agent_log.failure("Unexpected error handling a platform message")

    def _on_welcome(self, info):
        if self.welcomed:
            raise ProtocolError(protocol.E_INVALID, "WELCOME received twice")
        self.welcomed = True
        if self._welcome_timer is not None:
            self._welcome_timer.cancel()
            self._welcome_timer = None
        self.factory.welcomed()
        self.factory.agent.welcomed(self, info)

    def onClose(self, wasClean, code, reason):
        self.factory.agent.connection_closed(code, reason)
        if self._welcome_timer is not None:
            self._welcome_timer.cancel()
            self._welcome_timer = None
        if code in (protocol.CLOSE_INVALID_TOKEN, protocol.CLOSE_UNSUPPORTED_PROTOCOL):
            self.agent_log.error(
                "The platform refused this agent ({code}: {why}); retrying at the "
                "longest delay. Check [platform] token/token_file and the agent version.",
                code=code, why=protocol.CLOSE_REASONS[code],
            )
            self.factory.back_off_fully()
        elif code in protocol.CLOSE_REASONS:
            self.agent_log.warn(
                "The platform closed the connection ({code}: {why})",
                code=code, why=protocol.CLOSE_REASONS[code],
            )
        else:
            self.agent_log.info(
                "Connection closed (code {code}, {reason})",
                code=code, reason=reason or "no reason given",
            )
        if self.welcomed:
            self.factory.agent.connection_lost(self)
        self.factory.lost(self)


class AgentClientFactory(WebSocketClientFactory, ReconnectingClientFactory):
    """
    Autobahn client factory that reconnects with jittered exponential backoff.
    """

    agent_log = Logger()  # not 'log': Autobahn's own debug logging uses that name
    protocol = AgentProtocolClient
    noisy = False

    def __init__(self, agent, url, reactor, *, ping_interval=30.0, ping_timeout=60.0,
                 initial_delay=1.0, max_delay=60.0, factor=2.0, welcome_timeout=30.0):
        WebSocketClientFactory.__init__(
            self, url, useragent=agent.user_agent, reactor=reactor
        )
        self.agent = agent
        self.clock = reactor
        self.welcome_timeout = welcome_timeout
        self.initialDelay = self.delay = initial_delay
        self.maxDelay = max_delay
        self.factor = factor
        self.jitter = 0.1
        self.current = None  # the open protocol, if any
        self.setProtocolOptions(
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            maxFramePayloadSize=protocol.MAX_FRAME_SIZE,
            maxMessagePayloadSize=protocol.MAX_FRAME_SIZE,
            openHandshakeTimeout=30,
            closeHandshakeTimeout=5,
            # Close with a code (1009 for an oversized frame, 1003 for a
            # binary one) instead of just dropping TCP; ERROR replies still
            # queued are then delivered first.
            failByDrop=False,
        )

    def buildProtocol(self, addr):
        proto = WebSocketClientFactory.buildProtocol(self, addr)
        self.current = proto
        return proto

    def welcomed(self):
        # resetDelay() also turns retrying back on: not after stopTrying().
        if self.continueTrying:
            self.resetDelay()

    def back_off_fully(self):
        """The next retries wait the longest delay (token or version refused)."""
        self.delay = self.maxDelay

    def lost(self, proto):
        if self.current is proto:
            self.current = None

    def clientConnectionFailed(self, connector, reason):
        self.agent_log.info("Cannot connect to {url}: {reason}", url=self.url, reason=reason.getErrorMessage())
        self.agent.connection_failed(reason.getErrorMessage())
        self._retry(connector)

    def clientConnectionLost(self, connector, reason):
        self._retry(connector)

    def _retry(self, connector):
        self.retry(connector)
        if self._callID is not None:
            self.agent_log.info(
                "Reconnecting in {delay:.1f} s", delay=self._callID.getTime() - self.clock.seconds()
            )


def load_ca_bundle(ca_file):
    """All certificates of a PEM bundle, as a trust root."""
    from OpenSSL import crypto

    with open(ca_file, "rb") as f:
        data = f.read()
    certificates = []
    marker = b"-----END CERTIFICATE-----"
    for chunk in data.split(marker)[:-1]:
        pem = chunk[chunk.index(b"-----BEGIN CERTIFICATE-----"):] + marker
        certificates.append(ssl.Certificate(crypto.load_certificate(crypto.FILETYPE_PEM, pem)))
    if not certificates:
        raise ValueError(f"{ca_file} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


def trust_root(ca_file=None):
    """The CA bundle C{ca_file} if given, else the system's trust store."""
    return load_ca_bundle(ca_file) if ca_file else ssl.platformTrust()


class ConnectionService(Service):
    """
    Keeps the agent connected to the platform while it runs.
    """

    log = Logger()

    def __init__(self, factory, url, reactor, ca_file=None):
        self.factory = factory
        self.url = url
        self._reactor = reactor
        self._ca_file = ca_file
        self.connector = None

    def startService(self):
        super().startService()
        parts = urlsplit(self.url)
        host = parts.hostname
        if parts.scheme == "wss":
            port = parts.port or 443
            # Certificate and host name verified; there is no switch to turn it off.
            options = ssl.optionsForClientTLS(host, trustRoot=trust_root(self._ca_file))
            self.connector = self._reactor.connectSSL(host, port, self.factory, options, timeout=30)
        else:
            port = parts.port or 80
            self.connector = self._reactor.connectTCP(host, port, self.factory, timeout=30)
        self.log.info("Connecting to {url}", url=self.url)

    def stopService(self):
        super().stopService()
        self.factory.stopTrying()
        proto = self.factory.current
        if proto is None:
            if self.connector is not None:
                self.connector.disconnect()
            return defer.succeed(None)
        done = defer.Deferred()
        original = proto.onClose

        def on_close(*args):
            original(*args)
            if not done.called:
                done.callback(None)

        proto.onClose = on_close
        proto.sendClose(1000, "agent stopping")
        # Do not wait forever for a platform that does not answer the close.
        timer = self._reactor.callLater(5, lambda: proto.dropConnection(abort=True))
        done.addBoth(lambda r: timer.active() and timer.cancel())
        return done
