"""Image sizes: parsing the `size` parameter (`"WxH"` or `"auto"`) against a model's rules,
fitting an uploaded image's size to them, and writing a size back as `"WxH"`.

Plain functions of plain values: the request schema resolves a request's size with
`resolve_size`, once, for generations and edits alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def format_size(width: int, height: int) -> str:
    return f"{width}x{height}"


def parse_size(
    text: str,
    *,
    default: str,
    multiple: int,
    max_pixels: int,
    max_width: int | None = None,
    max_height: int | None = None,
) -> tuple[int, int]:
    """Return (width, height) for `text`, or raise ValueError saying what is wrong.

    `auto` means the model's `default`. Width and height must be positive multiples of
    `multiple` (what the pipeline's latent grid needs), their product at most `max_pixels`,
    and each at most what the model takes (`max_width`, `max_height`; None: no cap).
    """
    if text == "auto":
        text = default
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"must be 'auto' or 'WIDTHxHEIGHT' such as '1024x1024', not {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if width % multiple or height % multiple:
        raise ValueError(f"width and height must be multiples of {multiple}, got {text}")
    if width * height > max_pixels:
        raise ValueError(
            f"{text} is {width * height} pixels; this service allows at most {max_pixels}"
        )
    if max_width is not None and width > max_width:
        raise ValueError(f"this model makes images at most {max_width} pixels wide, not {width}")
    if max_height is not None and height > max_height:
        raise ValueError(f"this model makes images at most {max_height} pixels high, not {height}")
    return width, height


def fit_size(
    width: int,
    height: int,
    multiple: int,
    max_pixels: int,
    max_width: int | None = None,
    max_height: int | None = None,
) -> tuple[int, int]:
    """The output size for an input of `width` x `height` (`size: auto` of an edit): the same
    aspect, scaled down to at most `max_pixels` and the model's largest sides, each side a
    multiple of `multiple` (at least one)."""
    scale = min(1.0, (max_pixels / (width * height)) ** 0.5)
    if max_width is not None:
        scale = min(scale, max_width / width)
    if max_height is not None:
        scale = min(scale, max_height / height)
    fitted_width = max(multiple, int(width * scale) // multiple * multiple)
    fitted_height = max(multiple, int(height * scale) // multiple * multiple)
    while fitted_width * fitted_height > max_pixels and max(fitted_width, fitted_height) > multiple:
        if fitted_width >= fitted_height:
            fitted_width -= multiple
        else:
            fitted_height -= multiple
    return fitted_width, fitted_height


@dataclass(frozen=True)
class SizeRules:
    """What a size must be for one model: the config's rules and the model's own limits."""

    default: str
    multiple: int
    max_pixels: int
    max_width: int | None = None
    max_height: int | None = None


def resolve_size(
    text: str, rules: SizeRules, input_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    """The (width, height) to generate for a request's `size`: `auto` is the input image's
    size fitted to the rules when there is an input (edits), else the model's `default`."""
    if text == "auto" and input_size is not None:
        return fit_size(
            *input_size, rules.multiple, rules.max_pixels, rules.max_width, rules.max_height
        )
    return parse_size(
        text,
        default=rules.default,
        multiple=rules.multiple,
        max_pixels=rules.max_pixels,
        max_width=rules.max_width,
        max_height=rules.max_height,
    )
