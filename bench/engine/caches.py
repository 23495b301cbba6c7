"""Figures of diffusers' caches (`optimizations.cache`) on the embedded models: how much
denoiser work each kind skips, seconds per call, and how far its image is from the uncached
one of the same seed (PSNR).

    python -m bench.engine.caches [--models tiny-sd3 tiny-flux] [--sizes 64 256] [--steps 8 16]

The embedded models have random weights: their images are noise, and the steps of a random
denoiser are not alike the way a trained one's are, so the PSNR (and how much a threshold
skips) say little about a real model. The skipped fraction and the time are what carry over.
Calls run one at a time, on one CPU thread (steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import numpy as np
import torch

from deployments.config.model_config import ModelConfig
from deployments.config.optimizations_config import CacheConfig, OptimizationsConfig
from deployments.generator.model.cache_hooks import CacheUnsupported, apply_cache, call_scope
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.pipelines import RequestPipelines, load_pipeline

# Each kind at a few settings (label: the CacheConfig fields), from mild to aggressive.
_ALL_TIMESTEPS = [0, 1000]
SETTINGS: dict[str, dict[str, dict[str, Any]]] = {
    "first_block": {f"threshold={t}": {"threshold": t} for t in (0.2, 0.5, 1.0)},
    "taylorseer": {
        "interval=2 warm-up=3": {"options": {"cache_interval": 2, "disable_cache_before_step": 3}},
        "interval=3 warm-up=2": {"options": {"cache_interval": 3, "disable_cache_before_step": 2}},
        "interval=3 warm-up=2 lite": {
            "options": {"cache_interval": 3, "disable_cache_before_step": 2, "use_lite_mode": True}
        },
    },
    "magcache": {
        "threshold=0.06 (FLUX ratios)": {"threshold": 0.06, "options": {"mag_ratios": "flux"}},
        "threshold=0.2 max_skip=4": {
            "threshold": 0.2,
            "options": {"mag_ratios": "flux", "max_skip_steps": 4},
        },
    },
    "pyramid_attention_broadcast": {
        "spatial=2 timesteps 100-800": {"options": {"spatial_attention_block_skip_range": 2}},
        "spatial=3 cross=3 all timesteps": {
            "options": {
                "spatial_attention_block_skip_range": 3,
                "spatial_attention_timestep_skip_range": _ALL_TIMESTEPS,
                "cross_attention_block_skip_range": 3,
                "cross_attention_timestep_skip_range": _ALL_TIMESTEPS,
            }
        },
    },
}
# A kind that does not work on a family is refused at the replica's start (see
# deployments/generator/model/cache_hooks.py); it is not measured there.
UNSUPPORTED = {"tiny-sd3": {"first_block"}, "tiny-sdxl": {"first_block", "taylorseer", "magcache"}}


class DenoiserWork:
    """Counts the denoiser's matrix work while active: the multiply-adds of every Linear and
    Conv2d layer that runs (attention's own products are left out). What a cache skips shows
    up as layers that never run (a skipped block's, a reused attention's), whichever hook
    skipped them."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        kinds = (torch.nn.Linear, torch.nn.Conv2d)
        self._layers = [m for m in denoiser.modules() if isinstance(m, kinds)]
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self.multiply_adds = 0

    def _count(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, torch.nn.Linear):
            work = inputs[0].numel() // module.in_features * module.weight.numel()
        else:  # each output value: in_channels / groups x kernel multiply-adds
            work = output.numel() * module.weight[0].numel()
        with self._lock:
            self.multiply_adds += work

    def __enter__(self) -> DenoiserWork:
        self._handles = [m.register_forward_hook(self._count) for m in self._layers]
        return self

    def __exit__(self, *_exc: object) -> None:
        for handle in self._handles:
            handle.remove()


def model_config(name: str, size: int, steps: int, cache: CacheConfig | None) -> ModelConfig:
    return ModelConfig(
        id=name,
        source=f"embedded:{name}",
        device="cpu",
        dtype="float32",
        default_size=f"{size}x{size}",
        default_steps=steps,
        optimizations=OptimizationsConfig(cache=cache),
    )


def measure(model: ModelConfig, repeats: int = 3) -> tuple[np.ndarray, int, float]:
    """The image of seed 0, the denoiser's multiply-adds for it, and the best seconds per
    call, with the model's cache (if any) on."""
    pipeline = load_pipeline(model)
    apply_cache(pipeline, model)
    pipelines = RequestPipelines(pipeline)
    size = int(model.default_size.partition("x")[0])
    best = float("inf")
    for _ in range(repeats):
        view = pipelines.view()
        with DenoiserWork(denoiser_of(pipeline)) as work, call_scope(view):
            started = time.perf_counter()
            image = view(
                prompt="a lighthouse at dusk",
                width=size,
                height=size,
                num_inference_steps=model.default_steps,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images[0]
            best = min(best, time.perf_counter() - started)
    return image, work.multiply_adds, best


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two images in [0, 1], in dB (inf when equal)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd3", "tiny-flux"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--steps", nargs="+", type=int, default=[8, 16])
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    header = f"{'model':9} {'size':>4} {'steps':>5}  {'kind':28} {'setting':32}"
    print(f"{header} {'skipped':>7} {'s/call':>7} {'PSNR dB':>7}")
    for name in options.models:
        for size in options.sizes:
            for steps in options.steps:
                reference, work, seconds = measure(model_config(name, size, steps, None))
                row = f"{name:9} {size:>4} {steps:>5}  {'(none)':28} {'':32}"
                print(f"{row} {0:>7.0%} {seconds:>7.3f} {'-':>7}", flush=True)
                for kind, settings in SETTINGS.items():
                    if kind in UNSUPPORTED.get(name, ()):
                        continue
                    for label, setting in settings.items():
                        cache = CacheConfig(kind=kind, **setting)
                        row = f"{name:9} {size:>4} {steps:>5}  {kind:28} {label:32}"
                        try:
                            image, cached_work, cached_s = measure(
                                model_config(name, size, steps, cache)
                            )
                        except CacheUnsupported as error:
                            print(f"{row} refused at start: {str(error)[-70:]}", flush=True)
                            continue
                        skipped = 1 - cached_work / work
                        figures = f"{skipped:>7.0%} {cached_s:>7.3f} {psnr(image, reference):>7.1f}"
                        print(f"{row} {figures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
