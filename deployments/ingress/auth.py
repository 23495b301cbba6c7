"""API keys: where they come from, and a check that takes the same time whatever is sent.

Keys come from an environment variable or a file (a mounted Kubernetes Secret), as
`deployments.config.AuthConfig` says. A file is re-read when its modification time changes,
so keys rotate without restarting the service.

The check compares the SHA-256 digest of the presented key with the digest of every
accepted key using `hmac.compare_digest`, and never stops early: its time depends neither on
how much of a key matched nor on which key matched.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import threading
from pathlib import Path

from deployments.config import AuthConfig


class NoAPIKeys(RuntimeError):
    """Auth is configured but its source holds no key: refuse to run open."""


def parse_keys(text: str) -> list[str]:
    """Keys separated by commas, spaces or newlines; blanks and `#` comment lines ignored."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    return [key for key in re.split(r"[\s,]+", "\n".join(lines)) if key]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


class APIKeys:
    """The accepted keys of one ingress replica."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        self._file_mtime: float | None = None
        self._digests: list[bytes] = []
        self._load()

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def accepts(self, token: str) -> bool:
        self._reload_if_changed()
        presented = _digest(token)
        matched = False
        for accepted in self._digests:
            # `|` rather than `or`: every key is compared, whichever matches.
            matched |= hmac.compare_digest(presented, accepted)
        return matched

    def _load(self) -> None:
        if not self.enabled:
            return
        keys: list[str] = []
        if self._config.api_keys_env is not None:
            keys += parse_keys(os.environ.get(self._config.api_keys_env, ""))
        if self._config.api_keys_file is not None:
            path = Path(self._config.api_keys_file)
            try:
                self._file_mtime = path.stat().st_mtime
                keys += parse_keys(path.read_text())
            except OSError as error:
                raise NoAPIKeys(
                    f"auth.api_keys_file {path} cannot be read ({error.strerror})"
                ) from None
        if not keys:
            sources = []
            if self._config.api_keys_env is not None:
                sources.append(f"the environment variable {self._config.api_keys_env}")
            if self._config.api_keys_file is not None:
                sources.append(f"the file {self._config.api_keys_file}")
            raise NoAPIKeys("auth is on but no API key was found in " + " or ".join(sources))
        self._digests = [_digest(key) for key in keys]

    def _reload_if_changed(self) -> None:
        if self._config.api_keys_file is None:
            return
        try:
            mtime = Path(self._config.api_keys_file).stat().st_mtime
        except OSError:
            return  # keep the last good keys while a Secret's files are being swapped
        if mtime == self._file_mtime:
            return
        # An empty or half-written file keeps the last good keys.
        with self._lock, contextlib.suppress(NoAPIKeys):
            self._load()
