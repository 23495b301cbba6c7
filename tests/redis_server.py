"""A real `redis-server` on 127.0.0.1 for the quota tests, with nothing saved to disk.

Missing `redis-server` fails the tests rather than skipping them: the quotas must be tested
against the real thing (CI installs Debian's `redis-server`)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.harness import free_port

START_TIMEOUT_S = 15.0


class RedisServer:
    def __init__(
        self, directory: Path, password: str | None = None, persistent: bool = False
    ) -> None:
        """`persistent`: an append-only file, fsynced on every write, so a restart keeps
        everything written before it (as the video jobs' Redis must be run)."""
        executable = shutil.which("redis-server")
        if executable is None:
            pytest.fail(
                "redis-server is not installed (apt-get install redis-server): the quota tests "
                "need a real Redis",
                pytrace=False,
            )
        self._executable = executable
        self._directory = directory
        self._password = password
        self._persistent = persistent
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        self._process = subprocess.Popen(
            [
                self._executable,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                *(
                    ["--appendonly", "yes", "--appendfsync", "always"]
                    if self._persistent
                    else ["--appendonly", "no"]
                ),
                "--dir", str(self._directory),
                *(["--requirepass", self._password] if self._password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            client = self.client(socket_timeout=1)
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        self._process = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down `down_s`, start again: empty, as `--save ''` keeps nothing, unless
        `persistent`."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def client(self, **options) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=self._password, **options)
