"""
Optional dependencies, installed through setuptools extras and imported only when a
config names something that needs them.

- ``redis``: txredisapi, for the Redis adapters (L{iii_twisted.redis_client}).
- ``rabbitmq``: pika, for ``modules::queue::RabbitMQAdapter``.
- ``scale``: both.
"""

from importlib import import_module

from .config import ConfigError

EXTRAS = {
    "txredisapi": "redis",
    "pika": "rabbitmq",
}


def require_extra(module_name, needed_by, key="adapter.class"):
    """
    Import C{module_name}, a module of ours or a library, that needs an extra.

    @param needed_by: what the config named (an adapter class), for the message.
    @return: the module.
    @raise ConfigError: naming the missing extra and how to install it, when the
        library behind it is not installed.
    """
    try:
        return import_module(module_name)
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        extra = EXTRAS.get(missing)
        if extra is None:
            raise
        raise ConfigError(
            "{} needs the {!r} extra ({} is not installed): pip install "
            "\"iii-twisted[{}]\" (or [scale] for Redis and RabbitMQ)".format(
                needed_by, extra, missing, extra), key)


def redis_client_for(config, needed_by, reactor, key="redis_url"):
    """
    Read ``redis_url`` (default ``redis://localhost:6379``, as in the reference) from
    an adapter config and get the shared client for it.

    @return: a L{iii_twisted.redis_client.RedisClient} (release it when done).
    @raise ConfigError: naming the key, for a wrong type or a malformed URL, or the
        missing ``redis`` extra.
    """
    from .config import get_option

    url = get_option(config, key, str, "redis://localhost:6379")
    redis_client = require_extra("iii_twisted.redis_client", needed_by)
    try:
        return redis_client.acquire(url, reactor)
    except ValueError as e:
        raise ConfigError(str(e), key)


def redis_adapter_client(config, needed_by, reactor):
    """
    The shared client for an adapter whose only key is ``redis_url`` (the pub/sub and
    cron Redis adapters), with errors named as the adapter's config keys.

    @raise ConfigError: ``adapter.config.<key>`` for an unknown key or a bad URL;
        ``adapter.class`` for the missing ``redis`` extra.
    """
    for key in config:
        if key != "redis_url":
            raise ConfigError("unknown key {!r}; known keys: redis_url".format(key),
                              "adapter.config." + key)
    try:
        return redis_client_for(config, needed_by, reactor)
    except ConfigError as e:
        raise e if e.key == "adapter.class" else e.within("adapter.config")
