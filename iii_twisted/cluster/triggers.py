"""
The triggers other members offer this one (HTTP routes, state and stream triggers:
L{iii_twisted.cluster.links}), and which of them are in force here.

Replicas of one worker on several members each register "the same" trigger (same
type, function and config, each with an id of its own). Were every copy in force on
every member, a state change would fire the function once per member that has a
replica. So a trigger's identity here is C{(type, function id, config)}, as the cron
lock's is (docs/scale-out.rst), and of the copies offered for one identity at most
one is in force on this member, and none while one of this member's own workers has
such a trigger (it fires the same function; the router picks a host). When the
trigger in force goes, another copy takes its place.
"""

import json

from twisted.logger import Logger

from .. import protocol as P
from ..interfaces import TriggerError
from ..replicas import is_peer


def identity(trigger_type, function_id, config):
    """@return: what makes two triggers the same trigger (hashable)."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        text = repr(config)
    return trigger_type, function_id, text


class _Offered:
    __slots__ = ("link", "message", "key", "active_id", "refused")

    def __init__(self, link, message, key):
        self.link = link  # the link's WorkerRecord
        self.message = message
        self.key = key
        self.active_id = None  # its id in the engine's registry while in force
        self.refused = False  # its provider here refused it: not tried again


class SharedTriggers:
    """
    The offered triggers of every link, by (engine id, trigger id), and the engine
    registrations of those in force.
    """

    _log = Logger()

    def __init__(self, engine):
        self.engine = engine
        self.offered = {}

    def received(self, link, message):
        """
        A link's ``registertrigger`` or ``unregistertrigger`` (decoded). Takes effect
        at the next L{reconcile}, except that a withdrawn trigger leaves at once.
        """
        peer = link.connection.cluster_peer
        ident = (peer.engine_id, message["id"])
        old = self.offered.pop(ident, None)
        if old is not None and old.active_id is not None:
            self._deactivate(old)
        if message["type"] == P.REGISTER_TRIGGER:
            self.offered[ident] = _Offered(link, message, identity(
                message["trigger_type"], message["function_id"], message["config"]))

    def unlinked(self, engine_id):
        """A member's link is gone: forget what it offered (detach removed the rest)."""
        for ident in [i for i in self.offered if i[0] == engine_id]:
            del self.offered[ident]

    def reconcile(self):
        """Put in force one copy of each offered trigger no local trigger matches."""
        engine = self.engine
        local = set()
        for trigger in engine.triggers.values():
            if trigger.owner is None or not is_peer(trigger.owner):
                local.add(identity(trigger.trigger_type, trigger.function_id,
                                   trigger.config))
        in_force = set()
        for record in self.offered.values():
            if record.active_id is None:
                continue
            if engine.triggers.get(record.active_id) is None:
                record.active_id = None  # refused by its provider, or removed
            elif record.key in local or record.key in in_force:
                self._deactivate(record)
            else:
                in_force.add(record.key)
        for record in self.offered.values():
            if record.active_id is None and not record.refused \
                    and record.key not in local and record.key not in in_force:
                self._activate(record)
                in_force.add(record.key)

    def _activate(self, record):
        message = record.message
        trigger_id = message["id"]
        existing = self.engine.triggers.get(trigger_id)
        if existing is not None and existing.owner is not record.link:
            # Another trigger has this id here: this copy goes in under a new one.
            trigger_id = "{}@{}".format(trigger_id,
                                        record.link.connection.cluster_peer.engine_id)
        record.active_id = trigger_id
        self.engine.register_trigger(
            trigger_id, message["trigger_type"], message["function_id"],
            message["config"], record.link, message["metadata"],
        ).addErrback(self._refused, record)

    def _deactivate(self, record):
        trigger_id, record.active_id = record.active_id, None
        self.engine.unregister_trigger(trigger_id, owner=record.link)

    def _refused(self, failure, record):
        failure.trap(TriggerError)  # logged by the engine
        record.refused = True
        record.active_id = None
        message = record.message
        self._log.info("offered trigger {trigger_id} ({trigger_type}) not in force here: "
                       "{error}", trigger_id=message["id"],
                       trigger_type=message["trigger_type"], error=failure.getErrorMessage())
