"""The parts of a parallel replica on real tiny models and a real gloo group of two processes,
without Ray: SD3's joint attention must go through diffusers' dispatcher (its stock processor
is silently wrong under context parallelism), CFG-parallel gives each rank half of the batch,
and the lockstep channel carries a forward's arguments whole.

Through Serve, with faults: `tests/integration/test_parallel.py`.
"""

from __future__ import annotations

import inspect
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deployments.config.model_config import ModelConfig
from deployments.config.parallel_config import ParallelConfig
from deployments.generator.model.embedded import ensure_embedded_model
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.parallel.context_parallel import (
    Degrees,
    ParallelUnavailable,
    check_degrees,
)
from deployments.generator.parallel.lockstep import (
    GroupFailed,
    _described,
    _filled,
    follow,
    lead,
)
from deployments.generator.parallel.rank_group import join_group
from tests.harness import free_port


def _pipeline(family: str):
    return load_pipeline(ModelConfig(id=family, source=f"embedded:{family}", device="cpu"))


def _generate(pipeline, seed: int = 3) -> np.ndarray:
    guided = {}
    if "negative_prompt" in inspect.signature(pipeline.__call__).parameters:
        guided["negative_prompt"] = ["fog", "rain"]
    return pipeline(
        prompt=["a red fox", "a blue bird"],
        **guided,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=4.0,
        generator=[torch.Generator().manual_seed(seed + i) for i in range(2)],
        output_type="np",
    ).images


def _rank(rank: int, port: int, family: str, config: ParallelConfig, options: dict, results):
    """One rank of a group: rank 0 generates and puts in `results` its images and the batch
    sizes its first block saw (or, if the call failed, the seconds it took and the error);
    the others follow. `options`: `stock` (SD3's attention left as diffusers ships it) and
    `stall` (the rank that sleeps in its second forward, as a hung process would)."""
    joined = False
    try:
        torch.set_num_threads(1)
        # Loaded before joining, as a rank of a replica does: an embedded model built inside
        # a process group came out without its T5 weights (seen here: transformers saves from
        # a group's main process only).
        pipeline = _pipeline(family)
        denoiser = pipeline.transformer
        seen: list[int] = []  # the rows each step's first block ran on this rank
        denoiser.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen.append(
                (args[0] if args else kwargs["hidden_states"]).shape[0]
            ),
            with_kwargs=True,
        )
        if options.get("stock"):  # SD3 as diffusers ships it: the plan on, its own processor
            from deployments.generator.parallel import context_parallel

            context_parallel.use_dispatched_joint_attention = lambda denoiser: 0
        if options.get("stall") == rank:
            denoiser.transformer_blocks[0].register_forward_pre_hook(
                lambda *_: time.sleep(600) if len(seen) == 2 else None
            )
        join_group(denoiser, torch.device("cpu"), config, "127.0.0.1", port, rank)
        joined = True
        if rank == 0:
            leading = lead(denoiser, torch.device("cpu"), heartbeat_s=30)
            started = time.monotonic()
            try:
                images = _generate(pipeline)
            except GroupFailed as error:
                results.put((time.monotonic() - started, str(error)))
                return
            leading.stop()
            results.put((images, seen))
        else:
            follow(denoiser, torch.device("cpu"))
        dist.destroy_process_group()
    except BaseException:
        if rank == 0 or not joined:
            results.put(traceback.format_exc())
        raise


def _in_group(family: str, degrees: Degrees, timeout_s: float = 60, **options):
    ensure_embedded_model(f"embedded:{family}")  # built once, here, not by each rank
    config = ParallelConfig(
        ulysses_degree=degrees.ulysses,
        ring_degree=degrees.ring,
        cfg_parallel=degrees.cfg == 2,
        collective_timeout_s=timeout_s,
    )
    context = _ranks_context()
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_rank, args=(rank, port, family, config, options, results))
        for rank in range(degrees.world_size)
    ]
    for process in processes:
        process.start()
    try:
        result = results.get(timeout=240)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
    assert not isinstance(result, str), result
    return result


def _ranks_context():
    """Processes forked from one server that imported torch and diffusers once (about 10
    CPU-seconds that each spawned rank paid again); the server has started no thread, and
    each rank is a fresh fork of it, as a spawned one would be fresh."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    return context


@pytest.fixture(scope="module")
def sd3_alone() -> np.ndarray:
    return _generate(_pipeline("tiny-sd3"))


@pytest.mark.parametrize("family", ["tiny-sd3", "tiny-flux"])
@pytest.mark.parametrize("degrees", [Degrees(ulysses=2), Degrees(ring=2)], ids=["ulysses", "ring"])
def test_a_split_over_two_ranks_equals_one_device(family, degrees):
    images, _ = _in_group(family, degrees)
    assert np.abs(images - _generate(_pipeline(family))).max() < 1e-4


def test_sd3s_stock_attention_is_wrong_when_split(sd3_alone):
    """Why `DispatchedJointAttnProcessor` exists: without it each rank attends to its half."""
    images, _ = _in_group("tiny-sd3", Degrees(ulysses=2), stock=True)
    assert np.abs(images - sd3_alone).max() > 1e-3


def test_cfg_parallel_gives_each_rank_half_of_the_batch(sd3_alone):
    images, seen = _in_group("tiny-sd3", Degrees(cfg=2))
    assert np.abs(images - sd3_alone).max() < 1e-4
    # Two images with their negative prompts: 4 rows a step, 2 on each rank.
    assert seen and set(seen) == {2}


def test_both_splits_at_once_equal_one_device(sd3_alone):
    """Four ranks: two CFG halves, each over two Ulysses ranks (the mesh's groups that are
    not the whole world are made by `new_group`)."""
    images, seen = _in_group("tiny-sd3", Degrees(cfg=2, ulysses=2))
    assert np.abs(images - sd3_alone).max() < 1e-4
    assert set(seen) == {2}


def test_a_stall_inside_a_cfg_half_fails_the_call_within_the_collective_timeout():
    """Rank 3 hangs in its half's forward: rank 2 waits in their Ulysses group, rank 0 in
    its CFG group with rank 2. Both groups are the mesh's own, made with the group's timeout
    (5 s here), not torch's default of 30 minutes."""
    seconds, error = _in_group("tiny-sd3", Degrees(cfg=2, ulysses=2), timeout_s=5, stall=3)
    assert "the rank group failed" in error
    assert seconds < 30


def test_degrees_and_families_the_split_cannot_take_are_refused_naming_the_key():
    denoiser = _pipeline("tiny-flux").transformer  # 2 attention heads
    check_degrees(denoiser, Degrees(ulysses=2))
    with pytest.raises(ParallelUnavailable, match=r"parallel\.ulysses_degree: 4 does not divide"):
        check_degrees(denoiser, Degrees(ulysses=4))
    unet = _pipeline("tiny-sdxl").unet
    with pytest.raises(ParallelUnavailable, match=r"parallel\.ring_degree: .* not verified"):
        check_degrees(unet, Degrees(ring=2))
    chroma = _pipeline("tiny-chroma").transformer  # FLUX's layout, but untested split
    with pytest.raises(ParallelUnavailable, match=r"parallel\.cfg_parallel: .* not verified"):
        check_degrees(chroma, Degrees(cfg=2))


def test_a_forwards_arguments_travel_whole():
    tensors: list[torch.Tensor] = []
    arguments = (
        (torch.ones(2, 3),),
        {"timestep": torch.arange(2), "joint_attention_kwargs": {"scale": 0.5}, "flag": None},
    )
    description = _described(arguments, tensors)
    assert len(tensors) == 2
    assert "tensor(" not in repr(description)  # shapes and dtypes only
    args, kwargs = _filled(description, tensors)
    assert torch.equal(args[0], torch.ones(2, 3))
    assert torch.equal(kwargs["timestep"], torch.arange(2))
    assert kwargs["joint_attention_kwargs"] == {"scale": 0.5} and kwargs["flag"] is None
