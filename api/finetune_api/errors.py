"""One-line, field-naming messages for validation errors."""

from __future__ import annotations

from pydantic import ValidationError

from finetune_api.rules import RULE_ERROR


def _location(loc: tuple[int | str, ...], root: str) -> str:
    path = root
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path = f"{path}.{part}" if path else str(part)
    return path or "(root)"


def format_validation_error(exc: ValidationError, root: str = "spec") -> str:
    """Render every error of `exc` on one line: "spec.training.lora_r: Input should be ...; ...".

    `root` is the path of the validated object inside the resource ("spec", "spec.training", ...).
    """
    parts = []
    for error in exc.errors(include_url=False):
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown field"
        location = _location(error["loc"], root)
        if error["type"] == RULE_ERROR:  # a cross-field rule names its field, as the CRD does
            location += str((error.get("ctx") or {}).get("field_path", ""))
        parts.append(f"{location}: {message}")
    return "; ".join(parts).replace("\n", " ")
