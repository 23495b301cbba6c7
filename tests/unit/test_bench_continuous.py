"""The continuous-batching benchmark's pure parts: its request mix, the config it serves,
and how it judges the targets."""

from __future__ import annotations

import random
from collections import Counter

from bench.serving.continuous import (
    CONTINUOUS,
    GUIDANCE,
    REQUEST_LEVEL,
    STEPS,
    CpuMeter,
    bench_config,
    cases,
    targets,
    workload,
)
from serve_app import parse_args
from tests.harness import REPO, load_config


def test_the_mix_draws_every_steps_guidance_and_size_a_third_with_negatives_and_adapters():
    rng = random.Random(0)
    mixed = workload(CONTINUOUS, ("64x64", "128x128"), adapters=True)
    bodies = [mixed.request(rng) for _ in range(3000)]
    assert {body["num_inference_steps"] for body in bodies} == set(STEPS)
    assert {body["guidance_scale"] for body in bodies} == set(GUIDANCE)
    assert {body["size"] for body in bodies} == {"64x64", "128x128"}
    shares = Counter(("negative_prompt" in b, "lora" in b) for b in bodies)
    assert 0.30 < sum(n for (negative, _), n in shares.items() if negative) / 3000 < 0.37
    assert 0.30 < sum(n for (_, lora), n in shares.items() if lora) / 3000 < 0.37
    assert {b["lora"][0]["name"] for b in bodies if "lora" in b} == {
        "ink", "paper", "ink-soft", "paper-soft",
    }  # fmt: skip
    assert all(body["model"] == CONTINUOUS for body in bodies)
    assert not any(
        "lora" in workload(CONTINUOUS, ("64x64",), False).request(rng) for _ in range(99)
    )


def test_the_served_config_runs_one_model_continuous_and_its_twin_request_level():
    config = bench_config(load_config(REPO / "config" / "local.yaml"), port=8124)
    args = parse_args(config["applications"][0]["args"])
    by_id = {model.id: model for model in args.models}
    assert set(by_id) == {CONTINUOUS, REQUEST_LEVEL}
    assert by_id[CONTINUOUS].batching.continuous
    assert not by_id[REQUEST_LEVEL].batching.continuous
    # The same model and batching but for the switch, each with four adapters of its own.
    assert by_id[CONTINUOUS].source == by_id[REQUEST_LEVEL].source
    continuous = by_id[CONTINUOUS].batching.model_dump(exclude={"continuous"})
    assert continuous == by_id[REQUEST_LEVEL].batching.model_dump(exclude={"continuous"})
    assert [a.id for a in by_id[REQUEST_LEVEL].adapters] == [
        "ink-r", "paper-r", "ink-soft-r", "paper-soft-r",
    ]  # fmt: skip


def test_targets_compare_the_engines_and_say_which_are_missed():
    names = [case.name for case in cases(("64x64", "128x128"))]
    rates = {CONTINUOUS: 100.0, REQUEST_LEVEL: 100.0}
    closed = {name: {m: {"step_pixels_per_s": r} for m, r in rates.items()} for name in names}
    closed[names[3]][CONTINUOUS] = {"step_pixels_per_s": 80.0}  # adapters: 80% of no adapters
    closed[names[4]][CONTINUOUS] = {"step_pixels_per_s": 120.0}  # 256x256: 1.2x
    results = {
        "closed": closed,
        "open": {"70% of capacity": {CONTINUOUS: {"p95_s": 1.0}, REQUEST_LEVEL: {"p95_s": 2.0}}},
    }
    verdicts = {
        name: check["met"] for name, check in targets(results, ("64x64", "128x128")).items()
    }
    assert list(verdicts.values()) == [False, True, True, True]


class FakeProcess:
    def __init__(self, pid: int, title: str) -> None:
        self.pid, self._title = pid, title

    def cmdline(self) -> list[str]:
        return self._title.split()


def test_the_cpu_outside_leaves_out_every_generator_replica_and_only_them():
    """Fails with the meter as it was: it counted the measured replica outside as well."""
    titles = {
        1: "ray::ServeReplica:images:ImageGenerator:tiny-sd3",
        2: "ray::ServeReplica:images:ImageGenerator:tiny-sd3-request.generate",
        3: "ray::ServeReplica:images:ImageIngress",
        4: "ray::ProxyActor",
        5: "/venv/lib/python3.11/site-packages/ray/core/src/ray/gcs/gcs_server --log_dir=/tmp",
    }
    processes = [FakeProcess(pid, title) for pid, title in titles.items()]

    class FakeServer:
        def processes(self):
            return processes

        def replica_processes(self, deployment):
            return [p for p in processes if p._title.split(".")[0].endswith(deployment)]

    meter = CpuMeter(FakeServer(), CONTINUOUS)
    assert [p.pid for p in meter._inside] == [1]
    assert [p.pid for p in meter._outside] == [3, 4, 5]
