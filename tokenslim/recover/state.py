"""The resume file of a recovery run: written atomically by rank 0, read back only for the same run.

What it holds is the trainer's business (:meth:`tokenslim.recover.trainer.Trainer.save`); this
module reads and writes it safely: a crash mid-write leaves the previous file, an unreadable file
or another run's file is refused by name before any training.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch


def read_state(path: Optional[str], identity: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The state in ``path`` if there is one (``None`` otherwise), after checking it is the run
    ``identity`` (:func:`tokenslim.fingerprint.check_same_run`)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"the recovery state {path} cannot be read ({type(e).__name__}); delete it "
                         "to start over") from None
    from ..fingerprint import check_same_run

    check_same_run(state.get("run"), identity, f"the recovery state {path}",
                   "Resume with the same command, or delete the file to start over")
    return state


def write_state(path: str, state: Dict[str, Any]) -> None:
    """Write ``state`` to ``path`` through a temporary file and an atomic rename."""
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise ValueError(f"cannot write the recovery state {path}: {e.strerror or e}") from None


__all__ = ["read_state", "write_state"]
