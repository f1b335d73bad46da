"""
Replicas: several live workers hosting one function id, and the router that picks one
per call (DESIGN.md, "A function has replicas"; issue 12 point 3).

The engine's registry (C{Engine.functions}) keeps one L{FunctionEntry} per id, the
*primary*: the latest registration still live, whose description and formats discovery
shows and whose C{host}/C{owner} the rest of the engine reads. When a second worker
registers an id a live worker already hosts (and auth lets it, see
L{iii_twisted.auth.refuse_takeover}: the same principal, or anyone without auth), the
engine does not replace the first one: L{Replicas.join} puts both entries in a
L{ReplicaSet}, and each call of the id goes to the host L{ReplicaSet.pick} chooses:

1. the fewest calls in flight (results the worker still owes, all functions counted:
   L{iii_twisted.invocations.InvocationTracker.count_for}); a worker that does not
   read its connection (over ``limits.send_buffer_soft``) comes after every other;
2. then local hosts before remote ones (L{ReplicaSet.pick}'s C{preference}: a
   function another cluster member offers over its link ranks after this engine's
   workers, L{iii_twisted.cluster});
3. then round robin, so equally loaded replicas take turns.

When a replica leaves (unregisters or disconnects) only its entry goes; the id stays
while any host remains, and calls already forwarded to the one that left fail with
``invocation_stopped`` (the tracker does that, per worker). Sets exist only for ids with
two or more hosts, so a call of an ordinary function costs one extra dict lookup.

The reference engine's behaviour (the last registration replaces the function, and its
departure removes the id) is the policy L{LAST_WINS}, chosen per engine with the
top-level config key ``function_replicas`` (default L{SPREAD}).
"""

from twisted.logger import Logger

SPREAD = "spread"  # every live registration of an id is a replica (default)
LAST_WINS = "last_wins"  # the reference: the last registration replaces the others
POLICIES = (SPREAD, LAST_WINS)
_CONGESTED = float("inf")  # the load of a host that does not read its connection


def _on_its_worker(entry):
    """Is C{entry} run by its owner over its own connection (not HTTP-invoked)?"""
    owner = entry.owner
    return owner is not None and entry.host is owner.host


def _local(entry):
    """
    Local first: a host on this engine ranks 0, a function another cluster member
    offers over its link (L{iii_twisted.cluster.links}) ranks 1.
    """
    owner = entry.owner
    return 1 if owner is not None and is_peer(owner) else 0


def is_peer(worker):
    """Is C{worker} (a L{WorkerRecord}) another engine's link, not a worker?"""
    return getattr(getattr(worker, "connection", None), "cluster_peer", None) is not None


class ReplicaSet:
    """
    The hosts of one function id: L{FunctionEntry}s of distinct owners, in registration
    order (the last is the engine's primary entry).
    """

    __slots__ = ("entries", "_next")

    def __init__(self, entries):
        self.entries = list(entries)
        self._next = 0  # round-robin cursor: where the next tie-break starts

    def add(self, entry):
        """Add C{entry}; a previous entry of the same owner is replaced."""
        self.entries = [e for e in self.entries if e.owner is not entry.owner]
        self.entries.append(entry)

    def remove(self, owner):
        """@return: the entry of C{owner} that was removed, or None."""
        for i, entry in enumerate(self.entries):
            if entry.owner is owner:
                del self.entries[i]
                return entry
        return None

    def entry_of(self, owner):
        for entry in self.entries:
            if entry.owner is owner:
                return entry
        return None

    def pick(self, load, preference=_local):
        """
        Choose the host of one call.

        @param load: entry -> calls in flight on its host (int).
        @param preference: entry -> rank (int, lower first) among equally loaded hosts.
        @return: an entry of the set.
        """
        entries = self.entries
        count = len(entries)
        start = self._next % count
        best = best_key = None
        best_at = start
        for step in range(count):
            at = (start + step) % count
            entry = entries[at]
            key = (load(entry), preference(entry))
            if best is None or key < best_key:
                best, best_key, best_at = entry, key, at
        self._next = best_at + 1
        return best


class Replicas:
    """
    The replica sets of one engine, and its policy.

    @ivar policy: L{SPREAD} or L{LAST_WINS}.
    @ivar sets: function id -> L{ReplicaSet}, for ids with two or more hosts only.
    """

    _log = Logger()

    def __init__(self, tracker, policy=SPREAD):
        """
        @param tracker: the engine's L{iii_twisted.invocations.InvocationTracker}
            (its per-worker count is the load).
        @param policy: L{SPREAD} or L{LAST_WINS}.
        @raise ValueError: for another policy.
        """
        self._tracker = tracker
        self.sets = {}
        self.policy = None
        self.set_policy(policy)

    def set_policy(self, policy):
        """
        Change the policy (a reload). Switching to L{LAST_WINS} keeps the sets that
        exist until their next registration; new registrations replace.
        """
        if policy not in POLICIES:
            raise ValueError("function_replicas must be one of {}, not {!r}".format(
                ", ".join(POLICIES), policy))
        self.policy = policy

    def join(self, previous, entry):
        """
        C{entry} (a worker's registration) arrives where C{previous}, the primary
        entry of another live worker, is registered; auth has allowed it.

        @return: True when both stay as replicas; False when the policy is
            L{LAST_WINS} (unless one is another cluster member's offer) or either
            is not run by its worker over its connection (an
            in-process or HTTP-invoked function: the last wins), and the caller
            replaces, calling L{drop} for the replicas that go with it.
        """
        across = (previous.owner is not None and is_peer(previous.owner)) or \
            (entry.owner is not None and is_peer(entry.owner))
        if (self.policy != SPREAD and not across) or not (
                _on_its_worker(previous) and _on_its_worker(entry)):
            # Hosts on several cluster members are replicas under either policy:
            # last_wins is about the workers of one engine.
            return False
        function_id = entry.function_id
        replicas = self.sets.get(function_id)
        if replicas is None:
            replicas = self.sets[function_id] = ReplicaSet([previous])
        replicas.add(entry)
        self._log.info("function {function_id} has {count} hosts (worker {worker_id} "
                       "joined)", function_id=function_id, count=len(replicas.entries),
                       worker_id=entry.owner.id)
        return True

    def replaced(self, entry):
        """The primary's own owner registered C{entry} again: keep its set current."""
        replicas = self.sets.get(entry.function_id)
        if replicas is not None:
            replicas.add(entry)

    def leave(self, function_id, owner):
        """
        C{owner}'s host of C{function_id} goes (unregistered, or it disconnected).

        @return: C{(removed entry, the new primary)}, or None when C{owner} is not a
            host in a set of that id.
        """
        replicas = self.sets.get(function_id)
        if replicas is None:
            return None
        removed = replicas.remove(owner)
        if removed is None:
            return None
        primary = replicas.entries[-1]
        if len(replicas.entries) == 1:
            del self.sets[function_id]
        self._log.info("function {function_id}: worker {worker_id} left, {count} hosts "
                       "remain", function_id=function_id, worker_id=owner.id,
                       count=len(replicas.entries))
        return removed, primary

    def drop(self, function_id):
        """Forget the set of C{function_id}. @return: its entries (maybe [])."""
        replicas = self.sets.pop(function_id, None)
        return replicas.entries if replicas is not None else []

    def entry_of(self, function_id, owner):
        """@return: C{owner}'s entry in the set of C{function_id}, or None."""
        replicas = self.sets.get(function_id)
        return replicas.entry_of(owner) if replicas is not None else None

    def host_count(self, function_id):
        """@return: how many hosts a registered id has (1 without a set)."""
        replicas = self.sets.get(function_id)
        return len(replicas.entries) if replicas is not None else 1

    def pick(self, function_id):
        """@return: the entry whose host takes the next call of a replicated id."""
        return self.sets[function_id].pick(self._load)

    def pick_local(self, function_id):
        """
        @return: the entry of a local host (not another member's link) that takes
            a call of a replicated id that came over a cluster link, or None when
            only links host it.
        """
        def load(entry):
            owner = entry.owner
            # Links last whatever their load; among local hosts the usual order.
            return _CONGESTED if owner is not None and is_peer(owner) else self._load(entry)
        entry = self.sets[function_id].pick(load)
        return None if entry.owner is not None and is_peer(entry.owner) else entry

    def _load(self, entry):
        owner = entry.owner
        if owner is None:
            return 0
        if getattr(owner.connection, "congested", False):
            # It does not read its socket (backpressure): a call sent there would fail
            # with limit_exceeded at once, so any other host goes first.
            return _CONGESTED
        return self._tracker.count_for(owner)
