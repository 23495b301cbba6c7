"""Property tests of the parsers: any input is either accepted within bounds or rejected with a
message fit for a 400 that names the parameter."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from deployments.config import AppArgs
from deployments.ingress.errors import from_validation_error
from deployments.ingress.protocol import ImageGenerationRequest
from deployments.ingress.validation_context import ValidationContext
from deployments.sizes import parse_size
from tests.strategies import request_bodies

ARGS = AppArgs.model_validate(
    {
        "models": [{"default_size": "32x32", "default_steps": 2}],
        "limits": {"max_pixels": 64 * 64, "max_steps": 8, "max_images": 4},
    }
)


@given(size=st.text(max_size=24) | st.from_regex(r"\A\d{1,6}x\d{1,6}\Z"))
@settings(max_examples=300)
def test_parse_size_accepts_only_bounded_multiples(size):
    try:
        width, height = parse_size(size, default="32x32", multiple=16, max_pixels=64 * 64)
    except ValueError as error:
        # It says which rule the size broke (it becomes "Invalid value for 'size': ...").
        reasons = ("'auto' or 'WIDTHxHEIGHT'", "multiples of 16", "at most 4096")
        assert sum(reason in str(error) for reason in reasons) == 1, str(error)
    else:
        assert width % 16 == 0 and height % 16 == 0
        assert 0 < width * height <= 64 * 64


@given(body=request_bodies)
@settings(max_examples=300)
def test_request_validation_fails_only_as_a_named_400(body):
    context = ValidationContext(limits=ARGS.limits, model=ARGS.models[0])
    try:
        ImageGenerationRequest.model_validate(body, context=context)
    except ValidationError as exc:
        error = from_validation_error(exc)
        assert error.status_code == 400
        assert error.param is None or error.param.split(".")[0] in body or error.param == "prompt"
        assert error.message and "Traceback" not in error.message
        json.dumps(error.message)
