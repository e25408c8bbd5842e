"""Tell the outcome: live progress on the FineTuneJob's status, and the termination message.

Progress: when FINETUNE_REPORT_STATUS is "true" and FINETUNE_JOB_NAME / FINETUNE_JOB_NAMESPACE
are set, the trainer patches `status.progress` (only that: the operator owns the rest of the
status) with a JSON merge patch on the status subresource, at most once every
FINETUNE_REPORT_INTERVAL seconds (default 10) plus always the final report. A failed patch is
logged and training goes on.

Termination message: a TrainerOutcome JSON object written to FINETUNE_TERMINATION_MESSAGE_PATH
(default /dev/termination-log), kept under Kubernetes' 4096-byte limit.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune_api.resource import GROUP, PLURAL, VERSION, Progress
from finetune_api.trainer_config import (
    ENV_JOB_NAME,
    ENV_JOB_NAMESPACE,
    ENV_REPORT,
    ENV_REPORT_INTERVAL,
    ENV_TERMINATION_PATH,
    TERMINATION_MESSAGE_PATH,
    TrainerOutcome,
)
from finetune_trainer import kubeapi

log = logging.getLogger(__name__)

DEFAULT_REPORT_INTERVAL = 10.0
TERMINATION_LIMIT = 4096
FIELD_MANAGER = "finetune-trainer"
REQUEST_TIMEOUT = 10


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def progress_patch(progress: Progress) -> dict[str, Any]:
    """The merge patch body: only status.progress, camelCase, unset fields left out."""
    return {"status": {"progress": progress.model_dump(by_alias=True, exclude_none=True)}}


class RateLimiter:
    """Allows one event per `interval` seconds; a forced event always passes (and counts)."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: float | None = None

    def ready(self, force: bool = False) -> bool:
        now = self._clock()
        if force or self._last is None or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class StatusReporter:
    """Patches status.progress of one FineTuneJob through the Kubernetes API (kubeapi).

    `report` only hands the progress to a background thread (the newest one wins), so a slow or
    unreachable API server never holds training up; `flush` waits for the last one to be sent."""

    def __init__(
        self, name: str, namespace: str, api: kubeapi.Endpoint, limiter: RateLimiter
    ) -> None:
        self.name = name
        self.namespace = namespace
        self._api = api
        self._limiter = limiter
        self.patches_sent = 0
        self.path = (
            kubeapi.object_path(GROUP, VERSION, namespace, PLURAL, name)
            + f"/status?fieldManager={FIELD_MANAGER}"
        )
        self._pending: Progress | None = None
        self._busy = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="status-reporter", daemon=True)
        self._thread.start()

    @classmethod
    def from_env(cls) -> StatusReporter | None:
        """The reporter the environment asks for, or None when reporting is off or impossible."""
        if os.environ.get(ENV_REPORT, "").strip().lower() != "true":
            return None
        name = os.environ.get(ENV_JOB_NAME, "").strip()
        namespace = os.environ.get(ENV_JOB_NAMESPACE, "").strip()
        if not name or not namespace:
            log.warning(
                "%s is true but %s or %s is unset: status reporting is off",
                ENV_REPORT,
                ENV_JOB_NAME,
                ENV_JOB_NAMESPACE,
            )
            return None
        try:
            api = kubeapi.from_environment()
        except (
            kubeapi.ApiError,
            OSError,
            ValueError,
        ) as exc:  # ssl's errors are OSErrors; bad base64 a ValueError
            log.warning("no Kubernetes API access, status reporting is off: %s", exc)
            return None
        return cls(name, namespace, api, RateLimiter(report_interval()))

    def report(self, progress: Progress, force: bool = False) -> bool:
        """Queue the progress unless rate-limited (a forced report always goes); True if queued."""
        if not self._limiter.ready(force):
            return False
        with self._condition:
            self._pending = progress
            self._condition.notify_all()
        return True

    def flush(self, timeout: float = REQUEST_TIMEOUT + 5) -> bool:
        """Wait until the queued progress has been sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._condition:
            while self._pending is not None or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def send(self, progress: Progress) -> bool:
        """Patch now; True when the API server accepted it. Failures are logged, never raised."""
        try:
            self._api.merge_patch(self.path, progress_patch(progress), timeout=REQUEST_TIMEOUT)
        except kubeapi.ApiError as exc:
            log.warning(
                "could not patch status.progress of FineTuneJob %s/%s: %s",
                self.namespace,
                self.name,
                exc,
            )
            return False
        self.patches_sent += 1
        return True

    def _run(self) -> None:
        while True:
            with self._condition:
                while self._pending is None:
                    self._condition.wait()
                progress, self._pending = self._pending, None
                self._busy = True
            self.send(progress)
            with self._condition:
                self._busy = False
                self._condition.notify_all()


def report_interval() -> float:
    raw = os.environ.get(ENV_REPORT_INTERVAL)
    if raw is None or not raw.strip():
        return DEFAULT_REPORT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        log.warning(
            "%s=%r is not a number; using %s", ENV_REPORT_INTERVAL, raw, DEFAULT_REPORT_INTERVAL
        )
        return DEFAULT_REPORT_INTERVAL
    return max(0.0, value)


def termination_path() -> str:
    return os.environ.get(ENV_TERMINATION_PATH) or TERMINATION_MESSAGE_PATH


def outcome_json(outcome: TrainerOutcome) -> str:
    """The outcome as compact JSON under the 4096-byte limit (the message is cut if needed)."""
    text = outcome.model_dump_json(by_alias=True, exclude_none=True)
    for _ in range(8):
        excess = len(text.encode()) - (TERMINATION_LIMIT - 1)
        if excess <= 0 or len(outcome.message) <= 3:
            break
        keep = max(0, len(outcome.message) - excess - 3)
        outcome = outcome.model_copy(update={"message": outcome.message[:keep] + "..."})
        text = outcome.model_dump_json(by_alias=True, exclude_none=True)
    return text


def write_outcome(outcome: TrainerOutcome) -> bool:
    """Write the termination message; outside a container the path may not exist: just log."""
    path = termination_path()
    text = outcome_json(outcome)
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        log.info("termination message not written to %s (%s): %s", path, exc.strerror, text)
        return False
    return True
