"""The API's service object without HTTP: its methods take plain values, so a request's way
from body to job to answer can be checked directly, with a fake generator behind it."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from deployments.config.app_config import AppArgs
from deployments.ingress.bodies import EditForm
from deployments.ingress.errors import APIError
from deployments.ingress.protocol import ImagesResponse
from deployments.ingress.service import ImageService, RequestScope

from .fakes import FakeGenerator, pixels_for


@pytest.fixture
def service(args: AppArgs, generator: FakeGenerator, store) -> ImageService:
    return ImageService(args, {"tiny-sd3": generator}, store)


def _run(coroutine):
    return asyncio.run(coroutine)


async def _generate(service: ImageService, body: object) -> ImagesResponse:
    async with service.scope("req-1", "generations") as scope:
        prepared = await service.prepare_generation(body, scope)
        return await service.run(prepared, "http://testserver/", scope)


def test_a_generation_runs_from_body_to_response(service, generator):
    body = {"prompt": "a fox", "n": 2, "seed": 7, "response_format": "b64_json"}
    response = _run(_generate(service, body))
    assert response.size == "64x32"
    assert [image.seed for image in response.data] == [7, 8]
    (job,) = generator.jobs
    assert job.request_id == "req-1"
    assert (job.width, job.height, job.num_inference_steps, job.guidance_scale) == (64, 32, 3, 5.0)


def test_prepare_names_the_bad_parameter(service):
    with pytest.raises(APIError) as raised:
        _run(_generate(service, {"prompt": "a fox", "size": "65x64"}))
    assert (raised.value.status_code, raised.value.param) == (400, "size")


def test_an_unknown_model_is_a_404_naming_model(service):
    with pytest.raises(APIError) as raised:
        _run(service.target_of("nope"))
    assert (raised.value.status_code, raised.value.param) == (404, "model")
    assert _run(service.target_of(None)).model.id == "tiny-sd3"
    assert [card.id for card in _run(service.list_models()).data] == ["tiny-sd3"]


def test_the_deadline_bounds_the_wait_for_images(args, generator, store):
    args = args.model_copy(update={"request_timeout_s": 0.05})
    service = ImageService(args, {"tiny-sd3": generator}, store)
    generator.delay_s = 5.0
    with pytest.raises(APIError) as raised:
        _run(_generate(service, {"prompt": "a fox"}))
    assert raised.value.status_code == 504
    assert generator.cancelled, "the generation was not cancelled at the deadline"


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels_for(1, width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_an_edit_with_size_auto_follows_its_input_image(service, generator):
    async def edit() -> RequestScope:
        async with service.scope("req-2", "edits") as scope:
            form = EditForm(
                fields={"prompt": "a fox", "size": "auto"}, images=(_png(96, 48),), mask=None
            )
            prepared = await service.prepare_edit(form, scope)
            await service.run(prepared, "http://testserver/", scope)

    _run(edit())
    (job,) = generator.jobs
    # 96x48 is 4608 pixels, within max_pixels (128*128): kept as it is.
    assert (job.width, job.height) == (96, 48)
    assert job.image.shape == (48, 96, 3) and job.task == "image-to-image"
    assert job.strength == 0.8  # the model's default_strength
    assert np.array_equal(job.image, pixels_for(1, 96, 48))


def test_a_models_capabilities_are_asked_once(service, generator, monkeypatch):
    asked = []
    capabilities = generator.capabilities

    async def counted():
        asked.append(1)
        return await capabilities()

    monkeypatch.setattr(generator, "capabilities", counted)
    for seed in range(3):
        _run(_generate(service, {"prompt": "a fox", "seed": seed}))
    assert len(asked) == 1 and len(generator.jobs) == 3
