"""
The engine's registration checks (grants and ownership) and the reference's
registration hooks, called from the engine's message handlers: each returns whether
it refused (having logged, counted and told the worker). Import these names from
L{iii_twisted.auth}.
"""

from twisted.logger import Logger

from .grants import FORBIDDEN, may_take_over, stats_of
from .oplog import describe_worker
from .replicas import is_peer

_log = Logger()


# -- the engine's registration checks ---------------------------------------------------
#
# Each returns True when it refused (and has logged, counted and told the worker), so
# the engine's handlers stay one line: ``if refuse_...(...): return``.

REGISTRATION_REJECTED = "registrationrejected"


def _tell_rejected(engine, worker, code, message, **fields):
    stats_of(engine).refused_registrations += 1
    frame = {"type": REGISTRATION_REJECTED, "code": code, "message": message,
             "namespace": "default", "owner_worker_id": ""}
    frame.update(fields)
    worker.connection.send(frame)


def refuse_function_registration(engine, worker, function_id):
    """
    A worker's ``registerfunction``: refused when its session may not register
    functions. The worker is told with ``registrationrejected`` code ``FORBIDDEN``.
    """
    session = worker.session
    if session is None or session.allow_function_registration:
        return False
    message = "function registration not allowed for this session"
    _log.warn("{worker} ({session!r}) may not register {function_id}: refused",
              worker=describe_worker(worker), worker_id=worker.id, session=session, function_id=function_id)
    _tell_rejected(engine, worker, FORBIDDEN, message, function_id=function_id)
    return True


def refuse_trigger_type_registration(engine, worker, type_id):
    """A worker's ``registertriggertype``: refused without the grant."""
    session = worker.session
    if session is None or session.allow_trigger_type_registration:
        return False
    _log.warn("{worker} ({session!r}) may not register trigger type {type_id}: "
              "refused", worker=describe_worker(worker), worker_id=worker.id, session=session, type_id=type_id)
    _tell_rejected(engine, worker, FORBIDDEN,
                   "trigger type registration not allowed for this session",
                   trigger_type_id=type_id)
    return True


def trigger_refusal(engine, worker, trigger_type, function_id):
    """
    A worker's ``registertrigger``: the message of its refusal (the caller answers
    with a ``triggerregistrationresult`` error ``FORBIDDEN``), or None when allowed.
    The trigger's type must be allowed, and its function one the session may call (as
    the reference: otherwise a trigger would call what the worker may not).
    """
    session = worker.session
    if session is None:
        return None
    refusal = None
    if not session.may_register_trigger(trigger_type):
        refusal = "trigger type '{}' not allowed for this session".format(trigger_type)
    else:
        entry = engine.functions.get(function_id)
        if not session.may_call(function_id, entry.metadata if entry else None):
            refusal = "function '{}' not allowed".format(function_id)
    if refusal is not None:
        stats_of(engine).refused_registrations += 1
    return refusal


def refuse_takeover(engine, new_owner, old_owner, kind, item_id):
    """
    C{new_owner} registers a C{kind} (``function``, ``trigger``, ``trigger type``)
    that another owner holds. In-process owners (None) are never replaced by a
    worker; another worker's only per L{may_take_over}.

    @return: True when refused (logged; the caller tells the worker as its kind's
        protocol allows).
    """
    if new_owner is None or old_owner is new_owner:
        return False
    if old_owner is not None and (may_take_over(new_owner, old_owner)
                                  or is_peer(new_owner) or is_peer(old_owner)):
        # Another cluster member's offer (over its link) and this member's workers
        # host one id side by side (replicas.py); principals are each member's own.
        return False
    _log.warn("{worker} may not take over {kind} {item_id} of {owner}: refused",
              worker=describe_worker(new_owner), worker_id=new_owner.id, kind=kind, item_id=item_id,
              owner="the engine" if old_owner is None else describe_worker(old_owner))
    stats_of(engine).refused_registrations += 1
    return True


def tell_function_taken(engine, worker, function_id, owner):
    """Tell a worker its function registration lost to a live owner (non-fatal)."""
    worker.connection.send({
        "type": REGISTRATION_REJECTED, "code": "FUNCTION_NAMESPACE_CONFLICT",
        "namespace": "default", "function_id": function_id,
        "owner_worker_id": owner.id if owner is not None else "",
        "message": "function '{}' is registered by another {}".format(
            function_id, "worker" if owner is not None else "part of the engine"),
    })


def tell_trigger_type_taken(engine, worker, type_id, owner):
    """Tell a worker its trigger type registration was refused: another owner has it."""
    worker.connection.send({
        "type": REGISTRATION_REJECTED, "code": FORBIDDEN, "namespace": "default",
        "trigger_type_id": type_id,
        "owner_worker_id": owner.id if owner is not None else "",
        "message": "trigger type '{}' is provided by another {}".format(
            type_id, "worker" if owner is not None else "part of the engine"),
    })


# -- the reference's registration hooks -------------------------------------------------

_HOOKED = "_iii_hooked"  # set on a message its hook has approved (and maybe rewritten)

# message type -> (the hook's input from the message, {answer key: message key} that
# the answer may rewrite), as the reference's engine/mod.rs builds them.
_HOOK_SHAPES = {
    "registerfunction": (
        lambda m: {"function_id": m["id"], "description": m.get("description"),
                   "metadata": m.get("metadata"), "namespace": "default"},
        (("function_id", "id", str), ("description", "description", str),
         ("metadata", "metadata", None))),
    "registertrigger": (
        lambda m: {"trigger_id": m["id"], "trigger_type": m["trigger_type"],
                   "function_id": m["function_id"], "config": m.get("config"),
                   "metadata": m.get("metadata"),
                   "namespace": m.get("namespace") or "default"},
        (("trigger_id", "id", str), ("trigger_type", "trigger_type", str),
         ("function_id", "function_id", str), ("config", "config", None))),
    "registertriggertype": (
        lambda m: {"trigger_type_id": m["id"], "description": m.get("description")},
        (("trigger_type_id", "id", str), ("description", "description", str))),
}


def held_for_hook(engine, worker, message, handler):
    """
    The reference's ``on_function_registration_function_id``,
    ``on_trigger_registration_function_id`` and
    ``on_trigger_type_registration_function_id``: a registration from a session of a
    listener with such a hook is first shown to that function with the session's
    ``context``. An object answer may rewrite the registration (``function_id``,
    ``description``, ``metadata``; ``trigger_id``, ``trigger_type``, ``function_id``,
    ``config``; ``trigger_type_id``, ``description``) and lets it through
    C{handler} (the grants and limits then apply as to any registration); anything
    else (``null``, a failure, no answer within ``auth_timeout_ms``) refuses it, and
    the worker is told as for any refused registration. Meanwhile the worker's later
    messages wait (L{Engine.handle_message}), so they still take effect in order.

    @return: True when the message is held for the hook (the caller stops there).
    """
    session = worker.session
    if session is None or not session.hooks or message.get(_HOOKED):
        return False
    hook = session.hooks.get(message["type"])
    if hook is None:
        return False
    kind = message["type"]
    # A registration the grants refuse anyway is refused without asking the hook.
    if (kind == "registerfunction" and not session.allow_function_registration) or (
            kind == "registertriggertype" and not session.allow_trigger_type_registration):
        return False
    make_input, rewritable = _HOOK_SHAPES[kind]
    data = make_input(message)
    data["context"] = session.context
    worker.held = []
    d = engine.call(hook, data)
    d.addTimeout(session.hook_timeout, engine.clock)

    def decided(answer):
        if engine.workers.get(worker.id) is not worker:
            return  # it left meanwhile
        if isinstance(answer, dict):
            for answer_key, message_key, kind_of in rewritable:
                value = answer.get(answer_key)
                if value is not None and (kind_of is None or isinstance(value, kind_of)):
                    message[message_key] = value
            message[_HOOKED] = True
            handler(worker, message)
            return
        reason = answer.getErrorMessage() if hasattr(answer, "getErrorMessage") else \
            "answered {}".format("null" if answer is None else type(answer).__name__)
        _log.warn("registration hook {hook} refused {kind} {item_id} of worker "
                  "{worker_id}: {reason}", hook=hook, kind=kind, item_id=message["id"],
                  worker_id=worker.id, reason=reason)
        _tell_hook_refusal(engine, worker, message)

    def release(_):
        held, worker.held = worker.held, None
        while held:
            if worker.held is not None:  # held again, for the next hook
                worker.held.extend(held)
                break
            if engine.workers.get(worker.id) is not worker:
                break
            engine.handle_message(worker, held.pop(0))

    d.addBoth(decided)
    d.addErrback(lambda f: _log.failure("registration hook {hook} handling failed", f,
                                        hook=hook))
    d.addBoth(release)
    return True


def _tell_hook_refusal(engine, worker, message):
    kind = message["type"]
    message_text = "registration denied by the listener's hook"
    if kind == "registertrigger":
        stats_of(engine).refused_registrations += 1
        worker.connection.send({
            "type": "triggerregistrationresult", "id": message["id"],
            "trigger_type": message["trigger_type"], "function_id": message["function_id"],
            "error": {"code": FORBIDDEN, "message": message_text}})
    elif kind == "registerfunction":
        _tell_rejected(engine, worker, FORBIDDEN, message_text, function_id=message["id"])
    else:
        _tell_rejected(engine, worker, FORBIDDEN, message_text, trigger_type_id=message["id"])
