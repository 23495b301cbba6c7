"""Where the serving path's CPU goes: per-request CPU of Serve's proxy, the ingress and the
generator replica under closed-loop load, with py-spy's breakdown of each.

    pip install -e ".[bench]"   # py-spy among them
    python -m bench.serving.profile --config config/local.yaml [--label latest]

It starts the application with `serve run`, and for each workload drives `--concurrency`
clients for `--duration` seconds while py-spy samples the three processes (without pausing
them) and the OS counts their CPU time, and that of every other process of the `serve run`
(Ray's daemons, Serve's controller, the other models' replicas, `serve run` itself: "rest",
by process). It prints one table per workload (milliseconds of CPU per request, by
category; see `bench/serving/stacks.py`) and writes `bench/results/profile-<label>.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import psutil

from bench.harness.load import Workload, closed_loop
from bench.harness.results import RESULTS, write_json
from bench.harness.serve_run import (
    add_throughput_option,
    direct_ingress_url,
    serving_options,
    throughput_mode,
)
from bench.serving.stacks import (
    INGRESS_RULES,
    PROXY_RULES,
    REPLICA_RULES,
    breakdown,
    parse_collapsed,
    per_request_ms,
)
from deployments.config.model_config import generator_deployment_name
from tests.harness import ServeRun, free_port, load_config, with_overrides

WORKLOADS = [Workload("small", size="64x64", steps=8), Workload("large", size="256x256", steps=8)]
RULES = {"proxy": PROXY_RULES, "ingress": INGRESS_RULES, "replica": REPLICA_RULES}


def serving_processes(server: ServeRun, generator: str) -> dict[str, psutil.Process]:
    """The proxy, the ingress and the generator replica of a `serve run`."""
    found: dict[str, psutil.Process] = {}
    for process in server.processes():
        try:
            command = " ".join(process.cmdline()).strip()
        except psutil.Error:
            continue
        if "haproxy" in Path(command.split(" ")[0]).name:
            found["proxy"] = process  # HAProxy mode: it takes the HTTP traffic
        elif "ProxyActor" in command:
            found.setdefault("proxy", process)
    for name, deployment in (("ingress", "ImageIngress"), ("replica", generator)):
        replicas = server.replica_processes(deployment)
        if replicas:
            found[name] = replicas[-1]
    missing = set(RULES) - set(found)
    if missing:
        raise RuntimeError(f"no {sorted(missing)} process under serve run")
    return found


def other_processes(server: ServeRun, profiled: dict[str, psutil.Process]) -> list[psutil.Process]:
    """Every process of the `serve run` but the profiled ones, with `serve run` itself."""
    pids = {process.pid for process in profiled.values()}
    return [server.driver()] + [p for p in server.processes() if p.pid not in pids]


def process_name(process: psutil.Process) -> str:
    """A short name: an actor's title (`ray::ServeController`), else the script or binary."""
    try:
        command = process.cmdline()
    except psutil.Error:
        return "ended"
    if not command:
        return "?"
    if command[0].startswith("ray::"):
        return command[0].split(".")[0]
    scripts = [Path(part).name for part in command if part.endswith(".py")]
    return scripts[0] if scripts else Path(command[0]).name


def cpu_seconds(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
    except psutil.Error:  # ended meanwhile (the idle workers Ray starts and stops)
        return 0.0
    return times.user + times.system


def profile_workload(
    base_url: str,
    processes: dict[str, psutil.Process],
    workload: Workload,
    concurrency: int,
    duration_s: float,
    rate_hz: int,
    others: list[psutil.Process] = (),
) -> dict:
    """One workload under load: requests, images/s, and per process its CPU ms per request
    by category; of `others`, the CPU ms per request by process name."""
    closed_loop(base_url, workload, concurrency, 3.0)  # warm, and batches form
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    workdir = Path(tempfile.mkdtemp(prefix="profile-"))
    recorders = {}
    if spy is not None:
        for name, process in processes.items():
            command = [spy, "record", "-p", str(process.pid), "-f", "raw", "--gil", "--nonblocking"]
            command += ["-r", str(rate_hz), "-d", str(int(duration_s)), "-o", str(workdir / name)]
            recorders[name] = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
    before = {name: cpu_seconds(process) for name, process in processes.items()}
    rest_before = [cpu_seconds(process) for process in others]
    load = closed_loop(base_url, workload, concurrency, duration_s, warmup_requests=0)
    used = {name: cpu_seconds(process) - before[name] for name, process in processes.items()}
    rest: Counter[str] = Counter()
    for process, earlier in zip(others, rest_before, strict=True):
        rest[process_name(process)] += max(0.0, cpu_seconds(process) - earlier)
    for recorder in recorders.values():
        recorder.wait(timeout=60)
    requests = len(load.latencies_s)
    result = {
        "size": workload.size,
        "steps": workload.steps,
        "concurrency": concurrency,
        "requests": requests,
        "statuses": load.statuses,
        "images_per_s": round(load.images_per_s, 2),
        "processes": {},
    }
    for name in processes:
        output = workdir / name
        stacks = parse_collapsed(output.read_text().splitlines()) if output.exists() else {}
        samples = breakdown(stacks, RULES[name]) if stacks else Counter()
        result["processes"][name] = per_request_ms(samples, rate_hz, requests, used[name])
    per_request = max(requests, 1)
    result["rest"] = {
        name: round(1000 * seconds / per_request, 2) for name, seconds in rest.most_common()
    }
    shutil.rmtree(workdir, ignore_errors=True)
    return result


def markdown(label: str, results: list[dict]) -> str:
    lines = []
    for result in results:
        lines += [
            f"**{label}: {result['size']}, {result['steps']} steps, concurrency "
            f"{result['concurrency']}**: {result['images_per_s']} images/s, "
            f"{result['requests']} requests. CPU ms per request:",
            "",
            "| process | category | ms/request |",
            "|---|---|---|",
        ]
        for name, rows in result["processes"].items():
            for category, ms in rows.items():
                lines.append(f"| {name} | {category} | {ms:.2f} |")
        for name, ms in result.get("rest", {}).items():
            lines.append(f"| rest | {name} | {ms:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = serving_options(__doc__, concurrency=8, duration_s=15.0)
    parser.add_argument("--label", default="latest")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=RESULTS)
    add_throughput_option(parser)
    parser.add_argument(
        "--ha-proxy",
        action="store_true",
        help="RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy in place of Serve's proxy, on the same port",
    )
    options = parser.parse_args(argv)
    throughput_mode(options.throughput_optimized)
    if options.ha_proxy:
        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1"

    config = with_overrides(load_config(options.config), port=free_port())
    generator = generator_deployment_name(config["applications"][0]["args"]["models"][0]["id"])
    results = []
    with ServeRun(config) as server:
        server.wait_for_first_image()
        processes = serving_processes(server, generator)
        others = other_processes(server, processes)
        base_url = server.base_url
        if options.throughput_optimized and not options.ha_proxy:
            base_url = direct_ingress_url()
        for workload in WORKLOADS:
            result = profile_workload(
                base_url,
                processes,
                workload,
                options.concurrency,
                options.duration,
                options.rate,
                others,
            )
            results.append(result)
            print(json.dumps(result), flush=True)
    write_json(
        {"label": options.label, "results": results}, options.out / f"profile-{options.label}.json"
    )
    print(markdown(options.label, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
