"""Which checkpoint a restarted trainer resumes from, and when old ones are dropped."""

from __future__ import annotations

from pathlib import Path

from finetune_trainer.checkpoints import latest_checkpoint, prepare


def checkpoint(root: Path, step: int, complete: bool = True, jit_marker: bool = False) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (path / "trainer_state.json").write_text("{}")
    if jit_marker:
        (path / "checkpoint-is-incomplete.txt").write_text("in progress")
    return path


def test_newest_complete_checkpoint_wins(tmp_path: Path) -> None:
    checkpoint(tmp_path, 5)
    checkpoint(tmp_path, 20)
    checkpoint(tmp_path, 100, complete=False)  # the pod died while saving
    checkpoint(tmp_path, 90, jit_marker=True)  # a JIT save that did not finish
    (tmp_path / "checkpoint-999.tmp").mkdir()
    (tmp_path / "checkpoint-500").write_text("a file, not a checkpoint")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-20")


def test_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(str(tmp_path)) is None
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def test_same_plan_resumes_and_another_plan_starts_over(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    assert prepare(str(root), {"steps": 10}) is None  # first run: creates the directory
    checkpoint(root, 4)
    assert prepare(str(root), {"steps": 10}) == str(root / "checkpoint-4")  # a restart
    assert (root / "checkpoint-4").is_dir()
    assert prepare(str(root), {"steps": 12}) is None  # the spec changed: cannot continue
    assert not (root / "checkpoint-4").exists()
    assert (root / "run.json").read_text() == '{"steps": 12}'
