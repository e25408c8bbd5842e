"""Fixtures of the training tier: the tiny model (built once per session) and an in-process runner
for the real `finetune-trainer` entry point. The helpers live in training/helpers.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.helpers import Run, RunTrainer, TinyModel, build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def run_trainer(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> RunTrainer:
    """Call the real CLI entry point `finetune_trainer.main.main` in-process."""
    from finetune_trainer.main import main

    termination = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(termination))
    monkeypatch.delenv("FINETUNE_REPORT_STATUS", raising=False)
    counter = iter(range(1000))

    def run(job: Path, *args: str, output: Path | None = None) -> Run:
        termination.unlink(missing_ok=True)
        out = output or tmp_path / f"out-{next(counter)}"
        argv = ["--job", str(job), *args]
        if "--output" not in args:
            argv += ["--output", str(out)]
        code = main(argv)
        captured = capfd.readouterr()
        outcome = json.loads(termination.read_text()) if termination.exists() else None
        return Run(code, captured.err, outcome, out)

    return run
