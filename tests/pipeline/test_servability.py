"""A replica refuses to start with a pipeline that cannot serve text-to-image requests,
naming the config key to change (it would otherwise load and answer every request with an
error): an unconditional pipeline, an edit class named as the model's class, and a class
that does not match the checkpoint."""

from __future__ import annotations

import pytest
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from deployments.config.model_config import ModelConfig
from deployments.generator.model.pipelines import load_pipeline
from deployments.generator.model.servability import NotServable


def tiny_unconditional(directory) -> str:
    unet = UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(directory)
    return str(directory)


def test_an_unconditional_pipeline_is_refused_naming_the_source(tmp_path):
    source = tiny_unconditional(tmp_path / "ddpm")
    with pytest.raises(NotServable, match=r"models\[\]\.source .*DDPMPipeline.*takes no prompt"):
        load_pipeline(ModelConfig(id="noise", source=source, device="cpu"))


@pytest.mark.parametrize(
    "source, edit_class, text_to_image_class",
    [
        ("embedded:tiny-sd3", "StableDiffusion3Img2ImgPipeline", "StableDiffusion3Pipeline"),
        ("embedded:tiny-sd3", "StableDiffusion3InpaintPipeline", "StableDiffusion3Pipeline"),
        ("embedded:tiny-flux", "FluxImg2ImgPipeline", "FluxPipeline"),
    ],
)
def test_an_edit_class_as_the_models_class_is_refused_naming_the_key(
    source, edit_class, text_to_image_class
):
    model = ModelConfig(id="m", source=source, device="cpu", pipeline_class=edit_class)
    with pytest.raises(NotServable) as refused:
        load_pipeline(model)
    message = str(refused.value)
    assert f"models[].pipeline_class {edit_class} needs an input image" in message
    assert f"name {text_to_image_class}" in message


def test_a_class_of_another_family_is_refused_naming_the_key():
    model = ModelConfig(
        id="m", source="embedded:tiny-flux", device="cpu", pipeline_class="StableDiffusion3Pipeline"
    )
    with pytest.raises(
        NotServable,
        match=r"models\[\]\.pipeline_class StableDiffusion3Pipeline "
        r"does not match the checkpoint at models\[\]\.source 'embedded:tiny-flux'",
    ):
        load_pipeline(model)


@pytest.mark.parametrize(
    "source, pipeline_class",
    [
        ("embedded:tiny-sd3", None),
        ("embedded:tiny-sd3", "StableDiffusion3Pipeline"),
        ("embedded:tiny-flux", None),
        ("embedded:tiny-sdxl", None),
    ],
)
def test_text_to_image_pipelines_load(source, pipeline_class):
    model = ModelConfig(id="m", source=source, device="cpu", pipeline_class=pipeline_class)
    assert load_pipeline(model) is not None
