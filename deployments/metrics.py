"""Application metrics, through Ray's metrics API.

Ray exports them from every node on its Prometheus endpoint (the node's metrics export port),
next to Serve's own request metrics, with the prefix `ray_`; Ray's Grafana dashboards read
the same Prometheus. Generator replicas record what the model does; the ingress records the
errors clients get. The generator's metrics carry the model id as their `model` tag.
"""

from __future__ import annotations

from collections.abc import Mapping

from ray.util.metrics import Counter, Gauge, Histogram

# Seconds of one pipeline call, from a tiny model on a CPU to a large one on a busy GPU.
GENERATION_SECONDS_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32]
# Seconds to load one LoRA adapter into a replica's pipeline (every call waits meanwhile).
ADAPTER_LOAD_SECONDS_BOUNDARIES = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]


class GeneratorMetrics:
    """Recorded by a generator replica's engine (see `EngineMetrics`)."""

    def __init__(self, model_id: str) -> None:
        tags = {"model": model_id}
        self._images = Counter(
            "image_generation_images",
            description="Images generated.",
            tag_keys=("model",),
        )
        self._seconds = Histogram(
            "image_generation_seconds",
            description="Seconds of each pipeline call (a batch): prompt encoding, denoising "
            "and decoding.",
            boundaries=GENERATION_SECONDS_BOUNDARIES,
            tag_keys=("model",),
        )
        self._steps = Counter(
            "image_generation_denoising_steps",
            description="Denoising steps run (one step of a batch counts once).",
            tag_keys=("model",),
        )
        self._steps_per_second = Gauge(
            "image_generation_denoising_steps_per_second",
            description="Denoising steps per second of the replica's latest batch.",
            tag_keys=("model",),
        )
        self._batch_size = Histogram(
            "image_generation_batch_size",
            description="Images in each pipeline call.",
            boundaries=BATCH_SIZE_BOUNDARIES,
            tag_keys=("model",),
        )
        self._waiting = Gauge(
            "image_generation_requests_waiting",
            description="Requests on the replica waiting for their batch to start.",
            tag_keys=("model",),
        )
        # Tagged by adapter too: a model's adapters are few (they are configured).
        self._adapter_load_seconds = Histogram(
            "image_generation_adapter_load_seconds",
            description="Seconds to load a LoRA adapter into a replica's pipeline (its calls "
            "wait meanwhile).",
            boundaries=ADAPTER_LOAD_SECONDS_BOUNDARIES,
            tag_keys=("model", "adapter"),
        )
        self._adapter_loads = Counter(
            "image_generation_adapter_loads",
            description="LoRA adapters loaded into replicas' pipelines (a count that grows "
            "fast means adapters are evicted and loaded again: raise max_adapters_per_replica "
            "or add replicas).",
            tag_keys=("model", "adapter"),
        )
        for metric in (
            self._adapter_load_seconds,
            self._adapter_loads,
            self._images,
            self._seconds,
            self._steps,
            self._steps_per_second,
            self._batch_size,
            self._waiting,
        ):
            metric.set_default_tags(tags)
        self._waiting.set(0)

    def batch_finished(self, images: int, generate_s: float, steps: int, denoise_s: float) -> None:
        self._images.inc(images)
        self._seconds.observe(generate_s)
        self._steps.inc(steps)
        if denoise_s > 0:
            self._steps_per_second.set(steps / denoise_s)
        self._batch_size.observe(images)

    def queue_changed(self, waiting_jobs: int) -> None:
        self._waiting.set(waiting_jobs)

    def adapter_loaded(self, adapter_id: str, seconds: float) -> None:
        self._adapter_load_seconds.observe(seconds, tags={"adapter": adapter_id})
        self._adapter_loads.inc(1, tags={"adapter": adapter_id})


class IngressMetrics:
    """Recorded by the ingress: each error answer, by its OpenAI error type and code; each
    image request's end by model and priority class; and with quotas on, each key's
    requests and image-steps. A key's label is its configured name or a
    short hash of it, never the key, and their number is capped (`max_metric_keys`)."""

    def __init__(self) -> None:
        self._errors = Counter(
            "image_generation_errors",
            description="Requests answered with an error, by error type and code.",
            tag_keys=("type", "code"),
        )
        self._key_requests = Counter(
            "image_generation_key_requests",
            description="Image requests of each API key by quota outcome: admitted, "
            "unchecked (the quota store was down, on_store_error open), or the limit that "
            "refused it (requests, image_steps, concurrent_requests, too_large).",
            tag_keys=("key", "outcome"),
        )
        self._key_image_steps = Counter(
            "image_generation_key_image_steps",
            description="Image-steps (usage.output_tokens) of each API key's admitted requests.",
            tag_keys=("key",),
        )
        self._blocked = Counter(
            "image_generation_moderation_blocked",
            description="Requests refused by moderation (`moderation_blocked`), by model, API "
            "key and what was blocked: `prompt` (the blocklist) or `image` (the model's "
            "safety checker).",
            tag_keys=("model", "key", "what"),
        )
        self._class_requests = Counter(
            "image_generation_class_requests",
            description="Image requests by model, priority class and outcome: ok, "
            "client_error, error, cancelled, timed_out (504), refused_late (503 "
            "`deadline_unreachable`: it could not have finished by its deadline).",
            tag_keys=("model", "priority", "outcome"),
        )
        self._class_seconds = _seconds_by_class(
            "image_generation_class_seconds",
            "Seconds from arrival to answer of each successful image request",
        )
        self._class_queue_seconds = _seconds_by_class(
            "image_generation_class_queue_seconds",
            "Seconds each successful image request waited in its generator replica before "
            "its images started",
        )
        self._store_errors = Counter(
            "image_generation_quota_store_errors",
            description="Quota decisions or slot releases that failed because Redis did not "
            "answer.",
            tag_keys=("operation",),
        )

    def error(self, error_type: str, code: str | None) -> None:
        self._errors.inc(1, tags={"type": error_type, "code": code or "none"})

    def request_finished(self, fields: Mapping[str, object]) -> None:
        """An image request's end, by model and priority class: its outcome; if it succeeded,
        its seconds in all and waiting in its replica's queue."""
        tags = {
            "model": str(fields.get("model") or "none"),
            "priority": str(fields.get("priority") or "none"),
        }
        self._class_requests.inc(1, tags={**tags, "outcome": class_outcome(fields)})
        if fields.get("outcome") != "ok":
            return
        total_s = fields.get("total_s")
        if isinstance(total_s, float | int):
            self._class_seconds.observe(float(total_s), tags=tags)
        queue_s = fields.get("queue_s")
        if isinstance(queue_s, float | int):
            self._class_queue_seconds.observe(float(queue_s), tags=tags)

    def key_request(self, key: str, outcome: str, image_steps: int) -> None:
        self._key_requests.inc(1, tags={"key": key, "outcome": outcome})
        if image_steps:
            self._key_image_steps.inc(image_steps, tags={"key": key})

    def moderation_blocked(self, model: str, key: str, what: str) -> None:
        self._blocked.inc(1, tags={"model": model or "none", "key": key, "what": what})

    def quota_store_error(self, operation: str) -> None:
        self._store_errors.inc(1, tags={"operation": operation})


# Seconds a video job waits in its queue, or takes from creation to its end: from a tiny
# model on a CPU to a long clip on a busy GPU.
VIDEO_JOB_SECONDS_BOUNDARIES = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600]


def _seconds_by_class(name: str, what: str) -> Histogram:
    return Histogram(
        name,
        description=f"{what}, by model and priority class.",
        boundaries=GENERATION_SECONDS_BOUNDARIES,
        tag_keys=("model", "priority"),
    )


def class_outcome(fields: Mapping[str, object]) -> str:
    """A request's outcome in the per-class metrics: its log line's, with timeouts and
    deadline refusals told apart from other errors."""
    if fields.get("error_code") == "deadline_unreachable":
        return "refused_late"
    if fields.get("status") == 504:
        return "timed_out"
    return str(fields.get("outcome") or "none")


class VideoMetrics:
    """Recorded by a video replica: its jobs' ends, waits and webhook deliveries."""

    def __init__(self, model_id: str) -> None:
        self._tags = {"model": model_id}
        self._jobs = Counter(
            "video_generation_jobs",
            description="Video jobs ended, by outcome (completed, failed, cancelled).",
            tag_keys=("model", "outcome"),
        )
        self._wait = Histogram(
            "video_generation_queue_wait_seconds",
            description="Seconds from a job's creation to the start of its (first) run.",
            boundaries=VIDEO_JOB_SECONDS_BOUNDARIES,
            tag_keys=("model",),
        )
        self._latency = Histogram(
            "video_generation_job_seconds",
            description="Seconds from a job's creation to its end.",
            boundaries=VIDEO_JOB_SECONDS_BOUNDARIES,
            tag_keys=("model",),
        )
        self._queued = Gauge(
            "video_generation_queue_length",
            description="Jobs waiting in the model's queue, as its replica last saw it.",
            tag_keys=("model",),
        )
        self._webhooks = Counter(
            "video_generation_webhook_deliveries",
            description="Webhook delivery tries, by outcome (delivered, retrying, failed, "
            "dropped).",
            tag_keys=("model", "outcome"),
        )

    def job_started(self, waited_s: float, queue_length: int) -> None:
        self._wait.observe(max(0.0, waited_s), tags=self._tags)
        self._queued.set(queue_length, tags=self._tags)

    def job_ended(self, outcome: str, seconds: float) -> None:
        self._jobs.inc(tags={**self._tags, "outcome": outcome})
        if outcome != "cancelled":
            self._latency.observe(max(0.0, seconds), tags=self._tags)

    def webhook_attempt(self, outcome: str) -> None:
        self._webhooks.inc(tags={**self._tags, "outcome": outcome})
