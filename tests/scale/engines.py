"""Engines for the scale-out tests: several in one test process, on the real reactor."""

from twisted.internet import defer

from iii_twisted.service import EngineService


def redis_modules(redis_url, *names, stream_port=0):
    """@return: the ``modules:`` entries for C{names} (state, stream, pubsub, cron) on Redis."""
    adapter = {"redis_url": redis_url}
    entries = {
        "state": {"class": "modules::state::StateModule", "config": {"adapter": {
            "class": "modules::state::adapters::RedisAdapter", "config": adapter}}},
        "stream": {"class": "modules::stream::StreamModule", "config": {
            "port": stream_port, "host": "127.0.0.1", "adapter": {
                "class": "modules::stream::adapters::RedisAdapter", "config": adapter}}},
        "pubsub": {"class": "modules::pubsub::PubSubModule", "config": {"adapter": {
            "class": "modules::pubsub::RedisAdapter", "config": adapter}}},
        "cron": {"class": "modules::cron::CronModule", "config": {"adapter": {
            "class": "modules::cron::RedisCronAdapter", "config": adapter}}},
    }
    return [entries[name] for name in names]


class Engines:
    """Start engines; stop them all at the end of the test."""

    def __init__(self):
        self.services = []

    def start(self, modules):
        service = EngineService({"listen": "tcp:0:interface=127.0.0.1",
                                 "invocation_timeout_ms": 20000, "modules": modules})
        service.startService()
        self.services.append(service)
        return service

    def stop(self, service):
        if service in self.services:
            self.services.remove(service)
            return service.stopService()
        return defer.succeed(None)

    def stop_all(self):
        return defer.gatherResults([self.stop(s) for s in list(self.services)],
                                   consumeErrors=True)


def module_of(service, cls):
    return next(m for m in service.modules if isinstance(m, cls))
