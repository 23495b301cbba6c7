"""A video job's deliveries against a real Redis, the embedded tiny Wan and a directory
store: what the queue's at-least-once delivery must look like to the job's owner (one
outcome, files only for it, a deleted job stopped at its next step)."""

from __future__ import annotations

import io
import threading
import time

import av
import numpy as np
import pytest
from PIL import Image

from deployments.storage import ImageStore
from deployments.video.job_runner import RunSettings, VideoJobRunner, frames_for
from deployments.video.video_model import VideoModel
from deployments.videos.video_jobs import VideoJobStore, VideoSpec
from deployments.videos.video_queue import DeliverLater

PREFIX = "test:video:"


@pytest.fixture(scope="module")
def model() -> VideoModel:
    return VideoModel.load("embedded:tiny-wan")


@pytest.fixture
def jobs(redis_server) -> VideoJobStore:
    store = VideoJobStore.connect(redis_server.url, PREFIX, lease_s=30)
    yield store
    store.close()


@pytest.fixture
def files(tmp_path) -> ImageStore:
    return ImageStore(tmp_path / "files", ttl_s=600)


def spec(**changes) -> VideoSpec:
    fields = dict(
        model="tiny-wan",
        prompt="a red fox",
        negative_prompt=None,
        width=32,
        height=32,
        seconds=1,
        num_frames=5,
        fps=8,
        num_inference_steps=3,
        guidance_scale=None,
        seed=7,
    )
    return VideoSpec(**{**fields, **changes})


def runner(model, jobs, files, max_attempts: int = 3, **options) -> VideoJobRunner:
    settings = RunSettings(max_attempts=max_attempts, retention_s=600)
    return VideoJobRunner(model, jobs, files, settings, **options)


def frames_of(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


def test_a_job_completes_once_with_its_clip_and_thumbnail(model, jobs, files):
    record = jobs.create("owner", spec())
    assert runner(model, jobs, files).run(record.id) == "completed"
    done = jobs.get(record.id)
    assert (done.status, done.progress, done.attempts) == ("completed", 100, 1)
    assert done.expires_at == done.completed_at + 600
    clip = frames_of(files.read(done.video_name))
    assert len(clip) == 5 and clip[0].shape == (32, 32, 3)
    assert files.read(done.thumbnail_name)[:4] == b"RIFF"  # WebP
    # A second delivery of the finished job (the queue delivers at least once) runs nothing.
    assert runner(model, jobs, files).run(record.id) == "final"
    assert jobs.get(record.id).attempts == 1


def test_the_clip_is_the_model_alone_whatever_runs_beside_it(model, jobs, files):
    """Two different jobs at once in two threads, each equal to its request run alone."""
    first, second = jobs.create("a", spec(seed=1)), jobs.create("b", spec(seed=2, prompt="sea"))
    threads = [
        threading.Thread(target=runner(model, jobs, files).run, args=(record.id,))
        for record in (first, second)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    together = [files.read(jobs.get(r.id).video_name) for r in (first, second)]
    for record, data in zip((first, second), together, strict=True):
        alone = jobs.create("c", jobs.get(record.id).spec)
        runner(model, jobs, files).run(alone.id)
        assert data == files.read(jobs.get(alone.id).video_name)
    assert together[0] != together[1]


def test_a_second_delivery_of_a_running_job_leaves_it_to_its_run(model, jobs, files):
    record = jobs.create("owner", spec())
    assert jobs.claim(record.id, "other-run", max_attempts=3) == ("claimed", "1")
    with pytest.raises(DeliverLater):
        runner(model, jobs, files).run(record.id)
    assert jobs.get(record.id).status == "in_progress"


def test_a_job_whose_run_was_lost_is_taken_over_and_counted(model, jobs, files, redis_server):
    """The lease of a run that died runs out; the next delivery takes the job."""
    short = VideoJobStore.connect(redis_server.url, PREFIX, lease_s=0.2)
    record = short.create("owner", spec())
    assert short.claim(record.id, "dead-run", max_attempts=3)[0] == "claimed"
    time.sleep(0.3)
    assert runner(model, jobs, files).run(record.id) == "completed"
    assert jobs.get(record.id).attempts == 2


def test_a_job_lost_more_often_than_its_attempts_fails_visibly(model, jobs, files, redis_server):
    short = VideoJobStore.connect(redis_server.url, PREFIX, lease_s=0.05)
    record = short.create("owner", spec())
    for run in range(2):
        assert short.claim(record.id, f"dead-{run}", max_attempts=2)[0] == "claimed"
        time.sleep(0.1)
    assert runner(model, jobs, files, max_attempts=2).run(record.id) == "failed"
    failed = jobs.get(record.id)
    assert (failed.status, failed.error_code) == ("failed", "attempts_exhausted")
    assert failed.video_name is None


def test_deleting_a_running_job_stops_it_at_its_next_step(model, jobs, files):
    record = jobs.create("owner", spec(num_inference_steps=40))
    steps: list[int] = []
    original = jobs.progress

    def progress(video_id, token, percent):
        steps.append(percent)
        if len(steps) == 2:
            jobs.delete(video_id)
        return original(video_id, token, percent)

    jobs.progress = progress  # the test's hook on the store: counts the steps run
    assert runner(model, jobs, files).run(record.id) == "cancelled"
    assert len(steps) <= 3  # the step it was deleted in, and at most one more
    assert not list((files.directory).glob("*.mp4"))


def test_a_run_that_finishes_a_job_finished_meanwhile_keeps_no_files(model, jobs, files):
    record = jobs.create("owner", spec())
    original = jobs.finish

    def finish(video_id, ttl_s, **fields):
        # Another run finished the job while this one encoded its clip.
        original(video_id, ttl_s, status="completed", video_name="elsewhere.mp4")
        return original(video_id, ttl_s, **fields)

    jobs.finish = finish
    assert runner(model, jobs, files).run(record.id) == "superseded"
    assert jobs.get(record.id).video_name == "elsewhere.mp4"
    assert not list(files.directory.glob("*.mp4")) and not list(files.directory.glob("*.webp"))


def test_a_run_whose_job_was_taken_over_stops_and_leaves_it_to_the_other(
    model, jobs, files, redis_server
):
    record = jobs.create("owner", spec(num_inference_steps=40))
    original = jobs.progress

    def progress(video_id, token, percent):
        # This run's lease lapsed (a long stall) and another delivery claimed the job.
        with redis_server.client() as plain:
            plain.set(f"{PREFIX}lease:{video_id}", "other-run")
        return original(video_id, token, percent)

    jobs.progress = progress
    assert runner(model, jobs, files).run(record.id) == "superseded"
    assert jobs.get(record.id).status == "in_progress"  # the other run's to finish


def test_a_stopping_replica_hands_its_running_job_back_uncounted(model, jobs, files):
    record = jobs.create("owner", spec(num_inference_steps=40))
    worker = runner(model, jobs, files)
    original = jobs.progress
    steps = []

    def progress(video_id, token, percent):
        steps.append(percent)
        if len(steps) == 2:
            worker.stop()  # Serve stops the replica
        return original(video_id, token, percent)

    jobs.progress = progress
    with pytest.raises(DeliverLater):  # Celery delivers it again, to a live replica
        worker.run(record.id)
    assert len(steps) <= 3
    handed = jobs.get(record.id)
    assert (handed.status, handed.attempts, handed.progress) == ("queued", 0, 0)
    jobs.progress = original
    assert runner(model, jobs, files).run(record.id) == "completed"
    assert jobs.get(record.id).attempts == 1


def test_a_stopping_replica_takes_no_new_job(model, jobs, files):
    """Between its stop and Celery's, a replica may still be handed jobs: each goes back."""
    record = jobs.create("owner", spec())
    worker = runner(model, jobs, files)
    worker.stop()
    with pytest.raises(DeliverLater):
        worker.run(record.id)
    untouched = jobs.get(record.id)
    assert (untouched.status, untouched.attempts) == ("queued", 0)


def test_a_record_out_of_reach_is_delivered_again_later(model, files, tmp_path):
    down = VideoJobStore.connect("redis://127.0.0.1:1/0", PREFIX, lease_s=30)
    with pytest.raises(DeliverLater):
        runner(model, down, files).run("video_0")


def test_a_request_the_model_refuses_fails_naming_it(model, jobs, files):
    record = jobs.create("owner", spec(num_frames=6))  # not 4k + 1
    assert runner(model, jobs, files).run(record.id) == "failed"
    failed = jobs.get(record.id)
    assert failed.error_code == "invalid_request" and "num_frames" in failed.error_message


def test_seconds_become_frames_by_the_models_rule(model):
    limits = model.limits
    frames = frames_for(1, 16, limits)
    assert (frames - 1) % limits.frame_multiple == 0
    assert abs((frames - 1) - 16) <= limits.frame_multiple
    assert frames_for(1000, 16, limits) <= limits.max_frames


@pytest.fixture(scope="module")
def i2v_model() -> VideoModel:
    return VideoModel.load("embedded:tiny-wan-i2v")


def png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, "PNG")
    return buffer.getvalue()


def test_an_image_to_video_job_starts_from_its_reference(i2v_model, jobs, files):
    clips = []
    for colour in ((250, 10, 10), (10, 10, 250)):
        name = files.save(png(colour), "png")
        record = jobs.create("owner", spec(model="tiny-wan-i2v", reference_name=name))
        assert runner(i2v_model, jobs, files).run(record.id) == "completed"
        assert files.read(name) is None  # the reference goes once the job is done
        clips.append(files.read(jobs.get(record.id).video_name))
    assert clips[0] != clips[1]
    # Its reference expired before the job ran: the job fails, naming it.
    record = jobs.create("owner", spec(model="tiny-wan-i2v", reference_name="gone.png"))
    assert runner(i2v_model, jobs, files).run(record.id) == "failed"
    assert "input_reference" in jobs.get(record.id).error_message
