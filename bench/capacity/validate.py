"""The simulation against the real thing: the same seeded traces (`experiment.py`) replayed
at a real local Ray cluster (`cluster.py`), each several times, then simulated with the
service times measured on this machine's engine and the request overhead, contention and
replica start times measured on the cluster; the medians compared.

    python -m bench.capacity validate    # writes bench/results/capacity-validation.json

That file keeps the latest validation and, before it, the earlier ones it pools with (`kept`):
`{"model_note": "..." (optional), "validations": [oldest, ..., latest]}`.
"""

from __future__ import annotations

import hashlib
import json
import statistics
from pathlib import Path
from typing import Any

from bench.capacity.breakdown import overlap_effect, real_parts, sim_parts
from bench.capacity.contention import Contention
from bench.capacity.experiment import REPEATS, REPLICA, Case, cases
from bench.capacity.figures import COMPARED, JUDGED
from bench.capacity.probe import PROBE_WARM_CALLS
from bench.capacity.service import ServiceModel
from bench.capacity.simulation import ReplicaSettings, SimResult, simulate
from bench.capacity.throttle import Throttle

# What a validation's figures depend on besides the cluster: the model, its inputs' code and
# the experiment. Runs with the same digest pool (`pooled`).
MODEL_FILES = (
    "bench/capacity/autoscaler.py",
    "bench/capacity/batch_queue.py",
    "bench/capacity/calibrate.py",
    "bench/capacity/cluster.py",
    "bench/capacity/contention.py",
    "bench/capacity/controller.py",
    "bench/capacity/experiment.py",
    "bench/capacity/figures.py",
    "bench/capacity/probe.py",
    "bench/capacity/replicas.py",
    "bench/capacity/service.py",
    "bench/capacity/simulation.py",
    "bench/capacity/throttle.py",
    "bench/capacity/traces.py",
    "deployments/autoscaling_policy.py",
)
ROOT = Path(__file__).resolve().parents[2]
# Simulations of each real run (seeds of the routing's and the spread's draws): a run is
# judged against their medians, the model's expected figure for that trace and speed.
SIM_SEEDS = 5


def model_digest() -> str:
    """A digest of `MODEL_FILES` as they are now."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()[:12]


def within(real: float | None, sim: float | None) -> float | None:
    """The simulation's relative error against the real figure."""
    if real is None or sim is None or real == 0:
        return None
    return round((sim - real) / real, 3)


def medians(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over several runs' summaries (None where none has it)."""
    merged: dict[str, Any] = {}
    for key in summaries[0]:
        values = [summary[key] for summary in summaries if summary[key] is not None]
        merged[key] = statistics.median(values) if values else None
    return merged


def judged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A case's `runs` (each real run's summary beside its own simulation's, "summary" and
    "sim") and what is judged of them: the medians of each side and the error between."""
    real = medians([run["summary"] for run in runs])
    simulated = medians([run["sim"] for run in runs])
    error = {key: within(real[key], simulated[key]) for key in COMPARED}
    return {"real": real, "sim": simulated, "error": error, "real_runs": runs}


def validate(
    selected: list[Case],
    service: ServiceModel,
    repeats: int = REPEATS,
    throttle: Throttle | None = None,
) -> dict[str, Any]:
    """The cases on the cluster, `repeats` runs each, then each run simulated (its repeat
    the seed) on the trace it ran (its pace and stretch, `Case.at`) with `service`
    (measured on this machine just before), the contention calibrated on the cluster at the
    speed the run's probe measured, the request overhead its probe measured (else the
    calibration's), and the replica start measured in that run (else the median of all);
    medians against medians. `throttle`: the cluster run at a share of this machine's
    speed (`throttle.py`; none: full speed)."""
    from bench.capacity.cluster import run_cluster

    model = model_digest()  # the code that runs now, not what the files hold after
    throttle = throttle or Throttle(1.0)
    runs, calibration = run_cluster(selected, service, repeats, throttle)
    overhead, contention = calibration["request_overhead_s"], calibration["contention"]
    measured_starts = [t for run in runs for t in run.start_times_s]
    start_s = statistics.median(measured_starts) if measured_starts else 10.0
    rows = []
    for case in selected:
        own = [run for run in runs if run.case == case.name]
        paired = [
            {
                "pace": run.pace,
                "stretch": run.stretch,
                "summary": run.summary(case.at(run.pace, run.stretch).trace.duration_s),
                "probe": run.probe,
                "start_times_s": run.start_times_s,
                "load_average": run.load_average,
                "timeline": run.timeline,
                "requests": run.requests,
                "server": run.server,
            }
            for run in own
        ]
        rows.append(_judged_case(case, paired, service, contention, overhead, start_s))
    data = {
        "nodes": "two Ray nodes on one 2-core machine (head: proxy, ingress; worker: generators)",
        "model": model,
        "repeats": repeats,
        # The runs' median pace and their stretch (each run's own is in its row).
        "pace": round(statistics.median(run.pace for run in runs), 3),
        "stretch": statistics.median(run.stretch for run in runs),
        "throttle": throttle.speed,
        "service": service.with_overhead(overhead).to_json(),
        "replica": {**REPLICA.__dict__, "start_s": start_s},
        "start_times_s": measured_starts,
        "request_overhead_s": overhead,
        "contention": contention.to_json(),
        "calibration": {k: v for k, v in calibration.items() if k != "contention"},
        "settings": {case.name: case.settings.__dict__ for case in selected},
        "cases": rows,
    }
    data["speed_fit"] = speed_fit(data, selected)
    return data


def _judged_case(
    case: Case,
    paired: list[dict[str, Any]],
    service: ServiceModel,
    contention: Contention,
    overhead: float,
    start_s: float,
    spread: bool = True,
    fallback: tuple[float, float] = (1.0, 1.0),
) -> dict[str, Any]:
    """A case's real runs (`paired`, in repeat order), each simulated as `validate` says
    on the trace it ran (its "pace" and "stretch"; else `fallback`'s),
    `SIM_SEEDS` times: its simulations' medians ("sim"), their least and greatest
    ("sim_range": how much the model itself expects one run to vary), the first one's call
    speed and parts added, and the case judged. `spread`: each run's calls and overheads
    vary as its probe's did (`ServiceModel.with_spread`)."""
    sims = []
    for repeat, run in enumerate(paired):
        ran = case.at(run.get("pace", fallback[0]), run.get("stretch", fallback[1]))
        starts = run["start_times_s"]
        own_start = statistics.median(starts) if starts else start_s
        replica = ReplicaSettings(**{**REPLICA.__dict__, "start_s": own_start})
        probe = run["probe"]
        at_speed = contention.at_speed(probe["factor"]) if probe else contention
        own_service = service.with_overhead(probe.get("overhead_s", overhead))
        if spread:
            ratios = [_ratio(row, service) for row in run["server"] if row[0] < 0]
            own_service = own_service.with_spread(
                ratios[PROBE_WARM_CALLS:], probe.get("overheads", [])
            )
        runs = [
            simulate(ran.trace, own_service, case.settings, replica, seed, at_speed)
            for seed in range(repeat * SIM_SEEDS, (repeat + 1) * SIM_SEEDS)
        ]
        sim = runs[0]
        sims.append(sim)
        lone = at_speed.slowdowns.get((1, 0), 1.0)
        summaries = [one.summary() for one in runs]
        run["sim"] = medians(summaries)
        run["sim_range"] = {
            key: [min(values), max(values)] if values else None
            for key in JUDGED
            for values in [[one[key] for one in summaries if one[key] is not None]]
        }
        run["call_speed"] = call_speed(run["server"], service, sim, lone)
        run["parts"] = {
            "real": real_parts(run["requests"], run["server"]),
            "sim": sim_parts(sim),
        }
        run["overlap"] = overlap_effect(run["server"], service)
    return {
        "case": case.name,
        "trace": case.trace.description,
        "policy": case.settings.policy_name,
        **judged(paired),
        "sim_timeline": [(t, n, s) for t, n, s, _ in sims[0].timeline],
        "sim_decisions": sims[0].decisions,
    }


def resimulated(data: dict[str, Any], spread: bool = True) -> dict[str, Any]:
    """A stored validation's real runs simulated again by the code as it is now, with the
    inputs they were simulated with (no cluster): how a change of the model does against
    runs already made. Not a validation of the new model: those runs were not its test."""
    by_name = {case.name: case for case in cases()}
    service = ServiceModel.from_json(data["service"])
    contention = Contention.from_json(data["contention"])
    overhead, start_s = data["request_overhead_s"], data["replica"]["start_s"]
    fallback = (data.get("pace", 1.0), data.get("stretch", 1.0))  # files before 2026-12-08
    rows = [
        _judged_case(
            by_name[row["case"]],
            row["real_runs"],
            service,
            contention,
            overhead,
            start_s,
            spread,
            fallback,
        )
        for row in data["cases"]
    ]
    return {**data, "cases": rows}


def _ratio(row: list[Any], service: ServiceModel) -> float:
    """A logged call's seconds over its standalone ones (`cluster.server_timings`' row)."""
    _, size, steps, images, _, call_s = row[:6]
    return call_s / service.call_s(size, steps, images)


def call_speed(
    server: list[list[Any]], service: ServiceModel, sim: SimResult, lone: float
) -> dict[str, Any] | None:
    """How much slower the trace's calls ran than its probe's, as the ingress logged them
    (`cluster.server_timings`), beside the same for the run's simulation, whose probe is
    the lone-call factor it ran at (`lone`): each the median over requests of the call's
    seconds over the standalone ones, the trace's over the probe's (its first warm-up
    calls left out)."""

    probe = [_ratio(row, service) for row in server if row[0] < 0][PROBE_WARM_CALLS:]
    trace = [_ratio(row, service) for row in server if row[0] >= 0]
    simulated = [r.call_factor for r in sim.requests if r.call_factor is not None]
    if not probe or not trace or not simulated:
        return None
    return {
        "real": round(statistics.median(trace) / statistics.median(probe), 3),
        "sim": round(statistics.median(simulated) / lone, 3),
    }


def same_model(data: dict[str, Any], last: dict[str, Any]) -> bool:
    """Whether validation `data` checked the model `last` did: the same model (a known one)
    and cases, at whatever speed."""
    cases_of = [row["case"] for row in data["cases"]]
    return (
        last.get("model") is not None
        and data.get("model") == last.get("model")
        and cases_of == [row["case"] for row in last["cases"]]
    )


def speed_of(data: dict[str, Any]) -> float:
    """The share of the machine's speed a validation's cluster ran at (`throttle.py`)."""
    return float(data.get("throttle") or 1.0)


def pools_with(data: dict[str, Any], last: dict[str, Any]) -> bool:
    """Whether validation `data` pools with `last`: the same model, cases and throttle (a
    run at half speed is another check of the model, not another sample of the same)."""
    return same_model(data, last) and speed_of(data) == speed_of(last)


def load(path: Path) -> dict[str, Any]:
    """The stored validations (`{"validations": [...]}`, the latest last; none if no file)."""
    if not path.exists():
        return {"validations": []}
    return json.loads(path.read_text())


def kept(stored: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """What the file keeps once validation `data` is made: the stored validations of its
    model and cases (at every speed), then it. The others are dropped (git keeps them), and
    the note with them."""
    same = [old for old in stored.get("validations", []) if same_model(old, data)]
    note = {"model_note": stored["model_note"]} if same and "model_note" in stored else {}
    return {**note, "validations": [*same, data]}


def pooled(validations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The validations of the same model and cases as the last of them, as one: every real
    run with its own simulation, the medians over all of them; None if only the last one
    is of that model."""
    last = validations[-1]
    same = [data for data in validations if pools_with(data, last)]
    if len(same) < 2:
        return None
    rows = [
        {**row, **judged([run for data in same for run in data["cases"][index]["real_runs"]])}
        for index, row in enumerate(last["cases"])
    ]
    return {**last, "cases": rows, "pooled": len(same)}


def speed_fit(
    data: dict[str, Any], selected: list[Case] | None = None, factors: int = 31
) -> list[dict[str, Any]]:
    """A diagnostic, not a prediction: for each case, the one factor on every service time
    (0.70 to 2.20, on top of the calibrated contention and overhead at the case's median
    probe) whose
    simulation comes closest to the real p50, and the four figures then. Near 1, the
    calibration explains the case; if one speed explains all four figures, the model's
    shape holds and the miss was speed."""
    from bench.capacity.contention import Contention
    from bench.capacity.service import CallCost

    contention = Contention.from_json(data.get("contention"))
    base = ServiceModel.from_json(data["service"])
    replica = ReplicaSettings(**data["replica"])
    chosen = selected if selected is not None else cases()
    by_name = {case.name: case for case in chosen}
    fits = []
    for row in data["cases"]:
        runs = row.get("real_runs", [])
        paces = [run.get("pace", data.get("pace", 1.0)) for run in runs] or [1.0]
        stretch = runs[0].get("stretch", data.get("stretch", 1.0)) if runs else 1.0
        case, real = by_name[row["case"]].at(statistics.median(paces), stretch), row["real"]
        probes = [run["probe"] for run in runs if run.get("probe")]
        factors_seen = [probe["factor"] for probe in probes]
        at_speed = contention.at_speed(statistics.median(factors_seen)) if probes else contention
        overheads = [probe["overhead_s"] for probe in probes if "overhead_s" in probe]
        overhead = statistics.median(overheads) if overheads else base.request_overhead_s
        best: tuple[float, float, dict[str, Any]] | None = None
        for index in range(factors):
            factor = round(0.7 + index * 0.05, 2)
            costs = {
                key: CallCost(cost.fixed_s * factor, cost.per_step_s * factor)
                for key, cost in base.costs.items()
            }
            slowed = ServiceModel(costs, base.source, overhead)
            run = simulate(case.trace, slowed, case.settings, replica, 0, at_speed)
            summary = run.summary()
            miss = abs(within(real["p50_s"], summary["p50_s"]) or 0.0)
            if best is None or miss < best[0]:
                best = (miss, factor, summary)
        assert best is not None
        _, factor, summary = best
        fits.append(
            {
                "case": row["case"],
                "speed_factor": factor,
                "sim": {key: summary[key] for key in COMPARED},
                "error": {key: within(real[key], summary[key]) for key in COMPARED},
            }
        )
    return fits
