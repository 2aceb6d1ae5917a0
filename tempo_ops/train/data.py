"""Training data: the per-rank sample stream, steps, token-count micro-batches, padded tensors.

A *step* (one optimizer update) consumes ``batch × grad_accum`` samples per rank, in stream
order. Inside a step the samples are packed into micro-batches by padded token count
(``pack_micro_batches``), so memory is bounded by tokens rather than by sample count; the
loss is normalised by the step's label tokens over all ranks (``tempo_ops.train.loop``),
so the update does not depend on how a step is cut into micro-batches or ranks.

Shards are split across ranks (torch.distributed / torchrun ``RANK``, ``WORLD_SIZE``) and
DataLoader workers by the shard reader (``tempo_ops.shards.shard_dataset``): rank r reads
shards r, r + W, r + 2W, ... of the concatenated shard list.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tempo_ops.errors import ConfigError, ShardError
from tempo_ops.llm.model import IGNORE_INDEX
from tempo_ops.shards import read_index, shard_dataset, shard_urls


@dataclass(frozen=True)
class ShardSource:
    """The shards a run trains on: URLs in order, and samples per shard when indexes say so."""

    urls: tuple[str, ...]
    samples_per_shard: tuple[int, ...] | None  # None when plain tar URLs were given

    def samples_for_rank(self, rank: int, world_size: int) -> int | None:
        """Samples rank ``rank`` reads per epoch (shards ``rank::world_size``), or None when unknown."""
        if self.samples_per_shard is None:
            return None
        return sum(self.samples_per_shard[rank::world_size])


def resolve_shards(specs: str | Sequence[str], *, storage_options: dict | None = None) -> ShardSource:
    """Shard URLs from comma-separated (or listed) ``index.json`` / set-directory / ``.tar`` URLs.

    Raises ``ShardError`` when nothing is named, an index is missing or holds no shards.
    """
    items = [s.strip() for s in (specs.split(",") if isinstance(specs, str) else specs) if s.strip()]
    if not items:
        raise ShardError("no shard sets given", item="--shards")
    urls: list[str] = []
    counts: list[int] | None = []
    for spec in items:
        if spec.endswith(".tar"):
            urls.append(spec)
            counts = None
            continue
        doc = read_index(spec, storage_options=storage_options)
        urls += shard_urls(spec, storage_options=storage_options)
        if counts is not None:
            counts += [int(s["samples"]) for s in doc["shards"]]
    if not urls:
        raise ShardError("the shard sets hold no shards", item=",".join(items))
    return ShardSource(tuple(urls), None if counts is None else tuple(counts))


@dataclass
class StreamPosition:
    """Where a rank's stream stands: ``index`` samples of epoch ``epoch`` already consumed."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


def _keep(sample: Any) -> Any:
    return sample  # DataLoader(batch_size=None) must not turn numpy arrays into tensors


class SampleStream:
    """Endless stream of decoded samples for this rank, epoch after epoch.

    Epoch ``e`` reads the shards through ``shard_dataset(urls, shuffle=shuffle, seed=seed + e)``
    (optionally through a DataLoader with ``num_workers`` decoding processes); the order is a
    function of (urls, seed, epoch, rank, world size, workers), so a resumed run that skips to
    its saved ``StreamPosition`` sees exactly the samples an uninterrupted run would.
    ``prefetch`` > 0 decodes up to that many samples ahead on a background thread (same order).
    """

    def __init__(
        self,
        urls: Sequence[str],
        *,
        shuffle: int = 0,
        seed: int = 0,
        num_workers: int = 0,
        position: StreamPosition | None = None,
        storage_options: dict | None = None,
        prefetch: int = 0,
    ) -> None:
        self.urls = list(urls)
        self.shuffle = int(shuffle)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.storage_options = storage_options
        self.prefetch = int(prefetch)
        self._stop = threading.Event()
        self.position = StreamPosition(**(position.to_dict() if position else {}))
        self._it: Iterator[dict[str, Any]] | None = None

    def _epoch(self, epoch: int) -> Iterator[dict[str, Any]]:
        ds = shard_dataset(self.urls, shuffle=self.shuffle, seed=self.seed + epoch, storage_options=self.storage_options)
        if self.num_workers > 0:
            return iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.num_workers, collate_fn=_keep))
        return iter(ds)

    def _samples(self) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
        """Samples from the current position on, each with the position just after it."""
        epoch, skip = self.position.epoch, self.position.index
        while True:
            seen = 0
            for sample in self._epoch(epoch):
                seen += 1
                if seen <= skip:
                    continue  # resuming: these were consumed before the checkpoint
                yield sample, StreamPosition(epoch, seen)
            if seen == 0:
                raise ShardError("this rank's shards hold no samples (more ranks than shards?)", item=self.urls[0])
            epoch, skip = epoch + 1, 0

    def _prefetched(self) -> Iterator[tuple[dict[str, Any], StreamPosition]]:
        """``_samples`` read ahead by a daemon thread (decoding overlaps the training step)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = self._stop

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce() -> None:
            try:
                for item in self._samples():
                    if not put(item):
                        return
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
                put(exc)

        threading.Thread(target=produce, name="tempo-train-data", daemon=True).start()
        while True:
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the read-ahead thread (if any); the stream cannot be read afterwards."""
        self._stop.set()

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` samples (crossing epoch boundaries as needed); ``position`` follows them."""
        if self._it is None:
            self._it = self._prefetched() if self.prefetch > 0 else self._samples()
        out = []
        for _ in range(n):
            sample, self.position = next(self._it)
            out.append(sample)
        return out


def pack_micro_batches(lengths: Sequence[int], max_tokens: int | None) -> list[list[int]]:
    """Cut one step's samples into micro-batches by padded token count.

    Samples are taken longest first (ties by position); a micro-batch closes when adding the
    next sample would make ``longest × count`` exceed ``max_tokens`` (a sample longer than
    ``max_tokens`` gets a batch of its own). ``max_tokens`` None: one micro-batch.
    Returns sample positions per micro-batch.
    """
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError(f"max batch tokens must be positive, got {max_tokens}", item="--max-batch-tokens")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    if max_tokens is None:
        return [order] if order else []
    batches: list[list[int]] = []
    for i in order:
        if batches and int(lengths[batches[-1][0]]) * (len(batches[-1]) + 1) <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def pad_batch(embeds: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad per-sample inputs into one batch.

    ``embeds[b]`` ``(L_b, D)``, ``labels[b]`` ``(L_b,)`` int64 → ``inputs (B, Lmax, D)`` (zero
    padded), ``attention_mask (B, Lmax)`` int64 (1 on real positions), ``labels (B, Lmax)``
    (``IGNORE_INDEX`` on padding). With right padding and a causal mask, real positions see
    only real positions and keep positions 0..L_b−1, so each sample computes as it would alone.
    """
    if not embeds or len(embeds) != len(labels):
        raise ConfigError("pad_batch needs one label row per sample", item="batch")
    for b, (e, y) in enumerate(zip(embeds, labels)):
        if int(y.shape[0]) != int(e.shape[0]):
            raise ConfigError(f"sample {b}: {int(e.shape[0])} inputs but {int(y.shape[0])} labels", item="batch")
    pad = torch.nn.utils.rnn.pad_sequence
    inputs = pad(list(embeds), batch_first=True)
    out_labels = pad([y.long() for y in labels], batch_first=True, padding_value=IGNORE_INDEX)
    mask = pad([torch.ones(int(e.shape[0]), dtype=torch.long, device=e.device) for e in embeds], batch_first=True)
    return inputs, mask, out_labels
