"""
The engine's Redis connections: one shared pool per distinct Redis URL, on txredisapi.

Modules (state, stream, pub/sub, cron, queue) and later the cluster get a client with::

    from iii_twisted import redis_client

    client = redis_client.acquire("redis://:secret@10.0.0.5:6379/2", reactor)
    value = yield client.execute("HGET", "state:users", "alice")
    yield client.script(SOURCE).call(keys=[...], args=[...])
    yield client.subscribe("stream::events", callback)   # callback(channel, message)
    ...
    yield client.release()      # the pool closes when its last user releases it

URLs: ``redis://[[user]:password@]host[:port][/db]`` and ``rediss://`` (TLS, the
server's certificate checked against the system's roots, or against
``?ssl_ca_certs=/path/ca.pem``). The port defaults to 6379 and the db to 0.

Every value comes back as text (``convertNumbers`` is off, so ``"1"`` stays ``"1"``).
A command never waits forever: while no connection is up it waits at most
C{timeout} seconds for one, and a sent command waits at most C{timeout} seconds for its
reply; both then fail with L{RedisUnavailable}. Lost connections are re-made in the
background (backoff 0.2 s growing to 2 s), and subscriptions are re-made on every new
connection (messages published while it was down are lost: Redis pub/sub keeps none).

This module imports txredisapi, the ``redis`` extra; import it through
L{iii_twisted.extras.require_extra} where a config names a Redis adapter.
"""

import hashlib
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.logger import Logger

DEFAULT_URL = "redis://localhost:6379"
DEFAULT_TIMEOUT = 5.0
POOL_SIZE = 4

_log = Logger()


class RedisError(Exception):
    """A Redis command failed (the server answered with an error)."""


class RedisUnavailable(RedisError):
    """Redis could not be reached, or did not answer in time."""


class RedisAddress:
    """
    A parsed Redis URL.

    @ivar host, port, db, username, password, tls, ca_certs: its parts.
    @ivar safe_url: the URL without its password, for messages and logs.
    @ivar key: what makes two URLs the same pool.
    """

    def __init__(self, url):
        """@raise ValueError: for a URL that is not a Redis URL, saying why."""
        if not isinstance(url, str):
            raise ValueError("a Redis URL must be a string, not {}".format(
                type(url).__name__))
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("{!r} is not a Redis URL (redis://host:port/db or "
                             "rediss://...)".format(url))
        self.tls = parts.scheme == "rediss"
        self.host = parts.hostname or "localhost"
        try:
            self.port = parts.port or 6379
        except ValueError:
            raise ValueError("{!r}: the port is not a number".format(url))
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError("{!r}: the db index must be a number, not {!r}".format(
                url, path))
        self.db = int(path) if path else 0
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        query = parse_qs(parts.query)
        unknown = sorted(set(query) - {"ssl_ca_certs"})
        if unknown:
            raise ValueError("{!r}: unknown URL option {}; known: ssl_ca_certs".format(
                url, unknown[0]))
        self.ca_certs = query.get("ssl_ca_certs", [None])[0]
        auth = ""
        if self.username or self.password:
            auth = "{}:***@".format(self.username or "")
        self.safe_url = "{}://{}{}:{}/{}".format(
            parts.scheme, auth, self.host, self.port, self.db)
        self.key = (self.tls, self.host, self.port, self.db, self.username,
                    self.password, self.ca_certs)

    def endpoint(self, reactor, timeout):
        """@return: the client endpoint (TLS-wrapped for rediss://)."""
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if not self.tls:
            return endpoint
        from twisted.internet.ssl import Certificate, optionsForClientTLS

        trust = None
        if self.ca_certs:
            with open(self.ca_certs, "rb") as f:
                trust = Certificate.loadPEM(f.read())
        return wrapClientTLS(optionsForClientTLS(self.host, trustRoot=trust), endpoint)


class _Factory(txredisapi.RedisFactory):
    """A txredisapi pool that tells its client when a connection is ready or refused."""

    # Reconnect soon after an outage ends (txredisapi's default grows to 10 s).
    initialDelay = 0.2
    maxDelay = 2.0

    def __init__(self, client, *args, **kwargs):
        txredisapi.RedisFactory.__init__(self, *args, **kwargs)
        self.client = client
        # Nobody waits on a lazy pool's "complete" Deferred; its failures are kept in
        # client.last_error and reported by the commands that wait.
        self.deferred.addErrback(lambda _: None)

    def stopTrying(self):
        # txredisapi gives up for good when AUTH or SELECT fails on a new connection,
        # which also happens when the server goes away mid-handshake (a restart): the
        # pool would then stay dead. Keep trying; the error is in client.last_error.
        return defer.succeed(None)

    def addConnection(self, conn):
        txredisapi.RedisFactory.addConnection(self, conn)
        if conn in self.pool:
            self.client._connection_ready()

    def connectionError(self, why):
        if why != self.client.last_error:
            _log.warn("{why}", why=why)
        self.client.last_error = why
        txredisapi.RedisFactory.connectionError(self, why)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    def messageReceived(self, pattern, channel, message):
        self.factory.client._message(channel, message)


class _SubscriberFactory(_Factory):
    protocol = _SubscriberProtocol

    def addConnection(self, conn):
        txredisapi.RedisFactory.addConnection(self, conn)
        if conn in self.pool:
            self.client._subscriber_ready(conn)


class Script:
    """A Lua script, run with EVALSHA (loaded with EVAL when the server lacks it)."""

    def __init__(self, client, source):
        self._client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def call(self, keys=(), args=()):
        """
        @return: Deferred firing with the script's reply; failing with L{RedisError}
            or L{RedisUnavailable}.
        """
        keys, args = list(keys), list(args)

        def noscript(failure):
            failure.trap(RedisError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return self._client.execute("EVAL", self.source, len(keys), *(keys + args))
        return self._client.execute("EVALSHA", self.sha, len(keys), *(keys + args)) \
            .addErrback(noscript)


class RedisClient:
    """
    A pool of connections to one Redis server, and one more connection for
    subscriptions (opened on the first L{subscribe}). Get one with L{acquire}.

    @ivar address: the L{RedisAddress}.
    @ivar last_error: the last connection error (auth refused, unknown db), or None.
    """

    def __init__(self, address, reactor, pool_size=POOL_SIZE, timeout=DEFAULT_TIMEOUT):
        self.address = address
        self.timeout = timeout
        self.last_error = None
        self._reactor = reactor
        self._users = 0
        self._closed = False
        self._waiters = []
        self._sub_waiters = []
        self._channels = {}  # channel -> [callbacks]
        self._subscriber = None
        self._scripts = {}
        self._factory = _Factory(
            self, address.safe_url, address.db, pool_size, isLazy=True,
            password=address.password, username=address.username,
            replyTimeout=timeout, convertNumbers=False)
        self._started = False

    def _start(self):
        # Connect on first use, so that building a module from config (validation,
        # tests) opens no socket.
        if not self._started:
            self._started = True
            self._factory.startConnecting(self.address.endpoint(self._reactor, self.timeout))

    @property
    def connected(self):
        """True while at least one pooled connection is up."""
        return self._factory.size > 0

    # -- commands --------------------------------------------------------------------

    def execute(self, *args):
        """
        Run one command, e.g. C{execute("HSET", key, field, value)}.

        @return: Deferred firing with the reply (text, int, list or None); failing with
            L{RedisError} for an error reply, L{RedisUnavailable} when no connection
            comes up within C{timeout} seconds or the reply does not.
        """
        if self._closed:
            return defer.fail(RedisUnavailable("the Redis client for {} is closed".format(
                self.address.safe_url)))
        self._start()
        if self._factory.size > 0:
            d = self._send(args)
        else:
            d = self._wait_connected().addCallback(lambda _: self._send(args))
        return d.addErrback(self._translate)

    def execute_ordered(self, *args):
        """
        Like L{execute}, but every command sent this way goes on the same connection
        (the pool's first), so Redis runs them in the order they were made (L{execute}
        spreads commands over the pool, where a later one may overtake).
        """
        if self._closed:
            return defer.fail(RedisUnavailable("the Redis client for {} is closed".format(
                self.address.safe_url)))
        self._start()

        def send(_=None):
            live = [conn for conn in self._factory.pool if conn.connected]
            if not live:
                return self._wait_connected().addCallback(send)
            return live[0].execute_command(*args)
        try:
            d = send()
        except Exception:
            d = defer.fail()
        return d.addErrback(self._translate)

    def script(self, source):
        """@return: the L{Script} for Lua C{source} (one object per source)."""
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = Script(self, source)
        return script

    def _send(self, args):
        return self._factory.handler.execute_command(*args)

    def _wait_connected(self):
        return self._wait(self._waiters, "connection")

    def _wait(self, waiters, what):
        """@return: a Deferred in C{waiters}, failed after C{timeout} seconds."""
        d = defer.Deferred()
        waiters.append(d)

        def expire():
            if d in waiters:
                waiters.remove(d)
                why = " ({})".format(self.last_error) if self.last_error else ""
                d.errback(RedisUnavailable("no {} to Redis at {} within {:g} s{}".format(
                    what, self.address.safe_url, self.timeout, why)))
        call = self._reactor.callLater(self.timeout, expire)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d

    def _connection_ready(self):
        self.last_error = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _translate(self, failure):
        if failure.check(RedisError):
            return failure
        if failure.check(txredisapi.ConnectionError):
            raise RedisUnavailable("Redis at {}: {}".format(
                self.address.safe_url, failure.getErrorMessage()))
        if failure.check(txredisapi.ResponseError):
            raise RedisError(failure.getErrorMessage())
        return failure

    # -- pub/sub ---------------------------------------------------------------------

    def publish(self, channel, message):
        """@return: Deferred firing with the number of connections that received it."""
        return self.execute("PUBLISH", channel, message)

    def subscribe(self, channel, callback):
        """
        Call C{callback(channel, message)} (both text) for each message on C{channel},
        from now on, across reconnections.

        @return: Deferred firing with None once Redis confirmed the subscription, or
            failing with L{RedisUnavailable} when it could not be made within
            C{timeout} seconds (it is made again, with every other, as soon as the
            subscriber connection comes back).
        """
        callbacks = self._channels.setdefault(channel, [])
        callbacks.append(callback)
        if self._subscriber is None:
            self._subscriber = _SubscriberFactory(
                self, self.address.safe_url, self.address.db, 1, isLazy=True,
                password=self.address.password, username=self.address.username,
                replyTimeout=self.timeout, convertNumbers=False)
            self._subscriber.startConnecting(
                self.address.endpoint(self._reactor, self.timeout))
        if len(callbacks) > 1:
            return defer.succeed(None)
        conn = self._subscriber_conn()
        if conn is None:
            # _subscriber_ready subscribes every channel, this one included.
            return self._wait(self._sub_waiters, "subscriber connection")
        return conn.subscribe(channel).addCallback(lambda _: None).addErrback(
            self._translate)

    def unsubscribe(self, channel, callback):
        """Stop calling C{callback} for C{channel}. @return: Deferred firing with None."""
        callbacks = self._channels.get(channel)
        if not callbacks or callback not in callbacks:
            return defer.succeed(None)
        callbacks.remove(callback)
        if callbacks:
            return defer.succeed(None)
        del self._channels[channel]
        conn = self._subscriber_conn()
        if conn is None:
            return defer.succeed(None)
        return conn.unsubscribe(channel).addCallbacks(lambda _: None, lambda _: None)

    def _subscriber_conn(self):
        pool = self._subscriber.pool if self._subscriber is not None else []
        return pool[0] if pool else None

    def _subscriber_ready(self, conn):
        channels = list(self._channels)
        d = conn.subscribe(channels) if channels else defer.succeed(None)
        waiters, self._sub_waiters = self._sub_waiters, []

        def done(result):
            for waiter in waiters:
                waiter.callback(None)

        def failed(failure):
            _log.warn("Redis at {url}: resubscribing failed: {error}",
                      url=self.address.safe_url, error=failure.getErrorMessage())
            done(None)
        d.addCallbacks(done, failed)

    def _message(self, channel, message):
        for callback in list(self._channels.get(channel, ())):
            try:
                callback(channel, message)
            except Exception:
                _log.failure("Redis message handler for channel {channel} failed",
                             channel=channel)

    # -- life ------------------------------------------------------------------------

    def release(self):
        """
        Give back one L{acquire}; the last release closes the connections.

        @return: Deferred firing with None once closed (at once if others still use it).
        """
        self._users -= 1
        if self._users > 0:
            return defer.succeed(None)
        _pools.pop(self.address.key, None)
        return self.close()

    def close(self):
        """Close every connection now. @return: Deferred firing with None."""
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.errback(RedisUnavailable("the Redis client for {} is closed".format(
                self.address.safe_url)))
        ds = [self._factory.disconnect()]
        if self._subscriber is not None:
            ds.append(self._subscriber.disconnect())
        waiters, self._sub_waiters = self._sub_waiters, []
        for d in waiters:
            d.errback(RedisUnavailable("the Redis client for {} is closed".format(
                self.address.safe_url)))
        return defer.gatherResults(ds, consumeErrors=True).addBoth(lambda _: None)


_pools = {}


def acquire(url, reactor, timeout=DEFAULT_TIMEOUT):
    """
    Get the shared L{RedisClient} for C{url} (the same one for every caller of the
    same URL in this process, until its last L{RedisClient.release}).

    @raise ValueError: for a malformed URL, saying why.
    """
    address = RedisAddress(url)
    client = _pools.get(address.key)
    if client is None or client._closed:
        client = _pools[address.key] = RedisClient(address, reactor, timeout=timeout)
    client._users += 1
    return client
