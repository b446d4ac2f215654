"""
The passive-mode listener: one HTTP(S) site with the client WebSocket at
C{/agent/ws} and task outputs at C{/files/}.

The WebSocket upgrade is refused with HTTP 401 (no WebSocket at all) unless
it carries a valid C{EverestAgentClientToken}.  After it there is no
C{HELLO}/C{WELCOME}: the client sends C{TASK_SUBMIT} (with or without a
context), C{TASK_CANCEL}, C{TASK_MESSAGE} and C{ACK}; what it may act on is
decided by L{IPassiveTasks}, which knows the tasks and their owners.
"""

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import Attribute, Interface

from everest_agent import protocol
from everest_agent.passive.files import FilesResource

log = Logger(namespace="everest_agent.passive.server")

SUBPROTOCOL = "v1.agent.everest"
WS_PATH = (b"agent", b"ws")


class IPassiveTasks(Interface):
    """What passive sessions ask of the agent; every call names the client."""

    def session_opened(client, session):
        """
        A client's session is up: send it (C{session.send(message)}) the
        current state of each of its tasks.
        """

    def session_closed(client, session):
        """The session is gone."""

    def submit(client, task_id, spec, context):
        """C{TASK_SUBMIT} from C{client}."""

    def cancel(client, task_id):
        """C{TASK_CANCEL}; raises L{protocol.ProtocolError} for a task not the client's."""

    def deliver(client, task_id, text):
        """C{TASK_MESSAGE} to a task; raises like L{cancel}."""

    def ack(client, seq):
        """C{ACK}: the client has every message of its own up to C{seq}."""

    def lookup(task_id):
        """C{(owner, task_dir)} of a known task, or C{None}, for file requests."""


class ISession(Interface):
    client = Attribute("The L{everest_agent.passive.credentials.Client} of this session.")

    def send(message):
        """Send one message (a list) to the client now."""


def parse_client_message(message):
    """
    Check the shape of a decoded client -> agent message of a passive session.

    @return: C{(type, args)}: C{TASK_SUBMIT} gives C{(task_id, spec, context)}
        (C{context} C{None} when absent).
    @raise protocol.ProtocolError: for a wrong shape or a type not allowed here.
    """
    kind = message[0]
    if kind == protocol.TASK_SUBMIT:
        if len(message) not in (3, 4):
            raise protocol.ProtocolError(
                protocol.E_INVALID, f"TASK_SUBMIT takes 3 or 4 items, got {len(message)}"
            )
        task_id = protocol.check_task_id(message)
        if not isinstance(message[2], dict):
            raise protocol.ProtocolError(protocol.E_INVALID, "TASK_SUBMIT needs a spec object", task_id)
        context = message[3] if len(message) == 4 else None
        if context is not None and not isinstance(context, dict):
            raise protocol.ProtocolError(protocol.E_INVALID, "the context must be an object", task_id)
        return kind, (task_id, message[2], context)
    if kind in (protocol.TASK_CANCEL, protocol.TASK_MESSAGE, protocol.ACK):
        return protocol.parse_platform_message(message)
    raise protocol.ProtocolError(protocol.E_UNKNOWN_TYPE, f"unknown message type {kind[:64]!r}")


class PassiveServerProtocol(WebSocketServerProtocol):
    """One client's WebSocket session."""

    client = None
    _open = False

    def onConnect(self, request):
        client = self.factory.tokens.authenticate(request.headers.get("authorization"))
        if client is None:
            log.info("Refused a passive client from {peer}: no valid EverestAgentClientToken",
                     peer=self.peer)
            raise ConnectionDeny(401, "a valid EverestAgentClientToken is needed")
        if request.protocols and SUBPROTOCOL not in request.protocols:
            raise ConnectionDeny(ConnectionDeny.BAD_REQUEST, f"the subprotocol must be {SUBPROTOCOL}")
        self.client = client
        return SUBPROTOCOL if request.protocols else None

    def onOpen(self):
        self._open = True
        log.info("Passive client {client} connected from {peer}", client=self.client.label, peer=self.peer)
        self.factory.tasks.session_opened(self.client, self)

    def onMessage(self, payload, isBinary):
        if isBinary:
            # sendClose refuses codes below 3000 other than 1000.
            self.sendCloseFrame(code=1003, reasonUtf8=b"binary frames are not part of the protocol",
                                isReply=False)
            return
        try:
            kind, args = parse_client_message(protocol.decode(payload))
            self._dispatch[kind](self, *args)
        except protocol.ProtocolError as e:
            self.send(e.as_message())

    def _submit(self, task_id, spec, context):
        self.factory.tasks.submit(self.client, task_id, spec, context)

    def _cancel(self, task_id):
        self.factory.tasks.cancel(self.client, task_id)

    def _deliver(self, task_id, text):
        self.factory.tasks.deliver(self.client, task_id, text)

    def _ack(self, seq):
        self.factory.tasks.ack(self.client, seq)

    _dispatch = {
        protocol.TASK_SUBMIT: _submit,
        protocol.TASK_CANCEL: _cancel,
        protocol.TASK_MESSAGE: _deliver,
        protocol.ACK: _ack,
    }

    def send(self, message):
        if self._open and self.state == self.STATE_OPEN:
            self.sendMessage(protocol.encode(message))

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            # Autobahn leaves its handshake timers running when the peer
            # drops the TCP connection instead of answering.
            for name in ("closeHandshakeTimeoutCall", "openHandshakeTimeoutCall"):
                call = getattr(self, name, None)
                if call is not None:
                    call.cancel()
                    setattr(self, name, None)

    def onClose(self, wasClean, code, reason):
        if self._open:
            self._open = False
            log.info("Passive client {client} disconnected ({code})", client=self.client.label, code=code)
            self.factory.tasks.session_closed(self.client, self)


class PassiveServerFactory(WebSocketServerFactory):
    protocol = PassiveServerProtocol

    def __init__(self, tasks, tokens, reactor, ping_interval=30.0, ping_timeout=60.0):
        super().__init__(reactor=reactor, protocols=[SUBPROTOCOL])
        self.tasks = tasks
        self.tokens = tokens
        self.setProtocolOptions(
            maxFramePayloadSize=protocol.MAX_FRAME_SIZE,
            maxMessagePayloadSize=protocol.MAX_FRAME_SIZE,
            autoPingInterval=ping_interval,
            autoPingTimeout=ping_timeout,
            failByDrop=False,
            openHandshakeTimeout=10,
            closeHandshakeTimeout=5,
        )


def passive_site(tasks, tokens, reactor, pool, ping_interval=30.0, ping_timeout=60.0):
    """
    The passive listener's site: C{/agent/ws} and C{/files/<taskId>/<path>};
    anything else is 404.
    """
    factory = PassiveServerFactory(tasks, tokens, reactor, ping_interval, ping_timeout)
    root = resource.Resource()
    agent = resource.Resource()
    root.putChild(b"agent", agent)
    agent.putChild(b"ws", WebSocketResource(factory))
    root.putChild(b"files", FilesResource(reactor, pool, tokens, tasks.lookup))
    site = server.Site(root)
    site.displayTracebacks = False
    site.ws_factory = factory
    return site
