"""Moderation on the ingress, before any compute: the prompt blocklist
(`args.prompt_moderation`, or a model's own), and who may ask for `moderation: low`
(`models[].safety`).

The blocklist is a file of regular expressions, read again whenever it changes (its
signature: mtime, ctime, size, inode), so an operator edits it, or swaps a Kubernetes
ConfigMap, without a restart. A version that cannot be read or compiled is logged and the
last good list stays in force: a typo in the file never turns moderation off. What a
refusal logs is the request id and the pattern's line number, never the prompt.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from deployments.config.app_config import AppArgs
from deployments.config.model_config import ModelConfig
from deployments.config.safety_config import PromptModerationConfig
from deployments.ingress.auth import FileSignature, file_signature
from deployments.ingress.errors import APIError, invalid_request

logger = logging.getLogger("ray.serve")


def moderation_blocked(message: str, param: str | None = None) -> APIError:
    """OpenAI's answer to what its safety system refuses: a 400 `moderation_blocked`, which
    its clients raise as `BadRequestError` and do not retry."""
    return invalid_request(message, param=param, code="moderation_blocked")


class PromptBlocklist:
    """The patterns of `blocklist_file`, checked against a request's texts."""

    def __init__(self, config: PromptModerationConfig) -> None:
        self._path = Path(config.blocklist_file)
        self._lock = threading.Lock()
        self._signature: FileSignature | None = None
        # A version that failed to load: not read again (nor logged again) until it changes.
        self._rejected: FileSignature | None = None
        self._patterns: list[tuple[int, re.Pattern[str]]] = []
        if not self._reload():
            # At start there is no last good list to keep: a deploy with an unreadable or
            # broken blocklist fails, naming the key.
            raise ValueError(
                f"prompt_moderation.blocklist_file: {self._path} cannot be read or has a "
                "pattern that does not compile (see the log)"
            )

    def check(self, request_id: str, *texts: str | None) -> None:
        """Raise `moderation_blocked` (param `prompt`) if a text matches a pattern."""
        self._reload_if_changed()
        patterns = self._patterns
        for text in texts:
            if not text:
                continue
            for line, pattern in patterns:
                if pattern.search(text):
                    logger.info("request %s: prompt blocked by line %d", request_id, line)
                    raise moderation_blocked(
                        "Your request was rejected by the safety system: its prompt is not "
                        "allowed by this service's moderation.",
                        param="prompt",
                    )

    def _reload_if_changed(self) -> None:
        try:
            if file_signature(self._path) in (self._signature, self._rejected):
                return
        except OSError:
            return  # keep the last good list while the file is being swapped
        with self._lock:
            self._reload()

    def _reload(self) -> bool:
        """Read and compile the file; True if its patterns are now in force."""
        before = None
        try:
            before = file_signature(self._path)
            text = self._path.read_text(encoding="utf-8")
            patterns = [
                (number, re.compile(line.strip(), re.IGNORECASE))
                for number, line in enumerate(text.splitlines(), start=1)
                if line.strip() and not line.lstrip().startswith("#")
            ]
        except (OSError, ValueError, re.error) as error:  # ValueError: not UTF-8
            logger.error(
                "prompt_moderation.blocklist_file %s not (re)loaded, the last good list stays: %s",
                self._path,
                error,
            )
            self._rejected = before
            return False
        self._patterns = patterns
        self._signature = before
        logger.info("prompt blocklist %s: %d patterns", self._path, len(patterns))
        return True


def prompt_blocklists(args: AppArgs) -> dict[str, PromptBlocklist]:
    """Each model's blocklist: its own `prompt_moderation`, else the application's; one
    `PromptBlocklist` a file, shared by the models that name it."""
    by_file: dict[str, PromptBlocklist] = {}
    lists = {}
    for model in args.models:
        config = model.prompt_moderation or args.prompt_moderation
        if config is not None:
            if config.blocklist_file not in by_file:
                by_file[config.blocklist_file] = PromptBlocklist(config)
            lists[model.id] = by_file[config.blocklist_file]
    return lists


def check_moderation_level(level: str, model: ModelConfig, key_digest: bytes | None) -> None:
    """400 naming `moderation` for `low` where the model has no relaxed thresholds, or the
    caller's key may not ask for them. `auto`, and `low` on a model without a checker (there
    is nothing to relax), pass."""
    safety = model.safety
    if level != "low" or safety is None:
        return
    if safety.low_thresholds is None:
        raise invalid_request(
            f"The model '{model.id}' has no relaxed moderation level; ask for 'auto'.",
            param="moderation",
            code="unsupported_parameter",
        )
    allowed = safety.low_key_sha256
    if allowed is not None and (key_digest is None or key_digest.hex() not in allowed):
        raise invalid_request(
            "Your API key may not ask for 'moderation': 'low' on this model.",
            param="moderation",
            code="moderation_not_allowed",
        )
