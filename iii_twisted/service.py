"""
L{EngineService}: the whole engine as one Twisted C{MultiService}.

``twistd iii`` runs one; an existing Twisted application embeds one::

    from iii_twisted.service import EngineService

    engine_service = EngineService.from_file("iii-config.yaml", reactor=reactor)
    engine_service.setServiceParent(application)
    engine_service.engine.register_function("app::hello", lambda data: {"hi": data})
"""

from twisted.application import strports
from twisted.application.service import MultiService
from twisted.logger import Logger

from .auth import Authenticator
from .channels import install_channels
from .config import ConfigError, EngineConfig, from_dict, load_config
from .engine import Engine
from .modules import build_module
from .worker import WorkerFactory


class EngineService(MultiService):
    """
    The engine, its modules and its worker listener.

    Children start in this order: the modules (in config order), then the worker port,
    so that a worker never connects before the functions it may call exist. They stop
    in reverse: the port first, then the modules; finally every worker is
    disconnected and every pending call fails with ``invocation_stopped``.

    @ivar engine: the L{Engine}; register in-process functions on it and call any
        function with C{engine.call(function_id, data)}.
    @ivar modules: the loaded modules, in config order.
    @ivar worker_factory: the L{WorkerFactory} of the (first) worker port.
    @ivar worker_factories: those of every worker port (``listeners:``), in order.
    """

    _log = Logger()

    def __init__(self, config=None, reactor=None):
        """
        @param config: an L{EngineConfig}, a dict shaped like ``iii-config.yaml``, or
            None for the defaults (port 49134, no modules).
        @param reactor: the reactor to run on; the global one when None.
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
        self.config = config
        self.reactor = reactor
        self.engine = Engine(reactor, invocation_timeout=config.invocation_timeout)
        # Data channels first: modules (the REST API) create channels too, and the
        # sweep stops after them.
        self.channels = install_channels(self.engine, reactor)
        self.channels.setServiceParent(self)
        self.modules = []
        for name, module_config, key in config.modules:
            try:
                module = build_module(name, self.engine, module_config, reactor)
            except ConfigError as e:
                error = e.within(key + ".config")
                error.source = config.source
                raise error
            module.setServiceParent(self)
            self.modules.append(module)
        self.worker_factories = []
        self._listeners = []
        for listener in config.listeners:
            factory = WorkerFactory(
                self.engine, reactor,
                max_message_size=config.max_message_size,
                ping_interval=config.ws_ping_interval,
                ping_timeout=config.ws_ping_timeout,
                channels=self.channels,
                authenticator=None if listener.auth is None else Authenticator(
                    self.engine, listener.auth, reactor, listener.name),
            )
            service = strports.service(listener.listen, factory, reactor=reactor)
            service.setServiceParent(self)
            self.worker_factories.append(factory)
            self._listeners.append(service)
        self.worker_factory = self.worker_factories[0]
        self._listener = self._listeners[0]

    @classmethod
    def from_file(cls, path, reactor=None):
        """
        @return: an EngineService configured from a YAML file.
        @raise ConfigError: naming the file and key of what is wrong.
        """
        return cls(load_config(path), reactor=reactor)

    def startService(self):
        MultiService.startService(self)
        for listener in self.config.listeners:
            if listener.auth is None:
                self._log.warn(
                    "worker port {name} ({listen}) is unauthenticated: anyone who can "
                    "reach it may call every function and replace registrations (add "
                    "auth: to require tokens; see docs/security.rst)",
                    name=listener.name, listen=listener.listen)
            else:
                self._log.info(
                    "worker port {name} ({listen}) requires authentication: {count} "
                    "token(s){fn}", name=listener.name, listen=listener.listen,
                    count=len(listener.auth.tokens),
                    fn=(", auth function " + listener.auth.auth_function_id
                        if listener.auth.auth_function_id else ""))

    def listening(self, index=0):
        """
        @param index: which worker port (``listeners:`` order).
        @return: a Deferred firing with the worker port's C{IListeningPort} once it is
            bound (use C{.getHost().port} when the config asked for port 0).
        """
        # StreamServerEndpointService keeps the listen() Deferred here; strports gives
        # us no public handle on it.
        from twisted.internet.defer import succeed

        d = self._listeners[index]._waitingForPort
        if d is None:
            raise RuntimeError("the engine service is not running")
        if d.called:
            return succeed(d.result)
        result = type(d)()
        d.addBoth(lambda r: (result.callback(r), r)[1])
        return result

    def stopService(self):
        d = MultiService.stopService(self)

        def stop_engine(result):
            for worker in list(self.engine.workers.values()):
                worker.connection.disconnect(1001, "engine shutting down")
            self.engine.stop()
            return result
        return d.addBoth(stop_engine)
