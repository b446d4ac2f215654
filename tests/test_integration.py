"""
The agent against the reference platform over a real loopback WebSocket,
with real child processes and real HTTP transfers.
"""

import base64
import hashlib
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web import resource, server

from everest_agent.handlers.local import group_alive
from tests.support import eventually, sleep, start_agent, start_platform


def b64(data):
    return base64.b64encode(data).decode()


class IntegrationTests(TestCase):
    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)

    async def connect(self, **kwargs):
        agent = start_agent(self, self.platform, **kwargs)
        await self.platform.wait_connected()
        return agent

    def assertClean(self):
        """Nothing the platform received broke the contract."""
        self.assertEqual(self.platform.violations, [])
        self.assertEqual(self.platform.duplicates, 0)

    async def test_happy_path_with_files(self):
        await self.connect()
        script = b"#!/bin/sh\ncat params.txt > result.txt\necho \"n=$(cat params.txt)\" >> result.txt\nmkdir -p out\necho a > out/x.dat\necho b > 'out/y z.dat'\n"
        self.platform.put_file("j1/run.sh", script)
        spec = {
            "command": "./run.sh && echo ok",
            "environment": {"MY_VAR": "value with 'quotes'"},
            "inputs": [
                {"path": "run.sh", "uri": self.platform.file_url("j1/run.sh"),
                 "sha256": hashlib.sha256(script).hexdigest(), "size": len(script), "executable": True},
                {"path": "params.txt", "data": b64(b"42")},
            ],
            "outputs": [
                {"path": "result.txt", "uri": self.platform.file_url("j1-1-0/result.txt")},
                {"path": "stdout", "uri": self.platform.file_url("j1-1-0/stdout"), "optional": True},
                {"path": "missing.txt", "uri": self.platform.file_url("j1-1-0/missing"), "optional": True},
                {"pattern": "out/*.dat", "uri": self.platform.file_url("j1-1-0") + "/"},
            ],
        }
        task_id = self.platform.submit(spec, task_id="j1-1-0")
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.states, ["ACCEPTED", "STAGING_IN", "RUNNING", "STAGING_OUT", "DONE"])
        info = record.info
        self.assertEqual(info["exitCode"], 0)
        result = b"42n=42\n"
        self.assertEqual(self.platform.get_file("j1-1-0/result.txt"), result)
        self.assertEqual(self.platform.get_file("j1-1-0/stdout"), b"ok\n")
        self.assertEqual(self.platform.get_file("j1-1-0/out/x.dat"), b"a\n")
        self.assertEqual(self.platform.get_file("j1-1-0/out/y z.dat"), b"b\n")
        outputs = {o["path"]: o for o in info["outputs"]}
        self.assertEqual(outputs["result.txt"], {"path": "result.txt", "size": len(result), "sha256": hashlib.sha256(result).hexdigest()})
        self.assertEqual(sorted(outputs), ["out/x.dat", "out/y z.dat", "result.txt", "stdout"])
        for key in ("stageInTime", "runTime", "stageOutTime", "seq", "time"):
            self.assertIn(key, info)
        # The token went with every request to the platform's own file store.
        self.assertTrue(all(authorized for _, _, authorized, _ in self.platform.file_requests))
        self.assertClean()
        # Resource state arrived after WELCOME.
        await eventually(lambda: self.platform.agent().resource is not None, what="RESOURCE_STATE")
        state = self.platform.agent().resource
        for key in ("time", "hostname", "handler", "slots", "busy", "queued", "load", "memory", "disk", "scheduler"):
            self.assertIn(key, state)
        self.assertEqual(state["handler"], "local")
        self.assertEqual(state["slots"], 2)

    async def test_nonzero_exit(self):
        await self.connect()
        task_id = self.platform.submit({
            "command": "echo before; exit 5",
            "outputs": [{"path": "stdout", "uri": self.platform.file_url("t/stdout")}],
        })
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.state, "FAILED")
        self.assertEqual(record.info["exitCode"], 5)
        self.assertEqual(record.info["reason"], "exit code 5")
        # Outputs of a failed task are still uploaded.
        self.assertEqual(self.platform.get_file("t/stdout"), b"before\n")
        self.assertClean()

    async def test_cancel_running_task(self):
        agent = await self.connect()
        task_id = self.platform.submit({"command": "sleep 100 & sleep 100 & wait"})
        await self.platform.wait_for(task_id, "RUNNING")
        worker = agent.manager.workers[task_id]
        pgid = worker.job.pid
        self.assertTrue(group_alive(pgid))
        self.platform.cancel(task_id)
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.state, "CANCELED")
        self.assertEqual(record.info["reason"], "canceled")
        await eventually(lambda: not group_alive(pgid), what="the task's process group to go")
        # Cancel of a finished task does nothing; it sends no error.
        self.platform.cancel(task_id)
        await sleep(0.1)
        self.assertEqual(self.platform.agent().errors, [])
        self.assertClean()

    async def test_time_limit(self):
        await self.connect()
        task_id = self.platform.submit({
            "command": "trap '' TERM; sleep 100",
            "resourceRequirements": {"timeLimit": 0.5},
        })
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.state, "FAILED")
        self.assertEqual(record.info["reason"], "time limit of 0.5 s exceeded")

    async def test_duplicate_submit(self):
        await self.connect()
        marker = os.path.abspath(self.mktemp())
        spec = {"command": f"echo run >> {marker}"}
        task_id = self.platform.submit(spec, task_id="dup-1-0")
        await self.platform.wait_for(task_id)
        self.platform.resubmit(task_id)
        await eventually(lambda: self.platform.task(task_id).repeats == 1, what="the state to be re-sent")
        with open(marker) as f:
            self.assertEqual(f.read(), "run\n")
        self.assertEqual(self.platform.task(task_id).state, "DONE")
        self.assertClean()

    async def test_errors_keep_the_connection(self):
        agent = await self.connect()
        session = self.platform.agent().session
        bad = [
            b"not json at all",
            b'{"an": "object"}',
            b'["NO_SUCH_TYPE", 1]',
            b'["TASK_CANCEL", "never-seen"]',
            b'["TASK_SUBMIT", "../../etc", {"command": "true"}]',
            b'["TASK_SUBMIT", ".hidden", {"command": "true"}]',
            b'["TASK_SUBMIT", "ok-1"]',
            b'["ACK", "nope"]',
        ]
        for payload in bad:
            self.platform.send_raw("agent", payload)
        await eventually(lambda: len(self.platform.agent().errors) >= len(bad), what="ERROR replies")
        codes = [e["code"] for e in self.platform.agent().errors]
        self.assertEqual(codes, ["malformed", "malformed", "unknown-type", "unknown-task",
                                 "invalid-task-id", "invalid-task-id", "invalid-message", "invalid-message"])
        self.assertEqual(self.platform.agent().errors[3]["taskId"], "never-seen")
        self.assertIs(self.platform.agent().session, session)
        # ... and a normal task still runs on the same connection.
        record = await self.platform.wait_for(self.platform.submit({"command": "true"}))
        self.assertEqual(record.state, "DONE")
        self.assertIs(self.platform.agent().session, session)
        self.assertEqual(agent.connection.retries, 0)

    async def test_escaping_paths_fail_the_task(self):
        await self.connect()
        specs = [
            {"command": "true", "inputs": [{"path": "../escape", "data": b64(b"x")}]},
            {"command": "true", "inputs": [{"path": "/etc/passwd", "data": b64(b"x")}]},
            {"command": "true", "outputs": [{"path": "../../etc/passwd", "uri": self.platform.file_url("x")}]},
        ]
        for spec in specs:
            record = await self.platform.wait_for(self.platform.submit(spec))
            self.assertEqual(record.states, ["ACCEPTED", "FAILED"])
            self.assertIn("task directory", record.info["reason"])
        # A symbolic link planted by the task itself is not followed out.
        secret = os.path.abspath(self.mktemp())
        with open(secret, "w") as f:
            f.write("secret")
        record = await self.platform.wait_for(self.platform.submit({
            "command": f"ln -s {secret} result.txt",
            "outputs": [{"path": "result.txt", "uri": self.platform.file_url("leak")}],
        }))
        self.assertEqual(record.state, "FAILED")
        self.assertIn("leads outside the task directory", record.info["reason"])
        self.assertFalse(os.path.exists(os.path.join(self.platform.files_dir, "leak")))

    async def test_checksum_mismatch(self):
        await self.connect()
        self.platform.put_file("in.txt", b"actual")
        record = await self.platform.wait_for(self.platform.submit({
            "command": "true",
            "inputs": [{"path": "in.txt", "uri": self.platform.file_url("in.txt"), "sha256": "0" * 64}],
        }))
        self.assertEqual(record.state, "FAILED")
        self.assertIn("checksum mismatch", record.info["reason"])

    async def test_unreachable_input(self):
        await self.connect()
        record = await self.platform.wait_for(self.platform.submit({
            "command": "true",
            "inputs": [{"path": "in.txt", "uri": "http://127.0.0.1:9/nothing"}],
        }))
        self.assertEqual(record.state, "FAILED")
        self.assertIn("GET http://127.0.0.1:9/nothing failed", record.info["reason"])

    async def test_token_only_to_platform_origin(self):
        seen = []

        class Recorder(resource.Resource):
            isLeaf = True

            def render_GET(self, request):
                seen.append(request.getHeader("authorization"))
                return b"other server\n"

        port = reactor.listenTCP(0, server.Site(Recorder()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        await self.connect()
        record = await self.platform.wait_for(self.platform.submit({
            "command": "cat other.txt",
            "inputs": [{"path": "other.txt", "uri": f"http://127.0.0.1:{port.getHost().port}/f"}],
        }))
        self.assertEqual(record.state, "DONE")
        self.assertEqual(seen, [None])

    async def test_allow_list_refusal(self):
        await self.connect(sections={"security": {"allowed_commands": "\n    echo [a-z]+"}})
        marker = os.path.abspath(self.mktemp())
        ok = await self.platform.wait_for(self.platform.submit({"command": "echo hello"}))
        refused = await self.platform.wait_for(self.platform.submit({"command": f"touch {marker}"}))
        self.assertEqual(ok.state, "DONE")
        self.assertEqual(refused.states, ["ACCEPTED", "FAILED"])
        self.assertIn("allowed_commands", refused.info["reason"])
        self.assertFalse(os.path.exists(marker))

    async def test_connection_dropped_mid_task(self):
        agent = await self.connect()
        marker = os.path.abspath(self.mktemp())
        task_id = self.platform.submit({"command": f"sleep 0.5; echo done >> {marker}"})
        await self.platform.wait_for(task_id, "RUNNING")
        pid = agent.manager.workers[task_id].job.pid
        self.platform.disconnect()
        await self.platform.wait_disconnected()
        # The task does not notice; the agent reconnects by itself.
        await self.platform.wait_connected()
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "DONE"])
        seqs = [info["seq"] for _, info in record.history]
        self.assertEqual(seqs, sorted(seqs))
        self.assertEqual(agent.manager.workers, {})
        with open(marker) as f:
            self.assertEqual(f.read(), "done\n")
        self.assertTrue(pid)
        self.assertClean()

    async def test_states_sent_while_disconnected_arrive_once_in_order(self):
        agent = await self.connect()
        tasks = [self.platform.submit({"command": "sleep 0.2"}) for _ in range(4)]
        await self.platform.wait_for(tasks[0], "RUNNING")
        # Keep the agent away for a while: its connection service stopped.
        await agent.connection.stopService()
        await self.platform.wait_disconnected()
        await eventually(lambda: all(agent.registry.get(t) and agent.registry.get(t).get("finished") for t in tasks),
                         what="the tasks to finish while disconnected")
        agent.connection.startService()
        for t in tasks:
            record = await self.platform.wait_for(t)
            self.assertEqual(record.state, "DONE")
            self.assertEqual(record.states[0], "ACCEPTED")
            self.assertEqual(len(record.states), len(set(record.states)))
        self.assertClean()
        await eventually(lambda: len(agent.outbox) == 0, what="every message to be acknowledged")

    async def test_token_rejected_is_not_hammered(self):
        agent = start_agent(self, self.platform, token="wrong-token")
        connects = []
        original = agent.factory.buildProtocol
        agent.factory.buildProtocol = lambda addr: (connects.append(addr), original(addr))[1]
        await sleep(1.5)
        # reconnect_initial_delay is 0.1 s in these tests: without the
        # 4001 rule this would be ~5 attempts; with it, one (next after 2 s).
        self.assertEqual(len(connects), 1)
        self.assertFalse(self.platform.connected("agent"))

    async def test_binary_frame_closes_and_agent_reconnects(self):
        await self.connect()
        first = self.platform.agent().session
        self.platform.send_raw("agent", b"\x00\x01", binary=True)
        await eventually(lambda: self.platform.agent().session not in (None, first), what="a new session")
        record = await self.platform.wait_for(self.platform.submit({"command": "true"}))
        self.assertEqual(record.state, "DONE")


class RestartTests(TestCase):
    """An agent stopped and started again on the same state directory."""

    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)

    async def test_local_task_survives_agent_restart(self):
        runs = os.path.abspath(self.mktemp())
        go = os.path.abspath(self.mktemp())
        agent = start_agent(self, self.platform)
        await self.platform.wait_connected()
        task_id = self.platform.submit({
            "command": f"echo run >> {runs}; while [ ! -e {go} ]; do sleep 0.02; done; echo out; exit 6",
            "outputs": [{"path": "stdout", "uri": self.platform.file_url("t/stdout")}],
        })
        await self.platform.wait_for(task_id, "RUNNING")
        pid = agent.manager.workers[task_id].job.pid
        await agent.stopService()
        await self.platform.wait_disconnected()
        self.assertTrue(group_alive(pid), "stopping the agent must leave the task running")
        again = start_agent(self, ini=agent.config.path)
        await self.platform.wait_connected()
        self.assertEqual(self.platform.agent().hello["tasks"], [task_id])
        open(go, "w").close()
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "STAGING_OUT", "FAILED"])
        self.assertEqual(record.info["exitCode"], 6)
        self.assertEqual(self.platform.get_file("t/stdout"), b"out\n")
        with open(runs) as f:
            self.assertEqual(f.read(), "run\n")
        self.assertEqual(self.platform.violations, [])
        self.assertIsNot(again, agent)

    async def test_stop_with_cancel(self):
        agent = start_agent(self, self.platform, sections={"agent": {"on_stop": "cancel"}})
        await self.platform.wait_connected()
        task_id = self.platform.submit({"command": "sleep 100"})
        await self.platform.wait_for(task_id, "RUNNING")
        pid = agent.manager.workers[task_id].job.pid
        await agent.stopService()
        self.assertFalse(group_alive(pid))
        # CANCELED was delivered before the connection closed.
        self.assertEqual(self.platform.task(task_id).state, "CANCELED")
        self.assertEqual(len(agent.outbox), 0)

    async def test_submit_while_stopping_is_kept(self):
        agent = start_agent(self, self.platform)
        await self.platform.wait_connected()
        agent.manager.stopping = True
        task_id = self.platform.submit({"command": "true"})
        await self.platform.wait_for(task_id, "ACCEPTED")
        await agent.stopService()
        start_agent(self, ini=agent.config.path)
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "DONE"])


class TLSTests(TestCase):
    """wss:// and https:// with the certificate and host name verified."""

    timeout = 30

    async def test_verified_tls_end_to_end(self):
        from tests.support import start_tls_platform

        platform, ca = await start_tls_platform(self)
        start_agent(self, platform, sections={"platform": {"ca_file": ca}})
        await platform.wait_connected()
        platform.put_file("in.txt", b"over tls\n")
        record = await platform.wait_for(platform.submit({
            "command": "cat in.txt",
            "inputs": [{"path": "in.txt", "uri": platform.file_url("in.txt")}],
            "outputs": [{"path": "stdout", "uri": platform.file_url("out.txt")}],
        }))
        self.assertEqual(record.state, "DONE", record.info)
        self.assertTrue(platform.file_url("x").startswith("https://localhost:"))
        self.assertEqual(platform.get_file("out.txt"), b"over tls\n")

    async def test_untrusted_certificate_is_refused(self):
        from tests.support import make_certificates, start_tls_platform

        platform, ca = await start_tls_platform(self)
        other_ca, _, _ = make_certificates(os.path.abspath(self.mktemp()))
        agent = start_agent(self, platform, sections={"platform": {"ca_file": other_ca}})
        await sleep(1.0)
        self.assertFalse(platform.connected("agent"))
        self.assertIsNone(platform.agent().hello)
        self.assertGreaterEqual(agent.connection.retries, 1)

    async def test_wrong_host_name_is_refused(self):
        from tests.support import start_tls_platform

        # A certificate from the trusted CA, but for another host name.
        platform, ca = await start_tls_platform(self, certificate_for="everest.example.org")
        start_agent(self, platform, sections={"platform": {"ca_file": ca}})
        await sleep(1.0)
        self.assertFalse(platform.connected("agent"))
        self.assertIsNone(platform.agent().hello)
