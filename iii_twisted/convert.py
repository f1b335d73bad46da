"""
``twistd iii --convert FILE``: a config file rewritten in the other format.

A v0.10 file (``port``, ``modules: [{class, config}]``, adapters by ``class``) becomes
a current one (``workers: [{name, config}]``, the port in an ``iii-worker-manager``
entry, adapters by ``name``), and back. The file is validated first, so every
``${VAR}`` it uses without a default must be set (to any value of the right type: the
output keeps the reference as written, never its value). Comments are not carried over (the output says so).
The only key without a v0.10 equivalent, ``registration_namespace_grace_ms``, is
dropped with a note.
"""

import yaml

from .config import (
    LISTENER_NAME, LISTENER_SCHEMA, ConfigError, _Loader, parse_config,
)
from .modules import MODULE_CLASSES, WORKER_NAMES, current_name, module_schema
from .schema import Adapters, V010


class _RawLoader(yaml.SafeLoader):
    """Reads ``${VAR}`` as the text it is, so the output keeps it."""


_RawLoader.add_implicit_resolver("!iii-env", _Loader.yaml_implicit_resolvers["$"][0][1],
                                 ["$"])


class _Env(str):
    pass


_RawLoader.add_constructor(
    "!iii-env", lambda loader, node: _Env(loader.construct_scalar(node)))


class _Dumper(yaml.SafeDumper):
    pass


# A plain ${VAR} stays plain, so that it keeps the type of its value.
_Dumper.add_representer(_Env, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", str(value), style=""))


def convert_text(text, source="<config>"):
    """
    @return: (the target format's name, the converted file's text).
    @raise ConfigError: when the file does not validate.
    """
    config = parse_config(text, source=source)
    raw = yaml.load(text, Loader=_RawLoader) or {}
    if config.format == V010:
        converted, notes = _to_current(raw)
        target = "current"
    else:
        converted, notes = _to_v010(raw)
        target = "v0.10"
    header = ["# {} converted to the {} format by `twistd iii --convert` (comments of "
              "the original are not kept).".format(source, target)]
    header += ["# note: {}".format(n) for n in notes]
    body = yaml.dump(converted, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                     allow_unicode=True)
    return target, "\n".join(header) + "\n" + body


def _adapter_keys(iii_class):
    schema = module_schema(iii_class)
    return [name for name, key in schema.keys.items()
            if getattr(key, "kind", None) is not None and isinstance(key.kind, Adapters)]


def _to_current(raw):
    out, notes = {}, []
    listener = {}
    for key, value in raw.items():
        if key in ("modules", "workers", "listeners"):
            continue
        if key in LISTENER_SCHEMA.keys:
            listener[key] = value
        else:
            out[key] = value
    workers = []
    if listener:
        workers.append({"name": LISTENER_NAME, "config": listener})
    # Several worker ports: one iii-worker-manager entry each (their names become
    # the instance ids iii-worker-manager#2, ...).
    names = []
    for entry in raw.get("listeners") or []:
        if entry.get("name"):
            names.append(str(entry["name"]))
        config = {k: v for k, v in entry.items() if k != "name"}
        workers.append(dict({"name": LISTENER_NAME}, **({"config": config} if config else {})))
    for section in ("modules", "workers"):
        for entry in raw.get(section) or []:
            iii_class = entry["class"]
            item = {"name": current_name(iii_class) or iii_class}
            config = entry.get("config")
            if config:
                config = dict(config)
                for key in _adapter_keys(iii_class):
                    if isinstance(config.get(key), dict):
                        schema = module_schema(iii_class).keys[key].kind
                        config[key] = schema.to_current(config[key])
                item["config"] = config
            workers.append(item)
    out["workers"] = workers
    if names:
        # The current format has no name for a worker port: its entries are
        # iii-worker-manager, iii-worker-manager#2, ... in file order.
        notes.append("listener names not kept ({}): the current format names the "
                     "worker ports iii-worker-manager, iii-worker-manager#2, ... in this "
                     "order".format(", ".join(names)))
    return out, notes


def _to_v010(raw):
    out, notes, modules, listener, listeners = {}, [], [], {}, []
    for key, value in raw.items():
        if key in ("modules", "workers"):
            continue
        if key == "registration_namespace_grace_ms":
            notes.append("registration_namespace_grace_ms dropped (no v0.10 "
                         "equivalent)")
            continue
        out[key] = value
    for section in ("modules", "workers"):
        for entry in raw.get(section) or []:
            name = entry["name"]
            if name == LISTENER_NAME:
                listeners.append(dict(entry.get("config") or {}))
                continue
            iii_class = WORKER_NAMES[name]
            item = {"class": iii_class}
            config = entry.get("config")
            if config:
                config = dict(config)
                for key in _adapter_keys(iii_class):
                    adapter = config.get(key)
                    if isinstance(adapter, dict) and "name" in adapter:
                        kind = module_schema(iii_class).keys[key].kind
                        chosen = kind.by_name(adapter["name"])
                        converted = {"class": chosen.classes[0]}
                        if adapter.get("config"):
                            converted["config"] = adapter["config"]
                        config[key] = converted
                item["config"] = config
            modules.append(item)
    if len(listeners) == 1:
        listener = listeners[0]
    elif listeners:
        out["listeners"] = listeners
    result = dict(listener)
    result.update(out)
    result["modules"] = modules
    assert all(m["class"] in MODULE_CLASSES for m in modules)
    return result, notes


def convert_file(path):
    """@return: (target format, text) for the file at C{path}. @raise ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read config file: {}".format(e.strerror), source=path)
    return convert_text(text, source=path)
