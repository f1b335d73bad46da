"""
``iii-config.yaml``: loading, ``${VAR:default}`` expansion and validation of both of the
reference's file formats into one model, L{EngineConfig}.

The v0.10 shape (../shared/spec/engine-core.md §10)::

    port: 49134                    # worker WebSocket port (0 means 49134)
    modules:                       # then `workers:`, same shape, appended
      - class: modules::state::StateModule
        config: {adapter: {class: modules::state::adapters::KvStore}}

The current shape (reference v0.11 on; ../shared/spec/current-reference.md §3)::

    workers:
      - name: iii-worker-manager   # the worker listener: port, host, ...
        config: {port: 49134}
      - name: state                # or iii-state
        config: {adapter: {name: kv}}

Every key is declared in a schema (L{iii_twisted.schema}, which says how to add one):
L{ENGINE_SCHEMA} (top level, both formats), L{LISTENER_SCHEMA} (top level in v0.10,
``iii-worker-manager`` in the current format), and each module class's
C{config_schema}. Validation is strict at every depth; an error names the file, the
key path and the key probably meant. A file mixing the formats is refused.

Our own optional top-level keys (the reference ignores unknown keys, so a file using
them still loads there): ``host`` (interface, default 0.0.0.0), ``listen`` (a Twisted
endpoint string that overrides port and host), ``invocation_timeout_ms``,
``max_message_size``, ``ws_ping_interval_ms``, ``ws_ping_timeout_ms``,
``function_replicas`` (``spread`` or ``last_wins``, L{iii_twisted.replicas}),
``cluster`` (membership of a cluster, L{iii_twisted.cluster.settings}), ``auth``
(tokens and grants of the worker port, L{iii_twisted.auth.parse_auth_config};
docs/security.rst), ``rbac`` and ``middleware_function_id`` (the reference's), and
``listeners`` (several worker ports, each with the listener keys above plus ``name``;
when given they replace the one the top-level keys describe)::

    listeners:
      - name: trusted
        listen: unix:/run/iii/workers.sock
      - name: public
        listen: ssl:49134:privateKey=key.pem:certKey=cert.pem
        auth: {tokens: [{name: web, token: "${WEB_TOKEN}", allowed_functions: ["public::*"]}]}

In the current format each ``iii-worker-manager`` entry is one listener.

The engine's ``limits:`` section (what one client may take of the engine) is
L{iii_twisted.limits.LIMITS_SCHEMA}; docs/limits.rst lists its keys.

``${VAR}`` and ``${VAR:default}`` are expanded in every string value after parsing.
Deviation from the reference, which substitutes in the raw text: comments are not
expanded, and an unset variable without a default is an error naming the file and the
key. A plain scalar that is exactly one ``${...}`` takes the YAML type of what it
expands to (``port: ${P:49134}`` is an int), as with the reference's text substitution.
"""

import os
import re

import yaml

from .cluster.settings import CLUSTER_SCHEMA, parse_cluster
from .limits import LIMITS_SCHEMA
from .schema import CURRENT, V010, Context, Key, MapOf, Section, Unsupported, closest

DEFAULT_PORT = 49134

_ENV = re.compile(r"\$\{([^}:]+)(?::([^}]*))?\}")
_WHOLE_ENV = re.compile(r"^\$\{([^}:]+)(?::([^}]*))?\}$")


class ConfigError(Exception):
    """
    A configuration that cannot be used.

    @ivar key: the dotted path of the offending key (``modules[2].config.port``) or
        None for the file as a whole.
    """

    def __init__(self, message, key=None, source=None):
        Exception.__init__(self, message)
        self.message = message
        self.key = key
        self.source = source

    def within(self, prefix):
        """@return: this error with C{prefix} put in front of its key."""
        key = prefix if not self.key else (
            prefix + self.key if self.key.startswith("[") else prefix + "." + self.key)
        return ConfigError(self.message, key, self.source)

    def __str__(self):
        where = ", ".join(x for x in (self.source, self.key and "key " + self.key) if x)
        return "{}: {}".format(where, self.message) if where else self.message


class _EnvRef:
    """A plain scalar that was exactly ``${VAR}`` or ``${VAR:default}``."""

    __slots__ = ("text",)

    def __init__(self, text):
        self.text = text


class _Loader(yaml.SafeLoader):
    pass


# Implicit resolvers apply to plain (unquoted) scalars only, which is what we want: a
# quoted "${PORT}" stays a string; an unquoted one takes the type of its value.
_Loader.add_implicit_resolver("!iii-env", _WHOLE_ENV, ["$"])
_Loader.add_constructor("!iii-env", lambda loader, node: _EnvRef(loader.construct_scalar(node)))


# The worker listener's keys: top-level in a v0.10 file, the ``iii-worker-manager``
# entry's config in a current one (iii_twisted/schema.py says how to add a key).
LISTENER_SCHEMA = Section(
    port=Key(int, DEFAULT_PORT, "TCP port workers connect to (0 means 49134)",
             min=0, max=65535),
    host=Key(str, "0.0.0.0", "interface the port listens on"),
    listen=Key(str, None, "a Twisted endpoint string; overrides port and host"),
    max_message_size=Key(int, 16 * 1024 * 1024, "largest worker frame, bytes", min=1),
    ws_ping_interval_ms=Key(int, 30000, "WebSocket ping interval, ms (0: none)", min=0),
    ws_ping_timeout_ms=Key(int, 30000, "time to answer a ping, ms", min=0),
    worker_max_frame_size=Key(int, 1024 * 1024, "largest frame sent to a worker that "
                              "does not say its runtime, bytes (peer_limits.py)", min=1),
    worker_max_frame_sizes=Key(MapOf(Key(int, min=1)), {}, "largest frame sent to a "
                               "worker by its declared runtime, bytes; over the built-in "
                               "python 1 MiB, node 100 MiB, rust 16 MiB"),
    handshake_timeout_ms=Key(int, 10000, "ms a client has to finish its WebSocket "
                             "opening handshake (docs/limits.rst; 0: no deadline)",
                             min=0),
    auth=Key(dict, None, "tokens and grants of connections to this port "
             "(docs/security.rst); absent: unauthenticated, every grant"),
    rbac=Key(dict, None, "the reference's RBAC: auth_function_id, expose_functions "
             "(docs/security.rst)"),
    middleware_function_id=Key(str, None, "a function every call from this port goes "
                               "through (docs/security.rst)"),
)

# One entry of ``listeners:`` (v0.10 format): the listener keys and a name.
LISTENER_ENTRY_SCHEMA = LISTENER_SCHEMA.extend(
    name=Key(str, None, "the listener's name, for logs and metrics"))

# The engine's own top-level keys, in both formats.
ENGINE_SCHEMA = Section(
    invocation_timeout_ms=Key(int, 300000, "ms before an unanswered call fails "
                              "(0: never)", min=0),
    watch=Key(bool, False, "reload when this file changes (it is polled)"),
    watch_interval_ms=Key(int, 1000, "how often the file is polled when watch is on, "
                          "ms", min=10),
    shutdown_timeout_ms=Key(int, 5000, "on SIGTERM, how long calls in flight may "
                            "finish before the engine stops, ms (0: stop at once)", min=0),
    limits=Key(LIMITS_SCHEMA, None, "what one client may take of the engine "
               "(docs/limits.rst)"),
    log_level=Key(str, "info", "least important log events kept (logsetup.py)",
                  choices=("debug", "info", "warn", "error", "critical")),
    log_format=Key(str, "text", "what twist iii writes, also when not on a terminal",
                   choices=("text", "json")),
    function_replicas=Key(str, "spread", "several live workers registering one "
                          "function id: spread calls across them, or last_wins (the "
                          "reference: the last registration replaces the others; "
                          "docs/cluster.rst)", choices=("spread", "last_wins")),
    cluster=Key(CLUSTER_SCHEMA, None, "makes this engine a member of a cluster of "
                "engines acting as one router (docs/cluster.rst); changing it needs a "
                "restart"),
)

# Top-level keys of each format besides the engine's own.
_ENTRY_LISTS = dict(
    modules=Key(list, [], "the modules, in start order"),
    workers=Key(list, [], "more modules (same shape as modules), after them"),
)
V010_SCHEMA = ENGINE_SCHEMA.extend(**LISTENER_SCHEMA.keys).extend(**_ENTRY_LISTS).extend(
    listeners=Key(list, None, "several worker ports, each {name, listen, auth, ...}; "
                  "they replace the one of port/host/listen"))
CURRENT_SCHEMA = ENGINE_SCHEMA.extend(
    registration_namespace_grace_ms=Key(int, 5000, "accepted for compatibility (this "
                                        "engine applies registrations at once; see "
                                        "namespaces.py)", min=0),
    **_ENTRY_LISTS)

LISTENER_NAME = "iii-worker-manager"


class ModuleEntry(tuple):
    """
    One module of the config, as the tuple C{(iii class, config, key)}.

    @ivar instance: its identity across reloads: the current-format name of its class,
        with ``#2``, ``#3``... for the second and later modules of the same class.
    """

    def __new__(cls, name, config, key, instance=None):
        entry = tuple.__new__(cls, (name, config, key))
        entry.instance = instance or name
        return entry

    name = property(lambda self: self[0])
    config = property(lambda self: self[1])
    key = property(lambda self: self[2])


class ListenerConfig:
    """
    One worker port.

    @ivar name: for logs and metrics (``iii-worker-manager`` for the first).
    @ivar listen: its endpoint string.
    @ivar auth: its L{iii_twisted.auth.AuthConfig}, or None (unauthenticated).
    @ivar max_message_size: bytes; C{ws_ping_interval}, C{ws_ping_timeout}: seconds.
    @ivar key: where it is in the file, for messages.
    @ivar frame_limits: its peer_limits.PeerFrameLimits, or None for the defaults.
    """

    def __init__(self, name, listen, auth=None, max_message_size=16 * 1024 * 1024,
                 ws_ping_interval=30.0, ws_ping_timeout=30.0, key="", frame_limits=None,
                 handshake_timeout=10.0):
        self.frame_limits = frame_limits
        self.handshake_timeout = handshake_timeout
        self.name = name
        self.listen = listen
        self.auth = auth
        self.max_message_size = max_message_size
        self.ws_ping_interval = ws_ping_interval
        self.ws_ping_timeout = ws_ping_timeout
        self.key = key

    def settings(self):
        """@return: what its listener is built from (compared on reload)."""
        return (self.name, self.listen, self.max_message_size, self.ws_ping_interval,
                self.ws_ping_timeout, self.frame_limits, self.handshake_timeout,
                self.auth.raw if self.auth is not None else None)


class EngineConfig:
    """
    A validated engine configuration: what both file formats load into.

    @ivar listen: the worker port's endpoint string (``tcp:49134:interface=0.0.0.0``).
    @ivar port: the worker port (the configured one; 0 only with an explicit listen).
    @ivar modules: a list of L{ModuleEntry} (C{(class name, config dict, key)}) in
        load order.
    @ivar invocation_timeout: seconds before an unanswered call fails.
    @ivar max_message_size: bytes; larger worker frames are dropped.
    @ivar ws_ping_interval, ws_ping_timeout: seconds.
    @ivar limits: the L{iii_twisted.limits.Limits} (the ``limits:`` mapping).
    @ivar handshake_timeout: seconds a client has to finish its WebSocket opening
        handshake on the worker port (``handshake_timeout_ms``).
    @ivar source: where it came from (a file name), for messages.
    @ivar format: ``v0.10`` or ``current``: which format the file was written in.
    @ivar watch: reload when the file changes; C{watch_interval}: seconds between polls.
    @ivar listener_key: the key path of the listener's settings (for messages).
    @ivar auth: the (first) listener's L{iii_twisted.auth.AuthConfig}, or None.
    @ivar listeners: the L{ListenerConfig}s of every worker port; the first is the one
        C{port}/C{listen}/C{auth} describe.
    @ivar function_replicas: ``spread`` or ``last_wins`` (L{iii_twisted.replicas}).
    @ivar cluster: the L{iii_twisted.cluster.settings.ClusterConfig} of the
        ``cluster:`` section, or None (not a cluster member).
    """

    def __init__(self, port=DEFAULT_PORT, host="0.0.0.0", listen=None, modules=(),
                 invocation_timeout=300.0, max_message_size=16 * 1024 * 1024,
                 ws_ping_interval=30.0, ws_ping_timeout=30.0, source=None,
                 format=V010, watch=False, watch_interval=1.0, listener_key="",
                 frame_limits=None, log_level="info", log_format="text",
                 shutdown_timeout=5.0, limits=None, handshake_timeout=10.0, auth=None,
                 listeners=None, function_replicas="spread", cluster=None):
        self.function_replicas = function_replicas
        self.cluster = cluster
        self.port = port
        self.host = host
        self.listen = listen or "tcp:{}:interface={}".format(port, host)
        self.modules = _with_instances(modules)
        self.invocation_timeout = invocation_timeout
        self.max_message_size = max_message_size
        self.ws_ping_interval = ws_ping_interval
        self.ws_ping_timeout = ws_ping_timeout
        self.handshake_timeout = handshake_timeout
        if limits is None:
            from .limits import Limits
            limits = Limits()
        self.limits = limits
        self.source = source
        self.format = format
        self.watch = watch
        self.watch_interval = watch_interval
        self.listener_key = listener_key
        # peer_limits.PeerFrameLimits (worker_max_frame_size[s]); None: the defaults.
        self.frame_limits = frame_limits
        self.log_level = log_level
        self.log_format = log_format
        self.shutdown_timeout = shutdown_timeout
        self.listeners = list(listeners) if listeners else [ListenerConfig(
            LISTENER_NAME, self.listen, auth, max_message_size, ws_ping_interval,
            ws_ping_timeout, listener_key, frame_limits, handshake_timeout)]
        self.auth = self.listeners[0].auth

    def listener_settings(self):
        """@return: what the worker listeners are built from (compared on reload)."""
        return tuple(listener.settings() for listener in self.listeners)


def load_config(path, environ=None):
    """
    Read, expand and validate a config file.

    @return: an L{EngineConfig}.
    @raise ConfigError: naming the file (and the key, where there is one) for a missing
        file, bad YAML, an unset variable, a wrong type or an unknown module class.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read config file: {}".format(e.strerror), source=path)
    return parse_config(text, source=path, environ=environ)


def parse_config(text, source="<config>", environ=None):
    """
    Parse, expand and validate config text; see L{load_config}.

    @raise ConfigError: as L{load_config}.
    """
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError("invalid YAML: {}".format(e), source=source)
    try:
        data = expand(raw, os.environ if environ is None else environ)
        return from_dict(data, source)
    except ConfigError as e:
        e.source = source
        raise


def expand(node, environ, key=""):
    """
    Replace ``${VAR:default}`` in every string of a parsed YAML tree.

    @return: the expanded tree.
    @raise ConfigError: for an unset variable without a default.
    """
    if isinstance(node, _EnvRef):
        value = _ENV.sub(lambda m: _lookup(m, environ, key), node.text)
        try:
            typed = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            return value
        return typed if isinstance(typed, (str, int, float, bool)) or typed is None else value
    if isinstance(node, str):
        return _ENV.sub(lambda m: _lookup(m, environ, key), node) if "${" in node else node
    if isinstance(node, dict):
        return {k: expand(v, environ, _join(key, k)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand(v, environ, "{}[{}]".format(key, i)) for i, v in enumerate(node)]
    return node


def _join(key, name):
    return "{}.{}".format(key, name) if key else str(name)


def _lookup(match, environ, key):
    name, default = match.group(1), match.group(2)
    value = environ.get(name)
    if value is not None:
        return value
    if default == "__III_ENGINE_VERSION__":  # as the reference: the engine's version
        from . import __version__
        return __version__
    if default is not None:
        return default
    raise ConfigError(
        "environment variable {} is not set and ${{{}}} has no default "
        "(write ${{{}:default}})".format(name, name, name), key)


def from_dict(data, source=None):
    """
    Validate an expanded config tree of either format (the v0.10 ``modules:
    [{class}]`` or the current ``workers: [{name}]``) into the one model.

    @return: an L{EngineConfig}.
    @raise ConfigError: naming the key path, for an unknown or misplaced key (with the
        key probably meant), a wrong type, a value out of range, an unknown module or
        adapter, a name this engine does not implement, or a file mixing the formats.
    """
    from .limits import Limits
    from .modules import MODULE_CLASSES, NOT_IMPLEMENTED, WORKER_NAMES, module_schema

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping, not {}".format(_kind(data)))
    fmt = detect_format(data)
    context = Context(fmt)
    top_schema = V010_SCHEMA if fmt == V010 else CURRENT_SCHEMA
    top = top_schema.validate(data, "", context)
    # A module's key that belongs at the top level gets a hint saying so.
    context = context.inside("", top_schema)
    if fmt == V010:
        listener, listener_key = top, ""
    else:
        listener, listener_key = {}, None
    modules = []
    names = {}  # current-format name -> first key using it
    listeners = []
    if fmt == V010:
        if top.get("listeners") is not None:
            for i, entry in enumerate(top["listeners"]):
                key = "listeners[{}]".format(i)
                values = LISTENER_ENTRY_SCHEMA.validate(entry, key, context)
                listeners.append(_listener(values, key, values.get("name") or (
                    LISTENER_NAME if i == 0 else "{}#{}".format(LISTENER_NAME, i + 1))))
            if not listeners:
                raise ConfigError("needs at least one listener", "listeners")
            for name in ("port", "host", "listen", "auth", "rbac", "middleware_function_id"):
                if data.get(name) is not None:
                    raise ConfigError("with listeners:, say {} in each listener".format(
                        name), name)
        else:
            listeners.append(_listener(top, "", LISTENER_NAME))
    for section in ("modules", "workers"):
        for i, entry in enumerate(top.get(section) or []):
            key = "{}[{}]".format(section, i)
            if not isinstance(entry, dict):
                raise ConfigError("each entry must be a mapping with a {}, not {}".format(
                    "class" if fmt == V010 else "name", _kind(entry)), key)
            if fmt == V010:
                name = _entry_class(entry, key, MODULE_CLASSES)
            else:
                name = _entry_name(entry, key, WORKER_NAMES, NOT_IMPLEMENTED)
                _check_migrated(entry["name"], key, names)
                if name == LISTENER_NAME:
                    # Each iii-worker-manager entry is one worker port, as in the
                    # reference (instance ids name#2, ...).
                    values = LISTENER_SCHEMA.validate(
                        entry.get("config"), key + ".config", context)
                    if listener_key is None:
                        listener_key, listener = key + ".config", values
                    listeners.append(_listener(values, key + ".config", LISTENER_NAME if
                                               len(listeners) == 0 else "{}#{}".format(
                                                   LISTENER_NAME, len(listeners) + 1)))
                    continue
            schema = module_schema(name)
            for extra in entry:
                if extra not in ("class", "name", "config", "image"):
                    raise _misplaced(extra, key, fmt, schema)
            config = schema.validate(entry.get("config"), key + ".config", context)
            modules.append((name, config, key))
    port = _value(listener, "port")
    if port == 0:  # as in the reference: 0 means the default port
        port = DEFAULT_PORT
    if not listeners:  # a current-format file without an iii-worker-manager entry
        listeners.append(_listener({}, "", LISTENER_NAME))
    listener_names = set()
    for each in listeners:
        if each.name in listener_names:
            raise ConfigError("listener name {!r} is used twice".format(each.name),
                              _join(each.key, "name"))
        listener_names.add(each.name)
    if fmt == V010 and top.get("listeners") is not None:
        first = listeners[0]
        listener = {"listen": first.listen, "max_message_size": first.max_message_size,
                    "ws_ping_interval_ms": int(first.ws_ping_interval * 1000),
                    "ws_ping_timeout_ms": int(first.ws_ping_timeout * 1000)}
    return EngineConfig(
        port=port, host=_value(listener, "host"), listen=_value(listener, "listen"),
        modules=modules,
        invocation_timeout=_value(top, "invocation_timeout_ms", ENGINE_SCHEMA) / 1000.0,
        max_message_size=_value(listener, "max_message_size"),
        ws_ping_interval=_value(listener, "ws_ping_interval_ms") / 1000.0,
        ws_ping_timeout=_value(listener, "ws_ping_timeout_ms") / 1000.0,
        source=source, format=fmt,
        watch=_value(top, "watch", ENGINE_SCHEMA),
        watch_interval=_value(top, "watch_interval_ms", ENGINE_SCHEMA) / 1000.0,
        listener_key=listener_key or "", listeners=listeners,
        frame_limits=listeners[0].frame_limits,
        log_level=_value(top, "log_level", ENGINE_SCHEMA),
        log_format=_value(top, "log_format", ENGINE_SCHEMA),
        shutdown_timeout=_value(top, "shutdown_timeout_ms", ENGINE_SCHEMA) / 1000.0,
        limits=Limits.from_config(top.get("limits")),
        handshake_timeout=listeners[0].handshake_timeout,
        function_replicas=_value(top, "function_replicas", ENGINE_SCHEMA),
        cluster=parse_cluster(top.get("cluster")),
    )


def _frame_limits(listener):
    from .peer_limits import PeerFrameLimits  # peer_limits imports ConfigError from here

    return PeerFrameLimits(_value(listener, "worker_max_frame_size"),
                           _value(listener, "worker_max_frame_sizes"))


def _listener(values, key, name):
    """@return: a L{ListenerConfig} from one listener's validated keys."""
    from .auth import parse_listener_auth

    port = _value(values, "port") or DEFAULT_PORT
    listen = _value(values, "listen") or "tcp:{}:interface={}".format(
        port, _value(values, "host"))
    prefix = key + "." if key else ""
    return ListenerConfig(
        name, listen,
        parse_listener_auth(values.get("auth"), values.get("rbac"),
                            values.get("middleware_function_id"), prefix),
        _value(values, "max_message_size"),
        _value(values, "ws_ping_interval_ms") / 1000.0,
        _value(values, "ws_ping_timeout_ms") / 1000.0, key, _frame_limits(values),
        _value(values, "handshake_timeout_ms") / 1000.0)


def _value(mapping, key, schema=LISTENER_SCHEMA):
    value = mapping.get(key)
    return schema.keys[key].default if value is None else value


def describe_all():
    """@return: every config key of the engine and its modules, as text."""
    from .authn import AUTH_KEYS, RBAC_KEYS, TOKEN_KEYS
    from .modules import MODULE_CLASSES, WORKER_NAMES, module_schema

    parts = ["Top level (both formats):", ENGINE_SCHEMA.describe("  "),
             "Worker listener (top level in v0.10; iii-worker-manager config in the "
             "current format):", LISTENER_SCHEMA.describe("  "),
             "Several worker ports (top level, v0.10 format): listeners, a list of "
             "listeners, each with the worker listener keys above and:",
             Section(name=LISTENER_ENTRY_SCHEMA.keys["name"]).describe("  "),
             "Worker listener auth (checked in authn.py; docs/security.rst):",
             "  auth keys: " + ", ".join(AUTH_KEYS),
             "  auth.tokens[] keys: " + ", ".join(TOKEN_KEYS),
             "  rbac keys: " + ", ".join(RBAC_KEYS)]
    factories = []
    for iii_class in WORKER_NAMES.values():
        if MODULE_CLASSES[iii_class] not in factories:
            factories.append(MODULE_CLASSES[iii_class])
    for iii_class in factories:
        classes = [c for c, f in MODULE_CLASSES.items() if f == iii_class]
        names = [n for n, c in WORKER_NAMES.items() if c in classes]
        parts.append("{} ({}):".format(" / ".join(names), ", ".join(classes)))
        parts.append(module_schema(classes[0]).describe("  ") or "  (no keys)")
    return "\n".join(parts)


def _with_instances(modules):
    """
    @return: C{modules} as L{ModuleEntry}s, each with its instance id: the
        current-format name of its class, ``#2``, ``#3``... for repeats.
    """
    from .modules import current_name

    seen, result = {}, []
    for module in modules:
        name, config, key = module[:3]
        base = current_name(name) or name
        seen[base] = seen.get(base, 0) + 1
        instance = base if seen[base] == 1 else "{}#{}".format(base, seen[base])
        result.append(ModuleEntry(name, config, key, instance))
    return result


def detect_format(data):
    """
    @return: L{V010} or L{CURRENT}: entries with ``class:`` are v0.10, entries with
        ``name:`` are current; a file without entries is v0.10 unless it has a key only
        the current format has.
    @raise ConfigError: for a file that mixes the two (saying where), or an entry with
        both class and name.
    """
    classes, names = [], []
    for section in ("modules", "workers"):
        entries = data.get(section)
        if not isinstance(entries, list):
            continue
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            key = "{}[{}]".format(section, i)
            if "class" in entry and "name" in entry:
                raise ConfigError(
                    "an entry has either class: (v0.10 format) or name: (current "
                    "format), not both", key)
            if "class" in entry:
                classes.append(key)
            elif "name" in entry:
                names.append(key)
    if classes and names:
        first, second = sorted([(classes[0], "class: (v0.10 format)"),
                                (names[0], "name: (current format)")])
        raise ConfigError(
            "this file mixes the two config formats: {} uses {} and {} uses {}; "
            "write every entry one way (twistd iii --convert FILE rewrites a file)".format(
                first[0], first[1], second[0], second[1]), second[0])
    if names or (not classes and "registration_namespace_grace_ms" in data):
        for key in data:
            if key in LISTENER_SCHEMA.keys:
                raise ConfigError(
                    "this file mixes the two config formats: top-level {k}: is the v0.10 "
                    "format, but its entries use name: (current format), where {k} goes "
                    "in the iii-worker-manager entry (workers: [{{name: "
                    "iii-worker-manager, config: {{{k}: ...}}}}])".format(k=key), key)
        return CURRENT
    return V010


# The reference's older names of its built-in workers and their short names (v0.22):
# a file may use either, not both (engine/src/workers/config.rs,
# validate_migrated_worker_duplicates).
MIGRATED_NAMES = {"iii-http": "http", "iii-cron": "cron", "iii-queue": "queue",
                  "iii-state": "state", "iii-pubsub": "pubsub"}


def _check_migrated(name, key, names):
    names.setdefault(name, key)
    for old, new in MIGRATED_NAMES.items():
        if name in (old, new) and old in names and new in names:
            raise ConfigError(
                "{old!r} is the older name of {new!r}, and both are present ({first} "
                "and {second}): use one of them".format(
                    old=old, new=new, first=names[old if name == new else new],
                    second=key), key + ".name")


def _entry_class(entry, key, known):
    name = entry.get("class")
    if not isinstance(name, str):
        raise ConfigError("missing or non-string class (the module's class name)",
                          key + ".class")
    if name not in known:
        hint = closest(name, known)
        raise ConfigError("unknown module class {}{}; known classes: {}".format(
            name, "; did you mean {}?".format(hint) if hint else "",
            ", ".join(sorted(known))), key + ".class")
    return name


def _entry_name(entry, key, known, refused):
    if entry.get("image") is not None:
        raise ConfigError("worker images (image:) are not part of this engine: start "
                          "such a worker yourself and let it connect", key + ".image")
    name = entry.get("name")
    if not isinstance(name, str):
        raise ConfigError("missing or non-string name (the worker's name)", key + ".name")
    if name == LISTENER_NAME:
        return name
    if name in refused:
        raise ConfigError("{}: {}".format(name, refused[name]), key + ".name")
    if name not in known:
        choices = [LISTENER_NAME] + list(known)
        hint = closest(name, choices)
        raise ConfigError(
            "unknown worker name {}{}; this engine runs these built-in workers: {} "
            "(any other worker is a process that connects to it)".format(
                name, "; did you mean {}?".format(hint) if hint else "",
                ", ".join(choices)), key + ".name")
    return known[name]


def _misplaced(extra, key, fmt, schema):
    where = "{}.{}".format(key, extra)
    if extra in schema.known():
        return ConfigError("unknown key {!r} beside config:; it belongs under config: "
                           "(check the indentation)".format(extra), where)
    wanted = ("class", "config") if fmt == V010 else ("name", "config")
    hint = closest(extra, wanted)
    return ConfigError("unknown key {!r}; an entry has {} and config{}".format(
        extra, wanted[0], "; did you mean {!r}?".format(hint) if hint else ""), where)


def _kind(value):
    return "null" if value is None else type(value).__name__


def _get(mapping, key, kind, default, prefix=""):
    """
    @param kind: a type, or C{(int, float)} for any number.
    @return: C{mapping[key]} checked to be a C{kind}, or C{default} when absent/null.
    @raise ConfigError: naming the key, for a value of another type.
    """
    value = mapping.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError("must be {}, not {} ({!r})".format(
            {int: "an integer", str: "a string", list: "a list", dict: "a mapping",
             bool: "true or false", float: "a number"}.get(kind, "a number"),
            _kind(value), value), prefix + key)
    return value


# Shared by modules to read their own config with errors that name the key.
get_option = _get
