"""
Which module provides a function id or a trigger type, for the messages that would
otherwise leave an operator guessing: ``Function publish not found`` becomes
``Function publish not found (publish is provided by modules::pubsub::PubSubModule
(pubsub), which is not in the config)``; a ``cron`` trigger registered without the cron
module is logged at warn level with the module to add.

The names are the reference's module classes (v0.10 format) with the current format's
worker name in brackets; both are accepted in ``iii-config.yaml``.
"""

# (function id, or a prefix ending in "::") -> (module class, current-format name)
_FUNCTIONS = (
    ("publish", ("modules::pubsub::PubSubModule", "iii-pubsub")),
    ("state::", ("modules::state::StateModule", "iii-state")),
    ("stream::", ("modules::stream::StreamModule", "iii-stream")),
    ("engine::queue::", ("modules::queue::QueueModule", "iii-queue")),
    ("engine::traces::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::logs::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::metrics::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::sampling::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::alerts::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::baggage::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::rollups::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::log::", ("modules::observability::OtelModule", "iii-observability")),
    ("engine::health::", ("modules::observability::OtelModule", "iii-observability")),
    ("iii::durable::", ("modules::queue::QueueModule", "iii-queue")),
)

# trigger type -> (module class, current-format name)
_TRIGGER_TYPES = {
    "http": ("modules::rest_api::RestApiModule", "iii-http"),
    "cron": ("modules::cron::CronModule", "iii-cron"),
    "state": ("modules::state::StateModule", "iii-state"),
    "stream": ("modules::stream::StreamModule", "iii-stream"),
    "stream:join": ("modules::stream::StreamModule", "iii-stream"),
    "stream:leave": ("modules::stream::StreamModule", "iii-stream"),
    "subscribe": ("modules::pubsub::PubSubModule", "iii-pubsub"),
    "queue": ("modules::queue::QueueModule", "iii-queue"),
    "durable:subscriber": ("modules::queue::QueueModule", "iii-queue"),
    "log": ("modules::observability::OtelModule", "iii-observability"),
}


def module_for_function(function_id):
    """@return: (module class, current name) providing C{function_id}, or None."""
    if not isinstance(function_id, str):
        return None
    for key, module in _FUNCTIONS:
        if function_id == key or (key.endswith("::") and function_id.startswith(key)):
            return module
    return None


def module_for_trigger_type(trigger_type):
    """@return: (module class, current name) providing C{trigger_type}, or None."""
    return _TRIGGER_TYPES.get(trigger_type) if isinstance(trigger_type, str) else None


def _phrase(module):
    return "{} ({})".format(*module)


def function_hint(function_id):
    """
    @return: `` (publish is provided by modules::pubsub::PubSubModule (iii-pubsub),
        which is not in the config)`` for an id a module provides, else ``""``.
    """
    module = module_for_function(function_id)
    if module is None:
        return ""
    return " ({} is provided by {}, which is not in the config)".format(
        function_id, _phrase(module))


def trigger_type_hint(trigger_type):
    """
    @return: the sentence to log for a trigger whose type has no provider: which
        module to add, or that a worker must provide it.
    """
    module = module_for_trigger_type(trigger_type)
    if module is None:
        return "no worker provides trigger type {} yet".format(trigger_type)
    return "trigger type {} is provided by {}, which is not in the config".format(
        trigger_type, _phrase(module))
