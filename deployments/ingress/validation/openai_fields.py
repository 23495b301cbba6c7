"""OpenAI's Images API fields that these models cannot honour as OpenAI's models do: each is
served where it can be, and otherwise a 400 that names it, never silently ignored.

- `background: transparent`: the models make opaque RGB images (no alpha channel);
- `style`: DALL-E 3's, which no diffusers model has;
- `output_compression` with `output_format: png`: PNG is lossless (OpenAI takes it for jpeg
  and webp only);
- `input_fidelity` with `strength`: both set how much of the input is kept; give one.
"""

from __future__ import annotations

from deployments.ingress.errors import invalid_request
from deployments.ingress.protocol import ImageRequest


def check_openai_fields(params: ImageRequest) -> None:
    if params.background == "transparent":
        _refuse(
            "background",
            "these models make opaque images (no alpha channel); ask for 'opaque' or 'auto'.",
        )
    if getattr(params, "style", None) is not None:
        _refuse("style", "it is DALL-E 3's option, which these models do not have.")
    if "output_compression" in params.model_fields_set and params.output_format == "png":
        _refuse("output_compression", "PNG is lossless; it applies to 'jpeg' and 'webp'.")
    if getattr(params, "input_fidelity", None) is not None and getattr(params, "strength", None):
        _refuse("input_fidelity", "give either 'input_fidelity' or 'strength', not both.")


def _refuse(param: str, why: str) -> None:
    raise invalid_request(
        f"Unsupported value for '{param}': {why}", param=param, code="unsupported_parameter"
    )
