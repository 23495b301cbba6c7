"""What tests and benchmarks both need to run the service: free ports of 127.0.0.1, and the
service run as a user runs it, `serve run <config>` on a free port (`ServeRun`: start, wait
for its first image, stop). tests/integration/test_serve_run.py checks that way of running
it; every benchmark of `bench.serving` serves the app with it, and what only the benchmarks
need on top (their options, Serve's throughput mode) stays in bench/harness/serve_run.py.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_config(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def with_overrides(
    config: dict[str, Any], *, port: int, args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A copy of a Serve config on `port`, with `args` merged into its application's args."""
    config = copy.deepcopy(config)
    config["http_options"]["host"] = "127.0.0.1"
    config["http_options"]["port"] = port
    application_args = config["applications"][0].setdefault("args", {})
    for section, values in (args or {}).items():
        if isinstance(values, dict):
            application_args.setdefault(section, {}).update(values)
        else:
            application_args[section] = values
    return config


def poll_for_image(
    base_url: str,
    body: dict[str, Any],
    process: subprocess.Popen[bytes] | None,
    exited: str,
    timeout_s: float,
) -> tuple[httpx.Response, float]:
    """Post `body` to a server's generations route until it answers 200 (the server's
    `process` still running, else RuntimeError(`exited`)); that answer and the seconds it took."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise RuntimeError(exited)
        try:
            response = httpx.post(f"{base_url}/v1/images/generations", json=body, timeout=60)
            if response.status_code == 200:
                return response, time.monotonic() - started
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.25)
    raise TimeoutError(f"no image from {base_url} in {timeout_s}s; last: {last}")


class ServeRun:
    """`serve run` in a subprocess; a context manager that stops it (and its Ray) on exit."""

    def __init__(
        self,
        config: dict[str, Any],
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self._env = env or {}
        self.port = config["http_options"]["port"]
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._workdir = Path(tempfile.mkdtemp(prefix="serve-run-"))
        self.log_path = log_path or self._workdir / "serve.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ServeRun:
        config_path = self._workdir / "config.yaml"
        config_path.write_text(yaml.safe_dump(self.config))
        serve = shutil.which("serve", path=os.path.dirname(sys.executable)) or "serve"
        log = self.log_path.open("w")
        self._process = subprocess.Popen(
            [serve, "run", str(config_path)],
            cwd=REPO,
            # A Ray of its own: without this, `serve run` joins a cluster already running
            # on this machine (a test's, say) and deploys into it.
            env={**os.environ, "RAY_ADDRESS": "local", **self._env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def __exit__(self, *exc_info: object) -> None:
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGINT)  # serve run shuts Serve and its Ray down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def wait_for_first_image(
        self, timeout_s: float = 300, model: str | None = None
    ) -> tuple[httpx.Response, float]:
        """Poll until a generation (of `model`, or the default model) answers 200; return it
        and the seconds since the start."""
        body: dict[str, Any] = {"prompt": "first light", "response_format": "b64_json"}
        if model is not None:
            body["model"] = model
        exited = f"serve run exited; see {self.log_path}"
        return poll_for_image(self.base_url, body, self._process, exited, timeout_s)

    def processes(self) -> list[psutil.Process]:
        """Every process this `serve run` started (Ray's, Serve's proxy, the replicas).

        Only its descendants count, so another Ray on the machine can't skew the figures
        taken from them.
        """
        assert self._process is not None, "not started"
        return psutil.Process(self._process.pid).children(recursive=True)

    def driver(self) -> psutil.Process:
        """The `serve run` process itself (it prints the replicas' logs)."""
        assert self._process is not None, "not started"
        return psutil.Process(self._process.pid)

    def replica_processes(self, deployment: str) -> list[psutil.Process]:
        """This application's replica processes of a deployment (`ServeReplica:app:name`)."""
        # Ray titles an actor busy in a method `ServeReplica:app:name.method` (a replica still
        # starting, say); a method name starts with a letter, so `sd3` never matches `sd3.5`.
        replica = re.compile(rf"ServeReplica:\S*:{re.escape(deployment)}(\.[A-Za-z_]\w*)?(\s|$)")
        found = []
        for process in self.processes():
            try:
                command = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if replica.search(command):
                found.append(process)
        return found
