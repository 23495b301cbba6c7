"""Where a process's time goes, from py-spy's raw (collapsed) stacks: each sample's stack
is put in the first category of an ordered list whose patterns match any of its frames.

py-spy samples only the thread holding the GIL (`--gil`): its idle detection counts Ray's
threads blocked in native code as busy. A category's milliseconds per request are its
samples over the sampling rate, over the requests served meanwhile: Python time, GIL held.
The rest of the process's CPU time (from the OS) ran without the GIL: torch's kernels, zlib,
Ray's C++ threads.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# (category, patterns): a stack is in the first category with a pattern found in one of its
# frames ("function (file:line)"). Order matters: specific work before the plumbing around it.
Rules = list[tuple[str, tuple[str, ...]]]

INGRESS_RULES: Rules = [
    ("PNG/JPEG/WebP encode", ("encode_image", "PIL/")),
    ("base64", ("to_base64", "b64encode")),
    ("JSON (request and response)", ("json_body", "json/", "JSONResponse", "model_dump")),
    ("validation", ("pydantic", "validate", "to_job", "refuse_unencodable", "validation")),
    ("request logs", ("logging/", "request_log")),
    ("metrics", ("metrics", "prometheus", "opentelemetry")),
    ("handle call (routing, pickling)", ("serve/handle.py", "request_router", "router.py")),
    ("result unpickling", ("deserializ", "pickle")),
    ("ASGI bridge (Serve's HTTP path)", ("http_util.py", "ASGIReceiveProxy", "ASGIDIReceiveProxy")),
    ("FastAPI/Starlette", ("fastapi/", "starlette/")),
    ("Serve replica plumbing", ("ray/serve/",)),
    ("Ray core worker", ("ray/_private/", "ray/actor.py", "main_loop")),
]

PROXY_RULES: Rules = [
    ("HTTP parsing (uvicorn)", ("uvicorn/", "h11", "httptools")),
    ("request logs", ("logging/",)),
    ("metrics", ("metrics", "prometheus", "opentelemetry")),
    ("routing to the ingress", ("request_router", "router.py", "serve/handle.py")),
    ("pickling", ("serializ", "pickle")),
    ("proxy ASGI plumbing", ("proxy", "http_util.py")),
    ("Serve plumbing", ("ray/serve/",)),
    ("Ray core worker", ("ray/_private/", "ray/actor.py", "main_loop")),
]

REPLICA_RULES: Rules = [
    ("pipeline call", ("diffusers/",)),
    ("pixels to uint8", ("to_uint8",)),
    ("view, arguments, batch plan", ("model/pipelines.py", "call_arguments", "call_plan")),
    ("batch queue", ("calls/batching.py",)),
    ("result pickling", ("serializ", "pickle")),
    ("request logs", ("logging/",)),
    ("metrics", ("metrics", "prometheus", "opentelemetry")),
    ("Serve replica plumbing", ("ray/serve/",)),
    ("Ray core worker", ("ray/_private/", "ray/actor.py", "main_loop")),
]

OTHER = "other Python (event loops, threads)"


def parse_collapsed(lines: Iterable[str]) -> Counter[tuple[str, ...]]:
    """py-spy's raw format: one line per distinct stack, `frame;frame;... count` (root
    first); a frame is `function (file:line)`."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in lines:
        line = line.rstrip("\n")
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def classify(stack: tuple[str, ...], rules: Rules) -> str:
    for category, patterns in rules:
        if any(pattern in frame for frame in stack for pattern in patterns):
            return category
    return OTHER


def breakdown(stacks: Counter[tuple[str, ...]], rules: Rules) -> Counter[str]:
    """Samples by category."""
    totals: Counter[str] = Counter()
    for stack, count in stacks.items():
        totals[classify(stack, rules)] += count
    return totals


def per_request_ms(
    samples: Counter[str], rate_hz: float, requests: int, process_cpu_s: float
) -> dict[str, float]:
    """Each category's on-CPU milliseconds per request, the process's total (from the OS),
    and what the samples do not account for (threads py-spy cannot see)."""
    if requests <= 0:
        raise ValueError("no requests were served")
    rows = {
        category: round(count / rate_hz / requests * 1000, 2)
        for category, count in samples.most_common()
    }
    total_ms = process_cpu_s / requests * 1000
    rows["without the GIL (native code)"] = round(max(0.0, total_ms - sum(rows.values())), 2)
    rows["total CPU (OS)"] = round(total_ms, 2)
    return rows
