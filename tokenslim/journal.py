"""Append-only JSON-lines files that survive a kill: the resume record of sweeps and tune.

A process killed while appending leaves at most a torn last line. Reading drops it *and cuts it
off the file*, so the next append starts on a line of its own instead of being glued to the torn
text (which would lose that row as well on the following read).
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple


def _not_ours(raw: bytes) -> Optional[str]:
    """Why ``raw`` (a file's bytes) is not a journal of ours, or ``None`` if it is one.

    Ours: UTF-8 text whose first line is a JSON object (or only the start of one: a first write
    cut by a kill); empty files too. Whose run it is, the fingerprint in each row says."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "it is not text (a binary file)"
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return None
    first, complete = lines[0], text.rstrip(" \t").endswith("\n") or len(lines) > 1
    if not first.startswith("{"):
        return f"its first line is not a JSON object ({first[:40]!r})"
    if complete:
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return "its first line is not valid JSON"
        if not isinstance(row, dict):
            return "its first line is not a JSON object"
    return None


def check_journal(path: str) -> None:
    """Refuse, leaving it untouched, an existing ``path`` that is not a tokenslim journal.

    Raises:
        ValueError: naming the file and what to do (another file name, or delete it).
    """
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        _refuse_unless_ours(path, f.read())


def _refuse_unless_ours(path: str, raw: bytes) -> None:
    reason = _not_ours(raw)
    if reason is not None:
        raise ValueError(f"{path} exists and is not a tokenslim results file ({reason}); it was left untouched. "
                         "Name a new file, or move that one away")


def remove_journal(path: str) -> None:
    """Delete a journal of ours (``--fresh``); refuse, untouched, a file that is not one."""
    check_journal(path)
    if os.path.exists(path):
        os.remove(path)


def read_jsonl(path: str) -> List[Tuple[int, Dict[str, Any]]]:
    """``(line number, row)`` for every complete row of ``path`` (none if it does not exist);
    a torn last line is removed from the file.

    Raises:
        ValueError: ``path`` exists and is not a journal of ours (see :func:`check_journal`);
            nothing is cut or written then.
    """
    if not os.path.isfile(path):
        return []
    with open(path, "rb") as f:
        raw = f.read()
    _refuse_unless_ours(path, raw)
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
