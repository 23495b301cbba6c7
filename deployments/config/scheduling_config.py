"""Priorities and deadlines (`args.scheduling`): which class a request runs in, and how long
a waiting request of a lower class waits before it counts as one class higher.

Shared by both sides like the rest of the args: the ingress gives each request its class and
deadline (`deployments/ingress/priorities.py`); the generator orders its queue by them and
refuses what cannot finish in time (`deployments/scheduling/`). With no keys listed and no
header allowed, every request is in `default_class`: the queue is first come, first served,
as it was before classes.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from deployments.config.base import Strict

# Names of classes: also the `priority` label of the metrics.
ClassName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]


class PriorityKey(Strict):
    """An API key's class, and the classes it may ask for with the `x-priority` header."""

    key_sha256: str = Field(
        pattern=r"^[0-9a-f]{64}$",
        description='SHA-256 of the key, in hex (`printf %s "$KEY" | sha256sum`).',
    )
    priority: str | None = Field(
        default=None, description="The key's class; unset: `default_class`."
    )
    header_classes: list[str] = Field(
        default_factory=list,
        description="Classes the key may ask for with `x-priority`, besides the ones every "
        "caller may (`scheduling.header_classes`).",
    )


class SchedulingConfig(Strict):
    """Priority classes, highest first; each request gets one, and its deadline is its
    timeout (`request_timeout_s`, or less where the client's `x-request-timeout` says)."""

    classes: list[ClassName] = Field(
        default_factory=lambda: ["high", "normal", "low"],
        min_length=1,
        description="The classes, highest first. A replica starts waiting work of a higher "
        "class before a lower one's, then the earlier deadline first.",
    )
    default_class: str = Field(
        default="normal", description="The class of requests whose key names none."
    )
    header_classes: list[str] = Field(
        default_factory=list,
        description="Classes any caller may ask for with the `x-priority` header (e.g. "
        "`[low]`: anyone may step back). Others need a key that lists them.",
    )
    keys: list[PriorityKey] = Field(
        default_factory=list, description="API keys with a class of their own."
    )
    aging_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds of waiting after which a request counts as one class higher "
        "(each further `aging_s` another), so that no class waits forever behind a higher "
        "one.",
    )
    refuse_late: bool = Field(
        default=True,
        description="Refuse at once, with a retryable 503 and `retry-after`, a request that "
        "its replica cannot finish by its deadline at the rate it is running now (before any "
        "compute); false: it waits, and gets its 504 at the deadline.",
    )

    @model_validator(mode="after")
    def _classes_are_known(self) -> SchedulingConfig:
        if len(set(self.classes)) != len(self.classes):
            raise ValueError("scheduling.classes: a class is listed twice")
        named = [("default_class", self.default_class)]
        named += [("header_classes", name) for name in self.header_classes]
        for key in self.keys:
            if key.priority is not None:
                named.append(("keys[].priority", key.priority))
            named += [("keys[].header_classes", name) for name in key.header_classes]
        for where, name in named:
            if name not in self.classes:
                raise ValueError(f"scheduling.{where}: {name!r} is not one of classes")
        digests = [key.key_sha256 for key in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("scheduling.keys: a key_sha256 is listed twice")
        return self

    def rank(self, name: str) -> int:
        """0 for the highest class."""
        return self.classes.index(name)

    def key(self, digest: bytes | None) -> PriorityKey | None:
        if digest is None:
            return None
        hexdigest = digest.hex()
        return next((key for key in self.keys if key.key_sha256 == hexdigest), None)
