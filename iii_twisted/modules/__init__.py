"""
The registry of module classes, by the names ``iii-config.yaml`` uses for them.

Each entry maps an iii class name to ``"python.module:factory"``; the factory is
imported only when a config names it, and is called as
``factory(engine, config, reactor)``. It validates ``config`` (raising
L{iii_twisted.config.ConfigError} with the offending key), registers the module's
functions and trigger types on ``engine``, and returns an L{IModule} that is also an
C{IService}. A new module adds one line here.
"""

from importlib import import_module

from zope.interface.verify import verifyObject

from ..interfaces import IModule

MODULE_CLASSES = {
    # The reference's mandatory modules: ours are built into the engine core.
    "modules::worker::WorkerModule": "iii_twisted.modules.core:BuiltinModule",
    "modules::telemetry::TelemetryModule": "iii_twisted.modules.core:BuiltinModule",
    "modules::queue::QueueModule": "iii_twisted.modules.queue:QueueModule",
    "modules::pubsub::PubSubModule": "iii_twisted.modules.pubsub:PubSubModule",
    "modules::cron::CronModule": "iii_twisted.modules.cron:CronModule",
    "modules::state::StateModule": "iii_twisted.modules.state:StateModule",
    "modules::stream::StreamModule": "iii_twisted.modules.stream:StreamModule",
    "modules::api::RestApiModule": "iii_twisted.modules.rest_api:RestApiModule",
    "modules::rest_api::RestApiModule": "iii_twisted.modules.rest_api:RestApiModule",
    "modules::http_functions::HttpFunctionsModule":
        "iii_twisted.modules.http_functions:HttpFunctionsModule",
    "modules::observability::OtelModule": "iii_twisted.modules.observability:OtelModule",
    "modules::observability::ObservabilityModule":
        "iii_twisted.modules.observability:OtelModule",
    "modules::console::ConsoleModule": "iii_twisted.modules.console:ConsoleModule",
}


def load_module_factory(name):
    """
    @return: the factory registered for the iii class C{name}.
    @raise KeyError: for an unknown name.
    """
    module_name, _, attribute = MODULE_CLASSES[name].partition(":")
    return getattr(import_module(module_name), attribute)


def build_module(name, engine, config, reactor):
    """
    Build one module from its config.

    @return: the module (an L{IModule} and C{IService}), with C{iii_class} set.
    @raise iii_twisted.config.ConfigError: for a config the module refuses.
    """
    module = load_module_factory(name)(engine, config, reactor)
    module.iii_class = name
    verifyObject(IModule, module)
    return module
