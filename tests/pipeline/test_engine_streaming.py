"""Streamed jobs on the real embedded pipeline: progress, previews, timings, metrics, cancel."""

from __future__ import annotations

import asyncio
import itertools
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deployments.config.model_config import BatchingConfig, ModelConfig
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.progress.previews import LatentPreviewer
from deployments.jobs import GeneratedImages, GenerationJob, PartialImage, StepProgress
from tests.jobs import make_job


class RecordedMetrics:
    def __init__(self) -> None:
        self.batches: list[dict] = []
        self.waiting: list[int] = []

    def batch_finished(self, **batch) -> None:
        self.batches.append(batch)

    def queue_changed(self, waiting_jobs: int) -> None:
        self.waiting.append(waiting_jobs)


def streamed_job(seed: int, *, steps: int, n: int = 1, partial_images: int = 0) -> GenerationJob:
    return make_job(
        seed,
        n=n,
        prompt="a lighthouse",
        height=32,
        num_inference_steps=steps,
        partial_images=partial_images,
    )


async def collect(engine: ImageEngine, job: GenerationJob) -> list:
    return [event async for event in engine.stream(job)]


@pytest.fixture(scope="module")
def pipeline():
    return load_pipeline(ModelConfig(device="cpu", dtype="float32"))


@pytest.fixture
def metrics() -> RecordedMetrics:
    return RecordedMetrics()


@pytest.fixture
def engine(pipeline, metrics):
    engine = ImageEngine(
        pipeline,
        worker_threads=2,
        batching=BatchingConfig(max_batch_images=8, max_wait_ms=0),
        metrics=metrics,
    )
    yield engine
    engine.shutdown()


def test_a_stream_has_previews_progress_and_ends_with_the_images(engine, metrics):
    events = asyncio.run(collect(engine, streamed_job(1, steps=6, n=2, partial_images=2)))
    final = events[-1]
    assert isinstance(final, GeneratedImages)
    assert [image.shape for image in final.images] == [(32, 64, 3)] * 2
    previews = [e for e in events if isinstance(e, PartialImage)]
    assert [(p.image_index, p.partial_image_index) for p in previews] == [
        (0, 0), (1, 0), (0, 1), (1, 1)
    ]  # fmt: skip
    # At the latents' resolution (the VAE downsamples 8 times per side).
    assert {p.pixels.shape for p in previews} == {(4, 8, 3)}
    assert {p.pixels.dtype for p in previews} == {np.dtype(np.uint8)}
    progress = [e for e in events if isinstance(e, StepProgress)]
    assert progress[-1] == StepProgress(step=6, total_steps=6)
    assert all(a.step < b.step for a, b in itertools.pairwise(progress))
    # The replica's account of the job, and what the metrics were told.
    assert final.denoise_s > 0 and final.decode_s > 0 and final.text_encode_s > 0
    assert final.queue_s >= 0
    (batch,) = metrics.batches
    assert batch["images"] == 2 and batch["steps"] == 6 and batch["denoise_s"] > 0
    assert metrics.waiting[-1] == 0


def test_streamed_and_plain_generation_give_the_same_images(engine):
    job = streamed_job(42, steps=3, partial_images=1)
    streamed = asyncio.run(collect(engine, job))[-1]
    plain = asyncio.run(engine.generate(job))
    assert streamed.images[0].tobytes() == plain.images[0].tobytes()


def test_batched_streams_each_get_their_own_previews(pipeline):
    engine = ImageEngine(
        pipeline, worker_threads=1, batching=BatchingConfig(max_batch_images=8, max_wait_ms=200)
    )

    async def together():
        blocker = asyncio.ensure_future(engine.generate(streamed_job(0, steps=2)))
        await asyncio.sleep(0.01)  # the next two wait for the one thread, so they batch
        results = await asyncio.gather(
            collect(engine, streamed_job(10, steps=4, n=1, partial_images=1)),
            collect(engine, streamed_job(20, steps=4, n=2, partial_images=1)),
        )
        await blocker
        return results

    try:
        first, second = asyncio.run(together())
    finally:
        engine.shutdown()
    assert engine.batch_sizes[-1] == 3
    assert [e.image_index for e in first if isinstance(e, PartialImage)] == [0]
    assert [e.image_index for e in second if isinstance(e, PartialImage)] == [0, 1]
    assert first[-1].batch_images == second[-1].batch_images == 3


def test_closing_a_stream_stops_its_generation(pipeline):
    engine = ImageEngine(pipeline, worker_threads=1)
    job = streamed_job(3, steps=100_000)

    async def read_then_leave():
        events = engine.stream(job)
        async for event in events:
            if isinstance(event, StepProgress):
                break
        await events.aclose()
        steps_at_close = engine.steps_run
        await asyncio.sleep(0.5)
        return steps_at_close

    try:
        steps_at_close = asyncio.run(read_then_leave())
        after = engine.steps_run
        # The thread is free again: a new job runs at once.
        started = time.perf_counter()
        asyncio.run(engine.generate(streamed_job(4, steps=1)))
        assert time.perf_counter() - started < 5
    finally:
        engine.shutdown()
    assert after - steps_at_close <= 2


class LinearVAE(torch.nn.Module):
    """A VAE whose encoder is linear (8x8 average, then a random mix into 16 channels), so a
    perfect preview map exists: the fit must find it."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = torch.nn.Conv2d(3, 16, kernel_size=1)
        self.config = SimpleNamespace(scaling_factor=1.5, shift_factor=0.1)

    def encode(self, images: torch.Tensor):
        mean = self.mix(torch.nn.functional.avg_pool2d(images, 8))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


def test_the_preview_map_is_fitted_to_the_vae():
    vae = LinearVAE()
    previewer = LatentPreviewer.fit(vae, downsampling=8)
    colours = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    images = torch.nn.functional.interpolate(colours, size=(32, 32), mode="nearest")
    with torch.no_grad():
        latents = (vae.encode(images).latent_dist.mean - 0.1) * 1.5  # as the pipeline has them
    previews = previewer.to_rgb(latents)
    expected = ((colours.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
    assert [p.shape for p in previews] == [(4, 4, 3)] * 2
    assert np.abs(np.stack(previews).astype(float) - expected).max() <= 1.0


class VideoStyleVAE(LinearVAE):
    """Qwen-Image's and Wan's shape: frames in (B, 3, T, H, W), latents out (B, C, T, h, w),
    normalised per channel (`latents_mean`, `latents_std`) rather than by one factor."""

    def __init__(self) -> None:
        super().__init__()
        mean, std = torch.linspace(-1, 1, 16), torch.linspace(0.5, 2.0, 16)
        self.config = SimpleNamespace(latents_mean=mean.tolist(), latents_std=std.tolist())

    def encode(self, frames: torch.Tensor):
        if frames.ndim != 5:
            raise ValueError("not enough values to unpack (expected 5, got 4)")
        mean = super().encode(frames[:, :, 0]).latent_dist.mean.unsqueeze(2)
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean))


class DeterministicVAE(LinearVAE):
    """Sana's DC-AE: no distribution, the latents themselves (`.latent`)."""

    def encode(self, images: torch.Tensor):
        return SimpleNamespace(latent=super().encode(images).latent_dist.mean)


def assert_previews_match(previewer: LatentPreviewer, latents: torch.Tensor, colours) -> None:
    previews = previewer.to_rgb(latents)
    expected = ((colours.permute(0, 2, 3, 1) + 1) * 127.5).numpy()
    assert [p.shape for p in previews] == [(4, 4, 3)] * len(colours)
    assert np.abs(np.stack(previews).astype(float) - expected).max() <= 1.0


def test_a_video_style_vae_gets_previews_of_its_one_frame():
    vae = VideoStyleVAE()
    previewer = LatentPreviewer.fit(vae, downsampling=8)
    colours = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    images = torch.nn.functional.interpolate(colours, size=(32, 32), mode="nearest")
    mean = torch.tensor(vae.config.latents_mean).reshape(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).reshape(1, -1, 1, 1, 1)
    with torch.no_grad():  # as the pipeline has them: (z - mean) / std, 5-D
        latents = (vae.encode(images.unsqueeze(2)).latent_dist.mean - mean) / std
    assert_previews_match(previewer, latents, colours)


def test_a_deterministic_vae_gets_previews():
    vae = DeterministicVAE()
    previewer = LatentPreviewer.fit(vae, downsampling=8)
    colours = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(7)) * 2 - 1
    images = torch.nn.functional.interpolate(colours, size=(32, 32), mode="nearest")
    with torch.no_grad():
        latents = (vae.encode(images).latent - 0.1) * 1.5
    assert_previews_match(previewer, latents, colours)


def test_a_preview_that_fails_never_fails_the_images(pipeline, monkeypatch):
    """A family whose latents cannot be laid out for a preview: the job still gets its
    images (the same as without previews) and its progress; previews just stop."""

    def cannot_lay_out(*args, **kwargs):
        raise ValueError("no (B, C, h, w) view of these latents")

    monkeypatch.setattr("deployments.generator.calls.call_runner.spatial_latents", cannot_lay_out)
    engine = ImageEngine(pipeline, worker_threads=1)
    try:
        events = asyncio.run(collect(engine, streamed_job(3, steps=4, partial_images=2)))
        plain = asyncio.run(engine.generate(streamed_job(3, steps=4)))
    finally:
        engine.shutdown()
    assert not [event for event in events if isinstance(event, PartialImage)]
    assert [e.step for e in events if isinstance(e, StepProgress)][-1] == 4
    (result,) = [event for event in events if isinstance(event, GeneratedImages)]
    np.testing.assert_array_equal(result.images[0], plain.images[0])


def test_the_embedded_models_say_they_preview(engine):
    assert engine.capabilities().previews
