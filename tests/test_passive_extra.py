"""
More passive-mode checks end to end (a real agent service in this process,
real Autobahn clients, real HTTP): TLS on the listener, the task channel of
a passive task, the HELLO list C{check} builds from the records, and an
input fetched across agents with another client's credential.
"""

import os
import sys

import treq
from twisted.internet import defer, reactor, ssl
from twisted.trial.unittest import TestCase

from everest_agent import status
from tests import passive_support
from tests.passive_support import OTHER_TOKEN, auth, base_url, connect, spec, start_passive_agent
from tests.support import eventually, make_certificates


async def get(url, header):
    response = await treq.get(url, headers={"Authorization": header}, reactor=reactor, persistent=False)
    return response.code, await response.content()


class PassiveTlsTests(TestCase):
    timeout = 60

    async def test_wss_and_https_with_a_verified_certificate(self):
        from autobahn.twisted.websocket import WebSocketClientFactory, connectWS
        from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

        ca, cert, key = make_certificates(os.path.abspath(self.mktemp()))
        os.chmod(key, 0o600)
        agent = start_passive_agent(self, passive={"tls_cert": cert, "tls_key": key})
        self.assertTrue(base_url(agent).startswith("https://"))
        port = agent.passive_listener.address[1]
        with open(ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        factory = WebSocketClientFactory(f"wss://localhost:{port}/agent/ws", protocols=["v1.agent.everest"],
                                         headers={"Authorization": auth("tls")})
        factory.protocol = passive_support._Client
        factory.messages, factory.closed, factory.opened = [], None, defer.Deferred()
        connectWS(factory, contextFactory=ssl.optionsForClientTLS("localhost", trustRoot=trust))
        client = passive_support.PassiveClient(await factory.opened, factory)
        self.addCleanup(lambda: factory.closed is None and client.close())
        client.send("TASK_SUBMIT", "tls", spec("echo over tls > out.txt"))
        staged = await client.wait_state("tls", "STAGED_OUT")
        await client.wait_state("tls", "DONE")
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = treq.client.HTTPClient(Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust), pool=pool))
        response = await http.get(f"https://localhost:{port}" + staged[3]["outputData"][0]["uri"],
                                  headers={"Authorization": auth("tls")})
        self.assertEqual((response.code, await response.content()), (200, b"over tls\n"))


class PassiveTaskChannelTests(TestCase):
    timeout = 60

    async def test_task_messages_go_to_the_owner_only(self):
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
        other.send("TASK_MESSAGE", "ch", "from a stranger")
        await eventually(lambda: other.errors(), 5, "the stranger's error")
        owner.send("TASK_MESSAGE", "ch", "hi task")
        await owner.wait_state("ch", "DONE")
        code, body = await get(base_url(agent) + "/files/ch/out.txt", auth("chan"))
        self.assertEqual((code, body), (200, b"hi task"))
        self.assertEqual([m for m in other.messages if m[0] != "ERROR"], [])
        self.assertEqual(len(agent.outbox), 0)


class CheckHelloListTests(TestCase):
    timeout = 60

    async def test_checks_hello_never_names_a_passive_task(self):
        agent = start_passive_agent(self)
        client = await connect(self, agent, auth("hello"))
        client.send("TASK_SUBMIT", "p1", spec("sleep 0.3", keep=()))
        client.send("TASK_SUBMIT", "p2", spec("true", keep=()))
        await client.wait_state("p2", "DONE")
        await client.wait_state("p1", "RUNNING")
        # What `everest-agent check` would send as HELLO, from the records on disk.
        self.assertEqual(status.hello_tasks(agent.registry.records, 0), [])
        self.assertEqual(agent.manager.hello_tasks(), [])


class CrossAgentCredentialTests(TestCase):
    timeout = 90

    async def test_an_input_with_another_credential_fails_the_task(self):
        header = auth("dag-run-2")
        first, second = start_passive_agent(self), start_passive_agent(self)
        c1, c2 = await connect(self, first, header), await connect(self, second, header)
        c1.send("TASK_SUBMIT", "A", {"command": "echo private > a.txt", "outputData": [{"paths": ["a.txt"]}]})
        staged = await c1.wait_state("A", "STAGED_OUT", timeout=30)
        uri = base_url(first) + staged[3]["outputData"][0]["uri"]
        # Another client's credential is refused by agent 1 (403): B fails, and says why.
        c2.send("TASK_SUBMIT", "B", {
            "command": "cat a.txt",
            "inputData": [{"path": "a.txt", "uri": uri, "auth": auth("intruder", OTHER_TOKEN)}],
        })
        failed = await c2.wait_state("B", "FAILED", timeout=60)
        self.assertIn("403", str(failed[3]))
