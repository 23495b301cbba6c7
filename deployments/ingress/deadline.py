"""A request's deadline: everything the ingress waits for on a request's behalf ends by it.

`args.request_timeout_s` after a request arrives (or sooner, where the client's
`x-request-timeout` says: `priorities.py`), whatever it is still waiting for (the
model's capabilities, a place in the queue, its images, the next streamed event) is
cancelled and the client gets a 504 in the API's error shape. Cancelling the wait also
cancels the generation on the replica (see `deployments/ingress/deployment.py`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from deployments.ingress.errors import timed_out

T = TypeVar("T")


class Deadline:
    """The moment, on the event loop's clock, by which a request must have its answer."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.at = asyncio.get_running_loop().time() + timeout_s

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`await awaitable`, or a 504 `APIError` once the deadline has passed."""
        try:
            async with asyncio.timeout_at(self.at):
                return await awaitable
        except TimeoutError:
            raise timed_out(self.timeout_s) from None
