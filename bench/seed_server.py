"""A peer for the benchmark: a server built the way diffusers' guide "Create a server"
describes (`../shared/seed/create_a_server.md`), written here from its description.

One pipeline is loaded and shared. Each request builds its own pipeline over it with
`from_pipe` and a fresh scheduler (schedulers are not thread-safe), and its own
`torch.Generator`, and runs the call through `loop.run_in_executor` in the event loop's
default thread pool, so the server keeps answering while images are made. No batching.

Unlike the guide, it honours the request's `size`, `n`, `num_inference_steps` and `seed`,
runs on the CPU, and answers `b64_json` PNGs: the same request shape and work as the
service's, so the benchmark compares the designs and not the requests.

    python -m bench.seed_server --port 8100 --source embedded:tiny-sd3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import random

import numpy as np
import torch
from fastapi import FastAPI
from pydantic import BaseModel

from deployments.generator.pipelines import load_pipeline
from deployments.model_config import ModelConfig


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


if __name__ == "__main__":
    main()
