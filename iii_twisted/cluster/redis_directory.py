"""
L{RedisDirectory}: cluster membership kept in Redis (issue 12, point 5).

What it stores (C{prefix} defaults to C{iii:cluster:})::

    {prefix}member:{engine_id}   the Member's JSON, SET ... PX ttl, re-set every heartbeat
    {prefix}members              a set of the engine ids that have a member key: the
                                 index listed each heartbeat (an id whose key expired
                                 is taken out by whoever lists it)
    {prefix}epoch                a random token, SET NX with no TTL: it changes only when
                                 Redis lost its data (a restart without persistence, a
                                 FLUSHALL), which tells the members that keys missing right
                                 now may only be waiting to be re-announced
    channel {prefix}events       {"event": "join"|"leave", "member": {...}}

A member finds the others two ways: the events channel tells it at once, and every
heartbeat (one Lua script: refresh its key, read the epoch, list the members) it also
compares the members listed with those it knows. So a lost pub/sub message, or a
member killed without a word whose key then expired, is noticed within C{ttl +
heartbeat_interval} seconds. The listing reads the index set, not the keyspace: a
C{SCAN} would walk every key of the database (which the state and stream adapters may
share) on every heartbeat of every member.

While Redis cannot be reached the directory is not L{healthy} (logged once each way):
the engine keeps serving its own workers, and the members it knows stay known (a Redis
outage says nothing about them; the links between members tell when one dies). When
Redis answers again the member is re-announced at once and the member list reconciled,
with a grace period of C{ttl + heartbeat_interval + RECONNECT_MAX} seconds during which a
member missing from Redis is not yet reported as gone: it may not have reconnected yet.
"""

import json
import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from iii_twisted import redis_client
from iii_twisted.cluster.directory import IClusterDirectory, Member
from iii_twisted.redis_client import RedisError

# The Redis pool retries a lost connection after at most this many seconds
# (redis_client._Factory.maxDelay): how much later than us another member may be back.
RECONNECT_MAX = 2.0

# Keep the engine ids of members that said they left for this long, so that a listing
# started before their key was deleted does not bring them back.
LEFT_MEMORY = 60.0

# KEYS: this member's key, the epoch key, the index set.
# ARGV: the member's JSON, the TTL in ms, a fresh epoch token, its engine id, the
# prefix of member keys.
# Returns: the epoch, then the JSON of every member listed (this one included).
_HEARTBEAT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('SET', KEYS[2], ARGV[3], 'NX')
local listed = {redis.call('GET', KEYS[2])}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local value = redis.call('GET', ARGV[5] .. id)
  if value then
    table.insert(listed, value)
  else
    redis.call('SREM', KEYS[3], id)
  end
end
return listed
"""


@implementer(IClusterDirectory)
class RedisDirectory:
    """
    A cluster directory in Redis: each member a key with a TTL, refreshed by a heartbeat.

    @ivar healthy: False while Redis cannot be reached (see the module docstring).
    @ivar me: the L{Member} joined, or None before L{join} and after L{leave}.
    """

    _log = Logger()

    def __init__(self, redis_url, reactor, heartbeat_interval=1.0, ttl=3.0,
                 prefix="iii:cluster:"):
        """
        @param redis_url: C{redis://...} or C{rediss://...} (L{redis_client.RedisAddress}).
        @param heartbeat_interval: seconds between two refreshes of this member's key.
        @param ttl: seconds a member's key lives without a refresh; a member that stops
            heartbeating is reported gone within C{ttl + heartbeat_interval}.
        @raise ValueError: for a malformed URL, or a C{ttl} not above C{heartbeat_interval}.
        """
        redis_client.RedisAddress(redis_url)  # fail at config time, not at join
        if not 0 < heartbeat_interval < ttl:
            raise ValueError("the member ttl ({:g} s) must be longer than the heartbeat "
                             "interval ({:g} s)".format(ttl, heartbeat_interval))
        self.redis_url = redis_url
        self.heartbeat_interval = heartbeat_interval
        self.ttl = ttl
        self.prefix = prefix
        self.channel = prefix + "events"
        self.healthy = True
        self.me = None
        self._reactor = reactor
        self._observer = None
        self._client = None
        self._loop = None
        self._beating = None
        self._json = None
        self._epoch = None
        self._grace_until = 0.0
        self._known = {}      # engine_id -> Member
        self._learned = {}    # engine_id -> tick at which it was last confirmed
        self._left = {}       # engine_id -> when it said it left (seconds)
        self._bad_values = set()
        self._tick = 0
        self._scans = []      # Deferreds waiting for the next reconciliation (tests)

    # -- IClusterDirectory ------------------------------------------------------------

    def join(self, member, observer):
        """
        Announce C{member}, subscribe to the events channel, report the members already
        there, and start the heartbeat.

        @return: Deferred firing with None once the announcement is stored and the
            members already there were reported; failing with
            L{redis_client.RedisUnavailable} when Redis did not answer within the Redis
            client's timeout (the heartbeat keeps trying: the member is announced as
            soon as Redis answers).
        @raise RuntimeError: when already joined.
        """
        if self.me is not None:
            raise RuntimeError("{} already joined as {}".format(self, self.me))
        self.me, self._observer = member, observer
        self._json = json.dumps(member.as_dict(), sort_keys=True)
        self._client = redis_client.acquire(self.redis_url, self._reactor)
        # Subscribe first, so that no join between our listing and our subscription is
        # missed; the client re-subscribes on every new connection by itself.
        self._client.subscribe(self.channel, self._event).addErrback(
            lambda f: self._log.debug("cluster events subscription: {e}",
                                      e=f.getErrorMessage()))
        first = self._beating = Deferred.fromCoroutine(self._beat(first=True))

        def done(result):
            self._beating = None
            return result
        first.addBoth(done)
        # The heartbeat runs from now on, whether the first one succeeds or not; while
        # that one still waits, a tick only notices that Redis is unreachable.
        self._loop = LoopingCall(self._heartbeat)
        self._loop.clock = self._reactor
        self._loop.start(self.heartbeat_interval, now=False).addErrback(
            lambda f: self._log.failure("cluster heartbeat stopped", f))
        return first

    def leave(self):
        """
        Delete this member's key and publish its leave (when Redis is reachable; else
        the key expires by its TTL), stop the heartbeat and release the Redis client.

        @return: Deferred firing with None (never failing); at once when not joined.
        """
        if self.me is None:
            return succeed(None)
        me, self.me, self._observer = self.me, None, None
        self._known.clear()
        self._learned.clear()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return Deferred.fromCoroutine(self._withdraw(me))

    def members(self):
        """@return: C{{engine_id: Member}} of the other members known now."""
        return dict(self._known)

    # -- the heartbeat ----------------------------------------------------------------

    def _heartbeat(self):
        if self._beating is not None:  # the last one still waits for Redis
            if self.healthy and not self._client.connected:
                self._set_healthy(False, "no connection")
            return None
        d = self._beating = Deferred.fromCoroutine(self._beat())

        def done(result):
            self._beating = None
            return result
        d.addBoth(done)
        # LoopingCall stops for good on a failure: a beat never fails.
        d.addErrback(lambda f: self._log.failure("cluster heartbeat failed", f))
        return d

    async def _beat(self, first=False):
        me = self.me
        if me is None:
            return
        if not first and self.healthy and not self._client.connected:
            self._set_healthy(False, "the connection is down")
        # A member learned from an event after this listing began may not be in it.
        tick = self._next_tick()
        try:
            reply = await self._client.script(_HEARTBEAT).call(
                [self._member_key(me.engine_id), self.prefix + "epoch",
                 self.prefix + "members"],
                # A fresh token each time: whoever re-creates the epoch after a data
                # loss writes a value nobody has seen, so every member notices.
                [self._json, int(self.ttl * 1000), os.urandom(8).hex(), me.engine_id,
                 self.prefix + "member:"])
        except RedisError as e:
            if self.me is me:
                self._set_healthy(False, str(e))
            if first:
                raise
            return
        if self.me is not me:
            return
        epoch, listed = reply[0], reply[1:]
        lost_data = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        if first or not self.healthy or lost_data:
            if not first:
                # Others may not be back yet: do not take their absence for a leave.
                self._grace_until = (self._reactor.seconds() + self.ttl
                                     + self.heartbeat_interval + RECONNECT_MAX)
            self._set_healthy(True, "data lost" if lost_data else None)
            try:
                await self._client.publish(self.channel, json.dumps(
                    {"event": "join", "member": me.as_dict()}))
            except RedisError as e:
                self._set_healthy(False, str(e))
                return
            if self.me is not me:
                return
        self._reconcile(me, self._parse(listed), tick)

    def _reconcile(self, me, found, tick):
        self._forget_old_leaves()
        for engine_id, member in found.items():
            if engine_id != me.engine_id:
                self._seen(member, tick)
        if self._reactor.seconds() >= self._grace_until:
            for engine_id in list(self._known):
                if engine_id not in found and self._learned.get(engine_id, 0) < tick:
                    self._drop(engine_id)
        waiting, self._scans = self._scans, []
        for d in waiting:
            d.callback(None)

    def _parse(self, listed):
        """@return: C{{engine_id: Member}} of the members' JSON values C{listed}."""
        found = {}
        for value in listed:
            try:
                member = Member.from_dict(json.loads(value))
            except (ValueError, KeyError, TypeError, AttributeError):
                if value not in self._bad_values:
                    self._bad_values.add(value)
                    self._log.warn("cluster directory: ignoring a member key that does "
                                   "not hold a member: {value!r}", value=value[:200])
                continue
            found[member.engine_id] = member
        return found

    # -- events -----------------------------------------------------------------------

    def _event(self, channel, message):
        try:
            data = json.loads(message)
            event = data["event"]
            member = Member.from_dict(data["member"])
        except (ValueError, KeyError, TypeError, AttributeError):
            self._log.warn("cluster directory: ignoring a malformed event on {channel}: "
                           "{message!r}", channel=channel, message=message[:200])
            return
        if self.me is None or member.engine_id == self.me.engine_id:
            return
        if event == "join":
            self._seen(member, self._next_tick())
        elif event == "leave":
            self._left[member.engine_id] = self._reactor.seconds()
            self._drop(member.engine_id)
        else:
            self._log.warn("cluster directory: ignoring unknown event {event!r}",
                           event=event)

    def _seen(self, member, tick):
        engine_id = member.engine_id
        if engine_id in self._left:
            return  # it said it left; engine ids are not reused
        known = self._known.get(engine_id)
        if known is not None and known != member:
            self._drop(engine_id)  # same id, new address: tell it as a new member
            known = None
        self._learned[engine_id] = max(tick, self._learned.get(engine_id, 0))
        if known is None:
            self._known[engine_id] = member
            self._tell("member_joined", member)

    def _drop(self, engine_id):
        member = self._known.pop(engine_id, None)
        self._learned.pop(engine_id, None)
        if member is not None:
            self._tell("member_left", member)

    def _tell(self, event, member):
        observer = self._observer
        if observer is None:
            return
        try:
            getattr(observer, event)(member)
        except Exception:
            self._log.failure("cluster observer {event} failed for {member}",
                              event=event, member=member)

    # -- helpers ----------------------------------------------------------------------

    def _set_healthy(self, healthy, why=None):
        if healthy == self.healthy:
            return
        self.healthy = healthy
        url = self._client.address.safe_url
        if healthy:
            self._log.info(
                "cluster directory: Redis at {url} answers again{why}; this engine "
                "({engine_id}) is announced again and its member list reconciled",
                url=url, why=" (it lost its data)" if why else "",
                engine_id=self.me.engine_id if self.me else None)
        else:
            self._log.warn(
                "cluster directory: Redis at {url} is unreachable ({why}); this engine "
                "({engine_id}) keeps serving its own workers, and the {count} members "
                "it knows stay known until Redis is back", url=url, why=why,
                engine_id=self.me.engine_id if self.me else None, count=len(self._known))

    def _member_key(self, engine_id):
        return "{}member:{}".format(self.prefix, engine_id)

    def _next_tick(self):
        self._tick += 1
        return self._tick

    def _forget_old_leaves(self):
        horizon = self._reactor.seconds() - max(LEFT_MEMORY, 10 * self.ttl)
        for engine_id, when in list(self._left.items()):
            if when < horizon:
                del self._left[engine_id]

    async def _withdraw(self, me):
        beating = self._beating
        if beating is not None:
            waiting = Deferred()
            beating.addBoth(lambda r: (waiting.callback(None), r)[1])
            await waiting
        client, self._client = self._client, None
        client.unsubscribe(self.channel, self._event)
        if client.connected:
            try:
                await client.execute("DEL", self._member_key(me.engine_id))
                await client.execute("SREM", self.prefix + "members", me.engine_id)
                await client.publish(self.channel, json.dumps(
                    {"event": "leave", "member": me.as_dict()}))
            except RedisError as e:
                self._log.warn("cluster directory: could not withdraw {engine_id} "
                               "({error}); its key expires in {ttl:g} s",
                               engine_id=me.engine_id, error=e, ttl=self.ttl)
        await client.release()

    def when_reconciled(self):
        """@return: Deferred firing after the next listing of the members (for tests)."""
        d = Deferred()
        self._scans.append(d)
        return d

    def __repr__(self):
        return "<RedisDirectory {} {}>".format(
            self._client.address.safe_url if self._client else self.redis_url,
            self.me.engine_id if self.me else "(not joined)")
