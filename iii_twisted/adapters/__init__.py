"""
Storage behind the modules' interfaces.

- L{memory.MemoryKvStore}: an L{IKvStore} in memory (``store_method: in_memory``).
- L{file.FileKvStore}: an L{IKvStore} in an append-only, checksummed, fsynced log
  (``store_method: file_based``).
- L{redis_kv.RedisKvStore}: an L{IKvStore} in Redis, shared between engines.
- L{kv_store_from_config}: builds one of them from a ``KvStore`` adapter config;
  L{redis_kv_store_from_config} from a ``RedisAdapter`` config.
"""

from ..config import ConfigError
from ..schema import Key, Section

STORE_METHODS = ("in_memory", "file_based")

# The config of the ``KvStore`` adapters (state, stream, cron): declare new keys here.
KV_STORE_SCHEMA = Section(
    store_method=Key(str, "in_memory", "in_memory, or file_based (durable, in file_path)",
                     choices=STORE_METHODS),
    file_path=Key(str, "kv_store_data.db", "directory of a file_based store"),
    save_interval_ms=Key(int, 5000, "accepted for compatibility; every write is durable "
                         "before it is acknowledged", min=0),
)

# The config of every Redis adapter (state, stream, pub/sub, cron; the queue's adds
# its own keys): docs/scale-out.rst.
REDIS_SCHEMA = Section(
    redis_url=Key(str, "redis://localhost:6379", "the Redis server: redis://[[user]:"
                  "password@]host[:port][/db], rediss:// for TLS"),
)

# Keys of the reference BuiltinKvStore config (modules.md §2.1), plus the stream
# adapter's channel_size.
KV_CONFIG_KEYS = ("store_method", "file_path", "save_interval_ms")


def kv_store_from_config(config, reactor, extra_keys=(), default_path="kv_store_data.db"):
    """
    Build a key-value store from a ``KvStore`` adapter's ``config`` mapping:
    ``{store_method: in_memory|file_based, file_path: DIR, save_interval_ms: N}``.

    ``file_path`` names a directory (created if missing), as in the reference; ours
    holds one log file and one lock file. ``save_interval_ms`` is accepted for
    compatibility and ignored: every write is durable before it is acknowledged.

    @param extra_keys: further keys the caller accepts (and reads itself).
    @return: an L{iii_twisted.interfaces.IKvStore}.
    @raise ConfigError: naming the key, for an unknown key, a wrong type, an unknown
        store_method (deviation: the reference falls back to in_memory with a
        warning, silently losing durability), or a file store that cannot be opened.
    """
    from .file import FileKvStore
    from .memory import MemoryKvStore
    from ..config import get_option

    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ConfigError("must be a mapping, not {}".format(type(config).__name__))
    for key in config:
        if key not in KV_CONFIG_KEYS and key not in extra_keys:
            raise ConfigError("unknown key {!r}; known keys: {}".format(
                key, ", ".join(KV_CONFIG_KEYS + tuple(extra_keys))), key)
    method = get_option(config, "store_method", str, "in_memory")
    if method not in STORE_METHODS:
        raise ConfigError("unknown store_method {!r}; expected one of {}".format(
            method, ", ".join(STORE_METHODS)), "store_method")
    path = get_option(config, "file_path", str, default_path)
    interval = get_option(config, "save_interval_ms", int, 5000)
    if interval < 0:
        raise ConfigError("must not be negative", "save_interval_ms")
    if method == "in_memory":
        return MemoryKvStore()
    try:
        return FileKvStore(path, reactor)
    except OSError as e:
        raise ConfigError("cannot open the store in {}: {}".format(
            path, e.strerror or e), "file_path")
    except Exception as e:
        raise ConfigError("cannot open the store in {}: {}".format(path, e), "file_path")


REDIS_CONFIG_KEYS = ("redis_url",)


def redis_kv_store_from_config(config, reactor, needed_by, prefixes=("state:", ""),
                               extra_keys=()):
    """
    Build a L{redis_kv.RedisKvStore} from a ``RedisAdapter`` config:
    ``{redis_url: redis://host:6379/0}`` (default ``redis://localhost:6379``, as in
    the reference).

    @param needed_by: the adapter class name, for the missing-extra message.
    @param prefixes: (key prefix, group prefix): ``("state:", "")`` for state,
        ``("", "stream:")`` for streams (whose groups already start ``stream:``).
    @raise ConfigError: naming the key, for an unknown key, a wrong type, a malformed
        URL, or the ``redis`` extra not installed.
    """
    from ..extras import redis_client_for, require_extra

    for key in config:
        if key not in REDIS_CONFIG_KEYS and key not in extra_keys:
            raise ConfigError("unknown key {!r}; known keys: {}".format(
                key, ", ".join(REDIS_CONFIG_KEYS + tuple(extra_keys))), key)
    client = redis_client_for(config, needed_by, reactor)
    redis_kv = require_extra("iii_twisted.adapters.redis_kv", needed_by)
    return redis_kv.RedisKvStore(client, key_prefix=prefixes[0], group_prefix=prefixes[1])
