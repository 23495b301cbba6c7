"""The layout benchmark's pure part: the models it serves, one per layout."""

from __future__ import annotations

from bench.serving.layouts import LAYOUTS, layout_models
from serve_app import parse_args
from tests.harness import REPO, load_config, with_overrides


def test_each_layout_is_the_default_model_with_its_threads_cpus_and_replicas():
    config = load_config(REPO / "config" / "local.yaml")
    models = layout_models(config["applications"][0]["args"]["models"][0])
    served = with_overrides(config, port=8123, args={"models": models})
    args = parse_args(served["applications"][0]["args"])
    assert len(args.models) == len(LAYOUTS)
    for model, (worker_threads, cpus, replicas) in zip(args.models, LAYOUTS.values(), strict=True):
        assert model.source == "embedded:tiny-sd3"
        assert model.worker_threads == worker_threads
        assert model.deployment["ray_actor_options"]["num_cpus"] == cpus
        assert model.deployment["autoscaling_config"]["min_replicas"] == replicas
        assert model.deployment["autoscaling_config"]["max_replicas"] == replicas
