"""The shared Redis pool (iii_twisted.redis_client) against a real redis-server."""

import pytest
import pytest_twisted
from twisted.internet import reactor

from iii_twisted import redis_client
from iii_twisted.redis_client import RedisAddress, RedisError, RedisUnavailable


def test_parse_urls():
    a = RedisAddress("redis://:s%40cret@example.com:6380/3")
    assert (a.host, a.port, a.db, a.password, a.username, a.tls) == \
        ("example.com", 6380, 3, "s@cret", None, False)
    assert a.safe_url == "redis://:***@example.com:6380/3"
    b = RedisAddress("rediss://user:pw@h")
    assert (b.host, b.port, b.db, b.username, b.password, b.tls) == \
        ("h", 6379, 0, "user", "pw", True)
    for bad, text in [("http://x", "not a Redis URL"), ("redis://h/x", "db index"),
                      ("redis://h:port", "port"), ("redis://h?x=1", "unknown URL option"),
                      (3, "must be a string")]:
        with pytest.raises(ValueError, match=text):
            RedisAddress(bad)


@pytest_twisted.ensureDeferred
async def test_one_pool_per_url(redis_url):
    a = redis_client.acquire(redis_url, reactor)
    b = redis_client.acquire(redis_url, reactor)
    c = redis_client.acquire(redis_url.replace("/0", "/1"), reactor)
    try:
        assert a is b
        assert a is not c
    finally:
        await a.release()
        assert not a._closed  # b still holds it
        await b.release()
        assert a._closed
        await c.release()


@pytest_twisted.ensureDeferred
async def test_commands_scripts_db_index(redis_url, redis_server):
    client = redis_client.acquire(redis_url.replace("/0", "/2"), reactor)
    try:
        assert await client.execute("SET", "k", "1") == "OK"
        assert await client.execute("GET", "k") == "1"  # text, not a number
        assert await client.execute("INCR", "n") == 1
        script = client.script("return redis.call('GET', KEYS[1]) .. ARGV[1]")
        assert await script.call(["k"], ["x"]) == "1x"
        await client.execute("SCRIPT", "FLUSH")
        assert await script.call(["k"], ["y"]) == "1y"  # NOSCRIPT -> EVAL
        with pytest.raises(RedisError):
            await client.execute("NOSUCHCOMMAND")
    finally:
        await client.release()
    assert redis_server.command("SELECT", "2") == "+OK"
    assert redis_server.command("EXISTS", "k") == ":0"  # db 2, not db 0


@pytest_twisted.ensureDeferred
async def test_password(own_redis):
    own_redis.command("CONFIG", "SET", "requirepass", "pw")
    url = "redis://:pw@127.0.0.1:{}/0".format(own_redis.port)
    client = redis_client.acquire(url, reactor)
    try:
        assert await client.execute("PING") == "PONG"
    finally:
        await client.release()
    wrong = redis_client.acquire(url.replace(":pw@", ":nope@"), reactor, timeout=1.0)
    try:
        with pytest.raises(RedisUnavailable, match="auth"):
            await wrong.execute("PING")
    finally:
        await wrong.release()


@pytest_twisted.ensureDeferred
async def test_unreachable_fails_within_timeout():
    import brokers
    port = brokers.free_port()  # nothing listens there
    client = redis_client.acquire("redis://127.0.0.1:{}".format(port), reactor, timeout=0.5)
    try:
        with pytest.raises(RedisUnavailable, match="no connection to Redis"):
            await client.execute("PING")
    finally:
        await client.release()


@pytest_twisted.ensureDeferred
async def test_subscribe_and_resubscribe_after_restart(own_redis):
    from twisted.internet.defer import Deferred

    client = redis_client.acquire(own_redis.url, reactor, timeout=2.0)
    got = []
    waiting = []

    def received(channel, message):
        got.append((channel, message))
        fire = list(waiting)
        del waiting[:]
        for d in fire:
            d.callback(None)

    def next_message():
        d = Deferred()
        waiting.append(d)
        return d.addTimeout(5, reactor)

    try:
        await client.subscribe("ch", received)
        arrived = next_message()
        assert await client.publish("ch", "one") == 1
        await arrived
        own_redis.restart()
        # Publish until the resubscribed connection hears one (bounded by the timeout).
        arrived = next_message()
        for _ in range(100):
            try:
                if await client.publish("ch", "two") == 1:
                    break
            except RedisUnavailable:
                pass
            await deferLater(0.05)
        await arrived
        assert got[0] == ("ch", "one") and got[-1] == ("ch", "two"), got
    finally:
        await client.release()


def deferLater(seconds):
    from twisted.internet import task
    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_tls(tmp_path):
    """rediss:// with the server's certificate checked against ssl_ca_certs."""
    import shutil
    import subprocess

    import brokers
    if shutil.which("openssl") is None:
        brokers.missing("openssl")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert, "-days", "1"],
                   check=True, capture_output=True)
    server = brokers.start_redis(tls_files=(cert, key))
    try:
        url = "rediss://localhost:{}/1?ssl_ca_certs={}".format(server.port, cert)
        client = redis_client.acquire(url, reactor)
        try:
            assert await client.execute("SET", "tls", "yes") == "OK"
            assert await client.execute("GET", "tls") == "yes"
        finally:
            await client.release()
        # Without the CA the certificate is refused: a clear failure, not a hang.
        untrusted = redis_client.acquire(url.split("?")[0], reactor, timeout=1.0)
        try:
            with pytest.raises(RedisUnavailable):
                await untrusted.execute("PING")
        finally:
            await untrusted.release()
    finally:
        server.close()
