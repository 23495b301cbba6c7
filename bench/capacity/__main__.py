"""`python -m bench.capacity [measure | validate | refit | extrapolate]`; with no command, the
stored validation tables and extrapolation (bench/results/capacity-*.json), nothing run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.capacity.breakdown import breakdown_table, overlap_table
from bench.capacity.experiment import REPEATS
from bench.capacity.report import (
    call_speed_table,
    candidates_table,
    chart,
    extrapolation_table,
    runs_table,
    speed_fit_table,
    validation_table,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
SERVICE = RESULTS / "capacity-service.json"
VALIDATION = RESULTS / "capacity-validation.json"  # the latest and those it pools with
CHART = RESULTS / "capacity-validation.png"
EXTRAPOLATION = RESULTS / "capacity-extrapolation.json"


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")


def measure() -> None:
    from bench.capacity.experiment import BATCHES, SIZES
    from bench.capacity.service import measure_engine

    _write(SERVICE, measure_engine(SIZES, BATCHES, steps=(4, 20)).to_json())


def validate(cases: list[str] | None, repeats: int, speed: float) -> None:
    from bench.capacity.experiment import cases as all_cases
    from bench.capacity.service import ServiceModel
    from bench.capacity.throttle import Throttle
    from bench.capacity.validate import kept, load
    from bench.capacity.validate import validate as run

    with Throttle(speed) as throttle:
        with throttle.inside():
            measure()  # the engine's speed now (at the throttle's), just before the cluster
        service = ServiceModel.load(SERVICE)
        # Each run's pace comes from its probe, the stretch from the calibration.
        selected = [case for case in all_cases() if not cases or case.name in cases]
        data = run(selected, service, repeats, throttle)
    stored = kept(load(VALIDATION), data)
    _write(VALIDATION, stored)
    chart(data, CHART)
    print(f"wrote {CHART}")
    print(validation_table(data))
    print("\nEvery run of the stored validations of this model, by speed:\n")
    print(runs_table(stored["validations"]))
    print(call_speed_table(data) or "(no ingress timings: no call-speed diagnostic)")
    print(breakdown_table(data) or "(no request ids in the ingress's log: no breakdown)")
    print(overlap_table(data) or "(too few calls alone and beside another: no overlap table)")


def refit() -> None:
    """The speed-fit diagnostic of the latest stored validation again (no cluster)."""
    from bench.capacity.validate import load, speed_fit

    stored = load(VALIDATION)
    data = stored["validations"][-1]
    data["speed_fit"] = speed_fit(data)
    _write(VALIDATION, stored)
    print(speed_fit_table(data["speed_fit"]))


def extrapolate() -> None:
    from bench.capacity.extrapolate import extrapolate as run

    data = run()
    _write(EXTRAPOLATION, data)
    print(extrapolation_table(data))


def _print_inputs(data: dict) -> None:
    """What a validation's simulations were given: pace, stretch, speed, replica starts,
    request overheads and the calibrated slowdowns."""
    print(f"The latest validation: simulation against the real cluster ({data['nodes']}).")
    print(
        f"The traces at x{data.get('pace', 1.0)} their rates (the runs' median, each "
        f"from its probe), x{data.get('stretch', 1.0)} their times (the replica start)."
    )
    print(f"The cluster at x{data.get('throttle', 1.0)} of the machine's speed (throttle.py).")
    print(
        f"Replica start {data['start_times_s']} s, request overhead "
        f"{data['request_overhead_s']} s (calibrated)."
    )
    probed = [
        run["probe"]["overhead_s"]
        for row in data["cases"]
        for run in row["real_runs"]
        if "overhead_s" in run.get("probe", {})
    ]
    if probed:
        print(
            f"Each run's request overhead, as its probe measured it: {min(probed)} to "
            f"{max(probed)} s (the simulation's for that run)."
        )
    for row in data.get("contention", {}).get("slowdowns", []):
        print(
            f"Calibrated slowdown with {row['calls']} call(s) running, "
            f"{row['starting']} replica(s) starting: x{row['factor']}"
        )


def show() -> int:
    missing = [p for p in (VALIDATION, EXTRAPOLATION) if not p.exists()]
    if VALIDATION.exists():
        from bench.capacity.validate import load, model_digest, pooled, speed_of

        stored = load(VALIDATION)
        validations = stored["validations"]
        data = validations[-1]
        _print_inputs(data)
        print()
        print("Every run of the stored validations of this model, by speed:\n")
        print(runs_table(validations))
        print(f"\nThe latest validation (x{speed_of(data):g}) in full:\n")
        print(validation_table(data))
        if data.get("model") != model_digest():
            print("\n(The simulation's code has changed since this validation.)")
        pool = pooled(validations)
        if pool is not None:
            print(f"\nPooled: the {pool['pooled']} validations of this model and these cases.")
            if "model_note" in stored:
                print(f"(Their model: {stored['model_note']}.)")
            print()
            print(validation_table(pool))
        speeds = call_speed_table(data)
        if speeds:
            print("\nDiagnostic: the trace's calls over its probe's, real and simulated.\n")
            print(speeds)
        parts = breakdown_table(data)
        if parts:
            print("\nWhere the time went, each run's requests by part, real and simulated.\n")
            print(parts)
        overlaps = overlap_table(data)
        if overlaps:
            print("\nCalls alone and beside another, each run's, against the calibration.\n")
            print(overlaps)
        if "speed_fit" in data:
            print("\nDiagnostic: each case with one service-time factor fitted to its real p50.\n")
            print(speed_fit_table(data["speed_fit"]))
        print()
    if EXTRAPOLATION.exists():
        data = json.loads(EXTRAPOLATION.read_text())
        assumptions = data["assumptions"]
        print(
            "Extrapolation: SD3.5 Medium on H100s (published figures, "
            f"{assumptions['h100_s_per_1024_image']} s an image at 1024x1024 x 28 steps; "
            f"${assumptions['dollars_per_gpu_hour']:.2f} a GPU-hour, an assumption; "
            f"p95 objective {assumptions['p95_objective_s']} s).\n"
        )
        print(extrapolation_table(data))
        print()
        print(candidates_table(data))
    for path in missing:
        print(
            f"\n{path.name} is missing: run `python -m bench.capacity "
            f"{'validate' if path == VALIDATION else 'extrapolate'}`"
        )
    return 1 if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capacity", description=__doc__)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("measure", help="service times of the embedded model on this CPU")
    check = commands.add_parser("validate", help="the real cluster against the simulation")
    check.add_argument("--case", action="append", help="only these cases (by name)")
    check.add_argument(
        "--repeats", type=int, default=REPEATS, help="runs of each case (default %(default)s)"
    )
    check.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="run the cluster at this share of the machine's speed, e.g. 0.5 (a frozen-"
        "and-thawed cgroup, bench/capacity/throttle.py; needs root; default %(default)s)",
    )
    commands.add_parser("refit", help="the stored validation's speed-fit diagnostic again")
    commands.add_parser("extrapolate", help="GPU capacity at 10, 100, 1000 requests/s")
    args = parser.parse_args()
    if args.command == "measure":
        measure()
    elif args.command == "validate":
        validate(args.case, args.repeats, args.speed)
    elif args.command == "refit":
        refit()
    elif args.command == "extrapolate":
        extrapolate()
    else:
        return show()
    return 0


if __name__ == "__main__":
    sys.exit(main())
