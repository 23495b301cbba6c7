"""The Ray Serve application: `import_path: serve_app:build_app` in a Serve config.

`build_app(args)` turns the config's `args:` (validated by
`deployments.config.app_config.AppArgs`) into an application: `ImageIngress` (HTTP, no
model) in front of one `ImageGenerator:<model id>` deployment per model (that model's
replicas, with the model's own deployment options), and one `VideoGenerator:<model id>`
per video model of `args.videos` (each a consumer of its model's job queue).
`serve_app:app` is the same with default args: the embedded tiny model on the CPU, for
`serve run serve_app:app`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from deployments.config.app_config import AppArgs
from deployments.config.model_config import generator_deployment_name
from deployments.generator.deployment import ImageGenerator
from deployments.generator.model.pipelines import pipeline_class_named
from deployments.ingress.deployment import ImageIngress
from deployments.video.deployment import video_deployment


class InvalidArgs(ValueError):
    """The Serve config's `args:` do not describe a valid application."""


def parse_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate `args:`, with one line per problem naming the key (unknown keys included)."""
    if isinstance(args, AppArgs):
        return args
    try:
        parsed = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(part) for part in error["loc"]) or "args"
            reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"  args.{key}: {reason}")
        raise InvalidArgs("invalid application args:\n" + "\n".join(problems)) from None
    # The config only checks the name's shape (the ingress must not import diffusers); this
    # process builds the generators anyway, so a misspelt class fails here, before deploying.
    for index, model in enumerate(parsed.models):
        try:
            pipeline_class_named(model.pipeline_class)
        except ValueError:
            raise InvalidArgs(
                "invalid application args:\n"
                f"  args.models.{index}.pipeline_class: diffusers has no pipeline class named "
                f"{model.pipeline_class!r}"
            ) from None
    return parsed


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    return build_application(parse_args(args))


def build_application(
    args: AppArgs,
    generator_options: Mapping[str, Any] | None = None,
    ingress_options: Mapping[str, Any] | None = None,
    video_options: Mapping[str, Any] | None = None,
) -> Application:
    """The application for validated args. The options override every generator's, the
    ingress's and every video model's options in code, as a config's `deployments:`
    entries do (tests use them)."""
    generators = {
        model.id: ImageGenerator.options(
            name=generator_deployment_name(model.id),
            **model.deployment_options(generator_options),
        ).bind(model, *args.engine_settings(model))
        for model in args.models
    }
    video_generators = {}
    if args.videos is not None:
        redis_url = args.videos.resolved_redis_url()
        video_generators = {
            model.id: video_deployment(model, args.videos, redis_url, video_options).bind(
                model, args.videos, args.storage, redis_url
            )
            for model in args.videos.models
        }
    return ImageIngress.options(**(ingress_options or {})).bind(args, generators, video_generators)


app = build_app()
