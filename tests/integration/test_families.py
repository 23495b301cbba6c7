"""Model families in one application, through real Ray Serve and real HTTP: SD3, SDXL and
FLUX embedded models, each on its own generator deployment, generating and editing; FLUX.2
Klein's edits of several reference images, and an SD3 whose safety checker blocks every
image, both through the official client."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image
from ray import serve

from deployments.autoscaling_policy import JOBS_METRIC
from deployments.config.model_config import generator_deployment_name
from deployments.jobs import GenerationJob
from serve_app import build_app, build_application, parse_args
from tests.jobs import make_job

from .helpers import decode_png

pytestmark = pytest.mark.integration

FAMILIES = ("tiny-sd3", "tiny-sdxl", "tiny-flux")
# Served beside them, outside the per-family tests: (model id, source, its own args).
OTHERS = (
    ("tiny-flux2-klein", "embedded:tiny-flux2-klein", {}),
    (
        "tiny-sd3-checked",
        "embedded:tiny-sd3",
        {"safety": {"checker": "embedded:tiny-safety-checker", "thresholds": {"nsfw": 0.0}}},
    ),
)
ARGS = {
    "models": [
        {
            "id": name,
            "source": source,
            "device": "cpu",
            "default_size": "32x32",
            "default_steps": 3,
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
            **own,
        }
        for name, source, own in [*((name, f"embedded:{name}", {}) for name in FAMILIES), *OTHERS]
    ],
    "limits": {"max_pixels": 64 * 64, "max_steps": 20},
    # Five replicas share two cores here: jobs sent together may arrive tens of ms apart.
    "batching": {"max_wait_ms": 100},
}
# Engine settings per model: tiny-sd3 never batches, tiny-flux batches in one worker thread,
# and tiny-sdxl keeps the application's batching.
ENGINES = {
    "tiny-sd3": {"batching": {"max_batch_images": 1}},
    "tiny-flux": {"batching": {"max_batch_images": 8, "max_wait_ms": 200}, "worker_threads": 1},
}
for _model in ARGS["models"]:
    _model.update(ENGINES.get(_model["id"], {}))


@pytest.fixture(scope="module")
def base_url(serve_url):
    serve.run(build_app(ARGS), name="families", route_prefix="/families")
    yield f"{serve_url}/families"
    serve.delete("families")


@pytest.fixture(scope="module")
def client(base_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def generate(client: openai.OpenAI, **request) -> list[bytes]:
    result = client.images.generate(prompt="a lighthouse", response_format="b64_json", **request)
    return [base64.b64decode(image.b64_json) for image in result.data]


def test_each_model_has_its_own_deployment_and_is_listed(client):
    deployments = serve.status().applications["families"].deployments
    served = [*FAMILIES, *(name for name, _, _ in OTHERS)]
    for name in served:
        assert deployments[generator_deployment_name(name)].status == "HEALTHY"
    assert [model.id for model in client.models.list().data] == served


def test_a_model_of_references_edits_several_images_from_the_official_client(client):
    card = client.models.retrieve("tiny-flux2-klein").model_extra["capabilities"]
    assert card["reference_images"] == 16
    first = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    second = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)

    def edit(*references: np.ndarray) -> np.ndarray:
        result = client.images.edit(
            model="tiny-flux2-klein",
            image=[(f"{i}.png", png(r), "image/png") for i, r in enumerate(references)],
            prompt="the two together",
            size="32x32",
            response_format="b64_json",
            extra_body={"seed": 3},
        )
        return decode_png(result.data[0].b64_json)

    one, two = edit(first), edit(first, second)
    assert one.shape == two.shape == (32, 32, 3)
    assert not np.array_equal(one, two)  # the second reference reached the model
    with pytest.raises(openai.BadRequestError) as raised:  # one that edits one image
        client.images.edit(
            model="tiny-sd3",
            image=[("a.png", png(first), "image/png"), ("b.png", png(first), "image/png")],
            prompt="x",
        )
    assert raised.value.body["param"] == "image"


def test_a_blocked_image_is_a_moderation_error_through_serve(client, base_url):
    with pytest.raises(openai.BadRequestError) as raised:
        generate(client, model="tiny-sd3-checked")
    assert raised.value.code == "moderation_blocked"
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"model": "tiny-sd3-checked", "prompt": "x", "stream": True, "partial_images": 1},
        timeout=60,
    )
    # An HTTP 400 if it failed before the stream's first event, else its `error` event.
    assert "moderation_blocked" in response.text
    assert "b64_json" not in response.text


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_generates_reproducibly(client, model):
    request = {"model": model, "n": 2, "size": "48x32", "extra_body": {"seed": 11}}
    first = generate(client, **request)
    again = generate(client, **request)
    assert first == again, "the same seed gives the same bytes"
    assert first[0] != first[1], "each image has its own seed"
    assert [np.asarray(Image.open(io.BytesIO(data))).shape for data in first] == [(32, 48, 3)] * 2


def test_a_request_without_model_goes_to_the_default(client):
    extensions = {"extra_body": {"seed": 5}}
    assert generate(client, **extensions) == generate(client, model="tiny-sd3", **extensions)
    assert generate(client, **extensions) != generate(client, model="tiny-flux", **extensions)


@pytest.mark.parametrize("model", FAMILIES)
def test_each_family_edits_with_and_without_a_mask(client, model):
    source = np.random.default_rng(1).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    mask = np.zeros((32, 48, 4), dtype=np.uint8)
    mask[..., 3] = 255
    mask[:, 24:, 3] = 0  # redraw the right half
    for extra in ({}, {"mask": ("mask.png", png(mask), "image/png")}):
        result = client.images.edit(
            model=model,
            image=("in.png", png(source), "image/png"),
            prompt="the same, at night",
            response_format="b64_json",
            extra_body={"seed": 2, "strength": 0.6, "num_inference_steps": 5},
            **extra,
        )
        (image,) = result.data
        assert decode_png(image.b64_json).shape == (32, 48, 3)


def test_a_streamed_edit_sends_previews_then_the_image(client):
    source = np.full((32, 32, 3), 128, dtype=np.uint8)
    events = list(
        client.images.edit(
            model="tiny-flux",
            image=("in.png", png(source), "image/png"),
            prompt="a storm",
            stream=True,
            partial_images=2,
            extra_body={"seed": 4, "strength": 1.0, "num_inference_steps": 6},
        )
    )
    assert [event.type for event in events] == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    assert decode_png(events[-1].b64_json).shape == (32, 32, 3)


def test_a_parameter_the_pipeline_would_ignore_is_a_400_naming_it(base_url):
    # FLUX uses a negative prompt only with true CFG, which the service does not run.
    response = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"model": "tiny-flux", "prompt": "a fox", "negative_prompt": "blurry"},
        timeout=60,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "negative_prompt" and "FluxPipeline" in error["message"]
    accepted = httpx.post(
        f"{base_url}/v1/images/generations",
        json={"model": "tiny-sdxl", "prompt": "a fox", "negative_prompt": "blurry"},
        timeout=60,
    )
    assert accepted.status_code == 200


def test_bad_images_are_a_400_across_ray(base_url):
    response = httpx.post(
        f"{base_url}/v1/images/edits",
        data={"prompt": "x", "model": "tiny-sdxl"},
        files={"image": ("in.png", b"\x89PNG but not really", "image/png")},
        timeout=60,
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "image"


def test_two_models_of_one_application_batch_differently(client):
    def batch_sizes(model: str) -> list[int]:
        handle = serve.get_deployment_handle(generator_deployment_name(model), "families")
        return handle.counters.remote().result()["batch_sizes"]

    before = {model: len(batch_sizes(model)) for model in ("tiny-sd3", "tiny-flux")}
    with ThreadPoolExecutor(12) as pool:
        # Slow enough (20 steps) that the others arrive while the first request runs.
        futures = [
            pool.submit(
                generate, client, model=model, extra_body={"num_inference_steps": 20, "seed": i}
            )
            for model in ("tiny-sd3", "tiny-flux")
            for i in range(6)
        ]
        for future in futures:
            future.result()
    sd3 = batch_sizes("tiny-sd3")[before["tiny-sd3"] :]
    flux = batch_sizes("tiny-flux")[before["tiny-flux"] :]
    assert sd3 == [1] * 6, sd3
    assert sum(flux) == 6 and max(flux) > 1, flux


def sdxl_job(seed: int, prompt: str) -> GenerationJob:
    return make_job(
        seed,
        prompt=prompt,
        width=32,
        height=32,
        num_inference_steps=20,
        guidance_scale=5.0,
        request_id=f"poison-test-{seed}",
    )


def replica_batch_sizes(handle) -> list[int]:
    """Images in each of a generator replica's most recent batches, oldest first (its last
    100: this module runs far fewer on one replica)."""
    return handle.counters.remote().result()["batch_sizes"]


def held_jobs(handle) -> int:
    """The jobs a generator replica holds (running or waiting): what it reports to the
    cost-aware autoscaling policy."""
    return int(handle.record_autoscaling_stats.remote().result()[JOBS_METRIC])


def wait_for(condition, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_poisoned_job_fails_alone_and_its_batch_neighbours_succeed(base_url):
    """Through a real replica (the ingress refuses such text with a 400, so the job is sent
    on the generator's handle): a prompt the tokenizer rejects, batched with 7 good jobs."""
    handle = serve.get_deployment_handle(generator_deployment_name("tiny-sdxl"), "families")
    before = len(replica_batch_sizes(handle))
    # Two long jobs of other sizes (so they batch with nothing) hold both worker threads until
    # the 8 jobs all wait in the replica, where they gather into one batch; then they are
    # cancelled. Sent together on a busy machine, the 8 could arrive over more than
    # `max_wait_ms` and split into batches (CI saw [1, 4, 3]).
    blockers = [
        handle.generate.remote(
            make_job(100 + index, width=width, height=64, num_inference_steps=5000)
        )
        for index, width in enumerate((64, 32))
    ]
    wait_for(lambda: len(replica_batch_sizes(handle)) == before + 2, "the two long jobs to start")
    jobs = [sdxl_job(seed, f"a lighthouse, take {seed}") for seed in range(7)]
    jobs.append(sdxl_job(7, "a lighthouse \ud800"))
    responses = [handle.generate.remote(job) for job in jobs]
    wait_for(lambda: held_jobs(handle) == 2 + len(jobs), "the 8 jobs to wait in the replica")
    for blocker in blockers:
        blocker.cancel()
    good = [response.result(timeout_s=120) for response in responses[:-1]]
    with pytest.raises(TypeError):  # the tokenizer's own error, raised for this job alone
        responses[-1].result(timeout_s=120)
    batches = replica_batch_sizes(handle)[before:]
    assert batches == [1, 1, 8], f"the poisoned job was not batched: {batches}"
    for sent, result in zip(jobs, good, strict=False):
        alone = handle.generate.remote(sent).result(timeout_s=120)
        difference = np.abs(result.images[0].astype(int) - alone.images[0].astype(int))
        assert difference.max() <= 1 and (difference > 0).mean() <= 0.001
    assert handle.check_health.remote().result() is None


def test_an_edit_class_named_as_a_model_fails_the_deploy_naming_the_key(serve_url):
    """What `serve status` shows an operator: the generator's refusal, naming the key (it
    would otherwise load, then answer every request with an error)."""
    app = "notservable"
    model = {
        **ARGS["models"][0],
        "id": "img2img",
        "pipeline_class": "StableDiffusion3Img2ImgPipeline",
        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    }
    # One try, not Serve's three: each loads the model before refusing it.
    application = build_application(
        parse_args({**ARGS, "models": [model]}),
        generator_options={"max_constructor_retry_count": 1},
    )
    try:
        with pytest.raises(RuntimeError, match="failed"):
            serve.run(application, name=app, route_prefix=f"/{app}")
        status = serve.status().applications[app]
        generator = status.deployments[generator_deployment_name("img2img")]
        assert generator.status == "DEPLOY_FAILED"
        assert "models[].pipeline_class StableDiffusion3Img2ImgPipeline needs an input image" in (
            generator.message
        )
    finally:
        serve.delete(app)
