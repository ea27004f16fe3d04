"""The proxy's HTTP side: /healthz and /metrics (Prometheus text format).

Approval pages, the approvals JSON API and the audit query endpoint are mounted onto the same
``aiohttp`` application by ``pgproxy.server.runtime``; they run in the proxy's event loop.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pgproxy.server.proxy import Proxy


def _metrics_text(proxy: Proxy, extra: Callable[[], dict[str, float]] | None) -> str:
    m = proxy.metrics
    lines = [
        "# HELP pgproxy_connections_total Agent connections accepted.",
        "# TYPE pgproxy_connections_total counter",
        f"pgproxy_connections_total {m.connections_total}",
        "# HELP pgproxy_connections_active Agent connections open now.",
        "# TYPE pgproxy_connections_active gauge",
        f"pgproxy_connections_active {m.connections_active}",
        "# HELP pgproxy_statements_total Statements decided, by decision.",
        "# TYPE pgproxy_statements_total counter",
    ]
    for decision in ("ALLOW", "MASK", "HOLD", "BLOCK"):
        lines.append(
            f'pgproxy_statements_total{{decision="{decision}"}} {m.statements.get(decision, 0)}'
        )
    lines += [
        "# HELP pgproxy_pending_holds Statements waiting for an approval.",
        "# TYPE pgproxy_pending_holds gauge",
        f"pgproxy_pending_holds {m.pending_holds}",
        "# HELP pgproxy_masked_cells_total Result cells rewritten by masking.",
        "# TYPE pgproxy_masked_cells_total counter",
        f"pgproxy_masked_cells_total {m.masked_cells}",
    ]
    for name, value in (extra() if extra else {}).items():
        lines.append(f"# TYPE {name} gauge")
        lines.append(f"{name} {value}")
    return "\n".join(lines) + "\n"


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
            text=_metrics_text(proxy, extra_metrics), content_type="text/plain", charset="utf-8"
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app
