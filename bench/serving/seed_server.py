"""A peer for the benchmark: a server built the way diffusers' documentation example "Create a
server" describes, written here from that description.

That example serves a StableDiffusion3Pipeline with FastAPI; this server does as it does,
with the pipeline `--source` names. One pipeline is loaded at the start and shared; each
request builds its own pipeline over it with `from_pipe(shared, scheduler=fresh)`
(schedulers are not thread-safe) and its own `torch.Generator`, and runs the call through
`loop.run_in_executor` in the event loop's default thread pool, so the server keeps
answering while images are made. No batching.

Unlike the guide, it honours the request's `size`, `n`, `num_inference_steps` and `seed`,
runs on the CPU, and answers `b64_json` PNGs: the same request shape and work as the
service's, so the benchmark compares the designs and not the requests.

    python -m bench.serving.seed_server --port 8100 --source embedded:tiny-sd3

`SeedServer` runs it in a subprocess for the benchmark (`bench.serving.compare`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from deployments.config.model_config import ModelConfig
from deployments.generator.model.pipelines import load_pipeline
from tests.harness import REPO, poll_for_image


class TextToImageInput(BaseModel):
    prompt: str
    model: str | None = None
    size: str = "64x64"
    n: int = 1
    num_inference_steps: int = 8
    seed: int | None = None
    response_format: str = "b64_json"


def png_base64(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(shared) -> FastAPI:
    app = FastAPI()
    pipeline_class = type(shared)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/images/generations")
    async def generate_image(image_input: TextToImageInput) -> dict:
        loop = asyncio.get_event_loop()
        scheduler = shared.scheduler.from_config(shared.scheduler.config)
        pipeline = pipeline_class.from_pipe(shared, scheduler=scheduler)
        seed = image_input.seed if image_input.seed is not None else random.randrange(2**32)
        generators = [
            torch.Generator("cpu").manual_seed((seed + i) % 2**32) for i in range(image_input.n)
        ]
        width, height = (int(side) for side in image_input.size.split("x"))
        output = await loop.run_in_executor(
            None,
            lambda: pipeline(
                image_input.prompt,
                width=width,
                height=height,
                num_inference_steps=image_input.num_inference_steps,
                num_images_per_prompt=image_input.n,
                generator=generators,
                output_type="np",
            ),
        )
        return {"data": [{"b64_json": png_base64(image)} for image in output.images]}

    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--source", default="embedded:tiny-sd3")
    options = parser.parse_args(argv)
    shared = load_pipeline(ModelConfig(source=options.source, device="cpu", dtype="float32"))
    uvicorn.run(create_app(shared), host="127.0.0.1", port=options.port, log_level="warning")


class SeedServer:
    """This server in a subprocess on 127.0.0.1; a context manager that stops it on exit."""

    def __init__(self, source: str, port: int) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self._command = [sys.executable, "-m", "bench.serving.seed_server", "--port", str(port)]
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


if __name__ == "__main__":
    main()
