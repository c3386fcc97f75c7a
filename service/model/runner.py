"""torch + transformers: prefill and ONE batched decode forward per step over a slotted KV cache.

Every live sequence owns a row (slot) of a preallocated `[layers, rows, kv_heads, max_len, head_dim]`
cache. The model runs with `use_cache=False` and a custom attention function that writes each new
key/value at (row, position) and attends over the row's own prefix, so a decode step is one forward
over all decoding rows, each at its own position, with no padding and no per-step cache copies.

Decoding rows are kept packed at the front (rows 0..n-1): the decode step then reads the cache
through a plain view. A sequence whose prefill completes is moved to the front boundary, and a
finished decoding row is refilled from the last decoding row — one copy per request lifetime.

Decode-step speed (SmolLM2-135M, 2 shared cores; a step at 16 rows is ~75% matmuls):
- The default model's layers run on the GGUF file's own Q4_1 blocks, its lm_head on its Q8_0 blocks
  (quantized.py, block_matmul.c): a step at 16 rows went from ~84 (float32 MKL) to ~60 (torch's
  int4 kernel) to ~45 ms, one row from ~37 to ~19 to ~16 ms.
- With the C kernels, a model on GGUF blocks decodes in decoder_step.c: every layer in one call
  (DecoderStep, decoder_step.py), with the embedding lookup, the lm_head and, when every row is
  greedy, the argmax: such a step runs no torch op. Measured alone: one row ~15 -> ~7 ms a step,
  16 rows ~44 -> ~28 ms (21 of them in the C step, 4.6 in the lm_head); with 8-bit activations and
  a float16 cache ~4.3 and ~14-16 ms, now ~3.6 and ~10.5 ms. It prefills too, every prompt token a
  row over its own sequence's cache row: 16 prompts of ~13 tokens ~300 -> ~110 ms, one ~30 -> ~12
  ms, 1,500 tokens ~2.0 -> ~1.55 -> ~1.16 s (keys stored in blocks of 16 positions: see
  decode_attention.c); and a token's result no longer depends on how its prompt was chunked. The
  rest of this list is the torch path, which serves every other model.
- On CPU, for llama-architecture models, decode steps run `FusedDecoder`: the same ops as the
  transformers layers, but q/k/v and gate/up each in one matmul. Q4_1 layers are fused by stacking
  their blocks (the kernels give the same bits fused or not, for any number of rows, so this also
  serves one row). Dense float32 layers are fused on weights stored transposed ([in, out]): MKL's
  sgemm at M=16 is 1.5-2.3x faster on that layout (gate+up 1180 -> 458 us), 1.17x end to end at 16
  streams, for a second copy of the layer weights (~430 MB); a single dense row keeps the
  transformers path (gemv is faster on [out, in], and it is bit-for-bit `generate`).
- Decode attention is decode_attention.c (one call a layer, the new key/value written too), or
  `decode_attention` in torch without a C compiler, not SDPA: a row's result does not depend on
  the rows beside it (see there); that keeps seeded and greedy output the same alone and in a
  batch. At 16 rows and ~100-200 keys the C version made a step 58 -> 44 ms, one row 18 -> 15 ms.
- Without C, the new key/value of every row is written with one `index_copy_` on a flat view of the
  layer's cache (~9 us for 16 rows) instead of an advanced-index put (~97 us), 60 times a step.
- Tried and dropped (no gain measured in A/B): bfloat16 dense matmuls (no faster than float32 here,
  with or without oneDNN's packed weights), int8 weight-only matmuls, MKL-packed lm_head (8.3 vs
  9.1 ms at 16 rows; the Q8_0 blocks now take ~4 ms less at 16 rows and ~3 ms less for one).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import AttentionInterface

from tokenwire.service.model.architectures import model_features
from tokenwire.service.model.attention import (
    SlotAttention,
    StepContext,
    cache_dtype,
    effective_windows,
    whole_blocks,
)
from tokenwire.service.model.cpu_threads import ThreadGovernor
from tokenwire.service.model.decoder_step import DecoderStep
from tokenwire.service.model.fused_decoder import FusedDecoder
from tokenwire.service.model.kv_budget import DEFAULT_KV_CACHE_MIB, KVSize, bytes_per_token, fit_context
from tokenwire.service.model.loading import ModelSource, load_model, pick_device, pick_dtype, resolve_model
from tokenwire.service.model.quantized import BlockLinear, block_activations, block_format
from tokenwire.service.model.sampling import SamplingRow, argmax_only, make_generator, mark_seen, sample
from tokenwire.service.model.templates import (
    NoChatTemplate,
    no_template_message,
    read_template,
    use_chat_template,
)
from tokenwire.service.model.types import PrefillChunk, PrefixCache, SamplingParams, TokenSample

log = logging.getLogger("tokenwire.model")

_ATTENTION_PREFIX = "tokenwire_slots"


@dataclass
class _Sequence:
    seq_id: int
    row: int
    sampling: SamplingRow
    logprobs: bool
    top_n: int
    banned: list[int] = field(default_factory=list)  # token ids that may not be sampled (min_tokens)
    length: int = 0  # tokens whose keys/values are in the cache
    decoding: bool = False


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc): after large frees it stays in the process
    otherwise, since glibc raises its mmap threshold as big blocks are freed. Loading the default
    model and freeing its per-layer copies: RSS 582 -> 487 MB with this, unchanged without."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelRunner:
    """Owns the model, the tokenizer and the KV cache rows. Called from the engine's step thread only."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        source: str,
        max_batch_size: int = 16,
        max_context: int | None = None,
        kv_cache_bytes: int | None = DEFAULT_KV_CACHE_MIB * 2**20,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.source = source
        config = model.config
        # Refuses (UnsupportedModelError) what it cannot run exactly, before any cache is allocated.
        self.features = model_features(config)
        self.device: torch.device = model.device
        self.dtype: torch.dtype = model.dtype
        self.vocab_size = int(config.vocab_size)
        model_context = int(getattr(config, "max_position_embeddings", 2048))
        self.context_length = min(model_context, max_context or model_context)
        if self.features.rope_context is not None and self.features.rope_context < self.context_length:
            log.warning(
                "context capped at %d tokens (of %d): past it this model's rope switches frequencies "
                "for every row of a batch at once, which would not be exact",
                self.features.rope_context,
                self.context_length,
            )
            self.context_length = self.features.rope_context
        layers = int(config.num_hidden_layers)
        kv_heads = int(getattr(config, "num_key_value_heads", config.num_attention_heads))
        head_dim = int(getattr(config, "head_dim", config.hidden_size // config.num_attention_heads))
        # What the block layers multiply: "int8", "float32", "bfloat16"; "" when every layer is dense.
        self.activations = block_activations(model)
        self.cache_dtype = cache_dtype(self.device, self.dtype, self.activations, head_dim)
        self.kv_size = self._size_cache(
            model_context, max_batch_size, kv_cache_bytes, layers, kv_heads, head_dim
        )
        self.context_length = self.kv_size.context_length
        self.max_batch_size = max_batch_size
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.bos_token_id: int | None = getattr(tokenizer, "bos_token_id", None)

        # Whole attention blocks, so a decode step never pads a copy of the cache (decode_attention).
        shape = (layers, max_batch_size, kv_heads, whole_blocks(self.context_length), head_dim)
        windows = effective_windows(self.features.windows, self.context_length)
        softcap = self.features.attention_softcap
        # torch.empty: pages are committed only as positions are written, so a large context is cheap.
        keys = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        values = torch.empty(shape, dtype=self.cache_dtype, device=self.device)
        self._attention = SlotAttention(
            keys, values, self.dtype, windows=windows, softcap=softcap, context_length=self.context_length
        )
        # Registered by a name of its own: each runner (tests hold several) writes into its own cache.
        attention_name = f"{_ATTENTION_PREFIX}_{id(self):x}"
        AttentionInterface.register(attention_name, self._attention)
        model.set_attn_implementation(attention_name)
        self._backbone = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        self._decoder_step = DecoderStep.build(
            self._backbone, self._lm_head, keys, values, attention_in_c=self._attention.native
        )
        self._fused = None if self._decoder_step else FusedDecoder.build(self._backbone)
        self.weights = block_format(model)
        # How prefill and decode steps run: "c" (decoder_step.c, one call), else "torch" (the
        # transformers layers, or FusedDecoder, from Python).
        self.decode_kernel = "c" if self._decoder_step is not None else "torch"
        log.info(
            "weights %s (activations: %s, KV cache: %s); prefill and decode steps run in %s",
            self.weights,
            self.activations or str(self.dtype).removeprefix("torch."),
            str(self.cache_dtype).removeprefix("torch."),
            self.decode_kernel,
        )

        # Positions [0, _finite[row]) of each row hold finite values. The decode step reads every
        # row up to the longest one, and masked-out garbage still poisons softmax @ V when it is
        # NaN (0 * NaN), so rows are zeroed lazily past their mark, each position once.
        self._finite = [0] * max_batch_size
        self._sequences: dict[int, _Sequence] = {}
        self._decoding: list[int] = []  # seq ids by row: row i holds _decoding[i]
        self._free_rows = set(range(max_batch_size))
        self._seen: torch.Tensor | None = None  # [rows, vocab] bool, allocated when a penalty is first used
        self._lock = threading.Lock()
        self._governor: ThreadGovernor | None = None

    def _size_cache(
        self,
        model_context: int,
        rows: int,
        budget: int | None,
        layers: int,
        kv_heads: int,
        head_dim: int,
    ) -> KVSize:
        """The context the KV budget allows (raises KVBudgetError when not even a short one fits),
        logged."""
        wanted = self.context_length
        per_token = bytes_per_token(layers, kv_heads, head_dim, self.cache_dtype.itemsize)
        size = fit_context(wanted, rows, per_token, budget)
        if size.context_length < wanted:
            log.warning(
                "context %d tokens (the model's: %d): what the KV cache budget of %d MiB holds for %d "
                "sequences at %.1f KiB a token; raise --kv-cache-mib or lower --max-batch-size for more",
                size.context_length,
                model_context,
                budget // 2**20 if budget else 0,
                rows,
                per_token / 1024,
            )
        log.info(
            "KV cache: %d rows x %d tokens x %.1f KiB = %.0f MiB at most (committed as it fills)",
            rows,
            size.context_length,
            per_token / 1024,
            size.nbytes / 2**20,
        )
        return size

    # ---- construction ----

    @classmethod
    def load(
        cls,
        spec: str = "default",
        *,
        device: str = "auto",
        dtype: str = "auto",
        weights: str = "auto",
        activations: str = "auto",
        max_batch_size: int = 16,
        max_context: int | None = None,
        kv_cache_bytes: int | None = DEFAULT_KV_CACHE_MIB * 2**20,
        chat_template: str | None = None,
    ) -> ModelRunner:
        """`chat_template`: a family's name (templates.NAMES) or a Jinja file, in place of the
        model's own; `kv_cache_bytes`: the most the KV cache may take (kv_budget.py)."""
        source: ModelSource = resolve_model(spec)
        if chat_template is not None:
            read_template(chat_template)  # a wrong name or path is refused before the model loads
        torch_device = pick_device(device)
        torch_dtype = pick_dtype(torch_device, dtype)
        model, tokenizer = load_model(source, torch_device, torch_dtype, weights, activations)
        end_of_turn = use_chat_template(tokenizer, chat_template)
        runner = cls(
            model,
            tokenizer,
            name=source.name,
            source=source.location,
            max_batch_size=max_batch_size,
            max_context=max_context,
            kv_cache_bytes=kv_cache_bytes,
        )
        if end_of_turn:  # a reply in the given template ends at its end-of-turn token, as at EOS
            runner.eos_token_ids = tuple(sorted({*runner.eos_token_ids, *end_of_turn}))
        runner.release_layer_blocks()  # the model is the runner's alone
        return runner

    def release_layer_blocks(self) -> int:
        """Free the decoder layers' own block layouts where decoder_step.c runs every prefill and
        decode step from its fused copies (~80 MB for the default model); returns the bytes freed.
        Only for a model no one else runs: its transformers layers no longer work."""
        if self._decoder_step is None:
            return 0
        freed = sum(
            module.release()
            for layer in self._backbone.layers
            for module in layer.modules()
            if isinstance(module, BlockLinear)
        )
        log.info("decoder_step.c holds the layers' blocks: %.0f MB of per-layer copies freed", freed / 2**20)
        _return_freed_memory()
        return freed

    def adapt_threads(self) -> None:
        """Run on fewer torch threads while other processes keep cores busy (CPU only; see cpu_threads)."""
        if self.device.type == "cpu":
            self._governor = ThreadGovernor(torch.set_num_threads, torch.get_num_threads())

    # ---- tokenizer ----

    @property
    def backend_tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` behind the transformers tokenizer (for incremental decoding)."""
        return self.tokenizer.backend_tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise NoChatTemplate(no_template_message())
        rendered = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        return [self.tokenizer.decode([t]) for t in token_ids]

    # ---- sequences ----

    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def live_sequences(self) -> int:
        return len(self._sequences)

    def add_sequence(
        self,
        seq_id: int,
        sampling: SamplingParams,
        seed: int,
        *,
        prompt_token_ids: Sequence[int] = (),
        logprobs: bool = False,
        top_n: int = 0,
    ) -> None:
        """Give a new sequence a cache row (raises when none is free: the scheduler admits by rows)."""
        row = min(self._free_rows)
        self._free_rows.remove(row)
        generator = None if sampling.greedy else make_generator(seed, self.device)
        self._sequences[seq_id] = _Sequence(seq_id, row, SamplingRow(sampling, generator), logprobs, top_n)
        if sampling.repetition_penalty != 1.0:
            seen = self._seen_mask()
            seen[row].zero_()
            mark_seen(seen[row], list(prompt_token_ids))

    def ban_tokens(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Forbid sampling these tokens for a sequence (empty: lift the ban)."""
        self._sequences[seq_id].banned = list(token_ids)

    def remove_sequence(self, seq_id: int) -> None:
        seq = self._sequences.pop(seq_id, None)
        if seq is None:
            return
        if seq.decoding:
            last_id = self._decoding.pop()
            if last_id != seq_id:
                # Keep decoding rows packed: the last one takes the freed row.
                last = self._sequences[last_id]
                self._move_row(last, seq.row)
                self._decoding[seq.row] = last_id
                seq.row, last.row = last.row, seq.row  # seq.row is now the freed (old last) row
        self._free_rows.add(seq.row)

    def _move_row(self, seq: _Sequence, row: int) -> None:
        """Copy seq's cache (its filled part) and state into `row`, and make it seq's row."""
        cache = self._attention
        length = cache.whole_key_blocks(seq.length)
        cache.keys[:, row, :, :length] = cache.keys[:, seq.row, :, :length]
        cache.values[:, row, :, :length] = cache.values[:, seq.row, :, :length]
        if self._seen is not None:
            self._seen[row] = self._seen[seq.row]

    def _seen_mask(self) -> torch.Tensor:
        if self._seen is None:
            self._seen = torch.zeros(
                self.max_batch_size, self.vocab_size, dtype=torch.bool, device=self.device
            )
        return self._seen

    # ---- prefix caches (sessions) ----

    def save_prefix(self, seq_id: int, length: int) -> PrefixCache:
        """Copy the first `length` cached positions of a sequence out of its row."""
        seq = self._sequences[seq_id]
        length = min(length, seq.length)
        cache = self._attention
        stored = cache.whole_key_blocks(length)
        keys = cache.keys[:, seq.row, :, :stored].clone()
        values = cache.values[:, seq.row, :, :stored].clone()
        return PrefixCache(length=length, payload=(keys, values), nbytes=keys.nbytes + values.nbytes)

    def load_prefix(self, seq_id: int, prefix: PrefixCache, length: int) -> None:
        """Put the first `length` positions of a saved prefix into a (still prefilling) sequence's row."""
        seq = self._sequences[seq_id]
        keys, values = prefix.payload
        cache = self._attention
        # Whole key blocks: positions past `length` in the last one are rewritten before they are read.
        stored = cache.whole_key_blocks(length)
        cache.keys[:, seq.row, :, :stored] = keys[:, :, :stored]
        cache.values[:, seq.row, :, :stored] = values[:, :, :stored]
        seq.length = length

    # ---- the forward passes ----

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[PrefillChunk]) -> dict[int, TokenSample]:
        """Run the prompt chunks of several sequences in one forward; sample where a prompt ends."""
        if not chunks:
            return {}
        if self._governor is not None:
            self._governor.tick()
        seqs = [self._sequences[c.seq_id] for c in chunks]
        pairs = list(zip(chunks, seqs, strict=True))
        # Packed into one row, not padded to the longest: the 4-bit matmuls cost per row, padding too.
        token_ids = [t for c in chunks for t in c.token_ids]
        token_positions = [p for c, s in pairs for p in range(s.length, s.length + len(c.token_ids))]
        slots = [s.row for c, s in pairs for _ in c.token_ids]  # each token's cache row
        if self._decoder_step is not None:
            # Every token as a row of decoder_step.c, each over its own sequence's cache row.
            hidden = self._decoder_step(token_ids, token_positions, slots)[None]
        else:
            ids = torch.tensor([token_ids], dtype=torch.long)
            positions = torch.tensor([token_positions], dtype=torch.long)
            # Built once here, not in every layer's attention call.
            self._attention.ctx = StepContext(
                decode=False,
                positions=positions[0],
                slots=torch.tensor(slots, dtype=torch.long),
                prefill_rows=[(s.row, s.length, len(c.token_ids)) for c, s in pairs],
            )
            hidden = self._backbone(
                input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=False
            ).last_hidden_state
        finishing = []
        end = 0
        for c, seq in pairs:
            seq.length += len(c.token_ids)
            end += len(c.token_ids)
            if c.last:
                finishing.append((end - 1, seq))  # the chunk's last token in the packed row
        if not finishing:
            return {}
        last_hidden = hidden[0, [at for at, _ in finishing]]
        logits = self._logits(last_hidden)
        samples = self._sample(logits, [seq for _, seq in finishing], rows=None)
        for _, seq in finishing:
            self._start_decoding(seq)
        return {seq.seq_id: s for (_, seq), s in zip(finishing, samples, strict=True)}

    def _start_decoding(self, seq: _Sequence) -> None:
        boundary = len(self._decoding)
        if seq.row != boundary:
            occupant = next((s for s in self._sequences.values() if s.row == boundary), None)
            if occupant is None:
                self._free_rows.remove(boundary)
                self._free_rows.add(seq.row)
                self._move_row(seq, boundary)
                seq.row = boundary
            else:
                self._swap_rows(seq, occupant)
        seq.decoding = True
        self._decoding.append(seq.seq_id)

    def _swap_rows(self, a: _Sequence, b: _Sequence) -> None:
        cache = self._attention
        a_length, b_length = cache.whole_key_blocks(a.length), cache.whole_key_blocks(b.length)
        for tensor in (cache.keys, cache.values):
            saved = tensor[:, b.row, :, :b_length].clone()
            tensor[:, b.row, :, :a_length] = tensor[:, a.row, :, :a_length]
            tensor[:, a.row, :, :b_length] = saved
        if self._seen is not None:
            self._seen[[a.row, b.row]] = self._seen[[b.row, a.row]]
        a.row, b.row = b.row, a.row

    @torch.inference_mode()
    def decode(self, token_ids: dict[int, int]) -> dict[int, TokenSample]:
        """One forward over every decoding sequence: feed each its last token, sample its next."""
        n = len(self._decoding)
        if n == 0:
            return {}
        assert len(token_ids) == n, "decode must cover every decoding sequence"
        if self._governor is not None:
            self._governor.tick()
        seqs = [self._sequences[i] for i in self._decoding]
        lengths = [s.length for s in seqs]
        step = self._decoder_step
        if step is not None and step.lm_head_in_c:
            # Every row greedy, nothing else asked: the C step takes the argmax too, and no torch op
            # runs in the whole step.
            plain = all(
                argmax_only(s.sampling.params) and not (s.banned or s.logprobs or s.top_n) for s in seqs
            )
            logits, argmax = step.decode([token_ids[s.seq_id] for s in seqs], lengths, argmax=plain)
        else:
            if step is not None:
                hidden = step([token_ids[s.seq_id] for s in seqs], lengths)
            else:
                ids = torch.tensor(
                    [[token_ids[s.seq_id]] for s in seqs], dtype=torch.long, device=self.device
                )
                positions = torch.tensor(lengths, dtype=torch.long, device=self.device)
                hidden = self._decode_in_torch(ids, lengths, positions)[:, -1]
            logits, argmax = self._logits(hidden), None
        for s in seqs:
            s.length += 1
        if argmax is not None:
            return {s.seq_id: TokenSample(token, None, []) for s, token in zip(seqs, argmax, strict=True)}
        samples = self._sample(logits, seqs, rows=slice(0, n))
        return {s.seq_id: sample_ for s, sample_ in zip(seqs, samples, strict=True)}

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The lm_head, then what the model's CausalLM forward does after it: a scale, a soft cap."""
        logits = self._lm_head(hidden)
        features = self.features
        if features.logit_scale is not None:
            logits = logits * features.logit_scale
        if features.logits_divisor is not None:
            logits = logits / features.logits_divisor
        if features.final_softcap is not None:
            logits = torch.tanh(logits / features.final_softcap) * features.final_softcap
        return logits

    def _decode_in_torch(
        self, ids: torch.Tensor, lengths: list[int], positions: torch.Tensor
    ) -> torch.Tensor:
        n = len(lengths)
        kv_len = whole_blocks(max(lengths) + 1)
        if self._attention.native:  # reads only each row's own positions
            self._attention.ctx = StepContext(decode=True, positions=positions)
        else:
            self._make_finite(lengths, kv_len)
            _, _, kv_heads, max_len, _ = self._attention.keys.shape
            flat_index = (
                torch.arange(n, device=self.device)[:, None] * (kv_heads * max_len)
                + torch.arange(kv_heads, device=self.device)[None, :] * max_len
                + positions[:, None]
            ).reshape(-1)
            self._attention.ctx = StepContext(
                decode=True, positions=positions, kv_len=kv_len, flat_index=flat_index
            )
        mask = (torch.arange(kv_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        if self._fused is not None and (n >= 2 or self._fused.single_row):
            return self._fused(ids, positions[:, None], mask, self._attention)
        return self._backbone(
            input_ids=ids, position_ids=positions[:, None], attention_mask=mask, use_cache=False
        ).last_hidden_state

    def _make_finite(self, lengths: list[int], length: int) -> None:
        """Zero rows 0..len(lengths)-1 past their written part, up to `length`."""
        cache = self._attention
        for row, written in enumerate(lengths):
            start = max(self._finite[row], written)
            if start < length:
                cache.keys[:, row, :, start:length] = 0
                cache.values[:, row, :, start:length] = 0
                self._finite[row] = length

    def _sample(
        self, logits: torch.Tensor, seqs: Sequence[_Sequence], rows: slice | None
    ) -> list[TokenSample]:
        banned = [(i, s.banned) for i, s in enumerate(seqs) if s.banned]
        if banned:
            logits = logits.clone()
            for i, token_ids in banned:
                logits[i, token_ids] = float("-inf")
        penalised = any(s.sampling.params.repetition_penalty != 1.0 for s in seqs)
        seen = None
        if penalised:
            mask = self._seen_mask()
            seen = mask[rows] if rows is not None else mask[[s.row for s in seqs]]
        want_logprobs = any(s.logprobs or s.top_n for s in seqs)
        top_n = max((s.top_n for s in seqs), default=0)
        out = sample(
            logits.float(),
            [s.sampling for s in seqs],
            seen=seen,
            logprobs=want_logprobs,
            top_n=top_n,
        )
        if penalised and self._seen is not None:
            mark_seen(self._seen, out.token_ids, rows=[s.row for s in seqs])
        result = []
        for i, (s, token) in enumerate(zip(seqs, out.token_ids, strict=True)):
            logprob = out.logprobs[i] if (out.logprobs is not None and (s.logprobs or s.top_n)) else None
            top = out.top[i][: s.top_n] if (out.top is not None and s.top_n) else []
            result.append(TokenSample(token, logprob, top))
        return result

    # ---- health ----

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One prefill and a few decode steps on a scratch sequence, so first requests are not slow."""
        scratch = -1
        self.add_sequence(scratch, SamplingParams(), 0)
        try:
            first = self.prefill([PrefillChunk(scratch, self.encode("Hello"), last=True)])[scratch]
            token = first.token_id
            for _ in range(3):
                token = self.decode({scratch: token})[scratch].token_id
        finally:
            self.remove_sequence(scratch)


def _eos_token_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))
