"""The benchmark's outputs: the targets checked, JSON, a PNG chart, and the README's table."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

README_START = "<!-- bench:results:start -->"
README_END = "<!-- bench:results:end -->"


def machine() -> dict[str, Any]:
    import psutil
    import ray
    import torch

    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        if match:
            cpu = match.group(1).strip()
    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name(0)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "device": device,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
    }


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with its measured value and whether it is met."""
    targets = []
    served = results["served"]
    top = max(results["concurrencies"])
    low = min(results["concurrencies"])

    def at(mode: str, workload: str, concurrency: int) -> dict[str, Any]:
        return next(row for row in served[mode][workload] if row["concurrency"] == concurrency)

    for workload, floor in (("small", 2.0), ("large", 1.0)):
        batched = at("batched", workload, top)["images_per_s"]
        unbatched = at("unbatched", workload, top)["images_per_s"]
        targets.append(
            {
                "target": f"{workload} images, concurrency {top}: batched >= {floor}x batching off",
                "measured": f"{batched / unbatched:.2f}x ({batched:.2f} vs {unbatched:.2f} img/s)",
                "met": batched >= floor * unbatched,
            }
        )
    for workload in ("small", "large"):
        capacity = results["batch_capacity"][workload]
        ceiling = results["bare"][workload][str(capacity)]["images_per_s"]
        batched = at("batched", workload, top)["images_per_s"]
        targets.append(
            {
                "target": f"{workload}: served at concurrency {top} >= 85% of the bare pipeline at "
                f"batch {capacity}",
                "measured": f"{batched / ceiling:.0%} ({batched:.2f} vs {ceiling:.2f} img/s)",
                "met": batched >= 0.85 * ceiling,
            }
        )
    for workload in ("small", "large"):
        bare = results["bare"][workload]["1"]["s_per_call"]
        p50 = at("batched", workload, low)["p50_s"]
        targets.append(
            {
                "target": f"{workload}: p50 latency at concurrency {low} <= bare pipeline + 15%",
                "measured": f"{p50 / bare - 1:+.0%} ({p50 * 1000:.0f} vs {bare * 1000:.0f} ms)",
                "met": p50 <= 1.15 * bare,
            }
        )
    weights_mib = results["weights_bytes"] / 2**20
    for workload in ("small", "large"):
        one = at("batched", workload, low)["peak_replica_rss_mib"]
        many = at("batched", workload, top)["peak_replica_rss_mib"]
        if one is None or many is None:
            continue
        targets.append(
            {
                "target": f"{workload}: replica memory at concurrency {top} <= at {low} + 25% of "
                f"the weights ({weights_mib * 0.25:.1f} MiB)",
                "measured": f"+{many - one:.1f} MiB ({one:.0f} -> {many:.0f} MiB)",
                "met": many - one <= 0.25 * weights_mib,
            }
        )
    return targets


def write_json(results: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def write_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(results["workloads"])
    figure, axes = plt.subplots(len(workloads), 2, figsize=(10, 4 * len(workloads)))
    for row, workload in enumerate(workloads):
        spec = results["workloads"][workload]
        throughput, latency = axes[row]
        for mode, style in (("batched", "o-"), ("unbatched", "s--")):
            rows = results["served"][mode][workload]
            concurrency = [r["concurrency"] for r in rows]
            throughput.plot(concurrency, [r["images_per_s"] for r in rows], style, label=mode)
            latency.plot(concurrency, [r["p95_s"] for r in rows], style, label=mode)
        capacity = results["batch_capacity"][workload]
        ceiling = results["bare"][workload][str(capacity)]["images_per_s"]
        throughput.axhline(
            ceiling, color="gray", linestyle=":", label=f"bare pipeline, batch {capacity}"
        )
        throughput.set_title(f"{workload}: {spec['size']}, {spec['steps']} steps — images/s")
        latency.set_title(f"{workload}: p95 latency (s)")
        for axis in (throughput, latency):
            axis.set_xscale("log", base=2)
            axis.set_xticks(results["concurrencies"], [str(c) for c in results["concurrencies"]])
            axis.set_xlabel("concurrent clients")
            axis.grid(alpha=0.3)
            axis.legend()
    figure.suptitle(
        f"{results['model']} on {results['machine']['cpu']} "
        f"({results['machine']['cores']} cores, {results['machine']['device']})"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def markdown(results: dict[str, Any], chart: str) -> str:
    info = results["machine"]
    lines = [
        f"Measured {results['date']} on {info['cpu']} ({info['cores']} cores, "
        f"{info['memory_gib']} GiB, device: {info['device']}; torch {info['torch']}, "
        f"Ray {info['ray']}), model `{results['model']}`, config `{results['config']}`, "
        f"{results['duration_s']} s of closed-loop load per point.",
        "",
        "| workload | mode | clients | images/s | p50 s | p95 s | p99 s | errors | RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for workload, spec in results["workloads"].items():
        for mode in ("batched", "unbatched"):
            for row in results["served"][mode][workload]:
                errors = sum(n for status, n in row["statuses"].items() if status != "200")
                lines.append(
                    f"| {workload} ({spec['size']}) | {mode} | {row['concurrency']} | "
                    f"{row['images_per_s']:.2f} | {row['p50_s']:.3f} | {row['p95_s']:.3f} | "
                    f"{row['p99_s']:.3f} | {errors} | {row['peak_replica_rss_mib']} |"
                )
    lines += ["", "Bare pipeline in-process (the ceiling), images/s by batch size:", ""]
    sizes = sorted({int(b) for bare in results["bare"].values() for b in bare})
    lines.append("| workload | " + " | ".join(f"batch {b}" for b in sizes) + " |")
    lines.append("|---|" + "---|" * len(sizes))
    for workload, bare in results["bare"].items():
        cells = [f"{bare[str(b)]['images_per_s']:.2f}" if str(b) in bare else "" for b in sizes]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for target in results["targets"]:
        lines.append(
            f"| {target['target']} | {target['measured']} | "
            f"{'yes' if target['met'] else '**no**'} |"
        )
    lines += ["", f"![throughput and p95 latency against concurrency]({chart})"]
    return "\n".join(lines)


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END)
    readme.write_text(text[: start + len(README_START)] + "\n" + section + "\n" + text[end:])
