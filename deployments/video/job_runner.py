"""One delivery of a video job, from its id to its record's final fields and event.

The queue delivers a job at least once (again when the replica running it dies), and the
record's scripts (`VideoJobStore`) turn that into one visible outcome:
1. `claim` the job: gone (deleted) or already final, the delivery is acknowledged and ends;
   held by another live run, it is retried later (`DeliverLater`), so that it takes the job over
   if that run dies; past `max_attempts` runs, the job fails as `attempts_exhausted`;
2. run the model, writing the progress and renewing the lease at each step; a deleted record
   stops the run at its next step (the thread and its slot are free at once);
3. encode the MP4 and the thumbnail, store both, and `finish` the record once: a run that
   lost the race (the job was finished or deleted meanwhile) discards its files;
4. send `video.completed` or `video.failed` to the webhooks (in the background).
"""

from __future__ import annotations

import io
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import redis
from PIL import Image

from deployments.metrics import VideoMetrics
from deployments.storage import ImageStorage, StorageUnavailable
from deployments.video.mp4_encoding import encode_mp4, encode_thumbnail
from deployments.video.video_model import (
    VideoCancelled,
    VideoLimits,
    VideoModel,
    VideoRequest,
)
from deployments.videos.video_jobs import VideoJobStore, VideoRecord, VideoSpec, clip_frames
from deployments.videos.video_queue import DeliverLater
from deployments.videos.webhook_delivery import WebhookSender

logger = logging.getLogger("ray.serve")
T = TypeVar("T")
# How long a run waits for Redis to come back before it gives its outcome up (and the queue
# delivers the job again).
REDIS_PATIENCE_S = 60.0


def frames_for(seconds: int, fps: int, limits: VideoLimits) -> int:
    """The frames of a clip of `seconds` at `fps` on a model of these limits."""
    return clip_frames(seconds, fps, limits.frame_multiple, limits.max_frames)


@dataclass(frozen=True)
class RunSettings:
    max_attempts: int
    # How long a finished job's record and files are kept (the store's TTL).
    retention_s: float


class VideoJobRunner:
    """Runs the deliveries of one model's jobs (any number of threads at once)."""

    def __init__(
        self,
        model: VideoModel,
        jobs: VideoJobStore,
        files: ImageStorage,
        settings: RunSettings,
        webhooks: WebhookSender | None = None,
        metrics: VideoMetrics | None = None,
        queue_length: Callable[[], int] | None = None,
    ) -> None:
        self._model = model
        self._jobs = jobs
        self._files = files
        self._settings = settings
        self._webhooks = webhooks
        self._metrics = metrics
        self._queue_length = queue_length
        self._stopping = threading.Event()
        self._running = 0
        self._count_lock = threading.Lock()

    @property
    def running(self) -> int:
        """Runs in progress now (the autoscaling policy counts them)."""
        return self._running

    def stop(self) -> None:
        """The replica is going away: every run stops at its next step and hands its job
        back to the queue, so that another replica takes it now rather than after
        `redelivery_s`."""
        self._stopping.set()

    def run(self, video_id: str) -> str:
        """Deliver the job once; the outcome (for the logs and tests). `DeliverLater` asks
        the queue to deliver it again later."""
        if self._stopping.is_set():  # Celery hands a stopping replica what it still holds
            raise DeliverLater(f"video job {video_id}: replica stopping")
        token = secrets.token_hex(8)
        try:
            claim, detail = self._jobs.claim(video_id, token, self._settings.max_attempts)
        except redis.RedisError as error:
            raise DeliverLater(f"video job {video_id}: record unreachable ({error!r})") from None
        if claim in ("gone", "final"):
            logger.info("video job %s: %s (%s), nothing to run", video_id, claim, detail)
            return claim
        if claim == "busy":
            raise DeliverLater(f"video job {video_id} is running elsewhere")
        with self._count_lock:
            self._running += 1
        try:
            return self._claimed(video_id, token, claim, detail)
        except redis.RedisError as error:  # Redis away longer than `_patiently` waits
            self._hand_back(video_id, token)
            raise DeliverLater(f"video job {video_id}: record unreachable ({error!r})") from None
        finally:
            with self._count_lock:
                self._running -= 1

    def _claimed(self, video_id: str, token: str, claim: str, detail: str) -> str:
        record = self._patiently(self._jobs.get, video_id)
        if record is None:
            return "gone"
        if claim == "exhausted":
            self._fail(
                record,
                "attempts_exhausted",
                f"the job was started {detail} times and its replica was lost each time",
            )
            return "failed"
        if self._metrics is not None:
            waiting = self._queue_length() if self._queue_length else 0
            queued_at = record.queued_at or record.created_at
            self._metrics.job_started(time.time() - queued_at, waiting)
        logger.info("video job %s: run %s starts", video_id, detail)
        return self._run(record, token)

    def _run(self, record: VideoRecord, token: str) -> str:
        try:
            frames = self._generate(record, token)
        except VideoCancelled:
            return self._stopped(record, token)
        except ValueError as error:
            # The spec passed the ingress's checks against the config, not the model's own
            # (a model replaced under the same id): the request, not the replica, is wrong.
            self._fail(record, "invalid_request", str(error))
            return "failed"
        except Exception:
            logger.exception("video job %s: generation failed", record.id)
            self._fail(record, "generation_failed", "The video could not be generated.")
            return "failed"
        return self._complete(record, frames)

    def _stopped(self, record: VideoRecord, token: str) -> str:
        """A run stopped between steps: its job deleted, finished or taken over by another
        run, or this replica stopping."""
        if self._patiently(self._jobs.get, record.id) is None:
            self._discard(record.spec.reference_name)
            self._ended("cancelled", record)
            logger.info("video job %s: deleted while running, stopped", record.id)
            return "cancelled"
        if self._stopping.is_set():
            # Handed back, or (the lease lapsed, Redis away) left for the next claim to sort
            # out: either way the message must stay, so the job is delivered again.
            if self._hand_back(record.id, token):
                logger.info("video job %s: replica stopping, job handed back", record.id)
            elif self._record_gone(record.id):  # deleted meanwhile: its reference is ours
                self._discard(record.spec.reference_name)
            raise DeliverLater(f"video job {record.id}: stopped with its replica")
        logger.info("video job %s: finished or taken over elsewhere, stopped", record.id)
        return "superseded"

    def _record_gone(self, video_id: str) -> bool:
        try:
            return self._jobs.get(video_id) is None
        except redis.RedisError:
            return False

    def _hand_back(self, video_id: str, token: str) -> bool:
        try:
            return self._jobs.hand_back(video_id, token)
        except redis.RedisError:  # the lease lapses by itself
            return False

    def _generate(self, record: VideoRecord, token: str) -> np.ndarray:
        spec = record.spec
        deleted = False

        def on_step(step: int, total: int) -> None:
            nonlocal deleted
            # The last percent waits for the file: 100 means it can be downloaded.
            percent = min(99, int(100 * step / max(1, total)))
            try:
                deleted = not self._jobs.progress(record.id, token, percent)
            except redis.RedisError as error:
                # Redis restarting: the run goes on (its result is written once Redis is
                # back); only the progress of this step is not shown.
                logger.warning("video job %s: progress not written: %r", record.id, error)

        request = VideoRequest(
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            width=spec.width,
            height=spec.height,
            num_frames=spec.num_frames
            or frames_for(spec.seconds, self._fps(spec), self._model.limits),
            num_inference_steps=spec.num_inference_steps,
            guidance_scale=spec.guidance_scale,
            seed=spec.seed,
            image=self._reference(spec.reference_name),
        )
        self._model.check(request)
        return self._model.generate(
            request, on_step=on_step, cancelled=lambda: deleted or self._stopping.is_set()
        )

    def _fps(self, spec: VideoSpec) -> int:
        return spec.fps or self._model.limits.default_fps

    def _reference(self, name: str | None) -> np.ndarray | None:
        if name is None:
            return None
        data = self._files.read(name)
        if data is None:
            raise ValueError("input_reference: the uploaded image expired before the job ran")
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    def _complete(self, record: VideoRecord, frames: np.ndarray) -> str:
        try:
            clip = encode_mp4(frames, self._fps(record.spec))
            still = encode_thumbnail(frames)
        except Exception:
            logger.exception("video job %s: encoding failed", record.id)
            self._fail(record, "generation_failed", "The video could not be encoded.")
            return "failed"
        try:
            video = self._files.save(clip, "mp4")
        except StorageUnavailable as error:
            logger.error("video job %s: storing the video failed: %s", record.id, error)
            self._fail(record, "storage_unavailable", "The video could not be stored.")
            return "failed"
        try:
            thumbnail = self._files.save(still, "webp")
        except StorageUnavailable as error:
            self._discard(video)
            logger.error("video job %s: storing the thumbnail failed: %s", record.id, error)
            self._fail(record, "storage_unavailable", "The video could not be stored.")
            return "failed"
        now = int(time.time())
        retention = self._settings.retention_s
        written = self._patiently(
            self._jobs.finish,
            record.id,
            retention,
            status="completed",
            progress=100,
            completed_at=now,
            expires_at=now + int(retention),
            video_name=video,
            thumbnail_name=thumbnail,
        )
        self._discard(record.spec.reference_name)
        if not written:
            # Finished by another run, or deleted, meanwhile: this run's files are nobody's.
            self._discard(video)
            self._discard(thumbnail)
            logger.info("video job %s: finished elsewhere or deleted; files dropped", record.id)
            return "superseded"
        self._ended("completed", record)
        self._send("video.completed", record.id)
        logger.info("video job %s: completed", record.id)
        return "completed"

    def _fail(self, record: VideoRecord, code: str, message: str) -> None:
        now = int(time.time())
        written = self._patiently(
            self._jobs.finish,
            record.id,
            self._settings.retention_s,
            status="failed",
            completed_at=now,
            expires_at=now + int(self._settings.retention_s),
            error_code=code,
            error_message=message,
        )
        self._discard(record.spec.reference_name)
        if written:
            self._ended("failed", record)
            self._send("video.failed", record.id)
            logger.info("video job %s: failed (%s)", record.id, code)

    def _patiently(self, write: Callable[..., T], *args: Any, **fields: Any) -> T:
        """A write of the run's outcome, tried again while Redis is unreachable (a restart
        takes seconds): giving up would leave a finished run unrecorded, and the job to be
        run again from its start."""
        deadline = time.monotonic() + REDIS_PATIENCE_S
        pause = 0.2
        while True:
            try:
                return write(*args, **fields)
            except redis.RedisError as error:
                if time.monotonic() + pause > deadline:
                    raise
                logger.warning("video jobs' Redis unreachable (%r); trying again", error)
                time.sleep(pause)
                pause = min(2.0, pause * 2)

    def _ended(self, outcome: str, record: VideoRecord) -> None:
        if self._metrics is not None:
            self._metrics.job_ended(outcome, time.time() - record.created_at)

    def _send(self, event_type: str, video_id: str) -> None:
        if self._webhooks is not None:
            self._webhooks.send(event_type, {"id": video_id})

    def _discard(self, name: str | None) -> None:
        if name is not None:
            self._files.discard(name)
