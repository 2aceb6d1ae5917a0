"""Training the LLM stage on cached-token shards (``tempo train``).

- ``data``: the per-rank sample stream over shard sets (node/worker split by the shard
  reader), steps of fixed sample count, micro-batches packed by padded token count, and
  the padded batch tensors.
- ``schedule``: AdamW learning-rate schedule (linear warmup, cosine decay).
- ``checkpoint``: atomic, resumable checkpoints (Tempo layout + trainer state).
- ``metrics``: ``metrics.jsonl`` records, progress lines, the loss-curve PNG.
- ``loop``: the training loop itself (single process or torch.distributed / DDP).
"""
