"""KernelConfig.verify_as_decode: a verification step's tokens attend as one-token requests (each with its own
context length and its request's blocks), so the decode kernel and the decode CUDA graphs serve it. Same tokens as
the per-request layout (the step's metadata differs only in its attention fields), and greedy outputs stay the
plain run's (CPU, float32, tiny random models)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vllm_lite.sampling_params import SamplingParams
from vllm_lite.worker.input_batch import InputStager

from spec_utils import OracleProposer, WrongProposer, make_core, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)


def test_rows_view_of_a_verification_step():
    stager = InputStager(64, 16, 8, 4, torch.device("cpu"))
    tokens = [np.array([7, 8, 9], dtype=np.int64), np.array([5, 6], dtype=np.int64)]
    starts, lens = np.array([5, 9]), np.array([3, 2])
    blocks = [np.array([3, 1], dtype=np.int32), np.array([0, 2, 6], dtype=np.int32)]
    args = (tokens, starts, lens, blocks, np.array([0, 1]))
    kw = dict(sample_counts=np.array([3, 2]))
    plain = stager.stage(*args, **kw)
    plain_fields = (plain.input_ids.tolist(), plain.positions.tolist(), plain.meta.slot_mapping.tolist(),
                    plain.logits_indices.tolist())
    assert plain.meta.seq_lens_cpu.tolist() == [8, 11] and plain.meta.num_reqs == 2  # (views of one buffer)
    rows = stager.stage(*args, **kw, rows_as_requests=True)
    assert (rows.input_ids.tolist(), rows.positions.tolist(), rows.meta.slot_mapping.tolist(),
            rows.logits_indices.tolist()) == plain_fields
    m = rows.meta
    assert (m.num_reqs, m.num_tokens, m.max_query_len, m.max_seq_len) == (5, 5, 1, 11)
    assert m.query_start_loc_cpu.tolist() == [0, 1, 2, 3, 4, 5]
    assert m.seq_lens_cpu.tolist() == [6, 7, 8, 10, 11]  # each token's own position + 1
    assert m.block_table_cpu.tolist() == [[3, 1, 0]] * 3 + [[0, 2, 6]] * 2


def _prompts(n: int = 4, vocab: int = 384) -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(2, 30))] for _ in range(n)]


def test_greedy_outputs_and_logprobs_unchanged(tiny_qwen3_path):
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3)
    ref = run_core(make_core(tiny_qwen3_path, **BASE), prompts, params)
    tokens = {r: v["tokens"] for r, v in ref.items()}
    for proposer in (OracleProposer(tokens), WrongProposer(tokens, 384)):
        core = make_core(tiny_qwen3_path, proposer=proposer, num_speculative_tokens=3, verify_as_decode=True,
                         **BASE)
        stager = core.executor.runner.stager
        stage, rows_steps = stager.stage, []

        def counted(*a, **kw):
            rows_steps.append(kw.get("rows_as_requests", False))
            return stage(*a, **kw)

        stager.stage = counted
        got = run_core(core, prompts, params)
        assert sum(rows_steps) >= 4  # the verification steps took the rows view
        assert {r: v["tokens"] for r, v in got.items()} == tokens
        for r in ref:
            for mine, theirs in zip(got[r]["logprobs"], ref[r]["logprobs"], strict=True):
                assert [t for t, _, _ in mine] == [t for t, _, _ in theirs]
                assert [lp for _, lp, _ in mine] == pytest.approx([lp for _, lp, _ in theirs], abs=1e-4)
        assert core.scheduler.make_stats().num_draft_tokens > 0
