"""Every hyperparameter reaches the trainer. The evidence is what transformers and peft themselves
saved during the run (training_args.bin, optimizer.pt and trainer_state.json of the checkpoint,
adapter_config.json and the adapter weights), or the loaded model, not the trainer's own claims."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from finetune_trainer import plan
from training.fake_apiserver import fake_apiserver
from training.helpers import Run, RunTrainer, TinyModel, manifest, text_rows, write_jsonl

pytestmark = pytest.mark.training

EXPLICIT = {
    "lr_scheduler": "linear",
    "warmup_ratio": 0.25,  # the deprecated alias: warmup_steps 0.25, a ratio
    "batch_size": 2,
    "gradient_accumulation_steps": 3,  # effective batch 6
    "num_input_records_to_sample": 60,  # ceil(60 / 6) = 10 steps
    "validation_ratio": 0.2,  # 4 of 20 records
    "validation_steps": 3,
    "weight_decay": 0.07,
    "learning_rate": 0.003,
    "lora_r": 4,
    "lora_alpha_over_r": 1.3,  # alpha int(1.3 x 4) = 5, as Safe Synthesizer computes it
    "lora_target_modules": ["q_proj", "up_proj"],
    "attn_implementation": "eager",
    "rope_scaling_factor": 2,
    "peft_implementation": "lora",
}


@pytest.fixture(scope="module")
def explicit_run(
    tiny_model: TinyModel, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Run, list[dict[str, Any]]]:
    """One run with every knob set away from its default, reporting status to a fake API server
    (module-scoped: several tests read it)."""
    from finetune_trainer.main import main

    tmp = tmp_path_factory.mktemp("explicit")
    data = write_jsonl(tmp / "train.jsonl", text_rows(20))
    job = manifest(tmp / "job.yaml", training=EXPLICIT)
    termination = tmp / "termination-log"
    with pytest.MonkeyPatch.context() as env, fake_apiserver(tmp) as (api, kubeconfig):
        env.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(termination))
        env.setenv("FINETUNE_REPORT_STATUS", "true")
        env.setenv("FINETUNE_JOB_NAME", "tiny")
        env.setenv("FINETUNE_JOB_NAMESPACE", "default")
        env.setenv("FINETUNE_REPORT_INTERVAL", "0")  # every report goes out
        env.setenv("KUBECONFIG", str(kubeconfig))
        env.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        output = tmp / "out"
        code = main(
            [
                *("--job", str(job), "--model", str(tiny_model.path)),
                *("--data", str(data), "--output", str(output)),
            ]
        )
        bodies = api.bodies
    outcome = json.loads(termination.read_text())
    return Run(code, "", outcome, output), bodies


def final_checkpoint(run: Run) -> Path:
    path = run.checkpoint_dir() / "checkpoint-10"
    assert path.is_dir()
    return path


def training_args(run: Run) -> Any:
    import torch

    return torch.load(final_checkpoint(run) / "training_args.bin", weights_only=False)


def test_steps_batch_and_optimizer(explicit_run: tuple[Run, Any]) -> None:
    run, _ = explicit_run
    assert run.code == 0
    args = training_args(run)
    assert args.max_steps == math.ceil(60 / (2 * 3)) == 10
    assert args.per_device_train_batch_size == 2
    assert args.gradient_accumulation_steps == 3
    # Safe Synthesizer's fixed TrainingArguments (FIXED_RUNTIME_TRAINING_ARGS and
    # gradient_checkpointing=True with transformers' default kwargs)
    assert args.optim.value == "paged_adamw_32bit"
    assert args.activation_checkpointing is True
    assert args.activation_checkpointing_kwargs is None
    assert args.per_device_eval_batch_size == 2
    assert (args.max_grad_norm, args.seed) == (1.0, 42)
    assert args.ddp_find_unused_parameters is False
    assert args.lr_scheduler_type.value == "linear"
    assert args.warmup_steps == 0.25  # handed over as Safe Synthesizer hands it over
    assert args.get_warmup_steps(10) == math.ceil(0.25 * 10) == 3
    assert run.summary["resolved"]["warmup_steps"] == 3
    assert args.learning_rate == 0.003
    assert run.trainer_state()["global_step"] == 10
    summary = run.summary
    assert (summary["records_seen"], summary["resolved"]["train_records"]) == (60, 16)
    assert summary["epochs"] == 60 / 16  # the 16 training records, wrapped around


def test_weight_decay_reaches_the_optimizer(explicit_run: tuple[Run, Any]) -> None:
    import torch

    run, _ = explicit_run
    state = torch.load(final_checkpoint(run) / "optimizer.pt", weights_only=False)
    decayed = [g for g in state["param_groups"] if g["params"]]
    assert [g["weight_decay"] for g in decayed] == [0.07]
    # bitsandbytes' 32-bit AdamW saved it: its moments are state1/state2 in its own entry
    # (torch's AdamW would have exp_avg/exp_avg_sq), in float32, one pair per LoRA matrix
    moments = [m["__bnb_optimizer_quant_state__"] for m in state["state"].values()]
    assert len(moments) == 2 * 2 * 2
    assert all(m["state1"].dtype == m["state2"].dtype == torch.float32 for m in moments)
    assert len(decayed[0]["params"]) == 2 * 2 * 2  # (A, B) x (q_proj, up_proj) x 2 layers
    assert decayed[0]["initial_lr"] == 0.003


def test_learning_rate_follows_linear_warmup_and_decay(explicit_run: tuple[Run, Any]) -> None:
    """The logged learning rates are exactly transformers' linear schedule with 3 warmup steps."""
    import torch
    from transformers import get_scheduler

    run, _ = explicit_run
    logged = {
        e["step"]: e["learning_rate"]
        for e in run.trainer_state()["log_history"]
        if "learning_rate" in e
    }
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.003)
    reference = get_scheduler("linear", optimizer, num_warmup_steps=3, num_training_steps=10)
    expected = {}
    for step in range(1, 11):
        expected[step] = reference.get_last_lr()[0]  # the rate used by optimizer step `step`
        optimizer.step()
        reference.step()
    assert logged == pytest.approx(expected)
    assert max(logged, key=logged.__getitem__) == 4  # peak right after 3 warmup steps


def test_validation_every_three_steps_and_at_the_end(explicit_run: tuple[Run, Any]) -> None:
    run, _ = explicit_run
    history = run.trainer_state()["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6, 9, 10]
    assert training_args(run).eval_steps == 3
    assert run.outcome is not None
    assert run.outcome["result"]["evalLoss"] == history[-1]["eval_loss"]


def test_lora_rank_alpha_and_targets(explicit_run: tuple[Run, Any], tiny_model: TinyModel) -> None:
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    run, _ = explicit_run
    config = json.loads((run.output / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 5)  # int(1.3 x 4), not 5.2
    # Safe Synthesizer's use_rslora, and peft's defaults it keeps
    assert (config["use_rslora"], config["lora_dropout"], config["bias"]) == (True, 0.0, "none")
    assert sorted(config["target_modules"]) == ["q_proj", "up_proj"]
    with safe_open(str(run.output / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        shapes = {weights.get_tensor(n).shape for n in names if "lora_A" in n}
    assert {n.split(".")[-3] for n in names} == {"q_proj", "up_proj"}
    assert shapes == {(4, 64)}
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model.path), run.output
    )
    adapted = {
        name.rsplit(".", 1)[-1]
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and m.lora_A
    }
    assert adapted == {"q_proj", "up_proj"}
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.r["default"] == 4
    assert layer.scaling["default"] == 5 / math.sqrt(4)  # rsLoRA: alpha / sqrt(r)


def test_rope_and_attention_as_loaded(explicit_run: tuple[Run, Any]) -> None:
    run, _ = explicit_run
    resolved = run.summary["resolved"]
    assert resolved["rope_scaling_factor"] == 2
    assert resolved["rope_parameters"]["rope_type"] == "linear"
    assert resolved["rope_parameters"]["factor"] == 2.0
    assert resolved["max_position_embeddings"] == 2 * 128
    assert resolved["attn_implementation"] == "eager"  # read from the loaded model


def test_progress_reported_on_the_status_subresource(explicit_run: tuple[Run, Any]) -> None:
    run, bodies = explicit_run
    assert bodies, "no status patch reached the API server"
    assert all(set(body) == {"status"} and set(body["status"]) == {"progress"} for body in bodies)
    steps = [body["status"]["progress"]["step"] for body in bodies]
    assert steps == sorted(steps)
    final = bodies[-1]["status"]["progress"]
    assert run.outcome is not None
    result = run.outcome["result"]
    assert (final["step"], final["totalSteps"], final["percent"]) == (10, 10, 100)
    # status.progress shows four decimals (what kubectl has room for); the result is exact
    assert final["loss"] == round(result["finalLoss"], 4)
    assert final["evalLoss"] == round(result["evalLoss"], 4)
    assert final["epoch"] == pytest.approx(60 / 16)
    assert final["updateTime"].endswith("Z")
    assert any(body["status"]["progress"].get("evalLoss") for body in bodies[:-1])


def test_auto_learning_rate_and_records(
    tiny_model: TinyModel, tmp_path: Path, run_trainer: RunTrainer
) -> None:
    """As Safe Synthesizer resolves them: 'auto' learning rate by the class the pretrained_model's
    name matches (the default, SmolLM3-3B: 5e-4); 'auto' records 25,000 x the RoPE factor (no
    scaling here: 25,000), these 8 records repeated. Large batches of the shortest sequences the
    spec allows (16 tokens) keep it to 20 quick steps."""
    data = write_jsonl(tmp_path / "train.jsonl", text_rows(8))
    training = {
        "learning_rate": "auto",
        "num_input_records_to_sample": "auto",
        "lr_scheduler": "constant",
        "batch_size": 1250,
        "gradient_accumulation_steps": 1,
        "lora_r": 2,
    }
    run = run_trainer(
        manifest(tmp_path / "job.yaml", training=training, dataset={"maxSequenceLength": 16}),
        "--model",
        str(tiny_model.path),
        "--data",
        str(data),
    )
    assert run.code == 0, run.stderr[-2000:]
    records = plan.AUTO_RECORDS_PER_ROPE_FACTOR
    state = run.trainer_state()
    assert state["global_step"] == math.ceil(records / 1250) == 20
    rates = {e["learning_rate"] for e in state["log_history"] if "learning_rate" in e}
    assert rates == {5e-4}  # constant: the peak at every step
    resolved = run.summary["resolved"]
    assert resolved["learning_rate_source"] == "auto (SmolLM3)"
    assert resolved["records"] == records
    assert run.outcome is not None
    assert run.outcome["result"]["recordsSeen"] == records
