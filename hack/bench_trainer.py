"""Trainer benchmark: the project's trainer against a plain transformers Trainer + peft script.

    make bench-trainer        # or: hack/bench_trainer.py [--pairs N] [--schemes none,bnb-4bit]
                              #     [--steps N] [--warmup N] [--workdir DIR] [--out FILE]

Builds a 4-layer Llama with random weights and a byte-level BPE tokenizer on the spot
(gpu_check.build_model, reused while its shape is unchanged) and a dataset whose records all fill
maxSequenceLength (gpu_check.write_dataset), so every optimizer step trains on exactly
seq x batch x gradient_accumulation_steps tokens. For each scheme (LoRA without quantization,
bnb-4bit QLoRA; on the CPU) it runs, interleaved (project, plain, project without checkpoints,
project, plain, ...; each a fresh process):

- project: `finetune_trainer.main.main` as `python -m finetune_trainer` runs it in the pod, on the
  TrainerConfig the operator gives the pod (builders.trainer_config_yaml) with the pod's
  environment (builders.build_job: status reporting on, to a local stand-in API server), the
  paths given as flags;
- plain: hack/bench_plain.py, transformers `Trainer` + peft with the same settings (see there);
- project without checkpoints: the same with save_strategy "no", for the cost of the default
  checkpointing.

The default checkpointing's cost is shown two ways: tokens/s against the run without checkpoints
(a difference of two noisy figures), and the share of the project run's steady window spent
saving (from the end of the step, or of its logging, to the Trainer's on_save), measured in the
same run. The default 64 steps leave room for periodic checkpoints after the warm-up.

Each process gets the same probe (a TrainerCallback) and reports: start-up, process start to the
beginning of the first optimizer step; steady tokens/s, the tokens of the steps after the warm-up
ones over the wall-clock time from the end of the last warm-up step to the end of the last step
(data loading, logging, progress reports and checkpoints included); peak RSS (wait4 of the
child); the final loss; and the settings it really trained with, compared between project and
plain. Medians per variant and the ratios are printed as a table and one JSON line
({"trainer": {...}}; --out writes it to a file too). A benchmark, not a test: nothing is
asserted about timings; the exit code is 1 only when a run fails or the settings differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HACK = Path(__file__).resolve().parent
ROOT = HACK.parent
VARIANTS = ("project", "plain", "project-no-checkpoints")
# Path variables of the pod that point into its own volumes: not set here.
POD_PATH_ENV = {"HF_HOME", "TRITON_CACHE_DIR", "TMPDIR"}


def log(message: str) -> None:
    print(f"bench-trainer: {message}", file=sys.stderr, flush=True)


# --- the probe: runs inside each child --------------------------------------------------------


def make_probe() -> Any:
    """A TrainerCallback that records when each optimizer step begins and ends (monotonic clock,
    comparable across processes), the final loss and the settings the run trained with."""
    from transformers import TrainerCallback

    class Probe(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []
            self.startup_cpu: float | None = None
            self.settings: dict[str, Any] = {}
            self.final_loss: float | None = None
            self.saves: list[tuple[int, float, float]] = []  # step, began, ended
            self._mark = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.settings = effective_settings(args, kw.get("model"), kw.get("optimizer"))

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.startup_cpu is None:
                self.startup_cpu = time.process_time()
            self.begins.append(time.monotonic())

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.ends.append(time.monotonic())
            self.cpu_ends.append(time.process_time())
            self._mark = self.ends[-1]

        # A save follows the step's logging and evaluation: its time is from the last of them.
        def on_log(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._mark = time.monotonic()

        def on_evaluate(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._mark = time.monotonic()

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.saves.append((state.global_step, self._mark, time.monotonic()))

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            losses = [entry["loss"] for entry in state.log_history if "loss" in entry]
            self.final_loss = float(losses[-1]) if losses else None

    return Probe()


# TrainingArguments that name places or runs, not how training goes.
_ARGS_IGNORED = {"output_dir", "logging_dir", "run_name", "save_strategy", "hub_token"}


def effective_settings(args: Any, model: Any, optimizer: Any) -> dict[str, Any]:
    """What the run trains with, read from the objects themselves: the TrainingArguments, the
    optimizer, the adapter, gradient checkpointing and the parameters' dtypes."""
    settings: dict[str, Any] = {
        "args": {k: repr(v) for k, v in args.to_dict().items() if k not in _ARGS_IGNORED},
    }
    if optimizer is not None:
        inner = getattr(optimizer, "optimizer", optimizer)
        group = {k: repr(v) for k, v in inner.param_groups[0].items() if k != "params"}
        settings["optimizer"] = {"class": type(inner).__name__, "group": group}
    if model is not None:
        trainable: dict[str, int] = {}
        frozen: dict[str, int] = {}
        for parameter in model.parameters():
            into = trainable if parameter.requires_grad else frozen
            into[str(parameter.dtype)] = into.get(str(parameter.dtype), 0) + parameter.numel()
        peft = getattr(model, "peft_config", {}).get("default")
        settings["model"] = {
            "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
            "training": bool(model.training),
            "trainable": trainable,
            "frozen": frozen,
            "modules": sorted({type(m).__name__ for m in model.modules()}),
            "lora": None
            if peft is None
            else {
                "r": peft.r,
                "alpha": peft.lora_alpha,
                "dropout": peft.lora_dropout,
                "targets": sorted(peft.target_modules),
                "bias": peft.bias,
            },
        }
    return settings


def write_metrics(path: str, probe: Any, exit_code: int) -> None:
    metrics = {
        "exit_code": exit_code,
        "begins": probe.begins,
        "ends": probe.ends,
        "cpu_ends": probe.cpu_ends,
        "startup_cpu_s": probe.startup_cpu,
        "final_loss": probe.final_loss,
        "settings": probe.settings,
        "saves": probe.saves,
    }
    Path(path).write_text(json.dumps(metrics), encoding="utf-8")


def project_worker(metrics_path: str, variant: str, argv: list[str]) -> int:
    """The project's trainer (`finetune_trainer.main.main`, what `python -m finetune_trainer`
    calls) with the probe added to the Trainer it builds; without checkpoints if asked."""
    from finetune_trainer import pipeline
    from finetune_trainer.main import main

    probe = make_probe()
    build = getattr(pipeline, "build_trainer")  # noqa: B009 - mypy: not re-exported
    arguments = getattr(pipeline, "get_training_arguments")  # noqa: B009

    def build_trainer(**kwargs: Any) -> Any:
        kwargs["callbacks"] = [*kwargs["callbacks"], probe]
        return build(**kwargs)

    def get_training_arguments(*args: Any, **kwargs: Any) -> Any:
        from transformers.trainer_utils import SaveStrategy

        result = arguments(*args, **kwargs)
        result.save_strategy = SaveStrategy.NO
        return result

    setattr(pipeline, "build_trainer", build_trainer)  # noqa: B010
    if variant == "project-no-checkpoints":
        setattr(pipeline, "get_training_arguments", get_training_arguments)  # noqa: B010
    code = main(argv)
    write_metrics(metrics_path, probe, code)
    return code


# --- the parent: build, run interleaved, report ------------------------------------------------


def bench_shape() -> Any:
    """A 4-layer Llama: big enough that a step is mostly matrix work, small enough for a CPU."""
    from finetune_operator.memory import ModelShape

    return ModelShape(0.0046, 4, 256, 688, 8, 2, 2048, False)


def prepare_job(scheme: str, settings: Any, workdir: Path) -> tuple[Path, dict[str, str]]:
    """The TrainerConfig file the operator would give the training pod for this scheme, and the
    pod's environment (values only, pod paths left out)."""
    from gpu_check import manifest

    from finetune_api.resource import FineTuneJob
    from finetune_operator.builders import JobIdentity, build_job, trainer_config_yaml
    from finetune_operator.placement import gpu_requirement
    from finetune_operator.settings import Settings

    document = manifest(scheme, settings, "bench-llama")
    document["metadata"]["name"] = f"bench-{scheme}"
    job = FineTuneJob.model_validate(document)
    identity = JobIdentity(job.metadata.name or "bench", "default", "bench-uid", 1)
    operator_settings = Settings()
    requirement = gpu_requirement(job.spec, operator_settings)
    path = workdir / f"trainer-config-{scheme}.yaml"
    path.write_text(trainer_config_yaml(identity, job.spec, requirement), encoding="utf-8")
    pod = build_job(identity, job.spec, requirement, operator_settings)
    container = pod.spec.template.spec.containers[0]
    env = {
        var.name: var.value
        for var in container.env or []
        if var.value is not None and var.name not in POD_PATH_ENV
    }
    return path, env


def run_once(
    variant: str, job: Path, env: dict[str, str], workdir: Path, number: int
) -> dict[str, Any]:
    """One fresh process; its metrics, start-up and peak RSS."""
    out = workdir / "runs" / f"{number:02d}-{variant}"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    metrics = out / "metrics.json"
    paths = ["--model", str(workdir / "model"), "--data", str(workdir / "train.jsonl")]
    paths += ["--output", str(out / "adapter")]
    if variant == "plain":
        command = [sys.executable, str(HACK / "bench_plain.py"), str(metrics), "--job", str(job)]
    else:
        command = [sys.executable, str(Path(__file__)), "--worker", str(metrics), variant, "--"]
        command += ["--job", str(job)]
    child_env = {**os.environ, **env}
    child_env["FINETUNE_TERMINATION_MESSAGE_PATH"] = str(out / "termination.json")
    with (out / "log.txt").open("w", encoding="utf-8") as stream:
        spawned = time.monotonic()
        process = subprocess.Popen(
            [*command, *paths], stdout=stream, stderr=subprocess.STDOUT, env=child_env
        )
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        finished = time.monotonic()
    result: dict[str, Any] = {
        "variant": variant,
        "exit_code": process.returncode,
        "wall_s": round(finished - spawned, 3),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
    }
    if process.returncode != 0 or not metrics.is_file():
        lines = (out / "log.txt").read_text(errors="replace").strip().splitlines()
        result["error"] = lines[-1] if lines else "no output"
        return result
    measured = json.loads(metrics.read_text())
    result["final_loss"] = measured["final_loss"]
    result["settings"] = measured["settings"]
    result["startup_s"] = round(measured["begins"][0] - spawned, 3)
    result["startup_cpu_s"] = round(measured["startup_cpu_s"], 3)
    result["steps"] = len(measured["ends"])
    result["ends"] = measured["ends"]
    result["cpu_ends"] = measured["cpu_ends"]
    result["saves"] = measured["saves"]
    return result


def steady_tokens_per_s(ends: list[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens of the steps after `warmup` over the wall clock from the end of the last warm-up
    step to the end of the last step."""
    return tokens_per_step * (len(ends) - warmup) / (ends[-1] - ends[warmup - 1])


def saving_share(ends: list[float], saves: list[list[float]], warmup: int) -> float:
    """The share of the steady window (as steady_tokens_per_s measures it) spent saving
    checkpoints: the saves that began and ended inside it (the last step's save comes after)."""
    start, end = ends[warmup - 1], ends[-1]
    inside = sum(ended - began for _, began, ended in saves if start <= began and ended <= end)
    return inside / (end - start)


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two settings trees differ, as dotted paths with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            found += differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        return found
    return [] if a == b else [f"{where}: project {a!r}, plain {b!r}"]


def median(values: list[float], digits: int = 3) -> float | None:
    return round(statistics.median(values), digits) if values else None


def summarize(runs: list[dict[str, Any]], warmup: int, tokens_per_step: int) -> dict[str, Any]:
    """Medians per variant and the ratios project / plain and checkpoints / none."""
    by_variant: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant and "ends" in r]
        for run in mine:
            run["tokens_per_s"] = round(steady_tokens_per_s(run["ends"], warmup, tokens_per_step))
            run["tokens_per_cpu_s"] = round(
                steady_tokens_per_s(run["cpu_ends"], warmup, tokens_per_step)
            )
            run["saving_share"] = saving_share(run["ends"], run["saves"], warmup)
        by_variant[variant] = {
            "runs": len(mine),
            "failed": sum(1 for r in runs if r["variant"] == variant and "ends" not in r),
            "tokens_per_s": median([r["tokens_per_s"] for r in mine]),
            "tokens_per_cpu_s": median([r["tokens_per_cpu_s"] for r in mine]),
            "startup_s": median([r["startup_s"] for r in mine]),
            "startup_cpu_s": median([r["startup_cpu_s"] for r in mine]),
            "peak_rss_mib": median([r["peak_rss_mib"] for r in mine]),
            "final_loss": median([r["final_loss"] for r in mine if r["final_loss"] is not None]),
            "wall_s": median([r["wall_s"] for r in mine]),
            "checkpoints": median([float(len(r["saves"])) for r in mine]),
            "saving_share": median([r["saving_share"] for r in mine], 4),
        }
    project, plain = by_variant["project"], by_variant["plain"]
    unsaved = by_variant["project-no-checkpoints"]

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 3) if a and b else None

    settings = {r["variant"]: r["settings"] for r in runs if "settings" in r}
    diff = differences(settings.get("project"), settings.get("plain"))
    return {
        **by_variant,
        "throughput_vs_plain": ratio(project["tokens_per_s"], plain["tokens_per_s"]),
        "cpu_throughput_vs_plain": ratio(project["tokens_per_cpu_s"], plain["tokens_per_cpu_s"]),
        "startup_minus_plain_s": round(project["startup_s"] - plain["startup_s"], 3)
        if project["startup_s"] is not None and plain["startup_s"] is not None
        else None,
        "startup_cpu_minus_plain_s": round(project["startup_cpu_s"] - plain["startup_cpu_s"], 3)
        if project["startup_cpu_s"] is not None and plain["startup_cpu_s"] is not None
        else None,
        "peak_rss_vs_plain": ratio(project["peak_rss_mib"], plain["peak_rss_mib"]),
        "checkpoint_cost": None
        if ratio(project["tokens_per_s"], unsaved["tokens_per_s"]) is None
        else round(1 - project["tokens_per_s"] / unsaved["tokens_per_s"], 3),
        "checkpoint_time_share": project["saving_share"],
        "settings_differences": diff,
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    header = (
        "scheme",
        "variant",
        "runs",
        "tok/s",
        "tok/CPU-s",
        "start-up s",
        "start-up CPU-s",
        "peak RSS MiB",
        "final loss",
    )
    lines = [header]
    for scheme, summary in results.items():
        for variant in VARIANTS:
            row = summary[variant]
            if not row["runs"] and not row["failed"]:
                continue
            lines.append(
                (
                    scheme,
                    variant,
                    f"{row['runs']}" + (f" ({row['failed']} failed)" if row["failed"] else ""),
                    str(row["tokens_per_s"]),
                    str(row["tokens_per_cpu_s"]),
                    str(row["startup_s"]),
                    str(row["startup_cpu_s"]),
                    str(row["peak_rss_mib"]),
                    str(row["final_loss"]),
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    for scheme, summary in results.items():
        text.append(
            f"{scheme}: project/plain tokens/s {summary['throughput_vs_plain']} (per CPU-second "
            f"{summary['cpu_throughput_vs_plain']}), start-up "
            f"{summary['startup_minus_plain_s']:+} s ({summary['startup_cpu_minus_plain_s']:+} "
            f"CPU-s), peak RSS {summary['peak_rss_vs_plain']}; "
            f"default checkpointing costs {summary['checkpoint_cost']} of tokens/s (against the "
            f"run without; {summary['checkpoint_time_share']} of the steady time spent saving, "
            f"{summary['project']['checkpoints']} checkpoints a run); settings "
            + ("agree" if not summary["settings_differences"] else "DIFFER")
        )
        text += [f"  {line}" for line in summary["settings_differences"]]
    return "\n".join(text)


def machine() -> dict[str, Any]:
    import importlib.metadata as md
    import platform

    with open("/proc/loadavg", encoding="utf-8") as stream:
        load = [float(value) for value in stream.read().split()[:3]]
    versions: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            cpu = next(line.split(":", 1)[1].strip() for line in stream if "model name" in line)
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_avg": load, "versions": versions}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench-trainer", description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=3, help="interleaved rounds per scheme")
    parser.add_argument("--schemes", default="none,bnb-4bit")
    parser.add_argument("--seq", type=int, default=64, help="maxSequenceLength")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=64, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of tokens/s")
    parser.add_argument(
        "--checkpoint-cost",
        default="none,bnb-4bit",
        help="schemes that also run without checkpoints (for the cost of checkpointing)",
    )
    parser.add_argument(
        "--workdir", default=os.environ.get("BENCH_DIR", "/tmp/finetune-bench-trainer")
    )
    parser.add_argument("--out", default=os.environ.get("BENCH_TRAINER_OUT"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--worker"]:
        return project_worker(argv[1], argv[2], argv[4:])
    sys.path.insert(0, str(ROOT / "tests"))  # the stand-in API server of the training tests
    from gpu_check import Settings, build_model, write_dataset

    from training.fake_apiserver import fake_apiserver

    args = parse_args(argv)
    settings = Settings("bench-llama", args.seq, args.batch, args.grad_accum, args.steps, 0)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    built = build_model(workdir / "model", bench_shape())
    write_dataset(workdir / "train.jsonl", workdir / "model", settings)
    schemes = [s for s in args.schemes.split(",") if s]
    before = machine()
    results: dict[str, dict[str, Any]] = {}
    failed = False
    with fake_apiserver(workdir) as (recorder, kubeconfig):
        number = 0
        for scheme in schemes:
            job, env = prepare_job(scheme, settings, workdir)
            env["KUBECONFIG"] = str(kubeconfig)
            runs = []
            variants = VARIANTS if scheme in args.checkpoint_cost.split(",") else VARIANTS[:2]
            for round_ in range(args.pairs):
                for variant in variants:
                    number += 1
                    run = run_once(variant, job, env, workdir, number)
                    runs.append(run)
                    log(
                        f"{scheme} round {round_ + 1}/{args.pairs} {variant}: "
                        + (
                            f"start-up {run['startup_s']} s, "
                            f"{steady_tokens_per_s(run['ends'], args.warmup, settings.tokens_per_step):.0f} "
                            f"tok/s, peak RSS {run['peak_rss_mib']} MiB, loss {run['final_loss']}"
                            if "ends" in run
                            else f"FAILED: {run['error']}"
                        )
                    )
            results[scheme] = summarize(runs, args.warmup, settings.tokens_per_step)
            failed = failed or bool(results[scheme]["settings_differences"])
            failed = failed or any("ends" not in r for r in runs)
        patches = len(recorder.requests)
    report = {
        "trainer": {
            "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "machine": {**before, "load_avg_after": machine()["load_avg"]},
            "model": {"layers": bench_shape().layers, **built},
            "settings": {
                "seq": args.seq,
                "batch": args.batch,
                "grad_accum": args.grad_accum,
                "steps": args.steps,
                "warmup": args.warmup,
                "tokens_per_step": settings.tokens_per_step,
                "pairs": args.pairs,
            },
            "status_patches_received": patches,
            "schemes": results,
        }
    }
    print(table(results))
    line = json.dumps(report, separators=(",", ":"))
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n", encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
