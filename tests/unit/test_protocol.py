"""Request validation: every bad input is a 400 that names the parameter."""

import pytest
from pydantic import ValidationError

from deployments.config.app_config import RequestLimits
from deployments.config.model_config import ModelConfig
from deployments.ingress.errors import from_validation_error
from deployments.ingress.protocol import Image, ImageGenerationRequest
from deployments.ingress.validation.validation_context import ValidationContext

CONTEXT = ValidationContext(
    limits=RequestLimits(
        max_prompt_chars=100,
        max_images=4,
        max_pixels=256 * 256,
        max_steps=30,
        max_guidance_scale=12,
    ),
    model=ModelConfig(default_size="64x64", size_multiple=16),
)


def validate(body):
    return ImageGenerationRequest.model_validate(body, context=CONTEXT)


def rejection(body):
    with pytest.raises(ValidationError) as caught:
        validate(body)
    return from_validation_error(caught.value)


def test_minimal_request_gets_openai_defaults():
    request = validate({"prompt": "a red fox"})
    assert request.n == 1
    assert request.size == "auto"
    assert request.response_format == "url"
    assert request.output_format == "png"
    assert request.output_compression == 100
    assert request.seed is None


def test_full_request_is_accepted():
    request = validate(
        {
            "prompt": "a red fox",
            "model": "tiny-sd3",
            "n": 4,
            "size": "256x256",
            "response_format": "b64_json",
            "output_format": "webp",
            "output_compression": 50,
            "quality": "hd",
            "background": "opaque",
            "moderation": "auto",
            "user": "u-1",
            "seed": 7,
            "negative_prompt": "blurry",
            "num_inference_steps": 30,
            "guidance_scale": 12,
        }
    )
    assert request.seed == 7


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        ({}, "prompt", "Missing required parameter: 'prompt'"),
        ({"prompt": ""}, "prompt", "must not be empty"),
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "x" * 101}, "prompt", "limit is 100"),
        ({"prompt": 3}, "prompt", "Invalid value for 'prompt'"),
        ({"prompt": "x", "negative_prompt": "x" * 101}, "negative_prompt", "limit is 100"),
        ({"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
        ({"prompt": "x", "n": 11}, "n", "less than or equal to 10"),
        ({"prompt": "x", "n": 5}, "n", "at most 4 images"),
        ({"prompt": "x", "n": 1.5}, "n", "Invalid value for 'n'"),
        ({"prompt": "x", "size": "1024"}, "size", "WIDTHxHEIGHT"),
        ({"prompt": "x", "size": "100x100"}, "size", "multiples of 16"),
        ({"prompt": "x", "size": "512x512"}, "size", "at most 65536"),
        ({"prompt": "x", "response_format": "png"}, "response_format", "'url' or 'b64_json'"),
        ({"prompt": "x", "output_format": "gif"}, "output_format", "Invalid value"),
        ({"prompt": "x", "output_compression": 101}, "output_compression", "100"),
        ({"prompt": "x", "quality": "ultra"}, "quality", "Invalid value"),
        ({"prompt": "x", "style": "bold"}, "style", "Invalid value"),
        ({"prompt": "x", "seed": -1}, "seed", "greater than or equal to 0"),
        ({"prompt": "x", "seed": 2**32}, "seed", "less than or equal to 4294967295"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "greater"),
        ({"prompt": "x", "num_inference_steps": 31}, "num_inference_steps", "at most 30"),
        ({"prompt": "x", "guidance_scale": 12.5}, "guidance_scale", "at most 12"),
        ({"prompt": "x", "guidance_scale": float("nan")}, "guidance_scale", "finite"),
        ({"prompt": "x", "user": "u" * 257}, "user", "at most 256"),
        ({"prompt": "x", "steps": 20}, "steps", "Unknown parameter: 'steps'"),
    ],
)
def test_bad_input_names_the_parameter(body, param, text):
    error = rejection(body)
    assert error.status_code == 400
    assert error.type == "invalid_request_error"
    assert error.param == param
    assert text in error.message
    assert not error.retryable


@pytest.mark.parametrize("body", [[{"prompt": "x"}], "prompt", 3, None])
def test_a_body_that_is_not_an_object_is_rejected(body):
    error = rejection(body)
    assert error.param is None
    assert "JSON object" in error.message


def test_image_sends_only_the_form_asked_for():
    assert Image(url="http://x/y.png", seed=1).model_dump() == {
        "revised_prompt": None,
        "url": "http://x/y.png",
        "seed": 1,
    }
    assert Image(b64_json="AAAA", seed=2).model_dump() == {
        "b64_json": "AAAA",
        "revised_prompt": None,
        "seed": 2,
    }
