"""The front of a generator replica: admits a job, routes it, streams it, reports health.

`ImageEngine.generate` is a coroutine: the replica's event loop keeps accepting requests
while a bounded pool of threads runs the pipeline (torch releases the GIL in its kernels).
A job goes one of two ways:

- `loop/`: with continuous batching on, text-to-image jobs of a flow-matching family join a
  running denoising loop at its next step and leave when their own steps are done;
- `calls/`: every other job waits in the batch queue (`calls/batching.py`) for compatible
  jobs, and its batch runs as pipeline calls on per-call views (`calls/call_runner.py`).

Both paths record what they do in one `ReplicaProgress` (`progress/replica_progress.py`:
steps run, batch sizes, the held work the autoscaler reads, a broken device), which the
engine reads; neither calls back up into the engine. A job's LoRA adapters are fetched and
checked before it queues (`adapters/`); its prompt tokens are counted for the usage object
(`progress/prompt_tokens.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from diffusers import DiffusionPipeline

from deployments.config.model_config import BatchingConfig
from deployments.generator.adapters.adapter_store import AdapterStore
from deployments.generator.calls.batching import BatchQueue
from deployments.generator.calls.call_runner import CallRunner
from deployments.generator.loop.continuous_batching import ContinuousBatching
from deployments.generator.loop.denoise_loop import LaneHooks
from deployments.generator.loop.families import family_of
from deployments.generator.loop.loop_adapters import LoopAdapters
from deployments.generator.model.components import denoiser_of
from deployments.generator.model.pipelines import RequestPipelines
from deployments.generator.model.torch_threads import CountingExecutor, worker_pool
from deployments.generator.parallel.rank_group import RankGroup
from deployments.generator.progress.previews import fit_previewer
from deployments.generator.progress.prompt_tokens import PromptTokens
from deployments.generator.progress.replica_progress import EngineMetrics, ReplicaProgress
from deployments.generator.progress.work_meter import WorkMeter, work_of
from deployments.generator.safety.safety_gate import SafetyGate
from deployments.jobs import (
    AdapterUnavailable,
    DeadlineUnreachable,
    EventSink,
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
)
from deployments.scheduling.deadline_admission import too_late

logger = logging.getLogger("ray.serve")

# The engine's batching unless told otherwise: every job runs alone, at once.
UNBATCHED = BatchingConfig(max_batch_images=1, max_wait_ms=0)

__all__ = ["UNBATCHED", "EngineMetrics", "ImageEngine"]


class ImageEngine:
    """Runs jobs on one shared pipeline in `worker_threads` threads, grouped into pipeline
    calls as `batching` says (by default, each job alone), or in the continuous loop.
    With `adapters`, jobs may name LoRA adapters."""

    def __init__(
        self,
        pipeline: DiffusionPipeline,
        worker_threads: int,
        batching: BatchingConfig = UNBATCHED,
        metrics: EngineMetrics | None = None,
        adapters: AdapterStore | None = None,
        pool: ThreadPoolExecutor | None = None,
        continuous: bool = False,
        safety: SafetyGate | None = None,
        ranks: RankGroup | None = None,
        compiled: bool = False,
    ) -> None:
        """`pool`, if given, is the executor of `worker_threads` threads that loaded the
        pipeline (see `model/torch_threads.py`); otherwise one is made. `continuous`:
        text-to-image jobs of the flow families the loop has run in it, the rest in calls;
        `compiled`: the denoiser is compiled, so the loop pads its forwards' rows to the
        counts its start warmed (`loop/row_buckets.py`).
        `safety`: every image and preview passes the model's checker before it leaves.
        `ranks`: the group of a parallel replica, whose denoiser already leads it."""
        self._pipelines = RequestPipelines(pipeline)
        self.device = pipeline.device
        self.adapters = adapters
        self._progress = ReplicaProgress(metrics)
        self._prompt_tokens = PromptTokens(pipeline)
        self._pool = pool or worker_pool(worker_threads)
        self._executor = CountingExecutor(self._pool)
        previewer = self._previewer = fit_previewer(pipeline)
        self._safety = safety
        self._ranks = ranks
        screen = safety.screen if safety is not None else None
        self._runner = CallRunner(
            self._pipelines, previewer, batching, adapters, self._progress, screen
        )
        self._queue = BatchQueue(
            self._runner.run_batch,
            self._executor,
            workers=worker_threads,
            settings=batching,
            on_change=self._progress.queue_changed,
            progress=self._progress,
            late=self._late_to_start,
        )
        # Lower classes' images in the loop pause for higher ones: they are not ahead.
        self._preempting = continuous and batching.preempt_lower_classes
        self._continuous = None
        if continuous:
            self._continuous = self._continuous_batching(
                worker_threads, batching, previewer, compiled
            )

    @property
    def continuous(self) -> bool:
        """Whether text-to-image jobs run in the continuous loop."""
        return self._continuous is not None

    @property
    def steps_run(self) -> int:
        """Denoising steps completed by all calls and loop steps (tests and counters)."""
        return self._progress.steps_run

    @property
    def work(self) -> WorkMeter:
        """The held jobs' steps x pixels (what the autoscaling policy reads)."""
        return self._progress.work

    @property
    def loop_rows(self) -> dict[str, int]:
        """Rows the continuous loop's forwards ran, and of them padding."""
        return self._progress.loop_rows

    @property
    def batch_sizes(self) -> list[int]:
        """Images in each of the most recent batches (or loop steps), oldest first."""
        return list(self._progress.batch_sizes)

    def _continuous_batching(
        self, lanes: int, batching: BatchingConfig, previewer, pad_rows: bool
    ) -> ContinuousBatching | None:
        view = self._pipelines.view()
        family = family_of(view)
        if family is None:
            logger.info("%s runs per call: no continuous loop for it", type(view).__name__)
            return None
        adapters = None
        if self.adapters is not None:
            adapters = LoopAdapters(self.adapters, denoiser_of(view), self.device)
        hooks = LaneHooks(
            capacity=batching.images_per_batch,
            step_done=self._progress.loop_step_done,
            job_done=self._progress.loop_job_done,
            broken=self._runner.device_failed,
            others_waiting=self._executor.has_waiting,
            late=self._late_to_start,
            forward_done=self._progress.loop_forward,
        )
        if self._safety is not None:
            hooks = replace(hooks, screen=self._safety.screen)
        return ContinuousBatching(
            family, self._pool, lanes, batching, hooks, self.work, previewer, adapters, pad_rows
        )

    @property
    def rank_pids(self) -> list[int]:
        """The processes of a parallel replica's other ranks (rank 1 first); else none."""
        return [] if self._ranks is None else list(self._ranks.pids)

    def capabilities(self) -> ModelCapabilities:
        capabilities = replace(self._pipelines.capabilities(), previews=self._previewer is not None)
        if self._ranks is not None:
            # Each side a multiple of the sequence split: every rank gets image tokens, and
            # as many as the others (a sequence shorter than the split fails every rank).
            multiple = capabilities.size_multiple * self._ranks.sequence_split
            capabilities = replace(capabilities, size_multiple=multiple)
        return capabilities

    def check_health(self) -> None:
        """Raise if the replica can no longer generate, so that Serve replaces it."""
        self._progress.check_health()
        if self._ranks is not None:
            self._ranks.check()

    async def generate(self, job: GenerationJob, sink: EventSink | None = None) -> GeneratedImages:
        """The job's images; `sink`, if given, is called (from a worker thread) with its
        progress and previews."""
        self._progress.check_health()  # until Serve's health check replaces the replica
        self._refuse_if_late(job)
        await self._stage_adapters(job)
        if sink is not None and self._safety is not None:
            sink = self._safety.screened(job, sink)
        runs = self._queue
        if self._continuous is not None and self._continuous.accepts(job):
            runs = self._continuous
        try:
            return await self._prompt_tokens.counted(job, await runs.submit(job, sink))
        except asyncio.CancelledError:
            logger.info("request %s cancelled; its generation stops", job.request_id)
            raise

    def _refuse_if_late(self, job: GenerationJob) -> None:
        """Raise `DeadlineUnreachable` (a retryable 503) for a job that the work ahead of it
        and its own, at the replica's recent rate, would finish after its deadline
        (`scheduling/deadline_admission.py`)."""
        ahead = self._progress.work.ahead_of(job.schedule.rank, self._preempting)
        error = self._late(job, ahead, "arrived")
        if error is not None:
            raise error

    def _late_to_start(self, job: GenerationJob) -> DeadlineUnreachable | None:
        """What a waiting job fails with instead of starting, if its own work would end
        after its deadline (higher classes passed it while it waited). Its steps share the
        replica's rate with the images in flight, as a step shares a device: at rate `mu`
        and `k` images in all, its own work takes `own x k / mu`."""
        sharing = self._progress.work.images_in_flight(job.schedule.rank, self._preempting)
        extra = work_of(job) * sharing / job.num_images
        return self._late(job, extra, "waited")

    def _late(self, job: GenerationJob, ahead_work: float, when: str) -> DeadlineUnreachable | None:
        work = self._progress.work
        late = too_late(job.schedule, work_of(job), ahead_work, work.rate.recent(), time.time())
        if late is None:
            return None
        logger.info(
            "request %s refused as it %s: it would finish in %.1f s, %.1f s after its deadline",
            job.request_id,
            when,
            late.finish_s,
            late.late_s,
        )
        return DeadlineUnreachable(late.late_s, late.retry_after_s)

    async def _stage_adapters(self, job: GenerationJob) -> None:
        """Fetch and check the job's adapters off the event loop before it queues, so that
        its batch's switch only loads them. Raises `AdapterUnavailable` (a 400)."""
        if not job.adapters:
            return
        if self.adapters is None:
            raise AdapterUnavailable(job.adapters[0][0], "this model has no adapters")
        missing = self.adapters.missing(adapter_id for adapter_id, _ in job.adapters)
        if missing:
            await asyncio.to_thread(self.adapters.prefetch, missing)

    async def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        """The job's progress and previews as they happen, then its `GeneratedImages`.

        Closing the iterator early (the client went away) cancels the generation.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | None] = asyncio.Queue()

        def sink(event: GenerationEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        # The worker thread's events reach the loop before the batch's result does (both go
        # through call_soon_threadsafe, in order), so None comes after all of them.
        task = asyncio.ensure_future(self.generate(job, sink))
        task.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while (event := await events.get()) is not None:
                yield event
            yield task.result()
        finally:
            task.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._ranks is not None:
            self._ranks.stop()
