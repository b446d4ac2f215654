"""
Passive mode (contract, section 9): clients connect to the agent.

A workflow manager or another platform opens a WebSocket to the agent at
C{/agent/ws} and fetches task outputs over HTTP at C{/files/...}, both on
one listener, both authenticated with an C{EverestAgentClientToken}.
"""
