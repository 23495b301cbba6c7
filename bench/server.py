"""Running the service as a user does, `serve run <config>`, on a free port of 127.0.0.1."""

from __future__ import annotations

import copy
import os
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

    def replica_processes(self, deployment: str) -> list[psutil.Process]:
        """This application's replica processes of a deployment (`ServeReplica:app:name`).

        Only descendants of this `serve run` count, so another Ray on the machine can't skew
        the memory figures.
        """
        assert self._process is not None
        found = []
        for process in psutil.Process(self._process.pid).children(recursive=True):
            try:
                command = " ".join(process.cmdline())
            except psutil.Error:
                continue
            if "ServeReplica:" in command and f":{deployment}" in command:
                found.append(process)
        return found


# Ray starts its workers (Serve's proxy and replicas) at niceness 15, below every other
# process of the machine; this puts them at the priority of the others (the seed server, the
# bare pipeline, the load's client), so that a busy machine slows all alike.
SAME_PRIORITY = {"RAY_worker_niceness": "0"}


class SeedServer:
    """The seed-guide peer (`bench/seed_server.py`) in a subprocess on 127.0.0.1."""

    def __init__(self, source: str, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self._command = [sys.executable, "-m", "bench.seed_server", "--port", str(port)]
        self._command += ["--source", source]
        self._log = Path(tempfile.mkstemp(prefix="seed-server-", suffix=".log")[1])
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SeedServer:
        with self._log.open("w") as log:
            self._process = subprocess.Popen(
                self._command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def wait_for_first_image(self, timeout_s: float = 300) -> None:
        body = {"prompt": "first light", "num_inference_steps": 2}
        exited = f"the seed server exited; see {self._log}"
        poll_for_image(self.base_url, body, self._process, exited, timeout_s)
