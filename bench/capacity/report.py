"""The capacity results as tables (Markdown, as docs/capacity.md carries them) and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.capacity.experiment import DURATION_S
from bench.capacity.figures import COMPARED, JUDGED

LABELS = {
    "mean_replicas": "mean replicas",
    "throughput_rps": "throughput (req/s)",
    "p50_s": "p50 (s)",
    "p95_s": "p95 (s)",
}


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _error(value: float | None) -> str:
    if value is None:
        return "-"
    mark = "" if abs(value) <= 0.2 else " (!)"
    return f"{value * 100:+.0f}%{mark}"


def validation_table(data: dict[str, Any]) -> str:
    """Real against simulated, side by side, each the median of the case's runs; (!) marks
    an error beyond 20%. Then each real run's figure, and the error of its own simulation
    (at its probed speed) against it: the cluster's own run-to-run spread."""
    lines = [
        "| trace | policy | figure | real (median) | simulated (median) | error "
        "| real, each run | each run's simulation against it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in data["cases"]:
        runs = [run["summary"] for run in case["real_runs"]]
        sims = [run["sim"] for run in case["real_runs"]]
        pairs = list(zip(runs, sims, strict=True))
        for key in COMPARED:
            sim = case["sim"][key]
            errors = [
                (paired[key] - real[key]) / real[key]
                for real, paired in pairs
                if real[key] and paired[key] is not None
            ]
            extent = f"{min(errors) * 100:+.0f}% .. {max(errors) * 100:+.0f}%" if errors else "-"
            lines.append(
                f"| {case['case']} | {case['policy']} | {LABELS[key]} | "
                f"{_number(case['real'][key])} | {_number(sim)} | "
                f"{_error(case['error'][key])} | "
                f"{', '.join(_number(run[key]) for run in runs) or '-'} | {extent} |"
            )
        real, sim = case["real"], case["sim"]
        lines.append(
            f"| {case['case']} | {case['policy']} | first scale-up (s) | "
            f"{_number(real['first_scale_up_s'])} | {_number(sim['first_scale_up_s'])} | | "
            f"{', '.join(_number(run['first_scale_up_s']) for run in runs)} | |"
        )
        lines.append(
            f"| {case['case']} | {case['policy']} | answered / refused (all runs) | "
            f"{sum(run['ok'] for run in runs)} / {sum(run['rejected'] for run in runs)} | "
            f"{sum(run['ok'] for run in sims)} / {sum(run['rejected'] for run in sims)} | | | |"
        )
    return "\n".join(lines)


JUDGED_LABELS = {**LABELS, "first_scale_up_s": "first scale-up (s)"}


def runs_table(validations: list[dict[str, Any]]) -> str:
    """Every run of every stored validation, by the speed its cluster ran at: each judged
    figure real / simulated (error), (!) beyond 20%, and how many of them are within 20%.
    Throughput is left out: an open-loop trace that refuses nothing answers its arrival
    rate whatever the model."""
    head = " | ".join(JUDGED_LABELS[key] for key in JUDGED)
    lines = [
        f"| speed | pace, length | trace | run | {head} | within 20% |",
        "|---|---|---|---|" + "---|" * len(JUDGED) + "---|",
    ]
    ordered = sorted(validations, key=lambda data: -float(data.get("throttle") or 1.0))
    for data in ordered:
        speed = float(data.get("throttle") or 1.0)
        for case in data["cases"]:
            for number, run in enumerate(case["real_runs"], start=1):
                real, sim = run["summary"], run["sim"]
                cells, good = [], 0
                for key in JUDGED:
                    error = None
                    if real[key] and sim[key] is not None:
                        error = (sim[key] - real[key]) / real[key]
                    good += error is not None and abs(error) <= 0.2
                    cells.append(f"{_number(real[key])} / {_number(sim[key])} ({_error(error)})")
                pace = run.get("pace", data.get("pace", 1.0))
                stretch = run.get("stretch", data.get("stretch", 1.0))
                lines.append(
                    f"| x{speed:g} | x{pace}, {stretch:g} x {DURATION_S:g} s | {case['case']} | "
                    f"{number} | "
                    f"{' | '.join(cells)} | {good} of {len(JUDGED)} |"
                )
    return "\n".join(lines)


def call_speed_table(data: dict[str, Any]) -> str:
    """`validate.call_speed` of each run: the trace's calls over its probe's, on the
    cluster (from the ingress's logs) and in the run's simulation."""
    lines = ["| trace | real, each run | simulated, each run |", "|---|---|---|"]
    for case in data["cases"]:
        speeds = [run.get("call_speed") for run in case["real_runs"]]
        if not all(speeds):
            continue
        real = ", ".join(f"{speed['real']:.2f}" for speed in speeds)
        sim = ", ".join(f"{speed['sim']:.2f}" for speed in speeds)
        lines.append(f"| {case['case']} | {real} | {sim} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def speed_fit_table(fits: list[dict[str, Any]]) -> str:
    """The diagnostic of `validate.speed_fit`: errors with one fitted speed factor a case."""
    lines = [
        "| trace | fitted slowdown | mean replicas | throughput | p50 | p95 |",
        "|---|---|---|---|---|---|",
    ]
    for fit in fits:
        errors = " | ".join(_error(fit["error"][key]) for key in COMPARED)
        lines.append(f"| {fit['case']} | x{fit['speed_factor']:.2f} | {errors} |")
    return "\n".join(lines)


def extrapolation_table(data: dict[str, Any]) -> str:
    lines = [
        "| requests/s | recommended target_ongoing_requests | min / max replicas | "
        "mean replicas (peak) | $/hour | $/1000 images | p50 (s) | p95 (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plan in data["plans"]:
        row = plan["recommended"]
        if row is None:
            lines.append(f"| {plan['rate_rps']:g} | none meets the objective | | | | | | |")
            continue
        lines.append(
            f"| {row['rate_rps']:g} | {row['target_ongoing_requests']:g} | "
            f"{row['min_replicas']} / {row['max_replicas']} | "
            f"{row['mean_replicas']:.0f} ({row['peak_replicas']}) | "
            f"{row['dollars_per_hour']:,.0f} | {row['dollars_per_1000_images']:.2f} | "
            f"{row['p50_s']:.2f} | {row['p95_s']:.2f} |"
        )
    return "\n".join(lines)


def candidates_table(data: dict[str, Any]) -> str:
    """Every target tried at every rate: what the recommendation was chosen from."""
    lines = [
        "| requests/s | target_ongoing_requests | min / max | mean replicas (peak) | "
        "$/hour | p95 (s) | refused | meets p95 <= objective |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for plan in data["plans"]:
        for row in plan["candidates"]:
            lines.append(
                f"| {row['rate_rps']:g} | {row['target_ongoing_requests']:g} | "
                f"{row['min_replicas']} / {row['max_replicas']} | "
                f"{row['mean_replicas']:.0f} ({row['peak_replicas']}) | "
                f"{row['dollars_per_hour']:,.0f} | {_number(row['p95_s'])} | "
                f"{row['rejected']} | {'yes' if row['meets_objective'] else 'no'} |"
            )
    return "\n".join(lines)


def chart(data: dict[str, Any], path: Path) -> None:
    """Each case's running replicas over time, every real run and a simulated one, with its
    median figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    figure, axes = plt.subplots(len(cases), 2, figsize=(12, 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        timeline, bars = row
        for number, run in enumerate(case["real_runs"]):
            points = run["timeline"]
            timeline.step(
                [p[0] for p in points],
                [p[1] + 0.03 * number for p in points],  # apart, so that each shows
                "-",
                where="post",
                alpha=0.7,
                label=f"real, run {number + 1}",
            )
        points = case["sim_timeline"]
        timeline.step(
            [p[0] for p in points], [p[1] for p in points], "k--", where="post", label="simulated"
        )
        timeline.set_title(f"{case['case']} ({case['policy']} policy): running replicas")
        timeline.set_xlabel("s")
        timeline.set_ylim(0, max(3, case["real"]["max_replicas"] + 1))
        timeline.legend(loc="upper left")
        keys = list(COMPARED)
        xs = range(len(keys))
        real = [case["real"][k] or 0 for k in keys]
        sim = [case["sim"][k] or 0 for k in keys]
        bars.bar([x - 0.2 for x in xs], real, 0.4, label="real (median)")
        bars.bar([x + 0.2 for x in xs], sim, 0.4, label="simulated (median)")
        bars.set_xticks(list(xs), [LABELS[k] for k in keys])
        bars.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
