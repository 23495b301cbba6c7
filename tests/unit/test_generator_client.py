"""How the ingress hands jobs to a model's generator deployment: a job with adapters is
routed by Serve's model multiplexing to a replica holding its set of adapters."""

from __future__ import annotations

import asyncio

from deployments.ingress.deployment import GeneratorClient
from deployments.jobs import GenerationJob
from tests.jobs import make_job


class FakeHandle:
    """Records the options each call was made with (a `DeploymentHandle`'s surface)."""

    def __init__(self, options: dict | None = None, calls: list | None = None) -> None:
        self._options = options or {}
        self.calls = calls if calls is not None else []

    def options(self, **options) -> FakeHandle:
        return FakeHandle({**self._options, **options}, self.calls)

    @property
    def generate(self) -> FakeHandle:
        return self

    def remote(self, job: GenerationJob):
        self.calls.append(self._options)
        future = asyncio.get_running_loop().create_future()
        future.set_result("images")
        return future


def job(adapters=()) -> GenerationJob:
    return make_job(1, prompt="a cat", guidance_scale=5.0, adapters=adapters)


def test_a_job_with_adapters_is_routed_by_its_adapter_set_and_one_without_is_not():
    handle = FakeHandle()
    client = GeneratorClient(handle)

    async def send_both():
        await client.generate(job((("ink", 1.0), ("paper", 0.5))))
        await client.generate(job())

    asyncio.run(send_both())
    assert handle.calls == [{"multiplexed_model_id": "ink+paper"}, {}]
