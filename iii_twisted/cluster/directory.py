"""
Cluster membership: L{IClusterDirectory}, its value type L{Member}, and
L{MemoryDirectory} for engines that share one process (tests, embedding).
"""

from twisted.internet.defer import Deferred, succeed  # noqa: F401 (Deferred: annotations)
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer


class Member:
    """
    One engine of the cluster, as the directory lists it.

    @ivar engine_id: unique per engine process and start (str); what discovery shows
        as the engine that holds a worker, function or trigger.
    @ivar address: a Twisted I{client} endpoint string at which the member's link
        listener is reached (C{"tcp:127.0.0.1:40123"}, C{"tls:host.example:40123"}).
    @ivar name: a readable label for logs and discovery (C{hostname:pid} by default).
    @ivar started_at_ms: wall-clock start of that engine, milliseconds since the epoch.
    """

    __slots__ = ("engine_id", "address", "name", "started_at_ms")

    def __init__(self, engine_id, address, name=None, started_at_ms=0):
        self.engine_id = engine_id
        self.address = address
        self.name = name or engine_id
        self.started_at_ms = started_at_ms

    def as_dict(self):
        """@return: the JSON form stored in a directory backend."""
        return {"engine_id": self.engine_id, "address": self.address,
                "name": self.name, "started_at_ms": self.started_at_ms}

    @classmethod
    def from_dict(cls, data):
        """@raise KeyError, TypeError: C{data} is not what L{as_dict} wrote."""
        return cls(data["engine_id"], data["address"], data.get("name"),
                   data.get("started_at_ms", 0))

    def __eq__(self, other):
        return isinstance(other, Member) and self.as_dict() == other.as_dict()

    def __hash__(self):
        return hash(self.engine_id)

    def __repr__(self):
        return "<Member %s %s at %s>" % (self.name, self.engine_id, self.address)


class IClusterDirectory(Interface):
    """
    Membership of one engine in a cluster.

    The engine calls L{join} once when it starts (its link listener is already
    listening, so C{member.address} is known) and L{leave} once when it stops. Between
    the two, the directory tells the engine about every *other* member through the
    observer given to L{join}: C{member_joined(member)} when it appears (including each
    member already there at join time) and C{member_left(member)} when it goes (it left,
    or its heartbeat ran out). The engine opens and closes its links on those calls.
    """

    healthy = Attribute(
        "False while the directory's backend cannot be reached (for Redis: the "
        "connection is down); members already known stay known until the backend "
        "says otherwise. Shown in the engine's health.")

    def join(member: Member, observer) -> "Deferred":
        """
        Announce C{member} (this engine) and start following the others.

        @param observer: has C{member_joined(member)} and C{member_left(member)};
            never called for C{member} itself; never raises into the directory.
        @return: Deferred firing when the announcement is stored.
        """

    def leave() -> "Deferred":
        """Withdraw this engine's announcement and stop following; idempotent."""

    def members() -> dict:
        """@return: C{{engine_id: Member}} of the other members known now."""


@implementer(IClusterDirectory)
class MemoryDirectory:
    """
    A directory kept in memory, shared by the engines of one process: give each engine
    the same C{MemoryRegistry} and its own C{MemoryDirectory}. Membership changes are
    announced synchronously. A member that stops without L{leave} (a simulated crash)
    is removed with L{MemoryRegistry.expire}, the memory form of a heartbeat running out.
    """

    log = Logger()
    healthy = True

    def __init__(self, registry):
        self.registry = registry
        self.me = None
        self.observer = None

    def join(self, member, observer):
        self.me, self.observer = member, observer
        for other in list(self.registry.members.values()):
            self._tell(observer, "member_joined", other)
        self.registry._add(self)
        return succeed(None)

    def leave(self):
        if self.me is not None:
            self.registry._remove(self.me.engine_id)
            self.me = self.observer = None
        return succeed(None)

    def members(self):
        if self.me is None:
            return {}
        return {engine_id: member for engine_id, member in self.registry.members.items()
                if engine_id != self.me.engine_id}

    def _tell(self, observer, event, member):
        try:
            getattr(observer, event)(member)
        except Exception:
            self.log.failure("cluster observer {event} failed for {member}",
                             event=event, member=member)


class MemoryRegistry:
    """What the L{MemoryDirectory}s of one process share: the members and their watchers."""

    def __init__(self):
        self.members = {}
        self._directories = {}

    def _add(self, directory):
        member = directory.me
        self.members[member.engine_id] = member
        self._directories[member.engine_id] = directory
        for other in list(self._directories.values()):
            if other is not directory and other.observer is not None:
                other._tell(other.observer, "member_joined", member)

    def _remove(self, engine_id):
        member = self.members.pop(engine_id, None)
        self._directories.pop(engine_id, None)
        if member is None:
            return
        for other in list(self._directories.values()):
            if other.observer is not None:
                other._tell(other.observer, "member_left", member)

    def expire(self, engine_id):
        """Drop C{engine_id} as if its heartbeat ran out (it does not hear of it)."""
        directory = self._directories.get(engine_id)
        self._remove(engine_id)
        if directory is not None:
            directory.me = directory.observer = None
