"""``TempoLLM``: the LLM stage of a Tempo checkpoint (projector + Qwen3 causal LM + tokenizer).

Input construction (docs/METHOD.md "LLM stage"; one function for evaluation and training,
``TempoLLM.build_inputs``):

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n
    [visual sequence]\\n{context}<|im_end|>\\n<|im_start|>assistant\\n[answer<|im_end|>\\n]

The prompt is split at its ``<image>`` placeholder and each piece is tokenised alone (no BOS).
The visual sequence is, per segment i with k_i > 0 in time order: the LLM's own
``embed_tokens`` of ``timestamp_texts[i]`` (e.g. ``"<12.0 seconds>"``, tokenised without
special tokens) then the k_i projected candidate tokens. Segments with k_i = 0 are dropped
with their timestamp. If the whole sequence exceeds ``max_length - 16`` positions the
visual sequence is cut at its tail.

Every segment at 0 tokens (possible with equal scores and S > B; the reference crashes
there): we answer from the text alone (empty visual sequence) and report
``segments_kept == 0``; it is not an error.

Generation (``TempoLLM.generate``): greedy, batched with left padding (attention mask and
positions 0..L-1 per sample, so each sample sees exactly what a batch of one sees), stop at
``<|im_end|>`` or eos, decode skipping special tokens, strip.

Numerics (the same modes as the compressor's): ``"reference"`` reproduces the reference's
bf16 run: weights pass through float16 on the way to the run dtype and the rotary
``inv_freq`` is rounded to bfloat16 (the reference casts the whole model, buffers included,
to bf16; transformers 5 keeps it float32). ``"exact"`` runs transformers 5 as is. Default:
``"reference"`` when the dtype is bf16, else ``"exact"``; ``numerics="reference"`` without a
dtype runs in bf16.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from tempo_ops.errors import CheckpointFormatError, ConfigError, LLMInputError, TokenizerError
from tempo_ops.llm import checkpoint as C
from tempo_ops.llm.projector import PROJECTOR_PREFIX, load_projector
from tempo_ops.numerics import REFERENCE, pass_through_fp16, resolve_numerics, round_rope_inv_freq_bf16
from tempo_ops.svlm import checkpoints as svlm_ckpt
from tempo_ops.svlm.compressor import resolve_device_dtype

DEFAULT_MAX_LENGTH = 32768
"""Maximum sequence length (the evaluation harness's value; the checkpoint's
``tokenizer_model_max_length`` is overridden, as the reference harness does)."""
LENGTH_MARGIN = 16
"""Positions kept free below ``max_length`` (the reference cuts at ``max_length - 16``)."""
SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
PROMPT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n"
    + IMAGE_PLACEHOLDER + "\n{context}<|im_end|>\n<|im_start|>assistant\n"
)
ASSISTANT_HEADER = "<|im_start|>assistant\n"
ANSWER_END = "<|im_end|>\n"
IGNORE_INDEX = -100
VISUAL_TOKEN_ID = -1
"""``LLMInputs.input_ids`` value at projected visual positions (they have no token id)."""


@dataclass(frozen=True)
class LLMInputs:
    """One sample's LLM input sequence (length L), from ``TempoLLM.build_inputs``.

    Attributes:
        inputs_embeds: ``(L, D_llm)`` in the model dtype (differentiable through the projector
            and ``embed_tokens`` when built with grad enabled).
        labels: ``(L,) int64``: ``IGNORE_INDEX`` (-100) everywhere except the assistant turn of
            a training answer (header ``<|im_start|>assistant\\n``, the answer and its
            ``<|im_end|>\\n``); unshifted, the causal-LM loss shifts. All -100 without an answer.
        attention_mask: ``(L,) int64`` ones.
        input_ids: ``(L,) int64`` token ids of the text and timestamp positions,
            ``VISUAL_TOKEN_ID`` (-1) at projected visual positions.
        visual_mask: ``(L,) bool``, True on the visual sequence (timestamps and projected tokens).
        prompt_length: positions up to and including ``<|im_start|>assistant\\n`` (generation starts here).
        prefix_length: positions before the visual sequence.
        visual_length: length of the visual sequence after truncation.
        visual_tokens: projected tokens kept after truncation (timestamps not counted).
        segments_kept: segments with at least one position in the kept visual sequence.
        truncated: visual positions cut to fit ``max_length - 16``.
    """

    inputs_embeds: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    input_ids: torch.Tensor
    visual_mask: torch.Tensor
    prompt_length: int
    prefix_length: int
    visual_length: int
    visual_tokens: int
    segments_kept: int
    truncated: int

    @property
    def length(self) -> int:
        return int(self.inputs_embeds.shape[0])


@dataclass(frozen=True)
class Generation:
    """One greedy answer: ``token_ids`` generated (stop token excluded), ``text`` decoded and stripped,
    ``stopped`` True when a stop token ended it (False: ``max_new_tokens`` reached)."""

    token_ids: list[int]
    text: str
    stopped: bool


def _cast_weight(t: torch.Tensor, mode: str, dtype: torch.dtype) -> torch.Tensor:
    """A stored weight in the run dtype; reference numerics pass it through float16 first
    (the reference loads fp16, then casts)."""
    if not t.is_floating_point():
        return t
    return (pass_through_fp16(t) if mode == REFERENCE else t).to(dtype)


class TempoLLM(nn.Module):
    """Projector + Qwen3 causal LM + tokenizer of a Tempo checkpoint.

    Submodules: ``lm`` (``Qwen3ForCausalLM``) and ``projector``; ``tokenizer`` is the LLM's
    tokenizer. Use ``from_pretrained``; ``train()``/``parameters()`` work as for any module.
    """

    def __init__(
        self,
        lm: nn.Module,
        projector: nn.Module,
        tokenizer: Any,
        tempo_config: Mapping[str, Any],
        *,
        name: str = "tempo",
        numerics: str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        weights_sha256: str | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.projector = projector
        self.tokenizer = tokenizer
        self.tempo_config = dict(tempo_config)
        self.name = name
        self.numerics = resolve_numerics(numerics, lm.get_input_embeddings().weight.dtype)
        if not isinstance(max_length, int) or max_length <= LENGTH_MARGIN:
            raise ConfigError(f"max_length must be an integer > {LENGTH_MARGIN}, got {max_length!r}", item="max_length")
        self.max_length = max_length
        self.weights_sha256 = weights_sha256
        self.shards_read: list[str] = []
        """Safetensors files ``from_pretrained`` opened (only those holding LLM-stage tensors)."""
        self._ids_cache: dict[str, list[int]] = {}
        self.im_end_id = self._single_id("<|im_end|>")
        self.pad_id = int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else self.im_end_id
        eos = getattr(lm.config, "eos_token_id", None)
        eos_ids = eos if isinstance(eos, (list, tuple)) else [eos]
        self.stop_ids = frozenset(int(i) for i in [self.im_end_id, tokenizer.eos_token_id, *eos_ids] if i is not None)
        pre, post = PROMPT_TEMPLATE.split(IMAGE_PLACEHOLDER)
        self._pre_ids = self.text_ids(pre)
        self._post_template = post
        self._header_ids = self.text_ids(ASSISTANT_HEADER)

    # ------------------------------------------------------------------ properties
    @property
    def projector_type(self) -> str:
        return str(self.tempo_config.get("mm_projector_type", "linear"))

    @property
    def hidden_size(self) -> int:
        """D_llm."""
        return int(self.lm.config.hidden_size)

    @property
    def mm_hidden_size(self) -> int:
        """D_svlm: the width of the candidate tokens the projector takes."""
        return int(self.tempo_config["mm_hidden_size"])

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able identity of the LLM stage (weights digest, projector, numerics, dtype, max length)."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "projector_type": self.projector_type,
            "numerics": self.numerics,
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_url: str | os.PathLike,
        *,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        numerics: str | None = None,
        max_length: int = DEFAULT_MAX_LENGTH,
        storage_options: Mapping[str, Any] | None = None,
    ) -> TempoLLM:
        """Load the LLM stage of a Tempo-6B-layout checkpoint (local directory or fsspec URL).

        Reads ``config.json``, the tokenizer files and only the safetensors shards that hold
        LLM-stage tensors (``tempo_ops.llm.checkpoint``); no hub, no remote code, no pickle.

        Args:
            dtype: model dtype (default bf16 on CUDA, float32 on CPU; bf16 for ``"reference"``).
            device: default CUDA when available, else CPU.
            numerics: ``"reference"`` or ``"exact"``; None: reference for bf16 (see the module docstring).
            max_length: sequence limit (default 32 768).

        Raises:
            CheckpointNotFound, CheckpointFormatError (missing/unexpected/misshaped tensors, bad
            config), TokenizerError, ConfigError (unknown numerics).
        """
        from transformers import AutoTokenizer, Qwen3ForCausalLM

        if numerics == REFERENCE and dtype is None:
            dtype = torch.bfloat16
        dev, dt = resolve_device_dtype(device, dtype)
        mode = resolve_numerics(numerics, dt)
        url = os.fspath(path_or_url)
        with svlm_ckpt.CheckpointLocation(url, storage_options=storage_options) as loc:
            config = svlm_ckpt.read_tempo_config(loc)
            qcfg = C.qwen3_config(config, item=url)
            qcfg._attn_implementation = "sdpa"
            weight_map = svlm_ckpt.tempo_weight_map(loc)
            keys = C.llm_stage_keys(weight_map)
            # One tensor at a time: hash, cast, keep the cast copy only. Reading all of them first
            # and casting afterwards held two or three copies of Qwen3-4B (~8 GB each in bf16).
            digests: dict[str, str] = {}
            lm_state: dict[str, torch.Tensor] = {}
            proj_state: dict[str, torch.Tensor] = {}
            for key, tensor in svlm_ckpt.iter_tensors(loc, weight_map, keys):
                digests[key] = svlm_ckpt.tensor_sha256(tensor)
                if key.startswith(C.LLM_PREFIXES):
                    lm_state[key] = _cast_weight(tensor, mode, dt)
                elif key.startswith(PROJECTOR_PREFIX):
                    proj_state[key] = _cast_weight(tensor, mode, dt)
                del tensor
            shards_read = C.shards_for(weight_map, keys)
            token_files = [
                f for f in loc.list_files()
                if not f.endswith(".safetensors") and not f.endswith(svlm_ckpt._PICKLE_SUFFIXES) and f != C.INDEX_FILE
            ]
            local = loc.local_dir(token_files)
            try:
                # config= keeps AutoTokenizer from parsing config.json (an unknown model type to it)
                tokenizer = AutoTokenizer.from_pretrained(local, config=qcfg, local_files_only=True, trust_remote_code=False)
            except Exception as exc:  # noqa: BLE001 - tokenizers raises bare Exceptions for broken files
                raise TokenizerError(f"cannot load the LLM tokenizer: {exc}", item=url) from exc
        digest = svlm_ckpt.combine_tensor_digests(digests)
        with torch.device("meta"):
            lm = Qwen3ForCausalLM(qcfg)
        expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
        tied = bool(getattr(qcfg, "tie_word_embeddings", False))
        if tied:
            expected.pop("lm_head.weight", None)
            lm_state.pop("lm_head.weight", None)  # tied: the embedding table is the head
        missing = sorted(set(expected) - set(lm_state))
        unexpected = sorted(set(lm_state) - set(expected))
        if missing or unexpected:
            raise CheckpointFormatError(
                f"LLM tensors do not match the config: {len(missing)} missing (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})",
                item=url,
            )
        for k, shape in expected.items():
            if tuple(lm_state[k].shape) != shape:
                raise CheckpointFormatError(f"{k} has shape {tuple(lm_state[k].shape)}, the config implies {shape}", item=url)
        lm.load_state_dict(lm_state, strict=not tied, assign=True)
        if tied:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        # Non-persistent buffers were created on the meta device: rebuild the rotary embedding.
        lm.model.rotary_emb = type(lm.model.rotary_emb)(qcfg)
        if mode == REFERENCE:
            round_rope_inv_freq_bf16(lm)
        projector = load_projector(
            str(config.get("mm_projector_type", "linear")), int(config["mm_hidden_size"]), int(qcfg.hidden_size), proj_state, item=url
        ).to(dt)
        llm = cls(
            lm, projector, tokenizer, config, name=svlm_ckpt.location_name(url), numerics=mode,
            max_length=max_length, weights_sha256=digest,
        )
        llm.shards_read = shards_read
        return llm.to(dev).eval()

    def save_pretrained(
        self,
        path_or_url: str | os.PathLike,
        *,
        compressor_from: str | os.PathLike | None = None,
        max_shard_bytes: int = 2 * 1024**3,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        """Write the LLM stage in the Tempo layout (config.json, sharded safetensors + index, tokenizer).

        ``compressor_from``: a Tempo checkpoint whose other tensors (the compressor:
        ``model.vision_tower_aux_list.*``) are copied into extra shards, so the result is a
        complete checkpoint; without it only the LLM stage is written. Weights are written in
        the model's current dtype. The config is written last.
        """
        import tempfile

        import fsspec

        url = os.fspath(path_or_url)
        state: dict[str, torch.Tensor] = {}
        for k, v in self.lm.state_dict().items():
            if k == "lm_head.weight" and getattr(self.lm.config, "tie_word_embeddings", False):
                continue
            state[k] = v
        for k, v in self.projector.state_dict().items():
            state[PROJECTOR_PREFIX + k] = v
        shards = C.split_shards(state, sorted(state), max_shard_bytes)
        extra_config = {k: v for k, v in self.tempo_config.items() if k not in C.TEMPO_MM_FIELDS}
        if compressor_from is not None:
            with svlm_ckpt.CheckpointLocation(compressor_from, storage_options=storage_options) as src:
                wm = svlm_ckpt.tempo_weight_map(src)
                other = [k for k in sorted(wm) if not C.is_llm_stage_key(k)]
                tensors = svlm_ckpt.read_tensors(src, wm, other)
            shards += C.split_shards(tensors, other, max_shard_bytes)
        mm = {k: self.tempo_config[k] for k in C.TEMPO_MM_FIELDS if k in self.tempo_config}
        config = C.tempo_config_from(self.lm.config, mm, extra=extra_config)
        config["dtype"] = str(self.dtype).removeprefix("torch.")
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
        root = root.rstrip("/")
        fs.makedirs(root, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="tempo_llm_save_") as tmp:
            C.write_safetensors_shards(tmp, [s for s in shards if s])
            self.tokenizer.save_pretrained(tmp)
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
                fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
            names = sorted(os.listdir(tmp))
            for name in [n for n in names if n != "config.json"] + ["config.json"]:
                fs.put_file(os.path.join(tmp, name), f"{root}/{name}")

    # ------------------------------------------------------------------ text
    def _single_id(self, token: str) -> int:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or (self.tokenizer.unk_token_id is not None and tid == self.tokenizer.unk_token_id):
            raise TokenizerError(f"the LLM tokenizer lacks {token!r}", item=self.name)
        return int(tid)

    def text_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without added special tokens (special tokens inside it are parsed); memoised."""
        ids = self._ids_cache.get(text)
        if ids is None:
            ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
            if len(self._ids_cache) < 65536:
                self._ids_cache[text] = ids
        return list(ids)

    def prompt_ids(self, context: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the visual sequence for ``context`` (``render_query``'s text).

        ``<image>`` inside ``context`` is removed (as ``render_query`` does).
        """
        post = self._post_template.format(context=str(context).replace(IMAGE_PLACEHOLDER, ""))
        # Training and eval see the same few contexts many times: reuse text_ids' memo.
        return list(self._pre_ids), self.text_ids(post)

    # ------------------------------------------------------------------ inputs
    def project(self, tokens: Any) -> torch.Tensor:
        """Projected candidate tokens: ``(T, D_svlm)`` (numpy or torch, any float dtype) → ``(T, D_llm)`` model dtype."""
        t = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens)
        return self.projector(t.to(device=self.device, dtype=self.dtype))

    def build_inputs(
        self,
        tokens: Any,
        alloc: Any,
        timestamp_texts: Sequence[str],
        context: str,
        *,
        answer: str | None = None,
    ) -> LLMInputs:
        """The exact LLM input sequence of one sample (see the module docstring).

        Args:
            tokens: ``(T, D_svlm)`` packed selection (``tempo_ops.packing.Packed.tokens``, float16
                numpy or a tensor), segments in time order, T = sum(alloc).
            alloc: ``(S,)`` non-negative integer tokens per segment.
            timestamp_texts: S strings ``"<{t:.1f} seconds>"``.
            context: the rendered query (``tempo_ops.query_text.render_query``).
            answer: for training, the assistant's answer text; labels then cover
                ``<|im_start|>assistant\\n{answer}<|im_end|>\\n``.

        Raises ``LLMInputError`` when the pieces do not fit together or the text alone
        exceeds ``max_length - 16``.
        """
        k = np.asarray(alloc)
        if k.ndim != 1 or not (k.size == 0 or np.issubdtype(k.dtype, np.integer)) or (k.size and k.min() < 0):
            raise LLMInputError(f"alloc must be a 1-D array of non-negative integers, got {k.dtype} {k.shape}", item=self.name)
        k = k.astype(np.int64)
        if len(timestamp_texts) != k.size:
            raise LLMInputError(f"{len(timestamp_texts)} timestamp texts for {k.size} segments", item=self.name)
        shape = tuple(tokens.shape)
        if len(shape) != 2 or shape[0] != int(k.sum()) or shape[1] != self.mm_hidden_size:
            raise LLMInputError(
                f"tokens must be (sum(alloc)={int(k.sum())}, {self.mm_hidden_size}), got {shape}", item=self.name
            )
        pre, post = self.prompt_ids(context)
        answer_ids = self.text_ids(str(answer) + ANSWER_END) if answer is not None else []
        if post[len(post) - len(self._header_ids):] != self._header_ids:
            raise TokenizerError("the prompt does not end in the assistant header's tokens", item=self.name)

        visual: list[int] = []
        seg_of: list[int] = []  # segment index of each visual position (to count segments kept)
        for i in np.flatnonzero(k > 0).tolist():
            ts = self.text_ids(str(timestamp_texts[i]))
            visual += ts + [VISUAL_TOKEN_ID] * int(k[i])
            seg_of += [i] * (len(ts) + int(k[i]))
        text_len = len(pre) + len(post) + len(answer_ids)
        room = self.max_length - LENGTH_MARGIN - text_len
        if room < 0:
            raise LLMInputError(
                f"the prompt text alone ({text_len} tokens) exceeds max_length - {LENGTH_MARGIN} = "
                f"{self.max_length - LENGTH_MARGIN}",
                item=self.name,
            )
        truncated = max(0, len(visual) - room)
        if truncated:
            visual, seg_of = visual[:room], seg_of[:room]
        ids = torch.tensor(pre + visual + post + answer_ids, dtype=torch.int64, device=self.device)
        is_visual_token = ids == VISUAL_TOKEN_ID
        n_visual_tokens = int(is_visual_token.sum())
        embeds = self.lm.get_input_embeddings()(ids.clamp(min=0))
        if n_visual_tokens:
            projected = self.project(tokens[:n_visual_tokens])  # tail cut: the first n stay
            embeds = embeds.masked_scatter(is_visual_token[:, None], projected.to(embeds.dtype))
        L = ids.shape[0]
        prompt_length = len(pre) + len(visual) + len(post)
        labels = torch.full((L,), IGNORE_INDEX, dtype=torch.int64, device=self.device)
        if answer is not None:
            start = prompt_length - len(self._header_ids)
            labels[start:] = ids[start:]
        visual_mask = torch.zeros(L, dtype=torch.bool, device=self.device)
        visual_mask[len(pre) : len(pre) + len(visual)] = True
        return LLMInputs(
            inputs_embeds=embeds,
            labels=labels,
            attention_mask=torch.ones(L, dtype=torch.int64, device=self.device),
            input_ids=ids,
            visual_mask=visual_mask,
            prompt_length=prompt_length,
            prefix_length=len(pre),
            visual_length=len(visual),
            visual_tokens=n_visual_tokens,
            segments_kept=len(set(seg_of)),
            truncated=truncated,
        )

    def inputs_embeds(self, tokens: Any, alloc: Any, timestamp_texts: Sequence[str], context: str) -> torch.Tensor:
        """``(L, D_llm)`` input embeddings of one evaluation sample (``build_inputs(...).inputs_embeds``)."""
        return self.build_inputs(tokens, alloc, timestamp_texts, context).inputs_embeds

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def generate(self, batch: Sequence[LLMInputs], *, max_new_tokens: int) -> list[Generation]:
        """Greedy answers for a batch of prompts (``build_inputs`` without answer), left padded.

        Each sample gets its own positions 0..L-1 and a mask over its real positions, so its
        answer equals the batch-of-one answer. Stops per sample at ``<|im_end|>``/eos or after
        ``max_new_tokens``.
        """
        from transformers import DynamicCache

        if not batch:
            return []
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}", item="generate")
        B = len(batch)
        lengths = [x.prompt_length for x in batch]
        Lmax = max(lengths)
        dev = self.device
        embeds = torch.zeros((B, Lmax, self.hidden_size), dtype=self.dtype, device=dev)
        mask = torch.zeros((B, Lmax), dtype=torch.int64, device=dev)
        for b, x in enumerate(batch):
            n = lengths[b]
            embeds[b, Lmax - n :] = x.inputs_embeds[:n].to(self.dtype)
            mask[b, Lmax - n :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
            past_key_values=cache, use_cache=True, logits_to_keep=1,
        )
        next_pos = torch.tensor(lengths, dtype=torch.int64, device=dev)
        generated: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        stopped = [False] * B
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].float().argmax(dim=-1).tolist()
            for b in range(B):
                if done[b]:
                    continue
                if nxt[b] in self.stop_ids:
                    done[b] = stopped[b] = True
                else:
                    generated[b].append(int(nxt[b]))
                    done[b] = len(generated[b]) >= max_new_tokens
            if all(done) or step == max_new_tokens - 1:
                break
            feed = torch.tensor([self.pad_id if done[b] else nxt[b] for b in range(B)], dtype=torch.int64, device=dev)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=torch.int64, device=dev)], dim=1)
            out = self.lm(
                input_ids=feed[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1,
            )
            next_pos = next_pos + 1
        return [
            Generation(token_ids=g, text=self.tokenizer.decode(g, skip_special_tokens=True).strip(), stopped=s)
            for g, s in zip(generated, stopped)
        ]
