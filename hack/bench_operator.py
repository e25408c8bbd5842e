"""Operator benchmark: apply → Job latency against a bare client, and a burst of FineTuneJobs.

On one local control plane (hack/localcluster.py), in one run:

1. the floor: hack/bench_floor.py (watch FineTuneJobs, create a Job; nothing else) gets
   `--latency-jobs` FineTuneJobs, `--spacing` seconds apart;
2. the operator gets the same, in a namespace of its own;
3. the operator gets `--burst` FineTuneJobs created at once (16 client threads): the time until
   every Job exists, until every status is written, duplicates (Jobs per FineTuneJob beyond one),
   the operator's CPU seconds and its RSS before and after.

Latency is measured from just before the create request of the FineTuneJob to the moment a watch
on Jobs sees its Job, in this process with one monotonic clock, the same way for both.

    python hack/bench_operator.py [--latency-jobs 60] [--spacing 0.1] [--burst 1000] [--json-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from finetune_operator.builders import job_name
from localcluster import LocalCluster, stop_process

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "finetunejobs.finetune.dev.yaml"
PAGE = 4096  # /proc/<pid>/stat counts memory in pages, CPU in clock ticks
TICKS = 100


def ftj(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"claimName": "data", "path": "train.jsonl"},
            "output": {"claimName": "out", "path": name},
            "training": {"quantize_model": True, "quantization_scheme": "bnb-4bit"},
        },
    }


@dataclass
class Seen:
    """First sighting (monotonic seconds) of each Job and of each FineTuneJob's status."""

    jobs: dict[tuple[str, str], float] = field(default_factory=dict)
    job_owners: dict[tuple[str, str], str] = field(default_factory=dict)
    statuses: dict[tuple[str, str], float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _watch_forever(list_fn: Callable[..., Any], on_event: Callable[[dict[str, Any]], None]) -> None:
    while True:
        try:
            for event in watch.Watch().stream(list_fn, deserialize=False):
                on_event(event)
        except Exception:  # a watch that times out or drops is resumed by listing again
            time.sleep(0.2)


def start_watches(api: client.ApiClient, seen: Seen) -> None:
    batch, custom = client.BatchV1Api(api), client.CustomObjectsApi(api)

    def on_job(event: dict[str, Any]) -> None:
        obj = event["object"]
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        owners = [o["uid"] for o in meta.get("ownerReferences", [])]
        with seen.lock:
            seen.jobs.setdefault(key, time.monotonic())
            seen.job_owners[key] = owners[0] if owners else ""

    def on_ftj(event: dict[str, Any]) -> None:
        obj = event["object"]
        if obj.get("status"):
            meta = obj["metadata"]
            with seen.lock:
                seen.statuses.setdefault((meta["namespace"], meta["name"]), time.monotonic())

    def list_ftjs(**kwargs: Any) -> Any:
        return custom.list_cluster_custom_object(
            "finetune.dev", "v1alpha1", "finetunejobs", **kwargs
        )

    for fn, handler in ((batch.list_job_for_all_namespaces, on_job), (list_ftjs, on_ftj)):
        threading.Thread(target=_watch_forever, args=(fn, handler), daemon=True).start()


def proc_usage(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MiB) of a process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / TICKS
    rss = int(fields[21]) * PAGE / 2**20
    return cpu, rss


def peak_rss(pid: int) -> float:
    """The process's peak RSS so far, MiB (VmHWM): what a memory limit must hold."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, cluster: LocalCluster, api: client.ApiClient) -> None:
        self.cluster = cluster
        self.api = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.seen = Seen()
        start_watches(api, self.seen)

    def namespace(self, name: str) -> str:
        labels = {"pod-security.kubernetes.io/enforce": "restricted"}
        self.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )
        return name

    def create(self, namespace: str, name: str) -> float:
        started = time.monotonic()
        self.custom.create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", namespace, "finetunejobs", ftj(name)
        )
        return started

    def wait(self, what: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not what():
            if time.monotonic() > deadline:
                raise TimeoutError("benchmark step did not finish in time")
            time.sleep(0.05)

    def latency(self, namespace: str, count: int, spacing: float) -> list[float]:
        """Milliseconds from create to Job seen, for `count` FineTuneJobs `spacing` apart."""
        starts = {}
        for i in range(count):
            name = f"lat-{i:04d}"
            starts[name] = self.create(namespace, name)
            time.sleep(spacing)
        keys = {name: (namespace, job_name(name)) for name in starts}
        self.wait(lambda: all(k in self.seen.jobs for k in keys.values()), 120)
        return [(self.seen.jobs[keys[n]] - t) * 1000 for n, t in starts.items()]

    def burst(
        self, namespace: str, count: int, pid: int, statuses: bool, wait_window: bool = True
    ) -> dict[str, Any]:
        names = [f"burst-{i:05d}" for i in range(count)]
        cpu0, rss0 = proc_usage(pid)
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(lambda n: self.create(namespace, n), names))
        created = time.monotonic() - t0

        def jobs_in_ns() -> list[tuple[str, str]]:
            with self.seen.lock:
                return [k for k in self.seen.jobs if k[0] == namespace]

        def statuses_in_ns() -> int:
            with self.seen.lock:
                return sum(1 for k in self.seen.statuses if k[0] == namespace)

        self.wait(lambda: len(jobs_in_ns()) >= count, 900)
        all_jobs = max(self.seen.jobs[k] for k in jobs_in_ns()) - t0
        all_status = None
        if statuses:  # the floors write none
            self.wait(lambda: statuses_in_ns() >= count, 900)
            all_status = max(t for k, t in self.seen.statuses.items() if k[0] == namespace) - t0
        cpu1, _ = proc_usage(pid)
        quiet = settle(pid)  # the rest of the work the burst caused (pods' changes, Events)
        cpu2, rss1 = proc_usage(pid)
        waiting = None
        if statuses and wait_window:  # the burst's jobs wait (no node can take them): their cost?
            time.sleep(WAITING_WINDOW_SECONDS)
            waiting = (proc_usage(pid)[0] - cpu2) * 60 / WAITING_WINDOW_SECONDS
        jobs = client.BatchV1Api(self.api).list_namespaced_job(namespace).items
        owners = [j.metadata.owner_references[0].uid for j in jobs]
        return {
            "jobs": count,
            "create_seconds": round(created, 2),
            "all_jobs_seconds": round(all_jobs, 2),
            "jobs_per_second": round(count / all_jobs, 1),
            "all_status_seconds": None if all_status is None else round(all_status, 2),
            "duplicates": len(owners) - len(set(owners)),
            "missing": count - len(set(owners)),
            "cpu_seconds": round(cpu1 - cpu0, 1),
            "settled_seconds": round(quiet - t0, 1),
            "settled_cpu_seconds": round(cpu2 - cpu0, 1),
            "rss_before_mib": round(rss0, 1),
            "rss_after_mib": round(rss1, 1),
            "rss_peak_mib": round(peak_rss(pid), 1),
            "waiting_cpu_seconds_per_minute": None if waiting is None else round(waiting, 2),
        }


# How long the operator is watched while the burst's jobs wait for a node: two periodic checks.
WAITING_WINDOW_SECONDS = 61
QUIET_CPU_SECONDS = 0.1  # a controller that used less in QUIET_WINDOW_SECONDS has settled
QUIET_WINDOW_SECONDS = 5.0


def settle(pid: int, timeout: float = 900) -> float:
    """Wait until the process has settled (the monotonic time it had): at least 10 s, then
    until a window of QUIET_WINDOW_SECONDS costs it less than QUIET_CPU_SECONDS."""
    time.sleep(10)
    last = proc_usage(pid)[0]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(QUIET_WINDOW_SECONDS)
        now = proc_usage(pid)[0]
        if now - last < QUIET_CPU_SECONDS:
            return time.monotonic() - QUIET_WINDOW_SECONDS
        last = now
    raise TimeoutError("the controller did not settle")


def summary(ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 0.99), 1),
        "max_ms": round(max(ms), 1),
    }


# The operator image's allocator (Dockerfile, operator stage): jemalloc preloaded, Python's
# allocations handed to it. The benchmark runs the operator with it, as the image does.
IMAGE_ALLOCATOR = {"LD_PRELOAD": "libjemalloc.so.2", "PYTHONMALLOC": "malloc"}


def image_allocator() -> dict[str, str]:
    """IMAGE_ALLOCATOR with the path of this machine's jemalloc (Debian's libjemalloc2, which
    `make setup` installs)."""
    name = IMAGE_ALLOCATOR["LD_PRELOAD"]
    found = sorted(Path("/usr/lib").glob(f"*/{name}")) + sorted(Path("/usr/lib").glob(name))
    if not found:
        raise SystemExit(
            f"bench: {name} not found under /usr/lib: the operator image runs on jemalloc "
            "(apt-get install libjemalloc2, or make setup)"
        )
    return {**IMAGE_ALLOCATOR, "LD_PRELOAD": str(found[0])}


def controllers(kubeconfig: Path) -> dict[str, list[str]]:
    """What runs in each phase, by the namespace prefix it serves."""
    hack = REPO / "hack"
    return {
        "floor": [sys.executable, str(hack / "bench_floor.py"), str(kubeconfig), "floor-"],
        "kopf": [sys.executable, str(hack / "bench_kopf_floor.py"), "kopf-*"],
        "op": [sys.executable, "-m", "finetune_operator.main", "--namespace", "op-*"],
    }


def phase(
    bench: Bench, name: str, argv: list[str], args: argparse.Namespace, root: Path
) -> dict[str, Any]:
    """Start one controller, let it idle, then the spaced jobs and the burst; stop it."""
    log = open(root / f"{name}.log", "wb")  # noqa: SIM115 - handed to the child process
    env = {**os.environ, "KUBECONFIG": str(bench.cluster.kubeconfig)}
    if name == "op":
        env.update(image_allocator())
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    profiler = None
    try:
        time.sleep(8)  # started, caches filled, idle
        _, rss_idle = proc_usage(proc.pid)
        latency = bench.latency(bench.namespace(f"{name}-lat"), args.latency_jobs, args.spacing)
        if args.profile and name == "op":  # py-spy, sampling the operator through the burst
            profiler = subprocess.Popen(
                ["py-spy", "record", "--gil", "--nonblocking", "--format", "raw", "-o",
                 str(args.profile), "--pid", str(proc.pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        burst = bench.burst(
            bench.namespace(f"{name}-burst"), args.burst, proc.pid, statuses=name == "op"
        )
        if name == "op":  # as many again: does memory keep growing with the jobs it holds?
            burst["second"] = bench.burst(
                bench.namespace(f"{name}-burst2"), args.burst, proc.pid, True, wait_window=False
            )
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(timeout=60)
        stop_process(proc, grace=30)
    return {"latency": summary(latency), "burst": burst, "rss_idle_mib": round(rss_idle, 1)}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    cluster = LocalCluster(root / "cluster").start()
    try:
        subprocess.run(
            ["kubectl", "--kubeconfig", str(cluster.kubeconfig), "apply", "-f", str(CRD)],
            check=True,
            capture_output=True,
        )
        bench = Bench(cluster, config.new_client_from_config(str(cluster.kubeconfig)))
        time.sleep(2)  # the CRD is served and the watches are open
        phases = {
            name: phase(bench, name, argv, args, root)
            for name, argv in controllers(cluster.kubeconfig).items()
        }
    finally:
        cluster.stop()
    floor, kopf_floor, op = phases["floor"], phases["kopf"], phases["op"]
    return {
        "latency": {
            "jobs": args.latency_jobs,
            "spacing_s": args.spacing,
            "floor": floor["latency"],
            "kopf_floor": kopf_floor["latency"],
            "operator": op["latency"],
            "p50_ratio": round(op["latency"]["p50_ms"] / floor["latency"]["p50_ms"], 2),
            "p99_ratio": round(op["latency"]["p99_ms"] / floor["latency"]["p99_ms"], 2),
            "kopf_floor_p50_ratio": round(
                kopf_floor["latency"]["p50_ms"] / floor["latency"]["p50_ms"], 2
            ),
        },
        "burst": op["burst"],
        "floor_burst": floor["burst"],
        "kopf_floor_burst": kopf_floor["burst"],
        "rss_idle_mib": op["rss_idle_mib"],
        "kopf_floor_rss_idle_mib": kopf_floor["rss_idle_mib"],
    }


def _not_logs(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("etcd", "pki")]


# The targets, as (what, figure, limit, whether lower is better).
def targets(result: dict[str, Any]) -> list[tuple[str, float, float, bool]]:
    lat, burst = result["latency"], result["burst"]
    per_1000 = 1000 / burst["jobs"]
    grown = (burst["rss_after_mib"] - burst["rss_before_mib"]) * per_1000
    return [
        ("apply->Job p50, x the bare client", lat["p50_ratio"], 2.0, True),
        ("apply->Job p99, x the bare client", lat["p99_ratio"], 3.0, True),
        ("burst: Jobs per second", burst["jobs_per_second"], 40.0, False),
        (
            "burst: every status written, s per 1,000",
            burst["all_status_seconds"] * per_1000,
            30,
            True,
        ),
        ("burst: operator CPU-s per 1,000 jobs", burst["cpu_seconds"] * per_1000, 20.0, True),
        (
            "  the same, until settled",
            burst["settled_cpu_seconds"] * per_1000,
            20.0,
            True,
        ),
        ("operator RSS idle, MiB", result["rss_idle_mib"], 150.0, True),
        ("operator RSS growth per 1,000 jobs, MiB", grown, 50.0, True),
        ("burst: duplicate Jobs", burst["duplicates"], 0, True),
    ]


def table(result: dict[str, Any]) -> str:
    lat = result["latency"]
    lines = [f"apply->Job over {lat['jobs']} jobs {lat['spacing_s']} s apart, and a burst:"]
    for what, key, burst in (
        ("bare client", "floor", "floor_burst"),
        ("kopf, create only", "kopf_floor", "kopf_floor_burst"),
        ("operator", "operator", "burst"),
    ):
        b = result[burst]
        lines.append(
            f"  {what:18} p50 {lat[key]['p50_ms']:8.1f} ms  p99 {lat[key]['p99_ms']:8.1f} ms  "
            f"burst {b['jobs_per_second']:6.1f} Jobs/s  {b['cpu_seconds']:6.1f} CPU-s"
        )
    lines += [
        f"{'measure':44} {'figure':>10} {'target':>8}  met",
    ]
    for what, figure, limit, lower in targets(result):
        met = figure <= limit if lower else figure >= limit
        bound = "<=" if lower else ">="
        lines.append(f"{what:44} {figure:10.1f} {bound}{limit:6.0f}  {'yes' if met else 'NO'}")
    burst = result["burst"]
    lines.append(
        f"operator settled {burst['settled_seconds']:.0f} s after the burst began; then, while "
        f"its {burst['jobs']} jobs wait for a node: "
        f"{burst['waiting_cpu_seconds_per_minute']:.2f} CPU-s per minute; its peak RSS "
        f"{burst['rss_peak_mib']:.0f} MiB"
    )
    second = burst.get("second")
    if second is not None:
        lines.append(
            f"a second burst of {second['jobs']} (the operator then holds {2 * second['jobs']} "
            f"jobs): {second['jobs_per_second']:.1f} Jobs/s, {second['cpu_seconds']:.1f} CPU-s, "
            f"RSS {second['rss_before_mib']:.0f} -> {second['rss_after_mib']:.0f} MiB "
            f"(peak {second['rss_peak_mib']:.0f})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=60)
    parser.add_argument("--spacing", type=float, default=0.1)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--profile", type=Path, help="py-spy the operator during the burst")
    parser.add_argument(
        "--keep-logs", type=Path, help="copy the operator's and the cluster's logs here"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        root = Path(tmp)
        try:
            result = run(args, root)
        finally:
            if args.keep_logs:
                shutil.copytree(root, args.keep_logs, dirs_exist_ok=True, ignore=_not_logs)
    result["met"] = {
        what: (figure <= limit if lower else figure >= limit)
        for what, figure, limit, lower in targets(result)
    }
    print(table(result))
    print(json.dumps({"operator": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
