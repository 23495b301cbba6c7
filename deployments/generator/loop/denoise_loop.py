"""Step-level continuous batching: one denoising loop over the images in flight.

A `Lane` is one worker thread's loop (the replica runs `worker_threads` of them). Its images
are grouped by size; each turn of the loop, for every size it holds:
1. jobs that arrived join at the step boundary, most urgent first, as many images as the
   group's budget allows
   (`BatchingConfig.images_per_batch`: `max_batch_images` and `max_batch_pixels`): their
   prompts are encoded in one text-encoder call, each image gets its latents from its own
   seed and its own scheduler for its own steps (`families/`);
2. images whose callers have gone (cancelled, timed out) leave (waiting jobs that can no
   longer finish by their deadline fail instead of joining);
3. one denoising step runs over all of the group's images, in one transformer forward, each
   at its own timestep with its own guidance and adapters (`mixed_lora.py`);
4. images that took their last step leave: decoded together in one VAE call, and each job
   whose images are all done is answered.
A job thus starts at the next step boundary instead of waiting for a batch to end, and a
short job leaves while long ones go on. A lane with nothing left ends; a lane yields its
thread at a step boundary, once its in-flight images are done, when request-level work (edits,
and what the loop does not take) waits for a thread, so neither path starves the other.

Failures stay with their job: a step that runs out of memory runs its forward over halves of
its images, down to one image; a failed encode or step runs again one job at a time, and the
job that fails alone leaves with its own exception (out of memory, its one image not
fitting: `GenerationOutOfMemory`); the others go on from the same state (a step only
advances images after its forwards succeeded). A device failure fails every job of the lane
and the replica (`on_broken`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable

import torch

from deployments.generator.calls.batching import QueuedJob, adapter_key
from deployments.generator.calls.call_plan import is_out_of_memory
from deployments.generator.loop import caches
from deployments.generator.loop.class_gate import ClassGate
from deployments.generator.loop.families import FlowFamily, ImageState
from deployments.generator.loop.loop_adapters import LoopAdapters
from deployments.generator.loop.loop_jobs import LaneHooks, LoopJob, Size
from deployments.generator.loop.row_buckets import padded
from deployments.generator.model.components import find_denoiser, to_uint8
from deployments.generator.progress.previews import JobReporter, LatentPreviewer
from deployments.jobs import GeneratedImages, ReplicaBroken

logger = logging.getLogger("ray.serve")


class Lane:
    """One loop over the images of its jobs; `run` is a worker thread's body (see above)."""

    def __init__(
        self,
        family: FlowFamily,
        adapters: LoopAdapters | None,
        previewer: LatentPreviewer | None,
        hooks: LaneHooks,
        gate: ClassGate | None = None,
        pad_rows: bool = False,
    ) -> None:
        """`gate`: with `batching.preempt_lower_classes`, which class steps now across the
        replica's lanes (`class_gate.py`); None: every image in flight steps. `pad_rows`:
        each forward's rows rounded up to a bucket, for a compiled denoiser
        (`row_buckets.py`)."""
        self._family = family
        self._pad_rows = pad_rows
        # The model's cache decides per image in the loop (`caches/`): its forwards say
        # which image each row is.
        self._cached = caches.has_per_image_caches(find_denoiser(getattr(family, "view", None)))
        self._gate = gate
        self._previewer = previewer
        self._adapters = adapters
        self._hooks = hooks
        self._lock = threading.Lock()  # guards `_inbox`, `_held` and `running`
        self._inbox: deque[LoopJob] = deque()
        # Every job not answered or dropped yet, wherever it is (inbox, joining, a group,
        # decoding): what a lane that fails must answer.
        self._held: set[LoopJob] = set()
        self._groups: dict[Size, list[LoopJob]] = {}
        self.running = False  # a thread runs (or is about to run) `run`
        self.images = 0  # images held, waiting and in flight (for picking a lane)

    def add(self, job: LoopJob) -> bool:
        """Queue a job for the next step boundary; True if the caller must start `run`."""
        with self._lock:
            self._inbox.append(job)
            self._held.add(job)
            self.images += job.job.num_images
            start = not self.running
            self.running = True
        return start

    def held(self) -> list[QueuedJob]:
        """The jobs the lane holds (waiting, in flight or decoding), as submitted."""
        with self._lock:
            return [job.queued for job in self._held]

    def run(self) -> bool:
        """The loop, until the lane holds nothing (False) or yields its thread to waiting
        request-level work with jobs still queued (True: run it again later)."""
        restarted = True  # a (re)started lane admits once, even with others waiting
        try:
            while True:
                draining = not restarted and self._hooks.others_waiting()
                restarted = False
                if draining:
                    self._drop_abandoned_arrivals()
                else:
                    self._admit()
                self._publish()
                sizes = [size for size, jobs in self._groups.items() if jobs]
                stepped = [self._turn(size) for size in sizes]
                self._publish_adapters()  # finished images free their adapters' slots
                if any(self._groups.values()):
                    if self._gate is not None and not any(stepped):
                        if draining:  # paused: the thread goes to request-level work
                            return True
                        self._gate.pause()  # a higher class steps in another lane
                    continue
                with self._lock:
                    if not self._inbox or draining:
                        self.running = bool(self._inbox)
                        return self.running
                if self._adapters is not None:  # its jobs wait for other lanes' slots
                    self._adapters.wait(timeout_s=0.05)
        except BaseException as error:
            # A broken device (nothing here can run again), or a fault of the loop itself:
            # every job it holds fails, none is left waiting.
            if self._hooks.broken(error):
                error = ReplicaBroken(f"the device failed: {type(error).__name__}")
            else:
                logger.exception("the continuous loop failed")
            if self._adapters is not None:  # before another thread may run the lane again
                self._adapters.publish(self, ())
                self._adapters.unclaim(self)
            self._fail_everything(error)
            raise
        finally:  # ended, failed, or yielded with only paused images: none of it steps now
            if self._gate is not None:
                self._gate.publish(self, None)

    def _turn(self, size: Size) -> bool:
        """One step of the size's group (of its images that may step now); True if it ran."""
        jobs = self._groups[size]
        self._leave_abandoned(jobs)
        stepping = self._stepping(jobs)
        if not stepping:
            return False
        self._step(stepping)
        self._finish([job for job in stepping if job in jobs and all(i.done for i in job.images)])
        return True

    def _stepping(self, jobs: list[LoopJob]) -> list[LoopJob]:
        """The jobs whose images step now: all of them, or with a gate those of the most
        urgent class in flight in any lane (the others wait at the step boundary, their
        latents and schedulers kept), most urgent first within one step's budget (classes
        that aged to the top together may hold more than one budget in the group)."""
        if self._gate is None or not jobs:
            return list(jobs)
        top = self._gate.top()
        now = time.time()
        ranked = [job for job in jobs if top is None or self._rank(job, now) <= top]
        ranked.sort(key=lambda job: job.job.schedule.urgency(now))
        budget = self._hooks.capacity(*jobs[0].size)
        stepping: list[LoopJob] = []
        for job in ranked:
            if stepping and sum(len(j.images) for j in stepping) + len(job.images) > budget:
                break
            stepping.append(job)
        return stepping

    @staticmethod
    def _rank(job: LoopJob, now: float) -> int:
        return job.job.schedule.effective_rank(now)

    def _publish(self) -> None:
        """Tell the gate the most urgent class this lane holds in flight."""
        if self._gate is None:
            return
        now = time.time()
        ranks = [
            self._rank(job, now) for jobs in self._groups.values() for job in jobs if not job.gone
        ]
        self._gate.publish(self, min(ranks, default=None))

    def _admit(self) -> None:
        """Jobs from the inbox join their size's group while its budget has room, most
        urgent first (higher class after aging, then earlier deadline, then arrival:
        `scheduling/job_schedule.py`): a job that does not fit yet keeps its place, and none
        of its size passes it (a request of many images is not starved by a stream of
        single ones); those of other sizes may still join."""
        with self._lock:
            arrived = list(self._inbox)
        if self._adapters is not None:
            self._adapters.unclaim(self)
        refused_adapters = False  # after one refusal, no job here takes a new adapter
        now = time.time()
        arrived.sort(key=lambda job: job.job.schedule.urgency(now))  # stable: arrival order
        joining: list[LoopJob] = []
        waiting: set[Size] = set()  # sizes whose first job in line does not fit yet
        for job in arrived:
            if job.gone:
                self._drop(job)
                continue
            room = self._hooks.capacity(*job.size) - self._sharing(job, joining, now)
            if job.size in waiting or job.job.num_images > room:
                waiting.add(job.size)
                continue
            if job.job.adapters and (refused_adapters or not self._adapter_room(job, joining)):
                refused_adapters = True  # until images in flight free a slot
                waiting.add(job.size)
                continue
            # Checked as it would join, not every step while it waits (a hot path when
            # hundreds wait): one that can no longer finish would be cancelled unread.
            late = self._hooks.late(job.job)
            if late is not None:
                self._drop(job)
                job.deliver(late)
                continue
            joining.append(job)
        if not joining:
            return
        with self._lock:
            for job in joining:
                self._inbox.remove(job)
        for job in self._started(joining):
            self._groups.setdefault(job.size, []).append(job)
        self._publish_adapters()

    def _sharing(self, job: LoopJob, joining: list[LoopJob], now: float) -> int:
        """Images of the job's size that would step with it: its group's and those joining
        before it; with a gate, only those of its class or a more urgent one (the others
        wait while it steps, so a higher class joins a group full of lower ones)."""
        rank = self._rank(job, now)
        return sum(
            other.job.num_images
            for other in [*self._groups.get(job.size, ()), *joining]
            if other.size == job.size and (self._gate is None or self._rank(other, now) <= rank)
        )

    def _started(self, jobs: list[LoopJob]) -> list[LoopJob]:
        """The jobs' images made (prompts encoded in one call, latents and schedulers);
        those that cannot start fail alone."""
        if self._adapters is not None:
            in_use = self._in_use() | _adapter_ids(jobs)  # a load keeps them all
            jobs = [job for job in jobs if self._staged(job, in_use)]
        self._together_or_alone(jobs, self._encode, self._failed_start)
        return [job for job in jobs if job.images]

    def _together_or_alone(
        self,
        jobs: list[LoopJob],
        action: Callable[[list[LoopJob]], None],
        failed: Callable[[LoopJob, Exception], None],
    ) -> None:
        """`action(jobs)`; if it fails for a reason of its own, `action([job])` for each
        job, and `failed(job, error)` for each that fails alone: a bad job fails only
        itself. A device failure is raised (it fails the lane)."""
        try:
            action(jobs)
            return
        except Exception as error:
            if self._hooks.broken(error):
                raise
            if len(jobs) == 1:
                failed(jobs[0], error)
                return
            logger.warning("the loop's %s failed (%s); each job alone", action.__name__, error)
        for job in list(jobs):
            try:
                action([job])
            except Exception as error:
                if self._hooks.broken(error):
                    raise
                failed(job, error)

    def _staged(self, job: LoopJob, in_use: set[str]) -> bool:
        try:
            self._adapters.load(self, adapter_key(job.job.adapters), in_use)
            return True
        except Exception as error:
            if self._hooks.broken(error):
                raise
            self._failed_start(job, error)
            return False

    def _in_use(self) -> set[str]:
        return _adapter_ids(job for jobs in self._groups.values() for job in jobs)

    def _publish_adapters(self) -> None:
        """Tell the replica's other lanes which adapters this lane's images use now."""
        if self._adapters is not None:
            self._adapters.publish(self, self._in_use())

    def _adapter_room(self, job: LoopJob, joining: list[LoopJob]) -> bool:
        """Whether the job's adapters fit the slots beside what is in flight and joining."""
        if self._adapters is None:
            return True
        in_use = self._in_use() | _adapter_ids(joining)
        return self._adapters.reserve(self, in_use, _adapter_ids([job]))

    def _failed_start(self, job: LoopJob, error: Exception) -> None:
        job.images.clear()
        self._answer(job, job.failure(error))

    def _encode(self, jobs: list[LoopJob]) -> None:
        started = time.perf_counter()
        family = self._family
        images = [(job, seed) for job in jobs for seed in job.job.seeds]
        gate = self._adapters.encoding() if self._adapters else contextlib.nullcontext()
        with torch.no_grad(), gate:
            prompts = family.encode(
                [job.job.prompt for job, _ in images],
                [job.job.negative_prompt for job, _ in images],
                [family.guided(job.job.guidance_scale) for job, _ in images],
            )
            states = [
                family.start(
                    prompt, job.job.width, job.job.height, job.job.num_inference_steps,
                    job.job.guidance_scale, seed,
                )
                for (job, seed), prompt in zip(images, prompts, strict=True)
            ]  # fmt: skip
        seconds = time.perf_counter() - started
        for (job, _), state in zip(images, states, strict=True):
            state.adapters = adapter_key(job.job.adapters)
            job.images.append(state)
        for job in jobs:
            job.joined = started
            job.text_encode_s = seconds
            job.reporter = JobReporter(job.queued.sink, job.job, family.spatial, self._previewer)

    def _step(self, jobs: list[LoopJob]) -> None:
        """One denoising step over the group; on a failure, each job's step alone. What
        a step tells (the engine's counters, streams) comes after, once per step."""
        stepped = list(jobs)
        self._together_or_alone(jobs, self._step_jobs, self._fail_in_loop)
        # Those that did not fail (a failed job has left its group).
        stepped = [job for job in stepped if job in self._groups.get(job.size, ())]
        if not stepped:
            return
        self._hooks.step_done(stepped, sum(len(job.images) for job in stepped))
        for job in stepped:
            try:
                job.reporter.step_done(job.images)
            except Exception:  # its stream's reader has gone: the images go on
                logger.warning("request %s: sending progress failed", job.job.request_id)

    def _step_jobs(self, jobs: list[LoopJob]) -> None:
        started = time.perf_counter()
        images = [image for job in jobs for image in job.images]
        with torch.no_grad():
            noise = self._forward_in_parts(images, jobs[0].size)
            for image, prediction in zip(images, noise, strict=True):
                self._family.advance(image, prediction)
        seconds = time.perf_counter() - started
        for job in jobs:
            job.denoise_s += seconds
            job.largest_step = max(job.largest_step, len(images))

    def _forward_in_parts(self, images: list[ImageState], size: Size) -> list[torch.Tensor]:
        """Each image's noise for its step: one forward over them all, or, where that runs
        out of memory, forwards over halves of them, down to one image (whose rows, its
        unconditional one too, stay together), as the request-level path splits a call.
        No image advances until every forward has run."""
        try:
            return self._forward(images, size)
        except Exception as error:
            if len(images) == 1 or not is_out_of_memory(error):
                raise
        # Only past the `except` block is the failed forward's memory freed (its traceback
        # holds the tensors): the halves need it.
        half = len(images) // 2
        return self._forward_in_parts(images[:half], size) + self._forward_in_parts(
            images[half:], size
        )

    def _forward(self, images: list[ImageState], size: Size) -> list[torch.Tensor]:
        """One forward over the images, its rows padded up to a bucket where `pad_rows`."""
        stepping = images
        if self._pad_rows:
            stepping = padded(self._family, images, self._hooks.capacity(*size))
        rows = self._family.rows(stepping)
        cached = caches.rows([row.caches for row in rows]) if self._cached else None
        with cached or contextlib.nullcontext():
            if self._adapters is None:
                noise = self._family.forward(stepping)
            else:
                noise = self._adapters.forward(self, self._family, stepping)
        self._hooks.forward_done(len(rows), len(stepping) - len(images))
        return noise[: len(images)]

    def _fail_in_loop(self, job: LoopJob, error: Exception) -> None:
        self._groups[job.size].remove(job)
        self._fail(job, error)

    def _fail(self, job: LoopJob, error: Exception) -> None:
        self._answer(job, job.failure(error))

    def _finish(self, done: list[LoopJob]) -> None:
        """Decode the finished jobs' images in one VAE call and answer each job; on a
        failure, each job's decode alone."""
        if not done:
            return
        for job in done:
            self._groups[job.size].remove(job)
        self._together_or_alone(done, self._decode, self._fail)
        for job in done:
            if job.result_ready is not None:  # decoded (the others failed, answered)
                self._hooks.job_done(job, job.result_ready)  # its work is done, either way
                self._answer(job, self._screened(job))

    def _screened(self, job: LoopJob) -> GeneratedImages | BaseException:
        """The job's result through the safety gate; a gate that fails fails this job
        alone, unless it broke the device (raised: the lane fails)."""
        try:
            return self._hooks.screen(job.job, job.result_ready)
        except Exception as error:
            if self._hooks.broken(error):
                raise
            logger.warning("request %s: the safety check failed", job.job.request_id)
            return job.failure(error)

    def _decode(self, done: list[LoopJob]) -> None:
        """The jobs' images in one VAE call, kept on each job until all are decoded."""
        started = time.perf_counter()
        latents = [image.latents for job in done for image in job.images]
        width, height = done[0].size
        with torch.no_grad():
            pixels = to_uint8(self._family.decode(latents, width, height))
        decode_s = time.perf_counter() - started
        offset = 0
        for job in done:
            count = job.job.num_images
            job.result_ready = job.result(list(pixels[offset : offset + count]), decode_s)
            offset += count

    def _leave_abandoned(self, jobs: list[LoopJob]) -> None:
        for job in [job for job in jobs if job.gone]:
            jobs.remove(job)
            self._drop(job)

    def _drop_abandoned_arrivals(self) -> None:
        with self._lock:
            gone = [job for job in self._inbox if job.gone]
        for job in gone:
            self._drop(job)

    def _drop(self, job: LoopJob) -> None:
        """A job whose caller has gone leaves (at a step boundary); nobody is answered."""
        with self._lock:
            if job in self._inbox:
                self._inbox.remove(job)
            self._release(job)

    def _answer(self, job: LoopJob, outcome: GeneratedImages | BaseException) -> None:
        with self._lock:
            if job not in self._held:
                return  # answered already
            self._release(job)
        job.deliver(outcome)

    def _release(self, job: LoopJob) -> None:
        """(Under the lock.) The lane holds the job no more."""
        self._held.discard(job)
        self.images -= job.job.num_images

    def _fail_everything(self, error: BaseException) -> None:
        """Answer every job held with `error`: queued, joining, in a group or decoding."""
        with self._lock:
            failing = list(self._held)
            self._inbox.clear()
            self._groups = {}
            self._held.clear()
            self.images = 0
            self.running = False
        for job in failing:
            job.deliver(error)


def _adapter_ids(jobs: Iterable[LoopJob]) -> set[str]:
    return {adapter_id for job in jobs for adapter_id, _ in job.job.adapters}
