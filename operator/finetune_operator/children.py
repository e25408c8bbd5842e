"""What the API server said when it refused one of a FineTuneJob's children (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Refusals no retry can change: the object itself is invalid (a 422 from validation, a 400).
# Everything else (a quota that may free up, RBAC an admin may fix, an admission webhook that
# may be down, a busy API server) is worth retrying.
PERMANENT_STATUSES = frozenset({400, 422})


def child_kind(obj: Any) -> str:
    """The Kind of a kubernetes.client object: V1Job -> Job."""
    return str(getattr(obj, "kind", None) or type(obj).__name__.removeprefix("V1"))


@dataclass(frozen=True)
class ChildFailure:
    """A child the API server refused to create."""

    kind: str
    name: str
    status: int
    message: str  # the API server's own message

    @property
    def permanent(self) -> bool:
        return self.status in PERMANENT_STATUSES

    @property
    def reason(self) -> str:
        return "ChildRejected" if self.permanent else "ChildCreateFailed"

    def describe(self) -> str:
        verdict = "refused" if self.permanent else "could not be created yet (retrying)"
        return f"{self.kind} {self.name} {verdict}: {self.message}"
