"""
L{ClusterService}: what the ``cluster:`` section adds to an engine (docs/cluster.rst).

It owns the link listener, this member's identity (a fresh C{engine_id} per start),
its membership in the directory (L{iii_twisted.cluster.directory}: the Redis one for a
config with ``redis_url``, or one a test or an embedding application injects), and
one L{PeerLink} per other member; it observes the directory (C{member_joined},
C{member_left}) and the engine's registry (to keep every link's offer in sync).
"""

import time
from uuid import uuid4

from twisted.application.service import MultiService
from twisted.internet.defer import maybeDeferred, succeed
from twisted.logger import Logger

from ..config import ConfigError
from ..extras import require_extra
from ..listeners import Listener
from ..replicas import is_peer
from .directory import Member
from .links import LinkServerFactory, Offer, PeerLink
from .triggers import SharedTriggers

LISTENER_NAME = "iii-cluster"


def require_directory():
    """
    @return: the module of the Redis directory.
    @raise ConfigError: naming the extra to install when this install has no Redis
        client (``pip install "iii-twisted[redis]"``).
    """
    return require_extra("iii_twisted.cluster.redis_directory",
                         "a cluster (its membership in Redis)", "cluster.redis_url")


def redis_directory(settings, reactor):
    """
    @return: the Redis directory for C{settings} (imported only for a config that
        uses it).
    @raise ConfigError: when this build has no Redis directory.
    """
    RedisDirectory = require_directory().RedisDirectory
    try:
        return RedisDirectory(settings.redis_url, reactor,
                              heartbeat_interval=settings.heartbeat,
                              ttl=settings.member_ttl)
    except ValueError as e:
        raise ConfigError(str(e), "cluster.redis_url")


class ClusterService(MultiService):
    """
    One engine's membership of a cluster.

    @ivar engine_id: this member's id (unique per start), as discovery shows it.
    @ivar name: this member's name (``cluster.name``, default hostname:pid).
    @ivar member: this member's L{Member} once joined, else None.
    @ivar links: engine id -> L{PeerLink}: the links this member opened.
    @ivar peers: engine id -> L{LinkServerProtocol}: the links other members opened
        here (their offers live in the registry through these).
    @ivar refused_links: links refused for a wrong or missing secret.
    """

    _log = Logger()

    def __init__(self, engine, reactor, settings, directory=None,
                 max_message_size=16 * 1024 * 1024):
        """
        @param settings: the L{iii_twisted.cluster.settings.ClusterConfig}.
        @param directory: an L{IClusterDirectory}, or None for the Redis one.
        @raise ConfigError: when no directory can be made.
        """
        MultiService.__init__(self)
        self.engine = engine
        self.reactor = reactor
        self.settings = settings
        self.engine_id = str(uuid4())
        self.name = settings.name
        self.secret = settings.secret
        self.heartbeat = settings.heartbeat
        self.member_ttl = settings.member_ttl
        self.max_message_size = max_message_size
        self.directory = directory if directory is not None else redis_directory(
            settings, reactor)
        self.member = None
        self.links = {}
        self.peers = {}
        self.refused_links = 0
        self.offer = Offer(engine, settings.trigger_types)
        self.shared_triggers = SharedTriggers(engine)
        self._sync_call = None
        self.factory = LinkServerFactory(engine, reactor, self, max_message_size,
                                         ping_interval=settings.heartbeat,
                                         ping_timeout=settings.member_ttl)
        self.listener = Listener(settings.listen, self.factory, reactor, LISTENER_NAME,
                                 authenticated=True)
        self.listener.setServiceParent(self)
        engine.cluster = self
        engine.registry_watchers.append(self._registry_changed)

    # -- start and stop ------------------------------------------------------------------

    def startService(self):
        self._stopping = False
        MultiService.startService(self)
        self.joined = self.listener._waitingForPort.addCallback(self._join)
        self.joined.addErrback(self._not_joined)

    def _not_joined(self, failure):
        try:
            from ..redis_client import RedisUnavailable
        except ImportError:  # no redis extra: then the directory is not a Redis one
            RedisUnavailable = None
        if RedisUnavailable is not None and failure.check(RedisUnavailable):
            # Expected input (Redis down at start): the directory has logged it and
            # announces this member at its first heartbeat that Redis answers.
            self._log.warn("cluster member {name} not announced yet: {error}; the "
                           "directory keeps trying", name=self.name,
                           error=failure.getErrorMessage())
            return
        self._log.failure("cluster member {name} could not join", failure, name=self.name)

    def _join(self, port):
        address = self.settings.advertise or "tcp:127.0.0.1:{}".format(port.getHost().port)
        self.member = Member(self.engine_id, address, self.name, int(time.time() * 1000))
        self._log.info("cluster member {name} ({engine_id}) joining; links at {address}",
                       name=self.name, engine_id=self.engine_id, address=address)
        return self.directory.join(self.member, self)

    _stopping = False

    def stopService(self):
        self._stopping = True  # no new link while leaving
        for link in list(self.links.values()):
            link.stop()
        self.links.clear()
        if self._sync_call is not None and self._sync_call.active():
            self._sync_call.cancel()
        self._sync_call = None
        d = maybeDeferred(self.directory.leave) if self.member is not None else succeed(None)
        d.addErrback(lambda f: self._log.failure("leaving the cluster failed", f))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

    def detach(self):
        """Take this service's hooks off the engine (it is being removed)."""
        if self._registry_changed in self.engine.registry_watchers:
            self.engine.registry_watchers.remove(self._registry_changed)
        if self.engine.cluster is self:
            self.engine.cluster = None

    def unlinked_members(self):
        """
        @return: the names of the members the directory lists that this engine has had
            no link to for longer than C{member_ttl} (a new member gets that long to
            link): a wrong secret or an unreachable link address (health, metrics).
        """
        now = self.reactor.seconds()
        return [link.member.name for link in self.links.values()
                if link.down_since is not None
                and now - link.down_since > self.settings.member_ttl]

    # -- the directory's observer ----------------------------------------------------------

    def member_joined(self, member):
        if not self.running or self._stopping or member.engine_id == self.engine_id:
            return
        old = self.links.pop(member.engine_id, None)
        if old is not None:
            old.stop()
        self._log.info("cluster member {name} ({engine_id}) joined at {address}",
                       name=member.name, engine_id=member.engine_id,
                       address=member.address)
        link = self.links[member.engine_id] = PeerLink(self, member, self.reactor)
        link.start()

    def member_left(self, member):
        self._log.info("cluster member {name} ({engine_id}) left", name=member.name,
                       engine_id=member.engine_id)
        link = self.links.pop(member.engine_id, None)
        if link is not None:
            link.stop()
        peer = self.peers.pop(member.engine_id, None)
        if peer is not None:
            # What it offered leaves the registry now (detach), its calls fail.
            peer.dropConnection(abort=True)

    # -- links from other members -------------------------------------------------------

    def peer_linked(self, protocol):
        engine_id = protocol.cluster_peer.engine_id
        old = self.peers.get(engine_id)
        self.peers[engine_id] = protocol
        if old is not None and old is not protocol:
            # The member dialed again (its old link is half-open): the new one wins.
            old.dropConnection(abort=True)
        self._log.info("cluster member {name} ({engine_id}) linked here",
                       name=protocol.cluster_peer.name, engine_id=engine_id)

    def peer_unlinked(self, protocol):
        engine_id = protocol.cluster_peer.engine_id
        if self.peers.get(engine_id) is protocol:
            del self.peers[engine_id]
            # Another member's copy of a trigger it had in force takes its place.
            self.shared_triggers.unlinked(engine_id)
            self._schedule()

    def trigger_offered(self, link, message):
        """A member's link (un)registers one of its triggers here."""
        self.shared_triggers.received(link, message)
        self._schedule()

    # -- the registry ---------------------------------------------------------------------

    def _registry_changed(self):
        self.offer.changed()
        if self.links or self.shared_triggers.offered:
            self._schedule()

    def _schedule(self):
        if self._sync_call is None and self.running:
            # Once per burst (a worker registering 100 functions is one sync).
            self._sync_call = self.reactor.callLater(0, self._sync)

    def _sync(self):
        self._sync_call = None
        try:
            self.shared_triggers.reconcile()
        except Exception:
            self._log.failure("placing the triggers other members offer failed")
        for link in list(self.links.values()):
            try:
                link.sync()
            except Exception:
                self._log.failure("syncing the link to {name} failed",
                                  name=link.member.name)

    # -- discovery ------------------------------------------------------------------------

    def engine_of(self, owner):
        """@return: (engine_id, engine_name) of the member holding what C{owner} owns."""
        if owner is not None and is_peer(owner):
            peer = owner.connection.cluster_peer
            return peer.engine_id, peer.name
        return self.engine_id, self.name

    def function_row(self, row, entry):
        """
        Say in an ``engine::functions::list`` row which member holds the function:
        C{engine_id}/C{engine_name} of its primary host, C{engines} (names of every
        member hosting it), and for a peer's function the name of the worker there.
        """
        owner = entry.owner
        row["engine_id"], row["engine_name"] = self.engine_of(owner)
        if owner is not None and is_peer(owner):
            held = owner.connection.cluster_peer.worker_of.get(entry.function_id)
            if held is not None:
                row["worker_name"] = held[1]
                if "worker_id" in row:
                    row["worker_id"] = held[0]
                    row["host"] = "worker"
        replicas = self.engine.replicas.sets.get(entry.function_id)
        hosts = replicas.entries if replicas is not None else (entry,)
        row["engines"] = sorted({self.engine_of(e.owner)[1] for e in hosts})
        return row

    def worker_rows(self, local_row):
        """
        @param local_row: worker record -> its ``engine::workers::list`` row here.
        @return: the rows of every worker of the cluster: this member's (not the
            links), then each peer's as it last said, each with C{engine_id} and
            C{engine_name}.
        """
        rows = []
        for worker in self.engine.workers.values():
            if not is_peer(worker):
                rows.append(dict(local_row(worker), engine_id=self.engine_id,
                                 engine_name=self.name))
        for protocol in list(self.peers.values()):
            peer = protocol.cluster_peer
            rows.extend(dict(row, engine_id=peer.engine_id, engine_name=peer.name)
                        for row in peer.workers)
        return rows

    def trigger_rows(self, local_rows):
        """
        @param local_rows: this member's v0.10 TriggerInfo rows (from
            C{engine.triggers}, including those peers offered here).
        @return: this member's own rows, then each peer's (as it last said, every
            trigger its workers registered), each with C{engine_id}/C{engine_name}.
        """
        rows = []
        for trigger, row in local_rows:
            if trigger.owner is None or not is_peer(trigger.owner):
                rows.append(dict(row, engine_id=self.engine_id, engine_name=self.name))
        for protocol in list(self.peers.values()):
            peer = protocol.cluster_peer
            rows.extend(dict(row, engine_id=peer.engine_id, engine_name=peer.name)
                        for row in peer.triggers)
        return rows

    def report(self):
        """@return: start-up report lines."""
        return ["cluster member {} ({}): {}".format(self.name, self.engine_id,
                                                    self.listener.report())]
