"""The proxy's HTTP side: /healthz and /metrics (Prometheus text format).

Approval pages, the approvals JSON API and the audit query endpoint are mounted onto the same
``aiohttp`` application by ``pgproxy.server.runtime``; they run in the proxy's event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pgproxy.server.proxy import Proxy


def make_app(
    proxy: Proxy,
    extra_metrics: Callable[[], dict[str, float]] | None = None,
    health: Callable[[], dict[str, str]] | None = None,
) -> web.Application:
    app = web.Application(client_max_size=1 << 20)

    async def healthz(request: web.Request) -> web.Response:
        parts = health() if health else {}
        ok = all(v == "ok" for v in parts.values())
        body: dict[str, object] = {"status": "ok" if ok else "degraded", **parts}
        body["connections"] = proxy.metrics.connections_active
        return web.json_response(body, status=200 if ok else 503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(
            text=proxy.metrics.render(extra_metrics() if extra_metrics else None),
            content_type="text/plain",
            charset="utf-8",
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
