"""The text tokens of a job's usage: its prompt and negative prompt by the model's tokenizer.

"The model's tokenizer" is the pipeline's first one (`pipeline.tokenizer`: CLIP's, in SD3,
SDXL and FLUX alike), counting the text alone: no start or end tokens, no padding and no
truncation (a prompt longer than the text encoder takes still counts every token). A
pipeline without one counts 0.

The count runs on a copy of the tokenizer: the pipeline's own is used by the worker threads
under the encode lock (`pipelines.py`), and fast tokenizers fail ("Already borrowed") when two
threads use one at once, and counting must not wait for that lock.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import threading
from typing import Any

from deployments.jobs import GeneratedImages, GenerationJob


class PromptTokens:
    def __init__(self, pipeline: Any) -> None:
        tokenizer = getattr(pipeline, "tokenizer", None)
        self._tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self._lock = threading.Lock()

    def count(self, job: GenerationJob) -> int:
        if self._tokenizer is None:
            return 0
        texts = [job.prompt] + ([job.negative_prompt] if job.negative_prompt else [])
        with self._lock:
            encoded = self._tokenizer(texts, add_special_tokens=False, truncation=False)
        return sum(len(ids) for ids in encoded["input_ids"])

    async def counted(self, job: GenerationJob, generated: GeneratedImages) -> GeneratedImages:
        """`generated` with the job's text tokens, counted off the event loop (a slow
        tokenizer takes milliseconds over a long prompt)."""
        text_tokens = await asyncio.to_thread(self.count, job)
        return dataclasses.replace(generated, text_tokens=text_tokens)
