"""
A DAG over three agents in passive mode (docs/dag.rst): three agent
services in this process on loopback ports, one client driving them.
Task A on agent 1 keeps a file in its task directory; task B on agent 2
fetches it as an input straight from agent 1 (``inputData`` with the
client's own ``Authorization``); task C on agent 3 joins the outputs of A
and B.  The client fetches C's output and checks it.
"""

import treq
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from tests.passive_support import OTHER_TOKEN, auth, base_url, connect, start_passive_agent


async def fetch(url, header):
    response = await treq.get(url, headers={"Authorization": header}, reactor=reactor, persistent=False)
    return response.code, await response.content()


class DagOverThreeAgentsTests(TestCase):
    timeout = 90

    async def test_a_to_b_to_c(self):
        header = auth("dag-run-1")
        agents = [start_passive_agent(self) for _ in range(3)]
        clients = [await connect(self, agent, header) for agent in agents]
        one, two, three = (base_url(agent) for agent in agents)

        clients[0].send("TASK_SUBMIT", "A", {
            "name": "A", "command": "printf 'alpha\\n' > a.txt",
            "outputData": [{"paths": ["a.txt"]}],
        }, {"dag": "run-1", "node": "A"})
        staged_a = await clients[0].wait_state("A", "STAGED_OUT", timeout=30)
        await clients[0].wait_state("A", "DONE")
        a_uri = one + staged_a[3]["outputData"][0]["uri"]

        clients[1].send("TASK_SUBMIT", "B", {
            "name": "B", "command": "tr a-z A-Z < a.txt > b.txt",
            "inputData": [{"path": "a.txt", "uri": a_uri, "auth": header}],
            "outputData": [{"paths": ["b.txt"]}],
        })
        staged_b = await clients[1].wait_state("B", "STAGED_OUT", timeout=30)
        await clients[1].wait_state("B", "DONE")
        b_uri = two + staged_b[3]["outputData"][0]["uri"]

        clients[2].send("TASK_SUBMIT", "C", {
            "name": "C", "command": "cat from-a.txt from-b.txt > c.txt",
            "inputData": [{"path": "from-a.txt", "uri": a_uri, "auth": header},
                          {"path": "from-b.txt", "uri": b_uri, "auth": header}],
            "outputData": [{"paths": ["c.txt"]}],
        })
        staged_c = await clients[2].wait_state("C", "STAGED_OUT", timeout=30)
        await clients[2].wait_state("C", "DONE")
        [entry] = staged_c[3]["outputData"]
        code, body = await fetch(three + entry["uri"], header)
        self.assertEqual((code, body), (200, b"alpha\nALPHA\n"))
        self.assertEqual(entry["size"], len(body))
        # Each agent knows only its own node, and none told anything to another client.
        self.assertEqual([sorted(a.registry.records) for a in agents], [["A"], ["B"], ["C"]])

    async def test_an_input_with_another_credential_fails_the_task(self):
        header = auth("dag-run-2")
        first, second = start_passive_agent(self), start_passive_agent(self)
        c1, c2 = await connect(self, first, header), await connect(self, second, header)
        c1.send("TASK_SUBMIT", "A", {"command": "echo private > a.txt", "outputData": [{"paths": ["a.txt"]}]})
        staged = await c1.wait_state("A", "STAGED_OUT", timeout=30)
        uri = base_url(first) + staged[3]["outputData"][0]["uri"]
        # Another client's credential is refused by agent 1 (403): B fails, and says why.
        c2.send("TASK_SUBMIT", "B", {
            "command": "cat a.txt", "inputData": [{"path": "a.txt", "uri": uri,
                                                   "auth": auth("intruder", OTHER_TOKEN)}],
        })
        failed = await c2.wait_state("B", "FAILED", timeout=60)
        self.assertIn("403", str(failed[3]))
