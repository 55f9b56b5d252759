"""Plan → tensors → model → logits → sampled tokens. Owns the KV cache tensors."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from llmos.engine.sampling import SamplingBatch, logprobs_of, sample
from llmos.engine.scheduler import ScheduledSeq, SchedulerPlan
from llmos.engine.sequence import Sequence, TokenLogprob
from llmos.engine.structured import MaskBuilder
from llmos.engine.verify import DraftView, accept, draft_masks, expand
from llmos.models.attention import AttentionMetadata, PrefillChunk
from llmos.models.llama import LlamaModel

# Steps with at most this many prefill rows (short prompts arriving beside a decode batch) also
# get per-row attention metadata; longer prefills are left to the chunked SDPA path.
ROW_ATTENTION_PREFILL_ROWS = 64


@dataclass(slots=True)
class StepResult:
    """A sequence's new tokens from one step: its accepted drafts (if any), then the token
    sampled after them. `logprobs` has one entry per token when the request asked for them."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    num_drafted: int = 0  # draft tokens verified this step (accepted: len(token_ids) - 1)


@dataclass(slots=True)
class PromptLogprobs:
    """Logprobs of prompt tokens `first + 1 ...` (scored at positions `first ...`)."""

    seq: Sequence
    first: int
    entries: list[TokenLogprob]


@dataclass(slots=True)
class StepOutput:
    results: list[StepResult]  # one per sampled sequence
    prompt: list[PromptLogprobs]  # chunks of prompt logprobs, for sequences that asked


@dataclass(slots=True)
class PromptRows:
    seq: Sequence
    first: int  # the first position scored
    count: int  # rows (positions) scored, after the sampled rows in logits order


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S + P] the last row of each sampling sequence, then prompt rows
    sampled: list[ScheduledSeq]  # S of them, in logits-row order
    prompt: list[PromptRows]  # P rows in all, in logits-row order after the sampled ones


def _row_seed(seed: int, index: int, step: int) -> int:
    """A request's randomness at output position `step`: a pure function of (seed, index, step),
    so it does not depend on batching, preemption or what other requests drew."""
    digest = hashlib.blake2b(f"{seed}:{index}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        kv_dtype: torch.dtype = torch.float32,
    ) -> None:
        cfg = model.cfg
        self.model = model
        self.device = device
        self.block_size = block_size
        self.vocab_size = cfg.vocab_size
        self.masks = MaskBuilder(cfg.vocab_size)
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        # torch.empty: on the CPU, pages become resident only once written.
        self.kv_caches = [
            (
                torch.empty(shape, dtype=kv_dtype, device=device),
                torch.empty(shape, dtype=kv_dtype, device=device),
            )
            for _ in range(cfg.num_layers)
        ]

    @staticmethod
    def kv_bytes_per_token(model: LlamaModel, kv_dtype: torch.dtype) -> int:
        cfg = model.cfg
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize

    # -- inputs ---------------------------------------------------------------------------
    def _slots(self, seq: Sequence, start: int, n: int) -> torch.Tensor:
        pos = torch.arange(start, start + n)
        table = torch.tensor(seq.block_table, dtype=torch.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def _tables(self, scheduled: Seq[ScheduledSeq]) -> torch.Tensor:
        """The block tables the scheduled chunks read, zero-padded to one width: [S, blocks]."""
        width = max(-(-(s.start + s.num_rows) // self.block_size) for s in scheduled)
        return torch.tensor(
            [(s.seq.block_table + [0] * width)[:width] for s in scheduled], dtype=torch.int64
        )

    def prepare(self, plan: SchedulerPlan) -> StepInputs:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[torch.Tensor] = []
        prefills: list[PrefillChunk] = []
        decode_rows: list[int] = []
        decodes: list[ScheduledSeq] = []
        logits_rows: list[int] = []
        sampled: list[ScheduledSeq] = []
        prompt_rows: list[int] = []
        prompt: list[PromptRows] = []
        for s in plan.scheduled:
            row = len(ids)
            scored = self._prompt_positions(s)
            if scored is not None:
                first, last = scored
                prompt_rows.extend(range(row + first - s.start, row + last - s.start))
                prompt.append(PromptRows(s.seq, first, last - first))
            ids.extend(s.seq.token_ids[s.start : s.start + s.num_new_tokens])
            ids.extend(s.draft)  # drafts are just more tokens, scored in the same pass
            positions.extend(range(s.start, s.start + s.num_rows))
            slots.append(self._slots(s.seq, s.start, s.num_rows))
            end = s.start + s.num_rows
            if s.num_rows == 1 and s.start > 0:
                decode_rows.append(row)
                decodes.append(s)
            else:
                table = torch.tensor(
                    s.seq.block_table[: -(-end // self.block_size)], device=self.device
                )
                mask = None
                if s.start > 0:
                    q_pos = torch.arange(s.start, end).unsqueeze(1)  # [L, 1]
                    mask = (torch.arange(end).unsqueeze(0) <= q_pos).to(self.device)  # [L, end]
                prefills.append(PrefillChunk(row, s.num_rows, end, table, mask))
            if s.completes:  # the last token's row, then each draft's
                logits_rows.extend(range(row + s.num_new_tokens - 1, row + s.num_rows))
                sampled.append(s)
        meta = AttentionMetadata(
            slot_mapping=torch.cat(slots).to(self.device),
            prefills=prefills,
            block_size=self.block_size,
        )
        if decodes:
            meta.decode_rows = torch.tensor(decode_rows, device=self.device)
            meta.decode_block_tables = self._tables(decodes).to(self.device)
            meta.decode_lens = torch.tensor([d.start + 1 for d in decodes])
        if not prefills:
            meta.row_block_tables, meta.row_lens = meta.decode_block_tables, meta.decode_lens
        elif len(ids) - len(decodes) <= ROW_ATTENTION_PREFILL_ROWS:
            # every row as a query over its own context (what a fused native layer takes)
            counts = torch.tensor([s.num_rows for s in plan.scheduled])
            meta.row_block_tables = self._tables(plan.scheduled).repeat_interleave(counts, dim=0)
            meta.row_lens = torch.tensor(positions, dtype=torch.int64) + 1
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            meta=meta,
            logits_rows=torch.tensor(
                logits_rows + prompt_rows, dtype=torch.int64, device=self.device
            ),
            sampled=sampled,
            prompt=prompt,
        )

    @staticmethod
    def _prompt_positions(s: ScheduledSeq) -> tuple[int, int] | None:
        """Positions [first, last) of this chunk whose logits score the next prompt token and
        are not yet scored (a recompute after preemption skips those already done)."""
        seq = s.seq
        if not seq.needs_prompt_logprobs:
            return None
        assert seq.prompt_logprobs is not None
        first = max(s.start, len(seq.prompt_logprobs))
        last = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
        return (first, last) if last > first else None

    def sampling_batch(
        self, seqs: Seq[Sequence | DraftView], eos: tuple[int, ...]
    ) -> SamplingBatch:
        """Per-row settings; a `DraftView` row is its sequence after some draft tokens."""
        dev = self.device
        params = [s.params for s in seqs]
        V = self.vocab_size
        temps = torch.tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev
        )
        greedy = torch.tensor([p.greedy for p in params], device=dev)
        any_sampling = not all(p.greedy for p in params)
        top_k = top_p = min_p = None
        if any_sampling and any(p.top_k for p in params):
            top_k = torch.tensor([p.top_k or V for p in params], device=dev)
        if any_sampling and any(p.top_p < 1.0 for p in params):
            top_p = torch.tensor([p.top_p for p in params], device=dev)
        if any_sampling and any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=dev)
        gens: list[torch.Generator | None] = []
        for s in seqs:
            if s.params.seed is None or s.params.greedy:
                gens.append(None)
                continue
            g = torch.Generator(device=dev)
            g.manual_seed(_row_seed(s.params.seed, s.index, s.num_output_tokens))
            gens.append(g)
        batch = SamplingBatch(temps, greedy, top_k, top_p, min_p, gens)
        if any(p.needs_penalties for p in params):
            counts = torch.zeros(len(seqs), V, device=dev)
            seen = torch.zeros(len(seqs), V, dtype=torch.bool, device=dev)
            for i, s in enumerate(seqs):
                out = torch.tensor(s.output_token_ids, dtype=torch.int64, device=dev)
                counts[i].index_add_(0, out, torch.ones(len(out), device=dev))
                seen[i, torch.tensor(s.token_ids, dtype=torch.int64, device=dev)] = True
            batch.output_counts, batch.seen = counts, seen
            batch.presence = torch.tensor([p.presence_penalty for p in params], device=dev)
            batch.frequency = torch.tensor([p.frequency_penalty for p in params], device=dev)
            batch.repetition = torch.tensor([p.repetition_penalty for p in params], device=dev)
        bias = [(i, t, v) for i, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        if bias:
            rows, ids, values = zip(*bias, strict=True)
            batch.bias = (
                torch.tensor(rows, dtype=torch.int64, device=dev),
                torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(values, dtype=torch.float32, device=dev),
            )
        bans = [(*s.banned_stop_tokens(eos), *s.banned_bad_words()) for s in seqs]
        allowed = [s.params.allowed_token_ids for s in seqs]
        if any(bans) or any(a is not None for a in allowed):
            banned = torch.zeros(len(seqs), V, dtype=torch.bool, device=dev)
            for i, (ids, only) in enumerate(zip(bans, allowed, strict=True)):
                if only is not None:
                    banned[i] = True
                    banned[i, only] = False
                banned[i, list(ids)] = True
            batch.banned = banned
        return batch

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: SchedulerPlan, eos: tuple[int, ...]) -> StepOutput:
        if plan.new_blocks:
            fresh = torch.tensor(plan.new_blocks, device=self.device)
            for k_cache, v_cache in self.kv_caches:
                k_cache.index_fill_(0, fresh, 0.0)
                v_cache.index_fill_(0, fresh, 0.0)
        inputs = self.prepare(plan)
        seqs = [s.seq for s in inputs.sampled]
        drafts = [s.draft for s in inputs.sampled]
        rows = expand(seqs, drafts)  # one sampling row per position (verify.py)
        first = [0]
        for d in drafts:
            first.append(first[-1] + 1 + len(d))
        row_matchers = [r.matcher if isinstance(r, Sequence) else None for r in rows]
        masks = self.masks.start(row_matchers)  # overlaps the forward pass
        logits = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, inputs.logits_rows
        )  # [R + P, vocab]
        R = len(rows)
        prompt = self._prompt_logprobs(inputs, logits[R:])
        logits = logits[:R]  # [R, vocab]
        if not inputs.sampled:
            return StepOutput([], prompt)
        batch = self.sampling_batch(rows, eos)  # type: ignore[arg-type]
        grammar = None if masks is None else self.masks.banned(masks, eos, self.device, logits)
        if grammar is not None:
            for i, (seq, d) in enumerate(zip(seqs, drafts, strict=True)):
                if d and seq.matcher is not None:
                    grammar[first[i] + 1 : first[i + 1]] = draft_masks(
                        seq, d, self.vocab_size, eos
                    ).to(self.device)
        batch.banned = _combine_bans(batch.banned, grammar)
        token_ids = sample(logits, batch)  # [R]
        sampled = token_ids.tolist()
        results = [
            StepResult(seq, accept(d, sampled[first[i] : first[i + 1]]), None, len(d))
            for i, (seq, d) in enumerate(zip(seqs, drafts, strict=True))
        ]
        want = [
            j
            for i, s in enumerate(seqs)
            if s.params.logprobs is not None
            for j in range(first[i], first[i] + len(results[i].token_ids))
        ]
        if want:
            k = max(s.params.logprobs or 0 for s in seqs if s.params.logprobs is not None)
            idx = torch.tensor(want, device=self.device)
            chosen, top_vals, top_ids = logprobs_of(logits[idx], token_ids[idx], k)
            entry = dict(
                zip(
                    want,
                    zip(chosen.tolist(), top_vals.tolist(), top_ids.tolist(), strict=True),
                    strict=True,
                )
            )
            for i, r in enumerate(results):
                kk = seqs[i].params.logprobs
                if kk is None:
                    continue
                r.logprobs = []
                for j, t in enumerate(r.token_ids):
                    c, vals, ids = entry[first[i] + j]
                    r.logprobs.append(
                        TokenLogprob(t, c, list(zip(ids[:kk], vals[:kk], strict=True)))
                    )
        return StepOutput(results, prompt)

    def _prompt_logprobs(self, inputs: StepInputs, logits: torch.Tensor) -> list[PromptLogprobs]:
        """logits: [P, vocab], the prompt rows. Each scores the prompt token after it."""
        out: list[PromptLogprobs] = []
        row = 0
        for p in inputs.prompt:
            k = p.seq.params.prompt_logprobs or 0
            targets = p.seq.token_ids[p.first + 1 : p.first + 1 + p.count]
            chosen, top_vals, top_ids = logprobs_of(
                logits[row : row + p.count],
                torch.tensor(targets, dtype=torch.int64, device=self.device),
                k,
            )
            chosen_l, vals_l, ids_l = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
            entries = [
                TokenLogprob(t, c, list(zip(i, v, strict=True)))
                for t, c, i, v in zip(targets, chosen_l, ids_l, vals_l, strict=True)
            ]
            out.append(PromptLogprobs(p.seq, p.first, entries))
            row += p.count
        return out


def _combine_bans(user: torch.Tensor | None, grammar: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens a row may not sample: the request's bans (allowed_token_ids, bad_words,
    min_tokens' stops) and the grammar's. The grammar has the last word: a row whose bans
    together leave nothing keeps only the grammar's, so a request can never break its grammar
    or be left with no token at all."""
    if user is None or grammar is None:
        banned = user if grammar is None else grammar
    else:
        banned = user | grammar
    if banned is None:
        return None
    dead = banned.all(-1)  # [S]
    if bool(dead.any()):
        banned = banned.clone()
        banned[dead] = grammar[dead] if grammar is not None else False
    return banned
