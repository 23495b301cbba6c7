"""Where the time of one pipeline call goes: encoding the prompts, denoising, decoding.

A pipeline call is one function from the outside; its phases are told apart from inside it.
The prompt encoding is timed by wrapping the view's `encode_prompt` (the pipeline calls it
through the instance attribute), the denoising loop is timed by the step callback, and what
follows the last step until the pixels are in hand is decoding (the VAE and post-processing).
The request logs and the metrics read the result.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CallTimes:
    """The phases of one finished pipeline call, in seconds."""

    # `time.perf_counter()` when the batch's run began: its jobs stopped waiting then.
    started: float
    generate_s: float
    text_encode_s: float
    denoise_s: float
    decode_s: float
    steps: int  # denoising steps completed


class CallTimer:
    """Times one pipeline call, from its creation until `finished`; used by one thread.

    `clock` is `time.perf_counter` but in tests (jobs' submit times come from it too).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self.started = clock()
        self._text_encode_s = 0.0
        # Denoising starts when the (last) prompt encoding ends; a pipeline that never calls
        # `encode_prompt` through the view counts it all as denoising.
        self._denoise_started = self.started
        self._last_step_end = self.started
        self._steps = 0

    def timed_encode_prompt(self, encode_prompt: Callable[..., Any]) -> Callable[..., Any]:
        """`encode_prompt`, adding its time to the prompt encoding."""

        @functools.wraps(encode_prompt)
        def timed(*args, **kwargs):
            encode_started = self._clock()
            try:
                return encode_prompt(*args, **kwargs)
            finally:
                self._denoise_started = self._clock()
                self._text_encode_s += self._denoise_started - encode_started

        return timed

    def step_ended(self, step: int) -> None:
        """Denoising step `step` (0-based, as the step callback gets it) has ended."""
        self._last_step_end = self._clock()
        self._steps = step + 1

    def finished(self) -> CallTimes:
        """The call's phases, with the call ending now."""
        finished = self._clock()
        return CallTimes(
            started=self.started,
            generate_s=finished - self.started,
            text_encode_s=self._text_encode_s,
            denoise_s=self._last_step_end - self._denoise_started,
            decode_s=finished - self._last_step_end,
            steps=self._steps,
        )
