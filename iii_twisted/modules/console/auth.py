"""
Who may do what in the console: the seam to the engine's authentication.

The console is a client of the engine: every read and every
action is an engine function call made with the console session's grants, the way a
worker's calls are made with its own.

- With no ``auth:`` in the engine config, L{OpenAccess}: no token asked, every
  function allowed (the console listens on loopback by default).
- With ``auth:`` (the top-level one, or else the first listener's), the console asks
  for a token and turns it into a session with the engine's own
  L{iii_twisted.auth.Authenticator} (named tokens, or the auth function), as if it
  came in on a worker port; each call is then made with
  C{engine.call(..., session=session)}, so the engine applies the same checks (and
  discovery answers only what the session may call).

A console session's grants are an object with C{allows(function_id)} and, optionally,
C{call(engine, function_id, data)} (made through the engine's checks); L{call} uses the
latter when there is one, and otherwise checks C{allows} first.
"""

from twisted.internet.defer import fail, maybeDeferred

from ...protocol import InvocationError

FORBIDDEN = "FORBIDDEN"
UNAUTHENTICATED = "unauthenticated"


class AllGrants:
    """The grants of an open console: any function, as the engine's own calls."""

    def allows(self, function_id):
        return True

    def call(self, engine, function_id, data):
        return engine.call(function_id, data)


class SessionGrants:
    """The grants of an engine L{iii_twisted.auth.Session} (a token's)."""

    def __init__(self, session):
        self.session = session

    def allows(self, function_id):
        return self.session.may_call(function_id)

    def call(self, engine, function_id, data):
        return engine.call(function_id, data, session=self.session)


class OpenAccess:
    """No authentication configured: no token, every function allowed."""

    auth_required = False

    def authenticate(self, token, ip_address=None):
        """@return: a Deferred firing with L{AllGrants} (the token is not looked at)."""
        return maybeDeferred(AllGrants)


class EngineTokenAccess:
    """
    Authentication configured: a token is required, and the session the engine's
    authenticator gives for it decides what the console may call.

    @param authenticator: an L{iii_twisted.auth.Authenticator}, or any object with
        C{authenticate(headers, params, ip_address, path)} returning a Deferred of a
        session (an object with C{may_call}) or failing for a refused token.
    """

    auth_required = True

    def __init__(self, authenticator):
        self._authenticator = authenticator

    def authenticate(self, token, ip_address=None):
        """
        @return: a Deferred firing with the token's grants, or with None for a token
            the engine refuses (or no token).
        """
        if not isinstance(token, str) or not token or len(token) > 4096:
            return maybeDeferred(lambda: None)
        d = maybeDeferred(self._authenticator.authenticate,
                          {"authorization": "Bearer " + token}, {}, ip_address,
                          "/console")
        return d.addCallbacks(SessionGrants, lambda failure: None)


def auth_config_of(config):
    """
    @param config: the engine's L{iii_twisted.config.EngineConfig}, or None.
    @return: the ``auth:`` config the console applies (top level, else the first
        listener that has one), or None.
    """
    auth = getattr(config, "auth", None)
    if auth is not None:
        return auth
    for listener in getattr(config, "listeners", None) or ():
        if getattr(listener, "auth", None) is not None:
            return listener.auth
    return None


def access_for(engine, config, clock):
    """
    @return: L{EngineTokenAccess} when the engine config has ``auth:`` (and the
        engine's authentication, L{iii_twisted.auth}, is there), else L{OpenAccess}.
    """
    auth = auth_config_of(config)
    if auth is None:
        return OpenAccess()
    from ...auth import Authenticator
    return EngineTokenAccess(Authenticator(engine, auth, clock, "console"))


def call(engine, grants, function_id, data):
    """
    Call C{function_id} as a console session.

    @return: the call's Deferred; failing with ``unauthenticated`` without grants,
        ``FORBIDDEN`` outside them, or the call's own error.
    """
    if grants is None:
        return fail(InvocationError(UNAUTHENTICATED, "the console session has no token"))
    via = getattr(grants, "call", None)
    if via is not None:
        return via(engine, function_id, data)
    if not grants.allows(function_id):
        return fail(InvocationError(
            FORBIDDEN, "this console token may not call {}".format(function_id)))
    return engine.call(function_id, data)


def check(grants, function_id):
    """
    For what the console shows without a call (the overview's sampled history).

    @raise InvocationError: ``unauthenticated`` without grants, ``FORBIDDEN`` when the
        grants do not allow C{function_id}.
    """
    if grants is None:
        raise InvocationError(UNAUTHENTICATED, "the console session has no token")
    if not grants.allows(function_id):
        raise InvocationError(
            FORBIDDEN, "this console token may not call {}".format(function_id))
