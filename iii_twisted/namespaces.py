"""
Namespaces, as the reference has them since 0.23.0-rc.1 (../shared/spec/
current-reference.md §1.4; reference ``engine/src/engine/mod.rs`` ``NamespaceState``,
``claim_*``).

A connection names its namespace in ``engine::workers::register``
(``data.namespace``; py 0.25 takes it from ``III_NAMESPACE``). From then on the
functions it registers live in that namespace, calls carrying ``namespace`` are
routed strictly there, and ``registertrigger.namespace`` says where a trigger's
target function lives. A connection that never names one (every 0.9/0.10/0.11 SDK,
npm 0.22 without a namespace) stays in ``default``, where everything behaves as in
v0.10 (last registration wins, duplicate worker names allowed).

How this engine keeps the registry: the function of id ``F`` in namespace ``N`` is
``engine.functions[key(N, F)]``, where L{key} is ``F`` itself for ``default`` and
``N + SEP + F`` otherwise. Modules, which live in ``default``, never see namespaced
functions; a trigger bound to a namespaced function holds its key as its
``function_id``, so every module fires it unchanged. A worker is always sent the
plain id (L{plain}).

Registrations arrive before the namespace: SDKs replay them first and send
``engine::workers::register`` last. The reference buffers them until the namespace
is named (or a 5 s grace ends). Here they are applied to ``default`` at once, so a
connection that never names a namespace behaves exactly as in v0.10 (its
registration is in force for its next message, a re-registration takes over at
once), and moved into the namespace when it is named. A ``default`` function of
another live worker that such a registration took over is given back to that
worker by the move. (Deviation: between the registration and the naming, the
function is reachable in ``default``; for the SDKs the naming follows within the
same burst of frames.)

In a named namespace other than ``default`` the reference's 0.23 ownership rules
hold: the first live owner of an id keeps it (a second gets ``registrationrejected``
``FUNCTION_NAMESPACE_CONFLICT`` and keeps its connection); one live worker per name
(a second gets ``WORKER_NAMESPACE_CONFLICT`` and is closed); ``engine::*`` ids are
reserved. A blank namespace is refused (``INVALID_NAMESPACE``).
"""

from twisted.logger import Logger

from . import protocol as P
from .protocol import InvocationError
from .oplog import describe_worker

DEFAULT = "default"
SEP = "\x1f"  # between namespace and id in a registry key; refused in ids
REGISTRATION_REJECTED = "registrationrejected"
FUNCTION_NAMESPACE_CONFLICT = "FUNCTION_NAMESPACE_CONFLICT"
WORKER_NAMESPACE_CONFLICT = "WORKER_NAMESPACE_CONFLICT"
INVALID_NAMESPACE = "INVALID_NAMESPACE"

_log = Logger()


def key(namespace, function_id):
    """@return: the registry key of C{function_id} in C{namespace}."""
    if not namespace or namespace == DEFAULT:
        return function_id
    return namespace + SEP + function_id


def split(registry_key):
    """@return: C{(namespace, function_id)} of a registry key."""
    namespace, sep, function_id = registry_key.partition(SEP)
    if not sep:
        return DEFAULT, registry_key
    return namespace, function_id


def plain(registry_key):
    """@return: the function id a worker knows a registry key by."""
    return registry_key.rpartition(SEP)[2]


def is_blank(value):
    return isinstance(value, str) and not value.strip()


def of(worker):
    """@return: the namespace a worker named, or ``default`` (None: the engine)."""
    if worker is None:
        return DEFAULT
    return worker.declared.get("namespace") or DEFAULT


def _named(worker):
    return "namespace" in worker.declared


class Namespaces:
    """The per-engine namespace bookkeeping: what unnamed connections took over."""

    def __init__(self, engine):
        self.engine = engine
        # worker that has named no namespace yet -> {function id: the FunctionEntry
        # of another worker its registration replaced in default}
        self._displaced = {}

    # -- registrations ---------------------------------------------------------------

    def function_key(self, worker, message):
        """
        Where a worker's ``registerfunction`` goes.

        @return: the registry key, or None when the registration is refused (the
            worker has been sent ``registrationrejected``).
        """
        function_id = message["id"]
        if SEP in function_id:
            _log.warn("{worker}: function id {function_id!r} holds a control "
                      "character; refused", worker=describe_worker(worker),
                      worker_id=worker.id, function_id=function_id)
            return None
        if not _named(worker):
            previous = self.engine.functions.get(function_id)
            if previous is not None and previous.owner is not None \
                    and previous.owner is not worker:
                self._displaced.setdefault(worker, {})[function_id] = previous
            return function_id
        return self._claim(worker, of(worker), function_id)

    def _claim(self, worker, namespace, function_id):
        if namespace == DEFAULT:
            return function_id  # v0.10 rules
        if function_id.startswith("engine::"):
            self._reject_function(worker, namespace, function_id, "")
            return None
        registry_key = key(namespace, function_id)
        previous = self.engine.functions.get(registry_key)
        if previous is not None and previous.owner is not None \
                and previous.owner is not worker:
            self._reject_function(worker, namespace, function_id, previous.owner.id)
            return None
        return registry_key

    def _reject_function(self, worker, namespace, function_id, owner_id):
        _log.warn("{worker}: function {function_id} refused in namespace "
                  "{namespace} (owned by {owner})", worker=describe_worker(worker),
                  worker_id=worker.id,
                  function_id=function_id, namespace=namespace, owner=owner_id or "engine")
        worker.connection.send({
            "type": REGISTRATION_REJECTED, "code": FUNCTION_NAMESPACE_CONFLICT,
            "namespace": namespace, "function_id": function_id,
            "owner_worker_id": owner_id})

    def unregister_key(self, worker, function_id):
        """@return: the registry key a worker's ``unregisterfunction`` removes."""
        displaced = self._displaced.get(worker)
        if displaced:
            displaced.pop(function_id, None)
        return key(of(worker), function_id)

    def detach(self, worker):
        """Forget a worker that left."""
        self._displaced.pop(worker, None)

    # -- engine::workers::register ---------------------------------------------------

    def declare(self, worker, data):
        """
        Settle a worker's namespace from its ``engine::workers::register`` data:
        move what it registered so far into it, then apply what was held back.

        @raise InvocationError: ``INVALID_NAMESPACE`` for a blank or non-string
            namespace (nothing changes).
        @return: False when the worker was refused its namespace (another live worker
            of that name is there: it has been sent ``registrationrejected`` and is
            being closed), else True.
        """
        namespace = data.get("namespace")
        if namespace is not None and (not isinstance(namespace, str) or is_blank(namespace)):
            raise InvocationError(INVALID_NAMESPACE,
                                  "namespace must be a non-blank string")
        if namespace is None or (namespace == DEFAULT and not _named(worker)):
            if namespace is not None:
                worker.declared["namespace"] = namespace
            self._displaced.pop(worker, None)  # its takeovers in default stand (v0.10)
            return True
        if _named(worker) and of(worker) == namespace:
            return True
        if namespace != DEFAULT and worker.name:
            for other in self.engine.workers.values():
                if other is not worker and other.name == worker.name and of(other) == namespace:
                    worker.connection.send({
                        "type": REGISTRATION_REJECTED, "code": WORKER_NAMESPACE_CONFLICT,
                        "namespace": namespace, "worker_name": worker.name,
                        "owner_worker_id": other.id})
                    worker.connection.disconnect(1008, "worker name taken in namespace")
                    return False
        previous = of(worker)
        worker.declared["namespace"] = namespace
        if previous != namespace:
            self._move(worker, previous, namespace)
        self._displaced.pop(worker, None)
        return True

    def _move(self, worker, old, new):
        functions = self.engine.functions
        for registry_key in sorted(worker.functions):
            entry = self.engine.host_entry(registry_key, worker)
            if entry is None:
                continue
            if getattr(entry.host, "unregistered", None) is not None:
                continue  # HTTP-invoked functions stay where they were registered
            function_id = plain(registry_key)
            # One of several hosts (iii_twisted.replicas): the others keep the id.
            if self.engine.drop_host(registry_key, worker) is None:
                del functions[registry_key]
                worker.functions.discard(registry_key)
            target = self._claim(worker, new, function_id)
            if target is None:
                continue
            entry.function_id = target
            functions[target] = entry
            worker.functions.add(target)
        for function_id, entry in self._displaced.get(worker, {}).items():
            owner = entry.owner
            if function_id not in functions and self.engine.workers.get(owner.id) is owner:
                functions[function_id] = entry  # given back to the worker it was taken from
                owner.functions.add(function_id)
        self.engine._functions_changed()

    # -- calls and triggers ----------------------------------------------------------

    def call_key(self, function_id, namespace):
        """
        The registry key an ``invokefunction`` reaches: ``namespace`` absent means
        ``default`` (routing is strict, as in the reference).

        @raise InvocationError: ``INVALID_NAMESPACE`` for a blank namespace. (A miss
            is answered by L{not_found}, naming where the id is registered.)
        """
        if namespace is None:
            return function_id
        if not isinstance(namespace, str) or is_blank(namespace):
            raise InvocationError(INVALID_NAMESPACE, "namespace must be a non-blank string")
        if SEP in function_id:
            raise P.function_not_found(function_id)
        return key(namespace, function_id)  # a miss: Engine._not_found names the others

    def not_found(self, registry_key):
        """
        @return: the ``function_not_found`` error for a call that missed; for an id
            registered in other namespaces it names them (as the reference does).
        """
        namespace, function_id = split(registry_key)
        elsewhere = [n for n in self.namespaces_for(function_id) if n != namespace] \
            if self.engine.functions else []
        if not elsewhere:
            return P.function_not_found(function_id)
        return InvocationError(P.FUNCTION_NOT_FOUND, "Function {} not found in namespace "
                               "{}. It is registered in namespace(s): {}".format(
                                   function_id, namespace, ", ".join(elsewhere)))

    def namespaces_for(self, function_id):
        """@return: the sorted namespaces where C{function_id} is registered."""
        found = set()
        for registry_key in self.engine.functions:
            namespace, fid = split(registry_key)
            if fid == function_id:
                found.add(namespace)
        return sorted(found)

    def trigger_function_key(self, message):
        """
        The registry key a ``registertrigger`` targets: its ``namespace`` (absent:
        ``default``, whatever the connection's, as in the reference).

        @raise InvocationError: ``INVALID_NAMESPACE`` for a blank ``namespace`` or
            ``trigger_namespace``.
        """
        for field in ("namespace", "trigger_namespace"):
            value = message.get(field)
            if value is not None and (not isinstance(value, str) or is_blank(value)):
                raise InvocationError(INVALID_NAMESPACE, "{} must be a non-blank "
                                      "string".format(field))
        return key(message.get("namespace"), message["function_id"])
