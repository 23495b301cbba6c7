"""How a batch of jobs runs as pipeline calls, and what a failed call becomes.

A batch is one pipeline call, except a job whose images exceed the pixel budget: it runs in
several calls over chunks of its seeds (`BatchRun.planned_calls`), so that a request of many
large images needs only the memory of one call.

A pipeline call fails as a whole: one bad prompt (a lone UTF-16 surrogate, which the
tokenizer rejects) failed every job of its batch. A call that fails for a reason of its own
therefore runs again in smaller calls (`split_call`): one job a call, so that a bad job fails
alone with its own exception and its neighbours get exactly the images they would have had;
after running out of memory, down to single images, and a single image that still does not
fit fails its job with `GenerationOutOfMemory`. Neither changes a pixel: each image has its
own generator, seeded from its own seed (`deployments/generator/calls/call_arguments.py`).
What fails every job at once (cancellation, a broken device) is the call runner's to raise
(`call_runner.py`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from deployments.generator.calls.batching import QueuedJob
from deployments.generator.calls.call_timing import CallTimes
from deployments.jobs import GeneratedImages, GenerationJob, GenerationOutOfMemory

logger = logging.getLogger("ray.serve")


def is_out_of_memory(error: BaseException) -> bool:
    # The caching allocator raises torch.OutOfMemoryError (torch.cuda's is the same class);
    # other paths (a CUDA library's workspace, another backend) say so in a RuntimeError.
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error)


@dataclass(frozen=True, eq=False)
class CallPart:
    """Some of a queued job's images in one pipeline call: `job` is the job cut to them."""

    index: int  # the job's place in its batch
    queued: QueuedJob
    first: int  # the part's first image within its job (its first seed's index)
    job: GenerationJob


def _part(index: int, queued: QueuedJob, first: int, count: int) -> CallPart:
    seeds = queued.job.seeds[first : first + count]
    return CallPart(index=index, queued=queued, first=first, job=replace(queued.job, seeds=seeds))


def plan_calls(queued: list[QueuedJob], capacity: int) -> list[list[CallPart]]:
    """The pipeline calls that run a batch: its jobs in order, at most `capacity` images a
    call, a job cut into chunks of its seeds where it does not fit.

    A batch from the queue fits one call, unless it is one job with more images than fit.
    """
    calls: list[list[CallPart]] = [[]]
    room = capacity
    for index, entry in enumerate(queued):
        first = 0
        while first < entry.job.num_images:
            if room == 0:
                calls.append([])
                room = capacity
            count = min(room, entry.job.num_images - first)
            calls[-1].append(_part(index, entry, first, count))
            first += count
            room -= count
    return calls


def split_call(parts: list[CallPart], out_of_memory: bool) -> list[list[CallPart]]:
    """Smaller calls to run a failed call's images again; none when the failure is its job's.

    A call of several jobs runs again one job a call. A single job's call is split only when
    it ran out of memory: in halves, down to single images.
    """
    if len(parts) > 1:  # a job has at most one part in a call
        return [[part] for part in parts]
    (part,) = parts
    count = part.job.num_images
    if not out_of_memory or count == 1:
        return []
    half = (count + 1) // 2
    return [
        [_part(part.index, part.queued, part.first, half)],
        [_part(part.index, part.queued, part.first + half, count - half)],
    ]


@dataclass(eq=False)
class _JobRun:
    """A job's way through its batch's calls: its images so far, by part, or its failure."""

    queued: QueuedJob
    # (first image in the job, the images) of each part made so far.
    pieces: list[tuple[int, list[np.ndarray]]] = field(default_factory=list)
    calls: list[CallTimes] = field(default_factory=list)  # the calls that made them
    batch_images: int = 0  # images in the largest of those calls
    failure: Exception | None = None

    def result(self, started: float) -> GeneratedImages | Exception:
        """The job's images in seed order, with the account of the calls that made them;
        `generate_s` runs from its batch's start to its last image, so it includes any
        failed call that was split."""
        if self.failure is not None:
            return self.failure
        if self.queued.abandoned.is_set():  # nobody waits for it; its images may be partial
            return RuntimeError("the job's caller has gone")
        ordered = sorted(self.pieces, key=lambda piece: piece[0])
        return GeneratedImages(
            images=[image for _, images in ordered for image in images],
            seeds=self.queued.job.seeds,
            generate_s=max(t.started + t.generate_s for t in self.calls) - started,
            batch_images=self.batch_images,
            queue_s=started - self.queued.submitted,
            text_encode_s=sum(t.text_encode_s for t in self.calls),
            denoise_s=sum(t.denoise_s for t in self.calls),
            decode_s=sum(t.decode_s for t in self.calls),
        )


class BatchRun:
    """A batch's jobs on their way through its pipeline calls; used by one worker thread.

    `started` is `time.perf_counter()` when the batch's run began: its jobs stopped waiting.
    `capacity` is the most images one call may hold (at least 1).
    """

    def __init__(self, queued: list[QueuedJob], capacity: int, started: float) -> None:
        self._queued = queued
        self._capacity = capacity
        self._started = started
        self._jobs = [_JobRun(entry) for entry in queued]

    def planned_calls(self) -> list[list[CallPart]]:
        return plan_calls(self._queued, self._capacity)

    def unfailed(self, parts: list[CallPart]) -> list[CallPart]:
        """The parts whose jobs have neither failed nor been abandoned by their callers: the
        rest of a failed job never runs, and a rerun after a split skips jobs whose clients
        have gone (they would only delay the others)."""
        return [
            part
            for part in parts
            if self._jobs[part.index].failure is None and not part.queued.abandoned.is_set()
        ]

    def succeeded(self, parts: list[CallPart], pixels: list[np.ndarray], times: CallTimes) -> None:
        """Records a call's images (in part order) with the account of the call."""
        offset = 0
        for part in parts:
            job = self._jobs[part.index]
            job.pieces.append((part.first, pixels[offset : offset + part.job.num_images]))
            job.calls.append(times)
            job.batch_images = max(job.batch_images, len(pixels))
            offset += part.job.num_images

    def failed(self, parts: list[CallPart], error: Exception) -> list[list[CallPart]]:
        """The smaller calls that run a failed call's images again; or none, with its job's
        failure recorded: its own exception, or `GenerationOutOfMemory`."""
        out_of_memory = is_out_of_memory(error)
        smaller = split_call(parts, out_of_memory)
        if smaller:
            logger.warning(
                "a pipeline call for requests %s failed (%s: %s); running it again as %d calls",
                [part.job.request_id for part in parts],
                type(error).__name__,
                error,
                len(smaller),
            )
        elif out_of_memory:
            job = parts[0].job
            # A new exception, not the original: that one's traceback holds the failed call's
            # tensors, and it would keep them while the batch's other calls run.
            self._jobs[parts[0].index].failure = GenerationOutOfMemory(
                f"one {job.size} image ran out of device memory, even alone in its call"
            )
        else:
            # The job fails with its own exception, logged here with its traceback and kept
            # without it: the traceback's frames hold the failed call's tensors, which the
            # batch's other calls need.
            logger.warning(
                "request %s failed alone in its call", parts[0].job.request_id, exc_info=error
            )
            self._jobs[parts[0].index].failure = error.with_traceback(None)
        return smaller

    def results(self) -> list[GeneratedImages | Exception]:
        """Each job's images or the exception it fails with, in job order."""
        return [job.result(self._started) for job in self._jobs]
