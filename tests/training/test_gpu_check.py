"""hack/gpu-check.sh on a machine without a GPU: everything before training is done (the model
built on the spot, the data, one manifest and the operator's memory estimate per scheme), then it
stops with one clear line and exit code 3, and the JSON says why no scheme ran."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from gpu_check import EXIT_NO_GPU, SCHEME_ORDER

from finetune_api.resource import FineTuneJob

pytestmark = pytest.mark.training
ROOT = Path(__file__).resolve().parents[2]


def test_without_a_gpu_everything_before_training_is_ready(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the script would train")
    out = tmp_path / "gpu-check.json"
    workdir = tmp_path / "work"
    done = subprocess.run(
        ["bash", str(ROOT / "hack" / "gpu-check.sh"), "--workdir", str(workdir), "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == EXIT_NO_GPU, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu-check: no CUDA GPU visible to torch"), last
    assert str(workdir) in last and "run this on a machine with one NVIDIA GPU" in last

    report = json.loads(out.read_text())
    assert report["gpu"] is None
    assert report["model"]["parameters"] > 1e9  # the default, Llama-3.2-1B's shape
    assert (workdir / "train.jsonl").stat().st_size > 0
    rows = report["schemes"]
    assert [row["scheme"] for row in rows] == list(SCHEME_ORDER)
    for row in rows:
        assert (row["status"], row["reason"]) == ("not run", "no GPU")
        estimate = row["estimate"]
        assert estimate["shape_matches_model"] is True
        assert 0 < estimate["used_mib"] < estimate["required_mib"]
        job = FineTuneJob.model_validate(
            yaml.safe_load((workdir / f"job-{row['scheme']}.yaml").read_text())
        )
        scheme = job.spec.training.resolved_quantization_scheme
        assert (scheme or "none") == row["scheme"]
