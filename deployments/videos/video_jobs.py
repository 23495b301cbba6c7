"""Video jobs' records in Redis: what the ingress answers from and the worker writes to.

A job is one Redis hash (`job:<id>`), listed in its owner's sorted set (`owner:<digest>`, by
creation time), so any ingress replica answers `GET /v1/videos/{id}` and lists a key's jobs.
The worker's writes are scripts that check the record first, which is what makes a job's
at-least-once runs look exactly-once to its owner:
- `claim` takes the job for one run: it refuses while another run's lease is alive (a second
  delivery of a running job), counts the attempt, and marks the job `in_progress`;
- `progress` renews the lease and writes the percentage, and reports a deleted job, so the
  run stops at its next step;
- `finish` writes `completed` or `failed` once: a run that finishes a job already finished
  (or deleted) is told so, and discards its files.
Deleting a job removes its record; the run that holds it sees that at its next step.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

import redis

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]
FINAL_STATUSES = ("completed", "failed")

# KEYS[1] job, KEYS[2] lease; ARGV: token, lease ms, max attempts, now (started_at).
# -> {"claimed", attempts} | {"busy"} | {"gone"} | {"final", status} | {"exhausted", attempts}
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' then return {'final', status} end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'busy'} end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[3]) then return {'exhausted', tostring(attempts - 1)} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'started_at', ARGV[4], 'progress', 0)
return {'claimed', tostring(attempts)}
"""
# KEYS[1] job, KEYS[2] lease; ARGV: token, lease ms, progress.
# -> 1 go on; 0 stop: the job was deleted, finished, or taken over by another run (this
# run's lease lapsed and another claimed it).
_PROGRESS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
redis.call('HSET', KEYS[1], 'progress', ARGV[3])
return 1
"""
# KEYS[1] job, KEYS[2] lease; ARGV: token. A run that stops without an outcome (its replica
# is shutting down) gives the job back: queued again, the attempt not counted. -> 1 | 0
_HAND_BACK = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', -1)
redis.call('HSET', KEYS[1], 'status', 'queued', 'progress', 0)
return 1
"""
# KEYS[1] job, KEYS[2] lease; ARGV: the owners' key prefix. Reads and removes the record in
# one step, so a run finishing meanwhile cannot leave files the caller did not see.
# -> the record's fields, flat; empty if there was none
_DELETE = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return fields end
local owner = redis.call('HGET', KEYS[1], 'owner')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', ARGV[1] .. owner, ARGV[2])
return fields
"""
# KEYS[1] job, KEYS[2] lease; ARGV: ttl s, then field/value pairs. -> 1 written, 0 not
_FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'failed' then return 0 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""


def clip_frames(seconds: int, fps: int, frame_multiple: int, max_frames: int) -> int:
    """The frames of a clip of `seconds` at `fps` by a video model's rule (`frame_multiple`
    x k + 1, at least one group), at most `max_frames`: the worker's count, and the
    ingress's for a job's cost."""
    groups = max(1, round(seconds * fps / frame_multiple))
    groups = min(groups, max(1, (max_frames - 1) // frame_multiple))
    return groups * frame_multiple + 1


# The longest a job's record lives unfinished (queued, or held by runs that keep dying): a
# record past it is dropped, and its id from its owner's list.
UNFINISHED_TTL_S = 7 * 24 * 3600


def new_video_id() -> str:
    return "video_" + secrets.token_hex(16)


@dataclass(frozen=True)
class VideoSpec:
    """What the worker needs to make a job's clip: the validated request."""

    model: str
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    seconds: int
    # Unset: from `seconds` and the frame rate, by the model's own frame rule (the worker
    # has the model; the ingress may not know it yet).
    num_frames: int | None
    fps: int | None
    num_inference_steps: int
    guidance_scale: float | None
    seed: int
    # The stored name of the `input_reference` image (PNG, at width x height), if any.
    reference_name: str | None = None


@dataclass(frozen=True)
class VideoRecord:
    """A job as its record holds it."""

    id: str
    owner: str
    status: VideoStatus
    progress: int
    created_at: int
    spec: VideoSpec
    attempts: int = 0
    # To the millisecond: when the job was queued, and when its latest run started.
    queued_at: float | None = None
    started_at: float | None = None
    completed_at: int | None = None
    expires_at: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    video_name: str | None = None
    thumbnail_name: str | None = None

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> VideoRecord:
        def number(name: str) -> int | None:
            return int(fields[name]) if fields.get(name) else None

        def instant(name: str) -> float | None:
            return float(fields[name]) if fields.get(name) else None

        return cls(
            id=fields["id"],
            owner=fields["owner"],
            status=fields["status"],  # type: ignore[arg-type]
            progress=int(fields.get("progress") or 0),
            created_at=int(fields["created_at"]),
            spec=VideoSpec(**json.loads(fields["spec"])),
            attempts=int(fields.get("attempts") or 0),
            queued_at=instant("queued_at"),
            started_at=instant("started_at"),
            completed_at=number("completed_at"),
            expires_at=number("expires_at"),
            error_code=fields.get("error_code") or None,
            error_message=fields.get("error_message") or None,
            video_name=fields.get("video_name") or None,
            thumbnail_name=fields.get("thumbnail_name") or None,
        )


Claim = Literal["claimed", "busy", "gone", "final", "exhausted"]


class VideoJobStore:
    """The records of one service's jobs (blocking calls: the ingress runs them in threads,
    the worker from its consumer's threads)."""

    def __init__(self, client: redis.Redis, key_prefix: str, lease_s: float) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._lease_ms = max(1, int(lease_s * 1000))
        self._claim = client.register_script(_CLAIM)
        self._progress = client.register_script(_PROGRESS)
        self._finish = client.register_script(_FINISH)
        self._hand_back = client.register_script(_HAND_BACK)
        self._delete = client.register_script(_DELETE)

    @classmethod
    def connect(cls, url: str, key_prefix: str, lease_s: float) -> VideoJobStore:
        client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=5, health_check_interval=30
        )
        return cls(client, key_prefix, lease_s)

    def _job(self, video_id: str) -> str:
        return f"{self._prefix}job:{video_id}"

    def _lease(self, video_id: str) -> str:
        return f"{self._prefix}lease:{video_id}"

    def _owned(self, owner: str) -> str:
        return f"{self._prefix}owner:{owner}"

    def create(self, owner: str, spec: VideoSpec) -> VideoRecord:
        record = VideoRecord(
            id=new_video_id(),
            owner=owner,
            status="queued",
            progress=0,
            created_at=int(time.time()),
            spec=spec,
        )
        fields = {
            "id": record.id,
            "owner": owner,
            "status": "queued",
            "progress": 0,
            "created_at": record.created_at,
            # To the millisecond, for the queue-wait metric and benchmark (OpenAI's
            # `created_at` is whole seconds).
            "queued_at": f"{time.time():.3f}",
            "spec": json.dumps(asdict(spec)),
            "attempts": 0,
        }
        with self._redis.pipeline() as pipe:
            pipe.hset(self._job(record.id), mapping=fields)
            pipe.expire(self._job(record.id), UNFINISHED_TTL_S)
            pipe.zadd(self._owned(owner), {record.id: time.time()})
            # Ids older than any record can be: their records expired.
            pipe.zremrangebyscore(self._owned(owner), 0, time.time() - UNFINISHED_TTL_S)
            pipe.execute()
        return record

    def get(self, video_id: str) -> VideoRecord | None:
        fields = self._redis.hgetall(self._job(video_id))
        return VideoRecord.from_hash(fields) if fields else None

    def owned(self, owner: str, video_id: str) -> VideoRecord | None:
        """The job if `owner` made it: another key's job is as absent as a missing one."""
        record = self.get(video_id)
        return record if record is not None and record.owner == owner else None

    def list(
        self, owner: str, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[VideoRecord], bool] | None:
        """A page of `owner`'s jobs after the job `after` (exclusive), and whether more
        follow; None if `after` is none of `owner`'s jobs. Ids of expired or deleted
        records are dropped from the index as met."""
        key = self._owned(owner)
        start = 0
        if after is not None:
            rank = (self._redis.zrevrank if newest_first else self._redis.zrank)(key, after)
            if rank is None:
                return None
            start = rank + 1
        records: list[VideoRecord] = []
        while len(records) <= limit:
            ids = (self._redis.zrevrange if newest_first else self._redis.zrange)(
                key, start, start + limit
            )
            if not ids:
                break
            start += len(ids)
            for video_id in ids:
                record = self.get(video_id)
                if record is None:
                    self._redis.zrem(key, video_id)
                    start -= 1
                else:
                    records.append(record)
        return records[:limit], len(records) > limit

    def delete(self, video_id: str) -> VideoRecord | None:
        """Remove a job's record, and return it as it was removed; its run (if any) stops
        at its next step."""
        keys = [self._job(video_id), self._lease(video_id)]
        flat = self._delete(keys=keys, args=[f"{self._prefix}owner:", video_id])
        if not flat:
            return None
        return VideoRecord.from_hash(dict(zip(flat[::2], flat[1::2], strict=True)))

    def hand_back(self, video_id: str, token: str) -> bool:
        """Give a job this run holds back to the queue's next delivery, uncounted."""
        keys = [self._job(video_id), self._lease(video_id)]
        return bool(self._hand_back(keys=keys, args=[token]))

    def claim(self, video_id: str, token: str, max_attempts: int) -> tuple[Claim, str]:
        """Take the job for one run (see the module's docstring): the outcome, and the
        attempt number (claimed, exhausted) or the final status (final)."""
        keys = [self._job(video_id), self._lease(video_id)]
        now = f"{time.time():.3f}"
        result = self._claim(keys=keys, args=[token, self._lease_ms, max_attempts, now])
        return result[0], (result[1] if len(result) > 1 else "")

    def progress(self, video_id: str, token: str, percent: int) -> bool:
        """Write a running job's progress and renew its lease; False once the run must stop
        (the job deleted, finished, or taken over by another run)."""
        keys = [self._job(video_id), self._lease(video_id)]
        return bool(self._progress(keys=keys, args=[token, self._lease_ms, percent]))

    def finish(self, video_id: str, ttl_s: float, **fields: Any) -> bool:
        """Write a job's final fields, once: False if it was finished or deleted before."""
        pairs: list[Any] = []
        for name, value in fields.items():
            pairs += [name, "" if value is None else value]
        keys = [self._job(video_id), self._lease(video_id)]
        return bool(self._finish(keys=keys, args=[max(1, int(ttl_s)), *pairs]))

    def publish_limits(self, model_id: str, limits: dict[str, Any]) -> None:
        """A replica's model's limits, for the ingress to check requests against at once."""
        self._redis.set(f"{self._prefix}limits:{model_id}", json.dumps(limits))

    def limits(self, model_id: str) -> dict[str, Any] | None:
        """The limits a replica of `model_id` published; None before any replica started."""
        value = self._redis.get(f"{self._prefix}limits:{model_id}")
        return json.loads(value) if value else None

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()
