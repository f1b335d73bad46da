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
    "modules::worker::WorkerModule": "iii_twisted.modules.core:WorkerModule",
    "modules::telemetry::TelemetryModule": "iii_twisted.modules.core:TelemetryModule",
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
    "modules::bridge_client::BridgeClientModule":
        "iii_twisted.modules.bridge_client:BridgeClientModule",
}

# The current format's worker names (reference v0.11 on; short aliases from v0.22) and
# the v0.10 class each stands for (../shared/spec/current-reference.md §3.1). The first
# name given for a class is the one ``iii-convert`` writes. ``iii-worker-manager`` is
# the worker listener, not a module: see iii_twisted.config.
WORKER_NAMES = {
    "iii-engine-functions": "modules::worker::WorkerModule",
    "iii-telemetry": "modules::telemetry::TelemetryModule",
    "iii-http": "modules::api::RestApiModule",
    "http": "modules::api::RestApiModule",
    "iii-state": "modules::state::StateModule",
    "state": "modules::state::StateModule",
    "iii-stream": "modules::stream::StreamModule",
    "iii-pubsub": "modules::pubsub::PubSubModule",
    "pubsub": "modules::pubsub::PubSubModule",
    "iii-queue": "modules::queue::QueueModule",
    "queue": "modules::queue::QueueModule",
    "iii-cron": "modules::cron::CronModule",
    "cron": "modules::cron::CronModule",
    "iii-observability": "modules::observability::OtelModule",
    "iii-http-functions": "modules::http_functions::HttpFunctionsModule",
    "iii-bridge": "modules::bridge_client::BridgeClientModule",
    # Ours: the reference's console is a separate app, not a worker entry.
    "iii-console": "modules::console::ConsoleModule",
}

# Reference names this engine refuses, with the reason.
NOT_IMPLEMENTED = {
    "iii-exec": "runs shell commands at start-up; not implemented by this engine",
    "configuration": "the configuration worker (configuration::*) is not implemented "
                     "by this engine; settings live in this file",
    "iii-worker-ops": "not part of this engine (the reference's worker process manager)",
    "iii-sandbox": "not part of this engine (the reference's sandboxed workers)",
    "sandbox": "not part of this engine (the reference's sandboxed workers)",
    "compose": "not part of this engine (the reference's compose daemon)",
    "iii-compose": "not part of this engine (the reference's compose daemon)",
}


def current_name(iii_class):
    """@return: the current-format worker name of a v0.10 class (or None)."""
    canonical = MODULE_CLASSES.get(iii_class)
    for name, cls in WORKER_NAMES.items():
        if MODULE_CLASSES[cls] == canonical:
            return name
    return None


def module_schema(iii_class):
    """
    @return: the L{iii_twisted.schema.Section} of a module class's config (its
        C{config_schema}; a class without one accepts any config unchecked, and
        tests/unit/test_config_schema.py fails for it).
    """
    from ..schema import Section
    return getattr(load_module_factory(iii_class), "config_schema", None) or \
        Section(_open=True)


def load_module_factory(name):
    """
    @return: the factory registered for the iii class C{name}.
    @raise KeyError: for an unknown name.
    """
    module_name, _, attribute = MODULE_CLASSES[name].partition(":")
    return getattr(import_module(module_name), attribute)


def build_module(name, engine, config, reactor, **kept):
    """
    Build one module from its config.

    @param config: the module's config mapping (checked against the class's
        C{config_schema} first, so that modules built without a file are held to
        the same rules).
    @param kept: what a reload hands from the module's old instance (its C{store}).
    @return: the module (an L{IModule} and C{IService}), with C{iii_class} set.
    @raise iii_twisted.config.ConfigError: for a config the module refuses.
    """
    factory = load_module_factory(name)
    config = module_schema(name).validate(config)
    module = factory(engine, config, reactor, **kept)
    module.iii_class = name
    verifyObject(IModule, module)
    return module
