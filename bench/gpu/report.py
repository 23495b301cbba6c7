"""The GPU benchmark's output: the plan before it runs, a row per point, and the tables at the
end. (The JSON file is rewritten after every lever with `bench.harness.results.write_json`,
so a run cut short keeps what it measured.)"""

from __future__ import annotations

from typing import Any

from bench.gpu.flops import fraction_of_peak
from bench.gpu.plan import Budget, Lever, Profile, points
from bench.harness.load import LoadResult

GIB = 2**30
RAY_START_S = 10.0


def plan_lines(
    profile: Profile, chosen: list[Lever], skipped: list[tuple[str, str]], budget: Budget
) -> list[str]:
    """The time plan: each lever's cost (a start and its points) against the budget, from
    guessed seconds per image; what does not fit is dropped at run time."""
    guesses = ", ".join(f"{size} {s:.1f} s" for size, s in profile.guess_s_per_image.items())
    lines = [
        f"Time plan ({profile.name}, budget {profile.budget_s:.0f} s after imports; planning "
        f"guesses, not results: {guesses} per image alone)",
        "  (outside it: ~15 s of imports before, ~10 s of shutting Ray down after)",
        f"  build and save the model (skipped when cached)  ~{profile.build_s:.0f} s",
        f"  start Ray and Serve  ~{RAY_START_S:.0f} s",
    ]
    total = profile.build_s + RAY_START_S
    for lever in chosen:
        cost = budget.lever_s(lever)
        total += cost
        fits = "" if total <= profile.budget_s else "  <- over budget: cut unless time allows"
        lines.append(f"  {lever.name:<20} ~{cost:4.0f} s (cumulative {total:4.0f}){fits}")
        shown = ", ".join(f"{p.size} c{p.concurrency}x{p.rounds}" for p in points(profile, lever))
        lines.append(f"  {'':<20} points (size, clients x requests each): {shown}")
    lines += [f"  skipped {name}: {reason}" for name, reason in skipped]
    return lines


def point_row(
    result: LoadResult,
    size: str,
    rounds: int,
    flops_per_image: int,
    peak_tflops: float | None,
    peak_bytes: int | None,
) -> dict[str, Any]:
    row = {"size": size, "rounds": rounds, **result.summary()}
    row["tflop_per_s"] = result.images_per_s * flops_per_image / 1e12
    row["fraction_of_peak"] = (
        round(fraction_of_peak(result.images_per_s, flops_per_image, peak_tflops), 4)
        if peak_tflops
        else None
    )
    row["peak_gpu_gib"] = round(peak_bytes / GIB, 2) if peak_bytes is not None else None
    return row


def row_line(lever: str, row: dict[str, Any]) -> str:
    share = f"{row['fraction_of_peak']:.1%}" if row["fraction_of_peak"] is not None else "n/a"
    memory = f"{row['peak_gpu_gib']:.2f}" if row["peak_gpu_gib"] is not None else "n/a"
    errors = sum(n for status, n in row["statuses"].items() if status != "200")
    return (
        f"| {lever} | {row['size']} | {row['concurrency']} | {row['requests']} | "
        f"{row['images_per_s']:.3f} | {row['p50_s']:.3f} | {row['p95_s']:.3f} | "
        f"{row['tflop_per_s']:.3g} | {share} | {memory} | {errors} |"
    )


TABLE_HEAD = [
    "| lever | size | clients | requests | images/s | p50 s | p95 s | TFLOP/s | of peak "
    "| peak GPU GiB | errors |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The tables: every measured point, then seconds per large image alone by lever."""
    lines = ["", "Served over HTTP (closed loop; p50/p95: seconds per request):", *TABLE_HEAD]
    for record in results["levers"]:
        lines += [row_line(record["lever"], row) for row in record.get("points", [])]
    large, eager = results["large"], _alone(results, "eager")
    on_gpu = results["profile"]["device"] == "cuda"
    floor_s = results["floor_s_per_image"] if on_gpu else None
    against = (
        f"against the FLOP floor ({floor_s:.3f} s at {results['peak_tflops']:.0f} TFLOP/s)"
        if floor_s
        else "(no GPU, so no FLOP floor)"
    )
    lines += ["", f"Seconds per {large} image, alone (p50), {against}:"]
    for record in results["levers"]:
        alone = _alone(results, record["lever"])
        if alone is None:
            lines.append(f"  {record['lever']:<20} {record['status']}: {record.get('reason', '')}")
            continue
        shares = [f"{floor_s / alone:.1%} of the floor"] if floor_s else []
        if eager and record["lever"] != "eager":
            shares.append(f"{eager / alone:.2f}x eager")
        if record.get("ranks", 1) > 1:  # a parallel replica: eager is its group of one
            shares.append(f"{record['ranks']} {'GPUs' if on_gpu else 'CPU ranks'}")
        shares += [record["note"]] if record.get("note") else []
        shown = f" ({', '.join(shares)})" if shares else ""
        lines.append(
            f"  {record['lever']:<20} {alone:.3f} s{shown}; peak GPU memory {_peak(record)}; "
            f"replica ready after {record['start_s']:.0f} s"
        )
    for record in results["levers"]:
        for skipped in record.get("skipped_points", []):
            lines.append(f"  skipped point, {record['lever']}: {skipped}")
    lines += [f"  skipped lever {name}: {reason}" for name, reason in results["skipped_levers"]]
    return lines


def _alone(results: dict[str, Any], lever: str) -> float | None:
    for record in results["levers"]:
        if record["lever"] != lever:
            continue
        for row in record.get("points", []):
            if row["size"] == results["large"] and row["concurrency"] == 1 and row["requests"]:
                return row["p50_s"]
    return None


def _peak(record: dict[str, Any]) -> str:
    peaks = [row["peak_gpu_gib"] for row in record.get("points", [])]
    peaks.append(record.get("peak_gpu_gib_at_start"))
    known = [peak for peak in peaks if peak is not None]
    return f"{max(known):.2f} GiB" if known else "n/a (not CUDA)"
