"""One structured log line per image request: who asked for what, where the time went, and
how it ended.

The line's message is `key=value` pairs (logfmt), readable in Serve's default text logs and
easy to grep; the same fields go into the record as `image_request`, so with Serve's
`logging_config: {encoding: JSON}` they come out as a JSON object. The prompt is left out
unless the config says otherwise: prompts can be personal data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger("ray.serve")


class RequestLog:
    """Collects one request's fields while it runs; `finish` writes its line, once."""

    def __init__(
        self,
        request_id: str,
        endpoint: str,
        on_finish: Callable[[Mapping[str, Any]], None] | None = None,
    ) -> None:
        """`on_finish` gets the line's fields when it is written (the per-class metrics)."""
        self.request_id = request_id
        self._on_finish = on_finish
        self._started = time.perf_counter()
        self._fields: dict[str, Any] = {"request_id": request_id, "endpoint": endpoint}
        self._finished = False

    def add(self, **fields: Any) -> None:
        self._fields.update(fields)

    def finish(self, status: int, error_code: str | None = None) -> None:
        if self._finished:
            return
        self._finished = True
        if status == 499:  # nginx's code for a client that closed the connection
            outcome = "cancelled"
        else:
            outcome = "ok" if status < 400 else ("client_error" if status < 500 else "error")
        self._fields.update(
            status=status,
            outcome=outcome,
            error_code=error_code,
            total_s=round(time.perf_counter() - self._started, 4),
        )
        fields = {key: value for key, value in self._fields.items() if value is not None}
        logger.info("image_request %s", format_logfmt(fields), extra={"image_request": fields})
        if self._on_finish is not None:
            try:
                self._on_finish(fields)
            except Exception:  # a metric must never replace the request's own answer
                logger.exception("recording request %s's metrics failed", self.request_id)


def format_logfmt(fields: dict[str, Any]) -> str:
    """`key=value` pairs; a value with spaces, quotes, `=` or control characters is quoted as
    a JSON string, so one request is always one line."""
    parts = []
    for key, value in fields.items():
        text = f"{value:.4g}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in ' "=\\') or not text.isprintable():
            text = json.dumps(text, ensure_ascii=False)
        parts.append(f"{key}={text}")
    return " ".join(parts)
