"""
The platform's WebSocket endpoint: an Autobahn server protocol that hands
each connection to a L{everest_agent.platform.core.Session}.
"""

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.logger import Logger

from everest_agent import wsframe
from everest_agent.protocol import MAX_FRAME_SIZE

log = Logger(namespace="everest_agent.platform.ws")


class PlatformServerProtocol(WebSocketServerProtocol):
    """
    One agent connection.  Implements the connection interface that
    L{everest_agent.platform.core.Session} uses.
    """

    session = None

    def onConnect(self, request):
        # Accept; the agent authenticates with HELLO.
        return None

    def onOpen(self):
        self.session = self.factory.platform.connection_made(self, peer=self.peer)

    def onMessage(self, payload, isBinary):
        if self.session is not None:
            self.session.receive(payload, isBinary)

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            # Autobahn leaves the closing-handshake timer running when the
            # peer drops the TCP connection instead of answering our close.
            call = getattr(self, "closeHandshakeTimeoutCall", None)
            if call is not None:
                call.cancel()
                self.closeHandshakeTimeoutCall = None
            session, self.session = self.session, None
            if session is not None:
                session.lost()

    # The connection interface used by Session.

    def platform_send(self, payload, binary):
        if self.state != self.STATE_OPEN:
            # Closing: the session hears of it from connectionLost; what it
            # sends meanwhile (a delayed ACK, say) is dropped, as on a wire.
            return
        if binary or len(payload) > MAX_FRAME_SIZE:
            # (Fault injection: a binary or an oversized frame.  Autobahn
            # frames it, and refuses what is over its limit.)
            self.sendMessage(payload, isBinary=binary)
            return
        # One text frame built in one go (see everest_agent.wsframe).
        self.transport.write(wsframe.text_frame(payload, masked=False))

    def platform_close(self, code, reason):
        reason_bytes = reason.encode("utf-8")[:123] if reason else None
        if self.state == self.STATE_OPEN:
            # sendClose refuses codes below 3000 other than 1000 (1003, 1008).
            self.sendCloseFrame(code=code, reasonUtf8=reason_bytes, isReply=False)
        else:
            self.dropConnection(abort=True)

    def platform_abort(self):
        if self.transport is not None:
            self.transport.abortConnection()


class PlatformServerFactory(WebSocketServerFactory):
    """
    @param platform: the L{everest_agent.platform.core.Platform}.
    @param ping_interval: seconds between WebSocket pings to the agent.
    @param ping_timeout: seconds to wait for a pong before dropping.
    """

    protocol = PlatformServerProtocol

    def __init__(self, platform, url=None, reactor=None, ping_interval=30, ping_timeout=60):
        super().__init__(url, reactor=reactor)
        self.platform = platform
        self.setProtocolOptions(
            maxFramePayloadSize=MAX_FRAME_SIZE,
            maxMessagePayloadSize=MAX_FRAME_SIZE,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            # Send a close frame (e.g. 1009 for an oversize frame) instead of
            # just dropping the TCP connection.
            failByDrop=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
        )
