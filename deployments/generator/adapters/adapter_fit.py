"""Whether a LoRA state dict fits a pipeline's modules, checked before anything is injected.

diffusers does not check it: a tiny-flux adapter loads into tiny-sd3 without an error (it
only warns of "missing keys"; the weights of modules that do not exist are dropped, those
that happen to exist are injected), so a request would get a half-applied adapter of another
model. `misfit` reads the state dict as `lora_state_dict` returns it (diffusers' or peft's
key names, whatever the file's format was) and requires every key to be a LoRA weight of a
module the pipeline has, with the module's input and output sizes and one rank per module.
"""

from __future__ import annotations

from typing import Any

import torch

# Where a key's module path ends, for each naming of the down (A) and up (B) projections.
_DOWN = (".lora_A.", ".lora.down.", ".lora_linear_layer.down.", ".lora_down.")
_UP = (".lora_B.", ".lora.up.", ".lora_linear_layer.up.", ".lora_up.")


def misfit(pipeline: Any, state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why `state_dict` does not fit `pipeline`, or None when every key fits."""
    if not state_dict:
        return "it holds no weights"
    components = set(getattr(type(pipeline), "_lora_loadable_modules", ()))
    ranks: dict[str, int] = {}
    for key, tensor in state_dict.items():
        component_name, _, rest = key.partition(".")
        component = getattr(pipeline, component_name, None)
        if component_name not in components:
            component = None
        if not isinstance(component, torch.nn.Module):
            return f"{key!r} is for a component {type(pipeline).__name__} has no adapters in"
        if rest.endswith(".alpha") or rest == "alpha":
            continue  # a scale, not a weight
        reason = _key_misfit(component, rest, tensor, ranks, component_name)
        if reason is not None:
            return f"{key!r}: {reason}"
    return None


def _key_misfit(
    component: torch.nn.Module,
    key: str,
    tensor: torch.Tensor,
    ranks: dict[str, int],
    component_name: str,
) -> str | None:
    path, down = _module_path(key)
    if path is None:
        return "not a LoRA weight this service knows"
    try:
        module = component.get_submodule(path)
    except AttributeError:
        return f"the model has no module {component_name}.{path}"
    base = getattr(module, "base_layer", module)  # a module wrapped by a loaded adapter
    sizes = _in_out(base)
    if sizes is None:
        return f"{component_name}.{path} is a {type(base).__name__}, not a linear or conv layer"
    in_size, out_size = sizes
    shape = tuple(tensor.shape)
    if key.endswith(".bias"):
        fits = not down and shape == (out_size,)
        rank = None
    elif down:
        fits = len(shape) >= 2 and shape[1] == in_size
        rank = shape[0] if shape else None
    else:
        fits = len(shape) >= 2 and shape[0] == out_size
        rank = shape[1] if len(shape) >= 2 else None
    if not fits:
        return (
            f"shape {list(shape)} does not fit {component_name}.{path} "
            f"({in_size} in, {out_size} out)"
        )
    if rank is not None and ranks.setdefault(f"{component_name}.{path}", rank) != rank:
        return f"its rank differs from the other weights of {component_name}.{path}"
    return None


def _module_path(key: str) -> tuple[str | None, bool]:
    """The module path of a LoRA key, and whether it is the down projection."""
    for markers, down in ((_DOWN, True), (_UP, False)):
        for marker in markers:
            if marker in key:
                return key.split(marker, 1)[0], down
    return None, False


def _in_out(layer: torch.nn.Module) -> tuple[int, int] | None:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Conv3d):
        return layer.in_channels, layer.out_channels
    # Quantized linears (torchao's, bitsandbytes') keep nn.Linear's attributes.
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    return None
