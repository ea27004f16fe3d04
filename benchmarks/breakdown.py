"""Where pgproxy's CPU per transaction goes: the fast lane with its parts cut out, side by side.

    python benchmarks/breakdown.py                  # 4 rounds of 4 s per variant, -c 8
    python benchmarks/breakdown.py --clients 1      # the same at -c 1 (latency)
    python benchmarks/breakdown.py --quick          # 1 round of 1 s

Runs ``pgbench -S -c 8 -j 2`` (or ``-c 1``; ``-M simple`` or ``prepared``) through the relay
(``relay.py``, the floor) and through ``pgproxy serve`` started in variants that cut the fast
lane's work down step by step, and prints each one's CPU per transaction (user + system time
of the process and its children, over the transactions pgbench reports), TPS and pgbench's
average latency, as medians of alternating rounds:

- ``forward``: the session's socket callbacks only write the bytes to the other side (what
  pgproxy's own I/O model costs: nothing parsed, nothing decided, nothing recorded);
- ``decide``: the fast lane's check and policy decision, then the bytes forwarded (no timing,
  no metrics, no audit record);
- ``record``: ``decide`` plus timing, metrics and the statement's audit record built, but not
  handed to the audit;
- ``full``: pgproxy as shipped (the record handed to the audit writer process).

The variants exist only here: ``--serve VARIANT`` patches ``ClientSession`` in the serving
process before ``pgproxy serve`` starts. They are measuring instruments with rules broken on
purpose (no audit of the fast lane's statements), never a way to run pgproxy. Statements the
fast lane does not take run pgproxy's normal path in every variant.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import (  # noqa: E402  (benchmarks/ is a folder of scripts, not a package)
    Conn,
    Database,
    Service,
    cpu_seconds,
    pgbench,
    pgbench_exe,
    postgres,
    start_pgproxy,
    start_relay,
    stop,
)

VARIANTS = ("forward", "decide", "record", "full")


def patch(variant: str) -> None:
    """Replace the session's socket callbacks with ``variant``'s (``full``: leave them)."""
    from pgproxy.server import session as s

    if variant not in VARIANTS:
        raise SystemExit(f"breakdown.py: unknown variant {variant!r} (one of {VARIANTS})")
    client_bytes, server_bytes = s.ClientSession._client_bytes, s.ClientSession._server_bytes
    if variant == "full":
        return
    if variant == "forward":

        def forward_client(self: s.ClientSession, data: bytes) -> None:
            self._transports[1].write(data)

        def forward_server(self: s.ClientSession, data: bytes) -> None:
            self._transports[0].write(data)

        s.ClientSession._client_bytes = forward_client  # type: ignore[method-assign]
        s.ClientSession._server_bytes = forward_server  # type: ignore[method-assign]
        return
    timed = variant == "record"

    def lane_client(self: s.ClientSession, data: bytes) -> None:
        relay = self.relay
        if relay is not None and self._settle_task is None and not self._unqueued:
            lane = relay.fast_query(data)
            if lane is not None:
                self._transports[1].write(data)
                if timed:
                    sid, verdict, decision_seconds = lane
                    self._stmt_started[sid] = s._now_us()
                    metrics = self.proxy.metrics
                    metrics.count_statement(s._DECISION[verdict.action])
                    metrics.decision_seconds.observe(decision_seconds)
                return
        client_bytes(self, data)  # not the lane's: the normal path

    def lane_server(self: s.ClientSession, data: bytes) -> None:
        relay = self.relay
        if relay is not None and self._settle_task is None and relay.lane_open:
            done = relay.fast_result(data)
            if done is not None:
                self._transports[0].write(data)
                if timed:
                    sid, verdict, rows = done
                    now = s._now_us()
                    started = self._stmt_started.pop(sid, now)
                    self.proxy.metrics.query_seconds.observe((now - started) / 1e6)
                    self._encoded(sid, verdict, started, now, rows, "")  # built, not handed over
                return
        server_bytes(self, data)  # the general path took the statement over (or no lane)

    s.ClientSession._client_bytes = lane_client  # type: ignore[method-assign]
    s.ClientSession._server_bytes = lane_server  # type: ignore[method-assign]


def serve(variant: str, argv: list[str]) -> int:
    patch(variant)
    from pgproxy.cli import main

    return main(argv)


def load(args: argparse.Namespace) -> list[str]:
    jobs = ["-j", "2"] if args.clients > 1 else []
    return ["-c", str(args.clients), *jobs, "-M", args.mode]


def measure(args: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    rounds, duration = (1, 1) if args.quick else (args.rounds, args.duration)
    results: dict[str, dict[str, list[float]]] = {}
    work = Path(tempfile.mkdtemp(prefix="pgproxy-breakdown-"))
    services: list[Service] = []
    with postgres(args.dsn) as superuser_dsn:
        database = Database.create(superuser_dsn)
        try:
            direct = Conn(database.host, database.port, database.role, database.db)
            subprocess.run(
                [pgbench_exe(), "-i", "-q", "-s", str(args.scale)],
                env=direct.env(), capture_output=True, text=True, timeout=1800, check=True,
            )  # fmt: skip
            (work / "relay").mkdir()
            services.append(start_relay(database, work / "relay", "protocol"))
            for variant in VARIANTS:
                home = work / variant
                home.mkdir()
                launcher = [sys.executable, str(Path(__file__).resolve()), "--serve", variant]
                svc = start_pgproxy(database, home, label=variant, launcher=launcher)
                svc.name = variant
                services.append(svc)
            for _ in range(rounds):
                for svc in services:
                    assert svc.proc is not None
                    conn = Conn("127.0.0.1", svc.port, database.role, database.db)
                    before = cpu_seconds(svc.proc.pid)
                    tps, latency_ms, done = pgbench(conn, load(args), duration)
                    cpu = (cpu_seconds(svc.proc.pid) - before) / done * 1e6
                    row = results.setdefault(svc.name, {"cpu_us": [], "tps": [], "latency_us": []})
                    row["cpu_us"].append(cpu)
                    row["tps"].append(tps)
                    row["latency_us"].append(latency_ms * 1000)
                    print(f"  {svc.name}: {cpu:.1f} µs/tx, {tps:,.0f} tps", file=sys.stderr)
        finally:
            for svc in reversed(services):
                stop(svc)
            database.drop()
    return results


def render(results: dict[str, dict[str, list[float]]]) -> str:
    relay_tps = statistics.median(results["relay"]["tps"])
    relay_latency = statistics.median(results["relay"]["latency_us"])
    lines = [
        "| target | CPU per transaction (µs) | TPS | TPS ÷ relay | latency (µs) | "
        "latency - relay's (µs) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in results.items():
        tps = statistics.median(row["tps"])
        cpu = statistics.median(row["cpu_us"])
        latency = statistics.median(row["latency_us"])
        lines.append(
            f"| {name} | {cpu:.1f} | {tps:,.0f} | {tps / relay_tps:.2f}x | {latency:.1f} "
            f"| {latency - relay_latency:+.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], argv[2:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 round of 1 s (a smoke run)")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (medians)")
    p.add_argument("--duration", type=int, default=4, help="seconds per pgbench run")
    p.add_argument("--scale", type=int, default=1, help="pgbench -i scale")
    p.add_argument("--clients", type=int, default=8, help="pgbench -c (-j 2 above 1)")
    p.add_argument("--mode", choices=["simple", "prepared"], default="simple", help="pgbench -M")
    p.add_argument("--dsn", help="superuser DSN of an existing Postgres (default: throwaway)")
    p.add_argument("--json", type=Path, help="also write every sample here")
    args = p.parse_args(argv)
    results = measure(args)
    print(f"pgbench -S {' '.join(load(args))}, medians; CPU of each process and its children")
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
