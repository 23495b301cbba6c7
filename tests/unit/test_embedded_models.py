"""The embedded models are built the same every time, every weight drawn from the seed or set
to a fixed value, and each fits what its pipeline asks of it by default (FLUX.2 Klein's
the most: the layers it reads of its text encoder, its batch-norm statistics, its chat
template)."""

from __future__ import annotations

import inspect

import pytest
import torch

from deployments.generator.model.embedded import EMBEDDED_MODELS, build_embedded_pipeline


def weights_of(pipeline) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of every module of `pipeline`, by component and name."""
    return {
        f"{component}.{name}": tensor
        for component, module in pipeline.components.items()
        if isinstance(module, torch.nn.Module)
        for name, tensor in module.state_dict().items()
    }


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_no_weight_is_left_as_torch_empty_left_it(name, monkeypatch):
    """A weight a library allocates with `torch.empty` and never initialises holds whatever
    the memory held (Z-Image's padding tokens did): two builds of one recipe would differ.
    Here such memory is NaN, which no weight may still be after the build."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        if tensor.is_floating_point() and tensor.device.type != "meta":
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", nan_filled)
    pipeline = build_embedded_pipeline(name)
    monkeypatch.undo()
    unset = [key for key, tensor in weights_of(pipeline).items() if tensor.isnan().any()]
    assert not unset, f"{name}: never initialised: {unset}"


@pytest.mark.parametrize("name", EMBEDDED_MODELS)
def test_two_builds_are_the_same(name):
    first, second = (
        weights_of(build_embedded_pipeline(name)),
        weights_of(build_embedded_pipeline(name)),
    )
    assert first.keys() == second.keys()
    assert [key for key in first if not torch.equal(first[key], second[key])] == []


def test_the_tiny_klein_fits_what_its_pipeline_asks_by_default():
    pipeline = build_embedded_pipeline("tiny-flux2-klein")
    parameters = inspect.signature(type(pipeline).__call__).parameters
    layers = parameters["text_encoder_out_layers"].default
    encoder = pipeline.text_encoder.config
    # `hidden_states[k]` for each layer read (index 0 is the embeddings), not the last
    # one's, which the model's final norm has changed.
    assert encoder.num_hidden_layers > max(layers)
    # The read layers' hidden states, side by side, are the transformer's text input.
    assert pipeline.transformer.config.joint_attention_dim == len(layers) * encoder.hidden_size
    # Not step-distilled: a guidance scale above 1 runs classifier-free guidance.
    assert pipeline.config.is_distilled is False
    assert not pipeline.transformer.config.guidance_embeds
    # Latents are normalised by statistics that are not the identity's, so decoding and
    # previews depend on undoing them.
    norm = pipeline.vae.bn
    assert norm.num_features == 4 * pipeline.vae.config.latent_channels
    assert not torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
    assert not torch.equal(norm.running_var, torch.ones_like(norm.running_var))
    # Its pipeline renders a prompt as a user's turn with thinking off.
    turn = pipeline.tokenizer.apply_chat_template(
        [{"role": "user", "content": "a lighthouse"}],
        tokenize=False,
        add_generation_prompt=True,
        enable_thinking=False,
    )
    assert turn == (
        "<|im_start|>user\na lighthouse<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    assert pipeline.tokenizer.tokenize("<|im_start|>") == ["<|im_start|>"]
