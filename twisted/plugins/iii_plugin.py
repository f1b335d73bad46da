from twisted.application.service import ServiceMaker

iii = ServiceMaker(
    "iii engine",
    "iii_twisted.tap",
    "The iii engine: a router for functions (workers connect over WebSocket).",
    "iii",
)
