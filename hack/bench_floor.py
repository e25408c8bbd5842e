"""The floor of the operator benchmark: the least a controller can do for a FineTuneJob.

A bare client on the official kubernetes client, as a separate process like the operator: it
watches FineTuneJobs in the namespaces given and, for each one added, creates one Job (owned by
it, the same pod template shape the operator makes). No validation, no status, no other children:
what is left of apply → Job when everything the product adds is taken away.

    python hack/bench_floor.py KUBECONFIG NAMESPACE_PREFIX
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kubernetes import client, config, watch

from finetune_operator.builders import job_name


def job_for(ftj: dict[str, Any]) -> dict[str, Any]:
    meta = ftj["metadata"]
    owner = {
        "apiVersion": ftj["apiVersion"],
        "kind": "FineTuneJob",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    container = {
        "name": "trainer",
        "image": "ghcr.io/example/finetune-trainer:bench",
        "args": ["--config", "/etc/finetune/config.json"],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(meta["name"]),
            "ownerReferences": [owner],
            "labels": {"finetune.dev/job-uid": meta["uid"]},
        },
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": {"finetune.dev/job-uid": meta["uid"]}},
                "spec": {"restartPolicy": "Never", "containers": [container]},
            },
        },
    }


def main(argv: list[str]) -> int:
    kubeconfig, prefix = argv
    config.load_kube_config(kubeconfig)
    custom = client.CustomObjectsApi()
    batch = client.BatchV1Api()
    pool = ThreadPoolExecutor(max_workers=8)

    def create(ftj: dict[str, Any]) -> None:
        try:
            batch.create_namespaced_job(ftj["metadata"]["namespace"], job_for(ftj))
        except client.ApiException as exc:
            if exc.status != 409:
                print(f"create failed: {exc.status} {exc.reason}", file=sys.stderr, flush=True)

    print("ready", flush=True)
    stream = watch.Watch().stream(
        custom.list_cluster_custom_object, "finetune.dev", "v1alpha1", "finetunejobs"
    )
    for event in stream:
        ftj = event["object"]
        if event["type"] == "ADDED" and ftj["metadata"]["namespace"].startswith(prefix):
            pool.submit(create, ftj)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
