"""The Ray Serve application: `import_path: serve_app:build_app` in a Serve config.

`build_app(args)` turns the config's `args:` (validated by `deployments.config.AppArgs`) into
an application of two deployments: `ImageIngress` (HTTP, no model) in front of
`ImageGenerator` (the model's replicas). `serve_app:app` is the same with default args: the
embedded tiny model on the CPU, for `serve run serve_app:app`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from deployments.config import AppArgs
from deployments.generator import ImageGenerator
from deployments.ingress import ImageIngress


class InvalidArgs(ValueError):
    """The Serve config's `args:` do not describe a valid application."""


def parse_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate `args:`, with one line per problem naming the key (unknown keys included)."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(part) for part in error["loc"]) or "args"
            reason = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
            problems.append(f"  args.{key}: {reason}")
        raise InvalidArgs("invalid application args:\n" + "\n".join(problems)) from None


def build_app(args: dict[str, Any] | AppArgs | None = None) -> Application:
    return build_application(parse_args(args))


def build_application(
    args: AppArgs,
    generator_options: Mapping[str, Any] | None = None,
    ingress_options: Mapping[str, Any] | None = None,
) -> Application:
    """The application for validated args. The options override each deployment's options in
    code, as a config's `deployments:` entries do (tests use them)."""
    generator = ImageGenerator.options(**(generator_options or {})).bind(
        args.model, args.worker_threads, args.batching
    )
    return ImageIngress.options(**(ingress_options or {})).bind(args, generator)


app = build_app()
