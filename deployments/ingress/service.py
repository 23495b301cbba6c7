"""What the API does, as methods that take plain values: the routes of
`deployments/ingress/app.py` are a few lines each over an `ImageService`, and unit tests call
its methods without HTTP.

A request goes: `scope` (its id, log line and deadline) -> `prepare_generation` or
`prepare_edit` (route by `model`, validate as `validation/request_validation.py` says,
build the `GenerationJob`) -> `run` (hand the job to the model's backend, then encode
and store its images here, so generator replicas spend their time on the model alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from starlette.concurrency import run_in_threadpool

from deployments.config.app_config import AppArgs
from deployments.config.model_config import ModelConfig
from deployments.ingress.adapter_catalog import describe_adapters
from deployments.ingress.bodies import EditForm
from deployments.ingress.deadline import Deadline
from deployments.ingress.errors import (
    APIError,
    invalid_request,
    storage_unavailable,
)
from deployments.ingress.model_catalog import ModelCatalog, Target
from deployments.ingress.moderation import check_moderation_level, prompt_blocklists
from deployments.ingress.output import ImagePackager
from deployments.ingress.priorities import Priorities
from deployments.ingress.protocol import (
    ImageRequest,
    ImagesResponse,
    Model,
    ModelCapabilitiesCard,
    ModelList,
)
from deployments.ingress.request_log import RequestLog
from deployments.ingress.streaming import EventEncoder, first_event, sse_body, timings_of
from deployments.ingress.uploads import ReferenceRules, UploadError, read_edit_inputs
from deployments.ingress.usage import JobCost, job_cost
from deployments.ingress.validation.request_validation import RequestValidator
from deployments.ingress.validation.unicode_text import refuse_unencodable
from deployments.jobs import (
    GeneratedImages,
    GenerationEvent,
    GenerationJob,
    ModelCapabilities,
    Task,
)
from deployments.scheduling.job_schedule import UNSCHEDULED, JobSchedule
from deployments.storage import ImageStorage, StorageUnavailable, open_store

logger = logging.getLogger("ray.serve")

# How long `GET /v1/models` waits for a model's replicas to say what it takes: a listing
# must not wait for a model still starting (its card then has no capabilities).
CARD_WAIT_S = 2.0


class ImageBackend(Protocol):
    """Generates the images of a job. Raises `APIError` for failures the client should see."""

    async def generate(self, job: GenerationJob) -> GeneratedImages: ...

    async def capabilities(self) -> ModelCapabilities:
        """What the model's pipeline can do (the same for the backend's whole life)."""
        ...

    def stream(self, job: GenerationJob) -> AsyncIterator[GenerationEvent]:
        """Progress and previews as the job runs, then its `GeneratedImages`; closing the
        iterator early cancels the job."""
        ...


class ErrorMetrics(Protocol):
    def error(self, error_type: str, code: str | None) -> None: ...

    def moderation_blocked(self, model: str, key: str, what: str) -> None: ...

    def request_finished(self, fields: Mapping[str, object]) -> None:
        """An image request ended; `fields` are its log line's (`request_log.py`)."""
        ...


@dataclass
class RequestScope:
    """One request's id, log line, and the deadline of everything it waits for; its API
    key's digest (None without keys), and its model once it is known."""

    request_id: str
    log: RequestLog
    deadline: Deadline
    key_digest: bytes | None = None
    model_id: str = ""
    # Its class and deadline, as its job carries them (`priorities.py`).
    schedule: JobSchedule = UNSCHEDULED

    @property
    def key_label(self) -> str:
        """The key in the metrics: a short hash of it, never the key itself."""
        return f"key-{self.key_digest.hex()[:8]}" if self.key_digest else "none"


@dataclass(frozen=True)
class PreparedJob:
    """A validated request, ready to run on its model's backend."""

    params: ImageRequest
    job: GenerationJob
    backend: ImageBackend
    # OpenAI's event names: `image_generation.*` for generations, `image_edit.*` for edits.
    event_prefix: Literal["image_generation", "image_edit"]
    cost: JobCost


class ImageService:
    """The API's behaviour over one backend per model id of `args.models`."""

    def __init__(
        self,
        args: AppArgs,
        backends: Mapping[str, ImageBackend],
        store: ImageStorage | None = None,
        metrics: ErrorMetrics | None = None,
    ) -> None:
        self.args = args
        self.models = ModelCatalog(args)
        model_ids = sorted(args.model_by_id())
        if sorted(backends) != model_ids:
            raise ValueError(f"backends for {sorted(backends)}, models {model_ids}")
        self._backends = dict(backends)
        self.validator = RequestValidator(args.limits)
        self._blocklists = prompt_blocklists(args)
        self.priorities = Priorities(args)
        # Opening a bucket checks that it is reachable: a wrong one fails the ingress's start.
        self.store = store or open_store(args.storage)
        self._metrics = metrics

    # --- models ---

    async def list_models(self) -> ModelList:
        listed = await self.models.list_models()
        return ModelList(
            data=list(await asyncio.gather(*map(self._with_capabilities, listed.data)))
        )

    async def get_model(self, model_id: str) -> Model:
        return await self._with_capabilities(await self.models.get_model(model_id))

    async def _with_capabilities(self, card: Model) -> Model:
        """A model's card with what its replicas reported (an adapter's card is its own)."""
        backend = self._backends.get(card.id)
        if backend is None:
            return card
        reported = await self.validator.reported(card.id, backend.capabilities, CARD_WAIT_S)
        if reported is None:
            return card
        return card.model_copy(update={"capabilities": ModelCapabilitiesCard.of(reported)})

    async def target_of(self, requested: object) -> Target:
        return await self.models.target_of(requested)

    # --- requests ---

    @contextlib.asynccontextmanager
    async def scope(
        self,
        request_id: str,
        endpoint: str,
        key_digest: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[RequestScope]:
        """A request's scope; its one log line is written however the request ends (a
        successful answer writes it when its images are sent). `headers` may ask for a
        priority class and a shorter timeout (`priorities.py`)."""
        finished = self._metrics.request_finished if self._metrics is not None else None
        log = RequestLog(request_id, endpoint, finished)
        scope = RequestScope(request_id, log, Deadline(self.args.request_timeout_s), key_digest)
        try:
            scope.schedule = self.priorities.schedule(headers or {}, key_digest)
            scope.deadline = Deadline(scope.schedule.deadline - scope.schedule.arrived)
            log.add(priority=scope.schedule.priority_class)
            yield scope
        except APIError as error:
            log.finish(error.status_code, error.code)
            self._count_blocked(scope, error)
            raise
        except asyncio.CancelledError:
            log.finish(499, "client_closed_request")
            raise
        except Exception:
            log.finish(500, "internal_error")
            raise

    async def prepare_generation(self, body: object, scope: RequestScope) -> PreparedJob:
        """A generation request's job, from its JSON body."""
        refuse_unencodable(body)
        target = await self.target_of(body.get("model") if isinstance(body, dict) else None)
        model = target.model
        backend = self._backends[model.id]
        scope.model_id = model.id
        params, context = await self.validator.generation(
            body, model, backend.capabilities, scope.deadline
        )
        self._moderate(params, model, scope)
        adapters = self.models.adapters.resolve(model, target.adapter, params.lora)
        job = params.to_job(context, scope.request_id, adapters=adapters)
        job = replace(job, schedule=scope.schedule)
        scope.log.add(**self._logged_parameters(params, job, model.id))
        cost = job_cost(job, context.capabilities)
        return PreparedJob(params, job, backend, "image_generation", cost)

    async def prepare_edit(self, form: EditForm, scope: RequestScope) -> PreparedJob:
        """An edit request's job, from its form: the uploads decoded and scaled to the
        output size."""
        refuse_unencodable(form.fields)
        target = await self.target_of(form.fields.get("model"))
        model = target.model
        backend = self._backends[model.id]
        task: Task = "image-to-image" if form.mask is None else "inpaint"
        # Refused before any image is decoded if the model cannot do this edit.
        scope.model_id = model.id
        params, context = await self.validator.edit(
            form.fields, task, model, backend.capabilities, scope.deadline, len(form.images)
        )
        self._moderate(params, model, scope)
        adapters = self.models.adapters.resolve(model, target.adapter, params.lora)
        capabilities = context.capabilities
        try:
            inputs = await run_in_threadpool(
                read_edit_inputs,
                form.images,
                form.mask,
                self.args.limits.max_input_pixels,
                lambda input_size: params.output_size(context, input_size),
                # A mask makes it an inpaint, which starts from its one image.
                ReferenceRules.of(capabilities) if form.mask is None else None,
            )
        except UploadError as error:
            raise invalid_request(error.message, param=error.param, code="invalid_image") from None
        job = params.to_job(
            context,
            scope.request_id,
            image=inputs.image,
            mask=inputs.mask,
            references=inputs.references,
            input_size=inputs.input_size,
            adapters=adapters,
        )
        job = replace(job, schedule=scope.schedule)
        scope.log.add(**self._logged_parameters(params, job, model.id))
        return PreparedJob(params, job, backend, "image_edit", job_cost(job, context.capabilities))

    async def run(
        self, prepared: PreparedJob, base_url: str, scope: RequestScope
    ) -> ImagesResponse | AsyncIterator[bytes]:
        """Run a prepared job: its images, or with `stream` the frames of its event stream."""
        params, job, backend = prepared.params, prepared.job, prepared.backend
        packager = ImagePackager(params, self.store, self.args.storage.public_base_url or base_url)
        if params.stream:
            events = backend.stream(job)
            first = await first_event(events, scope.deadline)
            encoder = EventEncoder(params, job, packager, prepared.event_prefix, prepared.cost)

            def report_error(error: APIError) -> None:
                self.report_error(error)
                self._count_blocked(scope, error)

            return sse_body(first, events, encoder, scope.deadline, scope.log, report_error)
        # On timeout the wait is cancelled; the backend passes that on to the replica, where
        # a waiting job leaves its batch and a running one stops at its next step.
        generated = await scope.deadline.wait(backend.generate(job))
        encode_started = time.perf_counter()
        images = await run_in_threadpool(packager.images, generated.images, generated.seeds)
        scope.log.add(**timings_of(generated), encode_s=time.perf_counter() - encode_started)
        scope.log.finish(200)
        return ImagesResponse(
            created=int(time.time()),
            data=images,
            output_format=params.output_format,
            size=job.size,
            usage=prepared.cost.usage(generated.text_tokens),
        )

    def image_file(self, name: str) -> bytes:
        """The bytes of a stored image; 404 if there is none (or it expired), a retryable 503
        if the store cannot be reached (the image may well be there). Blocks: called in a
        worker thread."""
        try:
            data = self.store.read(name)
        except StorageUnavailable as error:
            logger.error("reading a stored image failed: %s", error)
            raise storage_unavailable(reading=True) from None
        if data is None:
            raise APIError(
                404,
                "No such image, or it has expired.",
                type="invalid_request_error",
                code="image_not_found",
            )
        return data

    def report_error(self, error: APIError) -> None:
        if self._metrics is not None:
            self._metrics.error(error.type, error.code)

    # --- helpers ---

    def _moderate(self, params: ImageRequest, model: ModelConfig, scope: RequestScope) -> None:
        """Before any compute: the prompt blocklist, and whether the request may ask for its
        `moderation` level (`deployments/ingress/moderation.py`)."""
        blocklist = self._blocklists.get(model.id)
        if blocklist is not None:
            blocklist.check(scope.request_id, params.prompt, params.negative_prompt)
        check_moderation_level(params.moderation_level, model, scope.key_digest)

    def _count_blocked(self, scope: RequestScope, error: APIError) -> None:
        """Blocked prompts and images, per model and key (never what was blocked)."""
        if error.code != "moderation_blocked" or self._metrics is None:
            return
        what = "prompt" if error.param == "prompt" else "image"
        self._metrics.moderation_blocked(scope.model_id, scope.key_label, what)

    def _logged_parameters(
        self, params: ImageRequest, job: GenerationJob, model_id: str
    ) -> dict[str, object]:
        """What a request's log line says of what it asked for (the prompt only if
        configured)."""
        fields: dict[str, object] = {
            "model": model_id,
            "adapters": describe_adapters(job.adapters),
            "user": params.user,
            "safety_identifier": params.safety_identifier,
            "n": job.num_images,
            "size": job.size,
            "steps": job.num_inference_steps,
            "guidance_scale": job.guidance_scale,
            "seed": job.seeds[0],
            "has_negative_prompt": job.negative_prompt is not None,
            "response_format": params.response_format,
            "output_format": params.output_format,
            "stream": params.stream,
            "partial_images": params.partial_images,
            "task": job.task,
            "strength": job.strength,
            "prompt_chars": len(job.prompt),
        }
        if self.args.request_logs.include_prompts:
            fields["prompt"] = job.prompt
            fields["negative_prompt"] = job.negative_prompt
        return fields
