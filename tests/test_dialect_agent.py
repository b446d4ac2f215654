"""
The Everest dialect (contract, section 8) end to end over the active
connection: the reference platform over a real loopback WebSocket, a real
agent running real processes, the platform's file store and a second real
HTTP server that records every request's headers.
"""

import hashlib
import json
import os
from urllib.parse import quote

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from treq.client import HTTPClient

from tests.support import TOKEN, eventually, start_agent, start_platform
from tests.test_transfer_stager import FileServer, serve

CLIENT_AUTH = "EverestAgentClientToken run-1:client-secret"
VAR = "EVEREST_DIALECT_TEST_VALUE"
UNSET = "EVEREST_DIALECT_TEST_NEVER_SET"


def sha(data):
    return hashlib.sha256(data).hexdigest()


class DialectAgentTests(TestCase):
    timeout = 60

    async def setUp(self):
        self.platform = await start_platform(self, heartbeat=1)
        self.other = FileServer()
        self.other_base = serve(self, self.other)
        os.environ[VAR] = "/opt/v"
        self.addCleanup(os.environ.pop, VAR, None)
        os.environ.pop(UNSET, None)
        self.agent = start_agent(self, self.platform)
        await self.platform.wait_connected()
        self.session = self.platform.agent().session

    def assertClean(self):
        self.assertEqual(self.platform.violations, [])
        self.assertEqual(self.platform.duplicates, 0)
        self.assertIs(self.platform.agent().session, self.session)  # the connection kept

    def task_file(self, task_id, rel):
        with open(os.path.join(self.agent.config.agent.work_dir, task_id, rel), "rb") as f:
            return f.read()

    async def test_every_field(self):
        self.platform.put_file("j1/run.sh", (
            b"cat in/a.txt in/b.txt in/c.txt > result.txt\n"
            b'printf "%s|%s|%s" "$A" "$B" "$C" > env.txt\n'
            b"mkdir -p out kept\necho x > out/x.dat\necho 'y z' > 'out/y z.dat'\n"
            + "printf 'u' > 'out/ü %.dat'\n".encode() +
            b"head -c 3000000 /dev/zero > kept/big.bin\necho k > kept/k.bin\necho s > stays.txt\n"
        ))
        self.platform.put_file("j1/a.txt", b"A-")
        self.platform.put_file("j1/b.txt", b"B-")
        self.other.files["/shared/c.txt"] = b"C"
        base = self.platform.file_url("j1-1-0") + "/"
        spec = {
            "name": "every field",
            "command": "sh run.sh",
            "inputData": [
                {"path": "run.sh", "uri": self.platform.file_url("j1/run.sh")},
                # auth with the platform's own origin: sent instead of the agent's token.
                {"path": "in/a.txt", "uri": self.platform.file_url("j1/a.txt"),
                 "auth": "Bearer " + self.platform.api_token},
                {"path": "in/b.txt", "uri": self.platform.file_url("j1/b.txt")},
                {"path": "in/c.txt", "uri": self.other_base + "/shared/c.txt", "auth": CLIENT_AUTH},
            ],
            "outputData": [
                {"paths": ["result.txt", "env.txt", "out/*.dat", "no-such-*"], "uri": base},
                {"paths": ["kept/*.bin", "stays.txt", "absent.txt"]},
            ],
            "environment": {"A": f"${VAR}/lib", "B": f"${{{VAR}}}@PATH_SEP/usr/lib", "C": f"[${UNSET}]"},
        }
        context = {"workflow": "w1", "node": {"n": 3, "deps": ["a", "b"]}}
        task_id = self.platform.submit(spec, task_id="j1-1-0", context=context)
        record = await self.platform.wait_for(task_id)
        self.assertEqual(record.states,
                         ["ACCEPTED", "STAGING_IN", "RUNNING", "STAGING_OUT", "STAGED_OUT", "DONE"],
                         record.info)
        # Inputs: the platform saw the agent's token on b only, the API token on a.
        credentials = {path: who for method, path, who in self.platform.file_credentials if method == "GET"}
        self.assertEqual(credentials["j1/run.sh"], "agent agent")
        self.assertEqual(credentials["j1/a.txt"], "api")
        self.assertEqual(credentials["j1/b.txt"], "agent agent")
        [c] = [r for r in self.other.requests if r.path == "/shared/c.txt"]
        self.assertEqual(c.headers["authorization"], CLIENT_AUTH)
        self.assertNotIn(TOKEN, json.dumps(c.headers))
        self.assertEqual(self.platform.get_file("j1-1-0/result.txt"), b"A-B-C")
        # Environment: $VAR, ${VAR}, @PATH_SEP, an unset variable.
        self.assertEqual(self.platform.get_file("j1-1-0/env.txt"), b"/opt/v/lib|/opt/v:/usr/lib|[]")
        # STAGED_OUT: every file, PUT ones with their quoted uri, kept ones listed without.
        entries = {e["path"]: e for e in record.output_data}
        put = ["result.txt", "env.txt", "out/x.dat", "out/y z.dat", "out/ü %.dat"]
        kept = ["kept/big.bin", "kept/k.bin", "stays.txt"]
        self.assertEqual(sorted(entries), sorted(put + kept))
        for rel in put:
            data = self.platform.get_file("j1-1-0/" + rel)
            self.assertEqual(entries[rel], {"path": rel, "uri": base + quote(rel), "size": len(data),
                                            "sha256": sha(data)})
        for rel in kept:
            data = self.task_file(task_id, rel)
            self.assertEqual(entries[rel], {"path": rel, "size": len(data), "sha256": sha(data)})
        self.assertEqual(entries["kept/big.bin"]["size"], 3000000)
        staged = dict(record.history)["STAGED_OUT"]
        self.assertLess(staged["seq"], record.info["seq"])
        # The terminal report is as for a native task: the files sent.
        self.assertEqual(sorted(o["path"] for o in record.info["outputs"]), sorted(put))
        # The context was sent with the spec and the platform keeps it.
        self.assertEqual(record.context, context)
        self.assertClean()

    async def test_the_api_takes_a_dialect_spec_and_a_context(self):
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(pool.closeCachedConnections)
        headers = {"Authorization": "Bearer " + self.platform.api_token}

        async def call(method, path, body=None):
            data = json.dumps(body).encode() if body is not None else None
            response = await http.request(method, f"{self.platform.http_url}/api/{path}", data=data,
                                          headers=headers)
            return response.code, json.loads(await response.content())

        spec = {"command": "echo hi > kept.txt", "outputData": [{"paths": ["kept.txt"]}]}
        code, body = await call("POST", "tasks", {"spec": spec, "taskId": "api-1-0", "context": {"k": [1]}})
        self.assertEqual((code, body), (201, {"taskId": "api-1-0"}))
        await self.platform.wait_for("api-1-0")
        code, task = await call("GET", "tasks/api-1-0")
        self.assertEqual(task["state"], "DONE")
        self.assertEqual(task["context"], {"k": [1]})
        self.assertEqual(task["outputData"], [{"path": "kept.txt", "size": 3, "sha256": sha(b"hi\n")}])
        self.assertIn("STAGED_OUT", [state for state, _ in task["history"]])
        code, body = await call("POST", "tasks", {"spec": spec, "context": [1]})
        self.assertEqual(code, 400)
        self.assertIn("'context'", body["error"])
        self.assertClean()

    async def test_malformed_dialect_fails_naming_the_field(self):
        cases = [
            ({"command": "true", "inputData": [{"path": "x"}]}, "inputData[0]"),
            ({"command": "true", "inputData": "x"}, "'inputData'"),
            ({"command": "true", "inputData": [{"path": "../x", "uri": "http://h/x"}]}, "inputData[0]"),
            ({"command": "true", "inputData": [{"path": "x", "uri": "http://h/x", "auth": 5}]}, "inputData[0]"),
            ({"command": "true", "outputData": [{"paths": "x"}]}, "outputData[0]"),
            ({"command": "true", "outputData": [{"paths": ["/abs"]}]}, "outputData[0].paths[0]"),
            ({"command": "true", "outputData": [{"paths": ["x"], "where": 1}]}, "outputData[0]"),
            ({"command": "true", "outputData": [{"paths": ["x"]}], "outputs": []}, "'outputs'"),
        ]
        for spec, field in cases:
            record = await self.platform.wait_for(self.platform.submit(spec))
            self.assertEqual(record.states, ["ACCEPTED", "FAILED"], spec)
            self.assertIn(field, record.info["reason"])
        # The connection is kept and the agent goes on.
        record = await self.platform.wait_for(self.platform.submit({"command": "true", "inputData": []}))
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "STAGED_OUT", "DONE"])
        self.assertEqual(record.output_data, [])
        self.assertClean()

    async def test_a_context_that_is_not_an_object_is_an_error(self):
        self.platform.send_raw("agent", ["TASK_SUBMIT", "ctx-1-0", {"command": "true"}, [1, 2]])
        await eventually(lambda: self.platform.agent().errors, what="an ERROR")
        [error] = self.platform.agent().errors
        self.assertEqual((error["code"], error["taskId"]), ("invalid-message", "ctx-1-0"))
        self.assertIn("'context'", error["message"])
        self.assertNotIn("ctx-1-0", self.agent.manager.registry)
        record = await self.platform.wait_for(self.platform.submit({"command": "true"}))
        self.assertEqual(record.state, "DONE")
        self.assertClean()

    async def test_a_native_spec_is_unchanged(self):
        spec = {
            "command": 'printf "%s" "$V" > v.txt',
            "environment": {"V": f"${VAR}@PATH_SEP"},
            "outputs": [{"path": "v.txt", "uri": self.platform.file_url("n1/v.txt")}],
        }
        record = await self.platform.wait_for(self.platform.submit(spec, context={"native": True}))
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "STAGING_OUT", "DONE"])
        self.assertEqual(self.platform.get_file("n1/v.txt"), f"${VAR}@PATH_SEP".encode())
        self.assertIsNone(record.output_data)
        self.assertEqual(record.context, {"native": True})
        self.assertClean()


class DialectRestartTests(TestCase):
    """An agent stopped while a dialect task's outputs are being sent."""

    timeout = 60

    async def test_a_restart_redoes_the_outputs_and_reports_staged_out_once(self):
        from twisted.internet.defer import Deferred

        platform = await start_platform(self, heartbeat=1)
        store = FileServer()
        base = serve(self, store)
        held = Deferred()
        store.plans["/up/r.txt"] = [("hold", held)]
        agent = start_agent(self, platform)
        await platform.wait_connected()
        spec = {"command": "echo r > r.txt; echo k > k.txt",
                "outputData": [{"paths": ["r.txt"], "uri": base + "/up/"}, {"paths": ["k.txt"]}]}
        task_id = platform.submit(spec, task_id="rs-1-0")
        await platform.wait_for(task_id, "STAGING_OUT")
        await eventually(lambda: store.count("PUT", "/up/r.txt") == 1, what="the held PUT")
        await agent.stopService()
        await platform.wait_disconnected()
        agent2 = start_agent(self, ini=agent.config.path)
        record = await platform.wait_for(task_id)
        self.assertEqual(record.states, ["ACCEPTED", "RUNNING", "STAGING_OUT", "STAGED_OUT", "DONE"])
        self.assertEqual(store.uploads["/up/r.txt"], b"r\n")
        self.assertEqual(sorted(e["path"] for e in record.output_data), ["k.txt", "r.txt"])
        self.assertEqual(platform.violations, [])
        held.callback(None)
        await agent2.stopService()
