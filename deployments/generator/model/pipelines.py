"""Loading the one shared pipeline of a replica, and the per-request views that run on it.

A replica holds ONE diffusers pipeline for its whole life. Each request runs on a view: a new
pipeline object over the same component objects (same weights in memory), except for a fresh
scheduler, because schedulers keep per-run state (step index, sigmas) and a shared one fails
under concurrency (`IndexError: index 21 is out of bounds ...`). A text-to-image request's
view is of the loaded pipeline's class; an edit's is of the family's image-to-image or
inpainting class (found the way diffusers' auto pipelines find it), over the same components:
edits never load a second copy of the weights.

Two diffusers traps are avoided here on purpose:
- `DiffusionPipeline.from_pipe` casts the shared modules to float32 unless given a dtype
  (diffusers issue 12754), doubling a bf16 model's memory on the first request. The view is
  built by calling the pipeline class on the shared components instead: no `.to()`, no copy.
- Fast (Rust) tokenizers raise `RuntimeError: Already borrowed` when two threads use one at
  once. Every view's `encode_prompt` runs under one lock per shared pipeline.
And one of ours: diffusers' SDXL pipelines move a `force_upcast` VAE to float32 and back
inside a call, under every concurrent call; `shared_modules.py` keeps it in float32 instead.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from pathlib import Path
from typing import Any

import diffusers
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.auto_pipeline import (
    AUTO_IMAGE2IMAGE_PIPELINES_MAPPING,
    AUTO_INPAINT_PIPELINES_MAPPING,
    AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
)

from deployments.config.model_config import ModelConfig
from deployments.generator.model.components import DTYPES
from deployments.generator.model.embedded import ensure_embedded_model, is_embedded
from deployments.generator.model.model_limits import edit_step_rounding, size_limits
from deployments.generator.model.optimizations import apply_at_load, quantization_config
from deployments.generator.model.servability import check_servable, not_matching
from deployments.generator.model.shared_modules import pin_upcast_vae
from deployments.jobs import MAX_INPUT_IMAGES, OPTIONAL_PARAMETERS, ModelCapabilities, Task

logger = logging.getLogger("ray.serve")

# The most oblong reference image a model that says nothing of it takes (w:h or h:w).
DEFAULT_REFERENCE_ASPECT = 8.0


def resolve_device(requested: str) -> torch.device:
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested != "auto":
        return DTYPES[requested]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_pipeline(model: ModelConfig) -> DiffusionPipeline:
    """Load the model's pipeline onto its device, the same way for every kind of source, with
    the optimizations that are set at load (`deployments/generator/model/optimizations.py`).

    Gated hub models (SD3 is one) read the Hugging Face token from `HF_TOKEN`.
    """
    device = resolve_device(model.device)
    dtype = resolve_dtype(model.dtype, device)
    source: str | Path = model.source
    if is_embedded(model.source):
        source = ensure_embedded_model(model.source)
    pipeline_class = pipeline_class_named(model.pipeline_class)
    logger.info(
        "loading %s from %s as %s on %s with %s",
        model.id,
        source,
        dtype,
        device,
        pipeline_class.__name__,
    )
    quantization = quantization_config(model.optimizations, source, model.revision, device)
    try:
        pipeline = pipeline_class.from_pretrained(
            source,
            revision=model.revision,
            dtype=dtype,
            **({"quantization_config": quantization} if quantization is not None else {}),
        )
    except ValueError as error:
        if model.pipeline_class is None or "expected" not in str(error):
            raise
        raise not_matching(model, error) from None
    check_servable(model, pipeline)
    pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    # Now, while no call runs: what the shared modules are after loading is what they stay.
    pin_upcast_vae(pipeline, task_classes(type(pipeline)).values())
    apply_at_load(pipeline, model.optimizations)
    return pipeline


def task_classes(text_to_image: type, by_name: bool = True) -> dict[Task, type]:
    """The pipeline classes of each task of the family of `text_to_image`: by diffusers' own
    auto-pipeline tables, else by diffusers' naming of a family's classes (`ChromaPipeline`,
    `ChromaImg2ImgPipeline`, `ChromaInpaintPipeline`; some families are in no table). A
    family without an image-to-image or inpainting class lacks the task."""
    classes: dict[Task, type] = {"text-to-image": text_to_image}
    for family, cls in AUTO_TEXT2IMAGE_PIPELINES_MAPPING.items():
        if cls is text_to_image:
            for task, mapping in (
                ("image-to-image", AUTO_IMAGE2IMAGE_PIPELINES_MAPPING),
                ("inpaint", AUTO_INPAINT_PIPELINES_MAPPING),
            ):
                if family in mapping:
                    classes[task] = mapping[family]
            break
    if not by_name:
        return classes
    stem = text_to_image.__name__.removesuffix("Pipeline")
    for task, suffix in (("image-to-image", "Img2ImgPipeline"), ("inpaint", "InpaintPipeline")):
        named = getattr(diffusers, stem + suffix, None)
        if task not in classes and isinstance(named, type) and issubclass(named, DiffusionPipeline):
            classes[task] = named
    if "image-to-image" not in classes and "image" in call_parameters(text_to_image):
        # A model conditioned on input images (FLUX.2): its own class edits, given `image`.
        classes["image-to-image"] = text_to_image
    return classes


def pipeline_class_named(name: str | None) -> type[DiffusionPipeline]:
    """diffusers' pipeline class called `name`; without a name, `DiffusionPipeline`, which
    reads the class from the checkpoint's model_index.json. Raises ValueError naming
    `models[].pipeline_class` for a name diffusers has no pipeline class by."""
    if name is None:
        return DiffusionPipeline
    found = getattr(diffusers, name, None)
    if not (isinstance(found, type) and issubclass(found, DiffusionPipeline)):
        raise ValueError(f"models[].pipeline_class: diffusers has no pipeline class named {name!r}")
    return found


def call_parameters(pipeline_class: type) -> frozenset[str]:
    """The arguments the pipeline class's `__call__` takes (asked for every pipeline call)."""
    return frozenset(inspect.signature(pipeline_class.__call__).parameters)


@functools.cache
def init_parameters(pipeline_class: type) -> frozenset[str]:
    """The components (and options) the pipeline class's constructor takes."""
    return frozenset(inspect.signature(pipeline_class.__init__).parameters)


def guidance_of(pipeline: DiffusionPipeline) -> str:
    """What a request's `guidance_scale` does on this pipeline: "distilled" (an input of a
    guidance-distilled denoiser, FLUX.1-dev), "true-cfg" (the pipeline's `true_cfg_scale`
    with a negative prompt: a non-distilled FLUX-style model, Qwen-Image, whose
    `guidance_scale` would be ignored), "classifier-free" (SD3, SDXL, Chroma, Z-Image, an
    undistilled FLUX.2 Klein), or "none" (a step-distilled FLUX.2 Klein, which ignores it)."""
    takes = call_parameters(type(pipeline))
    denoiser = getattr(pipeline, "transformer", None) or getattr(pipeline, "unet", None)
    if getattr(getattr(denoiser, "config", None), "guidance_embeds", False):
        return "distilled"
    if pipeline.config.get("is_distilled", False):
        return "none"  # step-distilled (FLUX.2 Klein 4B/9B): its pipeline ignores the scale
    if "true_cfg_scale" in takes:
        return "true-cfg"
    return "classifier-free" if "guidance_scale" in takes else "none"


class RequestPipelines:
    """Makes per-request views of one shared pipeline, for each task its family has."""

    def __init__(self, shared: DiffusionPipeline) -> None:
        self.shared = shared
        self._encode_lock = threading.Lock()
        self._classes = task_classes(type(shared))
        self.guidance = guidance_of(shared)
        # A no-op for a pipeline from `load_pipeline`; for any other, it runs before any view.
        pin_upcast_vae(shared, self._classes.values())
        # Edit classes found only by their names are in no table of diffusers' own, and one may
        # not run with its family's components (Chroma's inpainting reads a config key that
        # Chroma's transformer lacks): what passes validation must generate, so such a class
        # serves its task only once a one-step call of it has run.
        tabled = task_classes(type(shared), by_name=False)
        for task in [task for task in self._classes if task not in tabled]:
            if not self._runs(task):
                del self._classes[task]
        self.reference_images = self._references()

    def capabilities(self) -> ModelCapabilities:
        tasks = {}
        for task, cls in self._classes.items():
            takes = call_parameters(cls)
            supported = {
                name for name, argument in OPTIONAL_PARAMETERS.items() if argument in takes
            }
            if self.guidance == "none":
                supported.discard("guidance_scale")  # it would be silently ignored
            if "true_cfg_scale" in takes and self.guidance == "distilled":
                # A guidance-distilled FLUX uses a negative prompt only with "true" guidance
                # on top (`true_cfg_scale` > 1, twice the compute), which this service does not
                # run: the negative prompt would be silently ignored.
                supported.discard("negative_prompt")
            tasks[task] = frozenset(supported)
        rounding = {
            task: rule
            for task, cls in self._classes.items()
            if "strength" in tasks[task] and (rule := edit_step_rounding(cls)) is not None
        }
        sizes = size_limits(self.shared)
        smallest, widest = self.reference_rules()
        return ModelCapabilities(
            pipeline_class=type(self.shared).__name__,
            tasks=tasks,
            max_width=sizes.max_width,
            max_height=sizes.max_height,
            size_multiple=sizes.size_multiple,
            edit_step_rounding=rounding,
            guidance=self.guidance,
            reference_images=self.reference_images,
            reference_min_side=smallest,
            reference_max_aspect=widest,
        )

    def _runs(self, task: Task) -> bool:
        """Whether a one-step call of `task`'s class runs on the shared components (its
        latents only, at the smallest size the model takes)."""
        side = self._probe_side()
        image = PIL.Image.new("RGB", (side, side), (127, 127, 127))
        arguments: dict[str, Any] = {"prompt": "", "image": image, "strength": 1.0}
        if task == "inpaint":
            arguments["mask_image"] = PIL.Image.new("L", (side, side), 255)
        try:
            self._probe(task, arguments)
        except Exception as error:
            logger.warning(
                "%s runs no %s: a one-step call of %s failed (%s: %s)",
                type(self.shared).__name__,
                task,
                self._classes[task].__name__,
                type(error).__name__,
                error,
            )
            return False
        return True

    def _references(self) -> int:
        """How many reference images the model's edits take (`ModelCapabilities`): 0 where
        its image-to-image class starts from the image (`strength`); else whether a
        one-step call with two references uses the second (one output, which changes with
        it): a class whose `image` list is a batch of inputs instead (FLUX.1 Kontext,
        Qwen-Image-Edit) makes two outputs, or fails, and takes one."""
        cls = self._classes.get("image-to-image")
        if cls is None or "strength" in call_parameters(cls):
            return 0
        multiple = size_limits(self.shared).size_multiple
        smallest, _ = self.reference_rules()
        side = max(self._probe_side(), -(-smallest // multiple) * multiple)
        first = PIL.Image.new("RGB", (side, side), (127, 127, 127))
        outputs = []
        try:
            for colour in ((0, 0, 0), (255, 255, 255)):
                second = PIL.Image.new("RGB", (side, side), colour)
                outputs.append(
                    self._probe("image-to-image", {"prompt": "", "image": [first, second]})
                )
        except Exception as error:
            logger.info("%s takes one reference image (two failed: %s)", cls.__name__, error)
            return 1
        if all(len(out) == 1 for out in outputs) and not torch.equal(*outputs):
            return MAX_INPUT_IMAGES
        return 1

    def reference_rules(self) -> tuple[int, float | None]:
        """The smallest side and the largest aspect ratio a reference image may have: the
        defaults of the pipeline's own check of its inputs where it has one (FLUX.2's
        image processor's `check_image_input`), else any side and at most 8:1."""
        check = getattr(getattr(self.shared, "image_processor", None), "check_image_input", None)
        if check is None:
            # No rule of its own: FLUX.2's bound on the aspect, which keeps every side of a
            # reference at least one size multiple wherever the pipeline resizes it.
            return 1, DEFAULT_REFERENCE_ASPECT
        defaults = {
            name: parameter.default
            for name, parameter in inspect.signature(check).parameters.items()
            if parameter.default is not inspect.Parameter.empty
        }
        return int(defaults.get("min_side_length", 1)), defaults.get("max_aspect_ratio")

    def _probe_side(self) -> int:
        """The side of the probes' images: the smallest the model takes, twice."""
        return 2 * size_limits(self.shared).size_multiple

    def _probe(self, task: Task, arguments: dict[str, Any]) -> torch.Tensor:
        """A one-step call of `task`'s class with those of `arguments` it takes, at the
        probes' size, from a fixed seed: its latents."""
        takes = call_parameters(self._classes[task])
        side = self._probe_side()
        sized = {"height": side, "width": side} if "height" in takes else {}
        given = {name: value for name, value in arguments.items() if name in takes}
        with torch.no_grad():
            return self.view(task)(
                **given,
                **sized,
                num_inference_steps=1,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="latent",
            ).images

    def view(self, task: Task = "text-to-image") -> DiffusionPipeline:
        """A pipeline for `task` over the shared weights with its own scheduler, safe to run
        in a thread. Raises KeyError for a task the family has no pipeline for."""
        cls = self._classes[task]
        scheduler = self.shared.scheduler
        components: dict[str, Any] = {
            **self.shared.components,
            "scheduler": type(scheduler).from_config(scheduler.config),
        }
        accepted = init_parameters(cls)
        # The pipeline's own options beside its components (FLUX.2 Klein's `is_distilled`),
        # as the shared pipeline was loaded with them: a view without them would run its
        # class's defaults.
        options = {
            name: self.shared.config[name]
            for name in accepted
            if name in self.shared.config and name not in components and name != "self"
        }
        view = cls(
            **{name: value for name, value in components.items() if name in accepted}, **options
        )
        view.set_progress_bar_config(disable=True)
        # An instance attribute shadows the method, so the pipeline's own call to
        # `self.encode_prompt(...)` goes through the lock.
        view.encode_prompt = _serialized(view.encode_prompt, self._encode_lock)
        return view


def _serialized(method, lock: threading.Lock):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with lock:
            return method(*args, **kwargs)

    return locked
