"""Priority classes under overload: what a high class's latency keeps when a low class
floods the replica, with the classes on and with them off.

    python -m bench.serving.priorities            # writes bench/results/priorities.json
    python -m bench.serving.priorities --quick    # 20 s phases instead of 60 s

One `serve run` of `config/local.yaml`'s tiny-sd3 model (embedded, CPU, the continuous
loop on), twice over (with and without `preempt_lower_classes`), with API keys
(`auth.api_keys_file`, a temporary file) of two classes (`scheduling.keys`: one `high`, one
`low`), `request_timeout_s` 20 s (so that an overload is
shed by the replica's deadline refusals, not held in a long queue), and the generator's
`max_ongoing_requests` 512 and `max_queued_requests` 1024 (and the ingress's
`max_ongoing_requests` 1024): requests wait inside the replica, where their classes order
them, not in Serve's router, whose queue is first come, first served.

The workload is continuous.py's mix at 64x64: steps from {4, 8, 12, 20}, guidance from
{1.0, 3.5, 5.0, 7.0}, a third with a negative prompt. Phases, one after the other:
1. capacity: a closed loop of 8 clients, all of the high key: requests per second; then a
   10 s overload, not counted (a fresh server's first overload runs slower for seconds);
2. unloaded: the high key's Poisson arrivals at 20% of capacity, alone;
3. overload: the same high stream and, at once, the low key's at 2x capacity;
4. overload, preempting: the same, on the same model served again with
   `batching.preempt_lower_classes` (`tiny-sd3-preempting`): a loop step runs only the
   most urgent class's images in flight;
5. overload, classes off: the same two streams, the high key's requests stepping down to
   `low` with `x-priority: low` (which `scheduling.header_classes: [low]` lets any caller
   do), so that both are in one class, ordered by deadline then arrival, as with no classes.
Per class: latency percentiles of the answered requests (200), answered per second of the
phase (its arrivals and the wait for their answers), and counts of 200, 503
`deadline_unreachable`, 504 and other answers (other 503s, 4xx, 5xx, connection errors).
The target (the issue's): the high class's p95 under overload at most 1.2x its unloaded p95.
Every figure is CPU-only: the model, Serve's proxy, the ingress and this load's client share
the machine's cores (CPU seconds of the replica and of the rest are given per phase).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.harness.load import GENERATIONS, Workload
from bench.harness.results import RESULTS, machine, write_json
from bench.harness.serve_run import LOCAL_CONFIG, SAME_PRIORITY
from bench.serving.continuous import CpuMeter, MixedWorkload
from tests.harness import ServeRun, free_port, load_config, with_overrides

MODEL = "tiny-sd3"
# The same model with `batching.preempt_lower_classes`: its loop steps only the most urgent
# class in flight.
PREEMPTING = "tiny-sd3-preempting"
SIZE = "64x64"
KEYS = {"high": "sk-bench-priorities-high-7c1e", "low": "sk-bench-priorities-low-2f9a"}
REQUEST_TIMEOUT_S = 20.0
AGING_S = 30.0
MAX_ONGOING = 512  # the generator's: what a replica holds, and orders
MAX_QUEUED = 1024  # the router's queue before it (first come, first served)
INGRESS_MAX_ONGOING = 1024
CLIENTS = 8
UNLOADED_SHARE = 0.2  # the high stream, as a share of capacity
OVERLOAD_SHARE = 2.0  # the low stream
WARM_OVERLOAD_S = 10.0
TARGET_RATIO = 1.2
OUTCOMES = ("ok", "deadline_unreachable", "timeout", "other")


def sha256(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def bench_config(config: dict, port: int, keys_file: Path) -> dict:
    """`config` on `port` serving its first model alone, with the two keys' classes, a 20 s
    timeout and room to queue inside the replica (module docstring)."""
    args = config["applications"][0]["args"]
    model = {key: value for key, value in args["models"][0].items() if key != "adapters"}
    model["deployment"] = {
        **model.get("deployment", {}),
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
    }
    scheduling = {
        "classes": ["high", "normal", "low"],
        "header_classes": ["low"],  # anyone may step back: the classes-off phase
        "keys": [{"key_sha256": sha256(key), "priority": name} for name, key in KEYS.items()],
        "aging_s": AGING_S,
    }
    batching = {**model.get("batching", args.get("batching", {})), "preempt_lower_classes": True}
    preempting = {**model, "id": PREEMPTING, "batching": batching}
    overridden = with_overrides(
        config,
        port=port,
        args={
            "models": [model, preempting],
            "auth": {"api_keys_file": str(keys_file)},
            "scheduling": scheduling,
            "request_timeout_s": REQUEST_TIMEOUT_S,
        },
    )
    for deployment in overridden["applications"][0].get("deployments", []):
        if deployment.get("name") == "ImageIngress":
            deployment["max_ongoing_requests"] = INGRESS_MAX_ONGOING
    return overridden


def workload(model_id: str = MODEL) -> MixedWorkload:
    return MixedWorkload(model_id, SIZE, 0, model=model_id, sizes=(SIZE,))


@dataclass(frozen=True)
class Stream:
    """One class's requests: its key, and the headers it sends besides."""

    name: str
    key: str
    rate_per_s: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()

    def request_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}", **dict(self.headers)}


def outcome(status: int | None, body: Any) -> str:
    """What an answer counts as: ok (200), deadline_unreachable (503 with that code),
    timeout (504) or other (the rest, and no answer: `status` None)."""
    if status == 200:
        return "ok"
    if status == 504:
        return "timeout"
    if status == 503 and isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and error.get("code") == "deadline_unreachable":
            return "deadline_unreachable"
    return "other"


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile `q` of `values` (as `LoadResult.percentile`); None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class ClassTally:
    """One class's answers over a phase."""

    latencies_s: list[float] = field(default_factory=list)  # of the answered (200) ones
    refusal_s: list[float] = field(default_factory=list)  # seconds to a deadline refusal
    outcomes: Counter[str] = field(default_factory=Counter)
    details: Counter[str] = field(default_factory=Counter)  # "other": status or error

    def record(self, kind: str, seconds: float, detail: str) -> None:
        self.outcomes[kind] += 1
        if kind == "ok":
            self.latencies_s.append(seconds)
        elif kind == "deadline_unreachable":
            self.refusal_s.append(seconds)
        elif kind == "other":
            self.details[detail] += 1

    def summary(self, elapsed_s: float) -> dict[str, Any]:
        """Its figures: counts, answered per second of the phase (`elapsed_s`, its arrivals
        and the wait for their answers), and latency percentiles in seconds."""
        figures: dict[str, Any] = {
            "sent": sum(self.outcomes.values()),
            **{kind: self.outcomes.get(kind, 0) for kind in OUTCOMES},
            "ok_per_s": round(self.outcomes.get("ok", 0) / elapsed_s, 3),
        }
        for q in (50, 95, 99):
            value = percentile(self.latencies_s, q)
            figures[f"p{q}_s"] = None if value is None else round(value, 3)
        refusal = percentile(self.refusal_s, 50)
        figures["refusal_p50_s"] = None if refusal is None else round(refusal, 3)
        figures["other_details"] = dict(self.details)
        return figures


async def _post(client: httpx.AsyncClient, stream: Stream, body: dict, tally: ClassTally) -> None:
    sent = time.perf_counter()
    try:
        response = await client.post(GENERATIONS, json=body, headers=stream.request_headers())
    except httpx.HTTPError as error:
        tally.record("other", time.perf_counter() - sent, type(error).__name__)
        return
    seconds = time.perf_counter() - sent
    try:
        answer = response.json()
    except ValueError:
        answer = None
    tally.record(outcome(response.status_code, answer), seconds, str(response.status_code))


def _client(base_url: str) -> httpx.AsyncClient:
    # Past the deadline the ingress answers 504 itself; the margin is for a slow answer.
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S + 30, limits=limits)


def arrivals(rate_per_s: float, duration_s: float, rng: random.Random) -> list[float]:
    """Poisson arrival times in [0, duration_s)."""
    times: list[float] = []
    if rate_per_s <= 0:
        return times
    at = rng.expovariate(rate_per_s)
    while at < duration_s:
        times.append(at)
        at += rng.expovariate(rate_per_s)
    return times


async def _open_loop(
    base_url: str, streams: list[Stream], load: Workload, duration_s: float, seed: int
) -> dict[str, ClassTally]:
    """Each stream's Poisson arrivals at once for `duration_s`; waits for every answer."""
    tallies = {stream.name: ClassTally() for stream in streams}
    plan = []
    for index, stream in enumerate(streams):
        rng = random.Random(seed * 100 + index)
        plan += [
            (at, stream, load.request(rng)) for at in arrivals(stream.rate_per_s, duration_s, rng)
        ]
    async with _client(base_url) as client:
        started = time.perf_counter()

        async def send(at: float, stream: Stream, body: dict) -> None:
            await asyncio.sleep(max(0.0, started + at - time.perf_counter()))
            await _post(client, stream, body, tallies[stream.name])

        await asyncio.gather(*(send(*item) for item in plan))
    return tallies


async def _closed_loop(
    base_url: str, stream: Stream, load: Workload, clients: int, duration_s: float, seed: int
) -> ClassTally:
    """`clients` clients, each sending its next request when the last is answered."""
    tally = ClassTally()
    async with _client(base_url) as client:
        deadline = time.perf_counter() + duration_s

        async def loop(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.perf_counter() < deadline:
                await _post(client, stream, load.request(rng), tally)

        await asyncio.gather(*(loop(i) for i in range(clients)))
    return tally


def wait_for_first_image(base_url: str, timeout_s: float = 300, model: str = MODEL) -> float:
    """Poll with the high key until an image comes; the seconds it took."""
    started = time.monotonic()
    headers = Stream("high", KEYS["high"]).request_headers()
    body = {"prompt": "first light", "model": model, "response_format": "b64_json"}
    last: object = None
    while time.monotonic() - started < timeout_s:
        try:
            response = httpx.post(base_url + GENERATIONS, json=body, headers=headers, timeout=60)
            if response.status_code == 200:
                return time.monotonic() - started
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.HTTPError as error:
            last = error
        time.sleep(0.5)
    raise TimeoutError(f"no image from {base_url} in {timeout_s} s; last: {last}")


def phase_figures(
    tallies: dict[str, ClassTally], elapsed_s: float, cpu: CpuMeter, rates: dict[str, float]
) -> dict[str, Any]:
    """A phase's figures: per class, and the CPU seconds it took inside (the generator
    replica) and outside (proxy, ingress, Ray)."""
    by_class = {name: tally.summary(elapsed_s) for name, tally in tallies.items()}
    for name, rate in rates.items():
        by_class[name]["rate_per_s"] = round(rate, 3)
    return {
        "elapsed_s": round(elapsed_s, 1),
        "classes": by_class,
        "cpu_inside_s": round(cpu.inside_s, 1),
        "cpu_outside_s": round(cpu.outside_s, 1),
    }


def _timed(load: Any) -> tuple[Any, float]:
    """Run a load's coroutine; what it returns, and the seconds it took."""
    started = time.perf_counter()
    result = asyncio.run(load)
    return result, time.perf_counter() - started


def run_phases(server: ServeRun, duration_s: float, seed: int) -> dict[str, Any]:
    """Capacity, then the unloaded high stream, then the overloads with classes on and off."""
    load, base = workload(), server.base_url
    high, low = Stream("high", KEYS["high"]), Stream("low", KEYS["low"])
    asyncio.run(_closed_loop(base, high, load, CLIENTS, 5.0, seed=-1))  # warm: not counted
    with CpuMeter(server, MODEL) as cpu:
        capacity, elapsed_s = _timed(_closed_loop(base, high, load, CLIENTS, duration_s, seed))
    capacity_rps = capacity.outcomes.get("ok", 0) / elapsed_s
    phases: dict[str, Any] = {"capacity": phase_figures({"high": capacity}, elapsed_s, cpu, {})}
    print(f"capacity: {capacity_rps:.2f} requests/s ({phases['capacity']})", flush=True)
    high = Stream("high", KEYS["high"], UNLOADED_SHARE * capacity_rps)
    low = Stream("low", KEYS["low"], OVERLOAD_SHARE * capacity_rps)
    # The first overload of a fresh server runs slower for seconds (measured: the loop's
    # rate ramps up over ~10 s): one not counted, so that neither overload pays for it.
    for model_id in (MODEL, PREEMPTING):
        warm_load = workload(model_id)
        warm = asyncio.run(_open_loop(base, [low], warm_load, WARM_OVERLOAD_S, seed=-2))
        print(f"overload warm-up {model_id}: {warm['low'].summary(WARM_OVERLOAD_S)}", flush=True)
    stepped_down = Stream("high", KEYS["high"], high.rate_per_s, (("x-priority", "low"),))
    plans = {
        "unloaded": ([high], MODEL),
        "overload": ([high, low], MODEL),
        "overload, preempting": ([high, low], PREEMPTING),
        "overload, classes off": ([stepped_down, low], MODEL),
    }
    for name, (streams, model_id) in plans.items():
        with CpuMeter(server, model_id) as cpu:
            tallies, elapsed_s = _timed(
                _open_loop(base, streams, workload(model_id), duration_s, seed)
            )
        rates = {stream.name: stream.rate_per_s for stream in streams}
        phases[name] = phase_figures(tallies, elapsed_s, cpu, rates)
        print(f"{name}: {phases[name]}", flush=True)
    return {"capacity_rps": round(capacity_rps, 3), "phases": phases}


def targets(phases: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The high class's p95 under overload over its unloaded p95, classes on (the target)
    and off (what the classes buy)."""
    unloaded = phases["unloaded"]["classes"]["high"]["p95_s"]
    checks = {}
    for name in ("overload", "overload, preempting", "overload, classes off"):
        loaded = phases[name]["classes"]["high"]["p95_s"]
        ratio = None if unloaded is None or loaded is None else round(loaded / unloaded, 3)
        targeted = name != "overload, classes off"
        checks[f"high p95, {name} / unloaded"] = {
            "measured": ratio,
            "target": TARGET_RATIO if targeted else None,
            "met": None if ratio is None or not targeted else ratio <= TARGET_RATIO,
        }
    return checks


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def markdown(results: dict[str, Any]) -> str:
    """The phases' figures per class as a table, then the targets."""
    lines = [
        f"Capacity (closed loop, c={CLIENTS}, mix at {SIZE}): "
        f"{results['capacity_rps']:.2f} requests/s. All figures CPU-only.\n",
        "| phase | class | rate/s | sent | ok | 503 deadline | 504 | other | ok/s "
        "| p50 s | p95 s | p99 s | CPU s inside | outside |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for phase, figures in results["phases"].items():
        for name, row in figures["classes"].items():
            rate = row.get("rate_per_s")
            lines.append(
                f"| {phase} | {name} | {'closed' if rate is None else f'{rate:.2f}'} | "
                f"{row['sent']} | {row['ok']} | {row['deadline_unreachable']} | "
                f"{row['timeout']} | {row['other']} | {row['ok_per_s']:.2f} | "
                f"{_seconds(row['p50_s'])} | {_seconds(row['p95_s'])} | "
                f"{_seconds(row['p99_s'])} | {figures['cpu_inside_s']:.1f} | "
                f"{figures['cpu_outside_s']:.1f} |"
            )
    lines.append("")
    for name, check in results["targets"].items():
        measured = "-" if check["measured"] is None else f"{check['measured']:.2f}x"
        if check["target"] is None:
            lines.append(f"- {name}: {measured} (for comparison; CPU-only)")
        else:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
            lines.append(
                f"- {name}: {measured} (target <= {check['target']}x): {verdict} (CPU-only)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=LOCAL_CONFIG)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--quick", action="store_true", help="20 s phases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    options = parser.parse_args(argv)
    if options.quick:
        options.duration = 20.0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-priorities-") as folder:
        keys_file = Path(folder) / "keys"
        keys_file.write_text("\n".join(KEYS.values()) + "\n")
        config = bench_config(load_config(options.config), free_port(), keys_file)
        with ServeRun(config, env=SAME_PRIORITY) as server:
            startup_s = wait_for_first_image(server.base_url)
            wait_for_first_image(server.base_url, model=PREEMPTING)
            print(f"serving after {startup_s:.1f} s", flush=True)
            measured = run_phases(server, options.duration, options.seed)
    results = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "cpu_only": True,
        "model": MODEL,
        "size": SIZE,
        "duration_s": options.duration,
        "request_timeout_s": REQUEST_TIMEOUT_S,
        "aging_s": AGING_S,
        "generator_max_ongoing_requests": MAX_ONGOING,
        **measured,
    }
    results["targets"] = targets(results["phases"])
    results["runtime_s"] = round(time.monotonic() - started, 1)
    write_json(results, options.out / "priorities.json")
    print(markdown(results))
    print(f"\nran {results['runtime_s']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
