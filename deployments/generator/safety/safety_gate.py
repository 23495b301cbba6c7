"""Where a model's images meet its safety checker: in the worker thread that made them,
before they leave the replica.

- A job's finished images are scored together, right after they are decoded (both paths,
  request-level calls and the continuous loop, hand each job's result to `screen`). If any
  image reaches a threshold, the job fails with `ImagesBlocked` and none of its images is
  returned: OpenAI answers a blocked request with an error, not with some of its images,
  and an `n` > 1 request whose one image is blocked is refused whole (the others are
  counted in its usage, as the work was done).
- A streamed job's previews are scored before they are sent (`screened`): a preview that
  reaches a threshold is not sent, and the stream goes on; its final images are checked as
  any others. So a preview of an image later blocked is never sent unchecked, and one
  that passes was itself checked.
Scoring runs in the worker thread (`model/torch_threads.py`: only the pool's threads run
torch), with the job's thresholds (`moderation: low` takes the model's relaxed ones).
"""

from __future__ import annotations

import logging

from deployments.config.safety_config import SafetyConfig
from deployments.generator.safety.image_checker import ImageChecker
from deployments.jobs import (
    EventSink,
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ImagesBlocked,
    PartialImage,
)

logger = logging.getLogger("ray.serve")


class SafetyGate:
    """A model's checker and its thresholds, as every image of the replica meets them."""

    def __init__(self, checker: ImageChecker, config: SafetyConfig) -> None:
        self._checker = checker
        self._config = config

    def screen(
        self, job: GenerationJob, result: GeneratedImages | Exception
    ) -> GeneratedImages | Exception:
        """The job's result if none of its images is blocked, else `ImagesBlocked`."""
        if isinstance(result, Exception):
            return result
        categories = self._blocked_categories(job, result.images)
        blocked = sum(1 for found in categories if found)
        if not blocked:
            return result
        named = tuple(sorted({name for found in categories for name in found}))
        # The request id and the categories only: never the prompt or the image.
        logger.info(
            "request %s: %d of %d images blocked (%s)",
            job.request_id,
            blocked,
            len(result.images),
            ", ".join(named),
        )
        return ImagesBlocked(blocked, len(result.images), named)

    def screened(self, job: GenerationJob, sink: EventSink) -> EventSink:
        """`sink`, sending only the previews that pass the checker."""

        def send(event: GenerationEvent) -> None:
            if isinstance(event, PartialImage) and self._blocked_categories(job, [event.pixels])[0]:
                logger.info("request %s: a preview was blocked, not sent", job.request_id)
                return
            sink(event)

        return send

    def _blocked_categories(self, job: GenerationJob, images: list) -> list[tuple[str, ...]]:
        """For each image, the categories in which it reaches its threshold."""
        thresholds = self._config.thresholds_for(job.moderation)
        scores = self._checker.scores(images)
        return [
            tuple(name for name, limit in thresholds.items() if score.get(name, 0.0) >= limit)
            for score in scores
        ]
