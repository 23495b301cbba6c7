"""What the GPU benchmark measures, in which order, and what it cuts to fit its time.

Each lever is one setting of the served model (its `optimizations:`, `batching` or
`parallel`), so one replica start; a parallel lever's replica is a group of ranks, one GPU
each, planned only where the machine has that many. The eager baseline gets the whole matrix
(both sizes at every concurrency); every other lever gets the two points that tell most:
seconds per large image alone, and images/s of small ones at the highest concurrency (where
batching fills the device); compile only the first, since it is warmed up for that shape
alone. Levers run in priority order, each if its estimated cost fits
in the time left, and within a lever each point that still fits; the rest are skipped and
listed. Costs come from guesses until measurements replace them (seconds per image alone, a
replica's start): the guesses only plan, and no figure printed as a result comes from them.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass, field, replace
from typing import Any

from bench.gpu.model import transformer_config


@dataclass(frozen=True)
class Profile:
    """Where and at what scale the benchmark runs: the H200 run, or the CPU smoke test."""

    name: str
    toy: bool
    device: str
    dtype: str
    steps: int
    large: str
    small: str
    concurrencies: tuple[int, ...]
    guess_s_per_image: dict[str, float]  # for planning only
    build_s: float  # building and saving the model, when not cached
    start_s: float  # a replica start: process, imports, loading the weights, first image
    compile_s: float  # the compile lever's warm-up, on top of a start
    budget_s: float
    num_gpus: float
    num_cpus: float
    ingress_replicas: int


GPU = Profile(
    name="gpu",
    toy=False,
    device="cuda",
    dtype="bfloat16",
    steps=28,
    large="1024x1024",
    small="512x512",
    concurrencies=(1, 4, 16),
    # SD3 Medium took 4.76 s on an A100 (Hugging Face's SD3 post), ~37% of its peak; SD3.5
    # Medium at that share of an H200 would be ~1.7 s.
    guess_s_per_image={"1024x1024": 2.0, "512x512": 0.5},
    build_s=60,
    start_s=40,
    compile_s=90,
    budget_s=450,
    num_gpus=1,
    num_cpus=4,
    ingress_replicas=2,
)
CPU_SMOKE = Profile(
    name="cpu-smoke",
    toy=True,
    device="cpu",
    dtype="float32",
    steps=2,
    large="64x64",
    small="32x32",
    concurrencies=(1, 2),
    guess_s_per_image={"64x64": 1.0, "32x32": 0.7},
    build_s=60,
    start_s=60,
    compile_s=300,
    budget_s=900,
    num_gpus=0,
    num_cpus=1,
    ingress_replicas=1,
)


@dataclass(frozen=True)
class Lever:
    name: str
    optimizations: dict[str, Any]
    extra_start_s: float = 0.0
    # The model's `batching` on top of the GPU config's (the continuous loop is one).
    batching: dict[str, Any] = field(default_factory=dict)
    # "matrix": both sizes at every concurrency (the baseline); "key": the large size alone
    # and the small one at the highest concurrency; "large_alone": only the first.
    scope: str = "key"
    note: str = ""
    # The model's `parallel` (one replica over several devices); empty: one device.
    parallel: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        """The devices one replica of this lever runs on (`ParallelConfig.world_size`)."""
        if not self.parallel:
            return 1
        from deployments.config.parallel_config import ParallelConfig

        return ParallelConfig(**self.parallel).world_size


@dataclass(frozen=True)
class Point:
    size: str
    concurrency: int
    rounds: int  # requests each client sends, one after the other

    @property
    def images(self) -> int:
        return self.concurrency * self.rounds


# diffusers' attention backends worth trying, best first, and the module each needs.
BACKENDS = (
    ("_flash_3", "flash_attn_interface"),
    ("flash", "flash_attn"),
    ("sage", "sageattention"),
)


@dataclass(frozen=True)
class Environment:
    cuda: bool
    capability: tuple[int, int] | None
    importable: frozenset[str]
    applies_optimizations: bool
    gpus: int  # torch.cuda.device_count(): the most ranks a parallel replica can have


def detect_environment() -> Environment:
    import torch

    cuda = torch.cuda.is_available()
    names = (*(module for _, module in BACKENDS), "torchao")
    return Environment(
        cuda=cuda,
        capability=torch.cuda.get_device_capability(0) if cuda else None,
        importable=frozenset(n for n in names if importlib.util.find_spec(n) is not None),
        # The code that applies `optimizations:` (being written apart from this benchmark).
        applies_optimizations=importlib.util.find_spec("deployments.generator.model.optimizations")
        is not None,
        gpus=torch.cuda.device_count() if cuda else 0,
    )


def levers(profile: Profile, env: Environment) -> tuple[list[Lever], list[tuple[str, str]]]:
    """The levers to measure, in priority order, and those skipped with the reason."""
    # Parallel replicas right after the baseline: a machine with several GPUs is lent
    # rarely, and their latency is what it would be lent for (with one GPU they are skipped).
    parallel, skipped = parallel_levers(profile, env)
    # The continuous loop (step-level batches) against the GPU config's request-level ones:
    # measured on CPUs (docs/benchmarks.md), off in the GPU configs until measured here.
    chosen = [
        Lever("eager", {}, scope="matrix"),
        *parallel,
        Lever("continuous", {}, batching={"continuous": True}),
    ]

    def offer(lever: Lever, missing: str | None) -> None:
        if missing:
            skipped.append((lever.name, missing))
        elif not env.applies_optimizations and not profile.toy:
            skipped.append(
                (
                    lever.name,
                    "this checkout does not apply `optimizations:` (no "
                    "deployments/generator/model/optimizations.py): it would measure eager",
                )
            )
        else:
            note = "" if env.applies_optimizations else "not applied by this checkout"
            chosen.append(replace(lever, note=note))

    # Compiled for the large size alone (each other shape would cost as much again); its
    # other points would include compiling, so it is measured at that size only.
    compile_on = {
        "compile": {"mode": "default", "warmup_sizes": [profile.large], "warmup_batch_sizes": [1]}
    }
    offer(
        Lever("compile", compile_on, profile.compile_s, scope="large_alone"),
        _cpu_only(profile, "compiling"),
    )
    # Compile inside the continuous loop: each step's rows padded to a few counts, all
    # compiled at start (`deployments/generator/loop/row_buckets.py`), at both sizes, so
    # both points (the large image alone, small ones at the highest concurrency) are warm.
    loop_compile_on = {
        "compile": {"mode": "default", "warmup_sizes": [profile.large, profile.small]}
    }
    offer(
        Lever(
            "continuous_compile",
            loop_compile_on,
            2 * profile.compile_s,
            batching={"continuous": True},
        ),
        _cpu_only(profile, "compiling"),
    )
    fp8_ok = env.capability is not None and env.capability >= (8, 9)
    offer(
        Lever("float8_weight_only", {"quantization": "float8_weight_only"}, 20),
        _need_torchao(env) or (None if fp8_ok else "float8 needs compute capability >= 8.9"),
    )
    backend = next((b for b, module in BACKENDS if module in env.importable), None)
    offer(
        Lever(f"attention_{(backend or 'flash').lstrip('_')}", {"attention_backend": backend}),
        # The service refuses it at start: in diffusers 0.42 SD3's attention processors call
        # torch's scaled_dot_product_attention directly, not the dispatcher.
        "SD3's attention bypasses diffusers' attention dispatcher (only 'native' applies)",
    )
    # TaylorSeer: a cache SD3's denoiser takes (First-Block-Cache is refused for SD3), and it
    # decides from the step alone, so random weights do not distort its skip rate.
    taylorseer = {"cache": {"kind": "taylorseer", "options": {"cache_interval": 3}}}
    offer(Lever("cache_taylorseer", taylorseer), None)
    # The same cache in the continuous loop, decided per image
    # (`deployments/generator/loop/caches/`): against `cache_taylorseer`, what the loop keeps
    # with the cache on.
    offer(Lever("continuous_taylorseer", taylorseer, batching={"continuous": True}), None)
    offer(
        Lever("int8_weight_only", {"quantization": "int8_weight_only"}, 20),
        _need_torchao(env) or _cpu_only(profile, "quantizing"),
    )
    return chosen, skipped


# The Ulysses levers' ranks. A group of one is the eager lever itself (ParallelConfig refuses
# a `parallel` of one rank; a replica without it is one device), so eager's large image alone
# is the 1-rank figure these are read against.
ULYSSES_RANKS = (2, 4)
# A group's other ranks load the model after rank 0 has, then meet: a guess, for planning.
GROUP_START_S = 30.0


def parallel_levers(
    profile: Profile, env: Environment
) -> tuple[list[Lever], list[tuple[str, str]]]:
    """Ulysses context parallelism at 2 and 4 ranks (`models[].parallel`), one GPU a rank:
    a latency tier, so the large image alone is the figure; the small point's images/s is
    the whole replica's, all its devices together. A lever is planned only where
    `torch.cuda.device_count()` has a GPU for each rank; the CPU smoke runs its ranks on CPU
    cores (gloo), which checks the flow and says nothing of a GPU's speed-up."""
    heads = transformer_config(profile.toy)["num_attention_heads"]
    chosen: list[Lever] = []
    skipped: list[tuple[str, str]] = []
    for ranks in ULYSSES_RANKS:
        # No optimizations: compile and the cache are refused with `parallel`.
        lever = Lever(f"ulysses_{ranks}", {}, GROUP_START_S, parallel={"ulysses_degree": ranks})
        if heads % ranks:
            reason = f"the model's {heads} attention heads do not split {ranks} ways"
            skipped.append((lever.name, reason))
        elif not profile.toy and env.gpus < ranks:
            reason = f"needs {ranks} GPUs, one a rank; the machine has {env.gpus}"
            skipped.append((lever.name, reason))
        else:
            chosen.append(lever)
    return chosen, skipped


def _need_torchao(env: Environment) -> str | None:
    return None if "torchao" in env.importable else "torchao is not importable"


def _cpu_only(profile: Profile, what: str) -> str | None:
    return f"CPU smoke: {what} the model takes minutes on a CPU" if profile.toy else None


def points(profile: Profile, lever: Lever) -> list[Point]:
    """The lever's points, cheapest and most telling first."""
    low, high = min(profile.concurrencies), max(profile.concurrencies)
    large, small = profile.large, profile.small
    if lever.scope == "large_alone":
        return [Point(large, low, 2)]
    if lever.scope == "key":
        return [Point(large, low, 2), Point(small, high, 1)]
    others = [c for c in profile.concurrencies if c != low]
    return [
        Point(large, low, 3),
        Point(small, low, 3),
        *(Point(small, c, 2) for c in reversed(others)),
        *(Point(large, c, 1) for c in others),
    ]


@dataclass
class Budget:
    """The time left, and the seconds per image measured so far (guesses until then)."""

    profile: Profile
    started: float = field(default_factory=time.monotonic)
    s_per_image: dict[str, float] = field(default_factory=dict)
    observed: set[str] = field(default_factory=set)
    start_s: float = 0.0

    def __post_init__(self) -> None:
        self.s_per_image = dict(self.profile.guess_s_per_image)
        self.start_s = self.profile.start_s

    def observe_start(self, lever: Lever, seconds: float) -> None:
        """A measured replica start, for the levers that add nothing to it."""
        if not lever.extra_start_s:
            self.start_s = seconds

    def observe(self, size: str, s_per_image: float) -> None:
        """A measured second per image alone at `size`; sizes not measured yet scale with it."""
        ratio = s_per_image / self.s_per_image[size]
        for other in self.s_per_image:
            if other not in self.observed and other != size:
                self.s_per_image[other] *= ratio
        self.s_per_image[size] = s_per_image
        self.observed.add(size)

    def left(self) -> float:
        return self.profile.budget_s - (time.monotonic() - self.started)

    def point_s(self, point: Point, warm_up: bool = False) -> float:
        return (point.images + warm_up) * self.s_per_image[point.size]

    def lever_s(self, lever: Lever) -> float:
        """What a lever costs: a start and its points (with one warm-up request a size)."""
        planned = points(self.profile, lever)
        sizes = {point.size for point in planned}
        return (
            self.start_s
            + lever.extra_start_s
            + sum(self.point_s(point) for point in planned)
            + sum(self.s_per_image[size] for size in sizes)
        )
