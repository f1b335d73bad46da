"""
L{BuiltinQueueBroker}: ``modules::queue::BuiltinQueueAdapter``, the queue module's
messages in this process (an L{IQueueBroker}), made durable by an L{IQueueStore}: the
L{MemoryQueueStore} (``store_method: in_memory``, nothing outlives the process) or the
fsync'd L{JournalQueueStore} (``file_based``).

Per queue it holds the ready messages (in order), the ones waiting out a retry or
requeue delay, the ones handed to the module and not settled yet, and the dead
letters. What a restart needs goes to the store as one record per event, in the
journal format the queue module has always written (so older journals replay)::

    {"op": "enq", "job": JOB}          accepted (JOB is Job.record())
    {"op": "ack", "id": ID}            processed
    {"op": "nack", "id": ID, "attempts": N}   failed, retried later
    {"op": "dlq", "id": ID, "error": TEXT, "failed_at": MS, "attempts": N}
    {"op": "redrive", "id": ID}        back from the dead-letter queue, attempts reset
    {"op": "discard", "id": ID}        dropped from the dead-letter queue

(``attempts`` in ``dlq`` records is new with the broker: without it, as in older
journals, a dead letter replays with the attempts of its last ``nack``, at least 1;
older code ignores it.) A publish counts (is handed out, and its Deferred fires) only
once its ``enq`` record is durable. The other records follow a change already made in
memory: a crash before one is written only means a redelivery (at-least-once). A
requeue (the function is not registered yet) writes nothing: a restart delivers the
message again anyway. Requeued messages wait per function: one of them goes round
each delay, not all of them (L{BuiltinQueueBroker.requeue}). Records name a message
by id alone, so ids are unique across queues: a durable publish's first copy keeps
the message's id, the others get new ones.

Hand-out is synchronous: a publish, ack, redrive or due retry hands the next messages
to C{arrived} before it returns, up to C{prefetch} unsettled per queue; a settle made
from inside C{arrived} is taken into account by the same loop, not a nested one. In a
FIFO queue one message per group (L{Job.group}; messages without a group are one
group) is handed out at a time, in order, and a message in retry keeps its group so
the next ones wait for it.
"""

from collections import deque
from uuid import uuid4

from twisted.internet.defer import fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IQueueBroker


class _Queue:
    """
    One queue's messages.

    @ivar ready: jobs to hand out, in order.
    @ivar delayed: id -> (job, IDelayedCall): waiting out a retry's delay.
    @ivar parked: function id -> jobs requeued because it is missing, in order.
    @ivar probes: function id -> (IDelayedCall of its next probe, delay in s).
    @ivar due: function ids whose probe is due (waiting for a free slot).
    @ivar held: id -> job handed out and not settled.
    @ivar dlq: id -> (job, error, failed_at ms), oldest first.
    @ivar groups: FIFO group -> the id holding it (handed out, or in retry).
    """

    __slots__ = ("key", "ready", "delayed", "parked", "probes", "due", "held", "dlq",
                 "groups", "consuming", "prefetch", "fifo", "dispatching", "again")

    def __init__(self, key):
        self.key = key
        self.ready = deque()
        self.delayed = {}
        self.parked = {}
        self.probes = {}
        self.due = set()
        self.held = {}
        self.dlq = {}
        self.groups = {}
        self.consuming = False
        self.prefetch = 0
        self.fifo = False
        self.dispatching = False
        self.again = False

    def empty(self):
        return not (self.ready or self.delayed or self.parked or self.held or self.dlq
                    or self.consuming)

    def waiting(self):
        """@return: how many jobs wait out a delay (retries and parked requeues)."""
        return len(self.delayed) + sum(len(jobs) for jobs in self.parked.values())

    def release(self, job):
        if self.groups.get(job.group) == job.id:
            del self.groups[job.group]


def replay(records, job_from_record):
    """
    Rebuild the state a journal describes.

    @return: (live jobs in the order they were accepted, [(job, error, failed_at)] of
        the dead letters).
    @raise KeyError: for an ``enq`` record without a job id or queue.
    """
    live = {}
    dead = {}
    for record in records:
        op = record.get("op")
        if op == "enq":
            job = job_from_record(record["job"])
            live[job.id] = job
        elif op == "nack":
            job = live.get(record["id"])
            if job is not None:
                job.attempts = record["attempts"]
        elif op in ("ack", "discard"):
            live.pop(record["id"], None)
            dead.pop(record["id"], None)
        elif op == "dlq":
            job = live.pop(record["id"], None)
            if job is not None:
                # Older journals lack the last attempt's count: at least one was made.
                job.attempts = record.get("attempts") or max(job.attempts, 1)
                dead[job.id] = (job, record.get("error"), record.get("failed_at"))
        elif op == "redrive":
            entry = dead.pop(record["id"], None)
            if entry is not None:
                entry[0].attempts = 0
                live[entry[0].id] = entry[0]
    return list(live.values()), list(dead.values())


@implementer(IQueueBroker)
class BuiltinQueueBroker:
    """
    An L{IQueueBroker} in this process; see the module docstring.

    @ivar store: the L{IQueueStore} (the engine's health check and start-up report
        read it through the module).
    """

    broker_type = "builtin"
    _log = Logger()

    def __init__(self, store, clock, job_from_record):
        """
        @param store: an L{IQueueStore}, opened by L{start}.
        @param clock: the IReactorTime retry delays run on.
        @param job_from_record: builds a Job from its JSON object (journal replay).
        """
        self.store = store
        self._clock = clock
        self._job_from_record = job_from_record
        self._queues = {}
        self._fanouts = {}  # topic -> set of queue keys
        self._storing = {}  # id -> job whose enq record is being written
        self._arrived = None
        self._running = False

    # -- life ------------------------------------------------------------------------

    def start(self, arrived):
        """
        Open the store and replay it (synchronously: start-up waits for it).

        @return: Deferred firing with None, or already failed with the OSError of a
            journal that cannot be read.
        """
        self._arrived = arrived
        try:
            records = self.store.open(self._snapshot)
            live, dead = replay(records, self._job_from_record)
        except Exception:
            return fail()
        for job in live:
            self._queue(job.queue).ready.append(job)
        for job, error, failed_at in dead:
            self._queue(job.queue).dlq[job.id] = (job, error, failed_at)
        if live or dead:
            self._log.info("queue store: restored {live} message(s) and {dead} "
                           "dead-lettered", live=len(live), dead=len(dead))
        self._running = True
        for queue in list(self._queues.values()):
            self._dispatch(queue)
        return succeed(None)

    def stop(self):
        """
        Hand out no more; messages waiting out a delay go back to the head of their
        queue (a restart delivers them at once). @return: Deferred firing once the
        store has written what is pending and closed.
        """
        self._running = False
        for queue in self._queues.values():
            for job, call in reversed(list(queue.delayed.values())):
                call.cancel()
                queue.ready.appendleft(job)
            queue.delayed.clear()
            for call, _ in queue.probes.values():
                call.cancel()
            queue.probes.clear()
            queue.due.clear()
            for jobs in reversed(list(queue.parked.values())):
                queue.ready.extendleft(reversed(jobs))
            queue.parked.clear()
        return self.store.close()

    # -- consuming -------------------------------------------------------------------

    def consume(self, queue, prefetch, fifo):
        q = self._queue(queue)
        q.consuming, q.prefetch, q.fifo = True, prefetch, fifo
        self._dispatch(q)

    def stop_consuming(self, queue):
        q = self._queues.get(queue)
        if q is not None:
            q.consuming = False
            self._forget_if_empty(q)

    def _queue(self, key):
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue(key)
        return q

    def _forget_if_empty(self, q):
        if q.empty() and self._queues.get(q.key) is q:
            del self._queues[q.key]

    def _dispatch(self, q):
        """Hand out what C{q}'s prefetch allows; re-entrant calls make it loop again."""
        if q.dispatching:
            q.again = True
            return
        q.dispatching = True
        try:
            self._hand_out(q)
            # A standard queue's loop saw every change made meanwhile; a FIFO one may
            # have passed a group that was freed since.
            while q.again and q.fifo:
                q.again = False
                self._hand_out(q)
        finally:
            q.dispatching = q.again = False

    def _hand_out(self, q):
        ready, held = q.ready, q.held
        missing = set()  # functions found missing in this pass
        while q.due and self._running and q.consuming and len(held) < q.prefetch:
            function_id = q.due.pop()
            if function_id in q.parked and not self._probe_one(q, function_id):
                missing.add(function_id)
        i = 0
        while self._running and q.consuming and len(held) < q.prefetch and i < len(ready):
            job = ready[i]
            if q.fifo:
                holder = q.groups.get(job.group)
                if holder is not None and holder != job.id:
                    i += 1  # its group waits for an earlier message
                    continue
            function_id = job.function_id
            if q.parked and function_id in q.parked:
                if function_id in missing:
                    pass  # known missing: this one joins the others
                elif self._probe_one(q, function_id):
                    i = 0  # back: its earlier messages were put first
                    continue
                else:
                    missing.add(function_id)
                    continue
            if q.fifo:
                del ready[i]
                q.groups[job.group] = job.id
            else:
                ready.popleft()
            held[job.id] = job
            try:
                self._arrived(job)
            except Exception:
                self._log.failure("queue {queue}: handing out {job_id} failed",
                                  queue=q.key, job_id=job.id)
            parked = q.parked.get(function_id) if q.parked else None
            if parked and parked[-1] is job:
                missing.add(function_id)

    def _give(self, q, job):
        try:
            self._arrived(job)
        except Exception:
            self._log.failure("queue {queue}: handing out {job_id} failed", queue=q.key,
                              job_id=job.id)

    def _probe_one(self, q, function_id):
        """
        Hand out the first parked message of C{function_id} (before any later one of
        that function), to see whether the function is back.

        @return: True when it is (the module did not requeue the message): the other
            parked messages are then first in line, in order.
        """
        parked = q.parked[function_id]
        job = parked.popleft()
        if not parked:
            del q.parked[function_id]
        q.held[job.id] = job
        self._give(q, job)
        again = q.parked.get(function_id)
        if again and again[-1] is job:
            again.pop()
            again.appendleft(job)  # still missing: it keeps its place, first
            return False
        rest = q.parked.pop(function_id, None)
        if rest:
            q.ready.extendleft(reversed(rest))
        probe = q.probes.pop(function_id, None)
        if probe is not None:
            probe[0].cancel()
        q.due.discard(function_id)
        return True

    # -- messages --------------------------------------------------------------------

    def publish(self, job):
        """@return: Deferred firing with None once the message's record is durable."""
        # Until its record is durable the job is only here (a compaction's snapshot
        # must still include it).
        self._storing[job.id] = job
        return self.store.append([{"op": "enq", "job": job.record()}]).addBoth(
            self._stored, job)

    def _stored(self, result, job):
        del self._storing[job.id]
        if isinstance(result, Failure):
            return result
        q = self._queues.get(job.queue) or self._queue(job.queue)
        q.ready.append(job)
        self._dispatch(q)
        return None

    def add_fanout(self, topic, queue):
        self._fanouts.setdefault(topic, set()).add(queue)
        return succeed(None)

    def remove_fanout(self, topic, queue):
        queues = self._fanouts.get(topic)
        if queues is not None:
            queues.discard(queue)
            if not queues:
                del self._fanouts[topic]
        return succeed(None)

    def publish_fanout(self, topic, job):
        copies = []
        for queue in sorted(self._fanouts.get(topic, ())):
            copy = self._job_from_record(dict(
                job.record(), queue=queue, id=job.id if not copies else str(uuid4())))
            copies.append(self.publish(copy))
        return gatherResults(copies, consumeErrors=True).addCallbacks(
            lambda _: None, lambda f: f.value.subFailure)

    def _settled(self, job):
        """@return: the job's queue, with the job no longer held (or None)."""
        q = self._queues.get(job.queue)
        if q is not None:
            q.held.pop(job.id, None)
        return q

    def ack(self, job):
        q = self._queues.get(job.queue)
        if q is not None:
            q.held.pop(job.id, None)
            if q.groups:
                q.release(job)
            if q.ready or q.due:
                self._dispatch(q)
            elif not (q.consuming or q.held or q.delayed or q.parked or q.dlq):
                self._forget_if_empty(q)
        return self._record({"op": "ack", "id": job.id})

    def retry(self, job, delay_ms):
        """Journal the attempt count, then hand the message out after C{delay_ms}."""
        q = self._settled(job) or self._queue(job.queue)
        if self._running:
            # The job keeps its FIFO group meanwhile.
            call = self._clock.callLater(delay_ms / 1000.0, self._due, q, job)
            q.delayed[job.id] = (job, call)
        else:
            q.ready.appendleft(job)  # settled after stop: first in line at the restart
        self._dispatch(q)
        return self._record({"op": "nack", "id": job.id, "attempts": job.attempts})

    def _due(self, q, job):
        q.delayed.pop(job.id, None)
        q.ready.appendleft(job)  # retries go first, as in the reference
        self._dispatch(q)

    def requeue(self, job, delay_ms):
        """
        The message's function is missing: park it after the others of that function
        (nothing to journal: the attempts did not change). The first parked message
        is handed out again after C{delay_ms}, or before a later message of its
        function: when the module takes it (the function is back) the rest follow at
        once, in order; else it keeps its place. One message per function goes round,
        not all of them.
        """
        q = self._settled(job) or self._queue(job.queue)
        if not self._running:
            q.ready.appendleft(job)
            return succeed(None)
        # The job keeps its FIFO group meanwhile.
        q.parked.setdefault(job.function_id, deque()).append(job)
        if job.function_id not in q.probes:
            self._schedule_probe(q, job.function_id, delay_ms / 1000.0)
        self._dispatch(q)
        return succeed(None)

    def _schedule_probe(self, q, function_id, delay):
        q.probes[function_id] = (
            self._clock.callLater(delay, self._probe, q, function_id), delay)

    def _probe(self, q, function_id):
        q.probes.pop(function_id, None)
        if function_id in q.parked:
            q.due.add(function_id)  # probed as soon as a slot is free
            self._dispatch(q)

    def dead(self, job, error, failed_at):
        q = self._settled(job)
        if q is None:
            q = self._queue(job.queue)
        q.dlq[job.id] = (job, error, failed_at)
        q.release(job)
        self._dispatch(q)
        return self._record({"op": "dlq", "id": job.id, "error": error,
                             "failed_at": failed_at, "attempts": job.attempts})

    def _record(self, record):
        """Journal an event whose loss only means a redelivery (ack, nack, ...)."""
        if not self._running:
            # Settled after stop: the store is closed, so the message is delivered
            # again after the restart (at-least-once).
            self._log.info("queue: {op} of {job_id} after shutdown not recorded",
                           op=record["op"], job_id=record["id"])
            return succeed(None)
        return self.store.append([record])

    # -- dead letters and stats ------------------------------------------------------

    def dlq_messages(self, queue):
        q = self._queues.get(queue)
        return succeed(list(q.dlq.values()) if q is not None else [])

    def _dead_ids(self, queue, ids):
        q = self._queues.get(queue)
        if q is None:
            return None, []
        if ids is None:
            return q, list(q.dlq)
        return q, [job_id for job_id in ids if job_id in q.dlq]

    def redrive(self, queue, ids):
        """Back to the end of the queue, attempts reset, in dead-lettering order."""
        q, moved = self._dead_ids(queue, ids)
        for job_id in moved:
            job, _, _ = q.dlq.pop(job_id)
            job.attempts = 0
            q.ready.append(job)
        if not moved:
            return succeed([])
        d = self.store.append([{"op": "redrive", "id": job_id} for job_id in moved])
        self._dispatch(q)
        return d.addCallback(lambda _: moved)

    def discard(self, queue, ids):
        q, dropped = self._dead_ids(queue, ids)
        for job_id in dropped:
            del q.dlq[job_id]
        if not dropped:
            return succeed([])
        self._forget_if_empty(q)
        d = self.store.append([{"op": "discard", "id": job_id} for job_id in dropped])
        return d.addCallback(lambda _: dropped)

    def stats(self, queue):
        q = self._queues.get(queue)
        if q is None:
            return succeed({"ready": 0, "delayed": 0, "in_flight": 0, "dlq": 0})
        return succeed({"ready": len(q.ready), "delayed": q.waiting(),
                        "in_flight": len(q.held), "dlq": len(q.dlq)})

    def dlq_queues(self):
        return succeed({key: len(q.dlq) for key, q in self._queues.items() if q.dlq})

    def local_queues(self):
        return list(self._queues)

    def local_counts(self, queue):
        q = self._queues.get(queue)
        if q is None:
            return {"ready": 0, "delayed": 0, "dlq": 0}
        return {"ready": len(q.ready), "delayed": q.waiting(), "dlq": len(q.dlq)}

    # -- journal compaction ----------------------------------------------------------

    def _snapshot(self):
        """@return: records that rebuild the live state (the store compacts with it)."""
        records = []
        for q in self._queues.values():
            jobs = list(q.held.values())
            jobs += [job for job, _ in q.delayed.values()]
            jobs += [job for parked in q.parked.values() for job in parked]
            jobs += list(q.ready)
            records += [{"op": "enq", "job": job.record()} for job in jobs]
            for job, error, failed_at in q.dlq.values():
                records.append({"op": "enq", "job": job.record()})
                records.append({"op": "dlq", "id": job.id, "error": error,
                                "failed_at": failed_at, "attempts": job.attempts})
        records += [{"op": "enq", "job": job.record()} for job in self._storing.values()]
        return records
