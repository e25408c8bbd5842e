"""The kopf floor of the operator benchmark: kopf with the operator's settings, doing only what the
bare client does (hack/bench_floor.py: create one Job per FineTuneJob).

Between the bare client and the operator it separates what kopf itself costs (its watch,
per-object workers, diff-base and progress annotations) from what the operator adds.

    python hack/bench_kopf_floor.py NAMESPACE_PATTERN
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import kopf
from bench_floor import job_for
from kubernetes import client, config

from finetune_operator import tuning

_batch: list[client.BatchV1Api] = []


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
    tuning.tune(settings)  # the operator's own kopf settings
    config.load_kube_config()
    _batch.append(client.BatchV1Api())


@kopf.on.create("finetune.dev", "v1alpha1", "finetunejobs")
def create(body: kopf.Body, **_: Any) -> None:
    try:
        response = _batch[0].create_namespaced_job(
            body.metadata.namespace, job_for(dict(body)), _preload_content=False
        )
        _ = response.data  # read to the end: only then may the connection serve another request
        response.release_conn()
    except client.ApiException as exc:
        if exc.status != 409:
            raise


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING)
    kopf.run(standalone=True, namespaces=argv[:1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
