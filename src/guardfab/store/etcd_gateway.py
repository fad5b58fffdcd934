"""A small client for etcd 3.4's v3 JSON gateway: endpoints, TLS, auth, failover.

Why not ``etcd3gw``: see ADR 0022. This client speaks the documented gateway
paths (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``, ``/v3/watch``, ...)
over ``httpx``, which guardfab already uses for its own HTTP.

Failover follows what is safe to repeat. A request that never reached a member
(connection refused, connect timeout) or that etcd refused before proposing it
(``no leader``) goes to the next endpoint, until ``timeout`` runs out. A request
that is harmless to repeat (a read, a lease grant) is also sent again when etcd
gave it up because the leader changed under it, or when its share of the time
(a third) ran out: a proposal lost with a dead leader is only answered at its
deadline, and the next leader answers it at once. A write
whose connection broke after it was sent may or may not have been applied: it is
reported as a :class:`~guardfab.store.errors.StoreError` saying so, never
silently sent again (a repeated "create if absent" would fail as a conflict and
look like a replay).

Messages name the endpoint and what failed; the password is only ever in the
body of ``/v3/auth/authenticate`` and the token only in a request header.
"""

from __future__ import annotations

import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from guardfab.store.errors import StoreError, StoreUsageError

#: gRPC status codes etcd puts in gateway errors.
CODE_INVALID_ARGUMENT = 3
CODE_DEADLINE_EXCEEDED = 4
CODE_NOT_FOUND = 5
CODE_OUT_OF_RANGE = 11
CODE_UNAVAILABLE = 14
CODE_UNAUTHENTICATED = 16
#: Errors etcd gives before a request is proposed to Raft: safe to send again.
_NOT_PROPOSED = ("etcdserver: no leader", "etcdserver: not capable")
#: Errors after which only a request that is harmless to repeat (a read) is sent again:
#: a linearizable read waiting on a leader that died is answered this once the next
#: leader is elected, about a second after the loss; repeated, it succeeds at once.
_REPEAT_IF_IDEMPOTENT = ("etcdserver: leader changed",)
#: The share of ``timeout`` one try of a request that is harmless to repeat may take.
_IDEMPOTENT_TRY_SHARE = 1 / 3
_RETRY_PAUSE = 0.05


class EtcdRequestError(StoreError):
    """etcd answered a request with an error (``code`` is the gRPC status code)."""

    def __init__(self, endpoint: str, what: str, code: int, message: str) -> None:
        if _timed_out(code, message):
            text = (
                f"etcd at {endpoint} did not finish {what} in time ({message}); "
                "a write may or may not have been applied (a leader change?)"
            )
        else:
            text = f"etcd at {endpoint} refused {what}: {message}"
        super().__init__(text)
        self.code = code
        self.etcd_message = message


def check_endpoint(endpoint: str) -> str:
    """Return ``endpoint`` as ``scheme://host:port`` if it is an acceptable member URL."""
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.username is not None or parsed.password is not None:
        raise StoreUsageError(
            "an etcd endpoint URL must not carry a user name or password; "
            "pass them as username= and password="
        )
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise StoreUsageError(f"etcd endpoint {endpoint!r} is not an http:// or https:// URL")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise StoreUsageError(f"etcd endpoint {endpoint!r} must be scheme://host:port only")
    return f"{parsed.scheme}://{parsed.netloc}"


def _tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(cafile=None if ca_file is None else str(ca_file))
        if cert_file is not None:
            context.load_cert_chain(str(cert_file), None if key_file is None else str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise StoreUsageError(
            f"cannot load the etcd TLS files (CA {ca_file}, certificate {cert_file}, "
            f"key {key_file}): {type(exc).__name__}"
        ) from None
    return context


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in str(exc)


class EtcdGateway:
    """Sends JSON requests to the first etcd member that answers.

    Args:
        endpoints: Client URLs of the members, tried in order from the last one
            that worked.
        ca_file: CA bundle that signed the members' certificates (https only).
        cert_file: Client certificate, for members that require one.
        key_file: The client certificate's key.
        username: etcd user, when the cluster has authentication on.
        password: That user's password. Kept in memory to renew the token.
        timeout: Seconds for one request, failover included.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 5.0,
    ) -> None:
        if isinstance(endpoints, str) or not endpoints:
            raise StoreUsageError("give at least one etcd endpoint, as a list of URLs")
        self.endpoints = [check_endpoint(e) for e in endpoints]
        if (username is None) != (password is None):
            raise StoreUsageError("give both an etcd username and a password, or neither")
        if not (0 < timeout <= 300):
            raise StoreUsageError("the etcd timeout must be more than 0 and at most 300 s")
        self.timeout = timeout
        self._username = username
        self._password = password
        self._token: str | None = None
        self._current = 0
        self._lock = threading.Lock()
        tls = any(e.startswith("https://") for e in self.endpoints)
        verify: ssl.SSLContext | bool = _tls_context(ca_file, cert_file, key_file) if tls else False
        self._client = httpx.Client(verify=verify, timeout=httpx.Timeout(timeout), trust_env=False)

    def close(self) -> None:
        """Close the connections."""
        self._client.close()

    def call(
        self, path: str, body: dict[str, Any], *, what: str, idempotent: bool
    ) -> dict[str, Any]:
        """POST ``body`` to ``path`` on a working member; return the decoded answer.

        Args:
            path: Gateway path, e.g. ``/v3/kv/txn``.
            body: The JSON request.
            what: What the request does, for error messages ("a transaction").
            idempotent: Whether sending it twice is harmless (reads, lease grants).

        Raises:
            EtcdRequestError: etcd answered with an error.
            StoreError: no member answered in time, or a write's outcome is unknown.
        """
        deadline = time.monotonic() + self.timeout
        reauthenticated = False
        while True:
            tries_until = deadline
            if idempotent:
                share = time.monotonic() + self.timeout * _IDEMPOTENT_TRY_SHARE
                tries_until = min(deadline, share)
            endpoint, response = self._post_somewhere(
                path, body, what, idempotent, (tries_until, deadline)
            )
            if response.status_code == 200:
                return _json_object(response, endpoint, what)
            code, message = _error_of(response)
            if code == CODE_UNAUTHENTICATED and self._username and not reauthenticated:
                self._token = None
                reauthenticated = True
                continue
            if _repeatable(code, message, idempotent=idempotent) and time.monotonic() < deadline:
                if message in _NOT_PROPOSED:
                    # This member has no leader (cut off from the others, or one
                    # election behind): another member may well have one.
                    self._move_past(endpoint)
                time.sleep(_RETRY_PAUSE)
                continue
            raise EtcdRequestError(endpoint, what, code, message)

    def open_stream(
        self, path: str, body: dict[str, Any], *, what: str
    ) -> tuple[str, httpx.Response]:
        """Open a streaming POST (a watch) on a working member; the caller closes it."""
        deadline = time.monotonic() + self.timeout
        failures: dict[str, str] = {}
        while True:
            endpoint = self._endpoint()
            request = self._client.build_request(
                "POST", endpoint + path, json=body, headers=self._headers(endpoint, deadline)
            )
            try:
                response = self._client.send(request, stream=True)
            except httpx.TransportError as exc:
                self._fail_over(endpoint, exc, failures, deadline, what)
                continue
            if response.status_code != 200:
                response.read()
                code, message = _error_of(response)
                response.close()
                raise EtcdRequestError(endpoint, what, code, message)
            return endpoint, response

    def _post_somewhere(
        self,
        path: str,
        body: dict[str, Any],
        what: str,
        idempotent: bool,
        deadlines: tuple[float, float],
    ) -> tuple[str, httpx.Response]:
        """Send to the first member that takes the request; ``deadlines``: (etcd's, ours)."""
        etcd_deadline, deadline = deadlines
        failures: dict[str, str] = {}
        while True:
            endpoint = self._endpoint()
            headers = self._headers(endpoint, deadline)
            # etcd gives up on the request when we do (otherwise a write proposed to
            # a leader that just died waits for etcd's own 7 s request timeout).
            remaining_ms = max(1, int((etcd_deadline - time.monotonic()) * 1000))
            headers["Grpc-Timeout"] = f"{remaining_ms}m"
            try:
                return endpoint, self._client.post(endpoint + path, json=body, headers=headers)
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
                self._fail_over(endpoint, exc, failures, deadline, what)
            except httpx.TransportError as exc:
                if not idempotent:
                    raise StoreError(
                        f"etcd at {endpoint}: the connection broke during {what} "
                        f"({type(exc).__name__}); it may or may not have been applied"
                    ) from None
                self._fail_over(endpoint, exc, failures, deadline, what)

    def _fail_over(
        self,
        endpoint: str,
        exc: httpx.TransportError,
        failures: dict[str, str],
        deadline: float,
        what: str,
    ) -> None:
        """Note a member's failure and move to the next; raise once all failed for good."""
        tls = _is_tls_failure(exc)
        failures[endpoint] = "TLS handshake failed" if tls else type(exc).__name__
        self._move_past(endpoint)
        tried_all = len(failures) == len(self.endpoints)
        all_tls = tried_all and all(f == "TLS handshake failed" for f in failures.values())
        if all_tls or (tried_all and time.monotonic() >= deadline):
            summary = "; ".join(f"{e}: {f}" for e, f in failures.items())
            raise StoreError(f"no etcd member answered {what} ({summary})") from None
        if tried_all:
            failures.clear()
            time.sleep(_RETRY_PAUSE)

    def _move_past(self, endpoint: str) -> None:
        """Make the member after ``endpoint`` the next one tried (unless another thread did)."""
        with self._lock:
            if self.endpoints[self._current] == endpoint:
                self._current = (self._current + 1) % len(self.endpoints)

    def _endpoint(self) -> str:
        with self._lock:
            return self.endpoints[self._current]

    def _headers(self, endpoint: str, deadline: float) -> dict[str, str]:
        """Return the request headers: the auth token, once logged in."""
        if self._username is None:
            return {}
        if self._token is None:
            self._token = self._authenticate(endpoint, deadline)
        return {"Authorization": self._token}

    def _authenticate(self, endpoint: str, deadline: float) -> str:
        body = {"name": self._username, "password": self._password}
        try:
            response = self._client.post(
                endpoint + "/v3/auth/authenticate",
                json=body,
                timeout=max(0.1, deadline - time.monotonic()),
            )
        except httpx.TransportError as exc:
            raise StoreError(
                f"etcd at {endpoint}: could not log in ({type(exc).__name__})"
            ) from None
        if response.status_code != 200:
            code, message = _error_of(response)
            raise EtcdRequestError(endpoint, f"the login of user {self._username!r}", code, message)
        token = _json_object(response, endpoint, "a login").get("token")
        if not isinstance(token, str) or not token:
            raise StoreError(f"etcd at {endpoint} answered a login without a token")
        return token


def _timed_out(code: int, message: str) -> bool:
    """Whether etcd gave a request up at its deadline (its outcome, for a write, unknown)."""
    return code == CODE_DEADLINE_EXCEEDED or "timed out" in message or "deadline" in message


def _repeatable(code: int, message: str, *, idempotent: bool) -> bool:
    """Whether a request etcd answered with ``code`` and ``message`` may be sent again."""
    if message in _NOT_PROPOSED:
        return True
    return idempotent and (message in _REPEAT_IF_IDEMPOTENT or _timed_out(code, message))


def _json_object(response: httpx.Response, endpoint: str, what: str) -> dict[str, Any]:
    try:
        decoded = response.json()
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        raise StoreError(f"etcd at {endpoint} answered {what} with something that is not JSON")
    return decoded


def _error_of(response: httpx.Response) -> tuple[int, str]:
    try:
        decoded = response.json()
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        code = decoded.get("code")
        message = decoded.get("message") or decoded.get("error")
        if isinstance(code, int) and isinstance(message, str):
            return code, message[:300]
    return -1, f"HTTP {response.status_code}"
