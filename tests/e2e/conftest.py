"""The e2e tier builds the container images (tens of minutes and ~15 GB the first time), so it
runs only when asked for: `-m` naming e2e (`make test-e2e`), or tests/e2e named on the command
line. Otherwise its tests are deselected, also from `make test` and the unit-tier selection."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = str(config.getoption("markexpr") or "")
    named = any("e2e" in str(arg) for arg in config.args)
    if "e2e" in markexpr.replace("not e2e", "") or named:
        return
    deselected = [item for item in items if item.get_closest_marker("e2e")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("e2e")]
