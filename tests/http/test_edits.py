"""`POST /v1/images/edits` in-process: OpenAI's multipart form, the uploads, the errors."""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deployments.config.app_config import AppArgs
from deployments.ingress.app import create_api
from deployments.jobs import ModelCapabilities

from .checks import assert_openai_error, decode
from .fakes import FakeGenerator, pixels_for

EDITS = "/v1/images/edits"


def png(width: int, height: int, mode: str = "RGB", color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def edit(client: TestClient, files=None, **fields):
    files = files if files is not None else {"image": ("in.png", png(64, 32), "image/png")}
    data = {"prompt": "make it blue", **{k: str(v) for k, v in fields.items()}}
    return client.post(EDITS, data=data, files=files)


def test_an_edit_returns_images_and_sends_the_image_at_the_output_size(client, generator):
    response = edit(client, n=2, seed=9, response_format="b64_json", strength=0.4)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == "64x32"  # `auto`: the input's size, within the model's rules
    assert [decode(item["b64_json"]).tolist() for item in body["data"]] == [
        pixels_for(9, 64, 32).tolist(),
        pixels_for(10, 64, 32).tolist(),
    ]
    (job,) = generator.jobs
    assert job.task == "image-to-image" and job.strength == 0.4
    assert job.image.shape == (32, 64, 3) and tuple(job.image[0, 0]) == (200, 30, 30)


def test_size_auto_scales_a_large_input_into_the_limits(client, generator):
    # 300x150 has 45000 pixels, over max_pixels (128x128): scaled to fit, multiples of 16.
    response = edit(client, files={"image": ("in.png", png(300, 150), "image/png")})
    assert response.status_code == 200, response.text
    (job,) = generator.jobs
    assert (job.width, job.height) == (176, 80)
    assert job.width * job.height <= 128 * 128
    assert job.image.shape == (80, 176, 3)


def test_an_explicit_size_resizes_the_input(client, generator):
    assert edit(client, size="32x32").status_code == 200
    assert generator.jobs[0].image.shape == (32, 32, 3)


def test_a_transparent_mask_area_is_redrawn_openai_style(client, generator):
    mask = Image.new("RGBA", (64, 32), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (32, 0, 64, 32))  # the right half transparent
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    files = {
        "image[]": ("in.png", png(64, 32), "image/png"),
        "mask": ("mask.png", buffer.getvalue(), "image/png"),
    }
    assert edit(client, files=files).status_code == 200
    (job,) = generator.jobs
    assert job.task == "inpaint" and job.strength == 0.8  # the model's default strength
    assert (job.mask[:, :32] == 0).all() and (job.mask[:, 32:] == 255).all()


def test_a_mask_without_alpha_is_white_for_redraw(client, generator):
    files = {
        "image": ("in.png", png(64, 32), "image/png"),
        "mask": ("mask.png", png(64, 32, "L", 255), "image/png"),
    }
    assert edit(client, files=files).status_code == 200
    assert (generator.jobs[0].mask == 255).all()


@pytest.mark.parametrize(
    ("files", "param", "words"),
    [
        ({}, "image", "Missing required parameter"),
        ({"image": ("a.txt", b"not an image", "text/plain")}, "image", "not an image"),
        ({"image": ("a.png", b"", "image/png")}, "image", "empty"),
        (
            {
                "image": ("in.png", png(64, 32), "image/png"),
                "mask": ("m.png", png(32, 32), "image/png"),
            },
            "mask",
            "must be the image's size",
        ),
        (
            {
                "image": ("a.png", png(64, 32), "image/png"),
                "image[]": ("b.png", png(64, 32), "image/png"),
            },
            "image",
            "one image at a time",
        ),
    ],
    ids=["no-image", "not-an-image", "empty", "mask-size", "two-images"],
)
def test_bad_uploads_are_a_400_naming_the_field(client, generator, files, param, words):
    error = assert_openai_error(edit(client, files=files), 400, param)
    assert words in error["message"]
    assert generator.jobs == []


def test_bad_fields_are_named_like_generations(client):
    assert_openai_error(edit(client, strength=0), 400, "strength")
    assert_openai_error(edit(client, strength=1.5), 400, "strength")
    assert_openai_error(edit(client, n=11), 400, "n")
    assert_openai_error(edit(client, style="vivid"), 400, "style")  # generations only
    assert_openai_error(edit(client, stream="maybe"), 400, "stream")
    assert_openai_error(edit(client, model="nope"), 404, "model")
    error = assert_openai_error(client.post(EDITS, json={"prompt": "x"}), 400)
    assert "multipart/form-data" in error["message"]


def with_limits(args: AppArgs, **limits) -> AppArgs:
    return AppArgs.model_validate(
        {**args.model_dump(), "limits": {**args.limits.model_dump(), **limits}}
    )


def test_an_image_over_the_pixel_limit_is_a_400_before_it_is_decoded(args, generator, store):
    client = TestClient(
        create_api(with_limits(args, max_input_pixels=256 * 256), {"tiny-sd3": generator}, store)
    )
    response = edit(client, files={"image": ("in.png", png(300, 300), "image/png")})
    error = assert_openai_error(response, 400, "image")
    assert "300x300" in error["message"]


def test_an_upload_over_the_limit_is_413(args, generator, store):
    client = TestClient(
        create_api(with_limits(args, max_upload_bytes=4096), {"tiny-sd3": generator}, store)
    )
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    response = edit(client, files={"image": ("in.png", buffer.getvalue(), "image/png")})
    assert_openai_error(response, 413)


def test_what_the_models_pipeline_does_not_take_is_a_400_naming_it(args, store):
    no_edits = ModelCapabilities(
        pipeline_class="TextOnlyPipeline",
        tasks={"text-to-image": frozenset({"guidance_scale"})},
    )
    client = TestClient(create_api(args, {"tiny-sd3": FakeGenerator(no_edits)}, store))
    error = assert_openai_error(
        client.post("/v1/images/generations", json={"prompt": "x", "negative_prompt": "y"}),
        400,
        "negative_prompt",
    )
    assert "TextOnlyPipeline" in error["message"] and error["code"] == "unsupported_parameter"
    assert_openai_error(edit(client), 400, "image")
    # What the request leaves to the model's defaults is no error.
    response = client.post("/v1/images/generations", json={"prompt": "x"})
    assert response.status_code == 200


def test_streamed_edits_use_openais_edit_event_names(client):
    response = edit(client, stream="true", partial_images=1, num_inference_steps=4)
    assert response.status_code == 200
    types = [
        line[len("event: ") :] for line in response.text.splitlines() if line.startswith("event")
    ]
    assert types == ["image_edit.partial_image", "image_edit.completed"]


def test_openai_client_edits_unchanged(client, generator):
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    result = api.images.edit(
        model="tiny-sd3",
        image=("in.png", png(64, 32), "image/png"),
        mask=("mask.png", png(64, 32, "RGBA", (0, 0, 0, 0)), "image/png"),
        prompt="make it blue",
        n=1,
        size="32x32",
        response_format="b64_json",
        extra_body={"seed": 3, "strength": 0.5},
    )
    assert decode(result.data[0].b64_json).shape == (32, 32, 3)
    (job,) = generator.jobs
    assert (job.task, job.strength, job.seeds) == ("inpaint", 0.5, (3,))


# A model conditioned on reference images (FLUX.2): its edits take several and no strength.
REFERENCES = ModelCapabilities(
    pipeline_class="Flux2KleinPipeline",
    tasks={
        "text-to-image": frozenset({"guidance_scale"}),
        "image-to-image": frozenset({"guidance_scale"}),
    },
    size_multiple=16,
    reference_images=16,
    reference_min_side=64,
    reference_max_aspect=8,
)


@pytest.fixture
def references(args, store) -> tuple[TestClient, FakeGenerator]:
    generator = FakeGenerator(REFERENCES)
    return TestClient(create_api(args, {"tiny-sd3": generator}, store)), generator


def test_a_reference_model_takes_several_images_each_keeping_its_shape(references):
    client, generator = references
    files = [
        ("image[]", ("a.png", png(128, 80, color=(10, 20, 30)), "image/png")),
        ("image[]", ("b.png", png(40, 100, color=(200, 0, 0)), "image/png")),
        ("image[]", ("c.png", png(600, 300), "image/png")),
        ("image[]", ("d.png", png(100, 90), "image/png")),
    ]
    response = edit(client, files=files, size="96x96")
    assert response.status_code == 200, response.text
    (job,) = generator.jobs
    assert job.task == "image-to-image" and job.image is None and job.strength is None
    # Upload order; each its own shape, sides cut to multiples of 16: scaled down to at
    # most the output's area (96x96), and up only to the model's smallest side (64).
    assert [r.shape for r in job.references] == [
        (64, 112, 3),  # 10240 pixels scaled into the area: 121x75, then cut
        (160, 64, 3),  # 40 wide: scaled up to 64 wide
        (64, 128, 3),  # 600x300 scaled into the area: 135x67, then cut
        (80, 96, 3),  # within the area: cut only
    ]
    assert tuple(job.references[0][0, 0]) == (10, 20, 30)
    assert tuple(job.references[1][0, 0]) == (200, 0, 0)
    # Each is an input of the request's usage.
    assert response.json()["usage"]["input_tokens_details"]["image_tokens"] == 4


def test_a_reference_model_refuses_a_mask_with_several_images_and_a_strength(references):
    client, generator = references
    oblong = [
        ("image[]", ("a.png", png(64, 64), "image/png")),
        ("image[]", ("b.png", png(900, 100), "image/png")),
    ]
    error = assert_openai_error(edit(client, files=oblong), 400, "image")
    assert "at most 8:1" in error["message"]
    two = [("image[]", ("a.png", png(64, 32), "image/png"))] * 2
    assert_openai_error(edit(client, files=two, strength=0.5), 400, "strength")
    assert_openai_error(edit(client, files=two, input_fidelity="high"), 400, "input_fidelity")
    masked = [*two, ("mask", ("m.png", png(64, 32), "image/png"))]
    assert_openai_error(edit(client, files=masked), 400, "mask")  # no inpainting here
    assert generator.jobs == []


def test_a_masked_edit_on_a_reference_model_is_an_inpaint_of_its_one_image(args, store):
    inpaints = replace(
        REFERENCES,
        tasks={
            **REFERENCES.tasks,
            "inpaint": frozenset({"guidance_scale", "strength", "input_fidelity", "mask"}),
        },
    )
    generator = FakeGenerator(inpaints)
    client = TestClient(create_api(args, {"tiny-sd3": generator}, store))
    files = [
        ("image", ("a.png", png(64, 32), "image/png")),
        ("mask", ("m.png", png(64, 32, "L", 255), "image/png")),
    ]
    assert edit(client, files=files, strength=0.5).status_code == 200
    (job,) = generator.jobs
    assert (job.task, job.strength, job.references) == ("inpaint", 0.5, ())
    assert job.image.shape == (32, 64, 3) and job.mask.shape == (32, 64)


def test_the_openai_client_sends_several_images_unchanged(references):
    client, generator = references
    api = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client)
    result = api.images.edit(
        model="tiny-sd3",
        image=[("a.png", png(32, 32), "image/png"), ("b.png", png(48, 32), "image/png")],
        prompt="the two together",
        size="32x32",
        response_format="b64_json",
    )
    assert decode(result.data[0].b64_json).shape == (32, 32, 3)
    (job,) = generator.jobs
    assert [r.shape for r in job.references] == [(64, 64, 3), (64, 96, 3)]


def test_a_model_that_edits_one_image_refuses_several_naming_image(client, generator):
    files = [("image[]", ("a.png", png(64, 32), "image/png"))] * 2
    error = assert_openai_error(edit(client, files=files), 400, "image")
    assert "one image at a time" in error["message"]
    assert generator.jobs == []


def test_requests_are_routed_by_model_with_a_default(args, store):
    two = AppArgs.model_validate(
        {**args.model_dump(), "models": [*args.model_dump()["models"], {"id": "tiny-flux"}]}
    )
    sd3, flux = FakeGenerator(), FakeGenerator()
    client = TestClient(create_api(two, {"tiny-sd3": sd3, "tiny-flux": flux}, store))
    assert [card["id"] for card in client.get("/v1/models").json()["data"]] == [
        "tiny-sd3",
        "tiny-flux",
    ]
    assert client.get("/v1/models/tiny-flux").json()["id"] == "tiny-flux"
    generations = "/v1/images/generations"
    assert client.post(generations, json={"prompt": "x", "model": "tiny-flux"}).status_code == 200
    assert client.post(generations, json={"prompt": "y"}).status_code == 200
    assert edit(client, model="tiny-flux").status_code == 200
    assert [job.prompt for job in flux.jobs] == ["x", "make it blue"]
    assert [job.prompt for job in sd3.jobs] == ["y"]
    # Each model's own defaults: tiny-flux's default size is the ModelConfig default.
    assert (flux.jobs[0].width, flux.jobs[0].height) == (64, 64)
    assert (sd3.jobs[0].width, sd3.jobs[0].height) == (64, 32)


def test_a_model_whose_replicas_never_answer_times_out_in_the_api_shape(args, store):
    class NeverStarts(FakeGenerator):
        async def capabilities(self) -> ModelCapabilities:
            await asyncio.sleep(3600)  # no replica comes up to say
            raise AssertionError("unreachable")

    fast = AppArgs.model_validate({**args.model_dump(), "request_timeout_s": 0.2})
    client = TestClient(create_api(fast, {"tiny-sd3": NeverStarts()}, store))
    assert_openai_error(client.post("/v1/images/generations", json={"prompt": "x"}), 504)
    assert_openai_error(edit(client), 504)
