"""
Storage behind the modules' interfaces.

- L{memory.MemoryKvStore}: an L{IKvStore} in memory (``store_method: in_memory``).
- L{file.FileKvStore}: an L{IKvStore} in an append-only, checksummed, fsynced log
  (``store_method: file_based``).
- L{kv_store_from_config}: builds one of them from a ``KvStore`` adapter config.
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
