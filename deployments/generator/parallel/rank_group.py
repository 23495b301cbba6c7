"""A parallel replica's group of ranks: rank 0 is the Serve replica, ranks 1..N-1 are Ray
actors it starts in its own placement group.

Why a placement group per replica (Serve's `placement_group_bundles`, set by the builder
from `models[].parallel`): Serve reserves all of a replica's bundles before it starts the
replica, in one atomic step, and Ray kills the actors a replica owns when the replica dies.
So a group is whole or absent: no replica starts with half its devices, and a replica that
Serve replaces takes its ranks with it (the fault tests kill a rank and watch a new group
serve). Ray's gang scheduling of replicas (2.60, alpha) schedules several replicas
together; here one replica owns several devices, which is what a placement group is.

Starting: each rank loads the model on its own device (its own process), then all join one
`torch.distributed` process group (NCCL on GPUs, gloo on CPU) at rank 0's address, build the
device mesh, and make their denoisers parallel (`context_parallel.py`, `cfg_split.py`). Rank
0 leads (`lockstep.py`); the others run `follow` as one long actor task, whose end (a rank
died, or its group failed) the replica's health check sees.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from unittest import mock

import ray
import torch
import torch.distributed as dist
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch.distributed import distributed_c10d

from deployments.config.model_config import ModelConfig
from deployments.config.parallel_config import ParallelConfig
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.pipelines import load_pipeline, resolve_device
from deployments.generator.parallel.cfg_split import split_batches
from deployments.generator.parallel.context_parallel import (
    Degrees,
    check_degrees,
    device_mesh,
    enable_context_parallel,
)
from deployments.generator.parallel.lockstep import GroupFailed, LeadingForward, follow, lead

logger = logging.getLogger("ray.serve")

# How long the other ranks may take to start and load their models.
START_TIMEOUT_S = 600.0


def degrees_of(config: ParallelConfig) -> Degrees:
    return Degrees(
        cfg=2 if config.cfg_parallel else 1,
        ring=config.ring_degree,
        ulysses=config.ulysses_degree,
    )


def rank_device(model: ModelConfig) -> torch.device:
    """The device of a rank: the model's, with an index on CUDA (Ray shows each rank its
    own GPU only, as device 0), which `set_device` and NCCL need."""
    device = resolve_device(model.device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", 0)
    return device


def join_group(
    denoiser: torch.nn.Module,
    device: torch.device,
    config: ParallelConfig,
    address: str,
    port: int,
    rank: int,
) -> None:
    """Join the replica's process group as `rank` and make `denoiser` this rank's part.
    Every rank calls this at once (the process group and the mesh are collective)."""
    degrees = degrees_of(config)
    timeout = datetime.timedelta(seconds=config.collective_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://{address}:{port}",
        rank=rank,
        world_size=degrees.world_size,
        timeout=timeout,
    )
    # The mesh's groups other than the whole world (a CFG half's context group, say) are
    # made by `new_group` with torch's default timeout (30 min on gloo, 10 on NCCL), which
    # neither DeviceMesh nor diffusers lets one set: for the mesh's making, the default is
    # the group's own.
    with mock.patch.object(distributed_c10d, "_get_default_timeout", return_value=timeout):
        mesh = device_mesh(degrees, device)
        enable_context_parallel(denoiser, degrees, mesh)
        split_batches(denoiser, mesh)


@ray.remote
class DenoiserRank:
    """A follower rank: the model's denoiser on this actor's device."""

    def __init__(self, model: ModelConfig, threads: int) -> None:
        device = rank_device(model)
        if device.type == "cpu":
            torch.set_num_threads(threads)
        self._device = device
        # The whole pipeline loads the way rank 0's does (quantization, attention backend);
        # only the denoiser is kept.
        self._denoiser = denoiser_of(load_pipeline(model))

    def pid(self) -> int:
        """This rank's process id (called once it has loaded: the group's meeting waits
        only `collective_timeout_s`)."""
        return os.getpid()

    def join(self, config: ParallelConfig, address: str, port: int, rank: int) -> None:
        join_group(self._denoiser, self._device, config, address, port, rank)

    def follow(self) -> int:
        """Runs until rank 0 says stop; returns the forwards it ran."""
        return follow(self._denoiser, self._device)


class RankGroup:
    """Rank 0's view of its group: the followers, and the leading forward.

    `launch` starts the followers (each loads the model) before rank 0 loads its own, so
    the loads overlap; `join` forms the group once rank 0's denoiser is there."""

    def __init__(self, model: ModelConfig, followers: list) -> None:
        self._model = model
        self._followers = followers
        self.pids: list[int] = []  # the followers' processes, rank 1 first
        self.sequence_split = degrees_of(model.parallel).context  # ranks per sequence
        self._following: list = []
        self._leading: LeadingForward | None = None
        self._denoiser: torch.nn.Module | None = None

    @classmethod
    def launch(cls, model: ModelConfig, threads: int) -> RankGroup:
        """Start the followers of `model` in this replica's placement group (bundles
        1..N-1); each loads the model in its own process."""
        placement = ray.util.get_current_placement_group()
        followers = [
            DenoiserRank.options(**_rank_options(placement, rank)).remote(model, threads)
            for rank in range(1, model.parallel.world_size)
        ]
        return cls(model, followers)

    def join(self, denoiser: torch.nn.Module) -> None:
        """Form the group with `denoiser` as rank 0's, and lead it. Raises (and ends the
        followers) if the model cannot run at its degrees or the group cannot form."""
        config = self._model.parallel
        try:
            check_degrees(denoiser, degrees_of(config))
            loaded = [follower.pid.remote() for follower in self._followers]
            self.pids = ray.get(loaded, timeout=START_TIMEOUT_S)
            address = ray.util.get_node_ip_address()
            port = _free_port(address)
            joined = [
                follower.join.remote(config, address, port, rank)
                for rank, follower in enumerate(self._followers, start=1)
            ]
            device = rank_device(self._model)
            join_group(denoiser, device, config, address, port, rank=0)
            ray.get(joined, timeout=config.collective_timeout_s)
        except BaseException:
            self._end_followers()
            raise
        self._following = [follower.follow.remote() for follower in self._followers]
        self._leading = lead(denoiser, device, heartbeat_s=config.collective_timeout_s / 2)
        self._denoiser = denoiser
        logger.info("%s: a group of %d ranks serves", self._model.id, config.world_size)

    def check(self) -> None:
        """Raise `GroupFailed` if the group can no longer step: a collective failed, a
        follower's loop ended (its process died, or it left after a failure), or something
        replaced rank 0's leading forward (its calls would run on rank 0 alone)."""
        if self._leading is None:
            return
        if self._leading.failed is not None:
            raise GroupFailed(f"the rank group failed: {type(self._leading.failed).__name__}")
        ended, _ = ray.wait(self._following, num_returns=1, timeout=0)
        if ended:
            raise GroupFailed("a rank of the group has stopped")
        if self._denoiser.forward is not self._leading:
            raise GroupFailed("the denoiser no longer leads its group")

    def stop(self) -> None:
        if self._leading is not None:
            self._leading.stop()
        self._end_followers()

    def _end_followers(self) -> None:
        for follower in self._followers:
            ray.kill(follower)


def _rank_options(placement, rank: int) -> dict:
    """Where follower `rank` runs: its bundle of the replica's placement group, with the
    bundle's resources; outside a placement group (a test's local Ray), anywhere."""
    if placement is None:
        return {"num_cpus": 0}
    bundle = placement.bundle_specs[rank]
    resources = {name: amount for name, amount in bundle.items() if name not in ("CPU", "GPU")}
    return {
        "num_cpus": bundle.get("CPU", 0),
        "num_gpus": bundle.get("GPU", 0),
        "resources": resources,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement, placement_group_bundle_index=rank
        ),
    }


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]
