"""The trainer benchmark's arithmetic (hack/bench_trainer.py): steady tokens/s and the share of
the steady window spent saving checkpoints, on step and save times given here."""

from __future__ import annotations

import pytest
from bench_trainer import saving_share, steady_tokens_per_s

# Step ends at 1.0, 2.0, ... 10.0 s; with 2 warm-up steps the steady window is 2.0 -> 10.0 s.
ENDS = [float(step) for step in range(1, 11)]


def test_steady_tokens_per_s_counts_the_steps_after_the_warm_up() -> None:
    assert steady_tokens_per_s(ENDS, 2, 100) == pytest.approx(8 * 100 / 8.0)


def test_saving_share_counts_the_saves_inside_the_steady_window() -> None:
    saves = [
        [2, 1.9, 1.95],  # before the window: warm-up
        [4, 4.0, 4.2],
        [8, 8.0, 8.2],
        [10, 10.0, 10.3],  # the last step's save, after the last step's end
    ]
    assert saving_share(ENDS, saves, 2) == pytest.approx(0.4 / 8.0)


def test_saving_share_is_zero_without_saves() -> None:
    assert saving_share(ENDS, [], 2) == 0
