"""Opt-in tiers: their tests run only when asked for, never in a plain `pytest` (`make test`) or a
selection that does not name them.

- e2e (tests/e2e): builds the container images (tens of minutes and ~20 GB the first time) and
  trains in the trainer image on a real node; `make test-e2e`, `-m e2e` or tests/e2e named.
- scale: KWOK's simulated cluster (building KWOK takes minutes); `make test-scale`, `-m scale` or
  the file named.
"""

from __future__ import annotations

import pytest

OPT_IN = ("e2e", "scale")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = str(config.getoption("markexpr") or "")
    args = [str(arg) for arg in config.args]
    for marker in OPT_IN:
        named = any(marker in arg for arg in args)
        if marker in markexpr.replace(f"not {marker}", "") or named:
            continue
        deselected = [item for item in items if item.get_closest_marker(marker)]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = [item for item in items if not item.get_closest_marker(marker)]
