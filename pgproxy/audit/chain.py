"""Tamper evidence for the audit: the per-row hash chain and the signed checkpoint file.

Every audit row carries ``seq`` (1, 2, 3, … across all tables), ``prev_hash`` (the previous
row's ``row_hash``; ``GENESIS`` for seq 1) and ``row_hash`` = SHA-256 of ``prev_hash`` followed
by the row's canonical serialization: compact JSON of ``[table, seq, field values…]`` in table
column order (see ``schema.row_values``). Editing, deleting or reordering a row breaks the chain.

A chain alone can be rewritten end to end by anyone who can write the file, so every
``checkpoint_every`` rows (and at start and close) the writer appends a line
``{"seq", "row_hash", "ts", "hmac"}`` to ``<audit path>.checkpoints``, where ``hmac`` is
HMAC-SHA256 under a key the file's writer does not store. A rewritten chain no longer matches a
signed checkpoint; a truncated table no longer reaches the last checkpoint's seq.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

GENESIS: Final = "0" * 64

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def canonical(table: str, seq: int, values: Sequence[Any]) -> str:
    """The row's canonical serialization (also the writer's bulk-insert payload)."""
    return _dumps([table, seq, *values])


def row_hash(prev_hash: str, canonical_row: str) -> str:
    return hashlib.sha256((prev_hash + canonical_row).encode()).hexdigest()


def checkpoints_path(audit_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(audit_path)}.checkpoints")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    row_hash: str
    ts: str
    hmac: str

    def to_line(self) -> str:
        obj = {"seq": self.seq, "row_hash": self.row_hash, "ts": self.ts, "hmac": self.hmac}
        return json.dumps(obj, separators=(",", ":")) + "\n"

    def valid(self, key: bytes) -> bool:
        return hmac.compare_digest(self.hmac, sign(key, self.seq, self.row_hash, self.ts))


def sign(key: bytes, seq: int, row_hash_hex: str, ts: str) -> str:
    msg = f"pgproxy-audit-checkpoint\n{seq}\n{row_hash_hex}\n{ts}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def make_checkpoint(key: bytes | None, seq: int, row_hash_hex: str, ts: str) -> Checkpoint:
    """A checkpoint; unsigned (empty ``hmac``) when there is no key."""
    mac = sign(key, seq, row_hash_hex, ts) if key is not None else ""
    return Checkpoint(seq, row_hash_hex, ts, mac)


def append_checkpoint(path: Path, cp: Checkpoint) -> None:
    """Append one line and fsync it: a checkpoint that is not on disk protects nothing."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, cp.to_line().encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class BadCheckpointLine(ValueError):
    def __init__(self, line_no: int, why: str) -> None:
        super().__init__(f"checkpoint file line {line_no}: {why}")
        self.line_no = line_no


def read_checkpoints(path: Path) -> Iterator[tuple[int, Checkpoint]]:
    """(line number, checkpoint) for each line. A final line without its newline is a write
    torn by a crash and is skipped; any other malformed line raises ``BadCheckpointLine``."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            cp = Checkpoint(int(obj["seq"]), str(obj["row_hash"]), str(obj["ts"]), str(obj["hmac"]))
        except (ValueError, KeyError, TypeError) as exc:
            if last:
                return
            raise BadCheckpointLine(i, "not a checkpoint record") from exc
        yield i, cp
