"""On the real embedded engine: `usage` counts the prompts' tokens with the model's own
tokenizer (the pipeline's first), and the denoising steps its images ran."""

from __future__ import annotations

import pytest

from deployments.config.app_config import AppArgs
from deployments.config.model_config import BatchingConfig
from deployments.generator.model.pipelines import load_pipeline

from .engine_api import engine_client

MODEL = {"id": "tiny-sd3", "source": "embedded:tiny-sd3", "device": "cpu", "dtype": "float32"}
ARGS = AppArgs.model_validate({"models": [{**MODEL, "default_size": "32x32", "default_steps": 2}]})
# A prompt whose CLIP tokens are not its words or characters, and one past CLIP's 77 tokens.
PROMPTS = ["a lighthouse at dusk, oil on canvas", "an endless " + "very " * 40 + "long road"]


@pytest.fixture(scope="module")
def tokenizer():
    return load_pipeline(ARGS.models[0]).tokenizer


@pytest.fixture(scope="module")
def client():
    with engine_client(ARGS, BatchingConfig()) as (client, _backends):
        yield client


def tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "past-77"])
def test_text_tokens_are_the_tokenizers_count(client, tokenizer, prompt):
    body = {"prompt": prompt, "negative_prompt": "blurry, dark", "n": 2, "num_inference_steps": 3}
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    expected = tokens(tokenizer, prompt) + tokens(tokenizer, "blurry, dark")
    assert expected not in (len(prompt.split()) + 2, len(prompt) + len("blurry, dark"))
    assert usage["input_tokens_details"] == {"image_tokens": 0, "text_tokens": expected}
    assert usage["output_tokens"] == 2 * 3
    assert usage["total_tokens"] == expected + 6


def test_a_streamed_generation_counts_the_same(client, tokenizer):
    body = {"prompt": PROMPTS[0], "num_inference_steps": 2, "stream": True}
    response = client.post("/v1/images/generations", json=body)
    completed = [line for line in response.text.splitlines() if '"usage"' in line]
    assert len(completed) == 1
    assert f'"text_tokens":{tokens(tokenizer, PROMPTS[0])}' in completed[0].replace(" ", "")
