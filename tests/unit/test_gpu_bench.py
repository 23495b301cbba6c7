"""The GPU benchmark's arithmetic and its refusals, without a GPU: the FLOP count agrees with
torch's own counter, and without CUDA the benchmark measures nothing and says so."""

from __future__ import annotations

import pytest
import torch

from bench.gpu import __main__ as gpu
from bench.gpu.flops import derivation, fraction_of_peak, transformer_flops
from bench.gpu.model import SD35_MEDIUM_TRANSFORMER, transformer_config
from bench.gpu.plan import CPU_SMOKE, GPU, Budget, Environment, levers, points
from bench.gpu.serve import app_args

# torch.utils.flop_counter.FlopCounterMode on SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
# built on the meta device, one forward at batch 2 (a CFG pair) of 128x128 latents and 333
# text tokens (diffusers 0.42.1, torch 2.13): 22,499,147,415,552 FLOPs.
SD35_MEDIUM_1024_FORWARD = 22_499_147_415_552 // 2

NO_GPU = Environment(
    cuda=False, capability=None, importable=frozenset({"torchao"}), applies_optimizations=False
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
