"""
A DAG over three agents in passive mode: three in-process agent services on
loopback ports, one client driving them over real WebSockets, files passed
agent to agent through C{inputData} with the client's credential as C{auth}.
"""

from twisted.trial.unittest import TestCase

from tests.test_passive_agent import Client, credential, passive_ini, start

import treq
from twisted.internet import reactor
from twisted.web.client import HTTPConnectionPool


class DAGTests(TestCase):
    timeout = 90

    async def test_three_agents_a_b_c(self):
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        header = credential("run-42")
        bases, sessions = [], []
        for _ in range(3):
            agent = start(self, passive_ini(self))
            host, port = agent.passive_listener.address
            bases.append(f"http://{host}:{port}")
            sessions.append(await Client(self, bases[-1], header).open())
        one, two, three = sessions

        one.send(["TASK_SUBMIT", "A", {"command": "echo alpha > a.txt", "inputData": [],
                                       "outputData": [{"paths": ["a.txt"]}]}])
        await one.wait_state("A", "DONE")
        staged = [m for m in one.received if m[:3] == ["TASK_STATE", "A", "STAGED_OUT"]][0]
        (a_file,) = staged[3]["outputData"]
        a_uri = bases[0] + a_file["uri"]

        two.send(["TASK_SUBMIT", "B", {
            "command": "tr a-z A-Z < a.txt > b.txt",
            "inputData": [{"path": "a.txt", "uri": a_uri, "auth": header}],
            "outputData": [{"paths": ["b.txt"]}]}])
        done = await two.wait_state("B", "DONE")
        staged = [m for m in two.received if m[:3] == ["TASK_STATE", "B", "STAGED_OUT"]][0]
        b_uri = bases[1] + staged[3]["outputData"][0]["uri"]

        three.send(["TASK_SUBMIT", "C", {
            "command": "cat in/a.txt in/b.txt > joined.txt",
            "inputData": [{"path": "in/a.txt", "uri": a_uri, "auth": header},
                          {"path": "in/b.txt", "uri": b_uri, "auth": header}],
            "outputData": [{"paths": ["joined.txt"]}]}])
        await three.wait_state("C", "DONE")
        response = await treq.get(bases[2] + "/files/C/joined.txt", headers={"Authorization": header}, pool=pool)
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.content(), b"alpha\nALPHA\n")

        # Without the credential (or with another's) agent 2 cannot take A's file.
        two.send(["TASK_SUBMIT", "B2", {
            "command": "cat a.txt", "inputData": [{"path": "a.txt", "uri": a_uri,
                                                   "auth": credential("someone-else")}],
            "outputData": []}])
        failed = await two.wait_state("B2", "FAILED")
        self.assertIn("403", str(failed[3]))
        self.assertEqual(done[1], "B")
