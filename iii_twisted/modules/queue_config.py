"""
What a queue is, for the queue module (L{iii_twisted.modules.queue}) and its brokers:
the config schema and its parsing into L{QueueSettings} (L{named_queues},
L{adapter_settings}, and a trigger's ``queue_config``: L{subscription_config}), L{Job}
(one message, as brokers store it), the keys queues are named by, and
L{build_broker}, which makes the L{IQueueBroker} the ``adapter`` names.

Queue keys: a named queue from ``queue_configs`` is ``__fn_queue::NAME``, a topic
queue is the topic, and a ``durable:subscriber`` function's own queue of a topic is
``__durable::TOPIC::FUNCTION_ID`` (shown as ``TOPIC::FUNCTION_ID``, the name the
reference's builtin adapter gives it).
"""

import os

from twisted.logger import Logger

from ..config import ConfigError, get_option
from ..interfaces import TriggerError
from ..schema import Adapter, Adapters, Key, MapOf, Section

FN_QUEUE_PREFIX = "__fn_queue::"
DURABLE_PREFIX = "__durable::"
BUILTIN_ADAPTER = "modules::queue::BuiltinQueueAdapter"
REDIS_ADAPTER = "modules::queue::RedisAdapter"
RABBITMQ_ADAPTER = "modules::queue::RabbitMQAdapter"
ADAPTERS = (BUILTIN_ADAPTER, REDIS_ADAPTER, RABBITMQ_ADAPTER)

_log = Logger()

_MODULE_KEYS = {"adapter", "queue_configs"}
_QUEUE_KEYS = {"max_retries", "concurrency", "type", "message_group_field", "backoff_ms",
               "poll_interval_ms"}
_ADAPTER_KEYS = {"store_method", "file_path", "save_interval_ms", "channel_size",
                 "max_attempts", "backoff_ms", "concurrency", "poll_interval_ms", "mode",
                 "redis_url", "lease_ms", "amqp_url", "prefetch_count", "queue_mode"}
# Every key of the module's config (iii_twisted/schema.py says how to add one).
_QUEUE_DEFAULTS = dict(
    concurrency=Key(int, 10, "messages delivered at once", min=1),
    backoff_ms=Key(int, 1000, "first retry delay, ms (doubles each attempt)", min=0),
    poll_interval_ms=Key(int, 100, "how often an idle queue looks for work, ms", min=1),
)
CONFIG_SCHEMA = Section(
    adapter=Key(Adapters(
        Adapter("builtin", (BUILTIN_ADAPTER,), Section(
            store_method=Key(str, "in_memory", "in_memory, or file_based (a journal in "
                             "file_path)", choices=("in_memory", "file_based")),
            file_path=Key(str, "data/queue_store", "directory of a file_based journal"),
            save_interval_ms=Key(int, 5000, "accepted for compatibility", min=0),
            channel_size=Key(int, 256, "accepted for compatibility", min=1),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            mode=Key(str, "standard", "standard, or fifo (one at a time, in order)",
                     choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("rabbitmq", (RABBITMQ_ADAPTER,), Section(
            amqp_url=Key(str, "amqp://localhost:5672", "the RabbitMQ server: amqp://user:"
                         "password@host:port/vhost (amqps:// for TLS)"),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            prefetch_count=Key(int, 10, "messages an engine holds unacknowledged at "
                               "once, per queue (the default concurrency)", min=1),
            queue_mode=Key(str, "standard", "standard, or fifo (one consumer at a time, "
                           "in order)", choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("redis", (REDIS_ADAPTER,), Section(
            redis_url=Key(str, "redis://localhost:6379",
                          "the Redis server (redis:// or rediss:// for TLS, password, db)"),
            lease_ms=Key(int, 30000, "how long a message handed to an engine stays its "
                         "without a renewal, ms (a dead engine's messages come back "
                         "after it)", min=100),
            max_attempts=Key(int, 3, "deliveries before a message is dead-lettered",
                             min=0),
            mode=Key(str, "standard", "standard, or fifo (in order per message group)",
                     choices=("standard", "fifo")),
            **_QUEUE_DEFAULTS)),
        Adapter("bridge", ("modules::queue::adapters::Bridge",), None,
                "the queue's bridge adapter is not built in this engine (the state "
                "and stream ones are; docs/cluster.rst)"),
    ), None, "where messages are kept (default: builtin in memory)"),
    queue_configs=Key(MapOf(Section(
        _check=lambda q: ("message_group_field", "a fifo queue needs message_group_field "
                          "(the data field that names a message's group)")
        if q.get("type") == "fifo" and not q.get("message_group_field") else None,
        max_retries=Key(int, 3, "deliveries before dead-lettering", min=0),
        type=Key(str, "standard", "standard or fifo", choices=("standard", "fifo")),
        message_group_field=Key(str, None, "data field naming a fifo message's group"),
        **_QUEUE_DEFAULTS)), None, "named queues (for the Enqueue action), by name"),
)


class QueueSettings:
    """How one queue delivers: attempts, parallelism, order, retry delay."""

    __slots__ = ("max_attempts", "concurrency", "fifo", "group_field", "backoff_ms",
                 "poll_interval_ms", "fixed_backoff")

    def __init__(self, max_attempts=3, concurrency=10, fifo=False, group_field=None,
                 backoff_ms=1000, poll_interval_ms=100, fixed_backoff=False):
        self.fixed_backoff = fixed_backoff  # backoffType "fixed": no doubling
        self.max_attempts = max_attempts
        self.concurrency = concurrency
        self.fifo = fifo
        self.group_field = group_field
        self.backoff_ms = backoff_ms
        self.poll_interval_ms = poll_interval_ms

    def info(self):
        """@return: the settings as ``engine::queue::topic_stats`` shows them."""
        return {
            "max_retries": self.max_attempts,
            "concurrency": self.concurrency,
            "type": "fifo" if self.fifo else "standard",
            "message_group_field": self.group_field,
            "backoff_ms": self.backoff_ms,
            "poll_interval_ms": self.poll_interval_ms,
        }


class Job:
    """
    One message: what to deliver, where, and how often it was tried.

    @ivar queue: the key of its queue (see the module docstring).
    @ivar function_id: the function of a named queue's message; None on topic queues
        (the subscription chooses).
    @ivar attempts: deliveries that failed so far.
    @ivar created_at: when it was accepted, ms since the epoch.
    @ivar group: its FIFO group (the group field's value, as a string), or None.
    """

    __slots__ = ("id", "queue", "function_id", "data", "attempts", "created_at", "group",
                 "traceparent", "baggage")

    def __init__(self, job_id, queue, function_id, data, attempts=0, created_at=0,
                 group=None, traceparent=None, baggage=None):
        self.id = job_id
        self.queue = queue
        self.function_id = function_id
        self.data = data
        self.attempts = attempts
        self.created_at = created_at
        self.group = group
        self.traceparent = traceparent
        self.baggage = baggage

    def record(self):
        """@return: the job as a JSON object (in the journal and the shared brokers)."""
        return {
            "id": self.id, "queue": self.queue, "function_id": self.function_id,
            "data": self.data, "attempts": self.attempts, "created_at": self.created_at,
            "group": self.group, "traceparent": self.traceparent, "baggage": self.baggage,
        }

    @classmethod
    def from_record(cls, r):
        """@return: the Job of a L{record}; @raise KeyError: without id or queue."""
        return cls(r["id"], r["queue"], r.get("function_id"), r.get("data"),
                   r.get("attempts", 0), r.get("created_at", 0), r.get("group"),
                   r.get("traceparent"), r.get("baggage"))


def durable_key(topic, function_id):
    """@return: the key of C{function_id}'s own queue of C{topic}."""
    return "{}{}::{}".format(DURABLE_PREFIX, topic, function_id)


def display_name(key):
    """@return: what the engine functions call the queue of C{key}."""
    for prefix in (FN_QUEUE_PREFIX, DURABLE_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


_SUBSCRIPTION_KEYS = {"type", "concurrency", "maxRetries", "visibilityTimeout",
                      "delaySeconds", "backoffType", "backoffDelayMs", "maxPriority"}
# Per-subscriber settings the reference knows that this queue does not implement: a
# trigger naming one is refused (rather than run with the setting silently off).
_UNSUPPORTED_SUBSCRIPTION_KEYS = {
    "visibilityTimeout": "there is no visibility timeout (a delivery lasts until its "
                         "call ends or times out: invocation_timeout_ms)",
    "delaySeconds": "deliveries are not delayed",
    "maxPriority": "there are no priority queues (RabbitMQ only in the reference)",
}
DURABLE_SUBSCRIBER = "durable:subscriber"


def subscription_config(trigger, defaults):
    """
    Read a ``queue`` or ``durable:subscriber`` trigger's config.

    @param defaults: the L{QueueSettings} of topic queues.
    @return: (the key of the queue it consumes, its concurrency, whether it is FIFO,
        the L{QueueSettings} its ``queue_config`` gives its attempts, or None for the
        queue's).
    @raise TriggerError: no topic, a malformed ``queue_config``, or a setting this
        queue does not implement.
    """
    kind_name = trigger.trigger_type
    config = trigger.config if trigger.config is not None else {}
    if not isinstance(config, dict):
        raise TriggerError("{} trigger {}: config must be an object with a "
                           "'topic'".format(kind_name, trigger.id))
    topic = config.get("topic")
    if not isinstance(topic, str) or not topic:
        raise TriggerError(
            "{} trigger {}: config needs a non-empty string 'topic' (the topic "
            "the `{}` function writes to)".format(
                kind_name, trigger.id,
                "iii::durable::publish" if kind_name == DURABLE_SUBSCRIBER
                else "enqueue"))
    if topic.startswith(FN_QUEUE_PREFIX) or topic.startswith(DURABLE_PREFIX):
        raise TriggerError("{} trigger {}: topic names may not start with {} or "
                           "{}".format(kind_name, trigger.id, FN_QUEUE_PREFIX,
                                       DURABLE_PREFIX))
    condition = config.get("condition_function_id")
    if condition is not None and not isinstance(condition, str):
        raise TriggerError("{} trigger {}: condition_function_id must be a "
                           "string".format(kind_name, trigger.id))
    sub_config = config.get("queue_config")
    if sub_config is None:
        sub_config = {}
    if not isinstance(sub_config, dict):
        raise TriggerError("{} trigger {}: queue_config must be an object".format(
            kind_name, trigger.id))
    where = "{} trigger {}: queue_config.".format(kind_name, trigger.id)
    for key, why in sorted(_UNSUPPORTED_SUBSCRIPTION_KEYS.items()):
        if sub_config.get(key) is not None:
            raise TriggerError("{}{} is not supported by this engine's queue: "
                               "{}".format(where, key, why))
    kind = sub_config.get("type")
    if kind == "concurrent":  # the reference reads any non-fifo mode as standard
        kind = "standard"
    if kind not in (None, "standard", "fifo"):
        raise TriggerError("{}type must be 'standard' or 'fifo', not {!r}".format(
            where, kind))
    concurrency = _sub_int(sub_config, "concurrency", defaults.concurrency,
                           where, 1)
    fifo = kind == "fifo" or (kind is None and defaults.fifo)
    settings = None
    retries = _sub_int(sub_config, "maxRetries", None, where, 0)
    backoff = _sub_int(sub_config, "backoffDelayMs", None, where, 0)
    backoff_type = sub_config.get("backoffType")
    if backoff_type not in (None, "exponential", "fixed"):
        raise TriggerError("{}backoffType must be 'exponential' or 'fixed', not "
                           "{!r}".format(where, backoff_type))
    if retries is not None or backoff is not None or backoff_type is not None:
        base = defaults
        attempts = base.max_attempts
        if retries is not None:
            attempts = retries + 1 if kind_name == DURABLE_SUBSCRIBER else max(retries, 1)
        settings = QueueSettings(
            max_attempts=attempts, concurrency=concurrency, fifo=fifo,
            backoff_ms=base.backoff_ms if backoff is None else backoff,
            poll_interval_ms=base.poll_interval_ms,
            fixed_backoff=backoff_type == "fixed")
    for key in set(sub_config) - _SUBSCRIPTION_KEYS:
        _log.warn("{kind} trigger {trigger_id}: unknown queue_config key {key} "
                       "ignored", kind=kind_name, trigger_id=trigger.id, key=key)
    concurrency = 1 if fifo else concurrency
    if kind_name == DURABLE_SUBSCRIBER:
        return durable_key(topic, trigger.function_id), concurrency, fifo, settings
    return topic, concurrency, fifo, settings


def _sub_int(config, key, default, where, minimum):
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise TriggerError("{}{} must be an integer of at least {}, not {!r}".format(
            where, key, minimum, value))
    return value


# -- config ------------------------------------------------------------------------------


def warn_unknown(mapping, known, prefix):
    """Log the keys of C{mapping} not in C{known} (the reference ignores them too)."""
    for key in set(mapping) - known:
        _log.warn("queue module: unknown config key {key} ignored", key=prefix + str(key))


def _positive(mapping, key, default, prefix, minimum=1):
    value = get_option(mapping, key, int, default, prefix)
    if value < minimum:
        raise ConfigError("must be at least {}, not {}".format(minimum, value), prefix + key)
    return value


def adapter_settings(config):
    """
    @return: (the adapter's config mapping, the L{QueueSettings} of topic queues).
    @raise ConfigError: naming the key that is wrong.
    """
    warn_unknown(config, _MODULE_KEYS, "")
    adapter = get_option(config, "adapter", dict, {})
    cls = get_option(adapter, "class", str, BUILTIN_ADAPTER, "adapter.")
    if cls not in ADAPTERS:
        raise ConfigError("Adapter factory '{}' not found. Available: [{}]".format(
            cls, ", ".join(ADAPTERS)), "adapter.class")
    adapter_config = get_option(adapter, "config", dict, {}, "adapter.")
    prefix = "adapter.config."
    warn_unknown(adapter_config, _ADAPTER_KEYS, prefix)
    method = get_option(adapter_config, "store_method", str, "in_memory", prefix)
    if method not in ("in_memory", "file_based"):
        raise ConfigError("must be in_memory or file_based, not {!r}".format(method),
                          prefix + "store_method")
    get_option(adapter_config, "file_path", str, None, prefix)
    mode = get_option(adapter_config, "mode", str, None, prefix)
    if mode is None:  # queue_mode: the RabbitMQ adapter's name for it
        mode = get_option(adapter_config, "queue_mode", str, "standard", prefix)
    if mode not in ("standard", "fifo"):
        raise ConfigError("must be standard or fifo, not {!r}".format(mode),
                          prefix + ("mode" if "mode" in adapter_config else "queue_mode"))
    default_concurrency = _positive(adapter_config, "prefetch_count", 10, prefix)
    defaults = QueueSettings(
        max_attempts=_positive(adapter_config, "max_attempts", 3, prefix, 0),
        concurrency=_positive(adapter_config, "concurrency", default_concurrency, prefix),
        fifo=mode == "fifo",
        backoff_ms=_positive(adapter_config, "backoff_ms", 1000, prefix, 0),
        poll_interval_ms=_positive(adapter_config, "poll_interval_ms", 100, prefix),
    )
    return adapter_config, defaults


def named_queues(config):
    """
    @return: ``{name: QueueSettings}`` of ``queue_configs``.
    @raise ConfigError: naming the key that is wrong.
    """
    queue_configs = get_option(config, "queue_configs", dict, {})
    named = {}
    for name, entry in queue_configs.items():
        prefix = "queue_configs.{}.".format(name)
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError("must be a mapping", prefix[:-1])
        warn_unknown(entry, _QUEUE_KEYS, prefix)
        kind = get_option(entry, "type", str, "standard", prefix)
        if kind not in ("standard", "fifo"):
            raise ConfigError("must be standard or fifo, not {!r}".format(kind), prefix + "type")
        field = get_option(entry, "message_group_field", str, None, prefix)
        if kind == "fifo" and not field:
            raise ConfigError("a fifo queue needs message_group_field (the data field "
                              "that names a message's group)", prefix + "message_group_field")
        named[str(name)] = QueueSettings(
            max_attempts=_positive(entry, "max_retries", 3, prefix, 0),
            concurrency=_positive(entry, "concurrency", 10, prefix),
            fifo=kind == "fifo",
            group_field=field,
            backoff_ms=_positive(entry, "backoff_ms", 1000, prefix, 0),
            poll_interval_ms=_positive(entry, "poll_interval_ms", 100, prefix),
        )
    return named


def build_broker(config, adapter_config, defaults, reactor, store=None):
    """
    @param store: for the builtin broker, an L{IQueueStore} to use instead of the one
        ``store_method`` names (tests).
    @return: the L{IQueueBroker} the adapter class names.
    @raise ConfigError: naming the key, or the missing extra.
    """
    cls = (config.get("adapter") or {}).get("class", BUILTIN_ADAPTER)
    from ..extras import redis_client_for, require_extra

    prefix = "adapter.config."
    if cls == RABBITMQ_ADAPTER:
        url = get_option(adapter_config, "amqp_url", str, "amqp://localhost:5672", prefix)
        if not url.startswith(("amqp://", "amqps://")):
            raise ConfigError("must be an amqp:// or amqps:// URL, not {!r}".format(url),
                              prefix + "amqp_url")
        module = require_extra("iii_twisted.adapters.rabbitmq_queue", RABBITMQ_ADAPTER)
        try:
            return module.RabbitMQBroker(url, reactor, Job.from_record)
        except Exception as e:
            raise ConfigError("cannot use this URL: {}".format(e), prefix + "amqp_url")
    if cls == REDIS_ADAPTER:
        lease_ms = _positive(adapter_config, "lease_ms", 30000, prefix, 100)
        try:
            client = redis_client_for(adapter_config, REDIS_ADAPTER, reactor)
        except ConfigError as e:
            raise e if e.key == "adapter.class" else e.within("adapter.config")
        module = require_extra("iii_twisted.adapters.redis_queue", REDIS_ADAPTER)
        return module.RedisQueueBroker(client, reactor, Job.from_record, lease_ms=lease_ms,
                                       poll_interval_ms=defaults.poll_interval_ms)
    from ..adapters.queue_builtin import BuiltinQueueBroker
    if store is None:
        store = _build_store(adapter_config, reactor)
    return BuiltinQueueBroker(store, reactor, Job.from_record)


def _build_store(adapter_config, reactor):
    from ..adapters.queue_journal import JournalQueueStore, MemoryQueueStore, thread_runner

    if adapter_config.get("store_method", "in_memory") != "file_based":
        return MemoryQueueStore()
    directory = adapter_config.get("file_path") or "data/queue_store"
    # Checked now, so that a bad path is a config error naming the key rather than a
    # traceback at start-up.
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise ConfigError("cannot create the queue store directory {}: {}".format(
            directory, e.strerror), "adapter.config.file_path")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError("the queue store directory {} is not writable".format(directory),
                          "adapter.config.file_path")
    return JournalQueueStore(directory, thread_runner(reactor))
