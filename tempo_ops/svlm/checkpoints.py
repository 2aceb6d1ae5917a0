"""Loading and saving the compressor's parts (docs/METHOD.md, "Checkpoint layout").

Three things are loaded, each from a local directory or any fsspec URL (``memory://``,
``gs://``, ``s3://``...). For a URL only the files that are needed are copied to a local
temporary directory, loaded, and the copy is removed. Nothing is downloaded from the Hugging
Face Hub and ``trust_remote_code`` is never enabled; weights are read from safetensors only.

- The base SVLM (``load_svlm``): a Qwen3-VL directory (``config.json``, ``*.safetensors``,
  tokenizer files) → ``Qwen3VLForConditionalGeneration`` + ``AutoTokenizer``, plus the
  float32 LM-head rows of the single tokens "Yes" and "No" used for relevance.
- Memory tokens (``load_memory_tokens``) from either
  (a) a Tempo-6B-layout checkpoint (``config.json`` with ``model_type: tempo_qwen``): only the
      tensor ``model.vision_tower_aux_list.0.compression_tokens`` is read, lazily, from the one
      safetensors shard the index names; optionally the fine-tuned SVLM weights
      ``model.vision_tower_aux_list.0.vlm.model.{visual,language_model}.*`` are read too
      (``load_tempo_svlm_weights``), again only from the shards that hold them;
  (b) our own compressor checkpoint (``compressor_config.json`` + ``memory_tokens.safetensors``,
      written by ``save_compressor_checkpoint``).
- A fresh set (``init_memory_tokens``): normal with the per-dimension mean and std of the SVLM
  input embedding table, seeded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors import safe_open
from safetensors.torch import save_file

from tempo_ops.errors import (
    CheckpointFormatError,
    CheckpointNotFound,
    TokenizerError,
    UnsupportedModel,
)

SUPPORTED_SVLM_MODEL_TYPES = ("qwen3_vl", "qwen3_vl_moe")
"""``model_type``s of base SVLMs this code runs: Qwen3-VL dense and MoE (same vision tower,
rope index, DeepStack and cache interfaces; the MoE path is tested on a tiny model only)."""


def _svlm_model_class(model_type: str) -> Any:
    import transformers

    return {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    }[model_type]

TEMPO_MODEL_TYPE = "tempo_qwen"
TEMPO_MEMORY_TOKENS_KEY = "model.vision_tower_aux_list.0.compression_tokens"
TEMPO_SVLM_PREFIX = "model.vision_tower_aux_list.0.vlm.model."
"""Prefix of the fine-tuned SVLM (without lm_head) inside a Tempo checkpoint; the rest of the
name is the Qwen3VLModel name (``visual.*``, ``language_model.*``)."""
SVLM_MODEL_PREFIX = "model."
"""Prefix of the same tensors in ``Qwen3VLForConditionalGeneration``'s state dict."""
SVLM_REPLACED_PARTS = ("visual.", "language_model.")

COMPRESSOR_FORMAT = "tempo_compressor"
COMPRESSOR_FORMAT_VERSION = 1
COMPRESSOR_CONFIG_FILE = "compressor_config.json"
MEMORY_TOKENS_FILE = "memory_tokens.safetensors"
MEMORY_TOKENS_TENSOR = "memory_tokens"

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SINGLE_SAFETENSORS = "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5")


# --------------------------------------------------------------------------- locations
class CheckpointLocation:
    """A checkpoint directory given as a local path or an fsspec URL.

    Files are read in place when local; for remote URLs ``local_file`` copies one file at a
    time into a private temporary directory (so only what is asked for is fetched). Use as a
    context manager, or call ``cleanup()``; copies are removed there.
    """

    def __init__(self, url: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = os.fspath(url)
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except (ValueError, ImportError) as exc:
            raise CheckpointNotFound(f"cannot open this location: {exc}", item=self.url) from exc
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self._tmp: str | None = None
        self.fetched: list[str] = []
        """Names of the files copied from a remote location (for logging and tests)."""
        if not self.fs.isdir(self.root):
            raise CheckpointNotFound("checkpoint directory does not exist", item=self.url)

    def __enter__(self) -> CheckpointLocation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        """True when ``name`` is a file in the directory."""
        return bool(self.fs.isfile(self._path(name)))

    def list_files(self) -> list[str]:
        """Names of the plain files directly in the directory, sorted."""
        names = []
        for info in self.fs.ls(self.root, detail=True):
            if info.get("type") == "file":
                names.append(info["name"].rstrip("/").rsplit("/", 1)[-1])
        return sorted(names)

    def read_json(self, name: str) -> dict[str, Any]:
        """Parse a JSON file of the directory (CheckpointNotFound / CheckpointFormatError)."""
        if not self.exists(name):
            raise CheckpointNotFound(f"missing file {name}", item=self.url)
        try:
            with self.fs.open(self._path(name), "rb") as fh:
                doc = json.loads(fh.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointFormatError(f"{name} is not valid JSON: {exc}", item=self.url) from exc
        if not isinstance(doc, dict):
            raise CheckpointFormatError(f"{name} must hold a JSON object", item=self.url)
        return doc

    def local_file(self, name: str) -> str:
        """A local path of file ``name``; copied from the remote location on first use."""
        if not self.exists(name):
            raise CheckpointNotFound(f"missing file {name}", item=self.url)
        if self.is_local:
            return self._path(name)
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix="tempo_ckpt_")
        local = os.path.join(self._tmp, name)
        if not os.path.exists(local):
            self.fs.get(self._path(name), local)
            self.fetched.append(name)
        return local

    def local_dir(self, names: Iterable[str]) -> str:
        """A local directory holding at least ``names`` (the directory itself when local)."""
        paths = [self.local_file(n) for n in names]
        if self.is_local:
            return self.root
        return os.path.dirname(paths[0]) if paths else str(self._tmp)

    def cleanup(self) -> None:
        """Remove local copies of remote files."""
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def location_name(url: str | os.PathLike) -> str:
    """The last path component of a location (``gs://b/models/Qwen3-VL-2B/`` → ``Qwen3-VL-2B``).

    Used in fingerprints instead of the full location, so that moving or re-mounting a model does
    not invalidate caches (the weight hashes carry the identity)."""
    text = os.fspath(url).rstrip("/")
    return text.rsplit("/", 1)[-1] or text


# --------------------------------------------------------------------------- hashing
def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 (hex) of one tensor's dtype, shape and raw bytes (as stored; not converted)."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256()
    h.update(f"{str(t.dtype).removeprefix('torch.')}{tuple(t.shape)}".encode() + b"\x00")
    if t.numel():
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def combine_tensor_digests(digests: Mapping[str, str]) -> str:
    """SHA-256 over ``name → tensor_sha256`` pairs in sorted name order.

    This is the weights fingerprint: it depends on tensor names and bytes only, not on how they
    are split into files, nor on the dtype/device the model runs with.
    """
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(name.encode("utf-8") + b"\x00" + digests[name].encode("ascii") + b"\n")
    return h.hexdigest()


def safetensors_digests(paths: Iterable[str]) -> dict[str, str]:
    """``tensor_sha256`` of every tensor in the given safetensors files (memory-mapped, one at a time)."""
    digests: dict[str, str] = {}
    for path in paths:
        with safe_open(path, framework="pt") as fh:
            for key in fh.keys():
                digests[key] = tensor_sha256(fh.get_tensor(key))
    return digests


# --------------------------------------------------------------------------- base SVLM
@dataclass
class LoadedSVLM:
    """A base SVLM ready to run.

    Attributes:
        model: ``Qwen3VLForConditionalGeneration`` (or the MoE variant) in eval mode on ``device``/``dtype``.
        tokenizer: its tokenizer.
        name: ``location_name`` of the location (stable across moves; used in fingerprints).
        location: the path or URL it was loaded from.
        yes_no_rows: ``(2, D) float32`` CPU tensor: base LM-head rows of "Yes" and "No".
        yes_no_ids: the two token ids.
        weight_digests: tensor name → ``tensor_sha256`` of every tensor in the weight files.
    """

    model: Any
    tokenizer: Any
    name: str
    location: str
    yes_no_rows: torch.Tensor
    yes_no_ids: tuple[int, int]
    weight_digests: dict[str, str]

    @property
    def weights_sha256(self) -> str:
        """``combine_tensor_digests`` of the weight files' tensors."""
        return combine_tensor_digests(self.weight_digests)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)


def _safetensors_files(loc: CheckpointLocation, files: list[str]) -> list[str]:
    """The safetensors weight files of a directory, refusing pickle-only checkpoints."""
    st = [f for f in files if f.endswith(".safetensors")]
    if not st:
        pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        reason = (
            f"no safetensors weights (found only {pickled}; pickle checkpoints are never loaded)"
            if pickled
            else "no *.safetensors weight files"
        )
        raise CheckpointNotFound(reason, item=loc.url)
    return st


def single_token_id(tokenizer: Any, text: str, *, item: str) -> int:
    """The id of ``text`` when the tokenizer encodes it as exactly one token (TokenizerError otherwise)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise TokenizerError(f"{text!r} is not a single token (ids {list(ids)}); relevance needs it to be", item=item)
    return int(ids[0])


def load_svlm(
    url: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadedSVLM:
    """Load a base Qwen3-VL SVLM (dense or MoE) + tokenizer from a local directory or fsspec URL.

    Raises:
        CheckpointNotFound: missing directory, config.json or safetensors files.
        CheckpointFormatError: config.json unreadable, or the weights do not load.
        UnsupportedModel: ``model_type`` is not one of ``SUPPORTED_SVLM_MODEL_TYPES``.
        TokenizerError: no tokenizer, or "Yes"/"No" are not single tokens.
    """
    from transformers import AutoTokenizer

    name = os.fspath(url)
    with CheckpointLocation(name, storage_options=storage_options) as loc:
        config = loc.read_json("config.json")
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_SVLM_MODEL_TYPES:
            raise UnsupportedModel(
                f"model_type {model_type!r} is not a supported SVLM (supported: {', '.join(SUPPORTED_SVLM_MODEL_TYPES)})",
                item=name,
            )
        files = loc.list_files()
        weight_files = _safetensors_files(loc, files)
        wanted = [f for f in files if not f.endswith(_PICKLE_SUFFIXES)]
        local = loc.local_dir(wanted)
        try:
            tokenizer = AutoTokenizer.from_pretrained(local, local_files_only=True, trust_remote_code=False)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions for broken files
            raise TokenizerError(f"cannot load the tokenizer: {exc}", item=name) from exc
        yes_id = single_token_id(tokenizer, "Yes", item=name)
        no_id = single_token_id(tokenizer, "No", item=name)
        try:
            model = _svlm_model_class(model_type).from_pretrained(
                local,
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
            )
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointFormatError(f"cannot load the SVLM weights: {exc}", item=name) from exc
        vocab = model.lm_head.weight.shape[0]
        if max(yes_id, no_id) >= vocab:
            raise TokenizerError(f"Yes/No ids {yes_id}/{no_id} exceed the LM head's vocabulary {vocab}", item=name)
        rows = model.lm_head.weight.detach()[[yes_id, no_id]].to("cpu", torch.float32).clone()
        model.to(device).eval()
        digests = safetensors_digests(os.path.join(local, f) for f in weight_files)
    return LoadedSVLM(
        model=model,
        tokenizer=tokenizer,
        name=location_name(name),
        location=name,
        yes_no_rows=rows,
        yes_no_ids=(yes_id, no_id),
        weight_digests=digests,
    )


# --------------------------------------------------------------------------- memory tokens
@dataclass
class MemoryTokens:
    """Memory-token embeddings and where they came from.

    Attributes:
        tokens: ``(1, K, D) float32`` CPU tensor.
        source: ``"tempo:<name>"``, ``"compressor:<name>"`` or ``"init:seed=<n>"`` (``location_name``).
        kind: ``"tempo"``, ``"compressor"`` or ``"init"``.
        svlm_weights: for Tempo checkpoints read with SVLM weights: the
            ``Qwen3VLForConditionalGeneration`` tensor name → tensor to install; else None.
        svlm_weight_digests: name → ``tensor_sha256`` of those tensors.
        fetched: files copied from a remote location (empty when local).
    """

    tokens: torch.Tensor
    source: str
    kind: str
    svlm_weights: dict[str, torch.Tensor] | None = None
    svlm_weight_digests: dict[str, str] | None = None
    fetched: list[str] | None = None
    config: dict[str, Any] | None = None


def _check_tokens(tensor: torch.Tensor, *, k: int | None, d: int | None, item: str, what: str) -> torch.Tensor:
    if tensor.ndim != 3 or tensor.shape[0] != 1:
        raise CheckpointFormatError(f"{what} must have shape (1, K, D), got {tuple(tensor.shape)}", item=item)
    if k is not None and tensor.shape[1] != k:
        raise CheckpointFormatError(f"{what} holds {tensor.shape[1]} tokens, config says {k}", item=item)
    if d is not None and tensor.shape[2] != d:
        raise CheckpointFormatError(
            f"{what} have width {tensor.shape[2]}, but the SVLM hidden size is {d}", item=item
        )
    if not tensor.is_floating_point():
        raise CheckpointFormatError(f"{what} must be floating point, got {tensor.dtype}", item=item)
    out = tensor.to(torch.float32).contiguous()
    if not torch.isfinite(out).all():
        raise CheckpointFormatError(f"{what} contain NaN or infinite values", item=item)
    return out


def _positive_int(config: Mapping[str, Any], key: str, item: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise CheckpointFormatError(f"config.json field {key!r} must be a positive integer, got {value!r}", item=item)
    return value


def tempo_weight_map(loc: CheckpointLocation) -> dict[str, str]:
    """Tensor name → shard file name of a Tempo checkpoint (single file or indexed shards)."""
    if loc.exists(_SAFETENSORS_INDEX):
        index = loc.read_json(_SAFETENSORS_INDEX)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointFormatError(f"{_SAFETENSORS_INDEX} has no valid weight_map", item=loc.url)
        for shard in weight_map.values():
            if "/" in shard or shard in ("", ".", ".."):
                raise CheckpointFormatError(f"shard name {shard!r} is not a plain file name", item=loc.url)
        return dict(weight_map)
    if loc.exists(_SINGLE_SAFETENSORS):
        with safe_open(loc.local_file(_SINGLE_SAFETENSORS), framework="pt") as fh:
            return dict.fromkeys(fh.keys(), _SINGLE_SAFETENSORS)
    raise CheckpointNotFound(f"neither {_SAFETENSORS_INDEX} nor {_SINGLE_SAFETENSORS}", item=loc.url)


def iter_tensors(loc: CheckpointLocation, weight_map: Mapping[str, str], keys: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for ``keys`` from the shards ``weight_map`` names for them, one tensor
    at a time (sorted by shard, then key), opening only those shards.

    Tensors are in their stored dtype, on the CPU. Raises ``CheckpointFormatError`` when a key is
    not in the index or its shard lacks it; ``CheckpointNotFound`` when a shard file is missing.
    """
    by_shard: dict[str, list[str]] = {}
    for key in sorted(set(keys)):
        if key not in weight_map:
            raise CheckpointFormatError(f"no tensor {key} in the checkpoint index", item=loc.url)
        by_shard.setdefault(weight_map[key], []).append(key)
    for shard, names in sorted(by_shard.items()):
        path = loc.local_file(shard)
        try:
            fh = safe_open(path, framework="pt")
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own untyped errors
            raise CheckpointFormatError(f"cannot read {shard}: {exc}", item=loc.url) from exc
        available = set(fh.keys())
        for key in names:
            if key not in available:
                raise CheckpointFormatError(f"shard {shard} lacks tensor {key} named by the index", item=loc.url)
            try:
                tensor = fh.get_tensor(key)
            except Exception as exc:  # noqa: BLE001
                raise CheckpointFormatError(f"cannot read {key} from {shard}: {exc}", item=loc.url) from exc
            yield key, tensor


def read_tensors(loc: CheckpointLocation, weight_map: Mapping[str, str], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """``iter_tensors`` collected into a dict name → tensor (all of them in memory at once)."""
    return dict(iter_tensors(loc, weight_map, keys))


def read_tensor(loc: CheckpointLocation, shard: str, key: str) -> torch.Tensor:
    path = loc.local_file(shard)
    try:
        with safe_open(path, framework="pt") as fh:
            if key not in fh.keys():
                raise CheckpointFormatError(f"shard {shard} lacks tensor {key} named by the index", item=loc.url)
            return fh.get_tensor(key)
    except CheckpointFormatError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own untyped errors
        raise CheckpointFormatError(f"cannot read {key} from {shard}: {exc}", item=loc.url) from exc


def read_tempo_config(loc: CheckpointLocation) -> dict[str, Any]:
    """config.json of a Tempo-6B-layout checkpoint, checked (model_type, K, D)."""
    config = loc.read_json("config.json")
    if config.get("model_type") != TEMPO_MODEL_TYPE:
        raise CheckpointFormatError(
            f"config.json model_type is {config.get('model_type')!r}, expected {TEMPO_MODEL_TYPE!r}", item=loc.url
        )
    _positive_int(config, "num_compression_tokens", loc.url)
    _positive_int(config, "mm_hidden_size", loc.url)
    return config


def load_tempo_memory_tokens(
    loc: CheckpointLocation,
    *,
    hidden_size: int | None,
    svlm_state_shapes: Mapping[str, tuple[int, ...]] | None = None,
    weight_sink: Callable[[str, torch.Tensor], None] | None = None,
) -> MemoryTokens:
    """Read the compression tokens (and, with ``svlm_state_shapes``, the fine-tuned SVLM) of a Tempo checkpoint.

    Args:
        loc: the checkpoint directory.
        hidden_size: the SVLM's hidden size D (checked against ``mm_hidden_size`` and the tensor).
        svlm_state_shapes: ``Qwen3VLForConditionalGeneration`` state-dict name → shape of every
            tensor under ``model.visual.`` / ``model.language_model.``; when given, exactly those
            tensors must be present in the checkpoint under ``TEMPO_SVLM_PREFIX`` with equal shapes,
            and they are returned in ``svlm_weights``. Only the shards that hold them are opened.
        weight_sink: when given, each of those tensors is handed to ``weight_sink(name, tensor)``
            as soon as it is read and not kept (``svlm_weights`` stays None; the digests are
            still returned): at 2B parameters, holding them all next to the model doubled the
            peak memory of loading.
    """
    config = read_tempo_config(loc)
    k = config["num_compression_tokens"]
    d = config["mm_hidden_size"]
    if hidden_size is not None and d != hidden_size:
        raise CheckpointFormatError(
            f"mm_hidden_size {d} differs from the SVLM hidden size {hidden_size}", item=loc.url
        )
    weight_map = tempo_weight_map(loc)
    if TEMPO_MEMORY_TOKENS_KEY not in weight_map:
        raise CheckpointFormatError(f"no tensor {TEMPO_MEMORY_TOKENS_KEY}", item=loc.url)
    raw = read_tensor(loc, weight_map[TEMPO_MEMORY_TOKENS_KEY], TEMPO_MEMORY_TOKENS_KEY)
    tokens = _check_tokens(raw, k=k, d=d, item=loc.url, what="compression tokens")
    result = MemoryTokens(tokens=tokens, source=f"tempo:{location_name(loc.url)}", kind="tempo", config=config)
    if svlm_state_shapes is None:
        return result

    expected = {}
    for name, shape in svlm_state_shapes.items():
        if not name.startswith(SVLM_MODEL_PREFIX):
            continue
        rest = name[len(SVLM_MODEL_PREFIX) :]
        if rest.startswith(SVLM_REPLACED_PARTS):
            expected[TEMPO_SVLM_PREFIX + rest] = (name, tuple(shape))
    present = {key for key in weight_map if key.startswith(TEMPO_SVLM_PREFIX)}
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing or unexpected:
        raise CheckpointFormatError(
            f"SVLM weights do not match the base SVLM: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
            item=loc.url,
        )
    weights: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    for key, tensor in iter_tensors(loc, weight_map, expected):
        name, shape = expected[key]
        if tuple(tensor.shape) != shape:
            raise CheckpointFormatError(f"{key} has shape {tuple(tensor.shape)}, the base SVLM expects {shape}", item=loc.url)
        digests[name] = tensor_sha256(tensor)
        if weight_sink is None:
            weights[name] = tensor
        else:
            weight_sink(name, tensor)
        del tensor
    result.svlm_weights = weights if weight_sink is None else None
    result.svlm_weight_digests = digests
    return result


def read_compressor_config(loc: CheckpointLocation) -> dict[str, Any]:
    """compressor_config.json, checked (format name and version, K, D)."""
    config = loc.read_json(COMPRESSOR_CONFIG_FILE)
    if config.get("format") != COMPRESSOR_FORMAT:
        raise CheckpointFormatError(
            f"{COMPRESSOR_CONFIG_FILE} format is {config.get('format')!r}, expected {COMPRESSOR_FORMAT!r}", item=loc.url
        )
    if config.get("format_version") != COMPRESSOR_FORMAT_VERSION:
        raise CheckpointFormatError(
            f"compressor checkpoint format_version {config.get('format_version')!r} is not "
            f"{COMPRESSOR_FORMAT_VERSION} (the version this code reads)",
            item=loc.url,
        )
    _positive_int(config, "num_memory_tokens", loc.url)
    _positive_int(config, "hidden_size", loc.url)
    return config


def load_compressor_memory_tokens(loc: CheckpointLocation, *, hidden_size: int | None) -> MemoryTokens:
    """Memory tokens of our own compressor checkpoint (``save_compressor_checkpoint``)."""
    config = read_compressor_config(loc)
    k, d = config["num_memory_tokens"], config["hidden_size"]
    if hidden_size is not None and d != hidden_size:
        raise CheckpointFormatError(f"hidden_size {d} differs from the SVLM hidden size {hidden_size}", item=loc.url)
    raw = read_tensor(loc, MEMORY_TOKENS_FILE, MEMORY_TOKENS_TENSOR)
    tokens = _check_tokens(raw, k=k, d=d, item=loc.url, what="memory tokens")
    return MemoryTokens(tokens=tokens, source=f"compressor:{location_name(loc.url)}", kind="compressor", config=config)


def load_memory_tokens(
    url: str | os.PathLike,
    *,
    hidden_size: int | None,
    svlm_state_shapes: Mapping[str, tuple[int, ...]] | None = None,
    weight_sink: Callable[[str, torch.Tensor], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> MemoryTokens:
    """Memory tokens from a Tempo-6B-layout or our compressor checkpoint (detected from its files).

    ``svlm_state_shapes`` and ``weight_sink`` apply to Tempo checkpoints only (see
    ``load_tempo_memory_tokens``).
    Tensors are returned in memory; remote copies are removed before returning.
    """
    with CheckpointLocation(url, storage_options=storage_options) as loc:
        if loc.exists(COMPRESSOR_CONFIG_FILE):
            result = load_compressor_memory_tokens(loc, hidden_size=hidden_size)
        elif loc.exists("config.json"):
            result = load_tempo_memory_tokens(
                loc, hidden_size=hidden_size, svlm_state_shapes=svlm_state_shapes, weight_sink=weight_sink
            )
        else:
            raise CheckpointNotFound(
                f"neither {COMPRESSOR_CONFIG_FILE} (compressor checkpoint) nor config.json (Tempo checkpoint)",
                item=loc.url,
            )
        result.fetched = list(loc.fetched)
        return result


def init_memory_tokens(embedding_weight: torch.Tensor, num_tokens: int, seed: int) -> torch.Tensor:
    """Fresh memory tokens ``(1, K, D) float32``: N(mean_d, std_d) of the embedding table per dimension.

    Args:
        embedding_weight: ``(V, D)`` input embedding table of the SVLM.
        num_tokens: K.
        seed: seed of the ``torch.Generator`` (same seed → identical tokens).
    """
    if num_tokens < 1:
        raise CheckpointFormatError(f"num_memory_tokens must be >= 1, got {num_tokens}", item="init")
    table = embedding_weight.detach().to("cpu", torch.float32)
    mean = table.mean(dim=0)
    std = table.std(dim=0)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn((1, num_tokens, table.shape[1]), generator=gen, dtype=torch.float32)
    return (mean + std * noise).contiguous()


def save_compressor_checkpoint(
    url: str | os.PathLike,
    tokens: torch.Tensor,
    *,
    source: str,
    svlm_name: str,
    svlm_weights_sha256: str,
    extra: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write ``compressor_config.json`` + ``memory_tokens.safetensors`` to a directory or fsspec URL.

    ``tokens``: ``(1, K, D)`` memory tokens (stored float32).
    """
    url = os.fspath(url)
    tokens = _check_tokens(tokens.detach().to("cpu"), k=None, d=None, item=url, what="memory tokens")
    config = {
        "format": COMPRESSOR_FORMAT,
        "format_version": COMPRESSOR_FORMAT_VERSION,
        "num_memory_tokens": int(tokens.shape[1]),
        "hidden_size": int(tokens.shape[2]),
        "dtype": "float32",
        "memory_tokens_source": source,
        "memory_tokens_sha256": tensor_sha256(tokens),
        "svlm": {"name": svlm_name, "weights_sha256": svlm_weights_sha256},
        **dict(extra or {}),
    }
    fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    root = root.rstrip("/")
    fs.makedirs(root, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tempo_save_") as tmp:
        local = os.path.join(tmp, MEMORY_TOKENS_FILE)
        save_file({MEMORY_TOKENS_TENSOR: tokens}, local, metadata={"format": COMPRESSOR_FORMAT})
        fs.put_file(local, f"{root}/{MEMORY_TOKENS_FILE}")
    # The config goes last: a directory with a config always has its tensor file.
    with fs.open(f"{root}/{COMPRESSOR_CONFIG_FILE}", "wb") as fh:
        fh.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_hidden_size(url: str | os.PathLike, *, storage_options: Mapping[str, Any] | None = None) -> int:
    """The SVLM's text hidden size D (width of the candidate tokens), from config.json alone."""
    name = os.fspath(url)
    with CheckpointLocation(name, storage_options=storage_options) as loc:
        config = loc.read_json("config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    return _positive_int(text, "hidden_size", name)
