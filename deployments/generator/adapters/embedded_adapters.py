"""The embedded LoRA adapters: tiny adapters of the embedded models, built offline with peft.

Like the embedded models (`deployments/generator/model/embedded/`), they let anyone try
adapters with no download: `embedded:<model>/<style>` names one (`embedded:tiny-sd3/ink`).
Each is a real peft LoRA (rank 4 on the denoiser's attention, or on its attention and
feed-forward), with weights drawn from a fixed seed, saved the way diffusers saves a trained
one (`save_lora_weights`, a `pytorch_lora_weights.safetensors` in a directory) into the
cache, and loaded back through the same `load_lora_weights` path as a downloaded adapter.
Their lora_B is not zero (as a freshly initialised adapter's would be), so they visibly
change the images, at a strength that keeps them finite and unsaturated.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from deployments.config.base import default_cache_dir
from deployments.config.model_config import AdapterConfig
from deployments.generator.model.embedded import (
    EMBEDDED_SCHEME,
    RECIPE_VERSION,
    build_once,
    ensure_embedded_model,
    is_embedded,
)

# Bump when an adapter recipe changes (the base models' RECIPE_VERSION is in the name too:
# an adapter is shaped after its model).
ADAPTER_RECIPE_VERSION = 1
WEIGHT_NAME = "pytorch_lora_weights.safetensors"

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class AdapterRecipe:
    targets: tuple[str, ...]  # peft `target_modules`
    seed: int
    strength: float  # lora_B's standard deviation, times 1/sqrt(rank)


EMBEDDED_ADAPTERS: dict[str, AdapterRecipe] = {
    "tiny-sd3/ink": AdapterRecipe(_ATTENTION, seed=11, strength=1.0),
    "tiny-sd3/paper": AdapterRecipe(("to_q", "to_v", "ff.net.2"), seed=12, strength=1.0),
    "tiny-sdxl/ink": AdapterRecipe(_ATTENTION, seed=21, strength=0.5),
    "tiny-flux/ink": AdapterRecipe(_ATTENTION, seed=31, strength=2.0),
}
_RANK = 4
_BUILDING = threading.Lock()


def resolve_adapter_source(adapter: AdapterConfig) -> tuple[str, str | None]:
    """Where `adapter`'s weights are, as `load_lora_weights` takes them: (a directory, file
    or hub id; the weights file inside it, or None). Builds an embedded adapter on first use.
    Raises ValueError for an unknown embedded adapter."""
    if is_embedded(adapter.source):
        return str(ensure_embedded_adapter(adapter.source)), WEIGHT_NAME
    return adapter.source, adapter.weight_name


def ensure_embedded_adapter(source: str, cache_dir: Path | None = None) -> Path:
    """The directory of embedded adapter `source`, building it (and its model) if needed.

    Built into a staging directory and renamed into place, so replicas that start together
    never read a half-written adapter."""
    name = source.removeprefix(EMBEDDED_SCHEME)
    if name not in EMBEDDED_ADAPTERS:
        raise ValueError(
            f"unknown embedded adapter {source!r}; available: "
            + ", ".join(EMBEDDED_SCHEME + known for known in EMBEDDED_ADAPTERS)
        )
    root = (cache_dir or default_cache_dir()) / "adapters"
    model, style = name.split("/")
    directory = f"{model}-v{RECIPE_VERSION}-{style}-v{ADAPTER_RECIPE_VERSION}"
    if (root / directory / WEIGHT_NAME).is_file():
        return root / directory  # built: no wait behind another adapter's build
    # One build at a time in a process: loading the denoiser to build on patches torch's
    # module construction process-wide (accelerate's empty weights), and two threads doing
    # it at once (two requests prefetching adapters) left it patched: every later load made
    # meta tensors.
    with _BUILDING:
        return build_once(
            directory,
            lambda staging: _build(model, EMBEDDED_ADAPTERS[name], staging, cache_dir),
            WEIGHT_NAME,
            root,
        )


def _build(model: str, recipe: AdapterRecipe, directory: Path, cache_dir: Path | None) -> None:
    import diffusers
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    model_dir = ensure_embedded_model(EMBEDDED_SCHEME + model, cache_dir)
    pipeline_class = getattr(diffusers, _model_index_class(model_dir))
    denoiser_name = "unet" if (model_dir / "unet").is_dir() else "transformer"
    denoiser_class = getattr(diffusers, _component_class(model_dir, denoiser_name))
    # Built with real tensors: `low_cpu_mem_usage` (the default) builds inside accelerate's
    # empty-weights patch of torch's module construction, process-wide while it lasts, so a
    # LoRA layer that another thread made meanwhile (an adapter loading for a request) came
    # out empty: that request's images were wrong (seen in the loop's adapter test).
    denoiser = denoiser_class.from_pretrained(
        model_dir, subfolder=denoiser_name, low_cpu_mem_usage=False
    )
    config = LoraConfig(
        r=_RANK, lora_alpha=_RANK, target_modules=list(recipe.targets), init_lora_weights=False
    )
    denoiser = inject_adapter_in_model(config, denoiser)
    state = get_peft_model_state_dict(denoiser)
    # Every value drawn from the recipe's own generator, in key order: the weights depend on
    # the seed alone, not on peft's initialisation order.
    generator = torch.Generator().manual_seed(recipe.seed)
    for key in sorted(state):
        tensor = state[key]
        # lora_A keeps A @ x at x's scale; lora_B sets the adapter's strength.
        down = ".lora_A." in key
        std = tensor.shape[1] ** -0.5 if down else recipe.strength * _RANK**-0.5
        state[key] = (torch.randn(tensor.shape, generator=generator) * std).to(tensor.dtype)
    pipeline_class.save_lora_weights(
        directory, **{f"{denoiser_name}_lora_layers": state}, safe_serialization=True
    )


def _model_index_class(model_dir: Path) -> str:
    import json

    return json.loads((model_dir / "model_index.json").read_text())["_class_name"]


def _component_class(model_dir: Path, component: str) -> str:
    import json

    return json.loads((model_dir / "model_index.json").read_text())[component][1]
