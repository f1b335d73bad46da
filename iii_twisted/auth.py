"""
Who a connection is and what it may do: L{Session}s, their grants, and how a
connection gets one (L{Authenticator}: named tokens, the reference's RBAC auth
function).

Every connection has a session. The
engine checks it in one place each for calls (L{Engine.call}) and registrations (the
worker message handlers); modules never check permissions. A connection on a listener
without ``auth:`` has no session object at all (C{None}), which means every grant: the
engine's behaviour without ``auth:`` is exactly what it was before sessions existed.

The grant model follows the reference engine (iii v0.11+,
``engine/src/workers/worker/rbac_config.rs`` and ``rbac_session.rs``):

- a call is allowed unless the id is in ``forbidden_functions``; then if it matches
  ``allowed_functions``; then if it is an engine infrastructure function (see
  L{INFRASTRUCTURE_FUNCTIONS}); then if the listener's ``expose_functions`` match it.
  A session with neither ``allowed_functions`` nor ``expose_functions`` (a token with
  no list) may call everything.
- registration: ``allow_function_registration`` (default true),
  ``allow_trigger_type_registration`` (default false for the auth function's answers,
  true for tokens), ``allowed_trigger_types`` (None = any type), and a
  ``function_registration_prefix`` put in front of every function id the worker
  registers (and taken off again in the calls the engine sends it).

Patterns: ``*`` alone matches everything; otherwise ``*`` matches any run of
characters (``public::*``, ``*::get``, ``a*b*c``), as the reference's
``WildcardPattern``; ``match("...")`` is accepted as the same pattern.
Deviation: the reference compares ``allowed_functions`` and ``forbidden_functions``
exactly and only ``expose_functions`` (and namespace grants) take wildcards; here
every list takes them (docs/deviations.rst).

Usable by any client, not only workers (the console uses it)::

    session = Session(allowed_functions=["public::*"])
    session.may_call("public::hello")        # True
    session.denial("state::get")             # InvocationError FORBIDDEN, reference text
    engine.call("public::hello", data, session=session)   # checked by the engine
"""

from .grants import (  # noqa: F401 (the public names of the grant model)
    AUTH_ERROR, FORBIDDEN, INFRASTRUCTURE_FUNCTIONS, MAX_TOKEN_BYTES, AuthStats,
    FunctionFilter, Session, compile_grants, gate_call, grant_matches, may_take_over,
    session_from_answer, stats_of, wildcard_match,
)
from .authn import (  # noqa: F401 (how a connection gets a session)
    HOOK_KEYS, AuthConfig, AuthRefused, Authenticator, RefusalLog, TokenGrant, headers_of,
    parse_auth_config, parse_listener_auth,
)
from .auth_checks import (  # noqa: F401 (the engine's registration checks)
    REGISTRATION_REJECTED, held_for_hook, refuse_function_registration, refuse_takeover,
    refuse_trigger_type_registration, tell_function_taken, tell_trigger_type_taken,
    trigger_refusal,
)
