"""Fault-and-fuzz (issue 14): hundreds of generated bad FineTuneJobs, sent as users send them
(`kubectl apply --server-side`, and `kubectl apply --validate=false`), each end refused at apply
naming the field, or with a Validated=False / ChildrenReady=False condition, never with a Job,
never without a status; and the operator killed during a burst makes no duplicate."""

from __future__ import annotations

import copy
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from finetune_api import FineTuneJob
from gpusim import FakeKubelet
from integration.harness import (
    Cluster,
    Namespace,
    Operator,
    ftj_manifest,
    make_namespace,
    remove_namespace,
    wait_for,
)
from integration.policies import MESSAGE, refusing_images

pytestmark = pytest.mark.integration
MIN_CASES = 300
Mutation = Callable[[dict[str, Any]], None]


def put(path: str, value: Any) -> Mutation:
    """Set spec.<path> (dotted, camelCase as on the wire) to value, creating parents."""

    def mutate(spec: dict[str, Any]) -> None:
        node = spec
        *parents, last = path.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value

    return mutate


def toleration(**fields: Any) -> Mutation:
    return put("placement.tolerations", [fields])


BAD: list[tuple[str, Mutation]] = [
    *[(f"secret key {k!r}", put("model.hub.tokenSecretRef", {"name": "hf", "key": k}))
      for k in (".", "..", "..x", "a b", "a/b", "", "k" * 254)],
    *[(f"secret name {n!r}", put("model.hub.tokenSecretRef", {"name": n}))
      for n in ("Bad_Name", "", "a" * 254)],
    ("hub id differs", put("model.hub.id", "other/model")),
    ("hub id empty", put("model.hub.id", "")),
    *[(f"revision {r!r}", put("model.hub.revision", r)) for r in ("", "a b", "r" * 257)],
    ("volume without claim", put("model.volume", {"path": "x"})),
    ("volume escapes", put("model.volume", {"claimName": "m", "path": "../x"})),
    ("volume absolute", put("model.volume", {"claimName": "m", "path": "/x"})),
    ("hub and volume", put("model", {"hub": {}, "volume": {"claimName": "m", "path": "x"}})),
    *[(f"parametersBillions {v!r}", put("model.parametersBillions", v)) for v in (0, -1, "7")],
    *[(f"claimName {v!r}", put("dataset.claimName", v)) for v in ("Data", "", "a_b", "a" * 254)],
    *[(f"dataset path {v!r}", put("dataset.path", v))
      for v in ("t.txt", "../t.jsonl", "/t.jsonl", "", "a/../../t.csv", "p" * 4097)],
    *[(f"format {v!r}", put("dataset.format", v)) for v in ("txt", "", "JSONL")],
    ("prompt without completion",
     put("dataset", {"claimName": "data", "path": "t.jsonl", "promptField": "q"})),
    ("text and prompt", put("dataset", {"claimName": "data", "path": "t.jsonl", "textField": "t",
                                        "promptField": "q", "completionField": "a"})),
    *[(f"maxSequenceLength {v!r}", put("dataset.maxSequenceLength", v))
      for v in (15, 1_048_577, "2048", 0)],
    *[(f"output path {v!r}", put("output.path", v)) for v in ("..", "/x", "a/..", "o" * 4097)],
    *[(f"gpus {v!r}", put("resources.gpus", v)) for v in (0, 17, -1, "1", 1.5)],
    *[(f"nodes {v!r}", put("resources.nodes", v)) for v in (0, 65, -1, "2", 1.5)],
    *[(f"sameGPUProduct {v!r}", put("placement.sameGPUProduct", v)) for v in ("yes", 1)],
    *[(f"cpu {v!r}", put("resources.cpu", v)) for v in ("-2", -1, "x", "1..0", "9" * 65, True)],
    *[(f"memory {v!r}", put("resources.memory", v)) for v in ("-48Gi", "Gi", "lots", -5, "1 Gi")],
    *[(f"nodeSelector {json!r}", put("placement.nodeSelector", json)) for json in (
        {"bad key": "x"}, {"a" * 64: "x"}, {"-a": "x"}, {"zone": "a b"}, {"zone": "v" * 64},
        {"zone": 1}, {f"k{i}": "v" for i in range(65)}, {"p" * 254 + "/n": "v"}, {"a/b/c": "v"},
        {"zone": "-x"},
    )],
    ("toleration Exists with value", toleration(key="k", operator="Exists", value="v")),
    ("tolerationSeconds with NoSchedule",
     toleration(key="k", effect="NoSchedule", tolerationSeconds=5)),
    ("tolerationSeconds without effect", toleration(key="k", tolerationSeconds=5)),
    ("empty key with Equal", toleration(operator="Equal", value="v")),
    ("empty key without operator", toleration(effect="NoSchedule")),
    ("toleration key 'bad key'", toleration(key="bad key", operator="Exists")),
    ("toleration value 'bad value'", toleration(key="k", value="bad value")),
    ("toleration operator Lt", toleration(key="k", operator="Lt", value="1")),
    ("toleration effect Sometimes", toleration(key="k", operator="Exists", effect="Sometimes")),
    ("tolerationSeconds -1", toleration(key="k", effect="NoExecute", tolerationSeconds=-1)),
    ("33 tolerations", put("placement.tolerations", [{"key": f"k{i}"} for i in range(33)])),
    *[(f"priorityClassName {v!r}", put("placement.priorityClassName", v))
      for v in ("Bad_Name", "", "a" * 254, "a b")],
    *[(f"image {v!r}", put("image", v)) for v in ("", " trainer:1 ", "a b", "x" * 4097, "t\n")],
    *[(f"backoffLimit {v!r}", put("backoffLimit", v)) for v in (-1, 101, "2")],
    *[(f"activeDeadlineSeconds {v!r}", put("activeDeadlineSeconds", v)) for v in (0, -5, 2**31)],
    *[(f"suspend {v!r}", put("suspend", v)) for v in ("yes", 1)],
    *[(f"lora_r {v!r}", put("training.lora_r", v)) for v in (0, -1, "16")],
    *[(f"lora_alpha_over_r {v!r}", put("training.lora_alpha_over_r", v)) for v in (0, 0.4, 4)],
    *[(f"learning_rate {v!r}", put("training.learning_rate", v)) for v in (3, 0, "fast")],
    *[(f"quantization_scheme {v!r}", put("training.quantization_scheme", v))
      for v in ("int4", "", "BNB-4BIT")],
    # Any peft_implementation is valid (as in Safe Synthesizer), up to the CRD's bound.
    ("peft_implementation too long", put("training.peft_implementation", "p" * 257)),
    ("lr_scheduler exp", put("training.lr_scheduler", "exp")),
    ("nvfp4 with loftq", put("training", {"quantize_model": True, "quantization_scheme": "nvfp4",
                                          "peft_implementation": "loftq"})),
    ("warmup_steps 1.5", put("training.warmup_steps", 1.5)),
    ("plateau without validation", put("training.lr_scheduler", "reduce_lr_on_plateau")),
    *[(f"num_input_records_to_sample {v!r}", put("training.num_input_records_to_sample", v))
      for v in (0, "many", -1)],
    ("batch_size 0", put("training.batch_size", 0)),
    *[(f"pretrained_model {v!r}", put("training.pretrained_model", v)) for v in ("", "m" * 4097)],
    ("65 target modules", put("training.lora_target_modules", [f"m{i}" for i in range(65)])),
    ("target module too long", put("training.lora_target_modules", ["m" * 257])),
    *[(f"validation_ratio {v!r}", put("training.validation_ratio", v)) for v in (2, -0.1)],
    ("max_vram_fraction 2", put("training.max_vram_fraction", 2)),
    ("attn_implementation ''", put("training.attn_implementation", "")),
    ("quantization_bits 3", put("training.quantization_bits", 3)),
]  # fmt: skip
# Unknown fields: refused under kubectl's strict field validation, pruned silently with
# --validate=false (fieldValidation=Ignore, see README), so sent only the strict way.
UNKNOWN: list[tuple[str, Mutation]] = [
    ("unknown spec field", put("trainingg", {})),
    ("unknown training field", put("training.lora_rank", 8)),
    ("unknown placement field", put("placement.affinity", {})),
]


def bases() -> list[dict[str, Any]]:
    minimal = ftj_manifest("x")["spec"]
    full = copy.deepcopy(minimal)
    full.update(
        model={"hub": {"tokenSecretRef": {"name": "hf-token"}, "revision": "main"}},
        resources={"gpus": 1, "memory": "48Gi", "cpu": 4},
        placement={"nodeSelector": {"pool": "gpu"}, "tolerations": [{"key": "d", "operator": "Exists"}]},
        training={"quantize_model": True, "quantization_scheme": "bnb-4bit", "lora_r": 16},
    )  # fmt: skip
    volume = copy.deepcopy(minimal)
    volume.update(
        model={"volume": {"claimName": "models", "path": "llama"}},
        dataset={"claimName": "data", "path": "t.csv", "promptField": "q", "completionField": "a"},
        suspend=True,
    )
    return [minimal, full, volume]


def generate(rng: random.Random) -> list[tuple[str, dict[str, Any], bool]]:
    """(description, manifest, strict) for every mutation on every base; each one the model
    refuses (checked here, so a mutation that turns out valid fails the test, not the cluster)."""
    cases = []
    for b, base in enumerate(bases()):
        for what, mutate in [*BAD, *UNKNOWN]:
            spec = copy.deepcopy(base)
            mutate(spec)
            manifest = {**ftj_manifest(f"fz-{len(cases)}"), "spec": spec}
            with pytest.raises(ValidationError):
                FineTuneJob.model_validate(manifest)
            strict = (what, mutate) in UNKNOWN or rng.random() < 0.5
            cases.append((f"{what} (base {b})", manifest, strict))
    return cases


def refusals(stderr: str) -> dict[str, str]:
    """kubectl's error per object name: `FineTuneJob "fz-1" is invalid: ...`, or for a type
    error under server-side apply `failed to create typed patch object (NS/fz-1; ...): .spec...`."""
    found: dict[str, str] = {}
    for chunk in re.split(r"\n(?=Error from server)", stderr):
        match = re.search(r'(?:"|/)(fz-\d+)(?:" is invalid|;)', chunk)
        if match:
            found[match.group(1)] = chunk
    return found


def test_every_bad_manifest_gets_a_clear_answer(namespace: Namespace) -> None:
    cases = generate(random.Random(14))
    assert len(cases) >= MIN_CASES, len(cases)
    stderr = ""
    for strict in (True, False):
        batch = [m for _, m, s in cases if s is strict]
        flags = ["--server-side"] if strict else ["--validate=false"]
        for start in range(0, len(batch), 60):
            docs = yaml.safe_dump_all(batch[start : start + 60])
            result = namespace.cluster.kubectl(
                "apply", *flags, "-n", namespace.name, "-f", "-", input=docs, check=False
            )
            stderr += "\n" + result.stderr
    refused = refusals(stderr)
    stored = {
        item["metadata"]["name"]
        for item in namespace.cluster.custom.list_namespaced_custom_object(
            "finetune.dev", "v1alpha1", namespace.name, "finetunejobs"
        )["items"]
    }
    problems = []
    for what, manifest, _ in cases:
        name = manifest["metadata"]["name"]
        if name in refused:
            # One clear answer naming the field (the API server's own line per field).
            if "spec." not in refused[name]:
                problems.append(f"{what}: refusal names no field: {refused[name][:300]}")
        elif name not in stored:
            problems.append(f"{what}: neither refused nor stored")
    accepted = [
        (what, m["metadata"]["name"]) for what, m, _ in cases if m["metadata"]["name"] in stored
    ]

    def answered(name: str) -> bool:
        conditions = namespace.ftj(name).get("status", {}).get("conditions", [])
        return any(
            c["type"] in ("Validated", "ChildrenReady") and c["status"] == "False"
            for c in conditions
        )

    for what, name in accepted:
        wait_for(lambda n=name: answered(n), timeout=60, what=f"{what}: a False condition")
    assert namespace.jobs() == []  # none got a training Job
    assert not problems, f"{len(problems)} of {len(cases)}:\n" + "\n".join(problems[:30])
    print(f"{len(cases)} bad manifests: {len(refused)} refused at apply, {len(accepted)} answered")


REFUSED_BY_CLUSTER = 30


def test_valid_specs_whose_children_the_cluster_refuses_are_answered_once(
    namespace: Namespace, operator: Operator
) -> None:
    """Valid at apply, refused as children by the cluster's own admission rule: each ends Failed
    with ChildrenReady=False naming the Job and quoting the rule, nothing half-created, and kopf
    is told not to retry."""
    rng = random.Random(1414)
    with refusing_images(namespace):
        docs = []
        for i in range(REFUSED_BY_CLUSTER):
            spec = copy.deepcopy(rng.choice(bases()))
            spec["image"] = f"refused:{i}"
            spec["resources"] = {"gpus": rng.randint(1, 4)}
            docs.append({**ftj_manifest(f"adm-{i}"), "spec": spec})
        result = namespace.cluster.kubectl(
            "apply", "--server-side", "-n", namespace.name, "-f", "-",
            input=yaml.safe_dump_all(docs), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

        def reasons() -> list[str]:
            items = namespace.cluster.custom.list_namespaced_custom_object(
                "finetune.dev", "v1alpha1", namespace.name, "finetunejobs"
            )["items"]
            return [
                next((c["reason"] for c in (i.get("status") or {}).get("conditions", [])
                      if c["type"] == "ChildrenReady" and c["status"] == "False"), "")
                for i in items
            ]  # fmt: skip

        wait_for(
            lambda: reasons() == ["ChildRejected"] * REFUSED_BY_CLUSTER,
            timeout=120,
            what="every job ChildRejected",
            describe=reasons,
        )
        for i in range(REFUSED_BY_CLUSTER):
            status = namespace.ftj(f"adm-{i}")["status"]
            assert status["phase"] == "Failed"
            assert status["message"].startswith(f"Job adm-{i}-train refused: ")
            assert MESSAGE in status["message"]
        before = [namespace.ftj(f"adm-{i}")["status"] for i in range(REFUSED_BY_CLUSTER)]
        time.sleep(5)
        assert [namespace.ftj(f"adm-{i}")["status"] for i in range(REFUSED_BY_CLUSTER)] == before
        assert namespace.jobs() == []


def test_unknown_fields_are_pruned_with_validate_false(namespace: Namespace) -> None:
    """What a client that skips kubectl's strict check gets (documented in the README)."""
    manifest = ftj_manifest("pruned", suspend=True)
    manifest["spec"]["trainingg"] = {"lora_r": 8}
    result = namespace.cluster.kubectl(
        "apply", "--validate=false", "-n", namespace.name, "-f", "-",
        input=yaml.safe_dump(manifest), check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "trainingg" not in namespace.ftj("pruned")["spec"]
    strict = namespace.cluster.kubectl(
        "apply", "-n", namespace.name, "-f", "-", input=yaml.safe_dump(manifest), check=False
    )
    assert 'unknown field "spec.trainingg"' in strict.stderr, strict.stderr


BURST = 60


def test_operator_killed_during_a_burst_makes_no_duplicate(
    cluster: Cluster, kubelet: FakeKubelet, tmp_path: Path
) -> None:
    op = Operator(cluster, tmp_path / "burst.log", "--namespace", "b-*").start()
    ns = make_namespace(cluster, tmp_path, prefix="b")
    rng = random.Random(14)
    try:
        docs = [ftj_manifest(f"burst-{i}", suspend=True) for i in range(BURST)]
        result = ns.cluster.kubectl(
            "apply", "-n", ns.name, "-f", "-", input=yaml.safe_dump_all(docs), check=False
        )
        assert result.returncode == 0, result.stderr
        for _ in range(3):
            time.sleep(rng.uniform(1.0, 4.0))
            op.kill()
            op.start()

        def settled() -> bool:
            items = ns.cluster.custom.list_namespaced_custom_object(
                "finetune.dev", "v1alpha1", ns.name, "finetunejobs"
            )["items"]
            return len(items) == BURST and all(
                (i.get("status") or {}).get("phase") == "Suspended" for i in items
            )

        wait_for(settled, timeout=180, what="every burst job Suspended")
        made = ns.jobs()
        assert sorted(j.metadata.name for j in made) == sorted(
            f"burst-{i}-train" for i in range(BURST)
        )
        assert all(
            "finetune.dev/trainer-config" in j.spec.template.metadata.annotations for j in made
        )
    finally:
        remove_namespace(ns)
        op.stop()
