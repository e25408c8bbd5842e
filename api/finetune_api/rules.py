"""Cross-field rules, declared once: a Python check, its CEL twin and one message.

A rule is a method of a pydantic model that returns True when the object is valid:

    class ModelSource(RuledModel):
        @cel_rule("!(has(self.hub) && has(self.volume))", "set either hub or volume, not both")
        def _one_source(self) -> bool:
            return self.hub is None or self.volume is None

The model refuses an object whose check returns False with the rule's message (a ValueError, as
any pydantic validator). The CRD generator (finetune_api.crd) publishes the same rules as the
schema node's `x-kubernetes-validations`, so the API server refuses the object at `kubectl apply`
with the same message and no webhook. The CEL expression sees `self` as the API server does:
camelCase names, after the schema's defaults were applied, absent optional fields absent (test
them with `has()`). tests/integration/test_cel_agreement.py sends generated objects to both
and fails where they disagree.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar, Union

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

VALIDATIONS = "x-kubernetes-validations"
RULE_ERROR = "cel_rule"  # the pydantic error type of a broken rule; ctx carries its field path
# "{training.lr_scheduler}" in a message: the value at that path (wire names, relative to the node).
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)\}")

_M = TypeVar("_M", bound=BaseModel)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule of a model. `message` may name the values of string fields as
    `{path}` (wire names, relative to the model)."""

    cel: str
    message: str
    field_path: str | None
    check: Callable[[Any], bool]

    def render(self, model: BaseModel) -> str:
        """The message with the model's values filled in, as the API server renders it."""
        data = model.model_dump(mode="json", by_alias=True)

        def value(match: re.Match[str]) -> str:
            node: Any = data
            for key in match.group(1).split("."):
                node = node[key]
            return str(node)

        return _PLACEHOLDER.sub(value, self.message)

    def message_expression(self) -> str | None:
        """The message as a CEL string expression, when it names values."""
        parts = _PLACEHOLDER.split(self.message)
        if len(parts) == 1:
            return None
        pieces = []
        for index, part in enumerate(parts):
            if index % 2:
                # string(...) would make the API server's cost estimate unbounded: placeholders
                # name string fields only.
                pieces.append(f"self.{part}")
            elif part:
                pieces.append("'" + part.replace("\\", "\\\\").replace("'", "\\'") + "'")
        return " + ".join(pieces)

    def to_validation(self) -> dict[str, str]:
        """The rule as an entry of `x-kubernetes-validations`."""
        static = re.sub(r"\s+", " ", _PLACEHOLDER.sub("", self.message)).replace(" :", ":")
        validation = {"rule": self.cel, "message": static}
        expression = self.message_expression()
        if expression:
            validation["messageExpression"] = expression
        if self.field_path:
            validation["fieldPath"] = self.field_path
            validation["reason"] = "FieldValueInvalid"
        return validation


def cel_rule(
    cel: str, message: str, *, field_path: str | None = None
) -> Callable[[Callable[[_M], bool]], Callable[[_M], bool]]:
    """Declare the decorated method (True = valid) as a rule of its model; see the module doc.

    `field_path` (a JSONPath such as `.volume` relative to the node) names the field an error is
    reported on by the API server.
    """

    def decorate(check: Callable[[_M], bool]) -> Callable[[_M], bool]:
        check.__cel_rule__ = Rule(cel, message, field_path, check)  # type: ignore[attr-defined]
        return check

    return decorate


def _admits_none(annotation: Any) -> bool:
    """Whether a field's type includes None (the CRD marks such a field nullable)."""
    if annotation is None or annotation is type(None) or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _admits_none(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return any(_admits_none(arg) for arg in typing.get_args(annotation))
    return False


def _whole(value: Any) -> Any:
    """2.0 -> 2: the API server decodes a whole JSON number as an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


class RuledModel(BaseModel):
    """Base for the API's spec models. It reads an object as the API server does:

    * `@cel_rule` methods are checked after field validation and published in the JSON schema;
    * null on a field that is not nullable means "unset": the API server prunes such a null
      before applying defaults, so the model drops it too, and the field's default applies;
    * JSON types are strict: no string for a number, no number for a boolean, no boolean for an
      integer; a whole number written as a float (2.0) is an integer, as the API server decodes it.
    """

    model_config = ConfigDict(strict=True)

    _rules: ClassVar[tuple[Rule, ...]] = ()
    _not_nullable: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        rules: dict[str, Rule] = {}
        for klass in reversed(cls.__mro__):
            for name, value in vars(klass).items():
                rule = getattr(value, "__cel_rule__", None)
                if isinstance(rule, Rule):
                    rules[name] = rule
        cls._rules = tuple(rules.values())
        keys = set()
        for name, info in cls.model_fields.items():
            if not _admits_none(info.annotation):
                keys |= {name, info.alias or name}
        cls._not_nullable = frozenset(keys)

    @classmethod
    def cel_rules(cls) -> tuple[Rule, ...]:
        """The model's rules, in declaration order (base classes first)."""
        return cls._rules

    @model_validator(mode="before")
    @classmethod
    def _as_the_api_server_reads(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {
            key: _whole(value)
            for key, value in data.items()
            if value is not None or key not in cls._not_nullable
        }

    @model_validator(mode="after")
    def _check_rules(self) -> Any:
        for rule in type(self).cel_rules():
            if not rule.check(self):
                raise PydanticCustomError(
                    RULE_ERROR,
                    "{message}",
                    {"message": rule.render(self), "field_path": rule.field_path or ""},
                )
        return self

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        if cls.cel_rules():
            target = handler.resolve_ref_schema(schema)
            target[VALIDATIONS] = [rule.to_validation() for rule in cls.cel_rules()]
        return schema
