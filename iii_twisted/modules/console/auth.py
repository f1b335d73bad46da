"""
Who may do what in the console: the seam to the engine's authentication.

The console is a client (DESIGN.md, "The console is a client"): every read and every
action is an engine function call, and each call is checked against the grants of the
console session's token before it is made, the way a worker's calls are.

- With no authentication configured, L{OpenAccess}: no token asked, every function
  allowed (the console listens on loopback by default).
- When the engine has authentication (issue 13: ``auth:`` tokens and their grants),
  L{access_for} returns an L{EngineTokenAccess} that asks the engine's auth for the
  grants of the token the operator types in, and checks each function id through
  them. Until that code exists, ``engine.auth`` is None and the console is open.
"""

from ...protocol import InvocationError

FORBIDDEN = "forbidden"
UNAUTHENTICATED = "unauthenticated"


class AllGrants:
    """The grants of an open console: any function."""

    def allows(self, function_id):
        return True


class OpenAccess:
    """No authentication configured: no token, every function allowed."""

    auth_required = False

    def authenticate(self, token):
        """@return: L{AllGrants} (the token is not looked at)."""
        return AllGrants()


class EngineTokenAccess:
    """
    Authentication configured on the engine: a token is required, and its grants
    decide which functions the session may call.

    @param auth: the engine's authenticator; it must offer
        C{authenticate(token)} returning an object with C{allows(function_id)}
        (its grants), or None for a token it refuses.
    """

    auth_required = True

    def __init__(self, auth):
        self._auth = auth

    def authenticate(self, token):
        """@return: the token's grants, or None for an unknown or malformed token."""
        if not isinstance(token, str) or not token:
            return None
        return self._auth.authenticate(token)


def access_for(engine):
    """
    @return: the access policy for the console of C{engine}: L{EngineTokenAccess}
        when the engine has authentication configured (C{engine.auth}), else
        L{OpenAccess}.
    """
    auth = getattr(engine, "auth", None)
    if auth is None:
        return OpenAccess()
    return EngineTokenAccess(auth)


def check(grants, function_id):
    """
    @raise InvocationError: ``unauthenticated`` without grants, ``forbidden`` when the
        grants do not allow C{function_id}.
    """
    if grants is None:
        raise InvocationError(UNAUTHENTICATED, "the console session has no token")
    if not grants.allows(function_id):
        raise InvocationError(
            FORBIDDEN, "this console token may not call {}".format(function_id))
