"""
Cluster members in one test process (one reactor, real sockets on loopback, a
MemoryDirectory for membership), and workers that connect to them over a real
WebSocket speaking the worker protocol (L{iii_twisted.cluster.client}).
"""

import time

from twisted.internet import defer, reactor

from iii_twisted.cluster.client import WorkerClientFactory, connect
from iii_twisted.cluster.directory import MemoryDirectory, MemoryRegistry
from iii_twisted.protocol import InvocationError
from iii_twisted.service import EngineService
from iii_twisted.testing import wait_for  # noqa: F401 (tests import it from here)

SECRET = "test-cluster-secret"


class Cluster:
    """Start members with L{start}; L{stop_all} at the end of the test."""

    def __init__(self):
        self.registry = MemoryRegistry()
        self.services = []
        self.workers = []

    def start(self, name, modules=(), secret=SECRET, top=None, redis_url=None,
              **cluster_keys):
        """
        @param top: more top-level config keys (auth, function_replicas...).
        @param redis_url: the membership in this Redis (the RedisDirectory), instead
            of the test's MemoryDirectory.
        @param cluster_keys: more keys of the cluster: section.
        """
        cluster = {"redis_url": redis_url or "redis://unused.invalid", "secret": secret,
                   "name": name}
        cluster.update(cluster_keys)
        config = {"listen": "tcp:0:interface=127.0.0.1", "invocation_timeout_ms": 20000,
                  "modules": list(modules), "cluster": cluster}
        config.update(top or {})
        service = EngineService(
            config,
            reactor=reactor,
            cluster_directory=None if redis_url else MemoryDirectory(self.registry))
        service.startService()
        self.services.append(service)
        return service

    async def linked(self, *services, timeout=10.0):
        """Wait until each of C{services} has a link open to and from every other."""
        services = services or self.services

        def done():
            for service in services:
                others = {s.cluster.engine_id for s in services if s is not service}
                links = service.cluster.links
                if not others <= {i for i, l in links.items() if l.protocol is not None}:
                    return False
                if not others <= set(service.cluster.peers):
                    return False
            return True
        await wait_for(done, timeout, "the members to link")

    async def worker(self, service, name="worker", headers=None):
        worker = TestWorker(name)
        await worker.connect(service, headers)
        self.workers.append(worker)
        return worker

    async def stop(self, service):
        if service in self.services:
            self.services.remove(service)
            await service.stopService()

    def stop_all(self):
        for worker in self.workers:
            worker.close()
        return defer.gatherResults([self.stop_d(s) for s in list(self.services)],
                                   consumeErrors=True)

    def stop_d(self, service):
        return defer.Deferred.fromCoroutine(self.stop(service))


async def offered(service, function_id, timeout=10.0):
    """Wait until C{function_id} is in C{service}'s registry."""
    await wait_for(lambda: function_id in service.engine.functions, timeout,
                   "{} on {}".format(function_id, service.cluster.name))


class TestWorker:
    """
    A worker over a real WebSocket: registers functions (Python callables taking the
    invokefunction message), calls any function, records what it was sent.

    @ivar invocations: every ``invokefunction`` message it received.
    """

    def __init__(self, name):
        self.name = name
        self.functions = {}
        self.invocations = []
        self.frames = []
        self.protocol = None
        self._opened = defer.Deferred()
        self.close_info = None

    async def connect(self, service, headers=None):
        port = (await service.listening()).getHost().port
        factory = WorkerClientFactory(self, reactor, url="ws://127.0.0.1:{}/".format(port),
                                      headers=headers)
        await connect(reactor, "tcp:127.0.0.1:{}".format(port), factory)
        await self._opened
        await self.call("engine::workers::register",
                        {"name": self.name, "runtime": "python", "version": "0.10.0",
                         "pid": 1})

    def register(self, function_id, fn=None, description=None):
        self.functions[function_id] = fn or (lambda message: message.get("data"))
        message = {"type": "registerfunction", "id": function_id}
        if description:
            message["description"] = description
        self.protocol.send(message)

    def unregister(self, function_id):
        self.functions.pop(function_id, None)
        self.protocol.send({"type": "unregisterfunction", "id": function_id})

    def trigger(self, trigger_id, trigger_type, function_id, config):
        self.protocol.send({"type": "registertrigger", "id": trigger_id,
                            "trigger_type": trigger_type, "function_id": function_id,
                            "config": config})

    def call(self, function_id, data=None, **kwargs):
        return self.protocol.call(function_id, data, **kwargs)

    def close(self):
        if self.protocol is not None:
            self.protocol.dropConnection(abort=True)

    # handler of WorkerClientProtocol
    def opened(self, protocol):
        self.protocol = protocol
        self._opened.callback(protocol)

    def invoke(self, protocol, message):
        self.invocations.append(message)
        fn = self.functions.get(message["function_id"])
        if fn is None:
            raise InvocationError("function_not_found", "not here")
        return fn(message)

    def frame(self, protocol, message):
        self.frames.append(message)

    def closed(self, protocol, code, reason):
        self.close_info = (code, reason)


def now_ms():
    return int(time.time() * 1000)


def free_port():
    """@return: a TCP port on 127.0.0.1 that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
