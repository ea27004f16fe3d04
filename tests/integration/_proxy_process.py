"""An allow-all proxy in a child process, for tests the in-process proxy thread cannot serve.

Two reasons to want one: a driver call that blocks while holding the GIL (libpq's ``PQcancel``
as psycopg calls it) would freeze a proxy running on a thread of the same interpreter; and the
proxy's memory can only be measured apart from the client's in a process of its own.

Run as ``python -m tests.integration._proxy_process UPSTREAM_DSN RULES_DIR``: it prints
``listening on HOST:PORT``, then answers each ``rss`` line on stdin with
``rss <peak KiB> <current KiB>``, and exits when stdin closes.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pgproxy.audit.records import MemorySink
from pgproxy.rules import load_rules
from pgproxy.server.proxy import Proxy, ProxyConfig
from pgproxy.server.upstream import parse_dsn


def _rss_kib() -> tuple[int, int]:
    """(peak, current) resident size in KiB. The peak is /proc's VmHWM where there is one:
    Linux carries ``ru_maxrss`` over from the parent through fork and exec, so a child of a
    large test process would report the parent's peak as its own."""
    fields: dict[str, int] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            name, _, rest = line.partition(":")
            if name in ("VmHWM", "VmRSS"):
                fields[name] = int(rest.split()[0])
    except OSError:
        pass
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak, fields.get("VmRSS", -1)


async def _serve(upstream: str, rules_dir: str) -> None:
    config = ProxyConfig(upstream=parse_dsn(upstream), host="127.0.0.1", port=0)
    proxy = Proxy(config, load_rules(Path(rules_dir)), audit=MemorySink())
    host, port = await proxy.start()
    print(f"listening on {host}:{port}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "rss":
            peak, current = _rss_kib()
            print(f"rss {peak} {current}", flush=True)
    await proxy.stop(1)


class ProxyProcess:
    """The parent's handle on the child proxy."""

    def __init__(self, proc: subprocess.Popen[str], host: str, port: int) -> None:
        self.proc = proc
        self.host = host
        self.port = port

    def rss_kib(self) -> tuple[int, int]:
        """(peak, current) resident set size of the proxy process, in KiB."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("rss\n")
        self.proc.stdin.flush()
        _, peak, current = self.proc.stdout.readline().split()
        return int(peak), int(current)


@contextmanager
def proxy_process(upstream: str, rules_dir: Path) -> Iterator[ProxyProcess]:
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.integration._proxy_process", upstream, str(rules_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=root,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"proxy process did not start: {line!r}")
        host, port = line.split()[-1].rsplit(":", 1)
        yield ProxyProcess(proc, host, int(port))
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    asyncio.run(_serve(sys.argv[1], sys.argv[2]))
