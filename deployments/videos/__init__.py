"""Video jobs: what the ingress and the video worker share (records, queue, webhooks)."""

from __future__ import annotations
