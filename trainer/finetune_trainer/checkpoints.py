"""Checkpoints that a restarted pod resumes from.

The Trainer writes `checkpoint-<step>` directories under the checkpoint directory, trainer_state.json
last; a directory without it (the pod died while saving) or with transformers' JIT sentinel file is
incomplete and never resumed from. `run.json` records the plan the checkpoints belong to: when the
plan changed (another spec or dataset), the old checkpoints cannot be continued and are removed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

FINGERPRINT_FILE = "run.json"
STATE_FILE = "trainer_state.json"
INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match and path.is_dir() else None


def latest_checkpoint(directory: str) -> str | None:
    """The complete checkpoint with the highest step, or None."""
    root = Path(directory)
    if not root.is_dir():
        return None
    complete = [
        (step, path)
        for path in root.iterdir()
        if (step := checkpoint_step(path)) is not None
        and (path / STATE_FILE).is_file()
        and not (path / INCOMPLETE_MARKER).exists()
    ]
    return str(max(complete)[1]) if complete else None


def prepare(directory: str, fingerprint: dict[str, Any]) -> str | None:
    """Create the checkpoint directory, drop checkpoints of another plan, and return the one to
    resume from (None: start from scratch)."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    record = root / FINGERPRINT_FILE
    wanted = json.dumps(fingerprint, sort_keys=True)
    stale = [path for path in root.iterdir() if checkpoint_step(path) is not None]
    if stale:
        previous = record.read_text(encoding="utf-8") if record.is_file() else None
        if previous != wanted:
            log.warning(
                "removing %d checkpoint(s) of another run plan in %s: %s",
                len(stale),
                directory,
                ", ".join(sorted(path.name for path in stale)),
            )
            for path in stale:
                shutil.rmtree(path)
    record.write_text(wanted, encoding="utf-8")
    return latest_checkpoint(directory)


@contextlib.contextmanager
def without_model_card(model: Any) -> Iterator[None]:
    """Checkpoints without peft's model card: its save_pretrained writes a README.md from a Jinja
    template compiled anew each time, most of the Python time of saving a small adapter and of no
    use to a resume. The outputs saved after the block keep it."""
    if not hasattr(model, "create_or_update_model_card"):
        yield
        return
    model.create_or_update_model_card = _no_model_card
    try:
        yield
    finally:
        del model.create_or_update_model_card


def _no_model_card(*args: Any, **kwargs: Any) -> None:
    return None
