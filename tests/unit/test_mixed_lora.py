"""Per-row LoRA adapters in one forward (`mixed_lora.py`) against peft's own forward with
each row's adapters set on the layer, on a real peft LoRA layer."""

from __future__ import annotations

import threading

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model

from deployments.generator.adapters.mixed_lora import install, routed


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.fixture
def model() -> Tiny:
    torch.manual_seed(0)
    model = Tiny()
    for name, alpha in (("ink", 4), ("paper", 8)):
        config = LoraConfig(r=4, lora_alpha=alpha, target_modules=["proj"], init_lora_weights=False)
        model = inject_adapter_in_model(config, model, adapter_name=name)
    install(model)
    return model


def peft_alone(model: Tiny, x: torch.Tensor, adapters: tuple) -> torch.Tensor:
    """peft's forward for one row with `adapters` active at their scales."""
    layer = model.proj
    names = [name for name, _ in adapters]
    if not names:
        return layer.base_layer(x)
    layer.set_adapter(names)
    for name, scale in adapters:
        layer.set_scale(name, scale)
    return model(x)


ROWS = [(), (("ink", 1.0),), (("paper", 0.5),), (("ink", 0.3), ("paper", 1.2)), (("ink", 2.0),)]


def test_each_row_gets_its_own_adapters_and_scales(model):
    x = torch.randn(len(ROWS), 3, 8)
    with routed(ROWS, torch.device("cpu")):
        mixed = model(x)
    for row, adapters in enumerate(ROWS):
        torch.testing.assert_close(mixed[row], peft_alone(model, x[row : row + 1], adapters)[0])


def test_outside_a_routing_and_in_other_threads_the_layer_is_peft_s_own(model):
    x = torch.randn(2, 8)
    expected = peft_alone(model, x, (("paper", 0.7),))  # sets the layer for paper at 0.7
    seen = {}

    def other_thread() -> None:
        seen["other"] = model(x)

    with routed([(), ()], torch.device("cpu")):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        torch.testing.assert_close(model(x), model.proj.base_layer(x))  # routed: base rows
    torch.testing.assert_close(seen["other"], expected)
    torch.testing.assert_close(model(x), expected)


def test_installing_twice_wraps_once(model):
    assert install(model) == 0


def test_an_adapter_loaded_again_under_its_name_is_computed_from_its_new_weights(model):
    """The stacked weights are the layer's current adapters: one deleted and loaded again
    (new weights, same name, as an evicted adapter comes back) is not served from before."""
    x = torch.randn(2, 3, 8)
    rows = [(("ink", 1.0),), (("paper", 1.0),)]
    with routed(rows, torch.device("cpu")):
        before = model(x)
    model.proj.delete_adapter("ink")
    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)
    inject_adapter_in_model(config, model, adapter_name="ink")
    install(model)
    with routed(rows, torch.device("cpu")):
        after = model(x)
    torch.testing.assert_close(after[0], peft_alone(model, x[:1], rows[0])[0])
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
