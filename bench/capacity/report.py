"""The capacity results as tables (Markdown, as docs/capacity.md carries them) and a chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.capacity.validate import COMPARED

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


def earlier_real(case: dict[str, Any], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The real figures of `case`'s trace in `earlier` validations: the same case, the same
    trace and as many requests (the cluster's run-to-run spread; the simulation's there
    differs with their calibrations, and is not shown)."""
    found = []
    for data in earlier:
        for row in data["cases"]:
            same = (row["case"], row["trace"]) == (case["case"], case["trace"])
            if same and row["real"]["requests"] == case["real"]["requests"]:
                found.append(row["real"])
    return found


def validation_table(data: dict[str, Any], earlier: list[dict[str, Any]] = ()) -> str:
    """Real against simulated, side by side; (!) marks an error beyond 20%. With `earlier`
    validations, the real figure in those of the same trace too, and the simulation's
    error against each real run (this simulation against their real figures)."""
    spread = bool(earlier)
    head = "| trace | policy | figure | real | simulated | error |"
    rule = "|---|---|---|---|---|---|"
    if spread:
        head += " real, earlier runs | error against each real run |"
        rule += "---|---|"
    lines = [head, rule]
    for case in data["cases"]:
        before = earlier_real(case, list(earlier)) if spread else []
        for key in COMPARED:
            line = (
                f"| {case['case']} | {case['policy']} | {LABELS[key]} | "
                f"{_number(case['real'][key])} | {_number(case['sim'][key])} | "
                f"{_error(case['error'][key])} |"
            )
            if spread:
                sim = case["sim"][key]
                reals = [run[key] for run in before] + [case["real"][key]]
                errors = [(sim - r) / r for r in reals if r and sim is not None]
                extent = (
                    f"{min(errors) * 100:+.0f}% .. {max(errors) * 100:+.0f}%" if errors else "-"
                )
                line += f" {', '.join(_number(run[key]) for run in before) or '-'} | {extent} |"
            lines.append(line)
        real, sim = case["real"], case["sim"]
        blank = " | |" if spread else ""
        lines.append(
            f"| {case['case']} | {case['policy']} | first scale-up (s) | "
            f"{_number(real['first_scale_up_s'])} | {_number(sim['first_scale_up_s'])} | |" + blank
        )
        lines.append(
            f"| {case['case']} | {case['policy']} | answered / refused | "
            f"{real['ok']} / {real['rejected']} | {sim['ok']} / {sim['rejected']} | |" + blank
        )
    return "\n".join(lines)


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
    """Each case's running replicas over time, real and simulated, with its figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    figure, axes = plt.subplots(len(cases), 2, figsize=(12, 2.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases, strict=True):
        timeline, bars = row
        for name, key, style in (
            ("real", "real_timeline", "-"),
            ("simulated", "sim_timeline", "--"),
        ):
            points = case[key]
            timeline.step(
                [p[0] for p in points], [p[1] for p in points], style, where="post", label=name
            )
        timeline.set_title(f"{case['case']} ({case['policy']} policy): running replicas")
        timeline.set_xlabel("s")
        timeline.set_ylim(0, max(3, case["real"]["max_replicas"] + 1))
        timeline.legend(loc="upper left")
        keys = list(COMPARED)
        xs = range(len(keys))
        real = [case["real"][k] or 0 for k in keys]
        sim = [case["sim"][k] or 0 for k in keys]
        bars.bar([x - 0.2 for x in xs], real, 0.4, label="real")
        bars.bar([x + 0.2 for x in xs], sim, 0.4, label="simulated")
        bars.set_xticks(list(xs), [LABELS[k] for k in keys])
        bars.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
