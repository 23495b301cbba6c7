"""The priorities benchmark's pure parts: the config it serves, how it counts each answer,
its per-class percentiles, its arrivals, the table and the target."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

from bench.serving.priorities import (
    KEYS,
    MAX_ONGOING,
    MAX_QUEUED,
    MODEL,
    PREEMPTING,
    REQUEST_TIMEOUT_S,
    ClassTally,
    Stream,
    arrivals,
    bench_config,
    markdown,
    outcome,
    percentile,
    targets,
    workload,
)
from serve_app import parse_args
from tests.harness import REPO, load_config


def _config(keys_file: Path) -> dict:
    return bench_config(load_config(REPO / "config" / "local.yaml"), port=8125, keys_file=keys_file)


def test_the_served_config_gives_each_key_its_class_and_queues_in_the_replica(tmp_path):
    keys_file = tmp_path / "keys"
    config = _config(keys_file)
    assert config["http_options"]["port"] == 8125
    args = parse_args(config["applications"][0]["args"])
    # The one model, twice (tiny-flux dropped): as configured, and preempting lower classes.
    assert [model.id for model in args.models] == [MODEL, PREEMPTING]
    assert args.models[0].batching is None and args.batching.continuous  # the loop, as local
    preempting = args.models[1].batching
    assert preempting.continuous and preempting.preempt_lower_classes
    assert not args.batching.preempt_lower_classes
    assert args.auth.api_keys_file == str(keys_file)
    assert args.request_timeout_s == REQUEST_TIMEOUT_S
    classes = {key.key_sha256: key.priority for key in args.scheduling.keys}
    assert classes == {
        hashlib.sha256(KEYS["high"].encode()).hexdigest(): "high",
        hashlib.sha256(KEYS["low"].encode()).hexdigest(): "low",
    }
    assert "low" in args.scheduling.header_classes  # the classes-off phase steps down
    # Requests wait in the replica, which orders them, not in Serve's FIFO router.
    assert args.models[0].deployment["max_ongoing_requests"] == MAX_ONGOING >= 512
    assert args.models[0].deployment["max_queued_requests"] == MAX_QUEUED
    ingress = config["applications"][0]["deployments"][0]
    assert ingress["name"] == "ImageIngress" and ingress["max_ongoing_requests"] >= MAX_ONGOING


def test_the_mix_is_64x64_with_every_steps_count():
    rng = random.Random(0)
    bodies = [workload().request(rng) for _ in range(500)]
    assert {body["size"] for body in bodies} == {"64x64"}
    assert {body["num_inference_steps"] for body in bodies} == {4, 8, 12, 20}
    assert all(body["model"] == MODEL and "lora" not in body for body in bodies)


def test_a_stream_sends_its_key_and_its_headers():
    stream = Stream("high", "sk-x", 1.0, (("x-priority", "low"),))
    assert stream.request_headers() == {"authorization": "Bearer sk-x", "x-priority": "low"}


def test_answers_count_as_ok_deadline_refusals_timeouts_or_other():
    refused = {"error": {"code": "deadline_unreachable", "type": "server_error"}}
    assert outcome(200, {"data": []}) == "ok"
    assert outcome(503, refused) == "deadline_unreachable"
    assert outcome(504, None) == "timeout"
    assert outcome(503, {"error": {"code": "service_unavailable"}}) == "other"
    assert outcome(503, None) == "other"
    assert outcome(429, refused) == "other"
    assert outcome(None, None) == "other"


def test_percentiles_per_class_are_nearest_rank_and_none_when_empty():
    values = [float(n) for n in range(1, 101)]
    random.Random(1).shuffle(values)
    assert percentile(values, 50) == 51.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile([], 95) is None
    tally = ClassTally()
    for seconds in values:
        tally.record("ok", seconds, "200")
    tally.record("deadline_unreachable", 0.02, "503")
    tally.record("other", 0.1, "ReadTimeout")
    summary = tally.summary(elapsed_s=10.0)
    assert summary["sent"] == 102 and summary["ok"] == 100 and summary["timeout"] == 0
    assert summary["deadline_unreachable"] == 1 and summary["other"] == 1
    assert summary["other_details"] == {"ReadTimeout": 1}
    assert (summary["p50_s"], summary["p95_s"], summary["p99_s"]) == (51.0, 95.0, 99.0)
    assert summary["ok_per_s"] == 10.0 and summary["refusal_p50_s"] == 0.02
    empty = ClassTally().summary(10.0)
    assert empty["p95_s"] is None and empty["sent"] == 0


def test_arrivals_are_seeded_poisson_within_the_duration():
    times = arrivals(10.0, 100.0, random.Random(3))
    assert times == arrivals(10.0, 100.0, random.Random(3))
    assert times == sorted(times) and times[0] > 0 and times[-1] < 100.0
    assert 900 < len(times) < 1100
    assert arrivals(0.0, 100.0, random.Random(3)) == []


def _row(p95: float | None, **counts: int) -> dict:
    row = {"sent": 10, "ok": 10, "deadline_unreachable": 0, "timeout": 0, "other": 0}
    row |= counts
    return {**row, "ok_per_s": 1.0, "p50_s": p95, "p95_s": p95, "p99_s": p95, "rate_per_s": 1.0}


def _results(overload_p95: float, off_p95: float) -> dict:
    def phase(classes: dict) -> dict:
        return {"classes": classes, "cpu_inside_s": 1.0, "cpu_outside_s": 2.0}

    capacity = _row(0.5)
    del capacity["rate_per_s"]
    phases = {
        "capacity": phase({"high": capacity}),
        "unloaded": phase({"high": _row(1.0)}),
        "overload": phase({"high": _row(overload_p95), "low": _row(9.0, deadline_unreachable=7)}),
        "overload, preempting": phase({"high": _row(1.0), "low": _row(9.0)}),
        "overload, classes off": phase({"high": _row(off_p95), "low": _row(None, ok=0)}),
    }
    return {"capacity_rps": 5.0, "phases": phases, "targets": targets(phases)}


def test_the_target_is_the_high_class_p95_under_overload_over_unloaded():
    checks = _results(1.1, 4.0)["targets"]
    assert checks["high p95, overload / unloaded"] == {"measured": 1.1, "target": 1.2, "met": True}
    off = checks["high p95, overload, classes off / unloaded"]
    assert off["measured"] == 4.0 and off["target"] is None
    assert _results(1.5, 4.0)["targets"]["high p95, overload / unloaded"]["met"] is False
    preempting = checks["high p95, overload, preempting / unloaded"]
    assert preempting == {"measured": 1.0, "target": 1.2, "met": True}


def test_the_table_has_a_row_per_phase_and_class_and_says_cpu_only():
    table = markdown(_results(1.5, 4.0))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 8  # the header, then capacity, unloaded, 3 x 2 overloads
    assert "| overload | low | 1.00 | 10 | 10 | 7 | 0 | 0 | 1.00 | 9.000 |" in table
    assert "| overload, classes off | low |" in table and "| - | - | - |" in table
    assert "| capacity | high | closed |" in table
    assert "CPU-only" in table and "MISSED" in table and "1.50x" in table
