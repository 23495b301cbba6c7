"""The ingress says once, in the log a `serve run` console shows, when its application is
RUNNING and where to send requests; never before, and it asks only Serve's controller (a
probe of each generator would wake models scaled to zero and wait in their queues)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from deployments.ingress.deployment import announce_when_ready, serve_url


class Statuses:
    """`serve.status()` as the controller answers it: `states` in turn, then the last."""

    def __init__(self, *states: str | Exception) -> None:
        self.states = list(states)
        self.asked = 0

    def __call__(self):
        state = self.states[min(self.asked, len(self.states) - 1)]
        self.asked += 1
        if isinstance(state, Exception):
            raise state
        return SimpleNamespace(applications={"images": SimpleNamespace(status=state)})


def ready_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "image service" in r.getMessage()]


def test_one_line_once_the_application_runs(caplog, monkeypatch):
    monkeypatch.setattr("deployments.ingress.deployment.time.sleep", lambda _: None)
    caplog.set_level(logging.INFO, logger="ray.serve")
    status = Statuses("DEPLOYING", RuntimeError("controller busy"), "DEPLOYING", "RUNNING")
    assert announce_when_ready("images", ["tiny-sd3", "tiny-flux"], 60, status)
    assert ready_lines(caplog) == [
        "image service ready: POST /v1/images/generations (models: tiny-sd3, tiny-flux)"
    ]
    assert status.asked == 4


def test_no_ready_line_while_it_is_not_running(caplog, monkeypatch):
    monkeypatch.setattr("deployments.ingress.deployment.time.sleep", lambda _: None)
    caplog.set_level(logging.INFO, logger="ray.serve")
    assert not announce_when_ready("images", ["tiny-sd3"], 0.05, Statuses("DEPLOY_FAILED"))
    assert ready_lines(caplog) == ["image service not ready after 0 s: `serve status` says why"]


def test_outside_a_replica_the_url_is_the_path_alone():
    assert serve_url() == "/"
