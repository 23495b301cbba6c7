"""One replica over several devices (`args.models[].parallel`): context parallelism (Ulysses
or ring) and CFG-parallel, each replica a group of ranks in its own Ray placement group.

Read by the builder (the deployment's placement group, `placement_group_bundles`) and by the
generator (`deployments/generator/parallel/`, which starts the ranks and splits the work).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from deployments.config.base import Strict


class ParallelConfig(Strict):
    """How many ranks one replica runs on, and how they divide each denoising step. The
    ranks are `ulysses_degree` x `ring_degree` x (2 with `cfg_parallel`); each holds the
    whole denoiser on its own device (one GPU each, or CPU cores), rank 0 in the replica."""

    ulysses_degree: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks that split the sequence with Ulysses attention (an all-to-all "
        "over attention heads): must divide the model's attention heads.",
    )
    ring_degree: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Ranks that split the sequence with ring attention (keys and values "
        "passed round the ranks). Not together with `ulysses_degree` > 1.",
    )
    cfg_parallel: bool = Field(
        default=False,
        description="Run the two halves of each guided batch (unconditional and conditional "
        "rows) on two groups of ranks. Any even batch is split; an odd one runs whole.",
    )
    collective_timeout_s: float = Field(
        default=120.0,
        gt=0,
        le=3600,
        description="Longest wait for a collective between the ranks: past it the group is "
        "failed, its requests answer 503 and Serve replaces the replica. Longer than the "
        "slowest step at the largest size.",
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK",
        description="Ray's placement strategy for a replica's ranks: STRICT_PACK keeps them "
        "on one node (GPUs linked by NVLink); PACK lets them spill to others.",
    )

    @property
    def world_size(self) -> int:
        """Ranks per replica."""
        return self.ulysses_degree * self.ring_degree * (2 if self.cfg_parallel else 1)

    @model_validator(mode="after")
    def _one_kind_of_sequence_split(self) -> ParallelConfig:
        if self.ulysses_degree > 1 and self.ring_degree > 1:
            # Each alone splits a sequence its degree does not divide (SD3's prompt is
            # 77 + 256 tokens); together, diffusers 0.42 needs both to divide it.
            raise ValueError(
                "ring_degree: set ulysses_degree or ring_degree above 1, not both (each "
                "alone splits sequences of any length)"
            )
        if self.world_size == 1:
            raise ValueError(
                "ulysses_degree: a parallel replica needs ulysses_degree or ring_degree "
                "above 1, or cfg_parallel"
            )
        return self

    def placement(self, replica_resources: dict[str, Any]) -> dict[str, Any]:
        """The Serve options that reserve a replica's ranks: one bundle per rank, each with
        the replica's own resources (`ray_actor_options`), rank 0 (the replica) in the
        first."""
        bundle = rank_bundle(replica_resources)
        return {
            "placement_group_bundles": [dict(bundle) for _ in range(self.world_size)],
            "placement_group_strategy": self.placement_strategy,
        }


def rank_bundle(replica_resources: dict[str, Any]) -> dict[str, float]:
    """One rank's bundle: the replica's `ray_actor_options` as a placement group's resources
    (what Ray would reserve for the replica alone)."""
    bundle = {"CPU": float(replica_resources.get("num_cpus", 1))}
    for option, resource in (("num_gpus", "GPU"), ("memory", "memory")):
        if replica_resources.get(option):
            bundle[resource] = float(replica_resources[option])
    for name, amount in (replica_resources.get("resources") or {}).items():
        bundle[name] = float(amount)
    if replica_resources.get("accelerator_type"):
        # How Ray itself asks for an accelerator type: a sliver of its node resource.
        bundle[f"accelerator_type:{replica_resources['accelerator_type']}"] = 0.001
    return {name: amount for name, amount in bundle.items() if amount > 0}
