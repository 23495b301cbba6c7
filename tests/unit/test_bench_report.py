"""The benchmark's pure helpers: py-spy's stacks sorted into categories, and the three-way
comparison summarised over alternating rounds and checked against the targets."""

from __future__ import annotations

import pytest

from bench.serving.compare import check_targets, summarize
from bench.serving.stacks import (
    INGRESS_RULES,
    OTHER,
    REPLICA_RULES,
    breakdown,
    classify,
    parse_collapsed,
    per_request_ms,
)

ENCODE = (
    "Thread.run (threading.py:982);ImagePackager.image (deployments/ingress/output.py:40);"
    "encode_image (deployments/ingress/encoding.py:30);_save (PIL/PngImagePlugin.py:1300)"
)
PIPELINE = (
    "_call (deployments/generator/engine.py:270);"
    "__call__ (diffusers/pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py:900)"
)


def test_collapsed_stacks_are_parsed_and_merged():
    lines = [f"{ENCODE} 3\n", f"{ENCODE} 2\n", "garbage\n", "", f"{PIPELINE} 7"]
    stacks = parse_collapsed(lines)
    assert stacks[tuple(ENCODE.split(";"))] == 5
    assert stacks[tuple(PIPELINE.split(";"))] == 7
    assert len(stacks) == 2


def test_a_stack_goes_to_the_first_matching_category():
    # The encode runs under a thread's run loop: the specific work wins over the plumbing.
    assert classify(tuple(ENCODE.split(";")), INGRESS_RULES) == "PNG/JPEG/WebP encode"
    assert classify(tuple(PIPELINE.split(";")), REPLICA_RULES) == "pipeline call"
    assert classify(("select (selectors.py:468)",), INGRESS_RULES) == OTHER


def test_per_request_milliseconds_and_what_py_spy_did_not_see():
    samples = breakdown(parse_collapsed([f"{ENCODE} 30", f"{PIPELINE} 10"]), INGRESS_RULES)
    # 100 Hz: 30 samples are 0.3 s over 10 requests; the OS counted 0.5 s of CPU.
    rows = per_request_ms(samples, rate_hz=100, requests=10, process_cpu_s=0.5)
    assert rows["PNG/JPEG/WebP encode"] == 30.0
    assert rows[OTHER] == 10.0  # the pipeline's frames mean nothing on the ingress
    assert rows["without the GIL (native code)"] == 10.0
    assert rows["total CPU (OS)"] == 50.0
    with pytest.raises(ValueError):
        per_request_ms(samples, rate_hz=100, requests=0, process_cpu_s=1.0)


def a_round(service: float, seed: float, bare: float, alone: float, batch1: float) -> dict:
    return {
        "service": {"images_per_s": service, "p50_s": 0.5, "errors": 0},
        "seed": {"images_per_s": seed, "p50_s": 0.9, "errors": 1},
        "bare": {"images_per_s": bare, "best_batch": 8, "batch1_s": batch1},
        "service_alone": {"images_per_s": 1 / alone, "p50_s": alone, "errors": 0},
    }


def test_rounds_summarised_by_their_median_and_range():
    rounds = [
        {"small": a_round(20, 8, 30, 0.1, 0.09)},
        {"small": a_round(26, 9, 31, 0.3, 0.08)},
        {"small": a_round(24, 7, 29, 0.2, 0.10)},
    ]
    row = summarize(rounds)["small"]
    assert row["service"] == {"median": 24, "min": 20, "max": 26}
    assert row["bare"]["median"] == 30
    assert row["alone_p50_s"] == 0.2
    assert row["bare_batch1_s"] == 0.08  # the best round
    assert row["errors"] == {"service": 0, "seed": 3}  # the seed server's, one a round


def test_targets_say_whether_met_and_by_how_much():
    summary = summarize(
        [{"small": a_round(27, 10, 30, 0.11, 0.10), "large": a_round(8, 7, 10, 0.2, 0.1)}]
    )
    by_text = {t["target"]: t for t in check_targets(summary, concurrency=8)}
    share = by_text["small, concurrency 8: service >= 85% of the bare best"]
    assert share["met"] and share["measured"].startswith("90%")
    peer = by_text["small, concurrency 8: service >= 2.5x the seed-guide server"]
    assert peer["met"] and peer["measured"].startswith("2.70x")
    large_peer = by_text["large, concurrency 8: service >= 1.3x the seed-guide server"]
    assert not large_peer["met"]
    assert large_peer["ratio"] == pytest.approx(8 / 7 / 1.3)
    alone = by_text["large: p50 at concurrency 1 <= bare batch-1 time + 15%"]
    assert not alone["met"] and alone["measured"].startswith("+100%")
    assert by_text["small: p50 at concurrency 1 <= bare batch-1 time + 15%"]["met"]
