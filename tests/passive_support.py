"""
Helpers for passive-mode tests: an agent.ini with [passive], a real
Autobahn WebSocket client, and file requests with treq.
"""

import json
import os

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer, reactor

from everest_agent import config as agent_config
from everest_agent.agent import EverestAgent
from tests.support import eventually, write_private

CLIENT_TOKEN = "client-token-abcdef0123"
OTHER_TOKEN = "client-token-other-4567"


def auth(label, token=CLIENT_TOKEN):
    return f"EverestAgentClientToken {label}:{token}"


def passive_ini(test, platform_url=None, passive=None, sections=None, root=None):
    """An agent.ini in passive mode (and active too when C{platform_url} is given)."""
    root = root or os.path.abspath(test.mktemp())
    os.makedirs(root, exist_ok=True)
    tokens = write_private(os.path.join(root, "clients"), f"# clients\n{CLIENT_TOKEN}\n{OTHER_TOKEN}\n")
    values = {
        "passive": dict({"enabled": "yes", "listen": "127.0.0.1:0", "client_tokens_file": tokens},
                        **(passive or {})),
        "agent": {
            "work_dir": os.path.join(root, "tasks"), "state_dir": os.path.join(root, "state"),
            "max_tasks": "2", "kill_grace": "1",
        },
        "handler": {"type": "local"},
    }
    if platform_url is not None:
        from tests.support import TOKEN

        token_file = write_private(os.path.join(root, "token"), TOKEN + "\n")
        values["platform"] = {"url": platform_url, "token_file": token_file,
                              "reconnect_initial_delay": "0.1", "reconnect_max_delay": "2"}
    for section, keys in (sections or {}).items():
        values.setdefault(section, {}).update(keys)
    text = "".join(
        f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items())
        for section, keys in values.items()
    )
    return write_private(os.path.join(root, "agent.ini"), text)


def start_passive_agent(test, ini=None, **kwargs):
    ini = ini or passive_ini(test, **kwargs)
    agent = EverestAgent(agent_config.load(ini), reactor, fsync=False)
    agent.startService()

    def stop():
        if agent.running:
            return agent.stopService()

    test.addCleanup(stop)
    return agent


def base_url(agent):
    listener = agent.passive_listener
    return f"{listener.scheme}://127.0.0.1:{listener.address[1]}"


class _Client(WebSocketClientProtocol):
    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        message = json.loads(payload.decode("utf-8"))
        self.factory.messages.append(message)

    def onClose(self, wasClean, code, reason):
        self.factory.closed = code
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"closed before open: {code} {reason}"))


class PassiveClient:
    """A client session: C{messages} holds everything received, in order."""

    def __init__(self, protocol, factory):
        self.protocol, self.factory = protocol, factory

    @property
    def messages(self):
        return self.factory.messages

    def send(self, *message):
        self.protocol.sendMessage(json.dumps(list(message)).encode("utf-8"))

    def states(self, task_id):
        return [m[2] for m in self.messages if m[0] == "TASK_STATE" and m[1] == task_id]

    def errors(self):
        return [m for m in self.messages if m[0] == "ERROR"]

    async def wait_state(self, task_id, state, timeout=20):
        await eventually(lambda: state in self.states(task_id), timeout, f"{task_id} {state}")
        return [m for m in self.messages if m[0] == "TASK_STATE" and m[1] == task_id and m[2] == state][-1]

    def close(self):
        self.protocol.transport.loseConnection()
        return eventually(lambda: self.factory.closed is not None, 5, "close")


async def connect(test, agent, header):
    """A session to C{agent} (an in-process agent, or a port number)."""
    port = agent if isinstance(agent, int) else agent.passive_listener.address[1]
    url = f"ws://127.0.0.1:{port}/agent/ws"
    factory = WebSocketClientFactory(url, protocols=["v1.agent.everest"],
                                     headers={"Authorization": header})
    factory.protocol = _Client
    factory.messages = []
    factory.closed = None
    factory.opened = defer.Deferred()
    connectWS(factory)
    protocol = await factory.opened
    client = PassiveClient(protocol, factory)

    def cleanup():
        if factory.closed is None:
            return client.close()

    test.addCleanup(cleanup)
    return client


def spec(command, keep=("out.txt",), **more):
    value = {"command": command, "outputData": [{"paths": list(keep)}] if keep else []}
    value.update(more)
    return value
