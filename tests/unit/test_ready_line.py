"""The ingress says once, in the log a `serve run` console shows, when every model has a
replica that answers and where to send requests; never before."""

from __future__ import annotations

import logging
from types import SimpleNamespace

from deployments.ingress.deployment import announce_when_ready, serve_url


class StartingHandle:
    """A generator handle whose replica answers after `starting` failed asks."""

    def __init__(self, starting: int) -> None:
        self.asked = 0
        self.starting = starting
        self.capabilities = SimpleNamespace(remote=self._remote)

    def _remote(self):
        self.asked += 1
        return SimpleNamespace(result=self._result)

    def _result(self, timeout_s: float):
        if self.asked <= self.starting:
            raise TimeoutError("no replica yet")
        return object()


def ready_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "image service ready" in r.getMessage()]


def test_one_line_once_every_model_answers(caplog, monkeypatch):
    monkeypatch.setattr("deployments.ingress.deployment.time.sleep", lambda _: None)
    caplog.set_level(logging.INFO, logger="ray.serve")
    handles = {"tiny-sd3": StartingHandle(starting=0), "tiny-flux": StartingHandle(starting=3)}
    assert announce_when_ready(handles, timeout_s=60)
    assert ready_lines(caplog) == [
        "image service ready: POST /v1/images/generations (models: tiny-sd3, tiny-flux)"
    ]
    assert handles["tiny-sd3"].asked == 1  # an answered model is not asked again
    assert handles["tiny-flux"].asked == 4


def test_no_line_while_a_model_has_no_replica(caplog, monkeypatch):
    monkeypatch.setattr("deployments.ingress.deployment.time.sleep", lambda _: None)
    caplog.set_level(logging.INFO, logger="ray.serve")
    handles = {"tiny-sd3": StartingHandle(starting=0), "never": StartingHandle(starting=10**9)}
    assert not announce_when_ready(handles, timeout_s=0.05)
    assert ready_lines(caplog) == []


def test_outside_a_replica_the_url_is_the_path_alone():
    assert serve_url() == "/"
