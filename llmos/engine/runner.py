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
from llmos.models.attention import AttentionMetadata, PrefillChunk
from llmos.models.llama import LlamaModel

# Steps with at most this many prefill rows (short prompts arriving beside a decode batch) also
# get per-row attention metadata; longer prefills are left to the chunked SDPA path.
ROW_ATTENTION_PREFILL_ROWS = 64


@dataclass(slots=True)
class StepResult:
    seq: Sequence
    token_id: int
    logprob: TokenLogprob | None


@dataclass(slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_rows: torch.Tensor  # [S] the last row of each sequence that samples this step
    sampled: list[ScheduledSeq]  # S of them, in logits-row order


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
        width = max(-(-(s.start + s.num_new_tokens) // self.block_size) for s in scheduled)
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
        for s in plan.scheduled:
            row = len(ids)
            ids.extend(s.seq.token_ids[s.start : s.start + s.num_new_tokens])
            positions.extend(range(s.start, s.start + s.num_new_tokens))
            slots.append(self._slots(s.seq, s.start, s.num_new_tokens))
            end = s.start + s.num_new_tokens
            if s.num_new_tokens == 1 and s.start > 0:
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
                prefills.append(PrefillChunk(row, s.num_new_tokens, end, table, mask))
            if s.completes:
                logits_rows.append(row + s.num_new_tokens - 1)
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
            counts = torch.tensor([s.num_new_tokens for s in plan.scheduled])
            meta.row_block_tables = self._tables(plan.scheduled).repeat_interleave(counts, dim=0)
            meta.row_lens = torch.tensor(positions, dtype=torch.int64) + 1
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.tensor(positions, dtype=torch.int64, device=self.device),
            meta=meta,
            logits_rows=torch.tensor(logits_rows, dtype=torch.int64, device=self.device),
            sampled=sampled,
        )

    def sampling_batch(self, seqs: list[Sequence], eos: tuple[int, ...]) -> SamplingBatch:
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
        bans = [s.banned_stop_tokens(eos) for s in seqs]
        if any(bans):
            banned = torch.zeros(len(seqs), V, dtype=torch.bool, device=dev)
            for i, ids in enumerate(bans):
                banned[i, list(ids)] = True
            batch.banned = banned
        return batch

    # -- the step -------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, plan: SchedulerPlan, eos: tuple[int, ...]) -> list[StepResult]:
        if plan.new_blocks:
            fresh = torch.tensor(plan.new_blocks, device=self.device)
            for k_cache, v_cache in self.kv_caches:
                k_cache.index_fill_(0, fresh, 0.0)
                v_cache.index_fill_(0, fresh, 0.0)
        inputs = self.prepare(plan)
        seqs = [s.seq for s in inputs.sampled]
        masks = self.masks.start([s.matcher for s in seqs])  # overlaps the forward pass
        logits = self.model(
            inputs.input_ids, inputs.positions, self.kv_caches, inputs.meta, inputs.logits_rows
        )  # [len(sampled), vocab]
        if not inputs.sampled:
            return []
        batch = self.sampling_batch(seqs, eos)
        if masks is not None:
            grammar = self.masks.banned(masks, eos, self.device)  # [S, V]
            batch.banned = grammar if batch.banned is None else batch.banned | grammar
        token_ids = sample(logits, batch)
        results = [StepResult(seq, 0, None) for seq in seqs]
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            k = max(seqs[i].params.logprobs or 0 for i in want)
            rows = torch.tensor(want, device=self.device)
            chosen, top_vals, top_ids = logprobs_of(logits[rows], token_ids[rows], k)
            chosen_l, vals_l, ids_l = chosen.tolist(), top_vals.tolist(), top_ids.tolist()
            for j, i in enumerate(want):
                kk = seqs[i].params.logprobs or 0
                results[i].logprob = TokenLogprob(
                    int(token_ids[i]),
                    chosen_l[j],
                    list(zip(ids_l[j][:kk], vals_l[j][:kk], strict=True)),
                )
        for r, t in zip(results, token_ids.tolist(), strict=True):
            r.token_id = t
        return results
