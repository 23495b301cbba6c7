"""LoRA adapters on the real embedded pipelines (SD3, SDXL, FLUX): each job gets its own
adapters and nobody else's, on shared modules that several calls use at once, and the base
model comes back exactly.

Each family's pipeline is shared by the module's tests, with ONE `AdapterStore` (adapters
loaded into a pipeline belong to it, like the gate that guards them); each test that needs
the base model's images before any adapter was loaded takes them from the fixture.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deployments.adapter_directory import WatchedAdapterDirectory
from deployments.config.model_config import AdapterConfig, BatchingConfig, ModelConfig
from deployments.generator import deployment
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.adapters.embedded_adapters import WEIGHT_NAME, resolve_adapter_source
from deployments.generator.engine import ImageEngine
from deployments.generator.model.pipelines import load_pipeline
from deployments.jobs import AdapterUnavailable, GenerationJob
from tests.jobs import make_job

FAMILIES = ("tiny-sd3", "tiny-sdxl", "tiny-flux")
BATCHING = BatchingConfig(max_batch_images=4, max_wait_ms=20)
INK = (("ink", 1.0),)


def adapter_configs(family: str) -> list[AdapterConfig]:
    configs = [AdapterConfig(id="ink", source=f"embedded:{family}/ink")]
    if family == "tiny-sd3":
        configs += [
            AdapterConfig(id="paper", source="embedded:tiny-sd3/paper"),
            # Another model's adapter: diffusers would load it with a mere warning.
            AdapterConfig(id="flux-ink", source="embedded:tiny-flux/ink"),
            AdapterConfig(id="nowhere", source="/nonexistent/adapter"),
        ]
    return configs


def job(seed: int, adapters: tuple = (), **fields) -> GenerationJob:
    values = {"prompt": f"a lighthouse, take {seed}", "guidance_scale": 5.0, "adapters": adapters}
    return make_job(seed, **{**values, **fields})


def base_weights(pipeline) -> dict[str, tuple[int, torch.Tensor]]:
    """Every parameter that is not an adapter's: its storage and a copy of its values, by
    name (a module wrapped by an adapter keeps its weight as `<name>.base_layer.weight`)."""
    weights = {}
    for component in pipeline.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        for name, parameter in component.named_parameters():
            if "lora_" not in name:
                key = f"{id(component)}.{name.replace('.base_layer', '')}"
                for part, tensor in _plain_tensors(key, parameter):
                    weights[part] = (tensor.data_ptr(), tensor.detach().clone())
    return weights


def _plain_tensors(name: str, tensor: torch.Tensor):
    """A tensor, or a tensor subclass's inner tensors by name: torchao's int8 weights hold
    their int8 data, scales and zero points in plain tensors (the subclass itself has no
    storage of its own to compare, and no `torch.equal`)."""
    if not hasattr(tensor, "__tensor_flatten__"):
        yield name, tensor
        return
    inner, _ = tensor.__tensor_flatten__()
    for attribute in inner:
        yield from _plain_tensors(f"{name}.{attribute}", getattr(tensor, attribute))


@dataclass
class Family:
    name: str
    pipeline: object
    store: AdapterStore
    base_images: dict[int, np.ndarray]  # by seed, before any adapter was loaded
    weights: dict[str, tuple[int, torch.Tensor]]  # the same

    def engine(self, workers: int = 2, batching: BatchingConfig = BATCHING) -> ImageEngine:
        return ImageEngine(self.pipeline, workers, batching=batching, adapters=self.store)

    def run(self, jobs: list[GenerationJob], workers: int = 2) -> list[np.ndarray]:
        """Each job's image, all submitted at once on one engine."""
        engine = self.engine(workers)

        async def gather():
            return await asyncio.gather(*(engine.generate(j) for j in jobs))

        try:
            return [result.images[0] for result in asyncio.run(gather())]
        finally:
            engine.shutdown()

    def alone(self, single: GenerationJob) -> np.ndarray:
        return self.run([single], workers=1)[0]


@functools.cache
def build_family(name: str) -> Family:
    """A family's pipeline and store, with its base images taken before any adapter."""
    pipeline = load_pipeline(ModelConfig(id=name, source=f"embedded:{name}", device="cpu"))
    store = AdapterStore(pipeline, adapter_configs(name), max_loaded=4)
    store.prefetch(["ink", "paper"] if name == "tiny-sd3" else ["ink"])
    engine = ImageEngine(pipeline, 1, adapters=store)
    try:
        base = {seed: asyncio.run(engine.generate(job(seed))).images[0] for seed in (1, 2)}
    finally:
        engine.shutdown()
    assert store.loaded == []
    return Family(name, pipeline, store, base, base_weights(pipeline))


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> Family:
    return build_family(request.param)


@pytest.fixture(scope="module")
def sd3() -> Family:
    """The family with two adapters, another model's adapter and a missing one."""
    return build_family("tiny-sd3")


def assert_nearly_equal(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for the float noise of another batch size (design note 8)."""
    difference = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert difference.max() <= 1
    assert (difference > 0).mean() <= 0.001


def mean_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def sets_of(family: Family) -> list[tuple]:
    sets = [(), INK, (("ink", 0.5),)]
    if family.name == "tiny-sd3":
        sets += [(("paper", 1.0),), (("ink", 1.0), ("paper", 0.7))]
    return sets


def test_adapter_and_base_jobs_together_give_the_images_they_give_alone(family):
    # Two jobs of each set, all at once on 2 worker threads with batching: the same sets
    # batch together, different sets would overlap on the shared modules without the gate.
    jobs = [job(seed, adapters) for adapters in sets_of(family) for seed in (1, 2)]
    together = family.run(jobs)
    for single, image in zip(jobs, together, strict=True):
        assert_nearly_equal(image, family.alone(single))
        if single.adapters:
            base = family.base_images[single.seeds[0]]
            assert mean_difference(image, base) > 1.0, "the adapter changes the image"
        else:
            assert np.array_equal(image, family.base_images[single.seeds[0]])
    assert family.store.gate.running == 0


def test_the_base_model_after_adapters_is_unchanged(family):
    family.run([job(1, INK), job(2, (("ink", 0.5),)), job(1)])
    assert "ink" in family.store.loaded
    assert np.array_equal(family.alone(job(1)), family.base_images[1])
    assert np.array_equal(family.alone(job(2)), family.base_images[2])
    after = base_weights(family.pipeline)
    assert after.keys() == family.weights.keys()
    for name, (pointer, values) in family.weights.items():
        assert after[name][0] == pointer, f"{name} moved"
        assert torch.equal(after[name][1], values), f"{name} changed"


def test_scale_zero_and_no_adapters_are_the_base_model(family):
    family.alone(job(1, INK))  # the adapter is loaded and was the last set
    assert np.array_equal(family.alone(job(1, (("ink", 0.0),))), family.base_images[1])
    assert np.array_equal(family.alone(job(1, ())), family.base_images[1])


def test_two_adapters_composed_differ_from_each_alone(sd3):
    ink = sd3.alone(job(1, INK))
    paper = sd3.alone(job(1, (("paper", 1.0),)))
    both = sd3.alone(job(1, (("ink", 1.0), ("paper", 1.0))))
    assert mean_difference(both, ink) > 1.0
    assert mean_difference(both, paper) > 1.0


def test_an_adapter_of_another_model_is_refused_before_anything_is_injected(sd3):
    adapters_before = sd3.pipeline.get_list_adapters()
    with pytest.raises(AdapterUnavailable) as refused:
        sd3.store.prefetch(["flux-ink"])
    assert refused.value.adapter_id == "flux-ink"
    assert "single_transformer_blocks" in refused.value.reason
    with pytest.raises(AdapterUnavailable, match="could not be read"):
        sd3.store.prefetch(["nowhere"])
    with pytest.raises(AdapterUnavailable, match="not one of this model's adapters"):
        sd3.store.prefetch(["unknown"])
    # Even a job that reaches the engine unprefetched is refused, alone.
    with pytest.raises(AdapterUnavailable):
        sd3.alone(job(1, (("flux-ink", 1.0),)))
    assert sd3.pipeline.get_list_adapters() == adapters_before
    assert np.array_equal(sd3.alone(job(1)), sd3.base_images[1])
    assert mean_difference(sd3.alone(job(1, INK)), sd3.base_images[1]) > 1.0


def test_a_load_that_fails_leaves_nothing_behind(sd3, monkeypatch):
    pipeline = load_pipeline(ModelConfig(id="tiny-sd3", source="embedded:tiny-sd3", device="cpu"))
    store = AdapterStore(pipeline, adapter_configs("tiny-sd3"), max_loaded=4)
    store.prefetch(["ink"])

    def fails(*args, **kwargs):
        raise RuntimeError("the text encoder's part failed")

    # After the transformer's layers are injected: a half-loaded adapter.
    monkeypatch.setattr(type(pipeline), "load_lora_into_text_encoder", fails)
    engine = ImageEngine(pipeline, 1, adapters=store)
    try:
        with pytest.raises(AdapterUnavailable, match="loading its weights failed"):
            asyncio.run(engine.generate(job(1, INK)))
        assert pipeline.get_list_adapters() in ({}, {"transformer": []})
        assert store.loaded == []
        image = asyncio.run(engine.generate(job(1))).images[0]
    finally:
        engine.shutdown()
    assert np.array_equal(image, sd3.base_images[1])


def test_one_adapter_per_replica_still_gives_each_its_images(sd3):
    ink, paper = sd3.alone(job(1, INK)), sd3.alone(job(1, (("paper", 1.0),)))
    pipeline = load_pipeline(ModelConfig(id="tiny-sd3", source="embedded:tiny-sd3", device="cpu"))
    store = AdapterStore(pipeline, adapter_configs("tiny-sd3"), max_loaded=1)
    store.prefetch(["ink", "paper"])
    engine = ImageEngine(pipeline, 2, batching=BATCHING, adapters=store)
    try:
        for adapters, expected in [(INK, ink), ((("paper", 1.0),), paper)] * 2:
            image = asyncio.run(engine.generate(job(1, adapters))).images[0]
            assert np.array_equal(image, expected)
            assert len(store.loaded) == 1
            assert pipeline.get_list_adapters()["transformer"] == store.loaded
    finally:
        engine.shutdown()
    assert store.loads == 4


def test_the_deployment_prefetches_and_counts_adapters(sd3, monkeypatch):
    # Outside a Ray worker: no runtime context (and the process's torch threads stay).
    context = SimpleNamespace(get_node_id=lambda: "node", get_assigned_resources=lambda: {})
    monkeypatch.setattr(deployment.ray, "get_runtime_context", lambda: context)
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    model = ModelConfig(
        id="tiny-sd3",
        source="embedded:tiny-sd3",
        device="cpu",
        adapters=adapter_configs("tiny-sd3"),
    )
    generator = deployment.ImageGenerator.func_or_class(model, 2, BATCHING)
    ink = sd3.alone(job(1, INK))
    assert generator.counters()["adapters"] == {
        "loaded": [],
        "loads": 0,
        "load_seconds": [],
        "switches": 0,
    }
    result = asyncio.run(generator.generate(job(1, INK)))
    assert np.array_equal(result.images[0], ink)
    with pytest.raises(AdapterUnavailable):
        asyncio.run(generator.generate(job(1, (("flux-ink", 1.0),))))
    counters = generator.counters()["adapters"]
    assert counters["loaded"] == ["ink"]
    assert counters["loads"] == 1
    assert counters["switches"] == 1


def test_int8_weights_take_adapters_without_mixing_them(sd3):
    """Quantized weights get peft's torchao LoRA layers: the same guarantees hold."""
    config = ModelConfig(
        id="tiny-sd3",
        source="embedded:tiny-sd3",
        device="cpu",
        optimizations={"quantization": "int8_weight_only"},
        adapters=adapter_configs("tiny-sd3")[:2],
    )
    quantized = Family("tiny-sd3", load_pipeline(config), None, {}, {})
    quantized.store = AdapterStore(quantized.pipeline, config.adapters, max_loaded=4)
    quantized.store.prefetch(["ink", "paper"])
    base = quantized.alone(job(1))
    jobs = [job(seed, adapters) for adapters in sets_of(sd3) for seed in (1, 2)]
    together = quantized.run(jobs)
    for single, image in zip(jobs, together, strict=True):
        assert_nearly_equal(image, quantized.alone(single))
    assert mean_difference(quantized.alone(job(1, INK)), base) > 1.0
    assert np.array_equal(quantized.alone(job(1)), base)


def test_an_adapter_dropped_into_the_watched_directory_generates_like_its_configured_twin(
    sd3, tmp_path, monkeypatch
):
    # The replica reads the directory again for an id it does not know (no RESCAN_S wait).
    ink = sd3.alone(job(1, INK))
    pipeline = load_pipeline(ModelConfig(id="tiny-sd3", source="embedded:tiny-sd3", device="cpu"))
    watched = WatchedAdapterDirectory(tmp_path, taken={"tiny-sd3"})
    store = AdapterStore(pipeline, [], max_loaded=2, directory=watched)
    with pytest.raises(AdapterUnavailable, match="not one of this model's adapters"):
        store.prefetch(["drop"])
    source, weight_name = resolve_adapter_source(adapter_configs("tiny-sd3")[0])
    shutil.copy(Path(source) / weight_name, tmp_path / "drop.safetensors")
    # An unknown id is not remembered as a failure: once the file is there, it is found.
    store.prefetch(["drop"])
    engine = ImageEngine(pipeline, 1, adapters=store)
    try:
        image = asyncio.run(engine.generate(job(1, (("drop", 1.0),)))).images[0]
    finally:
        engine.shutdown()
    assert np.array_equal(image, ink), "the same weights, found in the directory"


def test_a_directory_adapter_replaced_by_one_that_does_not_fit_is_checked_again(tmp_path):
    pipeline = load_pipeline(ModelConfig(id="tiny-sd3", source="embedded:tiny-sd3", device="cpu"))
    watched = WatchedAdapterDirectory(tmp_path, taken={"tiny-sd3"})
    store = AdapterStore(pipeline, [], max_loaded=2, directory=watched)
    ink, _ = resolve_adapter_source(adapter_configs("tiny-sd3")[0])
    flux, _ = resolve_adapter_source(AdapterConfig(id="f", source="embedded:tiny-flux/ink"))
    shutil.copy(Path(ink) / WEIGHT_NAME, tmp_path / "drop.safetensors")
    store.prefetch(["drop"])  # checked: it fits
    # Replaced before it was loaded, by another model's adapter (renamed into place).
    shutil.copy(Path(flux) / WEIGHT_NAME, tmp_path / ".drop.safetensors")
    (tmp_path / ".drop.safetensors").replace(tmp_path / "drop.safetensors")
    engine = ImageEngine(pipeline, 1, adapters=store)
    try:
        with pytest.raises(AdapterUnavailable, match="do not fit"):
            asyncio.run(engine.generate(job(1, (("drop", 1.0),))))
    finally:
        engine.shutdown()
    assert store.loaded == [] and not pipeline.get_list_adapters()


def test_int8_weights_keep_each_adapters_images_through_lru_eviction_and_reload():
    """Three adapters, room for two, on int8 weights: the least recently used is unloaded
    (peft's torchao layers taken out again), and an adapter loaded again gives the images
    it gave before it was evicted. `ink-copy` is `ink`'s weights under another name."""
    config = ModelConfig(
        id="tiny-sd3",
        source="embedded:tiny-sd3",
        device="cpu",
        optimizations={"quantization": "int8_weight_only"},
        adapters=[
            *adapter_configs("tiny-sd3")[:2],
            AdapterConfig(id="ink-copy", source="embedded:tiny-sd3/ink"),
        ],
    )
    pipeline = load_pipeline(config)
    store = AdapterStore(pipeline, config.adapters, max_loaded=2)
    store.prefetch(["ink", "paper", "ink-copy"])
    quantized = Family("tiny-sd3", pipeline, store, {}, {})
    base = quantized.alone(job(1))
    weights = base_weights(pipeline)
    paper = (("paper", 1.0),)

    def image(adapters: tuple) -> np.ndarray:
        result = quantized.alone(job(1, adapters))
        assert len(store.loaded) <= 2, store.loaded
        assert sorted(pipeline.get_list_adapters()["transformer"]) == sorted(store.loaded)
        return result

    # Before any eviction: each adapter's image.
    ink_image, paper_image = image(INK), image(paper)
    assert store.loaded == ["ink", "paper"]
    assert mean_difference(ink_image, paper_image) > 1.0
    assert np.array_equal(image(INK), ink_image)  # ink is the most recently used now
    # A third adapter evicts the least recently used (paper), not the one just used (ink).
    assert np.array_equal(image((("ink-copy", 1.0),)), ink_image)
    assert store.loaded == ["ink", "ink-copy"]
    # paper again: loaded anew (ink goes), and its image is the one from before.
    assert np.array_equal(image(paper), paper_image)
    assert store.loaded == ["ink-copy", "paper"]
    assert np.array_equal(image(INK), ink_image)
    assert store.loaded == ["paper", "ink"]
    assert store.loads == 5  # ink, paper, ink-copy, paper again, ink again
    # The base model is unchanged: its image, and its int8 weights' storage and values.
    assert np.array_equal(quantized.alone(job(1)), base)
    after = base_weights(pipeline)
    assert after.keys() == weights.keys()
    for name, (pointer, values) in weights.items():
        assert after[name][0] == pointer, f"{name} moved"
        assert torch.equal(after[name][1], values), f"{name} changed"


def test_building_an_embedded_adapter_leaves_other_threads_modules_real(tmp_path):
    """An embedded adapter is built on its first use, while the replica serves: another
    thread making modules meanwhile (peft's LoRA layers as an adapter loads) gets real
    weights, not the empty ones of a model loader's process-wide patch (its images were
    wrong)."""
    import threading

    from deployments.generator.adapters.embedded_adapters import ensure_embedded_adapter
    from deployments.generator.model.embedded import ensure_embedded_model

    ensure_embedded_model("embedded:tiny-sd3", tmp_path)  # only the adapter's build is timed
    built = threading.Event()
    devices: set[str] = set()

    def build() -> None:
        try:
            ensure_embedded_adapter("embedded:tiny-sd3/ink", tmp_path)
        finally:
            built.set()

    builder = threading.Thread(target=build)
    builder.start()
    while not built.is_set():
        devices.add(torch.nn.Linear(4, 4).weight.device.type)
    builder.join()
    assert devices == {"cpu"}
