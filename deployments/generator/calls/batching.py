"""Batching compatible jobs into one pipeline call.

On an accelerator, threads running separate pipeline calls mostly take turns; one call over a
batch of images uses the device better where a single image does not fill it. Jobs are
compatible when everything the call shares is equal: size, steps, guidance scale, whether
a negative prompt is given (`None` and `""` differ for some pipelines), the LoRA adapters and
their scales, and for edits the task (image-to-image or inpainting) and strength. Prompts,
negative prompts, seeds and input images stay per image.

When a batch starts:
- never before a worker thread is free; until then, waiting batches keep absorbing compatible
  jobs (under load, batches grow by themselves);
- at once when the replica is idle, so a lone request never waits for company;
- otherwise when it is full or its oldest job has waited `max_wait_ms`;
- but after a batch ends, one that is not full also waits (at most `max_wait_ms`) for as
  many new jobs as the ended batch had: its callers, answered together, mostly ask again at
  once (clients in a closed loop, a pipeline of requests), and without this they would come
  back to a batch already started and the replica's clients would split into cohorts that
  take turns at half the batch size. A lone client asking again starts at once (its own
  next job is the one awaited).
A batch holds at most `max_batch_images` images and `max_batch_pixels` pixels: batching pays
where one image leaves the device idle (small sizes) and buys nothing but latency and memory
where one image fills it (large sizes), so large images batch less or run alone. A job with
more images than fit runs as a batch of its own. With `max_batch_images=1` every job runs
alone: the per-request design.

Among the batches that may start, the most urgent goes first: the one holding the job of
the highest class (after aging: `deployments/scheduling/job_schedule.py`); within a class, a
full batch before one that is not, then the earliest deadline. A job joins the first
compatible batch with room whatever its class: riding along costs the batch nothing.

A job that can no longer finish by its deadline when its batch starts (at the replica's
recent rate, `deployments/scheduling/deadline_admission.py`) fails instead of starting.

A job cancelled while it waits leaves its batch; a running batch is told to stop only when
every job in it is cancelled. A batch's run answers for each job: its images or its own
failure, so a failing job fails no other (how a batch runs as pipeline calls, and survives a
failed one: `deployments/generator/calls/call_plan.py`).

Each job travels with what its batch's run needs besides the job itself (`QueuedJob`): where
its streamed events go and when it was submitted. Equal jobs (same parameters and seeds) from
two requests are still two entries.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from deployments.config.model_config import BatchingConfig
from deployments.generator.progress.replica_progress import ReplicaProgress
from deployments.jobs import AdapterWeight, EventSink, GeneratedImages, GenerationJob, Task

# How long a batch of an adapter set that is not running may be passed over for batches of
# running sets (`BatchQueue._prefer_running`) before it goes first anyway.
OVERDUE_S = 0.5


@dataclass(frozen=True, eq=False)
class QueuedJob:
    """A submitted job, as its batch's run sees it."""

    job: GenerationJob
    sink: EventSink | None
    # `time.perf_counter()` at submission: the job's wait is measured from here.
    submitted: float
    # Set (on the event loop) when the job's caller has gone while its batch runs: the
    # batch's run leaves it out of any call it has not started yet.
    abandoned: threading.Event = field(default_factory=threading.Event)


# Runs a batch: each job's images, or the exception that job fails with, in job order. It
# raises only for what fails the whole batch (cancellation, a broken device).
RunBatch = Callable[[list[QueuedJob], threading.Event], list[GeneratedImages | Exception]]


@dataclass(frozen=True)
class BatchKey:
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    has_negative_prompt: bool
    # Edits run on another pipeline class, and their strength sets how many steps run.
    task: Task = "text-to-image"
    strength: float | None = None
    # A call runs with one adapter set at one set of scales (`adapter_gate.py`).
    adapters: tuple[AdapterWeight, ...] = ()
    # A reference-conditioned edit's references are the whole call's (the pipeline takes one
    # list of them for all its images): such a job shares its calls with no other job.
    alone: int | None = None


def adapter_key(adapters: tuple[AdapterWeight, ...]) -> tuple[AdapterWeight, ...]:
    """A job's adapters as its calls run them: sorted, none at scale 0 (() is the base)."""
    return tuple(sorted((name, float(scale)) for name, scale in adapters if scale != 0))


def batch_key(job: GenerationJob) -> BatchKey:
    return BatchKey(
        width=job.width,
        height=job.height,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        has_negative_prompt=job.negative_prompt is not None,
        task=job.task,
        strength=job.strength,
        adapters=adapter_key(job.adapters),
        alone=id(job) if job.references else None,
    )


@dataclass(eq=False)
class _Entry:
    queued: QueuedJob
    result: asyncio.Future[GeneratedImages]


@dataclass(eq=False)
class _Batch:
    key: BatchKey
    created: float
    entries: list[_Entry] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: bool = False

    @property
    def num_images(self) -> int:
        return sum(entry.queued.job.num_images for entry in self.entries)

    def urgency(self, now: float) -> tuple[int, float, float]:
        """Its most urgent job's (`JobSchedule.urgency`)."""
        return min(entry.queued.job.schedule.urgency(now) for entry in self.entries)


class BatchQueue:
    """Groups jobs into batches and runs each batch with `run_batch` on `executor`.

    All of its state is touched on the event loop's thread only; `run_batch` runs in the
    executor's threads and sees nothing but its queued jobs and its batch's cancel flag.
    """

    def __init__(
        self,
        run_batch: RunBatch,
        executor: Executor,
        workers: int,
        settings: BatchingConfig,
        on_change: Callable[[int], None] | None = None,
        progress: ReplicaProgress | None = None,
        late: Callable[[GenerationJob], Exception | None] | None = None,
    ) -> None:
        """`progress`: where the replica keeps its held work and batch sizes (its own, if
        none is given). `late`: what a job fails with instead of starting, if it can no
        longer finish by its deadline (None: it starts)."""
        progress = progress if progress is not None else ReplicaProgress()
        self._run_batch = run_batch
        self._late = late
        # Told the number of waiting jobs whenever it may have changed (for a metric).
        self._on_change = on_change
        self._executor = executor
        self._workers = workers
        self._settings = settings
        self._max_wait_s = settings.max_wait_ms / 1000
        self._pending: list[_Batch] = []
        self._running = 0
        # The adapter sets of the running batches, with how many of each run.
        self._running_sets: Counter[tuple[AdapterWeight, ...]] = Counter()
        self._timer: asyncio.TimerHandle | None = None
        # After a batch ends, its callers' next requests (closed-loop clients answer and ask
        # again within milliseconds) are awaited before a batch that is not full starts:
        # this many jobs more, until `_regroup_until` (`time.monotonic()`).
        self._regroup_jobs = 0
        self._regroup_until = 0.0
        # Images in each of the most recent batches.
        self.batch_sizes = progress.batch_sizes
        # The steps x pixels of the jobs between their submission and their answer: what the
        # cost-aware autoscaling policy scales on (each step a call runs comes off).
        self.work = progress.work

    @property
    def waiting_jobs(self) -> int:
        return sum(len(batch.entries) for batch in self._pending)

    async def submit(self, job: GenerationJob, sink: EventSink | None = None) -> GeneratedImages:
        """The job's images, once its batch has run; `sink`, if given, goes to the batch's
        run with the job (for its progress and previews)."""
        loop = asyncio.get_running_loop()
        queued = QueuedJob(job=job, sink=sink, submitted=time.perf_counter())
        entry = _Entry(queued=queued, result=loop.create_future())
        with self.work.holding(queued):
            batch = self._batch_for(job)
            batch.entries.append(entry)
            self._regroup_jobs = max(0, self._regroup_jobs - 1)
            self._dispatch()
            try:
                return await entry.result
            except asyncio.CancelledError:
                self._withdraw(batch, entry)
                raise

    def capacity(self, key: BatchKey) -> int:
        """Most images a batch of this key holds (at least 1)."""
        return self._settings.images_per_batch(key.width, key.height)

    def _batch_for(self, job: GenerationJob) -> _Batch:
        key = batch_key(job)
        capacity = self.capacity(key)
        for batch in self._pending:
            if batch.key == key and batch.num_images + job.num_images <= capacity:
                return batch
        batch = _Batch(key=key, created=time.monotonic())
        self._pending.append(batch)
        return batch

    def _withdraw(self, batch: _Batch, entry: _Entry) -> None:
        if not batch.started:
            # Its batch may have left it already (late: `_leave_late`), or left the queue.
            if entry in batch.entries:
                batch.entries.remove(entry)
            if not batch.entries and batch in self._pending:
                self._pending.remove(batch)
            if self._on_change is not None:
                self._on_change(self.waiting_jobs)
            return
        entry.queued.abandoned.set()
        if all(other.result.cancelled() for other in batch.entries):
            batch.cancelled.set()

    def _dispatch(self) -> None:
        now = time.monotonic()
        while self._running < self._workers:
            batch = self._next_ready(now)
            if batch is None:
                break
            self._start(batch)
        self._arm_timer(now)
        if self._on_change is not None:
            self._on_change(self.waiting_jobs)

    def _next_ready(self, now: float) -> _Batch | None:
        """The batch to start among those ready (full, or past their wait): the highest
        class, then full before not, then the earliest deadline, oldest first; among them
        one of an adapter set that is running, if any (see `_prefer_running`)."""
        full = [b for b in self._pending if b.num_images >= self.capacity(b.key)]
        ready = full
        if not self._regrouping(now):
            ready = full + [
                b
                for b in self._pending
                if b not in full and (self._running == 0 or now - b.created >= self._max_wait_s)
            ]
        if not ready:
            return None
        wall = time.time()
        urgency = {id(b): b.urgency(wall) for b in ready}
        # Within a class, a full batch first (as before classes: it is the throughput), then
        # the earlier deadline.
        ready.sort(key=lambda b: (urgency[id(b)][0], b not in full, urgency[id(b)], b.created))
        # Only a batch of the first's class may go before it for its adapters.
        peers = [b for b in ready if urgency[id(b)][0] == urgency[id(ready[0])][0]]
        return self._prefer_running(peers, now)

    def _regrouping(self, now: float) -> bool:
        """Whether a batch that is not full waits for the callers of the batch that just ended."""
        return self._regroup_jobs > 0 and now < self._regroup_until

    def _prefer_running(self, ready: list[_Batch], now: float) -> _Batch:
        """A batch of another adapter set than the running batches' would only wait, its
        worker idle, until they end (calls of different sets never overlap: see
        `adapter_gate.py`), while one of their set runs beside them at once. So a batch of a
        running set goes first, unless another has waited `OVERDUE_S`: no set starves.
        `ready` holds the batches of the most urgent class, most urgent first."""
        first = ready[0]
        if not self._running_sets or first.key.adapters in self._running_sets:
            return first
        if any(now - batch.created >= OVERDUE_S for batch in ready):
            return first
        same = [batch for batch in ready if batch.key.adapters in self._running_sets]
        return same[0] if same else first

    def _arm_timer(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending or self._running >= self._workers:
            return  # a finishing batch calls _dispatch again
        oldest = min(batch.created for batch in self._pending)
        ready_at = oldest + self._max_wait_s if self._running else now
        if self._regrouping(now):
            ready_at = max(ready_at, self._regroup_until)
        delay = max(0.0, ready_at - now)
        self._timer = asyncio.get_running_loop().call_later(delay, self._dispatch)

    def _start(self, batch: _Batch) -> None:
        self._pending.remove(batch)
        self._leave_late(batch)
        if not batch.entries:
            return
        batch.started = True
        self._running += 1
        self._running_sets[batch.key.adapters] += 1
        queued = [entry.queued for entry in batch.entries]
        self.batch_sizes.append(batch.num_images)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._run_batch, queued, batch.cancelled)
        future.add_done_callback(lambda done: self._finish(batch, done))

    def _leave_late(self, batch: _Batch) -> None:
        """Jobs that can no longer finish by their deadline fail instead of starting: their
        steps would be cancelled at the deadline, unread."""
        if self._late is None:
            return
        for entry in list(batch.entries):
            if entry.result.done():
                continue  # cancelled, its withdrawal on its way: the batch's run skips it
            error = self._late(entry.queued.job)
            if error is not None:
                batch.entries.remove(entry)
                entry.result.set_exception(error)

    def _finish(
        self, batch: _Batch, done: asyncio.Future[list[GeneratedImages | Exception]]
    ) -> None:
        self._running -= 1
        now = time.monotonic()
        if self._regrouping(now):  # the window stays: a batch waits `max_wait_ms` at most
            self._regroup_jobs += len(batch.entries)
        else:
            self._regroup_jobs = len(batch.entries)
            self._regroup_until = now + self._max_wait_s
        self._running_sets[batch.key.adapters] -= 1
        if not self._running_sets[batch.key.adapters]:
            del self._running_sets[batch.key.adapters]
        if done.cancelled():  # the executor was shut down before the batch started
            error: BaseException | None = RuntimeError("the replica is shutting down")
        else:
            error = done.exception()
        for index, entry in enumerate(batch.entries):
            if entry.result.done():
                continue  # its caller cancelled and left
            outcome = error if error is not None else done.result()[index]
            if isinstance(outcome, BaseException):
                entry.result.set_exception(outcome)
            else:
                entry.result.set_result(outcome)
        self._dispatch()
