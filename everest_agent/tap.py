"""
twistd plugin support: C{twistd everest-agent --config agent.ini}.
"""

from twisted.python import usage

from everest_agent import config as agent_config


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Attach this machine to an Everest platform: connect to it over a "
        "WebSocket, run the tasks it sends, report their states. Use twistd's "
        "-n to stay in the foreground, --pidfile and --logfile as usual."
    )
    optParameters = [
        ["config", "c", "/etc/everest-agent/agent.ini", "Path to the agent's configuration file (INI)."],
    ]

    def postOptions(self):
        try:
            self["parsed"] = agent_config.load(self["config"])
        except agent_config.ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options):
    from twisted.internet import reactor

    from everest_agent.agent import EverestAgent

    return EverestAgent(options["parsed"], reactor)
