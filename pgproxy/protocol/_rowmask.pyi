"""Types of the compiled DataRow masking loop (``_rowmask.c``); see ``rowmask.py``."""

from pgproxy.protocol.rowmask import Action, Frames

def rewrite_rows(
    out: bytearray,
    chunk: bytes,
    frames: Frames,
    first: int,
    room: int,
    actions: tuple[Action, ...],
    /,
) -> tuple[int, int, int]: ...
