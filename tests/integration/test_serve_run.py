"""The README's way to run the service: `serve run config/local.yaml`, as a user would."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .helpers import decode_png, free_port, wait_for_first_image

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_serve_run_local_config_serves_images(tmp_path):
    config = yaml.safe_load((REPO / "config" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a free port instead of 8000
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    serve = shutil.which("serve", path=os.path.dirname(sys.executable))
    assert serve, "the `serve` command comes with ray[serve]"
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [serve, "run", str(config_path)],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        response, seconds = wait_for_first_image(f"http://127.0.0.1:{port}", timeout_s=240)
        print(f"\nserve run -> first image: {seconds:.1f} s")
        (image,) = response.json()["data"]
        assert decode_png(image["b64_json"]).shape == (64, 64, 3)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
