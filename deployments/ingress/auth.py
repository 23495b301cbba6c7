"""API keys: where they come from, and a check that takes the same time whatever is sent.

Keys come from an environment variable or a file (a mounted Kubernetes Secret), as
`deployments.config.app_config.AuthConfig` says.
A file is re-read when its signature (modification and
change times, size, inode) changes, so keys rotate without restarting the service. A file
rewritten in place can be read mid-write: a read during which the signature changed is not
trusted (the last good keys stay, and the next request reads again), and a file that is
complete but written within the same mtime tick as its truncated state still differs in size
or change time.

The check compares the SHA-256 digest of the presented key with the digest of every
accepted key using `hmac.compare_digest`, and never stops early: its time depends neither on
how much of a key matched nor on which key matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import threading
from pathlib import Path

from deployments.config.app_config import AuthConfig


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


# What tells one version of the keys file from another. The size and inode catch a rewrite
# within one mtime tick (or with its mtime set back); ctime cannot be set by a writer at all.
FileSignature = tuple[int, int, int, int]


def file_signature(path: Path) -> FileSignature:
    stat = path.stat()
    return (stat.st_mtime_ns, stat.st_ctime_ns, stat.st_size, stat.st_ino)


def read_keys_file(path: Path) -> tuple[list[str], FileSignature | None]:
    """The file's keys, and its signature, or None for the signature if the file changed
    while it was read (the keys may then be half of one version)."""
    before = file_signature(path)
    text = path.read_text(encoding="utf-8")
    after = file_signature(path)
    return parse_keys(text), (before if before == after else None)


class APIKeys:
    """The accepted keys of one ingress replica."""

    def __init__(self, config: AuthConfig) -> None:
        self._config = config
        self._lock = threading.Lock()
        # The signature of the file whose keys are in force; None: read it again.
        self._file_signature: FileSignature | None = None
        self._digests: list[bytes] = []
        if self.enabled:
            keys, self._file_signature = self._read_keys()
            self._digests = [_digest(key) for key in keys]

    @property
    def enabled(self) -> bool:
        return self._config.enabled

    def accepts(self, token: str) -> bool:
        return self.match(token) is not None

    def match(self, token: str) -> bytes | None:
        """The SHA-256 digest of `token` if it is an accepted key (what names the key in the
        quotas, never the key itself), else None."""
        self._reload_if_changed()
        presented = _digest(token)
        matched = False
        for accepted in self._digests:
            # `|` rather than `or`: every key is compared, whichever matches.
            matched |= hmac.compare_digest(presented, accepted)
        return presented if matched else None

    def _read_keys(self) -> tuple[list[str], FileSignature | None]:
        """The keys of every configured source, and the file's signature (see
        `read_keys_file`). `NoAPIKeys` if the file cannot be read or no source holds a key."""
        keys: list[str] = []
        signature = None
        if self._config.api_keys_env is not None:
            keys += parse_keys(os.environ.get(self._config.api_keys_env, ""))
        if self._config.api_keys_file is not None:
            path = Path(self._config.api_keys_file)
            try:
                file_keys, signature = read_keys_file(path)
            except (OSError, ValueError) as error:  # ValueError: not UTF-8 text
                reason = getattr(error, "strerror", None) or "not UTF-8 text"
                raise NoAPIKeys(f"auth.api_keys_file {path} cannot be read ({reason})") from None
            keys += file_keys
        if not keys:
            sources = []
            if self._config.api_keys_env is not None:
                sources.append(f"the environment variable {self._config.api_keys_env}")
            if self._config.api_keys_file is not None:
                sources.append(f"the file {self._config.api_keys_file}")
            raise NoAPIKeys("auth is on but no API key was found in " + " or ".join(sources))
        return keys, signature

    def _reload_if_changed(self) -> None:
        if self._config.api_keys_file is None:
            return
        path = Path(self._config.api_keys_file)
        try:
            if file_signature(path) == self._file_signature:
                return
        except OSError:
            return  # keep the last good keys while a Secret's files are being swapped
        with self._lock:
            try:
                keys, signature = self._read_keys()
            except NoAPIKeys:
                return  # an empty or unreadable file keeps the last good keys
            if signature is None:
                return  # changed while read: keep the last good keys, read again next time
            self._digests = [_digest(key) for key in keys]
            self._file_signature = signature
