"""`LLMEngine`: add_request / step / abort. The step is schedule → run → postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq

import torch

import llmos
from llmos.engine.block_manager import BlockManager
from llmos.engine.config import DTYPES, EngineConfig, parse_bytes
from llmos.engine.cores import CoreGovernor, adapt_threads
from llmos.engine.guard_filter import attach, released
from llmos.engine.output import OutputProcessor
from llmos.engine.runner import ModelRunner, StepOutput
from llmos.engine.sampling import SamplingParams
from llmos.engine.scheduler import Scheduler, SchedulerConfig, SchedulerPlan
from llmos.engine.sequence import CompletionOutput, RequestOutput, Sequence, SequenceStatus
from llmos.engine.spec import PROPOSERS, Speculator
from llmos.engine.stats import EngineStats
from llmos.engine.structured import GrammarCompiler
from llmos.errors import ContextLengthExceeded, RequestError, StepFailed
from llmos.models.batch_invariant import make_batch_invariant
from llmos.models.llama import LlamaModel
from llmos.models.loader import load_checkpoint
from llmos.models.quant import quantize
from llmos.models.registry import model_name, resolve
from llmos.models.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)
# Draft tokens one step verifies at most, over all its sequences: a step of up to ~64 rows
# beside its decodes stays on the per-row attention path (runner.ROW_ATTENTION_PREFILL_ROWS).
MAX_STEP_DRAFTS = 48


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, **options: object) -> None:
        config = config or EngineConfig(**options)  # type: ignore[arg-type]
        if llmos.OMP_LATE:
            log.warning(
                "torch was imported before llmos, so OpenMP's threads spin-wait and slow down "
                "sharply when other work shares the cores; import llmos first, or set "
                "OMP_WAIT_POLICY=PASSIVE before Python starts"
            )
        self.config = config
        self.device = config.torch_device()
        torch.manual_seed(config.seed)
        path = resolve(config.model)
        self.model_name = model_name(config.model)
        ckpt = load_checkpoint(path)
        self.model_config = ckpt.config
        self.tokenizer: Tokenizer = ckpt.tokenizer
        self.model = LlamaModel.from_weights(ckpt.config, ckpt.weights).to(self.device).eval()
        if config.deterministic:  # batch-invariant native kernels, else the torch tiles
            self.weight_formats = make_batch_invariant(self.model, config.quantization)
        else:
            self.weight_formats = quantize(self.model, config.quantization)
        limit = ckpt.config.max_position_embeddings
        self.max_model_len = min(config.max_model_len or limit, limit)
        kv_dtype = DTYPES[config.kv_cache_dtype]
        per_block = ModelRunner.kv_bytes_per_token(self.model, kv_dtype) * config.block_size
        num_blocks = config.num_kv_blocks or max(
            1, parse_bytes(config.kv_cache_memory) // per_block
        )
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.speculator = (
            None
            if config.speculation is None
            else Speculator(PROPOSERS[config.speculation](), config.num_speculative_tokens)
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                config.max_num_batched_tokens,
                config.max_prefill_chunk,
                dict(config.user_weights or {}),
            ),
            self.blocks,
            None if self.speculator is None else self._draft,
        )
        self.runner = ModelRunner(self.model, num_blocks, config.block_size, self.device, kv_dtype)
        self.grammars = GrammarCompiler(self.tokenizer, ckpt.config.vocab_size)
        self.output = OutputProcessor(self.tokenizer, self.max_model_len)
        self.requests: dict[str, list[Sequence]] = {}
        self.num_steps = 0
        # the steps' thread count follows the cores other processes leave free (cores.py)
        self.cores = (
            CoreGovernor()
            if self.device.type == "cpu" and not config.deterministic and adapt_threads()
            else None
        )
        self._draft_room = MAX_STEP_DRAFTS
        self.spec_totals = [0, 0, 0]  # drafts, draft tokens, accepted tokens (all requests)
        log.info(
            "engine ready: model=%s device=%s kv_blocks=%d x %d tokens",
            self.model_name,
            self.device,
            num_blocks,
            config.block_size,
        )

    # -- requests -------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Seq[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("prompt must not be empty", param="prompt")
            return self.tokenizer.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise RequestError("prompt must not be empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(
                f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab})", param="prompt"
            )
        return ids

    def resolve_max_tokens(self, num_prompt: int, params: SamplingParams) -> int:
        limit = self.max_model_len
        if num_prompt >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens, but the prompt has "
                f"{num_prompt} tokens, leaving none to generate.",
                param="prompt",
                prompt_tokens=num_prompt,
                limit=limit,
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if params.max_tokens is None:  # to the end of the context, or of the KV cache
            max_tokens = min(limit, capacity) - num_prompt
        elif num_prompt + params.max_tokens > limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{num_prompt + params.max_tokens} tokens ({num_prompt} in the prompt, "
                f"{params.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
                prompt_tokens=num_prompt,
                limit=limit,
            )
        else:
            max_tokens = params.max_tokens
        if max_tokens < 1 or num_prompt + max_tokens > capacity:
            raise ContextLengthExceeded(
                f"max_tokens: the prompt ({num_prompt} tokens) plus {max_tokens} new tokens "
                f"exceeds the whole KV cache ({capacity} tokens); lower max_tokens or raise "
                "kv_cache_memory",
                param="max_tokens",
                prompt_tokens=num_prompt,
                limit=capacity,
            )
        return max_tokens

    def add_request(
        self,
        request_id: str,
        prompt: str | Seq[int],
        params: SamplingParams,
        *,
        priority: int = 0,
        user: str | None = None,
        retain: str | None = None,
    ) -> list[int]:
        """Queue a request; it joins the batch on the next step. Returns its prompt token ids.

        Higher `priority` is scheduled first and may preempt lower (see `Scheduler`).

        With `retain`, a request that completes leaves its conversation's KV blocks pinned
        under that key (replacing the key's previous pin) until `release(retain)`, or until
        memory pressure takes them back: an agent's next turn then prefills only what is new."""
        if retain is not None and not (isinstance(retain, str) and retain):
            raise RequestError("retain must be a non-empty string key", param="retain")
        if request_id in self.requests:
            raise RequestError(f"request_id {request_id!r} is already in use", param="request_id")
        if not isinstance(params, SamplingParams):
            raise RequestError("params must be a SamplingParams", param="params")
        ids = self.encode_prompt(prompt)
        max_tokens = self.resolve_max_tokens(len(ids), params)
        vocab = self.model_config.vocab_size
        for name, tokens in params.token_ids_used():
            bad = next((t for t in tokens if not 0 <= t < vocab), None)
            if bad is not None:
                raise RequestError(
                    f"{name}: token id {bad} is outside the vocabulary [0, {vocab})", param=name
                )
        bad_words = self.bad_words_ids(params.bad_words or [])
        matchers = self.grammars.matchers(params, max_tokens)  # raises on what it cannot enforce
        seqs = [
            Sequence(
                request_id,
                ids,
                params,
                IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
                index=i,
                priority=priority,
                user=user,
                max_tokens=max_tokens,
                retain=retain,
            )
            for i in range(params.n)
        ]
        for seq, matcher in zip(seqs, matchers or (), strict=False):
            seq.matcher = matcher
        for seq in seqs:
            seq.bad_words_ids = bad_words
            attach(seq)  # its output guards' hold-back filter (guard_filter.py)
        self.requests[request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return ids

    def bad_words_ids(self, words: list[str]) -> list[list[int]]:
        """Each bad word's token sequences, as vLLM makes them: the word as written, and with a
        leading space where that is a different first token of the same length."""
        out: list[list[int]] = []
        for word in words:
            plain = self.tokenizer.encode(word.lstrip(), add_special_tokens=False)
            spaced = self.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
            out.append(plain)
            if spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return out

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now and give back its blocks. False if it is unknown or done."""
        seqs = self.requests.pop(request_id, None)
        if seqs is None:
            return False
        self.scheduler.abort(seqs)
        if self.speculator is not None:
            for seq in seqs:
                self.speculator.forget(seq)
        return True

    def release(self, key: str) -> bool:
        """Unpin the blocks kept under `key`. False if nothing is pinned there."""
        return self.blocks.release(key)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    # -- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self._draft_room = MAX_STEP_DRAFTS
        plan = self.scheduler.schedule()
        if not plan:
            return []
        if self.cores is not None:
            self.cores.tick()
        started = time.perf_counter()
        try:
            step = self.runner.run(plan, self.tokenizer.eos_token_ids)
            self.num_steps += 1
            seconds = time.perf_counter() - started
            if self.speculator is not None and all(s.num_new_tokens == 1 for s in plan.scheduled):
                self.speculator.observe_step(sum(s.num_rows for s in plan.scheduled), seconds)
            return self._postprocess(plan, step, seconds)
        except Exception as exc:
            # A failed step fails the requests in it, gives back their blocks, and lives on.
            failed = sorted({s.seq.request_id for s in plan.scheduled})
            log.exception("engine step failed; aborting the %d requests in it", len(failed))
            for rid in failed:
                self.abort_request(rid)
            raise StepFailed(failed, exc) from exc

    def _postprocess(
        self, plan: SchedulerPlan, step: StepOutput, seconds: float
    ) -> list[RequestOutput]:
        for chunk in step.prompt:
            assert chunk.seq.prompt_logprobs is not None
            assert len(chunk.seq.prompt_logprobs) == chunk.first  # in order, none twice
            chunk.seq.prompt_logprobs.extend(chunk.entries)
        now = time.monotonic()
        ended: list[tuple[Sequence, SequenceStatus]] = []
        accepted: dict[int, int] = {}  # seq_id -> drafts accepted (their K/V are computed)
        for r in step.results:
            seq = r.seq
            if seq.first_token_time is None:
                seq.first_token_time = now
            kept, status = self.output.append(seq, r.token_ids, r.logprobs)
            accepted[seq.seq_id] = min(kept, len(r.token_ids) - 1)
            if r.num_drafted:
                self._count_drafts(seq, r.num_drafted, len(r.token_ids) - 1)
            if status is not None:
                ended.append((seq, status))
        share = seconds / len(plan.scheduled)  # the step's time, shared by what it advanced
        for s in plan.scheduled:
            seq = s.seq
            done = s.start + s.num_new_tokens
            if seq.seq_id in accepted:  # sampled: all but its newest token are computed
                done = min(done + accepted[seq.seq_id], seq.num_tokens - 1)
            seq.num_computed_tokens = done
            seq.engine_seconds += share
            self.blocks.commit(seq)
            if s.draft:  # the rejected drafts' slots go back (a later token overwrites them)
                self.blocks.trim(seq, seq.num_tokens)
        for seq, status in ended:
            self.scheduler.finish(seq, status)
            if self.speculator is not None:
                self.speculator.forget(seq)
        return [self._output(rid) for rid in dict.fromkeys(r.seq.request_id for r in step.results)]

    # -- speculation ----------------------------------------------------------------------
    def _draft(self, seq: Sequence, room: int, batch: int) -> list[int]:
        """The scheduler's drafter: at most `room` drafts, leaving the bonus token inside
        max_tokens and the context."""
        assert self.speculator is not None
        room = min(room, seq.max_tokens - seq.num_output_tokens - 1)
        room = min(room, self.max_model_len - seq.num_tokens - 1, self._draft_room)
        draft = self.speculator.draft(seq, room, batch)
        self._draft_room -= len(draft)
        return draft

    def _count_drafts(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.num_drafts += 1
        seq.num_draft_tokens += drafted
        seq.num_accepted_tokens += accepted
        self.spec_totals[0] += 1
        self.spec_totals[1] += drafted
        self.spec_totals[2] += accepted
        if self.speculator is not None:
            self.speculator.observe(seq, drafted, accepted)

    def _output(self, request_id: str) -> RequestOutput:
        seqs = self.requests[request_id]
        finished = all(s.status.finished for s in seqs)
        if finished:
            del self.requests[request_id]
        first = seqs[0]
        outputs = [  # what output guards released: text, and the token ids and logprobs in it
            CompletionOutput(s.index, text, ids, s.finish_reason, logprobs)
            for s in seqs
            for text, ids, logprobs in [released(s, s.visible_text())]
        ]
        metrics = {"arrival": first.arrival, "engine_seconds": sum(s.engine_seconds for s in seqs)}
        if first.first_token_time is not None:
            metrics["first_token"] = first.first_token_time
        if self.speculator is not None:  # (vLLM's names, per request)
            metrics["spec_num_drafts"] = sum(s.num_drafts for s in seqs)
            metrics["spec_num_draft_tokens"] = sum(s.num_draft_tokens for s in seqs)
            metrics["spec_num_accepted_tokens"] = sum(s.num_accepted_tokens for s in seqs)
        return RequestOutput(
            request_id,
            first.prompt_token_ids,
            outputs,
            finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics=metrics,
            prompt_logprobs=first.prompt_logprobs_view(),
        )

    # -- introspection --------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """A snapshot of the counters. Call it on the thread that steps the engine; other
        threads read the one `AsyncEngine` publishes after each step."""
        pinned = self.blocks.pinned_blocks()
        held = pinned.union(*(s.block_table for seqs in self.requests.values() for s in seqs))
        return EngineStats(
            num_requests_running=len(self.scheduler.running),
            num_requests_waiting=len(self.scheduler.waiting),
            kv_blocks_used=self.blocks.num_used,
            kv_blocks_total=self.blocks.num_blocks,
            kv_blocks_pinned=len(pinned),
            kv_blocks_orphaned=self.blocks.num_used - len(held),
            num_pins=self.blocks.num_pins,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=self.blocks.queried_tokens,
            prefix_cache_hits=self.blocks.hit_tokens,
            num_steps=self.num_steps,
            spec_num_drafts=self.spec_totals[0],
            spec_num_draft_tokens=self.spec_totals[1],
            spec_num_accepted_tokens=self.spec_totals[2],
        )
