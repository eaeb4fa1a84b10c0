"""Bearer-key authentication of every request but ``/health`` and the playground's page and assets,
and what the key a request carries grants it."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.types import ASGIApp

from warmpod.errors import SettingsError
from warmpod.keys import Key, KeyFile

log = logging.getLogger(__name__)
OPEN_PATHS = ["^/health$", "^/$", "^/static/"]
"""What needs no key: the health check (load balancers send none) and the playground's page,
which asks for the key itself and sends it with every call it makes."""
_CHALLENGE = 'Bearer realm="warmpod"'


class KeyAuthentication(AbstractAuthenticationMiddleware):
    """Answers 401 (``WWW-Authenticate: Bearer``) unless the request carries a key of the keys file."""

    def __init__(self, app: ASGIApp, keys: KeyFile) -> None:
        super().__init__(app, exclude=OPEN_PATHS)
        self._keys = keys
        self._last_error = ""

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        """The request's Key as its ``user``; a missing or unknown key is a 401 that names neither."""
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise NotAuthorizedException(
                "this server needs an API key: send it as 'Authorization: Bearer KEY'",
                headers={"WWW-Authenticate": _CHALLENGE},
            )
        key = self._find(token)
        if key is None:
            raise NotAuthorizedException(
                "the API key is not valid (unknown, removed or mistyped)",
                headers={"WWW-Authenticate": f'{_CHALLENGE}, error="invalid_token"'},
            )
        return AuthenticationResult(user=key, auth=None)

    def _find(self, token: str) -> Key | None:
        try:
            self._keys.current()
        except SettingsError as exc:
            # The keys read last stay in force; say so once per distinct problem.
            if str(exc) != self._last_error:
                self._last_error = str(exc)
                log.error("%s; the keys read before stay in force", exc)
        return self._keys.find(token)


def middleware(keys: KeyFile) -> DefineMiddleware:
    """The app's authentication middleware over ``keys``."""
    return DefineMiddleware(KeyAuthentication, keys=keys)


def key_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Key | None:
    """The key a request was authenticated with; None where keys are off."""
    user = connection.scope.get("user")
    return user if isinstance(user, Key) else None


def granted_environments(request: Request[Any, Any, Any]) -> frozenset[str] | None:
    """The environments the request's key may use; None, every one (a key without
    ``environments=``, or a server without a keys file)."""
    if request.app.state.get("key_file") is None:
        return None
    key = key_of(request)
    return frozenset() if key is None else key.environments
