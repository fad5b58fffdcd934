"""uvicorn settings every guardfab HTTPS service shares.

* No ``Server: uvicorn`` header: a refusal need not tell a scanner what answers it.
* No proxy headers: guardfab services are reached directly over TLS, and
  uvicorn would otherwise take ``X-Forwarded-For``/``-Proto`` from any client on
  127.0.0.1 as the client's address and scheme (its default trusts loopback).
  It is also one ASGI layer less on every request.
* Warnings only, and no access log: requests are audited where it matters (the
  hash-chained audit logs), not with bodies or tokens in a log file.
"""

from __future__ import annotations

from typing import Any

#: Keyword arguments for ``uvicorn.Config`` / ``uvicorn.run``.
UVICORN_SETTINGS: dict[str, Any] = {
    "server_header": False,
    "proxy_headers": False,
    "log_level": "warning",
    "access_log": False,
}
