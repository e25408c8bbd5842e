"""GPU figures: the real trainer, each quantization scheme the GPU supports, against memory.py.

    hack/gpu-check.sh [--out FILE] [--workdir DIR] [--model-name NAME] [--schemes a,b,...]
                      [--seq N] [--batch N] [--grad-accum N] [--steps N] [--warmup N]

Builds a Llama of one of the operator's known shapes (memory.KNOWN_MODELS; default
meta-llama/Llama-3.2-1B, 1.24B parameters) with random weights and a byte-level BPE tokenizer
trained on the spot (nothing is downloaded), a dataset whose records all fill
maxSequenceLength, and one FineTuneJob manifest per scheme. For each scheme the GPU can run
(finetune_api.gpu.DEFAULT_MIN_CAPABILITY: bnb-4bit, bnb-8bit, none = bf16 LoRA, fp8 and mxfp4 on
Hopper, nvfp4 on Blackwell) it runs the project's trainer (`finetune_trainer.main.main`, as
`python -m finetune_trainer` does) in a fresh process, with a timing callback added to the
Trainer it builds, and records:

- tokens/s in steady state: the tokens of the optimizer steps after the warm-up ones, over the
  time spent inside those steps (forward, backward, optimizer; synchronized);
- tokens/s on the wall clock over the same steps (adds data loading, logging and checkpoints);
- peak GPU memory: torch.cuda.max_memory_reserved (and max_memory_allocated) over the run;
- the operator's estimate (memory.estimate_memory on the same spec: shape, scheme, batch,
  sequence) and the ratio peak reserved / estimate.

A scheme that fails (a missing kernel, an import error, a time-out) is recorded with its one-line
reason and the others go on. A table and one JSON line are printed; --out (or $GPU_CHECK_OUT, or
$OUT/gpu-check.json) gets the JSON too. Without a CUDA GPU everything up to the training runs
(model, tokenizer, data, manifests, estimates), then it stops with one line and exit code 3.

--cpu-smoke (development only): a tiny shape, LoRA and bnb-4bit on the CPU, to try the whole
flow on a machine without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_NO_GPU = 3
MIB = 1024 * 1024
SCHEME_ORDER = ("none", "bnb-4bit", "bnb-8bit", "fp8", "mxfp4", "nvfp4")
DEFAULT_MODEL = "meta-llama/Llama-3.2-1B"
WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "are",
    "or",
    "which",
    "were",
    "his",
    "her",
    "their",
    "one",
    "all",
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
    "education",
    "river",
    "green",
    "blue",
    "small",
    "large",
    "early",
    "young",
    "important",
    "few",
    "public",
    "bad",
    "same",
    "able",
    "run",
    "walk",
    "read",
    "write",
    "speak",
    "open",
    "close",
    "carry",
    "bring",
    "build",
    "learn",
    "teach",
    "follow",
    "begin",
]


def log(message: str) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


# --- what needs no GPU ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    model_name: str
    seq: int
    batch: int
    grad_accum: int
    steps: int
    warmup: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq * self.batch * self.grad_accum

    @property
    def records(self) -> int:
        return self.steps * self.batch * self.grad_accum


def smoke_shape() -> Any:
    from finetune_operator.memory import ModelShape

    return ModelShape(0.0041, 2, 128, 256, 4, 2, 4096, False)


def build_model(directory: Path, shape: Any) -> dict[str, Any]:
    """A Llama of `shape` with random bf16 weights, and a byte-level BPE tokenizer trained on the
    word list, saved together (safetensors). Reused when the directory already holds this shape."""
    marker = directory / "gpu-check-shape.json"
    wanted = dataclasses.asdict(shape)
    if marker.is_file() and json.loads(marker.read_text())["shape"] == wanted:
        info: dict[str, Any] = json.loads(marker.read_text())
        log(f"reusing the model in {directory}")
        return info
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tinymodel import train_tokenizer

    started = time.monotonic()
    corpus = [" ".join(random.Random(i).choices(WORDS, k=200)) for i in range(50)]
    tokenizer = train_tokenizer(corpus, vocab_size=min(1000, shape.vocab))
    # The embedding and LM head keep the shape's full vocabulary (the estimate's logits term
    # depends on it); the tokenizer uses the first ids only.
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=shape.tied_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    parameters = sum(p.numel() for p in model.parameters())
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    info = {
        "shape": wanted,
        "parameters": parameters,
        "tokenizer_vocab": len(tokenizer),
        "build_seconds": round(time.monotonic() - started, 1),
    }
    marker.write_text(json.dumps(info))
    log(
        f"built a {parameters / 1e9:.3f}B-parameter Llama in {info['build_seconds']} s: {directory}"
    )
    return info


def write_dataset(path: Path, model_dir: Path, settings: Settings) -> None:
    """`settings.records` records of random words, each at least maxSequenceLength tokens, so that
    every optimizer step trains on exactly tokens_per_step tokens (truncation, no padding)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    for index in range(settings.records):
        words = random.Random(1000 + index).choices(WORDS, k=settings.seq + 64)
        text = " ".join(words)
        tokens = len(tokenizer(text)["input_ids"])
        if tokens < settings.seq:
            raise SystemExit(f"gpu-check: record {index} has {tokens} < {settings.seq} tokens")
        rows.append(json.dumps({"text": text}))
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")


def manifest(scheme: str, settings: Settings, pretrained: str) -> dict[str, Any]:
    """The FineTuneJob a user would apply for this run (model on a volume: air-gapped)."""
    training: dict[str, Any] = {
        "pretrained_model": pretrained,
        # 'auto' would resolve by the name as Safe Synthesizer does, and refuse the names that
        # match none of its model classes ("tiny", meta-llama/Llama-3.2-1B): the check measures
        # speed and memory, so it names the usual LoRA rate
        "learning_rate": 2e-4,
        "quantize_model": scheme != "none",
        "batch_size": settings.batch,
        "gradient_accumulation_steps": settings.grad_accum,
        "num_input_records_to_sample": settings.records,
    }
    if scheme != "none":
        training["quantization_scheme"] = scheme
    name = f"gpu-check-{scheme}"
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "model": {"volume": {"claimName": "models", "path": "gpu-check"}},
            "dataset": {
                "claimName": "data",
                "path": "train.jsonl",
                "maxSequenceLength": settings.seq,
            },
            "output": {"claimName": "adapters", "path": name},
            "training": training,
        },
    }


def estimate(document: dict[str, Any], shape: Any) -> dict[str, Any]:
    """The operator's estimate for this manifest: its own shape lookup (the known-model table),
    else the built shape."""
    from finetune_api.resource import FineTuneJob
    from finetune_operator.memory import estimate_memory, model_shape

    spec = FineTuneJob.model_validate(document).spec
    looked_up = model_shape(spec)
    result = estimate_memory(spec, looked_up or shape)
    assert result is not None
    return {
        "shape_from": "operator model_shape(spec)" if looked_up is not None else "built shape",
        "shape_matches_model": looked_up is None or looked_up == shape,
        "base_weights_mib": result.base_weights_mib,
        "lora_mib": result.lora_mib,
        "activations_mib": result.activations_mib,
        "overhead_mib": result.overhead_mib,
        "used_mib": result.used_mib,
        "required_mib": result.required_mib,
        "max_vram_fraction": result.max_vram_fraction,
    }


def gpu_facts() -> dict[str, Any] | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    facts: dict[str, Any] = {
        "name": torch.cuda.get_device_name(0),
        "capability": f"{major}.{minor}",
        "count": torch.cuda.device_count(),
        "total_mib": torch.cuda.get_device_properties(0).total_memory // MIB,
        "cuda": torch.version.cuda,
    }
    try:
        line = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.splitlines()[0]
        name, driver, memory = (part.strip() for part in line.split(","))
        facts.update(smi_name=name, driver=driver, smi_memory=memory)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError) as exc:
        facts["driver"] = f"unknown ({type(exc).__name__})"
    return facts


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "bitsandbytes",
        "kernels",
        "torchao",
    ):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = None
    return found


# --- one scheme in its own process ---------------------------------------------------------


def run_scheme(
    scheme: str,
    *,
    job: Path,
    model_dir: Path,
    data: Path,
    workdir: Path,
    timeout: float,
    cpu: bool,
) -> dict[str, Any]:
    """Run the worker for one scheme; its metrics, or the failure's one-line reason."""
    out = workdir / "runs" / scheme
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    metrics_file = out / "metrics.json"
    termination = out / "termination.json"
    env = dict(os.environ)
    env.update(
        FINETUNE_TERMINATION_MESSAGE_PATH=str(termination),
        FINETUNE_NPROC="1",
        HF_HUB_OFFLINE=os.environ.get("HF_HUB_OFFLINE", "1"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        str(metrics_file),
        "--",
        "--job",
        str(job),
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output",
        str(out / "adapter"),
    ]
    started = time.monotonic()
    log(f"{scheme}: training (log: {out / 'trainer.log'})")
    with (out / "trainer.log").open("w", encoding="utf-8") as stream:
        try:
            code = subprocess.run(
                command,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = round(time.monotonic() - started, 1)
    result: dict[str, Any] = {"seconds": seconds}
    if metrics_file.is_file():
        result.update(json.loads(metrics_file.read_text()))
    if code == 0 and result.get("step_seconds"):
        result["status"] = "ok"
        return result
    result["status"] = "failed"
    if code is None:
        result["reason"] = f"timed out after {timeout:.0f} s"
    else:
        result["reason"] = failure_reason(termination, out / "trainer.log", code)
    log(f"{scheme}: failed: {result['reason']}")
    return result


def failure_reason(termination: Path, log_file: Path, code: int) -> str:
    if termination.is_file():
        try:
            outcome = json.loads(termination.read_text())
            if outcome.get("outcome") == "Failed":
                return f"{outcome.get('reason')}: {outcome.get('message')}"
        except ValueError:
            pass
    lines = [line for line in log_file.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return f"exit code {code}: {last[:400]}"


def worker(metrics_path: str, argv: list[str]) -> int:
    """Run the trainer's main() with timing and memory hooks; write what was measured."""
    import torch
    from transformers import TrainerCallback

    from finetune_trainer import pipeline
    from finetune_trainer.main import main

    cuda = torch.cuda.is_available()
    metrics: dict[str, Any] = {}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    class Timing(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begin = 0.0
            self.steps: list[tuple[float, float]] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            sync()
            self.steps.append((self.begin, time.perf_counter()))

    timing = Timing()
    original_load = getattr(pipeline, "load_model")  # noqa: B009 - mypy: not re-exported
    original_build = getattr(pipeline, "build_trainer")  # noqa: B009

    def load_model(*args: Any, **kwargs: Any) -> Any:
        model = original_load(*args, **kwargs)
        try:  # what was loaded: never a reason for the run to fail
            kinds: dict[str, int] = {}
            for module in model.model.layers[0].modules():
                name = type(module).__name__
                if "Linear" in name:
                    kinds[name] = kinds.get(name, 0) + 1
            metrics["layer0_linear_types"] = kinds
            metrics["weights_footprint_mib"] = round(model.get_memory_footprint() / MIB)
            if cuda:
                metrics["allocated_after_load_mib"] = round(torch.cuda.memory_allocated() / MIB)
        except Exception as exc:
            metrics["load_facts_error"] = f"{type(exc).__name__}: {exc}"
        return model

    def build_trainer(**kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs["callbacks"], timing]
        return original_build(**kwargs)

    setattr(pipeline, "load_model", load_model)  # noqa: B010
    setattr(pipeline, "build_trainer", build_trainer)  # noqa: B010
    started = time.perf_counter()
    code = main(argv)
    metrics["exit_code"] = code
    metrics["trainer_seconds"] = round(time.perf_counter() - started, 1)
    metrics["step_seconds"] = [round(end - begin, 4) for begin, end in timing.steps]
    metrics["step_ends"] = [round(end - started, 4) for _, end in timing.steps]
    if cuda:
        metrics["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / MIB)
        metrics["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB)
        free, total = torch.cuda.mem_get_info()
        metrics["device_used_at_end_mib"] = round((total - free) / MIB)
        metrics["reserved_at_end_mib"] = round(torch.cuda.memory_reserved() / MIB)
    Path(metrics_path).write_text(json.dumps(metrics), encoding="utf-8")
    return code


def summarize_run(result: dict[str, Any], settings: Settings, output: Path) -> None:
    """Steady-state and wall-clock tokens/s from the step times; facts from the summary."""
    steps = result.get("step_seconds") or []
    ends = result.get("step_ends") or []
    warm = min(settings.warmup, max(len(steps) - 1, 0))
    measured = steps[warm:]
    result["measured_steps"] = len(measured)
    if measured:
        tokens = settings.tokens_per_step * len(measured)
        result["tokens_per_s"] = round(tokens / sum(measured))
        if warm > 0:
            result["tokens_per_s_wall"] = round(tokens / (ends[-1] - ends[warm - 1]))
        result["step_seconds_median"] = sorted(measured)[len(measured) // 2]
    summary = output / "adapter" / "training_summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        resolved = data.get("resolved", {})
        result["final_loss"] = data.get("final_loss")
        result["loaded_quantization"] = resolved.get("quantization")
        result["peft"] = dict(resolved.get("peft") or {})


# --- the report ----------------------------------------------------------------------------


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "scheme",
        "status",
        "tok/s",
        "tok/s wall",
        "peak reserved MiB",
        "weights MiB",
        "estimate MiB",
        "peak/est.",
        "note",
    )
    lines = [header]
    for row in rows:
        est = row["estimate"]["used_mib"]
        peak = row.get("peak_reserved_mib")
        note = row.get("reason", "")
        if row["status"] == "ok":
            note = f"linears: {row.get('layer0_linear_types')}; loss {row.get('final_loss')}"
        lines.append(
            (
                row["scheme"],
                row["status"],
                str(row.get("tokens_per_s", "-")),
                str(row.get("tokens_per_s_wall", "-")),
                str(peak if peak is not None else "-"),
                str(row.get("allocated_after_load_mib", "-")),
                str(est),
                f"{peak / est:.2f}" if peak and row["status"] == "ok" else "-",
                note,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False))
        + "  "
        + line[-1]
        for line in lines
    )


def default_out() -> str | None:
    if os.environ.get("GPU_CHECK_OUT"):
        return os.environ["GPU_CHECK_OUT"]
    if os.environ.get("OUT"):
        return str(Path(os.environ["OUT"]) / "gpu-check.json")
    return None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu-check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=default_out(), help="write the JSON here too")
    parser.add_argument(
        "--workdir", default=os.environ.get("GPU_CHECK_DIR", "/tmp/finetune-gpu-check")
    )
    parser.add_argument("--model-name", default=DEFAULT_MODEL, help="a memory.KNOWN_MODELS key")
    parser.add_argument("--schemes", default=",".join(SCHEME_ORDER))
    parser.add_argument("--seq", type=int, default=2048, help="maxSequenceLength")
    parser.add_argument("--batch", type=int, default=2, help="batch_size")
    parser.add_argument("--grad-accum", type=int, default=4, help="gradient_accumulation_steps")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per scheme")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per scheme")
    parser.add_argument(
        "--deadline", type=float, default=0, help="seconds for all schemes (0: none)"
    )
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> tuple[Settings, Any, list[str]]:
    """The settings, the model shape and the schemes the arguments ask for."""
    from finetune_operator.memory import KNOWN_MODELS

    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEME_ORDER]
    if unknown:
        raise SystemExit(f"gpu-check: unknown schemes {unknown}; known: {', '.join(SCHEME_ORDER)}")
    if args.cpu_smoke:
        settings = Settings("tiny (--cpu-smoke)", 128, 2, 2, 4, 1)
        if args.schemes == ",".join(SCHEME_ORDER):
            schemes = ["none", "bnb-4bit"]  # the schemes with CPU kernels
        return settings, smoke_shape(), schemes
    if args.model_name not in KNOWN_MODELS:
        raise SystemExit(f"gpu-check: --model-name must be one of {', '.join(KNOWN_MODELS)}")
    settings = Settings(
        args.model_name, args.seq, args.batch, args.grad_accum, args.steps, args.warmup
    )
    return settings, KNOWN_MODELS[args.model_name], schemes


def prepare_rows(
    schemes: list[str], settings: Settings, shape: Any, workdir: Path, smoke: bool
) -> list[dict[str, Any]]:
    """One manifest per scheme, and the operator's estimate for it."""
    import yaml

    rows: list[dict[str, Any]] = []
    for scheme in schemes:
        document = manifest(scheme, settings, "tiny" if smoke else settings.model_name)
        if smoke:
            document["spec"]["model"]["parametersBillions"] = shape.parameters_billions
        job = workdir / f"job-{scheme}.yaml"
        job.write_text(yaml.safe_dump(document), encoding="utf-8")
        rows.append({"scheme": scheme, "job": str(job), "estimate": estimate(document, shape)})
    return rows


def run_all(
    rows: list[dict[str, Any]],
    gpu: dict[str, Any] | None,
    args: argparse.Namespace,
    settings: Settings,
    started: float,
) -> None:
    """Train each scheme the GPU can run, within the time left."""
    from finetune_api.gpu import DEFAULT_MIN_CAPABILITY, ComputeCapability

    workdir = Path(args.workdir)
    capability = ComputeCapability.parse(gpu["capability"]) if gpu else None
    for row in rows:
        minimum = DEFAULT_MIN_CAPABILITY[row["scheme"]]
        if capability is not None and capability < minimum:
            row["status"] = "skipped"
            row["reason"] = f"needs {minimum.describe_minimum()}; this GPU is {capability}"
            continue
        left = args.deadline - (time.monotonic() - started) if args.deadline else args.timeout
        if left < 30:
            row["status"] = "skipped"
            row["reason"] = "out of time (--deadline)"
            continue
        row.update(
            run_scheme(
                row["scheme"],
                job=Path(row["job"]),
                model_dir=workdir / "model",
                data=workdir / "train.jsonl",
                workdir=workdir,
                timeout=min(args.timeout, left),
                cpu=args.cpu_smoke,
            )
        )
        summarize_run(row, settings, workdir / "runs" / row["scheme"])
        if row["status"] == "ok" and row.get("peak_reserved_mib"):
            ratio = row["peak_reserved_mib"] / row["estimate"]["used_mib"]
            row["peak_over_estimate"] = round(ratio, 3)


def missing_packages() -> list[str]:
    """The packages the check cannot do without (bitsandbytes and kernels: per scheme)."""
    import importlib.util

    needed = ("torch", "transformers", "peft", "accelerate", "tokenizers", "pydantic", "yaml")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return worker(argv[1], argv[3:])
    args = parse_args(argv)
    missing = missing_packages()
    if missing:
        print(
            f"gpu-check: {sys.executable} lacks {', '.join(missing)}: run `make setup` (then "
            "the script uses .venv) or set PYTHON to an interpreter with the trainer's packages",
            file=sys.stderr,
        )
        return 2
    started = time.monotonic()
    settings, shape, schemes = resolve(args)
    workdir = Path(args.workdir)
    built = build_model(workdir / "model", shape)
    write_dataset(workdir / "train.jsonl", workdir / "model", settings)
    rows = prepare_rows(schemes, settings, shape, workdir, args.cpu_smoke)
    log(
        f"{len(rows)} manifests and estimates written to {workdir}; "
        f"{settings.tokens_per_step} tokens per optimizer step"
    )
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": versions(),
        "model": {"name": settings.model_name, **built},
        "settings": {**dataclasses.asdict(settings), "tokens_per_step": settings.tokens_per_step},
    }
    gpu = None if args.cpu_smoke else gpu_facts()
    report["gpu"] = gpu
    if gpu is None and not args.cpu_smoke:
        for row in rows:
            row["status"] = "not run"
            row["reason"] = "no GPU"
        finish(report, rows, args.out)
        print(
            "gpu-check: no CUDA GPU visible to torch (torch.cuda.is_available() is False): the "
            f"model, data, manifests and estimates are ready under {workdir}; run this on a "
            "machine with one NVIDIA GPU",
            file=sys.stderr,
        )
        return EXIT_NO_GPU
    run_all(rows, gpu, args, settings, started)
    finish(report, rows, args.out)
    return 0


def finish(report: dict[str, Any], rows: list[dict[str, Any]], out: str | None) -> None:
    for row in rows:
        row.pop("step_ends", None)
        row.pop("job", None)
    report["schemes"] = rows
    gpu = report.get("gpu") or {}
    print(
        f"\nGPU: {gpu.get('name', 'none')} (capability {gpu.get('capability', '-')}, driver "
        f"{gpu.get('driver', '-')}); model {report['model']['name']} "
        f"({report['model']['parameters'] / 1e9:.3f}B parameters, random weights); "
        f"{report['settings']['tokens_per_step']} tokens per optimizer step"
    )
    print(table(rows))
    line = json.dumps(report, separators=(",", ":"), default=str)
    print(line, flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(line + "\n", encoding="utf-8")
        log(f"JSON written to {out}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
