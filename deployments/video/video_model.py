"""The video model a worker holds: one diffusers video pipeline (Wan 2.1's, text-to-video or
image-to-video), the limits a request must keep to, and one call that turns a request into
frames, step by step, cancellable between steps.

Several jobs may run at once on one `VideoModel` (one per worker thread). The weights are
shared; what a call changes is its own:
- a scheduler per call: a pipeline view is the pipeline's class called on the shared
  components with a fresh scheduler (schedulers keep per-run state, UniPC the most: the
  model outputs of its last steps). Not `from_pipe`, which casts shared weights to float32
  unless given a dtype (diffusers issue 12754);
- a `torch.Generator` per call, on the CPU, so a seed draws the same noise on any device;
- the prompt's encoding under one lock per model: fast (Rust) tokenizers raise
  `RuntimeError: Already borrowed` when two threads use one at once. Only `encode_prompt`
  is locked (milliseconds), not the call (minutes);
- the VAE's encode and decode under one lock per model: Wan's causal VAE runs a clip a few
  frames at a time and keeps the features it carries between them on the module itself
  (`_feat_map`, `_conv_idx`, reset by `clear_cache` at every encode and decode), so two at
  once corrupt each other's frames. Decoding a clip is also a call's peak of memory, which
  two at once would double.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline

from deployments.generator.model.components import to_uint8
from deployments.generator.model.embedded import ensure_embedded_model, is_embedded
from deployments.generator.model.pipelines import (
    call_parameters,
    init_parameters,
    resolve_device,
    resolve_dtype,
)

# The most frames a call makes unless the loader says otherwise: Wan 2.1's training length
# (5 s at 16 fps); longer clips lose coherence and memory grows with every latent frame.
DEFAULT_MAX_FRAMES = 81
# Frames per second of the clips Wan 2.1 and 2.2 (14B) were trained on. Nothing in a
# checkpoint records it.
DEFAULT_FPS = 16
# Wan's pipelines refuse a width or height that is not a multiple of 16 (`check_inputs`),
# whatever the VAE and patch size allow.
PIPELINE_SIZE_MULTIPLE = 16
# Components run in float32 whatever the model's dtype, as Wan's own examples load them:
# the VAE (bfloat16 decoding bands colours) and the image encoder (small, run once a call).
FLOAT32_COMPONENTS = ("vae", "image_encoder")


@dataclass(frozen=True)
class VideoLimits:
    """What a request must keep to on this model, read off the loaded pipeline."""

    # Width and height must be multiples: the VAE's spatial factor times the transformer's
    # patch size (a latent patch), and the pipeline's own rule of 16.
    size_multiple: int
    # `num_frames` must be `frame_multiple * k + 1` (k >= 1): the VAE keeps the first frame
    # and then compresses each `frame_multiple` frames into one latent frame.
    frame_multiple: int
    # The most frames served: the loader's cap, within the transformer's rotary table.
    max_frames: int
    # Frames per second the model was trained at (what an MP4 of its frames plays at).
    default_fps: int
    # Whether the pipeline takes `image` (the first frame), and then needs it.
    image_to_video: bool
    # Whether `guidance_scale` applies (classifier-free guidance above 1).
    guidance: bool
    # The largest width and height: the transformer's rotary table has one position per
    # patch along each axis (None: no bound known).
    max_width: int | None
    max_height: int | None


@dataclass(frozen=True)
class VideoRequest:
    """One clip to generate."""

    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    num_frames: int
    num_inference_steps: int
    # None: the pipeline's default.
    guidance_scale: float | None
    seed: int
    # RGB uint8 (height, width, 3): the first frame, image-to-video only.
    image: np.ndarray | None = None


class VideoCancelled(Exception):
    """Raised out of `VideoModel.generate` when `cancelled()` said so at a step's end."""


class VideoModel:
    """One shared video pipeline, run by any number of threads at once."""

    def __init__(self, pipeline: DiffusionPipeline, max_frames: int = DEFAULT_MAX_FRAMES) -> None:
        if "num_frames" not in call_parameters(type(pipeline)):
            raise ValueError(f"{type(pipeline).__name__} is not a video pipeline")
        self.pipeline = pipeline
        self._limits = _limits_of(pipeline, max_frames)
        self._encode_lock = threading.Lock()
        _serialize_vae(pipeline)

    @classmethod
    def load(
        cls,
        source: str,
        device: str = "cpu",
        dtype: str = "float32",
        max_frames: int = DEFAULT_MAX_FRAMES,
    ) -> VideoModel:
        """Load `source`: `embedded:tiny-wan` (built on first use), a hub id or a local
        `save_pretrained` directory; the class is the checkpoint's (its model_index.json).
        `device` and `dtype` may be "auto" (the best device there is, bfloat16 on CUDA)."""
        where = resolve_device(device)
        weights = resolve_dtype(dtype, where)
        path = ensure_embedded_model(source) if is_embedded(source) else source
        dtypes = {"default": weights, **dict.fromkeys(FLOAT32_COMPONENTS, torch.float32)}
        pipeline = DiffusionPipeline.from_pretrained(path, dtype=dtypes)
        pipeline.to(where)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, max_frames)

    @property
    def limits(self) -> VideoLimits:
        return self._limits

    def check(self, request: VideoRequest) -> None:
        """Raise ValueError naming the first parameter of `request` this model cannot run."""
        limits = self._limits
        for name, value, bound in (
            ("width", request.width, limits.max_width),
            ("height", request.height, limits.max_height),
        ):
            if value < limits.size_multiple or value % limits.size_multiple:
                raise ValueError(f"{name} must be a positive multiple of {limits.size_multiple}")
            if bound is not None and value > bound:
                raise ValueError(f"{name} must be at most {bound}")
        frames, multiple = request.num_frames, limits.frame_multiple
        if frames < multiple + 1 or (frames - 1) % multiple:
            raise ValueError(f"num_frames must be {multiple}k+1 with k >= 1 ({multiple + 1}, ...)")
        if frames > limits.max_frames:
            raise ValueError(f"num_frames must be at most {limits.max_frames}")
        if request.num_inference_steps < 1:
            raise ValueError("num_inference_steps must be at least 1")
        if request.guidance_scale is not None and not limits.guidance:
            raise ValueError("guidance_scale: this model takes no guidance scale")
        if not 0 <= request.seed < 2**64:
            raise ValueError("seed must be in [0, 2**64)")
        _check_image(request, limits.image_to_video)

    def generate(
        self,
        request: VideoRequest,
        on_step: Callable[[int, int], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> np.ndarray:
        """The clip of `request`: uint8 frames (num_frames, height, width, 3).

        After each denoising step, `on_step(steps_done, total_steps)`, then `cancelled()`:
        true, the call raises VideoCancelled (the step running when a job is cancelled is
        the last). Raises ValueError as `check` does."""
        self.check(request)
        if cancelled is not None and cancelled():
            raise VideoCancelled("cancelled before the first step")

        def step_end(pipe: Any, step: int, timestep: Any, tensors: dict) -> dict:
            if on_step is not None:
                on_step(step + 1, getattr(pipe, "num_timesteps", request.num_inference_steps))
            if cancelled is not None and cancelled():
                raise VideoCancelled(f"cancelled after step {step + 1}")
            return {}

        output = self._view()(
            **self.call_arguments(request),
            generator=torch.Generator("cpu").manual_seed(request.seed),
            output_type="np",
            callback_on_step_end=step_end,
        )
        return to_uint8(output.frames[0])

    def call_arguments(self, request: VideoRequest) -> dict[str, Any]:
        """The pipeline's arguments for `request`, but its generator and output type: what
        calling the pipeline directly takes to make the same clip."""
        arguments: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "num_frames": request.num_frames,
            "num_inference_steps": request.num_inference_steps,
        }
        if request.guidance_scale is not None:
            arguments["guidance_scale"] = request.guidance_scale
        if request.image is not None:
            arguments["image"] = PIL.Image.fromarray(request.image)
        return arguments

    def _view(self) -> DiffusionPipeline:
        """A pipeline over the shared weights with its own scheduler, safe in a thread."""
        shared = self.pipeline
        cls = type(shared)
        scheduler = shared.scheduler
        components = {
            **shared.components,
            "scheduler": type(scheduler).from_config(scheduler.config),
        }
        accepted = init_parameters(cls)
        # The pipeline's options beside its components (Wan 2.2's `boundary_ratio`,
        # `expand_timesteps`), as loaded: a view without them would run the class defaults.
        options = {
            name: shared.config[name]
            for name in accepted
            if name in shared.config and name not in components and name != "self"
        }
        view = cls(**{k: v for k, v in components.items() if k in accepted}, **options)
        view.set_progress_bar_config(disable=True)
        # An instance attribute shadows the method: the pipeline's own call goes through it.
        view.encode_prompt = _locked(view.encode_prompt, self._encode_lock)
        return view


def _limits_of(pipeline: DiffusionPipeline, max_frames: int) -> VideoLimits:
    """The limits of a loaded video pipeline, from its VAE's factors and its transformer's
    patch size and rotary table (Wan 2.2 A14B's second transformer has the same layout)."""
    denoiser = getattr(pipeline, "transformer", None) or pipeline.transformer_2
    config = denoiser.config
    patch = config.patch_size
    # Wan's is (frames, height, width); LTX's and HunyuanVideo's one int and `patch_size_t`.
    patch_t, patch_h, patch_w = (
        tuple(patch)
        if isinstance(patch, list | tuple)
        else (config.get("patch_size_t", 1), patch, patch)
    )
    spatial = int(pipeline.vae_scale_factor_spatial)
    temporal = int(pipeline.vae_scale_factor_temporal)
    multiple = math.lcm(PIPELINE_SIZE_MULTIPLE, spatial * patch_h, spatial * patch_w)
    positions = config.get("rope_max_seq_len")
    max_height = max_width = None
    if positions is not None:
        max_height, max_width = positions * patch_h * spatial, positions * patch_w * spatial
        # The largest num_frames whose latent frames the table still holds.
        max_frames = min(max_frames, (positions * patch_t - 1) * temporal + 1)
    takes = call_parameters(type(pipeline))
    return VideoLimits(
        size_multiple=multiple,
        frame_multiple=temporal,
        max_frames=max_frames,
        default_fps=DEFAULT_FPS,
        image_to_video="image" in takes,
        guidance="guidance_scale" in takes,
        max_width=max_width and max_width - max_width % multiple,
        max_height=max_height and max_height - max_height % multiple,
    )


def _check_image(request: VideoRequest, image_to_video: bool) -> None:
    image = request.image
    if not image_to_video:
        if image is not None:
            raise ValueError("image: this model makes videos from text only")
        return
    if image is None:
        raise ValueError("image: this model makes videos from an image, and none was given")
    if image.dtype != np.uint8 or image.shape != (request.height, request.width, 3):
        raise ValueError(
            f"image must be RGB uint8 of the video's size ({request.height}, {request.width}, 3);"
            f" got {image.dtype} {image.shape}"
        )


def _serialize_vae(pipeline: DiffusionPipeline) -> None:
    """Put the shared VAE's encode and decode under one lock (see the module's docstring),
    once: instance attributes that shadow the methods, for every view of the pipeline."""
    vae = pipeline.vae
    if getattr(vae, "_video_model_lock", None) is not None:
        return
    lock = threading.Lock()
    vae._video_model_lock = lock
    vae.encode = _locked(vae.encode, lock)
    vae.decode = _locked(vae.decode, lock)


def _locked(method: Callable[..., Any], lock: threading.Lock) -> Callable[..., Any]:
    @functools.wraps(method)
    def locked(*args: Any, **kwargs: Any) -> Any:
        with lock:
            return method(*args, **kwargs)

    return locked
