"""Helpers of the training tier: a tiny Llama with a tokenizer trained on the spot, dataset
writers, job manifests, and what a trainer run left behind.

Imported as `training.helpers` (tests/ is on pytest's pythonpath), never through `conftest`: each
test tier has a conftest.py and a bare `import conftest` would get whichever was loaded last."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tinymodel import MODEL_CONTEXT, PAIRS, SENTENCES, TinyModel, build_tiny_model

__all__ = ["MODEL_CONTEXT", "PAIRS", "SENTENCES", "TinyModel", "build_tiny_model"]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def text_rows(count: int = len(SENTENCES)) -> list[dict[str, Any]]:
    return [{"text": SENTENCES[i % len(SENTENCES)], "id": i} for i in range(count)]


def pair_rows() -> list[dict[str, Any]]:
    return [{"prompt": prompt, "completion": completion} for prompt, completion in PAIRS]


def manifest(
    path: Path,
    training: dict[str, Any] | None = None,
    dataset: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    name: str = "tiny",
) -> Path:
    """Write a FineTuneJob manifest, as a user would apply it."""
    document = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": model or {},
            "dataset": {"claimName": "data", "path": "train.jsonl", "maxSequenceLength": 64}
            | (dataset or {}),
            "output": {"claimName": "adapters", "path": name},
            "training": training or {},
        },
    }
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


@dataclass(frozen=True)
class Run:
    code: int
    stderr: str
    outcome: dict[str, Any] | None
    output: Path

    @property
    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    @property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.output / "training_summary.json").read_text(encoding="utf-8"))

    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"

    def newest_checkpoint(self) -> Path:
        return max(
            self.checkpoint_dir().glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
        )

    def trainer_state(self) -> dict[str, Any]:
        """trainer_state.json of the newest checkpoint: the Trainer's own record of the run."""
        path = self.newest_checkpoint() / "trainer_state.json"
        state: dict[str, Any] = json.loads(path.read_text())
        return state


RunTrainer = Callable[..., Run]


class WriteLog:
    """A named pipe standing in for a file: every write to it (open, write, close) is recorded,
    so a file written twice, even with the same content, shows two entries. Read by a thread
    until `close`."""

    STOP = "\0stop\0"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: list[str] = []
        os.mkfifo(path)
        self._thread = threading.Thread(target=self._read, name=f"writes-{path.name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            with self.path.open(encoding="utf-8") as stream:  # blocks until a writer opens it
                text = stream.read()  # until every writer closed it
            if text.endswith(self.STOP):
                if text != self.STOP:
                    self.entries.append(text.removesuffix(self.STOP))
                return
            self.entries.append(text)

    def close(self) -> list[str]:
        """Stop reading; the entries written until now."""
        if self._thread.is_alive():
            with self.path.open("w", encoding="utf-8") as stream:
                stream.write(self.STOP)
            self._thread.join(timeout=30)
        return self.entries


@contextlib.contextmanager
def captured_stderr(path: Path) -> Iterator[None]:
    """File descriptor 2 (which worker processes inherit) and sys.stderr, into `path`."""
    saved = os.dup(2)
    with path.open("w", encoding="utf-8") as stream:
        os.dup2(stream.fileno(), 2)
        try:
            with contextlib.redirect_stderr(stream):
                yield
        finally:
            sys.stderr.flush()
            stream.flush()
            os.dup2(saved, 2)
            os.close(saved)
