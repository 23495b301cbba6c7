"""What a request is validated against: the deployment's limits, its model's rules, and
what the model's loaded pipeline reported. Passed to the schemas of
`deployments/ingress/protocol.py` as pydantic's validation context."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pydantic import ValidationInfo

from deployments.config.app_config import RequestLimits
from deployments.config.model_config import ModelConfig
from deployments.jobs import ModelCapabilities
from deployments.sizes import SizeRules, resolve_size


@dataclass(frozen=True)
class ValidationContext:
    """What a request is validated against: the deployment's limits and its model's rules."""

    limits: RequestLimits
    model: ModelConfig
    # What the model's loaded pipeline reported (its own size limits), once known.
    capabilities: ModelCapabilities | None = None

    def size_rules(self) -> SizeRules:
        """The config's size rules narrowed by the loaded model's own limits."""
        rules = SizeRules(
            default=self.model.default_size,
            multiple=self.model.size_multiple,
            max_pixels=self.limits.max_pixels,
        )
        if self.capabilities is None:
            return rules
        caps = self.capabilities
        return replace(
            rules,
            # A multiple of both: the config's and the model's latent grid.
            multiple=math.lcm(rules.multiple, caps.size_multiple),
            max_width=_floor_to(caps.max_width, rules.multiple),
            max_height=_floor_to(caps.max_height, rules.multiple),
        )


def _floor_to(limit: int | None, multiple: int) -> int | None:
    return None if limit is None else limit // multiple * multiple


def context_of(info: ValidationInfo) -> ValidationContext:
    context = info.context
    if not isinstance(context, ValidationContext):
        return ValidationContext(limits=RequestLimits(), model=ModelConfig())
    return context


def resolve_size_in(
    size: str, context: ValidationContext, input_size: tuple[int, int] | None = None
) -> tuple[int, int]:
    return resolve_size(size, context.size_rules(), input_size)
