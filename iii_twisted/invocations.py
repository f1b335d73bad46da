"""
In-flight calls to worker-hosted functions.

The engine sends ``invokefunction`` to a worker and waits for its ``invocationresult``.
Each such call is one L{PendingInvocation} in the L{InvocationTracker}: a Deferred, a
deadline and the worker that owes the result. The tracker is the only owner of these
entries; L{InvocationTracker._add} and L{InvocationTracker._remove} are its only
mutators and keep ``by_id`` and ``by_worker`` consistent.

Timeouts: every call gets the same timeout, so deadlines come in the order calls were
added, which is ``by_id``'s order. One timer, set for the oldest pending call's
deadline, expires whatever is due when it fires and is set again for the new oldest
call: no timer is created or cancelled per call (they were a measurable share of a
routed call, bench/README.rst), and each call still fails at its own deadline.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from .protocol import INVOCATION_STOPPED, INVOCATION_TIMEOUT, InvocationError


class PendingInvocation:
    """One call waiting for a worker's ``invocationresult``."""

    __slots__ = ("invocation_id", "function_id", "worker", "deferred", "deadline")

    def __init__(self, invocation_id, function_id, worker, deferred, deadline):
        self.invocation_id = invocation_id
        self.function_id = function_id
        self.worker = worker
        self.deferred = deferred
        self.deadline = deadline  # clock seconds, or None without a timeout


class InvocationTracker:
    """
    The calls the engine has forwarded to workers and not yet seen answered.

    @ivar by_id: invocation id -> L{PendingInvocation}.
    @ivar by_worker: worker -> {invocation id: L{PendingInvocation}} it owes a result for.
    """

    _log = Logger()

    def __init__(self, clock, timeout):
        """
        @param clock: an C{IReactorTime} for the timeout timers.
        @param timeout: seconds a worker may take before the call fails with
            ``invocation_timeout``; 0 or None disables the engine-side timeout.
        """
        self._clock = clock
        self._timeout = timeout
        self._timer = None  # set for the oldest pending call's deadline, or None
        self.by_id = {}
        self.by_worker = {}

    def __len__(self):
        return len(self.by_id)

    def add(self, invocation_id, function_id, worker):
        """
        Record a call before its ``invokefunction`` is sent to C{worker}.

        @return: a Deferred firing with the result, or failing with InvocationError
            (the worker's error, ``invocation_stopped`` or ``invocation_timeout``).
            Cancelling it forgets the call; a late result is then dropped.
        @raise KeyError: if the invocation id is already pending.
        """
        if invocation_id in self.by_id:
            raise KeyError(invocation_id)
        d = Deferred(lambda d: self._remove(invocation_id))
        deadline = None
        if self._timeout:
            deadline = self._clock.seconds() + self._timeout
            if self._timer is None:
                self._timer = self._clock.callLater(self._timeout, self._expire_due)
        self._add(PendingInvocation(invocation_id, function_id, worker, d, deadline))
        return d

    def count_for(self, worker):
        """@return: how many results C{worker} owes."""
        owed = self.by_worker.get(worker)
        return len(owed) if owed else 0

    def resolve(self, invocation_id, worker, result, error):
        """
        Complete a call with the result a worker sent.

        @param worker: the worker the result came from; a result from any other worker
            is refused (so one worker cannot answer another's calls).
        @param error: an ErrorBody dict, or None for success.
        @return: True if the call was pending for that worker, False if the result was
            unknown, late or from the wrong worker (the caller logs and drops it).
        """
        pending = self.by_id.get(invocation_id)
        if pending is None or pending.worker is not worker:
            return False
        self._remove(invocation_id)
        if error is not None:
            pending.deferred.errback(InvocationError.from_body(error))
        else:
            pending.deferred.callback(result)
        return True

    def detach(self, worker):
        """
        Fail every call C{worker} owes a result for with ``invocation_stopped``.

        @return: the number of calls failed.
        """
        owed = self.by_worker.get(worker)
        if not owed:
            return 0
        failed = list(owed.values())
        for pending in failed:
            self._remove(pending.invocation_id)
        for pending in failed:
            pending.deferred.errback(InvocationError(INVOCATION_STOPPED, "Invocation stopped"))
        return len(failed)

    def _expire_due(self):
        """Fail the calls whose deadline has come, oldest first; set the next timer."""
        self._timer = None
        now = self._clock.seconds()
        while self.by_id:
            pending = next(iter(self.by_id.values()))
            if pending.deadline > now:
                self._timer = self._clock.callLater(
                    pending.deadline - now, self._expire_due)
                return
            self._expire(pending)

    def _expire(self, pending):
        self._remove(pending.invocation_id)
        self._log.warn(
            "invocation {invocation_id} of {function_id} timed out after {timeout}s",
            invocation_id=pending.invocation_id,
            function_id=pending.function_id,
            timeout=self._timeout,
        )
        pending.deferred.errback(
            InvocationError(
                INVOCATION_TIMEOUT,
                "Invocation of {} timed out after {}ms".format(
                    pending.function_id, int(self._timeout * 1000)
                ),
            )
        )

    def _add(self, pending):
        self.by_id[pending.invocation_id] = pending
        owed = self.by_worker.get(pending.worker)
        if owed is None:
            owed = self.by_worker[pending.worker] = {}
        owed[pending.invocation_id] = pending

    def _remove(self, invocation_id):
        pending = self.by_id.pop(invocation_id, None)
        if pending is None:
            return None
        if not self.by_id and self._timer is not None:
            # Nothing left to time out: no timer left behind (a test's clock, or a
            # reactor being stopped, sees none).
            self._timer.cancel()
            self._timer = None
        owed = self.by_worker[pending.worker]
        del owed[invocation_id]
        if not owed:
            del self.by_worker[pending.worker]
        return pending
