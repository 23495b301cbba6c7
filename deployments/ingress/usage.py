"""What a request costs, in the units of its `usage` (docs/usage-and-quotas.md):

- output tokens are image-steps: each image counts the denoising steps it runs (an edit runs
  `num_inference_steps x strength` of them, rounded as its pipeline rounds), so n images of
  s steps are n x s. The ingress knows them before the job runs, which lets a key's
  `image_steps` budget charge a request when it is admitted, the same number its usage shows;
- image tokens (edits) are the uploads: 1 for each input image, 1 more for a mask;
- text tokens are counted by the generator replica, which has the model's tokenizer (the
  ingress has none): they come back with the images (`GeneratedImages.text_tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.ingress.protocol import InputTokensDetails, Usage
from deployments.jobs import GenerationJob, ModelCapabilities


@dataclass(frozen=True)
class JobCost:
    """The part of a job's usage known before it runs."""

    image_steps: int
    image_tokens: int

    def usage(self, text_tokens: int) -> Usage:
        input_tokens = text_tokens + self.image_tokens
        return Usage(
            input_tokens=input_tokens,
            input_tokens_details=InputTokensDetails(
                image_tokens=self.image_tokens, text_tokens=text_tokens
            ),
            output_tokens=self.image_steps,
            total_tokens=input_tokens + self.image_steps,
        )


def job_cost(job: GenerationJob, capabilities: ModelCapabilities) -> JobCost:
    steps = job.num_inference_steps
    if job.strength is not None:
        steps = capabilities.edit_steps(job.task, steps, job.strength)
    uploads = (job.image is not None) + (job.mask is not None) + len(job.references)
    return JobCost(image_steps=job.num_images * steps, image_tokens=uploads)
