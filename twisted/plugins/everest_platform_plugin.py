"""
twistd plugin: ``twistd -n everest-platform --token NAME=TOKEN ...`` runs
the Everest reference platform.  Lazy: nothing is imported until used.
"""

from twisted.application.service import ServiceMaker

everest_platform = ServiceMaker(
    "Everest reference platform",
    "everest_agent.platform.tap",
    "The reference Everest platform: agents' WebSocket, file store and JSON API on one port.",
    "everest-platform",
)
