"""Status reporting and the termination message.

The reporter sends its requests to a small HTTP server standing in for the API server
(tests/training/fake_apiserver.py): the test sees the request really sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from finetune_api.resource import Progress, Result
from finetune_api.trainer_config import TrainerOutcome
from finetune_trainer import report
from finetune_trainer.report import (
    RateLimiter,
    StatusReporter,
    outcome_json,
    progress_patch,
    write_outcome,
)
from training.fake_apiserver import Recorder, fake_apiserver


def test_patch_body_is_only_status_progress_in_camel_case() -> None:
    progress = Progress(
        step=5,
        total_steps=20,
        epoch=1.25,
        loss=2.5,
        eval_loss=None,
        percent=25,
        update_time="2026-01-02T03:04:05Z",
    )
    assert progress_patch(progress) == {
        "status": {
            "progress": {
                "step": 5,
                "totalSteps": 20,
                "epoch": 1.25,
                "loss": 2.5,
                "percent": 25,
                "updateTime": "2026-01-02T03:04:05Z",
            }
        }
    }


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_one_event_per_interval_and_forced_ones() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10.0, clock)
    assert limiter.ready()  # the first report goes out
    clock.now += 3
    assert not limiter.ready()
    clock.now += 6.9
    assert not limiter.ready()
    clock.now += 0.1
    assert limiter.ready()  # 10 s after the last one
    clock.now += 1
    assert limiter.ready(force=True)  # the final report always goes out
    clock.now += 1
    assert not limiter.ready()  # and it counts as the last one


def test_report_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(report.ENV_REPORT_INTERVAL, raising=False)
    assert report.report_interval() == report.DEFAULT_REPORT_INTERVAL
    monkeypatch.setenv(report.ENV_REPORT_INTERVAL, "2.5")
    assert report.report_interval() == 2.5
    monkeypatch.setenv(report.ENV_REPORT_INTERVAL, "soon")
    assert report.report_interval() == report.DEFAULT_REPORT_INTERVAL


@pytest.fixture
def api_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Recorder]:
    """A local stand-in for the API server and a kubeconfig for it, with reporting switched on."""
    with fake_apiserver(tmp_path) as (recorder, kubeconfig):
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("FINETUNE_REPORT_STATUS", "true")
        monkeypatch.setenv("FINETUNE_JOB_NAME", "job-a")
        monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", "team-1")
        monkeypatch.setenv(report.ENV_REPORT_INTERVAL, "3600")
        yield recorder


def test_reporter_sends_a_merge_patch_to_the_status_subresource(
    api_server: Recorder,
) -> None:
    reporter = StatusReporter.from_env()
    assert reporter is not None
    assert reporter.report(Progress(step=1, total_steps=4, percent=25))
    assert reporter.flush()
    assert not reporter.report(Progress(step=2, total_steps=4, percent=50))  # rate-limited
    assert reporter.report(Progress(step=4, total_steps=4, percent=100), force=True)
    assert reporter.flush()
    assert reporter.patches_sent == 2
    assert [r["path"].split("?")[0] for r in api_server.requests] == [
        "/apis/finetune.dev/v1alpha1/namespaces/team-1/finetunejobs/job-a/status"
    ] * 2
    assert {r["content_type"] for r in api_server.requests} == {"application/merge-patch+json"}
    assert api_server.requests[-1]["body"] == {
        "status": {"progress": {"step": 4, "totalSteps": 4, "percent": 100}}
    }
    assert "fieldManager=finetune-trainer" in api_server.requests[0]["path"]


def test_a_failing_patch_is_a_warning_not_a_crash(
    api_server: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    api_server.status_code = 500
    reporter = StatusReporter.from_env()
    assert reporter is not None
    assert reporter.send(Progress(step=1)) is False  # the API server said 500
    assert len(api_server.requests) == 1
    assert reporter.report(Progress(step=2), force=True)  # queued: training goes on
    assert reporter.flush()
    assert len(api_server.requests) == 2
    assert reporter.patches_sent == 0
    assert "could not patch status.progress of FineTuneJob team-1/job-a" in caplog.text


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "off"),
        ({"FINETUNE_REPORT_STATUS": "false"}, "off"),
        ({"FINETUNE_REPORT_STATUS": "true", "FINETUNE_JOB_NAMESPACE": "ns"}, "no name"),
    ],
)
def test_reporting_off(env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FINETUNE_REPORT_STATUS", "FINETUNE_JOB_NAME", "FINETUNE_JOB_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert StatusReporter.from_env() is None, expected


def test_no_cluster_access_turns_reporting_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FINETUNE_REPORT_STATUS", "true")
    monkeypatch.setenv("FINETUNE_JOB_NAME", "a")
    monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", "b")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    assert StatusReporter.from_env() is None


def test_outcome_written_to_the_termination_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(path))
    outcome = TrainerOutcome(
        outcome="Succeeded",
        reason="Completed",
        result=Result(adapter="pvc://a/b", steps=3, records_seen=24, final_loss=1.5),
    )
    assert write_outcome(outcome)
    assert json.loads(path.read_text()) == {
        "outcome": "Succeeded",
        "reason": "Completed",
        "message": "",
        "result": {"adapter": "pvc://a/b", "steps": 3, "recordsSeen": 24, "finalLoss": 1.5},
    }
    assert TrainerOutcome.model_validate_json(path.read_text()) == outcome


def test_unwritable_termination_path_is_only_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINETUNE_TERMINATION_MESSAGE_PATH", str(tmp_path / "missing" / "log"))
    assert write_outcome(TrainerOutcome(outcome="Failed", reason="TrainingError")) is False


def test_termination_message_stays_under_the_kubernetes_limit() -> None:
    outcome = TrainerOutcome(outcome="Failed", reason="TrainingError", message="é" * 5000)
    text = outcome_json(outcome)
    assert len(text.encode()) < 4096
    parsed = TrainerOutcome.model_validate_json(text)
    assert parsed.message.endswith("...")
    assert parsed.reason == "TrainingError"


def test_a_malformed_kubeconfig_turns_reporting_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        "clusters: [{name: c, cluster: {server: 'https://a:1', certificate-authority-data: '%%'}}]\n"
        "contexts: [{name: x, context: {cluster: c}}]\ncurrent-context: x\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("FINETUNE_REPORT_STATUS", "true")
    monkeypatch.setenv("FINETUNE_JOB_NAME", "a")
    monkeypatch.setenv("FINETUNE_JOB_NAMESPACE", "b")
    assert StatusReporter.from_env() is None
