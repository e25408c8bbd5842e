"""Scale benchmark: thousands of FineTuneJobs on a large simulated GPU cluster played by KWOK.

On a local control plane of its own (hack/localcluster.py) with the kwok controller
(hack/kwoksim.py): `--nodes` fake GPU nodes of mixed generations (T4 7.5 … B200 10.0, 1-8 GPUs
each), the operator as its own process, then `--jobs` FineTuneJobs of mixed schemes (bnb-4bit,
bnb-8bit, fp8, nvfp4, none) created at once by 16 client threads. It measures

- the time until every Job exists, and until every job is settled: its training pod bound and
  Running (as KWOK reports it), or the FineTuneJob waiting with `Scheduled=False` and the
  operator's reason (Unschedulable: compatible GPUs exist but are taken; NoCompatibleGPU;
  InsufficientGPUMemory); and until every placed job's own status says Running;
- the operator's CPU seconds and RSS before and after, and KWOK's CPU seconds;
- correctness: duplicates (Jobs per FineTuneJob beyond one), placed pods on a node whose compute
  capability is below the scheme's minimum, waiting jobs although a compatible node has a free GPU.

Not a test: no timing assertions (tests/integration/test_kwok_scale.py asserts the correctness
at a small size).

    python hack/bench_scale.py [--nodes 1000] [--jobs 5000] [--keep-logs DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch

from bench_operator import image_allocator, proc_usage
from finetune_api import ComputeCapability
from finetune_operator.builders import job_name
from gpusim import bind_hostpath_claim
from kwoksim import KWOK_LABEL, create_nodes, kwok_controller, mixed_nodes, wait_ready
from localcluster import LocalCluster, stop_process

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "finetunejobs.finetune.dev.yaml"
NAMESPACE = "scale-jobs"
SCHEMES = ("bnb-4bit", "bnb-8bit", "fp8", "nvfp4", "none")
# The minimum compute capability per scheme, as the README documents it (checked independently of
# the operator's own table).
MINIMUM = {
    "bnb-4bit": ComputeCapability(8, 0),
    "bnb-8bit": ComputeCapability(8, 0),
    "fp8": ComputeCapability(9, 0),
    "nvfp4": ComputeCapability(10, 0),
    "none": ComputeCapability(8, 0),
}
WAIT_REASONS = frozenset({"Unschedulable", "NoCompatibleGPU", "InsufficientGPUMemory"})


def ftj(name: str, scheme: str) -> dict[str, Any]:
    training: dict[str, Any] = (
        {"quantize_model": False, "peft_implementation": "lora"}
        if scheme == "none"
        else {"quantize_model": True, "quantization_scheme": scheme}
    )
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "dataset": {"claimName": "data", "path": "train.jsonl"},
            "output": {"claimName": "out", "path": name},
            "training": training,
        },
    }


@dataclass
class Tracker:
    """What the watches saw, per FineTuneJob name, with the monotonic time of first sighting."""

    by_job: dict[str, str]  # Job name -> FineTuneJob name
    job_seen: dict[str, float] = field(default_factory=dict)  # FineTuneJob -> its Job appeared
    pod_running: dict[str, float] = field(default_factory=dict)  # bound and Running per KWOK
    waiting: dict[str, float] = field(default_factory=dict)  # Scheduled=False, a wait reason
    status_running: dict[str, float] = field(default_factory=dict)  # its status phase Running
    reasons: dict[str, str] = field(default_factory=dict)  # the latest Scheduled=False reason
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_job(self, obj: dict[str, Any]) -> None:
        owner = self.by_job.get(obj["metadata"]["name"])
        if owner is not None:
            with self.lock:
                self.job_seen.setdefault(owner, time.monotonic())

    def on_pod(self, obj: dict[str, Any]) -> None:
        owner = owner_job(self, obj["metadata"].get("labels"))
        running = obj.get("spec", {}).get("nodeName") and obj.get("status", {}).get("phase")
        if owner is not None and running == "Running":
            with self.lock:
                self.pod_running.setdefault(owner, time.monotonic())

    def on_ftj(self, obj: dict[str, Any]) -> None:
        name, status = obj["metadata"]["name"], obj.get("status") or {}
        conditions = {c["type"]: c for c in status.get("conditions") or []}
        scheduled = conditions.get("Scheduled", {})
        now = time.monotonic()
        with self.lock:
            if scheduled.get("status") == "False" and scheduled.get("reason") in WAIT_REASONS:
                self.waiting.setdefault(name, now)
                self.reasons[name] = scheduled["reason"]
            if status.get("phase") == "Running":
                self.status_running.setdefault(name, now)

    def settled(self, name: str) -> float | None:
        """When the job was first placed or waiting with the condition."""
        times = [t for t in (self.pod_running.get(name), self.waiting.get(name)) if t is not None]
        return min(times) if times else None


def owner_job(tracker: Tracker, labels: dict[str, str] | None) -> str | None:
    """The FineTuneJob a pod trains for, from the Job controller's label on it."""
    labels = labels or {}
    return tracker.by_job.get(
        labels.get("batch.kubernetes.io/job-name") or labels.get("job-name", "")
    )


def _watch(list_fn: Callable[..., Any], on_object: Callable[[dict[str, Any]], None]) -> None:
    while True:
        try:
            for event in watch.Watch().stream(list_fn, deserialize=False):
                on_object(event["object"])
        except Exception:  # a dropped or expired watch: list again
            time.sleep(0.2)


def start_watches(api: client.ApiClient, tracker: Tracker) -> None:
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    custom = client.CustomObjectsApi(api)

    def ftjs(**kw: Any) -> Any:
        return custom.list_namespaced_custom_object(
            "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", **kw
        )

    def jobs(**kw: Any) -> Any:
        return batch.list_namespaced_job(NAMESPACE, **kw)

    def pods(**kw: Any) -> Any:
        return core.list_namespaced_pod(NAMESPACE, **kw)

    for fn, handler in ((jobs, tracker.on_job), (pods, tracker.on_pod), (ftjs, tracker.on_ftj)):
        threading.Thread(target=_watch, args=(fn, handler), daemon=True).start()


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.5)


def node_capabilities(core: client.CoreV1Api) -> dict[str, tuple[ComputeCapability, int]]:
    """Our nodes' compute capability (their GFD labels) and allocatable GPUs."""
    found = {}
    for node in core.list_node(label_selector=KWOK_LABEL).items:
        labels = node.metadata.labels
        cap = ComputeCapability(
            int(labels["nvidia.com/gpu.compute.major"]), int(labels["nvidia.com/gpu.compute.minor"])
        )
        found[node.metadata.name] = (cap, int(node.status.allocatable["nvidia.com/gpu"]))
    return found


def check(api: client.ApiClient, schemes: dict[str, str], tracker: Tracker) -> dict[str, Any]:
    """Correctness from a fresh listing of Jobs, pods and nodes."""
    core, batch = client.CoreV1Api(api), client.BatchV1Api(api)
    jobs = batch.list_namespaced_job(NAMESPACE).items
    owners = Counter(j.metadata.owner_references[0].uid for j in jobs)
    nodes = node_capabilities(core)
    used: Counter[str] = Counter()
    misplaced, placed = [], set()
    for pod in core.list_namespaced_pod(NAMESPACE).items:
        owner = owner_job(tracker, pod.metadata.labels)
        node = pod.spec.node_name
        if owner is None or node is None or pod.status.phase in ("Succeeded", "Failed"):
            continue
        used[node] += 1
        if pod.status.phase == "Running":
            placed.add(owner)
        if nodes[node][0] < MINIMUM[schemes[owner]]:
            misplaced.append(f"{owner} ({schemes[owner]}) on {node} ({nodes[node][0]})")
    free = {n: gpus - used[n] for n, (_, gpus) in nodes.items()}
    waiting = [n for n in schemes if n not in placed and n in tracker.waiting]
    starved = [
        n
        for n in waiting
        if any(free[node] > 0 and cap >= MINIMUM[schemes[n]] for node, (cap, _) in nodes.items())
    ]
    return {
        "placed": len(placed),
        "waiting": len(waiting),
        "neither": len(schemes) - len(placed) - len(waiting),
        "duplicates": sum(c - 1 for c in owners.values()),
        "jobs_missing": len(schemes) - len(owners),
        "misplaced": len(misplaced),
        "misplaced_examples": misplaced[:5],
        "waiting_with_free_compatible_gpu": len(starved),
        "gpus": sum(g for _, g in nodes.values()),
        "gpus_used": sum(used.values()),
        "placed_by_scheme": dict(Counter(schemes[n] for n in placed)),
        "waiting_by_scheme": dict(Counter(schemes[n] for n in waiting)),
        "waiting_reasons": dict(Counter(tracker.reasons[n] for n in waiting)),
    }


def prepare(core: client.CoreV1Api, nodes: int, root: Path) -> dict[str, float]:
    """The fleet, Ready per KWOK, and the jobs' namespace with its two claims."""
    fleet = mixed_nodes(nodes)
    t0 = time.monotonic()
    create_nodes(core, fleet)
    ready_s = wait_ready(core, len(fleet))
    labels = {"pod-security.kubernetes.io/enforce": "restricted"}
    meta = client.V1ObjectMeta(name=NAMESPACE, labels=labels)
    core.create_namespace(client.V1Namespace(metadata=meta))
    for claim in ("data", "out"):
        bind_hostpath_claim(core, NAMESPACE, claim, root / "volumes" / claim)
    return {
        "nodes_seconds": round(time.monotonic() - t0, 1),
        "nodes_ready_seconds": round(ready_s, 1),
    }


def burst(
    api: client.ApiClient, jobs: int, operator: int, kwok: int, timeout: float
) -> dict[str, Any]:
    """Create the FineTuneJobs at once, wait for every Job, every job settled, every placed
    job's status; the figures and the correctness check."""
    names = [f"ft-{i:05d}" for i in range(jobs)]
    schemes = {n: SCHEMES[i % len(SCHEMES)] for i, n in enumerate(names)}
    tracker = Tracker(by_job={job_name(n): n for n in names})
    start_watches(api, tracker)
    time.sleep(8)  # the operator started, its caches filled, idle; the watches open
    cpu0, rss0 = proc_usage(operator)
    kwok_cpu0, _ = proc_usage(kwok)
    custom = client.CustomObjectsApi(api)

    def create(name: str) -> None:
        body = ftj(name, schemes[name])
        custom.create_namespaced_custom_object(
            "finetune.dev", "v1alpha1", NAMESPACE, "finetunejobs", body
        )

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(create, names))
    created_s = time.monotonic() - start
    wait_until(lambda: len(tracker.job_seen) >= jobs, timeout, "every Job exists")

    def all_settled() -> bool:
        with tracker.lock:
            return all(tracker.settled(n) is not None for n in names)

    wait_until(all_settled, timeout, "every job placed or waiting")
    settled_s = max(t for n in names if (t := tracker.settled(n)) is not None) - start
    cpu1, rss1 = proc_usage(operator)

    def statuses_written() -> bool:
        with tracker.lock:
            return all(n in tracker.status_running for n in tracker.pod_running)

    wait_until(statuses_written, timeout, "every placed job's status Running")
    cpu2, rss2 = proc_usage(operator)
    kwok_cpu1, kwok_rss = proc_usage(kwok)
    return {
        "create_seconds": round(created_s, 1),
        "all_jobs_seconds": round(max(tracker.job_seen.values()) - start, 1),
        "all_settled_seconds": round(settled_s, 1),
        "all_status_seconds": round(max(tracker.status_running.values(), default=start) - start, 1),
        "operator_cpu_seconds": round(cpu1 - cpu0, 1),
        "operator_cpu_seconds_to_status": round(cpu2 - cpu0, 1),
        "operator_rss_before_mib": round(rss0, 1),
        "operator_rss_after_mib": round(max(rss1, rss2), 1),
        "kwok_cpu_seconds": round(kwok_cpu1 - kwok_cpu0, 1),
        "kwok_rss_mib": round(kwok_rss, 1),
        **check(api, schemes, tracker),
    }


def run(nodes: int, jobs: int, root: Path, timeout: float = 3600) -> dict[str, Any]:
    """One run on a fresh control plane and kwok controller under `root`; the figures."""
    cluster = LocalCluster(root / "cluster").start()
    operator = None
    try:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
        subprocess.run(
            ["kubectl", "apply", "-f", str(CRD)], check=True, capture_output=True, env=env
        )
        api = config.new_client_from_config(str(cluster.kubeconfig))
        with kwok_controller(cluster.kubeconfig, root) as kwok:
            result: dict[str, Any] = {"nodes": nodes, "jobs": jobs}
            result |= prepare(client.CoreV1Api(api), nodes, root)
            log = open(root / "operator.log", "wb")  # noqa: SIM115 - handed to the child
            operator = subprocess.Popen(
                [sys.executable, "-m", "finetune_operator.main", "--namespace", "scale-*"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**env, **image_allocator()},  # as in the operator image
            )
            result |= burst(api, jobs, operator.pid, kwok.pid, timeout)
    finally:
        if operator is not None:
            stop_process(operator, grace=30)
        cluster.stop()
    return result


def table(r: dict[str, Any]) -> str:
    rows = [
        ("GPU nodes (KWOK) / their GPUs", f"{r['nodes']} / {r['gpus']}"),
        ("nodes created and Ready", f"{r['nodes_seconds']} s"),
        ("FineTuneJobs created (16 threads)", f"{r['jobs']} in {r['create_seconds']} s"),
        ("every Job exists", f"{r['all_jobs_seconds']} s"),
        ("every job placed or waiting", f"{r['all_settled_seconds']} s"),
        ("every placed job's status Running", f"{r['all_status_seconds']} s"),
        ("placed (Running) / waiting / neither", f"{r['placed']} / {r['waiting']} / {r['neither']}"),
        ("GPUs in use", f"{r['gpus_used']}"),
        ("operator CPU-s (to settled / to status)",
         f"{r['operator_cpu_seconds']} / {r['operator_cpu_seconds_to_status']}"),
        ("operator RSS before / after", f"{r['operator_rss_before_mib']} / "
         f"{r['operator_rss_after_mib']} MiB"),
        ("kwok CPU-s / RSS", f"{r['kwok_cpu_seconds']} / {r['kwok_rss_mib']} MiB"),
        ("duplicates / Jobs missing", f"{r['duplicates']} / {r['jobs_missing']}"),
        ("placed below the scheme's minimum", f"{r['misplaced']}"),
        ("waiting beside a free compatible GPU", f"{r['waiting_with_free_compatible_gpu']}"),
    ]  # fmt: skip
    return "\n".join(f"  {what:42} {figure}" for what, figure in rows)


def _not_state(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if n in ("etcd", "pki", "volumes")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--timeout", type=float, default=3600, help="per step, seconds")
    parser.add_argument("--keep-logs", type=Path, help="copy the operator's, KWOK's logs here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        try:
            result = run(args.nodes, args.jobs, root, args.timeout)
        finally:
            if args.keep_logs:
                shutil.copytree(root, args.keep_logs, dirs_exist_ok=True, ignore=_not_state)
    print(table(result))
    print(json.dumps({"scale": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
