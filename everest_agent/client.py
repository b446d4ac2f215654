"""
The WebSocket connection to the platform.

L{AgentProtocolClient} is deliberately thin: it says C{HELLO}, decodes each
frame and dispatches it through a dict to the agent's parts; the work lives
elsewhere.  L{AgentClientFactory} is Autobahn's client factory with the
session's options.  L{ConnectionService} is Twisted's L{ClientService} over
L{platform_endpoint} (TCP, and for C{wss://} TLS verified with
C{optionsForClientTLS}); the agent and C{everest-agent check} both connect
through it.  Its retry policy, L{Backoff}, is reset only by C{WELCOME}, so
a platform that keeps rejecting the token is retried at the capped delay
instead of every second.  The service closes the session cleanly (1000)
when it stops.
"""

import random
from urllib.parse import urlsplit

from autobahn.exception import PayloadExceededError
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.application.internet import ClientService
from twisted.internet import defer, ssl
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from everest_agent import protocol, wsframe
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
        self.send_payload(protocol.encode(message))

    def send_payload(self, payload):
        """
        Send one message already encoded (L{protocol.encode}): the outbox
        encodes each reliable message once, for its journal and the wire.

        @raise PayloadExceededError: if it is larger than a frame may be.
        """
        if self.state != self.STATE_OPEN:
            return  # closing: reliable messages stay in the outbox for the next session
        if len(payload) > protocol.MAX_FRAME_SIZE:
            raise PayloadExceededError(
                f"a {len(payload)}-byte message is larger than the {protocol.MAX_FRAME_SIZE}-byte frame limit")
        self.send_text(payload)

    def send_text(self, payload):
        """Write one masked text frame (see L{everest_agent.wsframe}) to the connection."""
        self.transport.write(wsframe.text_frame(payload, masked=True))

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

    def connectionLost(self, reason):
        self._report_tls_failure(reason)
        super().connectionLost(reason)

    def _report_tls_failure(self, reason):
        tls = describe_tls_error(reason.value)
        if tls is not None:
            # The certificate or host name did not verify: say so, not just "1006".
            self.factory.failed(f"TLS: {tls}")

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


class AgentClientFactory(WebSocketClientFactory):
    """
    Autobahn client factory for the agent's sessions: protocol options, the
    open session (L{current}) and the L{Backoff} that L{ConnectionService}
    waits by between attempts (reset by C{WELCOME}, at its cap after 4001).
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
        self.backoff = Backoff(initial_delay, max_delay, factor)
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
        self.backoff.reset()

    def back_off_fully(self):
        """The next retries wait the longest delay (token or version refused)."""
        self.backoff.refused()

    def lost(self, proto):
        if self.current is proto:
            self.current = None

    def failed(self, error):
        """A connection attempt failed before the WebSocket opened (refused, TLS...)."""
        self.agent_log.info("Cannot connect to {url}: {reason}", url=self.url, reason=str(error))
        self.agent.connection_failed(str(error))


class Backoff:
    """
    The delay before the next connection attempt: C{initial}, then C{factor}
    times longer each time up to C{maximum}, each with a 10 % normal jitter.

    Used as L{ClientService}'s C{retryPolicy}, but it keeps its own count:
    L{ClientService} counts a TCP connection as a success, while for the
    agent only C{WELCOME} is one (L{reset}); a platform that accepts TCP and
    refuses the session is otherwise retried every C{initial} seconds.
    """

    log = Logger()

    def __init__(self, initial=1.0, maximum=60.0, factor=2.0, jitter=0.1):
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self.retries = 0  # attempts since the last WELCOME
        self._refused = False

    def delay(self):
        """The delay the next retry would wait, before jitter."""
        if self._refused:
            return self.maximum
        try:
            return min(self.initial * self.factor ** self.retries, self.maximum)
        except OverflowError:
            return self.maximum

    def __call__(self, failed_in_a_row=None):
        delay = self.delay()
        self.retries += 1
        if self.jitter:
            delay = max(0.0, random.normalvariate(delay, delay * self.jitter))
        self.log.info("Reconnecting in {delay:.1f} s", delay=delay)
        return delay

    def refused(self):
        """The platform refused the agent (4001, 4002): wait the longest delay until C{WELCOME}."""
        self._refused = True

    def reset(self):
        self.retries = 0
        self._refused = False


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


def platform_endpoint(reactor, url, ca_file=None, timeout=30):
    """
    The endpoint for the platform's C{ws://} or C{wss://} C{url}.

    For C{wss://} the certificate and host name are verified against
    C{ca_file} (a PEM bundle) or the system's trust store; there is no
    switch to turn that off.

    @raise ValueError: C{ca_file} holds no certificate.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme == "wss":
        tcp = HostnameEndpoint(reactor, host, parts.port or 443, timeout=timeout)
        return wrapClientTLS(ssl.optionsForClientTLS(host, trustRoot=trust_root(ca_file)), tcp)
    return HostnameEndpoint(reactor, host, parts.port or 80, timeout=timeout)


def describe_tls_error(error):
    """A TLS handshake failure in words (OpenSSL's reasons), or C{None} if C{error} is not one."""
    try:
        from OpenSSL import SSL
    except ImportError:  # pragma: no cover
        SSL = None
    if SSL is not None and isinstance(error, SSL.Error):
        parts = []
        for item in error.args[0] if error.args and isinstance(error.args[0], list) else []:
            if isinstance(item, tuple) and item:
                parts.append(str(item[-1]))
        return ", ".join(p for p in parts if p) or str(error) or "TLS handshake failed"
    name = type(error).__name__
    if name in ("VerificationError", "CertificateError"):
        return f"the certificate does not match the host name ({error})"
    return None


@implementer(IStreamClientEndpoint)
class _ReportFailures:
    """An endpoint that tells C{report} why each connection attempt failed."""

    def __init__(self, endpoint, report):
        self._endpoint = endpoint
        self._report = report

    def connect(self, factory):
        def failed(reason):
            if not reason.check(defer.CancelledError):
                self._report(reason)
            return reason

        return self._endpoint.connect(factory).addErrback(failed)


class ConnectionService(ClientService):
    """
    One WebSocket session to the platform at a time, the same way for the
    agent and for C{everest-agent check}: Twisted's L{ClientService} over
    L{platform_endpoint}, retrying after C{retry_policy} (the factory's
    L{Backoff} unless given), and closing the session with 1000 when the
    service stops.

    @ivar factory: the Autobahn client factory; its C{current} attribute is
        the open protocol, if any, and its C{failed(reason)} (if it has one)
        hears of each failed attempt.
    """

    log = Logger()
    close_timeout = 5.0

    def __init__(self, factory, url, reactor, ca_file=None, *, retry_policy=None, timeout=30, endpoint=None):
        self.factory = factory
        self.url = url
        self._reactor = reactor
        if endpoint is None:  # tests pass their own
            endpoint = platform_endpoint(reactor, url, ca_file, timeout)
        endpoint = _ReportFailures(endpoint, self._attempt_failed)
        if retry_policy is None:
            retry_policy = factory.backoff
        self.retry_policy = retry_policy
        ClientService.__init__(self, endpoint, factory, retryPolicy=retry_policy, clock=reactor)

    @property
    def retries(self):
        """Retries scheduled since the last C{WELCOME} (if the policy counts them)."""
        return getattr(self.retry_policy, "retries", 0)

    def _attempt_failed(self, reason):
        failed = getattr(self.factory, "failed", None)
        if failed is not None:
            failed(reason.value)

    def startService(self):
        self.log.info("Connecting to {url}", url=self.url)
        ClientService.startService(self)

    def stopService(self):
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self):
        proto = self.factory.current
        if proto is not None and proto.state in (proto.STATE_OPEN, proto.STATE_CONNECTING):
            closed = defer.Deferred()
            original = proto.onClose

            def on_close(*args):
                original(*args)
                if not closed.called:
                    closed.callback(None)

            proto.onClose = on_close
            if proto.state == proto.STATE_OPEN:
                proto.sendClose(1000, "agent stopping")
            else:  # the handshake is still under way: nothing to close cleanly
                proto.dropConnection(abort=True)
            # Do not wait forever for a platform that does not answer the close.
            timer = self._reactor.callLater(self.close_timeout, lambda: proto.dropConnection(abort=True))
            try:
                await closed
            finally:
                if timer.active():
                    timer.cancel()
        await ClientService.stopService(self)
