"""`models[].parallel` as the config reads it: which degrees it takes, what it refuses (with
the key named), and the placement group each replica of it gets from the builder."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray.serve.schema import DeploymentSchema

from deployments.config.model_config import ModelConfig
from deployments.config.parallel_config import ParallelConfig
from serve_app import InvalidArgs, parse_args


def test_ranks_are_the_product_of_the_degrees_doubled_by_cfg_parallel():
    assert ParallelConfig(ulysses_degree=4).world_size == 4
    assert ParallelConfig(ring_degree=2, cfg_parallel=True).world_size == 4
    assert ParallelConfig(cfg_parallel=True).world_size == 2


@pytest.mark.parametrize(
    ("parallel", "key"),
    [
        ({"ulysses_degree": 2, "ring_degree": 2}, "ring_degree"),
        ({}, "ulysses_degree"),
        ({"ulysses_degree": 0}, "ulysses_degree"),
        ({"ring_degree": 2, "placement_strategy": "ANYWHERE"}, "placement_strategy"),
        ({"ring_degree": 2, "collective_timeout_s": 0}, "collective_timeout_s"),
        ({"ring_degree": 2, "tensor_degree": 2}, "tensor_degree"),
    ],
)
def test_a_parallel_block_it_cannot_run_is_refused_naming_the_key(parallel, key):
    with pytest.raises(InvalidArgs, match=rf"parallel\.{key}|parallel: Value error, {key}"):
        parse_args({"models": [{"id": "m", "parallel": parallel}]})


@pytest.mark.parametrize(
    ("other", "named"),
    [
        ({"adapters": [{"id": "ink", "source": "embedded:tiny-sd3/ink"}]}, "adapters"),
        ({"optimizations": {"cache": {"kind": "first_block"}}}, "optimizations.cache"),
        ({"optimizations": {"compile": {}}}, "optimizations.compile"),
        ({"deployment": {"ray_actor_options": {"num_gpus": 0.5}}}, "whole GPUs"),
        ({"deployment": {"ray_actor_options": {"num_cpus": 0}}}, "num_cpus or num_gpus"),
        ({"deployment": {"placement_group_bundles": [{"CPU": 1}]}}, "1 bundles for 2 ranks"),
    ],
)
def test_what_each_rank_would_not_see_is_refused_with_parallel(other, named):
    with pytest.raises(ValidationError, match=named):
        ModelConfig(id="m", parallel={"ulysses_degree": 2}, **other)


def test_each_replica_reserves_one_bundle_per_rank_with_the_replicas_resources():
    model = ModelConfig(
        id="m",
        parallel={"ring_degree": 2, "cfg_parallel": True},
        deployment={
            "ray_actor_options": {
                "num_cpus": 4,
                "num_gpus": 1,
                "memory": 2**30,
                "resources": {"h100": 1},
                "accelerator_type": "H100",
            },
        },
    )
    options = model.deployment_options()
    bundle = {
        "CPU": 4.0,
        "GPU": 1.0,
        "memory": float(2**30),
        "h100": 1.0,
        "accelerator_type:H100": 0.001,
    }
    assert options["placement_group_bundles"] == [bundle] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    # Ray's own schema takes it (the replica's resources fit the first bundle).
    DeploymentSchema.model_validate({"name": "generator", **options})


def test_a_placement_group_of_the_configs_own_is_kept():
    bundles = [{"CPU": 2}, {"CPU": 1}]  # rank 0 does more than the others
    model = ModelConfig(
        id="m",
        parallel={"ulysses_degree": 2},
        deployment={"placement_group_bundles": bundles},
    )
    assert model.deployment_options()["placement_group_bundles"] == bundles


def test_a_single_device_model_reserves_no_placement_group():
    assert "placement_group_bundles" not in ModelConfig(id="m").deployment_options()
