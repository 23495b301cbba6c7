"""The speed levers (`models[].optimizations`) on the embedded pipelines: each does what it
says, serves, and an unavailable one fails the replica's start with a message naming it.

Each test was checked to fail with its lever removed (see the docstrings). The compile tests
count graphs, never time: they compile with torch's `eager` backend (the same dynamo graphs
and guards as inductor, without generating code) except the one that compares inductor's
images with eager ones under concurrency.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.config.optimizations_config import CompileConfig
from deployments.generator.calls.warmup import compiled_graphs, prepare_to_serve
from deployments.generator.engine import ImageEngine
from deployments.generator.model.optimizations import (
    OptimizationUnavailable,
    compile_blocks,
    parameter_bytes,
    repeated_blocks,
)
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline
from deployments.jobs import GenerationJob
from tests.jobs import make_job


def model(family: str = "tiny-sd3", **optimizations) -> ModelConfig:
    return ModelConfig(
        id=family, source=f"embedded:{family}", device="cpu", optimizations=optimizations
    )


def job(seed: int = 0, *, side: int = 64, n: int = 1, steps: int = 2) -> GenerationJob:
    return make_job(seed, n=n, width=side, height=side, num_inference_steps=steps)


def serve(pipeline, *jobs: GenerationJob, batching: BatchingConfig | None = None):
    """The jobs' images, through a real engine on the pipeline (one thread)."""
    engine = ImageEngine(pipeline, worker_threads=1, batching=batching or BatchingConfig())

    async def all_jobs():
        return await asyncio.gather(*(engine.generate(j) for j in jobs))

    try:
        return asyncio.run(all_jobs())
    finally:
        engine.shutdown()


def pixels(view, seed: int, side: int = 32) -> np.ndarray:
    images = view(
        prompt=["a red fox"],
        width=side,
        height=side,
        num_inference_steps=2,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.int16)


# Quantization


def test_int8_weight_only_quantizes_the_denoiser_at_load_and_serves():
    """Fails without the quantization config (the denoiser keeps its float32 bytes)."""
    plain = load_pipeline(model())
    quantized = load_pipeline(model(quantization="int8_weight_only"))
    assert parameter_bytes(quantized.transformer) < 0.5 * parameter_bytes(plain.transformer)
    kinds = {type(p).__module__.split(".")[0] for p in quantized.transformer.parameters()}
    assert "torchao" in kinds
    # Only the denoiser: the text encoders and the VAE are as loaded.
    assert parameter_bytes(quantized.vae) == parameter_bytes(plain.vae)
    (image,) = serve(quantized, job(3))[0].images
    (reference,) = serve(plain, job(3))[0].images
    assert image.shape == reference.shape == (64, 64, 3)
    # int8 weights move the image a little, not to something else.
    assert np.abs(image.astype(int) - reference.astype(int)).mean() < 8


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9),
    reason="this device takes float8",
)
def test_float8_is_refused_at_start_without_a_recent_gpu():
    """Fails without the capability check (torchao quantizes, and the first call fails)."""
    with pytest.raises(OptimizationUnavailable, match=r"optimizations\.quantization: float8"):
        load_pipeline(model(quantization="float8_weight_only"))


# Attention backend


def test_the_native_backend_goes_through_the_dispatcher_and_serves():
    """Fails if the backend is not set on the processors."""
    pipeline = load_pipeline(model("tiny-flux", attention_backend="native"))
    processors = [m.processor for m in pipeline.transformer.modules() if hasattr(m, "processor")]
    assert processors
    assert {p._attention_backend.value for p in processors} == {"native"}
    (image,) = serve(pipeline, job(1))[0].images
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize(
    ("backend", "package"), [("flash", "flash_attn"), ("sage", "sageattention")]
)
def test_a_backend_whose_kernel_is_not_installed_fails_the_start(backend, package):
    """Fails without the wrapping of diffusers' requirement check (a bare RuntimeError)."""
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    with pytest.raises(OptimizationUnavailable, match=rf"attention_backend: the '{backend}'"):
        load_pipeline(model("tiny-flux", attention_backend=backend))


@pytest.mark.skipif(torch.cuda.is_available(), reason="cuDNN attention runs on CUDA")
def test_a_backend_that_cannot_run_on_this_device_fails_the_start():
    """diffusers accepts `_native_cudnn` on a CPU (nothing to install); its first attention
    call fails. Fails without the probe call at start."""
    with pytest.raises(OptimizationUnavailable, match="attention_backend: the '_native_cudnn'"):
        load_pipeline(model("tiny-flux", attention_backend="_native_cudnn"))


def test_a_backend_the_model_would_ignore_is_refused():
    """SD3's attention processors call torch's SDPA themselves: diffusers would accept `flex`
    and never use it. Fails without the check."""
    with pytest.raises(OptimizationUnavailable, match="does not go through diffusers"):
        load_pipeline(model(attention_backend="flex"))
    load_pipeline(model(attention_backend="native"))  # what it runs anyway


# VAE tiling and slicing


def count_calls(module, name: str) -> list[int]:
    """Counts calls of `module.name` (an instance attribute shadowing the method)."""
    calls = []
    method = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    setattr(module, name, counted)
    return calls


@pytest.mark.parametrize(("family", "dtype"), [("tiny-sd3", "float32"), ("tiny-sdxl", "bfloat16")])
def test_vae_tiling_decodes_large_images_in_tiles_at_their_size(family, dtype):
    """The tiny VAEs tile latents past 32x32 (images past 256 pixels). SDXL in bfloat16 keeps
    its VAE pinned in float32 (`shared_modules.py`), and the pin's input cast still applies
    under tiling. Fails without `enable_tiling`."""
    config = model(family, vae_tiling=True).model_copy(update={"dtype": dtype})
    pipeline = load_pipeline(config)
    tiled = count_calls(pipeline.vae, "tiled_decode")
    (image,) = serve(pipeline, job(2, side=320, steps=1))[0].images
    assert image.shape == (320, 320, 3)
    assert tiled
    assert {p.dtype for p in pipeline.vae.parameters()} == (
        {torch.float32} if family == "tiny-sdxl" else {pipeline.transformer.dtype}
    )


def test_vae_slicing_decodes_a_batch_one_image_at_a_time():
    """Fails without `enable_slicing` (one decode of both images)."""
    pipeline = load_pipeline(model(vae_slicing=True))
    decodes = count_calls(pipeline.vae, "_decode")
    images = serve(pipeline, job(5, n=2))[0].images
    assert [image.shape for image in images] == [(64, 64, 3)] * 2
    assert len(decodes) == 2


# Compile


def test_the_blocks_compiled_are_the_repeated_ones():
    sd3 = load_pipeline(model())
    assert repeated_blocks(sd3.transformer) == list(sd3.transformer.transformer_blocks)
    flux = load_pipeline(model("tiny-flux"))
    assert repeated_blocks(flux.transformer) == [
        *flux.transformer.transformer_blocks,
        *flux.transformer.single_transformer_blocks,
    ]
    with pytest.raises(OptimizationUnavailable, match="no repeated blocks"):
        compile_blocks(torch.nn.Linear(2, 2), CompileConfig())


@pytest.fixture(scope="module")
def warmed():
    """tiny-sd3 compiled and warmed up at 64x64 for calls of 1 to 3 images, from a clean
    dynamo state (earlier compilations in this process would shape its graphs)."""
    torch._dynamo.reset()
    config = model(compile=CompileConfig(warmup_sizes=["64x64"]))
    batching = BatchingConfig(max_batch_images=3, max_wait_ms=200)
    pipeline = load_pipeline(config)
    warmup = prepare_to_serve(pipeline, config, batching, compile_backend="eager")
    yield pipeline, warmup, batching
    torch._dynamo.reset()


def test_compile_warms_every_configured_shape_before_the_replica_is_ready(warmed):
    """Fails without the warm-up calls (nothing compiled at start)."""
    _, warmup, _ = warmed
    assert [(s.width, s.height, s.images) for s in warmup.shapes] == [(64, 64, 1), (64, 64, 3)]
    assert warmup.graphs > 0


def test_a_first_request_at_a_warmed_shape_compiles_nothing(warmed):
    """Including a batch between the warmed ones (2 images: the batch is a dynamic dimension
    after warming 1 and 3). Fails without the warm-up (the first request compiles)."""
    pipeline, _, batching = warmed
    before = compiled_graphs()
    results = serve(pipeline, job(7), batching=batching)
    results += serve(pipeline, job(8, n=3), batching=batching)
    results += serve(pipeline, job(9, n=2), batching=batching)
    assert compiled_graphs() == before
    assert [len(r.images) for r in results] == [1, 3, 2]


def test_a_shape_not_warmed_compiles_and_says_so(warmed, caplog):
    pipeline, _, batching = warmed
    before = compiled_graphs()
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        serve(pipeline, job(1, side=32), batching=batching)
    assert compiled_graphs() > before
    assert "compiled a new graph while serving" in caplog.text


def test_a_warm_up_size_the_model_cannot_make_fails_the_start():
    config = model(compile=CompileConfig(warmup_sizes=["40x40"]))
    with pytest.raises(OptimizationUnavailable, match=r"optimizations\.compile: .*40x40"):
        prepare_to_serve(load_pipeline(config), config, BatchingConfig(), "eager")


def test_inductor_blocks_make_eager_images_under_concurrency():
    """Two threads run the compiled blocks at once (6 calls, two at a time); each image
    matches the same seed's eager image within float tolerance, and nothing recompiles."""
    torch._dynamo.reset()  # inductor's own graphs, not the eager ones of the tests above
    eager = RequestPipelines(load_pipeline(model()))
    config = model(compile=CompileConfig(warmup_sizes=["32x32"], warmup_batch_sizes=[1]))
    compiled = load_pipeline(config)
    prepare_to_serve(compiled, config, BatchingConfig(max_batch_images=1))
    views = RequestPipelines(compiled)
    before = compiled_graphs()
    with ThreadPoolExecutor(2) as pool:
        images = list(pool.map(lambda seed: pixels(views.view(), seed), range(6)))
    assert compiled_graphs() == before
    for seed, image in enumerate(images):
        assert np.abs(image - pixels(eager.view(), seed)).max() <= 2
