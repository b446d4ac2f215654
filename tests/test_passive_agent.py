"""
Passive mode wired into a real agent (contract, section 9): an in-process
agent service on the real reactor, clients over real loopback WebSockets
(Autobahn's, and a hand-written upgrade on a plain socket), files over real
HTTP, and the reference platform at the same time for the mixed case.
"""

import os
import socket
from urllib.parse import quote

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool
from zope.interface.verify import verifyObject

from everest_agent import config as agent_config, protocol
from everest_agent.agent import EverestAgent
from everest_agent.passive.server import SUBPROTOCOL, IPassiveTasks
from tests.support import TOKEN as PLATFORM_TOKEN, agent_ini, eventually, start_platform, write_private

CLIENT_TOKEN = "client-token-abcdef0123"


def credential(label="run-1", token=CLIENT_TOKEN):
    return f"EverestAgentClientToken {label}:{token}"


def passive_ini(test, platform=None, **passive):
    """An agent.ini with [passive] on (and [platform] only when C{platform} is given)."""
    root = os.path.abspath(test.mktemp())
    os.makedirs(root)
    tokens = write_private(os.path.join(root, "client-tokens"), f"# clients\n{CLIENT_TOKEN}\nsecond-token-xyz\n")
    keys = {"enabled": "yes", "listen": "127.0.0.1:0", "client_tokens_file": tokens}
    keys.update(passive)
    if platform is not None:
        return agent_ini(test, platform.ws_url, sections={"passive": keys})
    text = (
        "[agent]\n"
        f"work_dir = {os.path.join(root, 'tasks')}\nstate_dir = {os.path.join(root, 'state')}\n"
        "max_tasks = 2\nkill_grace = 1\n[handler]\ntype = local\n[passive]\n"
        + "".join(f"{k} = {v}\n" for k, v in keys.items())
    )
    return write_private(os.path.join(root, "agent.ini"), text)


def start(test, ini):
    agent = EverestAgent(agent_config.load(ini), reactor, fsync=False)
    agent.startService()

    def stop():
        if agent.running:
            return agent.stopService()

    test.addCleanup(stop)
    return agent


class _Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.factory.received.append(protocol.decode(payload))
        self.factory.changed()

    def onClose(self, wasClean, code, reason):
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(reason))
        if not self.factory.closed.called:
            self.factory.closed.callback(code)


class Client:
    """One passive session, real Autobahn client."""

    def __init__(self, test, base, header):
        url = base.replace("http", "ws", 1) + "/agent/ws"
        factory = WebSocketClientFactory(url, headers={"Authorization": header} if header else {},
                                         protocols=[SUBPROTOCOL])
        factory.protocol = _Client
        factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
        factory.received = []
        factory.changed = lambda: None
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)  # no timers left behind
        self.factory = factory
        self.connector = connectWS(factory)
        test.addCleanup(self.connector.disconnect)

    @property
    def received(self):
        return self.factory.received

    async def open(self):
        self.proto = await self.factory.opened
        return self

    def send(self, message):
        self.proto.sendMessage(protocol.encode(message))

    def states(self, task_id):
        return [m[2] for m in self.received if m[0] == "TASK_STATE" and m[1] == task_id]

    def errors(self):
        return [m[1] for m in self.received if m[0] == "ERROR"]

    async def wait_state(self, task_id, state, timeout=20):
        await eventually(lambda: state in self.states(task_id), timeout, f"{task_id} {state}")
        return [m for m in self.received if m[0] == "TASK_STATE" and m[1] == task_id and m[2] == state][-1]

    async def close(self):
        self.proto.sendClose()
        await self.factory.closed


def spec(command, keep=("out.txt",), **fields):
    s = {"command": command, "inputData": [], "outputData": [{"paths": list(keep)}] if keep else []}
    s.update(fields)
    return s


class PassiveAgentTestCase(TestCase):
    timeout = 60

    def setUp(self):
        self.http_pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.http_pool.closeCachedConnections)

    def start_passive(self, platform=None, **passive):
        self.agent = start(self, passive_ini(self, platform, **passive))
        host, port = self.agent.passive_listener.address
        self.base = f"http://{host}:{port}"
        return self.agent

    async def client(self, header=credential()):
        return await Client(self, self.base, header).open()

    def get(self, path, header=credential(), **headers):
        if header:
            headers["Authorization"] = header
        return treq.get(self.base + path, headers=headers, pool=self.http_pool)

    def task_dir(self, task_id):
        return self.agent.manager.task_dir(task_id)


class SessionTests(PassiveAgentTestCase):
    async def test_submit_states_staged_out_and_files(self):
        agent = self.start_passive()
        verifyObject(IPassiveTasks, agent.passive)
        c = await self.client()
        c.send(["TASK_SUBMIT", "p1", spec("seq 1 20000 > out.txt; echo done > log.txt",
                                           keep=("out.txt", "log.txt")), {"run": "r1"}])
        done = await c.wait_state("p1", "DONE")
        states = c.states("p1")
        self.assertEqual(states[0], "ACCEPTED")
        self.assertLess(states.index("STAGED_OUT"), states.index("DONE"))
        seqs = [m[3]["seq"] for m in c.received if m[0] == "TASK_STATE"]
        self.assertEqual(seqs, sorted(set(seqs)))
        staged = [m for m in c.received if m[0] == "TASK_STATE" and m[2] == "STAGED_OUT"][0]
        uris = {f["path"]: f["uri"] for f in staged[3]["outputData"]}
        self.assertEqual(uris["out.txt"], "/files/p1/out.txt")
        expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
        response = await self.get(uris["out.txt"])
        self.assertEqual(response.code, 200)
        self.assertEqual(response.length, len(expected))
        self.assertEqual(await response.content(), expected)
        response = await self.get(uris["out.txt"], Range="bytes=10-19")
        self.assertEqual(response.code, 206)
        self.assertEqual(await response.content(), expected[10:20])
        response = await self.get(uris["out.txt"], Range="bytes=-5")
        self.assertEqual(await response.content(), expected[-5:])
        self.assertEqual(done[3].get("seq"), seqs[-1])
        # Owned, and not the platform's business: nothing in the outbox, nothing for HELLO.
        self.assertEqual(len(agent.outbox), 0)
        self.assertEqual(agent.manager.hello_tasks(), [])
        self.assertEqual(agent.registry.get("p1")["owner"], agent.passive_listener.tokens.authenticate(credential()).owner)

    async def test_wrong_token_at_the_upgrade_raw_socket_and_autobahn(self):
        self.start_passive()
        host, port = self.agent.passive_listener.address

        def upgrade(authorization):
            sock = socket.create_connection((host, port), timeout=5)
            lines = ["GET /agent/ws HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                     "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", f"Sec-WebSocket-Protocol: {SUBPROTOCOL}"]
            if authorization:
                lines.append(f"Authorization: {authorization}")
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            data = b""
            while b"\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
            sock.close()
            return data.split(b"\r\n", 1)[0]

        for header in (None, credential(token="guess"), f"Bearer {CLIENT_TOKEN}", credential(label="")):
            status = await deferToThread(upgrade, header)
            self.assertIn(b" 401 ", status + b" ", header)
        self.assertIn(b" 101 ", await deferToThread(upgrade, credential()) + b" ")
        refused = Client(self, self.base, credential(token="guess"))
        await self.assertFailure(refused.factory.opened, ConnectionError)

    async def test_another_client_cannot_touch_a_task_or_its_files(self):
        self.start_passive()
        owner = await self.client(credential("run-1"))
        owner.send(["TASK_SUBMIT", "mine", spec("echo secret > out.txt")])
        await owner.wait_state("mine", "DONE")
        # Same token, another label: another credential.  Another token too.
        for header in (credential("run-2"), credential("run-1", "second-token-xyz")):
            other = await self.client(header)
            other.send(["TASK_CANCEL", "mine"])
            other.send(["TASK_MESSAGE", "mine", "hi"])
            other.send(["TASK_CANCEL", "never-was"])
            await eventually(lambda: len(other.errors()) == 3, what="three errors")
            codes = [e["code"] for e in other.errors()]
            self.assertEqual(codes, [protocol.E_UNKNOWN_TASK] * 3)
            # The refusal of another's task reads like that of a task that never was.
            self.assertEqual(other.errors()[0]["message"].replace("mine", "X"),
                             other.errors()[2]["message"].replace("never-was", "X"))
            other.send(["TASK_SUBMIT", "mine", spec("true")])  # its id is taken
            await eventually(lambda: len(other.errors()) == 4, what="submit refused")
            self.assertEqual(other.states("mine"), [])
            response = await self.get("/files/mine/out.txt", header)
            self.assertEqual(response.code, 403)
            self.assertNotIn(b"secret", await response.content())
            await other.close()
        self.assertEqual(self.agent.registry.get("mine")["state"], "DONE")
        response = await self.get("/files/mine/out.txt")
        self.assertEqual(await response.content(), b"secret\n")
        for header in (None, credential(token="guess")):
            response = await self.get("/files/mine/out.txt", header)
            self.assertEqual(response.code, 401)
            self.assertNotIn(b"secret", await response.content())

    async def test_paths_never_leave_the_task_directory(self):
        self.start_passive()
        outside = os.path.abspath(self.mktemp())
        with open(outside, "w") as f:
            f.write("outside secret\n")
        c = await self.client()
        c.send(["TASK_SUBMIT", "esc", spec(f"echo in > out.txt; ln -s {outside} link; ln -s .. up; "
                                          f"ln -s {os.path.dirname(outside)} d",
                                          keep=("out.txt",))])
        await c.wait_state("esc", "DONE")
        with open(os.path.join(os.path.dirname(self.task_dir("esc")), "neighbour"), "w") as f:
            f.write("neighbour secret\n")
        for path in ("/files/esc/../neighbour", "/files/esc/%2e%2e/neighbour", "/files/esc/..%2fneighbour",
                     "/files/esc/link", "/files/esc/up/esc/out.txt",
                     "/files/esc/d/" + os.path.basename(outside), "/files/esc/%2fetc%2fpasswd",
                     "/files/esc/" + quote(outside, safe="")):
            response = await self.get(path)
            body = await response.content()
            self.assertIn(response.code, (403, 404), path)
            self.assertNotIn(b"secret", body, path)
            self.assertNotIn(b"root:", body, path)
        response = await self.get("/files/esc/out.txt")
        self.assertEqual(await response.content(), b"in\n")

    async def test_disconnect_in_each_phase_and_reconnect(self):
        self.start_passive()
        gate = os.path.abspath(self.mktemp())
        command = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo ok > out.txt"
        c = await self.client()
        c.send(["TASK_SUBMIT", "r1", spec(command)])
        await c.wait_state("r1", "RUNNING")
        await c.close()
        # Reconnect while it runs: its current state.
        c = await self.client()
        await c.wait_state("r1", "RUNNING")
        await c.close()
        open(gate, "w").close()
        await eventually(lambda: self.agent.registry.get("r1")["state"] == "DONE", 20, "r1 done")
        # Reconnect after it ended while nobody listened: the outcome.
        c = await self.client()
        done = await c.wait_state("r1", "DONE")
        # (its STAGED_OUT first, with the outputData to fetch its files by)
        self.assertEqual(c.states("r1"), ["STAGED_OUT", "DONE"])
        # ACK covers it: the next session is not told again.
        c.send(["ACK", done[3]["seq"]])
        await eventually(lambda: self.agent.passive.acked, what="ack")
        c2 = await self.client()
        await c.close()
        c3 = await self.client()
        c3.send(["TASK_CANCEL", "r1"])  # finished: nothing to do, no error
        c3.send(["TASK_CANCEL", "nope"])
        await eventually(lambda: c3.errors(), what="an error")
        self.assertEqual(c3.states("r1"), [])
        self.assertEqual(c2.states("r1"), [])
        # A session that opened just before submitting (ACCEPTED phase) and left at once.
        c3.send(["TASK_SUBMIT", "r2", spec("echo two > out.txt")])
        await c3.close()
        await eventually(lambda: self.agent.registry.get("r2") and self.agent.registry.get("r2")["state"] == "DONE",
                         20, "r2 done")
        c4 = await self.client()
        await c4.wait_state("r2", "DONE")

    async def test_cancel_by_its_owner(self):
        self.start_passive()
        c = await self.client()
        c.send(["TASK_SUBMIT", "long", spec("sleep 30")])
        await c.wait_state("long", "RUNNING")
        c.send(["TASK_CANCEL", "long"])
        await c.wait_state("long", "CANCELED")

    async def test_flood_of_submits_is_bounded(self):
        self.start_passive(max_client_tasks="3", max_tasks="5")
        gate = os.path.abspath(self.mktemp())
        command = f"while [ ! -e {gate} ]; do sleep 0.05; done"
        a = await self.client(credential("a"))
        for i in range(50):
            a.send(["TASK_SUBMIT", f"a{i}", spec(command, keep=())])
        await eventually(lambda: len(a.errors()) == 47, what="47 refusals")
        self.assertEqual({e["code"] for e in a.errors()}, {"too-many-tasks"})
        self.assertIn("max_client_tasks", a.errors()[0]["message"])
        self.assertEqual(len([t for t in self.agent.registry.records if t.startswith("a")]), 3)
        b = await self.client(credential("b"))
        for i in range(5):
            b.send(["TASK_SUBMIT", f"b{i}", spec(command, keep=())])
        await eventually(lambda: len(b.errors()) == 3, 10, what="the agent-wide cap")
        self.assertIn("[passive] max_tasks", b.errors()[0]["message"])
        self.assertIsNone(a.factory.closed.called or None)  # the connection is kept
        open(gate, "w").close()
        await eventually(lambda: not self.agent.passive.unfinished_total, 30, "all ended")
        a.send(["TASK_SUBMIT", "again", spec("true", keep=())])
        await a.wait_state("again", "DONE")


class MixedTests(PassiveAgentTestCase):
    async def test_passive_and_active_at_once_see_only_their_own(self):
        platform = await start_platform(self, heartbeat=1)
        agent = self.start_passive(platform)
        await platform.wait_connected()
        c = await self.client()
        c.send(["TASK_SUBMIT", "passive-1", spec("echo p > out.txt")])
        active_id = platform.submit({"command": "echo a > a.txt", "outputs": []})
        await c.wait_state("passive-1", "DONE")
        await eventually(lambda: platform.tasks[active_id].state == "COMPLETED"
                         or platform.tasks[active_id].state == "DONE", 20, "active done")
        self.assertNotIn("passive-1", platform.tasks)
        self.assertEqual([m for m in c.received if m[1] == active_id], [])
        self.assertEqual(agent.manager.hello_tasks(), [] if True else None)
        self.assertNotIn("passive-1", agent.manager.hello_tasks())
        # The platform cannot reach the passive task either.
        self.assertEqual(agent.manager.owned(active_id), None)
        with self.assertRaises(protocol.ProtocolError):
            agent.manager.cancel("passive-1")
        with self.assertRaises(protocol.ProtocolError):
            agent.manager.submit("passive-1", {"command": "true"})
        self.assertEqual(platform.violations, [])

    async def test_no_platform_no_passive_is_an_error_naming_the_file(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        path = write_private(os.path.join(root, "agent.ini"), f"[agent]\nwork_dir = {root}/w\nstate_dir = {root}/s\n")
        with self.assertRaises(agent_config.ConfigError) as e:
            agent_config.load(path)
        self.assertIn(path, str(e.exception))
        self.assertIn("[passive]", str(e.exception))


class RestartTests(PassiveAgentTestCase):
    async def test_passive_task_survives_a_restart_and_seq_is_not_reused(self):
        ini = passive_ini(self)
        self.agent = agent = start(self, ini)
        host, port = agent.passive_listener.address
        self.base = f"http://{host}:{port}"
        gate = os.path.abspath(self.mktemp())
        c = await self.client()
        c.send(["TASK_SUBMIT", "keep", spec(f"while [ ! -e {gate} ]; do sleep 0.05; done; echo k > out.txt")])
        running = await c.wait_state("keep", "RUNNING")
        await agent.stopService()
        open(gate, "w").close()
        self.agent = agent = start(self, ini)
        host, port = agent.passive_listener.address
        self.base = f"http://{host}:{port}"
        c = await self.client()
        done = await c.wait_state("keep", "DONE")
        self.assertGreater(done[3]["seq"], running[3]["seq"])
        response = await self.get("/files/keep/out.txt")
        self.assertEqual(await response.content(), b"k\n")


class PassiveTLSTests(PassiveAgentTestCase):
    """[passive] tls_cert/tls_key: the session is wss:// and verified by the client."""

    intermediate = False

    def setUp(self):
        super().setUp()
        from tests.support import make_certificates

        self.ca, cert, key = make_certificates(os.path.abspath(self.mktemp()), intermediate=self.intermediate)
        os.chmod(key, 0o600)
        self.start_passive(tls_cert=cert, tls_key=key)
        host, port = self.agent.passive_listener.address
        self.url = f"wss://localhost:{port}/agent/ws"

    def connect(self, trust):
        from twisted.internet import ssl

        factory = WebSocketClientFactory(self.url, headers={"Authorization": credential()}, protocols=[SUBPROTOCOL])
        factory.protocol = _Client
        factory.opened, factory.closed = defer.Deferred(), defer.Deferred()
        factory.received = []
        factory.changed = lambda: None
        factory.setProtocolOptions(openHandshakeTimeout=0, closeHandshakeTimeout=0)
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        connector = connectWS(factory, contextFactory=options)
        self.addCleanup(connector.disconnect)
        return factory

    async def test_a_task_over_wss(self):
        from twisted.internet import ssl

        self.assertEqual(self.agent.passive_listener.scheme, "https")
        with open(self.ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        factory = self.connect(trust)
        proto = await factory.opened
        proto.sendMessage(protocol.encode(["TASK_SUBMIT", "s1", spec("echo secure > out.txt")]))
        await eventually(lambda: any(m[0] == "TASK_STATE" and m[2] == "DONE" for m in factory.received),
                         20, "s1 DONE over wss")
        staged = [m for m in factory.received if m[2] == "STAGED_OUT"][0]
        self.assertEqual([e["path"] for e in staged[3]["outputData"]], ["out.txt"])
        proto.sendClose()
        await factory.closed

    async def test_a_client_that_does_not_trust_the_certificate_gets_nothing(self):
        from twisted.internet import ssl

        factory = self.connect(ssl.platformTrust())  # the system's CAs: not ours
        with self.assertRaises(ConnectionError):
            await factory.opened
        self.assertEqual(self.agent.registry.records, {})

    async def test_plain_http_to_the_tls_port_is_refused(self):
        host, port = self.agent.passive_listener.address

        def plain():
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"GET /files/x/y HTTP/1.1\r\nHost: localhost\r\n\r\n")
                try:
                    return s.recv(100)
                except (ConnectionResetError, socket.timeout):
                    return b""

        answer = await deferToThread(plain)
        self.assertFalse(answer.startswith(b"HTTP/1.1 200"), answer)


class PassiveTLSChainTests(PassiveTLSTests):
    """
    The same with a certificate signed by an intermediate CA, the chain in
    tls_cert: clients that trust only the root verify it (the listener sends
    the intermediate).
    """

    intermediate = True
