"""
The start-up report: what the engine logs when it starts, so that an operator sees at
once which version runs, from which file, which modules with which ports and where
their data lives.

Two hooks answer it:

- every L{iii_twisted.listeners.Listener} in a module's service tree answers
  C{report()} (its endpoint, bound port, and whether it is authenticated);
- a module may define C{report_data()} returning lines about its data; otherwise its
  C{store} (if any) is described: ``in memory``, or the absolute path of a file store.
"""

import os

from . import __version__
from .listeners import listeners_of


def describe_store(store):
    """@return: where a store keeps its data: an absolute path, or ``in memory``."""
    if store is None:
        return None
    from .reload import KeptStore
    inner = store._store if isinstance(store, KeptStore) else store
    for attribute in ("directory", "path"):
        value = getattr(inner, attribute, None)
        if isinstance(value, str):
            opened = getattr(inner, "opened_as", None)  # "new store", "existing ..."
            return "data in {}{}".format(os.path.abspath(value),
                                         " ({})".format(opened) if opened else "")
    return "data in memory"


def module_lines(instance, module):
    """@return: the report's lines about one module."""
    details = []
    for listener in listeners_of(module):
        details.append(listener.report())
    answer = getattr(module, "report_data", None)
    if answer is not None:
        details.extend(answer())
    else:
        store = describe_store(getattr(module, "store", None))
        if store is not None:
            details.append(store)
    head = "module {} ({})".format(instance, module.iii_class)
    return [head + (": " + "; ".join(details) if details else "")]


def startup_report(service):
    """
    @param service: a running L{iii_twisted.service.EngineService}.
    @return: the report's lines.
    """
    config = service.config
    source = service.config_path or config.source
    lines = ["iii-twisted {} (the iii engine on Twisted)".format(__version__),
             "config: {} ({} format)".format(
                 os.path.abspath(source) if source and os.path.exists(source)
                 else source or "none (defaults)", config.format)]
    for listener in getattr(service, "_listeners", [service._listener]):
        lines.append("worker " + listener.report())
    for instance, (entry, module) in service._instances.items():
        lines.extend(module_lines(instance, module))
    cluster = getattr(service, "cluster", None)
    if cluster is not None:
        lines.extend(cluster.report())
    if config.watch:
        lines.append("watching {} for changes every {}s".format(
            source, config.watch_interval))
    nofile = getattr(service, "nofile_limit", None)
    if nofile:
        lines.append("open-file limit: soft {} (was {}), hard {}".format(*nofile))
    return lines
