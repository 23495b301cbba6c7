"""The Videos API on the ingress: OpenAI's `/v1/videos` routes over the jobs' records and
queues (`deployments/videos`), answered from Redis by any ingress replica."""
