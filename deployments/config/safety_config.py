"""Safety by configuration: a model's image checker (`args.models[].safety`) and the prompt
moderation of the whole application (`args.prompt_moderation`). Both off by default.

Shared by both sides like the rest of the args: the generator runs the image checker
(`deployments/generator/safety/`), the ingress runs the prompt moderation and checks who may
ask for `moderation: low` (`deployments/ingress/moderation.py`).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, model_validator

from deployments.config.base import Strict

Threshold = Annotated[float, Field(ge=0, le=1)]


class SafetyConfig(Strict):
    """An image classifier run on every image the model makes, before any image leaves the
    replica: an image whose score in a category reaches that category's threshold is
    blocked, and its request answers 400 `moderation_blocked`."""

    checker: str = Field(
        description="The classifier: `embedded:tiny-safety-checker` (random weights, for "
        "tests), a Hugging Face model id or a local directory of an image-classification "
        "model (transformers' `AutoModelForImageClassification` with its image processor: "
        "its labels are the categories), or of diffusers' `StableDiffusionSafetyChecker` "
        "(category `nsfw`, 1 when it finds a concept, else 0)."
    )
    revision: str | None = Field(default=None, description="The checker's revision, if a hub id.")
    thresholds: dict[str, Threshold] = Field(
        default_factory=lambda: {"nsfw": 0.5},
        min_length=1,
        description="Per category (a label of the classifier): an image scoring at least the "
        "threshold is blocked. Categories not listed never block.",
    )
    low_thresholds: dict[str, Threshold] | None = Field(
        default=None,
        description="The thresholds of a request with `moderation: low` (each category not "
        "listed keeps its threshold). Unset: `moderation: low` is a 400 for this model.",
    )
    low_key_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] | None = Field(
        default=None,
        description="SHA-256 (hex) of the API keys that may ask for `moderation: low`; unset: "
        "any caller may, once `low_thresholds` is set. A key not listed gets a 400 naming "
        "`moderation`.",
    )

    @model_validator(mode="after")
    def _low_keys_need_low_thresholds(self) -> SafetyConfig:
        if self.low_key_sha256 is not None and self.low_thresholds is None:
            raise ValueError("low_key_sha256 needs low_thresholds (what `low` relaxes to)")
        return self

    def thresholds_for(self, moderation: str) -> dict[str, float]:
        """The thresholds a request with this `moderation` level is checked with."""
        if moderation == "low" and self.low_thresholds is not None:
            return {**self.thresholds, **self.low_thresholds}
        return dict(self.thresholds)


class PromptModerationConfig(Strict):
    """Prompts checked before any compute: a request whose prompt (or negative prompt)
    matches a pattern of the blocklist answers 400 `moderation_blocked` naming `prompt`."""

    blocklist_file: str = Field(
        description="A text file of patterns, one a line (Python regular expressions, "
        "matched case-insensitively anywhere in the prompt; blank lines and lines starting "
        "with `#` are skipped). Read again when it changes, without a restart; a file that "
        "cannot be read or holds a bad pattern keeps the last good list (logged)."
    )
