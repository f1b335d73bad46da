"""
Who may use the REST API, and the middleware every request goes through.

Config of ``modules::api::RestApiModule`` (``iii-http``)::

    auth:                        # optional: every route needs credentials
      tokens:
        - name: web
          token: ${WEB_HTTP_TOKEN}
          allowed_functions: ["public::*"]   # the routes' functions it may reach
      auth_function_id: my::auth # optional, as on the worker port
    middleware:                  # optional, the reference's global middleware
      - function_id: global::rate-limit
        phase: preHandler        # the only phase
        priority: 5              # lower runs first

and per route, in the ``http`` trigger's config, ``middleware_function_ids: [..]``.

A request passes, in order (the reference's order, ``rest_api/README.md``): the
credentials (``Authorization: Bearer <token>``, or ``?token=``; without valid ones
401 with ``WWW-Authenticate: Bearer``); the global middleware by priority; the route's
condition; the route's middleware in order; then its function is called with the
token's session, so a function outside the token's grants answers 403 ``FORBIDDEN``
(checked by the engine, as every call).

A middleware is called with ``{"phase": "preHandler", "request": {path_params,
query_params, headers, method}, "context": {}}`` and answers ``{"action":
"continue"}`` or ``{"action": "respond", "response": {status_code, body, headers}}``.
Deviation: the reference treats any other answer as ``continue``; here it is a 500
(an auth middleware that returns garbage must not let the request through).
"""

from twisted.logger import Logger

from ..auth import AuthRefused, Authenticator, parse_auth_config
from ..config import ConfigError
from ..protocol import InvocationError

_log = Logger()

GO, RESPOND = "go", "respond"


class MiddlewareError(Exception):
    """A middleware failed or answered something else than its contract."""

    def __init__(self, function_id, reason):
        Exception.__init__(self, "middleware {} {}".format(function_id, reason))
        self.function_id = function_id
        self.reason = reason


def parse_middleware(raw, key="middleware"):
    """
    @return: the global middleware function ids, in the order they run.
    @raise ConfigError: naming the key, for a wrong shape.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError("must be a list of {function_id, phase, priority}", key)
    entries = []
    for i, entry in enumerate(raw):
        where = "{}[{}]".format(key, i)
        if not isinstance(entry, dict):
            raise ConfigError("must be a mapping with function_id", where)
        unknown = set(entry) - {"function_id", "phase", "priority"}
        if unknown:
            raise ConfigError("unknown key; known keys: function_id, phase, priority",
                              "{}.{}".format(where, sorted(unknown)[0]))
        function_id = entry.get("function_id")
        if not isinstance(function_id, str) or not function_id:
            raise ConfigError("missing function_id", where + ".function_id")
        phase = entry.get("phase", "preHandler")
        if phase not in (None, "preHandler"):
            raise ConfigError("the only phase is preHandler", where + ".phase")
        priority = entry.get("priority", 0)
        if priority is None:
            priority = 0
        if not isinstance(priority, (int, float)) or isinstance(priority, bool):
            raise ConfigError("must be a number", where + ".priority")
        entries.append((priority, i, function_id))
    return [function_id for _, _, function_id in sorted(entries)]


def route_middleware(config):
    """
    @return: the ``middleware_function_ids`` of an ``http`` trigger's config.
    @raise ValueError: when it is not a list of strings.
    """
    ids = config.get("middleware_function_ids") if isinstance(config, dict) else None
    if ids is None:
        return []
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ValueError("middleware_function_ids must be a list of function ids")
    return list(ids)


class HttpGate:
    """
    The REST API's credentials and middleware (see the module docstring).

    @ivar authenticator: an L{Authenticator}, or None (no ``auth:``).
    @ivar middleware: the global middleware ids, in order.
    """

    def __init__(self, engine, clock, auth=None, middleware=None):
        """@raise ConfigError: naming the key, for a wrong ``auth`` or ``middleware``."""
        self._engine = engine
        config = parse_auth_config(auth, "auth")
        self.authenticator = None if config is None else Authenticator(
            engine, config, clock, "iii-http")
        self.middleware = parse_middleware(middleware)

    def needed(self, route_ids):
        """@return: whether a request on a route with these middleware ids needs L{admit}."""
        return bool(self.authenticator is not None or self.middleware or route_ids)

    async def admit(self, request_info, ip_address, route_ids, check_condition,
                    path=None):
        """
        Run a request through the credentials, the middleware and the condition.

        @param request_info: the call's payload (``headers``, ``query_params``,
            ``path_params``, ``method``, ``path``).
        @param check_condition: a callable returning a Deferred of True/False (the
            route's condition).
        @param path: the request's path, for the refusal log.
        @return: ``(GO, session)`` (session None without ``auth:``), ``(RESPOND,
            status, body, headers)`` or ``(RESPOND, 422, ...)`` for an unmet condition.
        @raise MiddlewareError, InvocationError: a middleware or the condition failed
            (the caller answers 500 with an error id).
        """
        session = None
        if self.authenticator is not None:
            params = {k: [v] for k, v in request_info["query_params"].items()}
            try:
                session = await self.authenticator.authenticate(
                    request_info["headers"], params, ip_address,
                    path or request_info["path"])
            except AuthRefused:
                return (RESPOND, 401, {"error": "unauthorized"},
                        {"www-authenticate": "Bearer"})
        for function_id in self.middleware:
            answer = await self._middleware(function_id, request_info)
            if answer is not None:
                return answer
        passed = await check_condition()
        if not passed:
            return (RESPOND, 422, {"error": "Request condition not met", "skipped": True},
                    None)
        for function_id in route_ids:
            answer = await self._middleware(function_id, request_info)
            if answer is not None:
                return answer
        return (GO, session)

    async def _middleware(self, function_id, request_info):
        data = {
            "phase": "preHandler",
            "request": {k: request_info[k] for k in
                        ("path_params", "query_params", "headers", "method")},
            "context": {},
        }
        try:
            result = await self._engine.call(function_id, data)
        except InvocationError as e:
            raise MiddlewareError(function_id, "failed ({}: {})".format(e.code, e.message))
        action = result.get("action") if isinstance(result, dict) else None
        if action == "continue":
            return None
        if action == "respond":
            response = result.get("response")
            if not isinstance(response, dict):
                response = {}
            status = response.get("status_code", 200)
            if not isinstance(status, int) or isinstance(status, bool) \
                    or not 100 <= status <= 599:
                raise MiddlewareError(function_id, "answered status {!r}".format(status))
            headers = response.get("headers")
            return (RESPOND, status, response.get("body"),
                    headers if isinstance(headers, dict) else None)
        raise MiddlewareError(function_id, "answered {!r} instead of an action".format(
            result if not isinstance(result, dict) else action))
