"""'auto' learning_rate and num_input_records_to_sample against the pinned Safe Synthesizer's own
functions. Its `config/autoconfig.py` and `llm/metadata.py` import transformers and torch, so the
functions are taken from their source: `_resolve_model_class` and
`choose_num_input_records_to_sample` are compiled and run on their own, with the model classes
stood in by their names and their `default_learning_rate` read from the class bodies. A release
that changes the classes, their order, their rates or the rule fails here."""

from __future__ import annotations

import ast
import math
import re
from importlib import util
from pathlib import Path
from typing import Any

import pytest

from finetune_api import TrainingHyperparams
from finetune_trainer import plan
from finetune_trainer.errors import InvalidInputError


def source(relative: str) -> ast.Module:
    found = util.find_spec("nemo_safe_synthesizer")
    assert found is not None and found.submodule_search_locations
    path = Path(found.submodule_search_locations[0]) / relative
    return ast.parse(path.read_text(encoding="utf-8"))


def function(tree: ast.Module, name: str) -> ast.FunctionDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise AssertionError(f"Safe Synthesizer has no function {name} any more")


def compiled(node: ast.FunctionDef, namespace: dict[str, Any]) -> Any:
    """The function alone (decorators and annotations dropped), defined in `namespace`."""
    bare = ast.FunctionDef(
        name=node.name,
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(arg=a.arg) for a in node.args.args],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=node.body,
        decorator_list=[],
        returns=None,
        type_params=[],
    )
    module = ast.fix_missing_locations(ast.Module(body=[bare], type_ignores=[]))
    exec(compile(module, "<safe-synthesizer>", "exec"), namespace)
    return namespace[node.name]


def class_rates(tree: ast.Module) -> dict[str, float]:
    """Each ModelMetadata subclass's default_learning_rate, inherited from ModelMetadata."""
    rates: dict[str, float] = {}
    bases: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases[node.name] = ast.unparse(node.bases[0]) if node.bases else ""
        for item in node.body:
            if (
                isinstance(item, ast.AnnAssign)
                and getattr(item.target, "id", None) == "default_learning_rate"
                and item.value is not None
            ):
                rates[node.name] = ast.literal_eval(item.value)
    assert "ModelMetadata" in rates
    for name, base in bases.items():
        if base == "ModelMetadata" and name not in rates:
            rates[name] = rates["ModelMetadata"]
    return rates


@pytest.fixture(scope="module")
def resolve_model_class() -> Any:
    """Safe Synthesizer's ModelMetadata._resolve_model_class, with the classes by name."""
    tree = source("llm/metadata.py")
    rates = class_rates(tree)
    namespace: dict[str, Any] = {
        name: type(name, (), {"default_learning_rate": rate}) for name, rate in rates.items()
    }
    resolve = compiled(function(tree, "_resolve_model_class"), namespace)
    return lambda name: resolve(None, name)


@pytest.fixture(scope="module")
def choose_records() -> Any:
    tree = source("config/autoconfig.py")
    return compiled(function(tree, "choose_num_input_records_to_sample"), {})


MODELS = [
    "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
    "meta-llama/Llama-3.2-1B",  # "llama32" is the class's name: no match
    "unsloth/Llama32-1B-Instruct",
    "/models/tinyllama",
    "mistralai/Mistral-7B-Instruct-v0.3",
    "MISTRALAI/MISTRAL-NEMO",
    "HuggingFaceTB/SmolLM2-135M",
    "HuggingFaceTB/SmolLM3-3B",
    "Qwen/Qwen2.5-7B",
    "nvidia/Nemotron-Mini-4B-Instruct",
    "ibm-granite/granite-3.3-2b-instruct",
    "qwen-mistral-merge",  # two classes: the first in Safe Synthesizer's order wins
    "google/gemma-2-2b",
    "acme/unknown",
    "",
]


def test_the_model_classes_are_safe_synthesizers(resolve_model_class: Any) -> None:
    """MODEL_CLASSES lists its classes, in its order, with its rates."""
    tree = source("llm/metadata.py")
    node = function(tree, "_resolve_model_class")
    tuples = [
        n.value
        for n in ast.walk(node)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "classes"
    ]
    assert len(tuples) == 1 and isinstance(tuples[0], ast.Tuple)
    order = [ast.unparse(e) for e in tuples[0].elts]
    rates = class_rates(tree)
    assert list(plan.MODEL_CLASSES) == [(name, rates[name]) for name in order]


@pytest.mark.parametrize("model", MODELS)
def test_auto_learning_rate_is_safe_synthesizers(resolve_model_class: Any, model: str) -> None:
    if plan.model_class(model) is None:
        with pytest.raises(ValueError, match=f"^Unknown model name or path: {re.escape(model)}$"):
            resolve_model_class(model)
        with pytest.raises(InvalidInputError, match=r"^spec.training.learning_rate: 'auto' needs"):
            plan.resolve_learning_rate("auto", model)
        training = TrainingHyperparams(pretrained_model=model or "x", learning_rate="auto")
        if model:
            with pytest.raises(InvalidInputError, match=repr(model)):
                plan.make_plan(training, dataset_records=10)
        return
    expected = resolve_model_class(model).default_learning_rate
    assert plan.resolve_learning_rate("auto", model) == expected
    resolved = plan.make_plan(TrainingHyperparams(pretrained_model=model), dataset_records=10)
    assert resolved.learning_rate == expected
    assert resolved.learning_rate_source == f"auto ({resolve_model_class(model).__name__})"
    # an explicit rate is used as it is, for every model (Safe Synthesizer resolves only 'auto')
    assert plan.resolve_learning_rate(0.003, model) == 0.003


@pytest.mark.parametrize("rope", [None, 1, 2, 3, 6, 8])
def test_auto_records_are_safe_synthesizers(choose_records: Any, rope: int | None) -> None:
    """rope: the factor 'auto' resolved to (None: no scaling, which Safe Synthesizer calls 1)."""
    assert plan.resolve_records("auto", "auto", rope) == choose_records(rope or 1)
    # an explicit factor is not multiplied in: Safe Synthesizer's resolver passes `None or 1`
    # when rope_scaling_factor was not 'auto'
    assert plan.resolve_records("auto", rope or 1, rope) == choose_records(1)
    assert plan.resolve_records(123, "auto", rope) == 123


def test_safe_synthesizer_multiplies_only_an_auto_resolved_factor() -> None:
    """What test_auto_records_are_safe_synthesizers relies on, read from the resolver: the records
    use `self._rope_scaling_factor or 1`, which only the 'auto' branch of the RoPE step sets."""
    tree = source("config/autoconfig.py")
    records = ast.unparse(function(tree, "_determine_num_input_records_to_sample"))
    assert (
        "choose_num_input_records_to_sample(rope_scaling_factor=self._rope_scaling_factor or 1)"
        in records
    )
    rope = function(tree, "_determine_rope_scaling_factor")
    assigned = [
        n
        for n in ast.walk(tree)
        if (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "self._rope_scaling_factor")
        or (isinstance(n, ast.AnnAssign) and ast.unparse(n.target) == "self._rope_scaling_factor")
    ]
    inside = {id(n) for n in ast.walk(rope)}
    init = [n for n in assigned if id(n) not in inside]
    assert [ast.unparse(n.value) for n in init] == ["None"]  # __init__ only
    assert ast.unparse(rope.body[1]).startswith(
        "if self._config.get('rope_scaling_factor') != AUTO_STR"
    )


def defaults_constants() -> dict[str, int]:
    """The integer constants of Safe Synthesizer's defaults.py, evaluated in order."""
    values: dict[str, int] = {}
    for node in source("defaults.py").body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                value = eval(compile(ast.Expression(node.value), "<defaults>", "eval"), {}, values)
            except NameError:
                continue
            if isinstance(value, int):
                values[node.targets[0].id] = value
    return values


@pytest.fixture(scope="module")
def choose_rope() -> Any:
    """Safe Synthesizer's choose_rope_scaling_factor with its default context, from its source."""
    tree = source("config/autoconfig.py")
    imports = [ast.unparse(n) for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert "from ..defaults import DEFAULT_MAX_SEQ_LENGTH, MAX_ROPE_SCALING_FACTOR" in imports
    node = function(tree, "choose_rope_scaling_factor")
    assert [ast.unparse(d) for d in node.args.defaults] == ["DEFAULT_MAX_SEQ_LENGTH"]
    constants = defaults_constants()
    choose = compiled(node, {"math": math, **constants})
    return lambda tokens: choose(tokens, constants["DEFAULT_MAX_SEQ_LENGTH"])


def test_auto_rope_constants_are_safe_synthesizers() -> None:
    constants = defaults_constants()
    assert constants["DEFAULT_MAX_SEQ_LENGTH"] == plan.AUTO_ROPE_CONTEXT
    assert constants["MAX_ROPE_SCALING_FACTOR"] == plan.MAX_ROPE_SCALING_FACTOR


@pytest.mark.parametrize(
    "tokens",
    [0, 1, 40, 2048, 4096, 12_287, 12_288, 12_289, 24_576, 24_577, 50_000, 73_728, 73_729, 10**7],
)
def test_auto_rope_factor_is_safe_synthesizers(choose_rope: Any, tokens: int) -> None:
    """The same longest-example token count gives the same factor (theirs: 1 = no scaling)."""
    theirs = choose_rope(tokens)
    ours = plan.rope_factor("auto", tokens)
    assert (ours or 1) == max(theirs, 1)
    # and 'auto' records follow the factor as there
    assert plan.resolve_records("auto", "auto", ours) == 25_000 * max(theirs, 1)
