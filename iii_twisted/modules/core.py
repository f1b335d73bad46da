"""
The reference engine's mandatory modules, ``modules::worker::WorkerModule`` and
``modules::telemetry::TelemetryModule``.

The first's functions and trigger types (``engine::*``) are part of our engine core,
and the second sends anonymous product analytics, which we do not: both load as this
no-op so that configs written for the reference engine work unchanged.
"""

from twisted.application.service import Service
from zope.interface import implementer

from ..interfaces import IModule


@implementer(IModule)
class BuiltinModule(Service):
    """A module whose work the engine core already does; accepts any config."""

    iii_class = None

    def __init__(self, engine, config, reactor):
        self.config = config
