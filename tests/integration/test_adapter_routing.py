"""LoRA adapters through real Ray Serve model multiplexing, on the generator deployment alone:
a job sent with its adapter set as `multiplexed_model_id` lands on the replica that already
holds the set, and an adapter that does not fit is refused while the replica stays healthy.
(The ingress side, which sends the ids, is tested through HTTP with the application.)"""

from __future__ import annotations

import time

import pytest
from ray import serve

from deployments.generator.deployment import ImageGenerator
from deployments.jobs import AdapterUnavailable, GenerationJob, adapter_set_id
from deployments.model_config import AdapterConfig, BatchingConfig, ModelConfig

pytestmark = pytest.mark.integration

MODEL = ModelConfig(
    id="tiny-sd3",
    source="embedded:tiny-sd3",
    device="cpu",
    max_adapters_per_replica=1,
    adapters=[
        AdapterConfig(id="ink", source="embedded:tiny-sd3/ink"),
        AdapterConfig(id="flux-ink", source="embedded:tiny-flux/ink"),
    ],
)
INK = (("ink", 1.0),)


@pytest.fixture(scope="module")
def generator(serve_url):
    app = ImageGenerator.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(
        MODEL, 2, BatchingConfig()
    )
    handle = serve.run(app, name="adapter-routing", route_prefix=None)
    yield handle
    serve.delete("adapter-routing")


def job(seed: int, adapters: tuple = ()) -> GenerationJob:
    return GenerationJob(
        prompt="a lighthouse",
        negative_prompt=None,
        width=32,
        height=32,
        num_inference_steps=2,
        guidance_scale=5.0,
        seeds=(seed,),
        adapters=adapters,
    )


def generate(handle, single: GenerationJob):
    if single.adapters:
        handle = handle.options(multiplexed_model_id=adapter_set_id(single.adapters))
    return handle.generate.remote(single).result(timeout_s=60)


def adapters_by_replica(handle) -> dict[int, dict]:
    """Each replica's adapter counters (asked until both replicas answered)."""
    seen: dict[int, dict] = {}
    for _ in range(50):
        counters = handle.counters.remote().result(timeout_s=30)
        seen[counters["pid"]] = counters["adapters"]
        if len(seen) == 2:
            break
    assert len(seen) == 2
    return seen


def test_an_adapter_sets_jobs_go_to_the_replica_that_holds_it(generator):
    first = generate(generator, job(1, INK))
    time.sleep(2)  # the replica tells the controller, which tells the routers
    for _ in range(8):
        again = generate(generator, job(1, INK))
        assert (again.images[0] == first.images[0]).all()
    replicas = adapters_by_replica(generator)
    holding = [counters for counters in replicas.values() if counters["loaded"] == ["ink"]]
    assert len(holding) == 1, replicas
    assert sum(counters["loads"] for counters in replicas.values()) == 1


def test_an_adapter_that_does_not_fit_is_refused_and_the_replica_stays_healthy(generator):
    with pytest.raises(AdapterUnavailable, match="do not fit"):
        generate(generator, job(2, (("flux-ink", 1.0),)))
    assert generate(generator, job(2)).images[0].shape == (32, 32, 3)
    deployment = serve.status().applications["adapter-routing"].deployments["ImageGenerator"]
    assert deployment.status == "HEALTHY"
