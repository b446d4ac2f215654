from twisted.application.service import ServiceMaker

# Lazy: twistd imports everest_agent.tap only when this plugin is used.
everest_agent = ServiceMaker(
    "everest-agent",
    "everest_agent.tap",
    "Everest resource agent: attach this machine to an Everest platform",
    "everest-agent",
)
