"""
An existing Twisted application that embeds the iii engine.

Run it with ``twistd -ny examples/embedded.tac`` (``III_PORT`` chooses the worker port,
default 49134). Workers connect as usual; they can call the application's in-process
functions (``app::greet``, ``app::shout``), and the application calls theirs.
"""

import os

from twisted.application.service import Application

from iii_twisted.config import EngineConfig
from iii_twisted.service import EngineService

application = Application("embedded-iii")

engine_service = EngineService(
    EngineConfig(port=int(os.environ.get("III_PORT", "49134")), host="127.0.0.1"))
engine_service.setServiceParent(application)
engine = engine_service.engine


def greet(data):
    """An in-process function any worker can call."""
    return {"greeting": "hello " + data["name"]}


async def shout(data):
    """The application calling a function that a worker hosts (shout::upper)."""
    shouted = await engine.call("shout::upper", {"text": data["text"]})
    return {"shouted": shouted}


engine.register_function("app::greet", greet, description="Greet someone")
engine.register_function("app::shout", shout, description="Shout through a worker")
