"""
Shared pytest configuration: unit tests need no sockets, interop tests start engines,
and the scale-out tests start their own Redis (L{brokers}) on a free loopback port.
"""

import pytest

import brokers


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server for the whole session (skipped, or failed in CI, when missing)."""
    server = brokers.start_redis()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, emptied (and running) for this test: its URL."""
    if redis_server.process is None or redis_server.process.poll() is not None:
        redis_server.start()
    assert redis_server.command("FLUSHALL") == "+OK"
    return redis_server.url


@pytest.fixture
def own_redis():
    """A redis-server of this test's own, which it may stop and restart."""
    server = brokers.start_redis()
    yield server
    server.close()


@pytest.fixture(scope="session")
def rabbitmq_server():
    """A RabbitMQ node for the whole session (~10 s to start; skipped, or failed in CI,
    when missing). Tests use queue names of their own."""
    server = brokers.start_rabbitmq()
    yield server
    server.close()
