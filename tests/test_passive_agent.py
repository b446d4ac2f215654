"""
Passive mode end to end: a real agent service in this process (real
reactor, real loopback listener), real Autobahn WebSocket clients, file
requests over real HTTP, and a raw socket client for the upgrade.
"""

import os
import socket

import treq
from twisted.internet import reactor, threads
from twisted.trial.unittest import TestCase

from everest_agent import config as agent_config
from tests.passive_support import (
    OTHER_TOKEN, auth, base_url, connect, passive_ini, spec, start_passive_agent,
)
from tests.support import eventually, start_platform, sleep


async def get(url, header=None, **headers):
    h = {k.replace("_", "-"): v for k, v in headers.items()}
    if header is not None:
        h["Authorization"] = header
    response = await treq.get(url, headers=h, reactor=reactor, persistent=False)
    body = await response.content()
    return response.code, body, response


class PassiveAgentTests(TestCase):
    timeout = 60

    async def test_submit_states_staged_out_and_files(self):
        agent = start_passive_agent(self)
        # Passive only: no connection to a platform in the service tree.
        self.assertIsNone(agent.connection)
        self.assertNotIn("platform", [r.name for r in agent])
        client = await connect(self, agent, auth("run-1"))
        client.send("TASK_SUBMIT", "t1", spec("printf 'hello passive world' > out.txt"), {"run": "r1"})
        done = await client.wait_state("t1", "DONE")
        states = client.states("t1")
        self.assertEqual(states[0], "ACCEPTED")
        self.assertLess(states.index("STAGED_OUT"), states.index("DONE"))
        seqs = [m[3]["seq"] for m in client.messages]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(len(set(seqs)), len(seqs))
        staged = await client.wait_state("t1", "STAGED_OUT")
        [entry] = staged[3]["outputData"]
        self.assertEqual(entry["uri"], "/files/t1/out.txt")
        self.assertEqual(entry["size"], len(b"hello passive world"))
        code, body, response = await get(base_url(agent) + entry["uri"], auth("run-1"))
        self.assertEqual((code, body), (200, b"hello passive world"))
        code, body, response = await get(base_url(agent) + entry["uri"], auth("run-1"), Range="bytes=6-12")
        self.assertEqual((code, body), (206, b"passive"))
        self.assertEqual(response.headers.getRawHeaders("content-range"), ["bytes 6-12/19"])
        # The platform knows nothing of it: no HELLO list, no outbox entry.
        self.assertEqual(agent.manager.hello_tasks(), [])
        self.assertEqual(len(agent.outbox), 0)
        from everest_agent import status

        self.assertEqual(status.hello_tasks(agent.registry.records, 0), [], "check's HELLO names no passive task")
        self.assertIsNotNone(done[3].get("seq"))
        self.assertEqual(agent.registry.get("t1")["owner"],
                         agent.config.passive.tokens.authenticate(auth("run-1")).owner)

    async def test_reconnect_learns_states_and_ack_stops_resending(self):
        agent = start_passive_agent(self)
        client = await connect(self, agent, auth("run-2"))
        client.send("TASK_SUBMIT", "a", spec("echo a > out.txt"))
        client.send("TASK_SUBMIT", "b", spec("sleep 1.5; echo b > out.txt"))
        await client.wait_state("b", "RUNNING")
        await client.close()
        # b finishes while nobody listens.
        await eventually(lambda: (agent.registry.get("b") or {}).get("state") == "DONE", 20, "b done")
        again = await connect(self, agent, auth("run-2"))
        await again.wait_state("b", "DONE")
        await again.wait_state("a", "DONE")
        self.assertIn("STAGED_OUT", again.states("b"))
        top = max(m[3]["seq"] for m in again.messages)
        again.send("ACK", top)
        await sleep(0.2)
        await again.close()
        third = await connect(self, agent, auth("run-2"))
        await sleep(0.5)
        self.assertEqual(third.messages, [], "everything was acknowledged")
        # Another label with the same token is another client: it sees nothing.
        other = await connect(self, agent, auth("run-3"))
        await sleep(0.3)
        self.assertEqual(other.messages, [])

    async def test_restart_keeps_states_and_seq_grows(self):
        ini = passive_ini(self)
        agent = start_passive_agent(self, ini=ini)
        client = await connect(self, agent, auth("run-4"))
        client.send("TASK_SUBMIT", "r1", spec("echo r > out.txt"))
        await client.wait_state("r1", "DONE")
        before = max(m[3]["seq"] for m in client.messages)
        await client.close()
        await agent.stopService()
        agent = start_passive_agent(self, ini=ini)
        client = await connect(self, agent, auth("run-4"))
        await client.wait_state("r1", "DONE")
        client.send("TASK_SUBMIT", "r2", spec("echo r > out.txt"))
        await client.wait_state("r2", "ACCEPTED")
        accepted = [m for m in client.messages if m[1] == "r2"][0]
        self.assertGreater(accepted[3]["seq"], before)

    async def test_upgrade_without_valid_token_is_401(self):
        agent = start_passive_agent(self)
        host, port = agent.passive_address()

        def raw(header):
            with socket.create_connection((host, port), timeout=5) as s:
                lines = [
                    "GET /agent/ws HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                    "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                    "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: v1.agent.everest",
                ]
                if header:
                    lines.append(f"Authorization: {header}")
                s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
                data = b""
                while b"\r\n" not in data:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                return data.split(b"\r\n", 1)[0]

        for header in (None, "EverestAgentClientToken run:wrong-token", "Bearer x", "EverestAgentClientToken nolabel"):
            status = await threads.deferToThread(raw, header)
            self.assertIn(b" 401", status, header)
        status = await threads.deferToThread(raw, auth("raw"))
        self.assertIn(b" 101", status)
        # The agent goes on serving.
        client = await connect(self, agent, auth("after"))
        client.send("TASK_SUBMIT", "ok", spec("true", keep=()))
        await client.wait_state("ok", "DONE")

    async def test_other_client_cannot_touch_a_task_or_its_files(self):
        agent = start_passive_agent(self)
        owner = await connect(self, agent, auth("owner"))
        owner.send("TASK_SUBMIT", "mine", spec("echo secret > out.txt; sleep 1"))
        await owner.wait_state("mine", "RUNNING")
        thief = await connect(self, agent, auth("thief", OTHER_TOKEN))
        thief.send("TASK_CANCEL", "mine")
        thief.send("TASK_MESSAGE", "mine", "hi")
        thief.send("TASK_CANCEL", "no-such-task")
        thief.send("TASK_SUBMIT", "mine", spec("true", keep=()))
        await eventually(lambda: len(thief.errors()) == 4, 5, "errors")
        errors = [e[1] for e in thief.errors()]
        # A task of another client and a task that does not exist: the same answer.
        self.assertEqual([e["code"] for e in errors], ["unknown-task", "unknown-task", "unknown-task", "task-id-taken"])
        self.assertEqual(errors[0]["message"].replace("mine", "X"), errors[2]["message"].replace("no-such-task", "X"))
        await owner.wait_state("mine", "DONE")
        self.assertNotIn("CANCELED", owner.states("mine"))
        self.assertEqual([m for m in thief.messages if m[0] != "ERROR"], [])
        url = base_url(agent) + "/files/mine/out.txt"
        code, body, _ = await get(url, auth("thief", OTHER_TOKEN))
        self.assertEqual(code, 403)
        self.assertNotIn(b"secret", body)
        code, body, _ = await get(url, auth("owner", "wrong-token"))
        self.assertEqual(code, 401)
        code, body, _ = await get(url)
        self.assertEqual(code, 401)
        code, body, _ = await get(url, auth("owner"))
        self.assertEqual((code, body), (200, b"secret\n"))
        # The thief's session is still up and usable.
        thief.send("TASK_SUBMIT", "theirs", spec("true", keep=()))
        await thief.wait_state("theirs", "DONE")

    async def test_paths_never_leave_the_task_dir(self):
        agent = start_passive_agent(self)
        secret = os.path.join(agent.config.agent.work_dir, "..", "secret.txt")
        with open(secret, "w") as f:
            f.write("TOP-SECRET-CONTENT")
        client = await connect(self, agent, auth("paths"))
        client.send("TASK_SUBMIT", "p", spec(f"echo in > out.txt; ln -s {os.path.abspath(secret)} link; "
                                             "mkdir d; ln -s ../.. d/up; ln -s .. d/in", keep=()))
        await client.wait_state("p", "DONE")
        base = base_url(agent) + "/files/p/"
        for path in ("../../secret.txt", "%2e%2e/%2e%2e/secret.txt", "..%2f..%2fsecret.txt",
                     "link", "d/up/secret.txt", "%2Fetc%2Fpasswd"):
            code, body, _ = await get(base + path, auth("paths"))
            self.assertEqual(code, 403, path)
            self.assertNotIn(b"TOP-SECRET", body, path)
        code, body, _ = await get(base + "out.txt", auth("paths"))
        self.assertEqual((code, body), (200, b"in\n"))
        # A link that stays inside is followed.
        code, body, _ = await get(base + "d/in/out.txt", auth("paths"))
        self.assertEqual((code, body), (200, b"in\n"))

    async def test_flood_of_submits_is_bounded(self):
        agent = start_passive_agent(self, passive={"max_unfinished": "5"})
        client = await connect(self, agent, auth("flood"))
        for i in range(200):
            client.send("TASK_SUBMIT", f"f{i}", spec("sleep 1", keep=()))
        await eventually(lambda: len(client.errors()) == 195, 10, "refusals")
        self.assertEqual({e[1]["code"] for e in client.errors()}, {"too-many-tasks"})
        self.assertEqual(len(agent.registry.records), 5)
        # Another credential is not starved by the flood.
        other = await connect(self, agent, auth("calm", OTHER_TOKEN))
        other.send("TASK_SUBMIT", "calm", spec("true", keep=()))
        await other.wait_state("calm", "DONE", timeout=30)
        # Once tasks finish, the flooding client may submit again.
        for i in range(5):
            await client.wait_state(f"f{i}", "DONE", timeout=30)
        client.send("TASK_SUBMIT", "later", spec("true", keep=()))
        await client.wait_state("later", "DONE")

    async def test_many_labels_share_one_total_cap(self):
        agent = start_passive_agent(self, passive={"max_unfinished": "3", "max_unfinished_total": "4"})
        clients = [await connect(self, agent, auth(f"label-{i}")) for i in range(3)]
        for i, client in enumerate(clients):
            for j in range(3):
                client.send("TASK_SUBMIT", f"L{i}-{j}", spec("sleep 0.5", keep=()))
        await eventually(lambda: sum(len(c.errors()) for c in clients) == 5, 10, "refusals")
        self.assertEqual(len(agent.registry.records), 4)
        self.assertEqual(agent.passive_tasks.total, 4)
        for task_id in sorted(agent.registry.records):
            await eventually(lambda: (agent.registry.get(task_id) or {}).get("state") == "DONE", 30, task_id)
        self.assertEqual(agent.passive_tasks.total, 0)
        self.assertEqual(dict(agent.passive_tasks.unfinished), {})

    async def test_bad_messages_keep_the_connection(self):
        agent = start_passive_agent(self)
        client = await connect(self, agent, auth("bad"))
        client.protocol.sendMessage(b"not json")
        client.send("HELLO", {})
        client.send("TASK_SUBMIT", "x")
        client.send("TASK_SUBMIT", "bad-spec", {"command": 5})
        await eventually(lambda: len(client.errors()) >= 3, 5, "errors")
        await client.wait_state("bad-spec", "FAILED")
        client.send("TASK_SUBMIT", "good", spec("true", keep=()))
        await client.wait_state("good", "DONE")


class PassiveAndActiveTests(TestCase):
    timeout = 60

    async def test_neither_side_sees_the_others_tasks(self):
        platform = await start_platform(self)
        agent = start_passive_agent(self, platform_url=platform.ws_url)
        await eventually(lambda: agent.sender.connected, 10, "platform connection")
        to_platform = []
        send = agent.sender._send
        agent.sender._send = lambda message: (to_platform.append(message), send(message))
        client = await connect(self, agent, auth("both"))
        client.send("TASK_SUBMIT", "passive-1", spec("echo p > out.txt"))
        platform.submit({"command": "echo a"}, task_id="active-1")
        await client.wait_state("passive-1", "DONE")
        await eventually(lambda: platform.tasks["active-1"].state == "DONE", 20, "active done")
        self.assertNotIn("passive-1", platform.tasks)
        self.assertIn("active-1", {m[1] for m in to_platform if m[0] == "TASK_STATE"})
        self.assertNotIn("passive-1", {m[1] for m in to_platform if len(m) > 1})
        self.assertNotIn("passive-1", agent.manager.hello_tasks())
        # The platform cannot cancel a passive task, nor take its id.
        from everest_agent.protocol import ProtocolError
        with self.assertRaises(ProtocolError):
            agent.manager.cancel("passive-1")
        with self.assertRaises(ProtocolError):
            agent.manager.submit("passive-1", {"command": "true"})
        self.assertEqual({m[1] for m in client.messages}, {"passive-1"})
        # A client cannot fetch the platform's tasks' files.
        code, _, _ = await get(base_url(agent) + "/files/active-1/x", auth("both"))
        self.assertEqual(code, 404)


class PassiveConfigTests(TestCase):
    def test_neither_mode_is_an_error_naming_the_file(self):
        ini = passive_ini(self, passive={"enabled": "no"})
        with self.assertRaises(agent_config.ConfigError) as e:
            agent_config.load(ini)
        self.assertIn(ini, str(e.exception))
        self.assertIn("[platform]", str(e.exception))

    def test_tokens_file_others_can_read_is_refused(self):
        ini = passive_ini(self)
        config = agent_config.load(ini)
        os.chmod(config.passive.client_tokens_file, 0o644)
        with self.assertRaises(agent_config.ConfigError) as e:
            agent_config.load(ini)
        self.assertIn("[passive] client_tokens_file", str(e.exception))
        self.assertIn("chmod 600", str(e.exception))

    def test_tls_needs_both_files(self):
        ini = passive_ini(self, passive={"tls_cert": "/nonexistent.pem"})
        with self.assertRaises(agent_config.ConfigError) as e:
            agent_config.load(ini)
        self.assertIn("[passive] tls_cert", str(e.exception))

    def test_unknown_key_is_refused(self):
        ini = passive_ini(self, passive={"colour": "blue"})
        with self.assertRaises(agent_config.ConfigError) as e:
            agent_config.load(ini)
        self.assertIn("[passive] colour: unknown key", str(e.exception))


class PassiveCheckAndStatusTests(TestCase):
    timeout = 30

    async def test_check_and_status_say_passive_mode_is_on(self):
        import io

        from everest_agent import check, status

        ini = passive_ini(self)
        out = io.StringIO()
        results = await check.run_checks(ini, reactor, out=out, min_free_state=0, min_free_work=0)
        [passive] = [r for r in results if r.name == "passive"]
        self.assertTrue(passive.ok)
        self.assertIn("ws://127.0.0.1:0/agent/ws", passive.message)
        self.assertNotIn("platform", [r.name for r in results])
        agent = start_passive_agent(self, ini=ini)
        lines = status.format_state(status.read_state(agent.config.agent.state_dir))
        self.assertIn(f"passive mode: on, clients connect to {base_url(agent)}/agent/ws", lines)


class DisconnectInEachPhaseTests(TestCase):
    """A client leaves while its task is in each phase and learns the rest on reconnecting."""

    timeout = 90

    async def test_disconnect_in_each_phase(self):
        from twisted.web import resource, server

        held = []

        class Hold(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                held.append(request)
                return server.NOT_DONE_YET

        port = reactor.listenTCP(0, server.Site(Hold()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        input_url = f"http://127.0.0.1:{port.getHost().port}/in"
        gate = os.path.abspath(self.mktemp())
        wait = f"while [ ! -e {gate} ]; do sleep 0.05; done; "
        agent = start_passive_agent(self)  # 2 slots
        header = auth("phases")
        plan = [
            ("acc", "ACCEPTED", spec(wait + "echo x > out.txt")),
            ("run", "RUNNING", spec(wait + "echo x > out.txt")),
            ("que", "QUEUED", spec("echo x > out.txt")),
            ("sin", "STAGING_IN", spec("cat in.txt > out.txt", inputData=[{"path": "in.txt", "uri": input_url}])),
        ]
        for task_id, phase, task_spec in plan:
            client = await connect(self, agent, header)
            client.send("TASK_SUBMIT", task_id, task_spec)
            await client.wait_state(task_id, phase)
            await client.close()
        # Everything ends while no session is open.
        open(gate, "w").close()
        await eventually(lambda: held, 10, "the held input request")
        for request in held:
            request.write(b"staged\n")
            request.finish()
        await eventually(lambda: all((agent.registry.get(t) or {}).get("state") == "DONE" for t, _, _ in plan),
                         30, "all done")
        client = await connect(self, agent, header)
        for task_id, _, _ in plan:
            done = await client.wait_state(task_id, "DONE")
            self.assertIn("STAGED_OUT", client.states(task_id))
            self.assertEqual(done[3].get("exitCode"), 0)
        code, body, _ = await get(base_url(agent) + "/files/sin/out.txt", header)
        self.assertEqual((code, body), (200, b"staged\n"))


class PassiveTlsTests(TestCase):
    timeout = 60

    async def test_wss_and_https_with_a_verified_certificate(self):
        from autobahn.twisted.websocket import WebSocketClientFactory, connectWS
        from twisted.internet import defer, ssl

        from tests import passive_support
        from tests.support import make_certificates

        root = os.path.abspath(self.mktemp())
        ca, cert, key = make_certificates(root)
        os.chmod(key, 0o600)
        agent = start_passive_agent(self, passive={"tls_cert": cert, "tls_key": key})
        self.assertTrue(base_url(agent).startswith("https://"))
        port = agent.passive_address()[1]
        with open(ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS("localhost", trustRoot=trust)
        factory = WebSocketClientFactory(f"wss://localhost:{port}/agent/ws", protocols=["v1.agent.everest"],
                                         headers={"Authorization": auth("tls")})
        factory.protocol = passive_support._Client
        factory.messages, factory.closed, factory.opened = [], None, defer.Deferred()
        connectWS(factory, contextFactory=options)
        client = passive_support.PassiveClient(await factory.opened, factory)
        self.addCleanup(lambda: factory.closed is None and client.close())
        client.send("TASK_SUBMIT", "tls", spec("echo over tls > out.txt"))
        staged = await client.wait_state("tls", "STAGED_OUT")
        await client.wait_state("tls", "DONE")
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        pool = HTTPConnectionPool(reactor, persistent=False)
        http = treq.client.HTTPClient(Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool))
        response = await http.get(f"https://localhost:{port}" + staged[3]["outputData"][0]["uri"],
                                  headers={"Authorization": auth("tls")})
        self.assertEqual((response.code, await response.content()), (200, b"over tls\n"))


class PassiveTaskChannelTests(TestCase):
    timeout = 60

    async def test_task_messages_go_to_the_owner_only(self):
        import sys

        from tests.test_channel import TASK_OPENING

        agent = start_passive_agent(self, sections={"task_channel": {"enabled": "yes"}})
        script = os.path.abspath(self.mktemp())
        with open(script, "w") as f:
            f.write(TASK_OPENING + 'send(s, b"hello owner")\nopen("out.txt", "wb").write(recv(s))\n')
        owner = await connect(self, agent, auth("chan"))
        other = await connect(self, agent, auth("chan", OTHER_TOKEN))
        owner.send("TASK_SUBMIT", "ch", spec(f"{sys.executable} {script}"))
        await eventually(lambda: any(m[0] == "TASK_MESSAGE" for m in owner.messages), 20, "the task's message")
        [message] = [m for m in owner.messages if m[0] == "TASK_MESSAGE"]
        self.assertEqual(message[1:3], ["ch", "hello owner"])
        self.assertIsInstance(message[3]["seq"], int)
        other.send("TASK_MESSAGE", "ch", "from a stranger")
        await eventually(lambda: other.errors(), 5, "the stranger's error")
        owner.send("TASK_MESSAGE", "ch", "hi task")
        await owner.wait_state("ch", "DONE")
        code, body, _ = await get(base_url(agent) + "/files/ch/out.txt", auth("chan"))
        self.assertEqual((code, body), (200, b"hi task"))
        self.assertEqual([m for m in other.messages if m[0] != "ERROR"], [])
        self.assertEqual(len(agent.outbox), 0)
