"""Parsing the `size` parameter: `"WxH"` or `"auto"`, checked against a model's rules."""

from __future__ import annotations

import re

_SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")


def parse_size(text: str, *, default: str, multiple: int, max_pixels: int) -> tuple[int, int]:
    """Return (width, height) for `text`, or raise ValueError saying what is wrong.

    `auto` means the model's `default`. Width and height must be positive multiples of
    `multiple` (what the pipeline's latent grid needs) and their product at most `max_pixels`.
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
    return width, height
