"""The adapter benchmark's pure parts: its requests and the config it serves."""

from __future__ import annotations

import random

from bench.serving.adapters import ADAPTERS, AdapterWorkload, adapter_config
from serve_app import parse_args
from tests.harness import REPO, load_config


def test_requests_name_one_of_the_adapters_or_none():
    rng = random.Random(0)
    spread = AdapterWorkload("a", "64x64", 4, adapters=("ink", "paper"))
    assert {spread.request(rng)["model"] for _ in range(50)} == {"ink", "paper"}
    assert "model" not in AdapterWorkload("b", "64x64", 4).request(rng)


def test_the_served_config_gives_the_default_model_four_adapters_it_holds_at_once():
    config = adapter_config(load_config(REPO / "config" / "local.yaml"), port=8123)
    args = parse_args(config["applications"][0]["args"])
    model = args.models[0]
    assert [adapter.id for adapter in model.adapters] == [a["id"] for a in ADAPTERS]
    assert model.max_adapters_per_replica == 4
    assert config["http_options"]["port"] == 8123
