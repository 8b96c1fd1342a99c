"""Append-only JSON-lines files that survive a kill: the resume record of sweeps and tune.

A process killed while appending leaves at most a torn last line. Reading drops it *and cuts it
off the file*, so the next append starts on a line of its own instead of being glued to the torn
text (which would lose that row as well on the following read).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Tuple


def read_jsonl(path: str) -> List[Tuple[int, Dict[str, Any]]]:
    """``(line number, row)`` for every complete row of ``path`` (none if it does not exist);
    a torn last line is removed from the file."""
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as f:
            f.truncate(end)  # the torn tail of a killed write
    rows = []
    for lineno, line in enumerate(raw[:end].decode().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError:
            continue  # a damaged line inside the file: its work is redone
    return rows


def append_jsonl(path: str, row: Dict[str, Any]) -> None:
    """Append one row as one line, flushed to the file before returning."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
