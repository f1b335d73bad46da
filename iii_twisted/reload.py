"""
Reload: the difference between two L{iii_twisted.config.EngineConfig}s, and how a
module is handed over from its old instance to its new one.

Modules are matched by instance id (the current-format name of their class, ``#2``,
``#3``... for repeats), so a file rewritten from one format to the other with the same
meaning changes nothing. A module whose class or config differs is restarted; the
engine core (registry, tracker, worker connections) is never rebuilt. Deviation from the
reference: a file that fails validation is refused and the running config kept (the
reference exits).
"""

import inspect

from twisted.internet.defer import succeed

from .modules import MODULE_CLASSES, load_module_factory


class ConfigChanges:
    """
    What a reload changes.

    @ivar added, removed, changed: instance ids of modules.
    @ivar listener: whether the worker listener's settings changed.
    @ivar engine: names of changed engine-wide settings.
    """

    def __init__(self, added=(), removed=(), changed=(), listener=False, engine=()):
        self.added = list(added)
        self.removed = list(removed)
        self.changed = list(changed)
        self.listener = listener
        self.engine = list(engine)

    def __bool__(self):
        return bool(self.added or self.removed or self.changed or self.listener
                    or self.engine)

    def describe(self):
        """@return: one line listing what changed (for the log)."""
        parts = []
        for label, items in (("restarted", self.changed), ("started", self.added),
                             ("stopped", self.removed)):
            if items:
                parts.append("{} {}".format(label, ", ".join(items)))
        if self.listener:
            parts.append("worker listener restarted (connected workers stay)")
        if self.engine:
            parts.append("changed {}".format(", ".join(self.engine)))
        return "; ".join(parts) if parts else "nothing changed"


def _cluster(config):
    cluster = getattr(config, "cluster", None)
    return None if cluster is None else cluster.settings()


def _same_module(a, b):
    return MODULE_CLASSES[a.name] == MODULE_CLASSES[b.name] and a.config == b.config


def diff_configs(old, new):
    """@return: the L{ConfigChanges} that take C{old} to C{new}."""
    before = {m.instance: m for m in old.modules}
    after = {m.instance: m for m in new.modules}
    engine = []
    if old.invocation_timeout != new.invocation_timeout:
        engine.append("invocation_timeout_ms")
    if (old.watch, old.watch_interval) != (new.watch, new.watch_interval):
        engine.append("watch")
    if old.limits.settings() != new.limits.settings():
        engine.append("limits")
    for name in ("log_level", "log_format"):
        if getattr(old, name, None) != getattr(new, name, None):
            engine.append(name)
    if _cluster(old) != _cluster(new):
        engine.append("cluster (not applied: a cluster: change needs a restart)")
    return ConfigChanges(
        added=[i for i in after if i not in before],
        removed=[i for i in before if i not in after],
        changed=[i for i in after if i in before and not _same_module(before[i], after[i])],
        listener=old.listener_settings() != new.listener_settings(),
        engine=engine,
    )


class KeptStore:
    """
    A store handed from a module's old instance to its new one: the old instance
    keeps serving the calls it has in flight through this proxy, and its stop does
    not close the store, which lives on in the new instance.
    """

    def __init__(self, store):
        self._store = store

    def close(self):
        return succeed(None)

    def __getattr__(self, name):
        return getattr(self._store, name)


def handover(old_module, old_entry, new_entry):
    """
    @return: the keyword arguments that give the new instance what the old one keeps
        (its store, when the adapter config did not change and the module's class
        lists ``store`` in its C{reload_handover}: a store usable by two instances in
        turn without being reopened), after making the old instance's stop leave it
        open. Other modules' stores are closed by the old instance and reopened by the
        new one (a file store keeps its data that way).
    """
    factory = load_module_factory(new_entry.name)
    store = getattr(old_module, "store", None)
    if store is None or MODULE_CLASSES[old_entry.name] != MODULE_CLASSES[new_entry.name]:
        return {}
    if "store" not in getattr(factory, "reload_handover", ()):
        return {}
    if (old_entry.config or {}).get("adapter") != (new_entry.config or {}).get("adapter"):
        return {}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return {}
    if "store" not in parameters:
        return {}
    old_module.store = KeptStore(store)
    return {"store": store}
