"""
Task handlers: the back ends that run tasks (see L{everest_agent.interfaces.ITaskHandler}).
"""

from twisted.python.reflect import namedAny

#: Handler type (the config's [handler] type) -> class implementing it.
HANDLERS = {
    "local": "everest_agent.handlers.local.LocalTaskHandler",
    "slurm": "everest_agent.handlers.slurm.SlurmTaskHandler",
    "torque": "everest_agent.handlers.pbs.TorqueTaskHandler",
    "pbs": "everest_agent.handlers.pbs.PbsProTaskHandler",
    "sge": "everest_agent.handlers.sge.SgeTaskHandler",
}


def make_handler(config, reactor):
    """Build the handler that C{config.handler.type} names."""
    handler = namedAny(HANDLERS[config.handler.type]).from_config(config, reactor)
    pilot = getattr(config, "pilot", None)
    if pilot is not None and pilot.enabled:
        from everest_agent.pilot.handler import PilotTaskHandler

        handler = PilotTaskHandler.from_config(config, reactor, handler)
    return handler
