"""Safe Synthesizer's own `training:` dumps pasted into spec.training pass the real API server's
CRD validation (`kubectl apply --dry-run=server`) unchanged, the model and the trainer's plan; a
lone deprecated warmup_ratio survives the API server (no stored warmup_steps default)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from finetune_api import FineTuneJobSpec
from finetune_trainer.plan import make_plan
from integration.harness import Namespace, ftj_manifest
from safesynth import ours, safe_synthesizer, safe_synthesizer_dumps

pytestmark = pytest.mark.integration


def dry_run(namespace: Namespace, training: dict[str, Any]) -> tuple[int, str, str]:
    result = namespace.cluster.kubectl(
        "apply", "--dry-run=server", "-o", "json", "-n", namespace.name, "-f", "-",
        input=json.dumps(ftj_manifest("pasted", training)), check=False,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


@pytest.mark.parametrize(
    "index", range(4), ids=["defaults", "defaults-json", "every-field", "every-field-json"]
)
def test_safe_synthesizer_dumps_pass_the_api_server_unchanged(
    namespace: Namespace, index: int
) -> None:
    dump = json.loads(json.dumps(safe_synthesizer_dumps()[index]))  # as YAML or JSON carries it
    code, out, err = dry_run(namespace, dump)
    assert code == 0, err
    stored = json.loads(out)["spec"]
    # Nulls (quantization_scheme: null) do not reach storage: kubectl apply drops them; the field
    # is then unset, which is what null means there.
    assert stored["training"] == {k: v for k, v in dump.items() if v is not None}
    assert ours(stored["training"]) == safe_synthesizer(dump)
    spec = FineTuneJobSpec.model_validate(stored)
    assert make_plan(spec.training, dataset_records=500).steps >= 1


@pytest.mark.parametrize(("ratio", "warmup"), [(0.2, 0.2), (2, 2.0)])
def test_a_lone_warmup_ratio_survives_the_api_server(
    namespace: Namespace, ratio: float, warmup: float
) -> None:
    code, out, err = dry_run(namespace, {"warmup_ratio": ratio})
    assert code == 0, err
    stored = json.loads(out)["spec"]
    assert "warmup_steps" not in stored["training"]
    assert FineTuneJobSpec.model_validate(stored).training.warmup_steps == warmup


@pytest.mark.parametrize(
    ("training", "field"),
    [
        # Kubernetes types the fields: Safe Synthesizer's lax coercions stop at the API server.
        ({"lora_r": "16"}, "spec.training.lora_r"),
        ({"batch_size": True}, "spec.training.batch_size"),
        ({"warmup_steps": -1}, "spec.training.warmup_steps"),
        ({"lora_target_modules": []}, "spec.training.lora_target_modules"),
    ],
)
def test_the_api_server_refuses_naming_the_field(
    namespace: Namespace, training: dict[str, Any], field: str
) -> None:
    code, _, err = dry_run(namespace, training)
    assert code != 0
    assert field in err


def test_null_for_a_field_that_is_not_nullable_is_dropped(namespace: Namespace) -> None:
    """The null is dropped (by kubectl apply; the API server would prune it too) and the default
    applies, where Safe Synthesizer refuses null (README: what Kubernetes decides before the
    model)."""
    code, out, err = dry_run(namespace, {"rope_scaling_factor": None})
    assert code == 0, err
    assert json.loads(out)["spec"]["training"]["rope_scaling_factor"] == "auto"
