"""
Pilot mode: many short tasks through a few batch jobs.

The agent (L{everest_agent.pilot.handler}) submits pilot jobs through its
batch handler; each runs L{everest_agent.pilot.runner} (C{python -m
everest_agent.pilot}), which connects back over the link of
L{everest_agent.pilot.link} and runs the tasks it is sent, under
L{everest_agent.pilot.guard}, which kills what the worker left when it ends
(Linux).
"""
