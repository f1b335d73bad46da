"""
``iii-config.yaml``: loading, ``${VAR:default}`` expansion and validation.

The file's shape (../shared/spec/engine-core.md §10)::

    port: 49134                    # worker WebSocket port (0 means 49134)
    modules:                       # then `workers:`, same shape, appended
      - class: modules::state::StateModule
        config: {...}

Our own optional top-level keys (the reference ignores unknown keys, so a file using
them still loads there): ``host`` (interface, default 0.0.0.0), ``listen`` (a Twisted
endpoint string that overrides port and host), ``invocation_timeout_ms``,
``max_message_size``, ``ws_ping_interval_ms``, ``ws_ping_timeout_ms``, ``auth``
(tokens and grants of the worker port, L{iii_twisted.auth.parse_auth_config}) and
``listeners`` (several worker ports, each ``{name, listen, auth}``; when given they
replace the one of ``port``/``host``/``listen``/``auth``)::

    listeners:
      - name: trusted
        listen: unix:/run/iii/workers.sock
      - name: public
        listen: ssl:49134:privateKey=key.pem:certKey=cert.pem
        auth: {tokens: [{name: web, token: "${WEB_TOKEN}", allowed_functions: ["public::*"]}]}

``${VAR}`` and ``${VAR:default}`` are expanded in every string value after parsing.
Deviation from the reference, which substitutes in the raw text: comments are not
expanded, and an unset variable without a default is an error naming the file and the
key. A plain scalar that is exactly one ``${...}`` takes the YAML type of what it
expands to (``port: ${P:49134}`` is an int), as with the reference's text substitution.
"""

import os
import re

import yaml

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


class ListenerConfig:
    """
    One worker port.

    @ivar name: for logs and metrics (``workers`` for the default one).
    @ivar listen: its endpoint string.
    @ivar auth: its L{iii_twisted.auth.AuthConfig}, or None (unauthenticated).
    """

    def __init__(self, name, listen, auth=None):
        self.name = name
        self.listen = listen
        self.auth = auth


class EngineConfig:
    """
    A validated engine configuration.

    @ivar listen: the worker port's endpoint string (``tcp:49134:interface=0.0.0.0``).
    @ivar port: the worker port (the configured one; 0 only with an explicit listen).
    @ivar modules: a list of (class name, config dict, key) in load order.
    @ivar invocation_timeout: seconds before an unanswered call fails.
    @ivar max_message_size: bytes; larger worker frames are dropped.
    @ivar ws_ping_interval, ws_ping_timeout: seconds.
    @ivar auth: the default listener's L{iii_twisted.auth.AuthConfig}, or None.
    @ivar listeners: the L{ListenerConfig}s of the worker ports (the first is the one
        C{port}/C{listen}/C{auth} describe, unless ``listeners:`` replaced it).
    @ivar source: where it came from (a file name), for messages.
    """

    def __init__(self, port=DEFAULT_PORT, host="0.0.0.0", listen=None, modules=(),
                 invocation_timeout=300.0, max_message_size=16 * 1024 * 1024,
                 ws_ping_interval=30.0, ws_ping_timeout=30.0, source=None, auth=None,
                 listeners=None):
        self.port = port
        self.host = host
        self.listen = listen or "tcp:{}:interface={}".format(port, host)
        self.modules = list(modules)
        self.invocation_timeout = invocation_timeout
        self.max_message_size = max_message_size
        self.ws_ping_interval = ws_ping_interval
        self.ws_ping_timeout = ws_ping_timeout
        self.source = source
        self.auth = auth
        self.listeners = list(listeners) if listeners else [
            ListenerConfig("workers", self.listen, auth)]


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
    if default is not None:
        return default
    raise ConfigError(
        "environment variable {} is not set and ${{{}}} has no default "
        "(write ${{{}:default}})".format(name, name, name), key)


def from_dict(data, source=None):
    """
    Validate an expanded config tree.

    @return: an L{EngineConfig}.
    @raise ConfigError: for a wrong shape or type, or an unknown module class.
    """
    from .modules import MODULE_CLASSES

    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("the file must hold a mapping, not {}".format(_kind(data)))
    port = _get(data, "port", int, DEFAULT_PORT)
    if not 0 <= port <= 65535:
        raise ConfigError("port must be between 0 and 65535, not {}".format(port), "port")
    if port == 0:  # as in the reference: 0 means the default port
        port = DEFAULT_PORT
    host = _get(data, "host", str, "0.0.0.0")
    listen = _get(data, "listen", str, None)
    modules = []
    for section in ("modules", "workers"):
        entries = _get(data, section, list, [])
        for i, entry in enumerate(entries):
            key = "{}[{}]".format(section, i)
            if not isinstance(entry, dict):
                raise ConfigError("each module must be a mapping with a class", key)
            name = entry.get("class")
            if not isinstance(name, str):
                raise ConfigError("missing or non-string class", key + ".class")
            if name not in MODULE_CLASSES:
                raise ConfigError(
                    "unknown module class {}; known classes: {}".format(
                        name, ", ".join(sorted(MODULE_CLASSES))), key + ".class")
            config = entry.get("config")
            if config is None:
                config = {}
            if not isinstance(config, dict):
                raise ConfigError("config must be a mapping, not {}".format(_kind(config)),
                                  key + ".config")
            modules.append((name, config, key))
    from .auth import parse_auth_config

    auth = parse_auth_config(data.get("auth"), "auth")
    listeners = None
    if data.get("listeners") is not None:
        listeners, names = [], set()
        for i, entry in enumerate(_get(data, "listeners", list, [])):
            key = "listeners[{}]".format(i)
            if not isinstance(entry, dict):
                raise ConfigError("each listener must be a mapping with listen", key)
            unknown = set(entry) - {"name", "listen", "auth"}
            if unknown:
                raise ConfigError("unknown key; known keys: name, listen, auth",
                                  "{}.{}".format(key, sorted(unknown)[0]))
            listen_at = _get(entry, "listen", str, None, key + ".")
            if not listen_at:
                raise ConfigError("missing listen (an endpoint string such as "
                                  "tcp:49134:interface=127.0.0.1)", key + ".listen")
            name = _get(entry, "name", str, "workers#{}".format(i + 1), key + ".")
            if name in names:
                raise ConfigError("listener name {!r} is used twice".format(name),
                                  key + ".name")
            names.add(name)
            listeners.append(ListenerConfig(
                name, listen_at, parse_auth_config(entry.get("auth"), key + ".auth")))
        if not listeners:
            raise ConfigError("needs at least one listener", "listeners")
        if auth is not None:
            raise ConfigError("give each listener its own auth: the top-level auth "
                              "applies only without listeners", "auth")
    return EngineConfig(
        port=port, host=host, listen=listen, modules=modules, auth=auth,
        listeners=listeners,
        invocation_timeout=_get(data, "invocation_timeout_ms", int, 300000) / 1000.0,
        max_message_size=_get(data, "max_message_size", int, 16 * 1024 * 1024),
        ws_ping_interval=_get(data, "ws_ping_interval_ms", int, 30000) / 1000.0,
        ws_ping_timeout=_get(data, "ws_ping_timeout_ms", int, 30000) / 1000.0,
        source=source,
    )


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
