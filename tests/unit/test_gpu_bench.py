"""The GPU benchmark's arithmetic and its refusals, without a GPU: the FLOP count agrees with
torch's own counter, without CUDA the benchmark measures nothing and says so, and the
parallel levers are planned only where the machine has a GPU for each rank."""

from __future__ import annotations

import pytest
import torch

from bench.gpu import __main__ as gpu
from bench.gpu.flops import derivation, fraction_of_peak, transformer_flops
from bench.gpu.model import SD35_MEDIUM_TRANSFORMER, transformer_config
from bench.gpu.plan import (
    CPU_SMOKE,
    GPU,
    GROUP_START_S,
    Budget,
    Environment,
    levers,
    parallel_levers,
    points,
)
from bench.gpu.report import summary_lines
from bench.gpu.serve import app_args

# torch.utils.flop_counter.FlopCounterMode on SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
# built on the meta device, one forward at batch 2 (a CFG pair) of 128x128 latents and 333
# text tokens (diffusers 0.42.1, torch 2.13): 22,499,147,415,552 FLOPs.
SD35_MEDIUM_1024_FORWARD = 22_499_147_415_552 // 2

NO_GPU = Environment(
    cuda=False,
    capability=None,
    importable=frozenset({"torchao"}),
    applies_optimizations=False,
    gpus=0,
)


def h200s(gpus: int) -> Environment:
    """A machine of `gpus` H200s with everything the levers need importable."""
    return Environment(
        cuda=True,
        capability=(9, 0),
        importable=frozenset({"flash_attn", "torchao"}),
        applies_optimizations=True,
        gpus=gpus,
    )


def test_sd35_medium_flops_per_forward_match_torchs_count():
    flops = transformer_flops(SD35_MEDIUM_TRANSFORMER, 1024, 1024)
    assert (flops.image_tokens, flops.text_tokens) == (4096, 333)
    assert flops.per_forward == SD35_MEDIUM_1024_FORWARD


def test_flops_per_image_and_the_floor():
    total, lines = derivation(SD35_MEDIUM_TRANSFORMER, "1024x1024", 28, 790.0)
    assert total == SD35_MEDIUM_1024_FORWARD * 28 * 2  # 28 steps, two forwards each (CFG)
    assert 629e12 < total < 631e12
    assert any("0.7974 s/image" in line for line in lines)  # 630 TFLOP at 790 TFLOP/s
    # The every-weight-on-every-token estimate comes out about twice as high.
    quick = transformer_flops(SD35_MEDIUM_TRANSFORMER, 1024, 1024).quick_estimate * 56
    assert 1.2e15 < quick < 1.35e15
    assert fraction_of_peak(1.0, total, 790.0) == pytest.approx(total / 790e12)


@pytest.mark.parametrize(
    ("layers", "dual", "size", "text_tokens"), [(3, (0, 1), 128, 7), (2, (), 64, 5)]
)
def test_flops_match_torch_flop_counter_on_small_configs(layers, dual, size, text_tokens):
    from diffusers import SD3Transformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    config = {
        **SD35_MEDIUM_TRANSFORMER,
        "num_layers": layers,
        "dual_attention_layers": list(dual),
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "caption_projection_dim": 16,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 24,
        "pos_embed_max_size": 32,
    }
    latent = size // 8
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
        inputs = {
            "hidden_states": torch.randn(1, 16, latent, latent),
            "encoder_hidden_states": torch.randn(1, text_tokens, 32),
            "pooled_projections": torch.randn(1, 24),
            "timestep": torch.ones(1),
        }
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**inputs)
    expected = transformer_flops(config, size, size, text_tokens=text_tokens).per_forward
    assert counter.get_total_flops() == expected


def test_without_cuda_it_measures_nothing_and_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be built or started without a GPU")

    monkeypatch.setattr(gpu, "build_model", refuse)
    monkeypatch.setattr(gpu, "run_levers", refuse)
    assert gpu.main([]) == gpu.NO_GPU_EXIT == 2
    out = capsys.readouterr().out
    assert "No CUDA device" in out
    assert "Nothing was measured" in out
    assert "Exit status 2" in out
    assert "images/s" not in out and "TFLOP" not in out


def test_plan_only_needs_no_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--plan-only"]) == 0
    out = capsys.readouterr().out
    assert "629.976 TFLOP" in out
    assert "Time plan" in out and "assumed" in out


def test_levers_it_cannot_run_are_skipped_with_a_reason():
    chosen, skipped = levers(GPU, NO_GPU)
    # The loop is a batching setting, not an optimization: every checkout runs it.
    assert [lever.name for lever in chosen] == ["eager", "continuous"]
    reasons = dict(skipped)
    assert "compute capability" in reasons["float8_weight_only"]
    # The service refuses any backend but native for SD3 (its attention bypasses the
    # dispatcher): planned, the lever would only fail the replica's start.
    assert "dispatcher" in reasons["attention_flash"]
    assert "optimizations" in reasons["compile"]
    assert "optimizations" in reasons["continuous_compile"]
    assert "optimizations" in reasons["continuous_taylorseer"]
    assert "needs 2 GPUs" in reasons["ulysses_2"] and "has 0" in reasons["ulysses_2"]


def test_the_baseline_covers_both_sizes_at_every_concurrency():
    chosen, _ = levers(GPU, NO_GPU)
    covered = {(p.size, p.concurrency) for p in points(GPU, chosen[0])}
    assert covered == {(s, c) for s in ("1024x1024", "512x512") for c in (1, 4, 16)}


def test_a_measurement_rescales_the_sizes_not_measured_yet():
    budget = Budget(GPU)
    budget.observe("1024x1024", 4.0)  # twice the guess
    assert budget.s_per_image == {"1024x1024": 4.0, "512x512": 1.0}
    budget.observe("512x512", 0.3)
    assert budget.s_per_image == {"1024x1024": 4.0, "512x512": 0.3}


def test_app_args_serve_the_saved_model_with_the_lever(tmp_path):
    args = app_args(CPU_SMOKE, tmp_path, {"attention_backend": "native"})
    (model,) = args.models
    assert model.source == str(tmp_path)
    assert (model.device, model.dtype, model.default_size) == ("cpu", "float32", "64x64")
    assert model.optimizations.attention_backend == "native"
    assert model.deployment["num_replicas"] == 1
    assert "autoscaling_config" not in model.deployment
    assert args.auth.api_keys_env is None
    assert transformer_config(True)["num_layers"] == 2
    looped = app_args(CPU_SMOKE, tmp_path, {}, {"continuous": True}).models[0].batching
    # The loop on top of the GPU config's own batching, which it keeps.
    assert looped.continuous and looped.max_batch_images == 4


@pytest.mark.parametrize(
    ("gpus", "planned"),
    [(1, []), (2, ["ulysses_2"]), (3, ["ulysses_2"]), (4, ["ulysses_2", "ulysses_4"])],
)
def test_parallel_levers_are_planned_only_with_a_gpu_for_each_rank(gpus, planned):
    chosen, skipped = levers(GPU, h200s(gpus))
    names = [lever.name for lever in chosen]
    # Right after the baseline, which is their group of one.
    assert names[: 1 + len(planned)] == ["eager", *planned]
    reasons = dict(skipped)
    for ranks in (2, 4):
        name = f"ulysses_{ranks}"
        if name in planned:
            assert name not in reasons
        else:
            assert name not in names
            assert reasons[name] == f"needs {ranks} GPUs, one a rank; the machine has {gpus}"
    assert all(lever.ranks == 1 for lever in chosen if not lever.name.startswith("ulysses"))


def test_a_parallel_lever_is_ulysses_over_its_ranks_and_costs_a_group_start():
    (two, four), skipped = parallel_levers(GPU, h200s(8))
    assert skipped == []
    assert (two.parallel, two.ranks) == ({"ulysses_degree": 2}, 2)
    assert (four.parallel, four.ranks) == ({"ulysses_degree": 4}, 4)
    # Eager but for the split: compile and the cache are refused with `parallel`.
    assert two.optimizations == {} and two.batching == {}
    # The latency of a large image alone first, then the replica's images/s of small ones.
    assert [(p.size, p.concurrency) for p in points(GPU, four)] == [
        ("1024x1024", 1),
        ("512x512", 16),
    ]
    budget = Budget(GPU)
    plain = budget.lever_s(levers(GPU, h200s(1))[0][1])  # continuous: the same two points
    assert budget.lever_s(two) == pytest.approx(plain + GROUP_START_S)


def test_the_cpu_smoke_runs_two_ranks_on_cpu_cores():
    # The toy has 2 attention heads: Ulysses splits them 2 ways, not 4. No GPU is needed.
    chosen, skipped = parallel_levers(CPU_SMOKE, NO_GPU)
    assert [lever.name for lever in chosen] == ["ulysses_2"]
    assert dict(skipped) == {"ulysses_4": "the model's 2 attention heads do not split 4 ways"}


def test_app_args_carry_the_parallel_block_one_gpu_a_rank(tmp_path):
    args = app_args(GPU, tmp_path, {}, None, {"ulysses_degree": 4})
    (model,) = args.models
    assert model.parallel.ulysses_degree == 4
    assert model.parallel.world_size == 4
    assert model.deployment["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    assert not model.optimizations.compile  # the GPU config's compile, replaced
    options = model.deployment_options()
    assert options["placement_group_bundles"] == [{"CPU": 4.0, "GPU": 1.0}] * 4
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert app_args(GPU, tmp_path, {}).models[0].parallel is None


def test_the_summary_names_the_ranks_and_the_levers_skipped_for_lack_of_gpus():
    def record(lever: str, ranks: int, p50_s: float) -> dict:
        row = {"size": "1024x1024", "concurrency": 1, "requests": 2, "p50_s": p50_s}
        row.update(images_per_s=1 / p50_s, p95_s=p50_s, tflop_per_s=0.0, statuses={"200": 2})
        row.update(fraction_of_peak=0.5, peak_gpu_gib=20.0)
        return {"lever": lever, "ranks": ranks, "status": "measured", "points": [row]}

    results = {
        "large": "1024x1024",
        "profile": {"device": "cuda"},
        "floor_s_per_image": 0.8,
        "peak_tflops": 790.0,
        "levers": [
            {**record("eager", 1, 2.0), "start_s": 40.0},
            {**record("ulysses_2", 2, 1.25), "start_s": 70.0},
        ],
        "skipped_levers": [("ulysses_4", "needs 4 GPUs, one a rank; the machine has 2")],
    }
    text = "\n".join(summary_lines(results))
    assert "ulysses_2            1.250 s (64.0% of the floor, 1.60x eager, 2 GPUs)" in text
    assert "skipped lever ulysses_4: needs 4 GPUs, one a rank; the machine has 2" in text
