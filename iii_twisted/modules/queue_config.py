"""
What a queue is, for the queue module (L{iii_twisted.modules.queue}) and its brokers:
the config schema and its parsing into L{QueueSettings}, L{Job} (one message, as
brokers store it), the keys queues are named by, and L{build_broker}, which makes the
L{IQueueBroker} the ``adapter`` names.

Queue keys: a named queue from ``queue_configs`` is ``__fn_queue::NAME``, a topic
queue is the topic, and a ``durable:subscriber`` function's own queue of a topic is
``__durable::TOPIC::FUNCTION_ID`` (shown as ``TOPIC::FUNCTION_ID``, the name the
reference's builtin adapter gives it).
"""

import os

from twisted.logger import Logger

from ..config import ConfigError, get_option
from ..schema import Adapter, Adapters, Key, MapOf, Section

FN_QUEUE_PREFIX = "__fn_queue::"
DURABLE_PREFIX = "__durable::"
BUILTIN_ADAPTER = "modules::queue::BuiltinQueueAdapter"
REDIS_ADAPTER = "modules::queue::RedisAdapter"
RABBITMQ_ADAPTER = "modules::queue::RabbitMQAdapter"
ADAPTERS = (BUILTIN_ADAPTER, REDIS_ADAPTER, RABBITMQ_ADAPTER)

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


# -- config ------------------------------------------------------------------------------

_log = Logger()


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
