"""A request's class and deadline, from its API key and headers (`args.scheduling`).

- Class: the key's (`scheduling.keys[].priority`), else `default_class`. A request may ask
  for another with `x-priority: <class>` where its key may (`keys[].header_classes`) or
  every caller may (`scheduling.header_classes`); any other class is a 400 naming the header.
- Deadline: `request_timeout_s` after the request arrived, or sooner where the client says it
  stops waiting sooner (`x-request-timeout: <seconds>`): its replica need not run what
  nobody will read, and the ingress answers 504 at that moment.

Both travel with the job (`JobSchedule`); the generator orders its queue by them and
refuses a job that cannot finish in time (`deployments/scheduling/`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from deployments.config.app_config import AppArgs
from deployments.ingress.errors import invalid_request
from deployments.scheduling.job_schedule import JobSchedule

PRIORITY_HEADER = "x-priority"
TIMEOUT_HEADER = "x-request-timeout"


class Priorities:
    """Gives each request its `JobSchedule`."""

    def __init__(self, args: AppArgs) -> None:
        self._config = args.scheduling
        self._timeout_s = args.request_timeout_s

    def schedule(
        self, headers: Mapping[str, str], key_digest: bytes | None, arrived: float | None = None
    ) -> JobSchedule:
        """The request's class and deadline; a 400 `APIError` for a header it may not send.
        `arrived`: `time.time()` when it reached the ingress (now if not given)."""
        arrived = time.time() if arrived is None else arrived
        name = self._class_of(headers.get(PRIORITY_HEADER), key_digest)
        return JobSchedule(
            priority_class=name,
            rank=self._config.rank(name),
            arrived=arrived,
            deadline=arrived + self.timeout_s(headers.get(TIMEOUT_HEADER)),
            aging_s=self._config.aging_s,
            refuse_late=self._config.refuse_late,
        )

    def timeout_s(self, header: str | None) -> float:
        """`request_timeout_s`, or the client's shorter `x-request-timeout`."""
        if header is None or not header.strip():
            return self._timeout_s
        try:
            seconds = float(header)
        except ValueError:
            seconds = math.nan
        if math.isnan(seconds) or seconds <= 0:  # a longer one than the service's, inf too, is fine
            raise invalid_request(
                f"The {TIMEOUT_HEADER} header must be a number of seconds above 0.",
                param=TIMEOUT_HEADER,
                code="invalid_header",
            )
        return min(seconds, self._timeout_s)

    def _class_of(self, asked: str | None, key_digest: bytes | None) -> str:
        config = self._config
        key = config.key(key_digest)
        own = key.priority if key is not None and key.priority else config.default_class
        asked = (asked or "").strip().lower()
        if not asked or asked == own:  # an empty header asks for nothing
            return own
        if asked not in config.classes:
            classes = ", ".join(config.classes)
            raise invalid_request(
                f"'{asked}' is not a priority class; the classes are {classes}.",
                param=PRIORITY_HEADER,
                code="invalid_priority",
            )
        if asked not in {*config.header_classes, *(key.header_classes if key else ())}:
            raise invalid_request(
                f"Your API key may not ask for the priority class '{asked}'.",
                param=PRIORITY_HEADER,
                code="priority_not_allowed",
            )
        return asked
