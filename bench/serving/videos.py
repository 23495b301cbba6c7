"""Video jobs through the served Videos API, against the bare video pipeline.

    python -m bench.serving.videos            # writes bench/results/videos.json
    python -m bench.serving.videos --quick    # fewer jobs

One `serve run` of `config/local-videos.yaml` (its tiny Wan on one replica, a Redis of the
benchmark's own with AOF on), as a user runs it. Measured:
- capacity: a burst of jobs created at once, served one at a time by the one replica: jobs/s
  from the first creation to the last completion;
- open loops of Poisson arrivals at 1x and 2x that capacity (a fixed number of jobs each):
  jobs/s served, the queue wait (creation to the start of the job's run, from the records'
  millisecond timestamps) and the latency (the POST's start to the record's completion,
  watched in Redis every 50 ms: polling the API as often from every waiting client would
  load the two cores the service runs on), p50 and p95;
- the bare pipeline in this process (`VideoModel`, the same request one after another): the
  ceiling, in frames x pixels x steps per second, against what the service serves.
Every figure is of this machine's CPU; a GPU's would differ in every part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

from bench.harness.results import RESULTS, machine, write_json
from bench.harness.serve_run import SAME_PRIORITY
from deployments.videos.video_jobs import VideoJobStore
from tests.harness import REPO, ServeRun, free_port, load_config, with_overrides

CONFIG = REPO / "config" / "local-videos.yaml"
MODEL = "tiny-wan"
# (size, seconds): the shipped config's smallest clip, and a larger one where the model's
# own work weighs more against each job's fixed costs (queue, MP4, storage).
CLIPS = (("64x64", 1), ("128x128", 2))
STEPS = 4
POLL_S = 0.05


def start_redis(directory: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 15
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class Jobs:
    """Creates jobs and watches them to their end, from any number of threads."""

    def __init__(self, base_url: str, store: VideoJobStore, size: str, seconds: int) -> None:
        self._base_url = base_url
        self._store = store
        self._size = size
        self._seconds = seconds
        self.ended: list[dict] = []
        self._lock = threading.Lock()

    def run_one(self, seed: int) -> None:
        created = time.time()
        with httpx.Client(base_url=self._base_url, timeout=60) as client:
            answer = client.post(
                "/v1/videos",
                data={"model": MODEL, "prompt": "a fox", "size": self._size,
                      "seconds": str(self._seconds), "num_inference_steps": str(STEPS),
                      "seed": str(seed)},
            )  # fmt: skip
            answer.raise_for_status()
            video_id = answer.json()["id"]
        while True:
            video = self._store.get(video_id)
            if video is not None and video.status in ("completed", "failed"):
                break
            time.sleep(POLL_S)
        with self._lock:
            self.ended.append(
                {
                    "status": video.status,
                    "latency_s": time.time() - created,
                    "wait_s": (
                        video.started_at - video.queued_at
                        if video.started_at and video.queued_at
                        else None
                    ),
                    "ended": time.time(),
                    "created": created,
                }
            )


def burst(jobs: Jobs, count: int) -> float:
    """Jobs/s of `count` jobs created at once."""
    jobs.ended.clear()
    threads = [threading.Thread(target=jobs.run_one, args=(seed,)) for seed in range(count)]
    started = time.time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count / (max(job["ended"] for job in jobs.ended) - started)


def open_loop(jobs: Jobs, rate: float, count: int, seed: int) -> dict:
    """Poisson arrivals at `rate` jobs/s, `count` jobs: what was served and how long jobs
    waited."""
    jobs.ended.clear()
    rng = random.Random(seed)
    threads = []
    started = time.time()
    for index in range(count):
        thread = threading.Thread(target=jobs.run_one, args=(index,))
        thread.start()
        threads.append(thread)
        time.sleep(rng.expovariate(rate))
    for thread in threads:
        thread.join()
    waits = sorted(job["wait_s"] for job in jobs.ended if job["wait_s"] is not None)
    latencies = sorted(job["latency_s"] for job in jobs.ended)
    return {
        "arrival_rate": round(rate, 3),
        "jobs": count,
        "completed": sum(job["status"] == "completed" for job in jobs.ended),
        "served_jobs_per_s": round(count / (max(j["ended"] for j in jobs.ended) - started), 3),
        "queue_wait_p50_s": round(statistics.median(waits), 3),
        "queue_wait_p95_s": round(waits[int(0.95 * (len(waits) - 1))], 3),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
    }


def bare_rate(runs: int, size: str, seconds: int) -> dict:
    """The tiny Wan in this process, the same job one after another: frames x pixels x
    steps per second (the first call, a warm-up, left out)."""
    from deployments.video.job_runner import frames_for
    from deployments.video.video_model import VideoModel, VideoRequest

    model = VideoModel.load("embedded:tiny-wan")
    width, height = (int(side) for side in size.split("x"))
    frames = frames_for(seconds, model.limits.default_fps, model.limits)
    request = VideoRequest("a fox", None, width, height, frames, STEPS, None, seed=0)
    model.generate(request)
    started = time.perf_counter()
    for _ in range(runs):
        model.generate(request)
    seconds = (time.perf_counter() - started) / runs
    work = frames * width * height * STEPS
    return {"frames": frames, "seconds_per_job": round(seconds, 3), "work_per_job": work}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs")
    options = parser.parse_args()
    count = 8 if options.quick else 24
    workdir = Path(tempfile.mkdtemp(prefix="bench-videos-"))
    process, url = start_redis(workdir)
    config = load_config(CONFIG)
    (video_model,) = config["applications"][0]["args"]["videos"]["models"]
    # One replica throughout: the capacity measured is one replica's.
    video_model["deployment"].pop("autoscaling_config")
    video_model["deployment"]["num_replicas"] = 1
    config = with_overrides(
        config, port=free_port(), args={"storage": {"directory": str(workdir / "files")}}
    )
    env = {"IMAGE_SERVICE_VIDEO_REDIS_URL": url, **SAME_PRIORITY}
    results: dict = {"date": datetime.date.today().isoformat(), "machine": machine()}
    clips: dict[str, dict] = {}
    try:
        with ServeRun(config, env=env) as server:
            server.wait_for_first_image(timeout_s=240)
            store = VideoJobStore.connect(url, "image-service:video:", lease_s=30)
            for size, seconds in CLIPS:
                jobs = Jobs(server.base_url, store, size, seconds)
                burst(jobs, 2)  # warm-up: a replica's first job pays for its first call
                capacity = burst(jobs, count)
                clips[f"{size}x{seconds}s"] = {
                    "capacity_jobs_per_s": round(capacity, 3),
                    "load_1x": open_loop(jobs, capacity, count, seed=1),
                    "load_2x": open_loop(jobs, 2 * capacity, count, seed=2),
                }
    finally:
        process.terminate()
    for size, seconds in CLIPS:
        figures = clips[f"{size}x{seconds}s"]
        bare = bare_rate(count, size, seconds)
        served = figures["capacity_jobs_per_s"] * bare["work_per_job"]
        figures["bare"] = bare
        figures["served_work_per_s"] = round(served)
        figures["bare_work_per_s"] = round(bare["work_per_job"] / bare["seconds_per_job"])
        figures["served_vs_bare"] = round(served / figures["bare_work_per_s"], 3)
    results["clips"] = clips
    print(json.dumps(clips, indent=2))
    write_json(results, RESULTS / "videos.json")


if __name__ == "__main__":
    main()
