"""
Declarative config schemas: every config key the engine reads is declared once, next to
the code that reads it, with its type, default, allowed range and a line of doc.

How to declare a key
====================

Each module class has a ``config_schema`` (a L{Section}); the worker listener's keys
are in L{iii_twisted.worker.LISTENER_SCHEMA}, the engine's own top-level keys in
L{iii_twisted.config.ENGINE_SCHEMA}, the key-value store adapter's in
L{iii_twisted.adapters.KV_STORE_SCHEMA}. Adding a key is one line in that section::

    config_schema = Section(
        port=Key(int, 3111, "TCP port of the HTTP API", min=0, max=65535),
        host=Key(str, "0.0.0.0", "interface the port listens on"),
        cors=Key(Section(
            allowed_origins=Key(ListOf(str), [], "origins allowed; empty or * = any"),
        ), None, "CORS answers"),
        redis_url=Key(str, "redis://localhost:6379", "where the store is"),   # new key
    )

A key's kind is one of ``int``, ``float`` (any number), ``str``, ``bool``, ``list``
(any list), ``dict`` (any mapping), a nested L{Section}, L{ListOf}, L{MapOf},
L{Adapters} or a tuple of these (any of them; the value's type picks one). ``min``,
``max`` and ``choices`` restrict the value. A null value (``key:`` with nothing after
it) is the same as leaving the key out. L{Unsupported} declares a key the reference
has and we refuse with a message saying why.

An adapter (the ``adapter:`` of state, stream, queue, pub/sub, cron) is declared with
L{Adapters}: one L{Adapter} per implementation, each with its current-format name
(``kv``, ``redis``, ...), its v0.10 class names and the schema of its ``config:``::

    adapter=Key(Adapters(
        Adapter("kv", ("modules::state::adapters::KvStore",), KV_STORE_SCHEMA),
        Adapter("redis", ("modules::state::adapters::RedisAdapter",), REDIS_SCHEMA),
    ), None, "where values are kept")

What validation does
====================

L{Section.validate} checks every key at every depth and raises
L{iii_twisted.config.ConfigError} naming the key's path (``workers[2].config.cors.x``)
for an unknown key (with the closest known key, or the section where it belongs when
it was indented one level too deep or too shallow), a wrong type or a value out of
range. It returns a normalised copy: adapters are always ``{class, config}`` with the
v0.10 class name, whichever format the file was written in, so modules read one shape.
Defaults are not filled in (modules apply them, and the report shows them); they are
declared so that the docs and ``describe()`` show them.
"""

import difflib

_KIND_NAMES = {
    int: "an integer", float: "a number", str: "a string", bool: "true or false",
    list: "a list", dict: "a mapping",
}

V010 = "v0.10"
CURRENT = "current"


def _error(message, key):
    from .config import ConfigError
    return ConfigError(message, key or None)


def _kind_of(value):
    return "null" if value is None else {
        bool: "a boolean", int: "an integer", float: "a number", str: "a string",
        list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def _join(path, key):
    return "{}.{}".format(path, key) if path else str(key)


def closest(word, candidates):
    """@return: the candidate closest to C{word} (difflib), or None."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=1,
                                        cutoff=0.6)
    return matches[0] if matches else None


class Context:
    """
    What validation needs besides the value: the file's format and the sections
    around the current one (to say where a misplaced key belongs).

    @ivar format: L{V010} or L{CURRENT}.
    @ivar ancestors: (path, L{Section}) pairs, outermost first.
    """

    def __init__(self, format=V010, ancestors=()):
        self.format = format
        self.ancestors = tuple(ancestors)

    def inside(self, path, section):
        return Context(self.format, self.ancestors + ((path, section),))


class Key:
    """
    One config key.

    @ivar kind: what the value may be (see the module docstring).
    @ivar default: the value used when the key is absent (documentation: modules
        apply it).
    @ivar doc: one line saying what the key does, with its unit.
    """

    def __init__(self, kind, default=None, doc="", min=None, max=None, choices=None,
                 required=False, check=None):
        """
        @param check: a callable taking the value and returning None when it is
            acceptable, or a message saying what is allowed (``host`` must be an IP
            address, ...).
        """
        self.check = check
        self.kind = kind
        self.default = default
        self.doc = doc
        self.min = min
        self.max = max
        self.choices = tuple(choices) if choices is not None else None
        self.required = required

    def validate(self, value, path, context):
        """@return: the normalised value. @raise ConfigError: naming C{path}."""
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        for kind in kinds:
            if _matches(kind, value):
                value = _validate_kind(kind, value, path, context)
                break
        else:
            raise _error("must be {}, not {} ({})".format(
                " or ".join(_describe(k) for k in kinds), _kind_of(value),
                _short(value)), path)
        if self.choices is not None and value not in self.choices:
            hint = closest(value, self.choices) if isinstance(value, str) else None
            raise _error("must be one of {}, not {!r}{}".format(
                ", ".join(str(c) for c in self.choices), value,
                "; did you mean {!r}?".format(hint) if hint else ""), path)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            low, high = self.min, self.max
            if (low is not None and value < low) or (high is not None and value > high):
                if low is not None and high is not None:
                    allowed = "between {} and {}".format(low, high)
                elif low is not None:
                    allowed = "at least {}".format(low)
                else:
                    allowed = "at most {}".format(high)
                raise _error("must be {}, not {}".format(allowed, value), path)
        if self.check is not None:
            problem = self.check(value)
            if problem:
                raise _error(problem, path)
        return value


class Unsupported:
    """A key the reference has and this engine refuses, with the reason."""

    def __init__(self, why):
        self.why = why

    def validate(self, value, path, context):
        raise _error(self.why, path)


def _short(value):
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _describe(kind):
    if isinstance(kind, Section):
        return "a mapping"
    if isinstance(kind, ListOf):
        return "a list"
    if isinstance(kind, (MapOf, Adapters)):
        return "a mapping"
    return _KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _matches(kind, value):
    if isinstance(kind, (Section, MapOf, Adapters)):
        return isinstance(value, dict)
    if isinstance(kind, ListOf):
        return isinstance(value, list)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _validate_kind(kind, value, path, context):
    if isinstance(kind, (Section, ListOf, MapOf, Adapters)):
        return kind.validate(value, path, context)
    if kind is float:
        return value
    if kind in (list, dict):
        return value
    return value


class ListOf:
    """A list whose items are each of C{kind} (a type or a schema)."""

    def __init__(self, kind):
        self.item = kind if isinstance(kind, Key) else Key(kind)

    def validate(self, value, path, context):
        return [self.item.validate(v, "{}[{}]".format(path, i), context)
                for i, v in enumerate(value)]


class MapOf:
    """A mapping from free names (queue names, header names) to values of C{kind}."""

    def __init__(self, kind):
        self.item = kind if isinstance(kind, Key) else Key(kind)

    def validate(self, value, path, context):
        return {name: (None if v is None else self.item.validate(v, _join(path, name),
                                                                  context))
                for name, v in value.items()}


class Section:
    """
    A mapping with a fixed set of keys, each a L{Key} (or L{Unsupported}); keyword
    order is the documented order.

    @param _open: accept keys not declared (their values unchecked): only for
        sections the engine ignores as a whole.
    @param _check: a callable taking the validated mapping and returning None, or
        C{(key, message)} for a rule across keys (a fifo queue needs its group field).
    """

    def __init__(self, _open=False, _check=None, **keys):
        self.keys = {}
        self.open = _open
        self.check = _check
        for name, key in keys.items():
            self.add(name, key)

    def add(self, name, key):
        """Declare one more key (a L{Key}, L{Unsupported} or a bare schema)."""
        if not isinstance(key, (Key, Unsupported)):
            key = Key(key)
        self.keys[name] = key
        return self

    def extend(self, **keys):
        """@return: a new section with this one's keys and C{keys}."""
        section = Section(_open=self.open, _check=self.check, **self.keys)
        for name, key in keys.items():
            section.add(name, key)
        return section

    def known(self):
        """@return: the names of the keys this section accepts (not the refused ones)."""
        return [n for n, k in self.keys.items() if isinstance(k, Key)]

    def validate(self, value, path="", context=None):
        """
        @param value: the mapping read from the file (None means empty).
        @param path: the mapping's key path, for messages.
        @return: a normalised copy.
        @raise ConfigError: naming the key path of the first fault.
        """
        if context is None:
            context = Context()
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _error("must be a mapping, not {} ({})".format(
                _kind_of(value), _short(value)), path)
        inner = context.inside(path, self)
        result = {}
        for name, item in value.items():
            key = self.keys.get(name)
            if key is None:
                if self.open:
                    result[name] = item
                    continue
                raise self.unknown(name, path, context)
            if item is None:
                if isinstance(key, Key) and key.required:
                    raise _error("is required", _join(path, name))
                result[name] = None
                continue
            result[name] = key.validate(item, _join(path, name), inner)
        for name, key in self.keys.items():
            if isinstance(key, Key) and key.required and value.get(name) is None:
                raise _error("is required{}".format(
                    " ({})".format(key.doc) if key.doc else ""), _join(path, name))
        if self.check is not None:
            problem = self.check(result)
            if problem:
                raise _error(problem[1], _join(path, problem[0]))
        return result

    def unknown(self, name, path, context):
        """@return: the ConfigError for an unknown key C{name} in this section."""
        where = _join(path, name)
        known = self.known()
        hint = closest(name, known)
        if hint is not None:
            return _error("unknown key {!r}; did you mean {!r}?".format(name, hint), where)
        # Indented one level too deep: the key belongs to an enclosing section.
        for outer_path, outer in reversed(context.ancestors):
            if name in outer.known():
                return _error("unknown key {!r} here; it belongs {} (check the "
                              "indentation)".format(name, _placed(outer_path)), where)
        # Indented one level too shallow: it belongs to a section inside this one.
        for child_name, child in self.keys.items():
            kind = child.kind if isinstance(child, Key) else None
            if isinstance(kind, Section) and name in kind.known():
                return _error("unknown key {!r} here; it belongs under {!r} (check the "
                              "indentation)".format(name, child_name), where)
        return _error("unknown key {!r}; known keys: {}".format(
            name, ", ".join(known) if known else "none"), where)

    def describe(self, indent=""):
        """@return: the keys, their kinds, defaults and docs, as indented text."""
        lines = []
        for name, key in self.keys.items():
            if isinstance(key, Unsupported):
                lines.append("{}{}: refused ({})".format(indent, name, key.why))
                continue
            kinds = key.kind if isinstance(key.kind, tuple) else (key.kind,)
            limits = ""
            if key.choices is not None:
                limits = ", one of {}".format(", ".join(str(c) for c in key.choices))
            elif key.min is not None or key.max is not None:
                limits = ", {}..{}".format("" if key.min is None else key.min,
                                           "" if key.max is None else key.max)
            text = "{}{} ({}{}{}{}): {}".format(
                indent, name, " or ".join(_describe(k) for k in kinds), limits,
                "" if key.default is None else ", default {!r}".format(key.default),
                ", required" if key.required else "", key.doc)
            lines.append(text.rstrip(": "))
            for kind in kinds:
                lines.append(_describe_inner(kind, indent + "  "))
        return "\n".join(line for line in lines if line)


def _describe_inner(kind, indent):
    """@return: the keys inside a nested kind, indented (empty for plain types)."""
    if isinstance(kind, Section):
        return kind.describe(indent)
    if isinstance(kind, (ListOf, MapOf)):
        inner = kind.item.kind
        label = "each item" if isinstance(kind, ListOf) else "each entry (by name)"
        text = _describe_inner(inner, indent + "  ")
        return "{}{}:\n{}".format(indent, label, text) if text else ""
    if isinstance(kind, Adapters):
        lines = []
        for adapter in kind.adapters:
            head = "{}name: {} (v0.10 class: {})".format(
                indent, adapter.name, ", ".join(adapter.classes))
            if adapter.schema is None:
                lines.append(head + ": not available in this engine")
                continue
            lines.append(head + (", config:" if adapter.schema.keys else ""))
            lines.append(adapter.schema.describe(indent + "  "))
        return "\n".join(line for line in lines if line)
    return ""


def _placed(path):
    return "in {!r}".format(path) if path else "at the top level"


class Adapter:
    """
    One adapter implementation.

    @param name: its current-format name (``kv``, ``redis``, ``builtin``, ``local``).
    @param classes: its v0.10 class names, the first being the one modules receive.
    @param schema: the L{Section} of its ``config:``, or None when this engine does
        not implement it (then C{why} says so).
    """

    def __init__(self, name, classes, schema, why=None):
        self.name = name
        self.classes = tuple(classes)
        self.schema = schema
        self.why = why or "the {} adapter is not available in this engine".format(name)


class Adapters:
    """
    The ``adapter:`` key: ``{class: <v0.10 class>, config}`` in a v0.10 file,
    ``{name: <adapter name>, config}`` in a current-format file. Validates the config
    against the chosen adapter's schema and returns ``{class, config}``.
    """

    def __init__(self, *adapters):
        self.adapters = adapters

    def by_name(self, name):
        for adapter in self.adapters:
            if adapter.name == name:
                return adapter
        return None

    def by_class(self, cls):
        for adapter in self.adapters:
            if cls in adapter.classes:
                return adapter
        return None

    def validate(self, value, path, context):
        for key in value:
            if key not in ("class", "name", "config"):
                wanted = "name" if context.format == CURRENT else "class"
                hint = closest(key, (wanted, "config"))
                raise _error("unknown key {!r}; an adapter has {} and config{}".format(
                    key, wanted, "; did you mean {!r}?".format(hint) if hint else ""),
                    _join(path, key))
        if "class" in value and "name" in value:
            raise _error("give the adapter either class (v0.10 files) or name (current "
                         "files), not both", path)
        if context.format == CURRENT and "class" in value:
            raise _error("adapter class: is the v0.10 format, but this file uses the "
                         "current format (workers: [{{name}}]); write name: {}".format(
                             self._name_for(value["class"])), _join(path, "class"))
        if context.format == V010 and "name" in value:
            raise _error("adapter name: is the current format, but this file uses the "
                         "v0.10 format (modules: [{{class}}]); write class: {}".format(
                             self._class_for(value["name"])), _join(path, "name"))
        field = "name" if context.format == CURRENT else "class"
        chosen = value.get(field)
        if chosen is None:
            adapter = self.adapters[0]
            cls = adapter.classes[0]
        else:
            if not isinstance(chosen, str):
                raise _error("must be a string, not {}".format(_kind_of(chosen)),
                             _join(path, field))
            adapter = (self.by_name(chosen) if field == "name" else self.by_class(chosen))
            if adapter is None:
                choices = ([a.name for a in self.adapters] if field == "name" else
                           [c for a in self.adapters for c in a.classes])
                hint = closest(chosen, choices)
                raise _error("unknown adapter {!r}{}; known: {}".format(
                    chosen, "; did you mean {!r}?".format(hint) if hint else "",
                    ", ".join(choices)), _join(path, field))
            cls = chosen if field == "class" else adapter.classes[0]
        if adapter.schema is None:
            raise _error(adapter.why, _join(path, field))
        config = adapter.schema.validate(value.get("config"), _join(path, "config"),
                                         context)
        return {"class": cls, "config": config}

    def _name_for(self, cls):
        adapter = self.by_class(cls)
        return adapter.name if adapter else "<adapter name>"

    def _class_for(self, name):
        adapter = self.by_name(name)
        return adapter.classes[0] if adapter else "<adapter class>"

    def to_current(self, value):
        """@return: a normalised ``{class, config}`` written as ``{name, config}``."""
        adapter = self.by_class(value.get("class"))
        out = {"name": adapter.name if adapter else value.get("class")}
        if value.get("config"):
            out["config"] = value["config"]
        return out
