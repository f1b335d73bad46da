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
from ..schema import Key, Section


@implementer(IModule)
class BuiltinModule(Service):
    """A module whose work the engine core already does."""

    iii_class = None

    def __init__(self, engine, config, reactor):
        self.config = config


class WorkerModule(BuiltinModule):
    """``modules::worker::WorkerModule`` (``iii-engine-functions``): no config."""

    config_schema = Section()


class TelemetryModule(BuiltinModule):
    """
    ``modules::telemetry::TelemetryModule`` (``iii-telemetry``): its keys are accepted
    and ignored, since we send no product analytics.
    """

    config_schema = Section(
        enabled=Key(bool, True, "ignored: this engine sends no telemetry"),
        sdk_api_key=Key(str, None, "ignored"),
        heartbeat_interval_secs=Key(int, 21600, "ignored", min=0),
    )
