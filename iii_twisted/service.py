"""
L{EngineService}: the whole engine as one Twisted C{MultiService}.

``twistd iii`` runs one; an existing Twisted application embeds one::

    from iii_twisted.service import EngineService

    engine_service = EngineService.from_file("iii-config.yaml", reactor=reactor)
    engine_service.setServiceParent(application)
    engine_service.engine.register_function("app::hello", lambda data: {"hi": data})

    # later: apply the edited file (or pass a new config); only changed modules restart
    engine_service.reload()
"""

import os
import signal

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, fail, maybeDeferred, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger

from . import __version__
from .auth import Authenticator
from .channels import install_channels
from .config import ConfigError, EngineConfig, from_dict, load_config
from . import health
from .engine import Engine
from .health import Health
from .limits import raise_nofile_limit
from .listeners import Listener, ListenerError
from .modules import build_module
from .reload import KeptStore, diff_configs, handover
from .report import startup_report
from .worker import WorkerFactory

DRAIN_POLL = 0.05  # seconds between looks at the calls in flight while draining

# Engine attributes a module may set to itself (cleared when it is removed).
_ENGINE_HOOKS = ("enqueuer", "telemetry_sink", "worker_metrics", "http_functions")


class EngineService(MultiService):
    """
    The engine, its modules and its worker listener.

    Children start in this order: the modules (in config order), then the worker port,
    so that a worker never connects before the functions it may call exist. They stop
    in reverse: the port first, then the modules; finally every worker is
    disconnected and every pending call fails with ``invocation_stopped``.

    L{reload} applies a new config while running: only modules whose config changed
    restart (see L{iii_twisted.reload}); the engine core and worker connections stay.

    @ivar engine: the L{Engine}; register in-process functions on it and call any
        function with C{engine.call(function_id, data)}.
    @ivar modules: the loaded modules, in config order.
    @ivar worker_factory: the L{WorkerFactory} of the (first) worker port.
    @ivar worker_factories: those of every worker port (several listeners), in order.
    @ivar config: the running L{EngineConfig}.
    @ivar config_path: the file L{reload} rereads (None: reload needs a config).
    @ivar reload_on_sighup: when True (``twistd iii`` sets it), SIGHUP reloads.
    """

    _log = Logger()

    def __init__(self, config=None, reactor=None, config_path=None,
                 cluster_directory=None):
        """
        @param config: an L{EngineConfig}, a dict shaped like ``iii-config.yaml``, or
            None for the defaults (port 49134, no modules).
        @param reactor: the reactor to run on; the global one when None.
        @param config_path: the file to reread on L{reload} (default: the file the
            config was loaded from, if any).
        @param cluster_directory: with a ``cluster:`` section, the
            L{iii_twisted.cluster.directory.IClusterDirectory} to use instead of the
            Redis one (engines in one process: a C{MemoryDirectory}).
        @raise ConfigError: for a config that cannot be used (a module refuses its
            config, or the dict is malformed).
        """
        MultiService.__init__(self)
        if reactor is None:
            from twisted.internet import reactor
        if config is None:
            config = EngineConfig()
        elif isinstance(config, dict):
            config = from_dict(config, source="<dict>")
        if config_path is None and config.source and os.path.isfile(config.source):
            config_path = config.source
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.reload_on_sighup = False
        self.engine = Engine(reactor, invocation_timeout=config.invocation_timeout,
                             function_replicas=config.function_replicas)
        self.engine.limits = config.limits
        self.engine.health = Health(reactor, lambda: self.modules,
                                    lambda: health.directory_of(self.engine),
                                    lambda: health.unlinked_of(self.engine))
        # Data channels first: modules (the REST API) create channels too, and the
        # sweep stops after them.
        self.channels = install_channels(self.engine, reactor)
        self.channels.setServiceParent(self)
        self.modules = []
        self._instances = {}  # instance id -> (ModuleEntry, module)
        for entry in config.modules:
            module = self._build(entry, config)
            module.setServiceParent(self)
            self.modules.append(module)
            self._instances[entry.instance] = (entry, module)
        # After the modules (a peer's call may need them), before the worker ports.
        self.cluster = None
        if config.cluster is not None:
            from .cluster.wiring import ClusterService
            self.cluster = ClusterService(self.engine, reactor, config.cluster,
                                          cluster_directory, config.max_message_size)
            self.cluster.setServiceParent(self)
        self._set_listeners(self._make_listeners(config))
        for listener in self._listeners:
            listener.setServiceParent(self)
        self._reload_lock = DeferredLock()
        self._watcher = None
        self._previous_sighup = None

    @classmethod
    def from_file(cls, path, reactor=None):
        """
        @return: an EngineService configured from a YAML file (which L{reload}
            rereads).
        @raise ConfigError: naming the file and key of what is wrong.
        """
        return cls(load_config(path), reactor=reactor, config_path=path)

    def _make_listeners(self, config):
        """@return: [(WorkerFactory, Listener)], one per worker port of C{config}."""
        made = []
        for listener in config.listeners:
            auth = listener.auth
            factory = WorkerFactory(
                self.engine, self.reactor,
                max_message_size=listener.max_message_size,
                ping_interval=listener.ws_ping_interval,
                ping_timeout=listener.ws_ping_timeout,
                channels=self.channels,
                frame_limits=listener.frame_limits,
                handshake_timeout=listener.handshake_timeout,
                authenticator=None if auth is None else Authenticator(
                    self.engine, auth, self.reactor, listener.name),
            )
            made.append((factory, Listener(
                listener.listen, factory, self.reactor, listener.name,
                authenticated=auth is not None and auth.authenticated)))
        return made

    def _set_listeners(self, made):
        self.worker_factories = [factory for factory, _ in made]
        self._listeners = [listener for _, listener in made]
        self.worker_factory, self._listener = made[0]

    def _build(self, entry, config, **kept):
        """
        Build one module, noting which functions and trigger types it registered (a
        removed module takes them away).

        @raise ConfigError: naming the file and the module's key.
        """
        functions, types = dict(self.engine.functions), dict(self.engine.trigger_types)
        hooks = _engine_hook_lists(self.engine)
        before = [list(hook_list) for hook_list in hooks]
        try:
            module = build_module(entry.name, self.engine, entry.config, self.reactor,
                                  **kept)
        except ConfigError as e:
            error = e.within(entry.key + ".config")
            error.source = config.source
            raise error
        module._iii_registered = (
            {f: e for f, e in self.engine.functions.items() if functions.get(f) is not e},
            {t: e for t, e in self.engine.trigger_types.items() if types.get(t) is not e},
        )
        module._iii_hooks = [[h for h in hook_list if h not in old]
                             for hook_list, old in zip(hooks, before)]
        return module

    def listening(self, index=0):
        """
        @param index: which worker port (the config's order).
        @return: a Deferred firing with the worker port's C{IListeningPort} once it is
            bound (use C{.getHost().port} when the config asked for port 0).
        """
        d = self._listeners[index]._waitingForPort
        if d is None:
            raise RuntimeError("the engine service is not running")
        if d.called:
            return succeed(d.result)
        result = Deferred()
        d.addBoth(lambda r: (result.callback(r), r)[1])
        return result

    # A logsetup.LogSettingsService (twistd iii sets it): log_level applied to the
    # process's log before any port opens, and again on reload.
    log_settings = None

    def privilegedStartService(self):
        if self.log_settings is not None:
            self.log_settings.apply()
        self._raise_nofile_limit()
        MultiService.privilegedStartService(self)

    def startService(self):
        self._raise_nofile_limit()
        MultiService.startService(self)
        self.engine.health.state = health.RUNNING
        for line in startup_report(self):
            self._log.info("{line}", line=line)
        self._start_watching()
        if self.reload_on_sighup and hasattr(signal, "SIGHUP"):
            self._previous_sighup = signal.signal(
                signal.SIGHUP, lambda *_: self.reactor.callFromThread(self._on_sighup))

    # (soft, soft before, hard) of RLIMIT_NOFILE once raised at start (the report
    # logs it).
    nofile_limit = None

    def _raise_nofile_limit(self):
        # Before any port is bound (twistd binds them in privilegedStartService, an
        # embedding application in startService): idle and slow connections must not
        # leave no descriptor for a new worker (issue 14).
        if self.nofile_limit is None:
            self.nofile_limit = raise_nofile_limit(self._log) or ()

    def _on_sighup(self):
        self._log.info("SIGHUP: rereading {path}", path=self.config_path)
        self.reload().addErrback(lambda _: None)  # reload logs its refusal

    def stopService(self):
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        self._stop_watching()
        if self.drain_timeout:
            d = Deferred.fromCoroutine(self._drain(self.drain_timeout))
            d.addCallback(lambda _: self._stop())
            return d
        return self._stop()

    # SIGTERM drain (twistd iii sets it from shutdown_timeout_ms): seconds to let the
    # calls in flight finish before stopping; None stops at once (embedding default).
    drain_timeout = None

    def in_flight(self):
        """@return: calls the engine is carrying now (worker calls and HTTP requests)."""
        count = len(self.engine.tracker)
        for module in self.modules:
            counter = getattr(module, "in_flight", None)
            if callable(counter):
                count += counter()
        return count

    async def _drain(self, timeout):
        """
        Stop taking new work (readiness 503, new worker connections and HTTP requests
        refused with 503) and wait, up to C{timeout} seconds, for the calls in flight.
        """
        self.engine.health.state = health.DRAINING
        waiting = self.in_flight()
        if not waiting:
            return
        self._log.info("shutting down: waiting up to {timeout}s for {count} calls in "
                       "flight", timeout=timeout, count=waiting)
        deadline = self.reactor.seconds() + timeout
        while self.in_flight() and self.reactor.seconds() < deadline:
            await deferLater(self.reactor, DRAIN_POLL, lambda: None)
        left = self.in_flight()
        if left:
            self._log.warn("shutting down: {count} calls still in flight after {timeout}s "
                           "fail with invocation_stopped", count=left, timeout=timeout)
        else:
            self._log.info("shutting down: calls in flight finished")

    def _stop(self):
        self.engine.health.state = health.STOPPED
        d = MultiService.stopService(self)

        def stop_engine(result):
            for worker in list(self.engine.workers.values()):
                worker.connection.disconnect(1001, "engine shutting down")
            self.engine.stop()
            return result
        return d.addBoth(stop_engine)

    # -- reload ------------------------------------------------------------------------

    def reload(self, config=None):
        """
        Apply a new config while running: modules whose config changed restart (their
        calls in flight finish on the old instance, their triggers are handed to the
        new one, their store is kept when the adapter config did not change), added
        ones start, removed ones stop; worker connections stay. One reload runs at a
        time; SIGHUP and ``watch: true`` call this too.

        @param config: an L{EngineConfig}, a dict shaped like the file, or None to
            reread L{config_path}.
        @return: a Deferred firing with the L{iii_twisted.reload.ConfigChanges}, or
            failing with L{ConfigError} (logged) when the new config is refused, in
            which case the running config is kept.
        """
        return self._reload_lock.run(self._reload, config)

    def _reload(self, config):
        try:
            new = self._read(config)
        except ConfigError as e:
            self._log.error("config reload refused, running config kept: {error}",
                            error=str(e))
            return fail(e)
        changes = diff_configs(self.config, new)
        if any(change.startswith("cluster") for change in changes.engine):
            self._log.warn("config reload: the cluster: section changed; that needs a "
                           "restart (the running membership is kept until then)")
            new.cluster = self.config.cluster
        return Deferred.fromCoroutine(self._apply(new, changes))

    def _read(self, config):
        if isinstance(config, EngineConfig):
            return config
        if isinstance(config, dict):
            return from_dict(config, source="<dict>")
        if self.config_path is None:
            raise ConfigError("no config file to reread (the engine was given a config "
                              "object): pass the new config to reload()")
        return load_config(self.config_path)

    async def _apply(self, new, changes):
        before = {m.instance: m for m in self.config.modules}
        after = {m.instance: m for m in new.modules}
        try:
            for instance in changes.removed:
                _, module = self._instances.pop(instance)
                await self._retire(module)
                self._unregister(module)
            for instance in changes.changed:
                old_entry, old_module = self._instances[instance]
                kept = handover(old_module, old_entry, after[instance])
                await self._retire(old_module)
                try:
                    module = await self._start_module(after[instance], new, kept)
                except ConfigError:
                    # The old config again, so that the engine keeps its module.
                    module = await self._start_module(old_entry, self.config, kept)
                    self._instances[instance] = (old_entry, module)
                    raise
                self._instances[instance] = (after[instance], module)
            for instance in changes.added:
                module = await self._start_module(after[instance], new, {})
                self._instances[instance] = (after[instance], module)
            if changes.listener:
                await self._replace_listener(new)
        except Exception as e:
            if isinstance(e, ConfigError):
                self._log.error("config reload failed, module kept with its old config: "
                                "{error}", error=str(e))
            else:
                self._log.failure("config reload failed part-way")
            self.modules = [self._instances[i][1] for i in before if i in self._instances]
            raise
        if self.log_settings is not None and new.log_level != self.config.log_level:
            self.log_settings.set_level(new.log_level)
        self.engine.invocation_timeout = new.invocation_timeout
        self.engine.tracker._timeout = new.invocation_timeout
        self.engine.replicas.set_policy(new.function_replicas)
        self.engine.limits.update_from(new.limits)  # in place: ports and gates hold it
        new.limits = self.engine.limits
        self.modules = [self._instances[i][1] for i in after]
        old_watch = (self.config.watch, self.config.watch_interval)
        self.config = new
        if "watch" in changes.engine or old_watch != (new.watch, new.watch_interval):
            self._stop_watching()
            if self.running:
                self._start_watching()
        self._log.info("config reloaded from {source}: {changes}",
                       source=new.source, changes=changes.describe())
        return changes

    async def _retire(self, module):
        """Take a module out; it stops taking new work and finishes what it has."""
        self.services.remove(module)
        if module.name:
            self.namedServices.pop(module.name, None)
        module.parent = None
        if self.running:
            retire = getattr(module, "retire", None)
            await maybeDeferred(retire if retire is not None else module.stopService)
        if module in self.modules:
            self.modules.remove(module)
        # Its call observers and detach hooks go with it (a new instance adds its own).
        for hook_list, added in zip(_engine_hook_lists(self.engine),
                                    getattr(module, "_iii_hooks", ())):
            for hook in added:
                if hook in hook_list:
                    hook_list.remove(hook)

    async def _start_module(self, entry, config, kept):
        """
        Build a module and start it in place of its old instance.

        @raise ConfigError: when it refuses its config or cannot bind its port (then
            it is stopped again, leaving a handed-over store open).
        """
        module = self._build(entry, config, **kept)
        try:
            self._adopt(module)
        except ListenerError as e:
            if "store" in kept:
                module.store = KeptStore(kept["store"])
            if module in self.services:
                await self._retire(module)
            raise ConfigError(str(e), entry.key + ".config", config.source)
        return module

    def _adopt(self, module):
        """Add a (re)built module before the worker listener, starting it if running."""
        module.setServiceParent(self)
        self.services.remove(module)
        self.services.insert(self.services.index(self._listener), module)

    def _unregister(self, module):
        functions, types = getattr(module, "_iii_registered", ({}, {}))
        for function_id, entry in functions.items():
            if self.engine.functions.get(function_id) is entry:
                self.engine.unregister_function(function_id)
        for type_id, trigger_type in types.items():
            if self.engine.trigger_types.get(type_id) is trigger_type:
                self.engine.unregister_trigger_type(type_id)
        for hook in _ENGINE_HOOKS:
            if getattr(self.engine, hook, None) is module:
                setattr(self.engine, hook, None)

    async def _replace_listener(self, new):
        """
        Listen with the new settings (and auth: new connections get the new tokens
        and grants); connections made on the old ports stay, with their sessions.

        @raise ConfigError: when a new port cannot be bound (the old ones are kept).
        """
        made = self._make_listeners(new)
        for old_listener in self._listeners:
            await old_listener.disownServiceParent()
        started = []
        try:
            for _, listener in made:
                listener.setServiceParent(self)
                started.append(listener)
                await listener._waitingForPort
        except Exception as e:
            for listener in started:
                if listener.running:
                    await listener.disownServiceParent()
                else:
                    listener.parent = None
                    if listener in self.services:
                        self.services.remove(listener)
            made = self._make_listeners(self.config)
            for _, listener in made:
                listener.setServiceParent(self)
            self._set_listeners(made)
            raise ConfigError("cannot apply the new worker listener, old one kept: "
                              "{}".format(e), new.listener_key or None, new.source)
        self._set_listeners(made)

    # -- watch: true ---------------------------------------------------------------------

    def _start_watching(self):
        if not self.config.watch or self.config_path is None or self._watcher is not None:
            return
        self._seen = _file_state(self.config_path)
        self._watcher = TimerService(self.config.watch_interval, self._poll)
        self._watcher.clock = self.reactor
        self._watcher.startService()

    def _stop_watching(self):
        if self._watcher is not None:
            self._watcher.stopService()
            self._watcher = None

    def _poll(self):
        """Reload when the file's content changed (mtime and size tell us to look)."""
        state = _file_state(self.config_path)
        if state is None or state == self._seen:
            return None
        changed = (self._seen is None or state[1] != self._seen[1])
        self._seen = state
        if not changed:
            return None
        self._log.info("{path} changed: reloading", path=self.config_path)
        # Not returned: TimerService would stop polling after a failed reload.
        self.reload().addErrback(lambda _: None)
        return None


def _engine_hook_lists(engine):
    """
    @return: the engine's lists of call observers and detach hooks, which modules add
        to (Engine.add_call_observer, add_detach_hook) and a reload takes back.
    """
    return [engine._observers, engine._detach_hooks]


def _file_state(path):
    """@return: ((mtime_ns, size, inode), content bytes) of a file, or None."""
    try:
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size, st.st_ino)
        with open(path, "rb") as f:
            return key, f.read()
    except OSError:
        return None
