"""End to end through the real CLI entry point on CPU: bnb-4bit QLoRA, bnb-8bit QLoRA, bnb-4bit
loftq (QLoRA, as in Safe Synthesizer) and plain LoRA each train a tiny Llama, the loss falls, and
the saved adapter loads with peft and changes the model's outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from training.helpers import (
    Run,
    RunTrainer,
    TinyModel,
    manifest,
    pair_rows,
    text_rows,
    write_csv,
    write_jsonl,
    write_parquet,
)

pytestmark = pytest.mark.training

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMMON = {
    "learning_rate": 0.01,
    "num_input_records_to_sample": 240,
    "batch_size": 4,
    "gradient_accumulation_steps": 2,  # 240 / 8 = 30 steps
    "lora_r": 8,
    "lora_target_modules": ALL_PROJECTIONS,
    "warmup_ratio": 0.1,
}
CASES: dict[str, dict[str, Any]] = {
    "bnb-4bit QLoRA, jsonl text": {
        "training": {"quantize_model": True, "quantization_scheme": "bnb-4bit"},
        "file": "train.jsonl",
        "dataset": {},
        "quantization": {"method": "bitsandbytes", "loaded_in_4bit": True, "loaded_in_8bit": False},
        "kbit_prepared": True,
    },
    "bnb-8bit QLoRA, parquet prompt/completion": {
        # the deprecated bit count: quantization_bits 8 means bnb-8bit
        "training": {
            "quantize_model": True,
            "quantization_bits": 8,
            "peft_implementation": "qlora",
        },
        "file": "train.parquet",
        "dataset": {"promptField": "prompt", "completionField": "completion"},
        "quantization": {"method": "bitsandbytes", "loaded_in_4bit": False, "loaded_in_8bit": True},
        "kbit_prepared": True,
    },
    "bnb-4bit LoftQ, jsonl text": {
        "training": {
            "quantize_model": True,
            "quantization_scheme": "bnb-4bit",
            "peft_implementation": "loftq",
        },
        "file": "train.jsonl",
        "dataset": {},
        "quantization": {"method": "bitsandbytes", "loaded_in_4bit": True, "loaded_in_8bit": False},
        "kbit_prepared": True,
    },
    "unquantized LoRA, csv text": {
        "training": {"quantize_model": False, "peft_implementation": "lora"},
        "file": "train.csv",
        "dataset": {"textField": "sentence"},
        "quantization": None,
        "kbit_prepared": False,
    },
}


def write_dataset(path: Path) -> Path:
    if path.suffix == ".parquet":
        return write_parquet(path, pair_rows())
    if path.suffix == ".csv":
        return write_csv(path, [{"sentence": row["text"], "n": row["id"]} for row in text_rows()])
    return write_jsonl(path, text_rows())


def losses(run: Run) -> list[tuple[int, float]]:
    return [(e["step"], e["loss"]) for e in run.trainer_state()["log_history"] if "loss" in e]


def logits(model: Any, tokens: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=tokens).logits


@pytest.mark.parametrize("name", list(CASES))
def test_trains_and_the_adapter_changes_the_model(
    name: str, tiny_model: TinyModel, tmp_path: Path, run_trainer: RunTrainer
) -> None:
    case = CASES[name]
    data = write_dataset(tmp_path / case["file"])
    job = manifest(
        tmp_path / "job.yaml",
        training={**COMMON, **case["training"]},
        dataset={"path": case["file"], **case["dataset"]},
    )
    run = run_trainer(job, "--model", str(tiny_model.path), "--data", str(data))

    assert run.code == 0, run.stderr[-3000:]
    assert run.outcome is not None
    assert (run.outcome["outcome"], run.outcome["reason"]) == ("Succeeded", "Completed")
    result = run.outcome["result"]
    assert result["adapter"] == str(run.output)
    assert (result["steps"], result["recordsSeen"]) == (30, 240)
    assert run.trainer_state()["global_step"] == 30
    assert "max_vram_fraction 0.8 ignored: training on CPU" in run.stderr
    # validation_ratio 0 (the default): no split, no evaluation.
    assert not any("eval_loss" in entry for entry in run.trainer_state()["log_history"])
    assert "evalLoss" not in result
    # Checkpoints at multiples of ceil(30 / 20) = 2 steps (fewer where saving would cost more
    # than 1% of the time: the cadence skips some), the last step's always, the newest two kept.
    kept = sorted(int(p.name.split("-")[1]) for p in run.checkpoint_dir().glob("checkpoint-*"))
    assert len(kept) == 2 and kept[-1] == 30 and kept[0] % 2 == 0, kept

    # The loss falls: the Trainer's own log, first step against last.
    logged = losses(run)
    assert [step for step, _ in logged][:1] == [1] and logged[-1][0] == 30
    first, last = logged[0][1], logged[-1][1]
    assert last < first - 0.3, logged
    assert result["finalLoss"] == pytest.approx(last)

    # What was really loaded and wrapped, read from the model objects during the run.
    summary = run.summary
    assert summary["resolved"]["quantization"] == case["quantization"]
    assert summary["resolved"]["peft"]["kbit_prepared"] is case["kbit_prepared"]
    assert summary["final_loss"] == pytest.approx(last)
    if "loftq" in name:  # QLoRA, as in Safe Synthesizer (peft drops its LoftQConfig)
        assert "peft_implementation loftq trains QLoRA" in run.stderr

    # The output directory: adapter, tokenizer, summary.
    for file in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (run.output / file).is_file(), file
    check_adapter_changes_outputs(tiny_model.path, run.output)


def check_adapter_changes_outputs(model_dir: Path, adapter_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # the tokenizer saved with the adapter
    tokens = tokenizer("the cat sat on the mat", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    before = logits(base, tokens)
    tuned = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert tuned.peft_config["default"].r == 8
    after = logits(tuned, tokens)
    assert before.shape == after.shape
    assert not torch.allclose(before, after, atol=1e-4)
    with tuned.disable_adapter():
        assert torch.allclose(logits(tuned, tokens), before, atol=1e-5)
