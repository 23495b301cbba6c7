"""One lever of the GPU benchmark: deploy the application with it, measure its points within
the time left, read the replica's peak GPU memory (rank 0's, for a parallel replica: the
rank that also holds the text encoders and the VAE), and take the application down."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.gpu.plan import Budget, Lever, Point, points
from bench.gpu.report import GIB, point_row, row_line
from bench.gpu.serve import LeverFailed, Stack, app_args
from bench.harness.load import Workload, closed_loop, warm_up


def run_lever(
    stack: Stack,
    lever: Lever,
    source: Path,
    budget: Budget,
    results: dict[str, Any],
    peak_tflops: float | None,
) -> dict[str, Any]:
    """The lever's record: `status` measured, skipped or failed, with its rows."""
    record: dict[str, Any] = {
        "lever": lever.name,
        "optimizations": lever.optimizations,
        "batching": lever.batching,
        "parallel": lever.parallel,
        "ranks": lever.ranks,
        "note": lever.note,
        "points": [],
        "skipped_points": [],
    }
    need, left = budget.lever_s(lever), budget.left()
    if need > left:
        reason = f"needs ~{need:.0f} s, {max(0.0, left):.0f} s left"
        print(f"[{lever.name}] skipped: {reason}", flush=True)
        return {**record, "status": "skipped", "reason": reason}
    note = f" ({lever.note})" if lever.note else ""
    parallel = f", parallel {lever.parallel}" if lever.parallel else ""
    print(
        f"[{lever.name}] deploying with optimizations {lever.optimizations}, batching "
        f"{lever.batching}{parallel}{note}",
        flush=True,
    )
    start_estimate = budget.profile.start_s + lever.extra_start_s
    try:
        args = app_args(budget.profile, source, lever.optimizations, lever.batching, lever.parallel)
        record["start_s"] = stack.deploy(args, timeout_s=min(left, 3 * start_estimate))
        at_start = stack.counters()["cuda_peak_allocated_bytes"]
        record["peak_gpu_gib_at_start"] = round(at_start / GIB, 2) if at_start else None
        print(f"[{lever.name}] running after {record['start_s']:.0f} s", flush=True)
        budget.observe_start(lever, record["start_s"])
        measure(stack, lever, budget, record, results["flops_per_image"], peak_tflops)
        record["status"] = "measured"
    except (LeverFailed, RuntimeError, TimeoutError) as error:
        record.update(status="failed", reason=f"{type(error).__name__}: {error}"[-2000:])
        print(f"[{lever.name}] failed: {record['reason']}", flush=True)
    finally:
        stack.undeploy()
    return record


def measure(
    stack: Stack,
    lever: Lever,
    budget: Budget,
    record: dict[str, Any],
    flops: dict[str, int],
    peak_tflops: float | None,
) -> None:
    """Each of the lever's points that still fits in the time left."""
    warmed: set[str] = set()
    for point in points(budget.profile, lever):
        cold = point.size not in warmed
        cost = budget.point_s(point, warm_up=cold)
        room = budget.left()
        label = f"{point.size} c{point.concurrency}x{point.rounds}"
        if cost > room:
            record["skipped_points"].append(f"{label}: needs ~{cost:.0f} s, {room:.0f} s to spare")
            print(f"[{lever.name}] skipped {label}: needs ~{cost:.0f} s", flush=True)
            continue
        workload = Workload(point.size, size=point.size, steps=budget.profile.steps)
        if cold:
            warm_up(stack.base_url, workload, timeout_s=budget.left())
            warmed.add(point.size)
        row = measure_point(stack, workload, point, budget, flops[point.size], peak_tflops)
        record["points"].append(row)
        print(row_line(lever.name, row), flush=True)


def measure_point(
    stack: Stack,
    workload: Workload,
    point: Point,
    budget: Budget,
    flops_per_image: int,
    peak_tflops: float | None,
) -> dict[str, Any]:
    stack.reset_peak_memory()
    # A fixed count of requests per client, no warm-up requests (each size was warmed up
    # above), the whole bounded by the time left.
    result = closed_loop(
        stack.base_url,
        workload,
        point.concurrency,
        rounds=point.rounds,
        warmup_requests=0,
        request_timeout_s=900,
        timeout_s=budget.left(),
    )
    peak_bytes = stack.counters()["cuda_peak_allocated_bytes"]
    if point.concurrency == 1 and result.latencies_s:
        budget.observe(point.size, result.percentile(50))
    return point_row(result, point.size, point.rounds, flops_per_image, peak_tflops, peak_bytes)
