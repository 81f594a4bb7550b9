"""`vllm-lite train-draft` on a tiny random Llama (CPU, float32): data alignment, loss going down, the exported head
loading in the engine with greedy output unchanged, the training forward drafting exactly what the engine's drafter
drafts, and resuming from a checkpoint landing on the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vllm_lite.sampling_params import SamplingParams

from spec_utils import make_core, record_drafts, run_core

BASE = dict(device="cpu", dtype="float32", block_size=4, max_model_len=256)
QUESTIONS = ["What is the capital of France?", "Tell me a story about a fox.", "Count to ten: 1 2 3",
             "def add(a, b):", "Hello world! How can I help you today?", "A JSON list of numbers, please.",
             "Why do tests use caches and tokens?", "Once upon a time there was a tiny model."]
ARGS = ["--device", "cpu", "--max-tokens", "24", "--prompts-per-shard", "8", "--draft-vocab-size", "160",
        "--batch-tokens", "400", "--lr", "1e-2", "--epochs", "6", "--checkpoint-every", "5", "--val-every", "4"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rows = [{"prompt": f"{q} #{i}"} for i, q in enumerate(QUESTIONS * 2)]
    rows[0] = {"messages": [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": "dropped"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny_llama_path, prompts_file, tmp_path_factory) -> tuple[str, dict]:
    """The command through the console script's dispatch: 16 prompts, 2 shards, 6 epochs."""
    from vllm_lite.entrypoints.cli import main
    out = str(tmp_path_factory.mktemp("head") / "head")
    assert main(["train-draft", "--model", tiny_llama_path, "--data", prompts_file, "--out", out, *ARGS]) == 0
    with open(os.path.join(out, "data", "meta.json")) as f:
        return out, json.load(f)


def _load_head(out: str, model_path: str):
    """The exported head as the training module (weights from model.safetensors)."""
    from vllm_lite.model_loader.hf_config import load_hf_config
    from vllm_lite.spec_decode.train.cli import target_embedding
    from vllm_lite.spec_decode.train.head import Eagle3TrainHead
    weights = load_file(os.path.join(out, "model.safetensors"))
    d2t = weights.pop("d2t")
    t2d = weights.pop("t2d")
    head = Eagle3TrainHead(load_hf_config(model_path), d2t.numel(), target_embedding(model_path))
    head.load_state_dict(weights)
    return head.eval(), torch.arange(d2t.numel()) + d2t, t2d


def _chat_prompts(model_path: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    from vllm_lite.tokenizer import apply_chat_template
    tok = AutoTokenizer.from_pretrained(model_path)
    return [apply_chat_template(tok, [{"role": "user", "content": f"{q} #{i}"}], None, True)
            for i, q in enumerate(QUESTIONS[:n])]


def test_shards_hold_the_targets_greedy_tokens(trained):
    """Labels at response positions are the next tokens (greedy self-distillation in float32), the loss mask
    covers the responses only, and the files and config are in the layout eagle.py reads."""
    out, meta = trained
    assert meta["complete"] and len(meta["shards"]) == 2 and meta["aux_layers"] == [1, 1, 0]
    assert meta["num_prompts"] == 16
    shard = load_file(os.path.join(out, "data", meta["shards"][0]["file"]))
    cu = shard["cu_seqlens"].tolist()
    assert shard["aux"].shape == (cu[-1], 3 * 64)
    for s, e in zip(cu, cu[1:]):
        mask = shard["loss_mask"][s:e].bool()
        q = torch.nonzero(mask).flatten()
        # q runs from the prompt's last token to the one before the last: one label per response token (24 at most)
        assert torch.equal(q, torch.arange(int(q[0]), e - s - 1)) and 0 < len(q) <= 24
        assert torch.equal(shard["labels"][s:e][q], shard["tokens"][s:e][q + 1])
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["draft_vocab_size"] == 160 and cfg["num_hidden_layers"] == 1
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 1, 0]
    card = open(os.path.join(out, "README.md")).read()
    assert "EAGLE-3 draft head" in card and "top-1 accuracy" in card


def test_training_lowers_the_loss(trained, tiny_llama_path, tmp_path):
    from vllm_lite.spec_decode.train.cli import target_embedding
    from vllm_lite.spec_decode.train.data import label_counts
    from vllm_lite.spec_decode.train.dataset import ShardDataset
    from vllm_lite.spec_decode.train.head import Eagle3TrainHead
    from vllm_lite.spec_decode.train.trainer import TrainConfig, train, ttt_loss
    from vllm_lite.spec_decode.train.vocab import DraftVocab
    from vllm_lite.model_loader.hf_config import load_hf_config
    out, meta = trained
    data_dir = os.path.join(out, "data")
    vocab = DraftVocab.from_counts(label_counts(data_dir, meta), 160)
    t2d = vocab.target_to_draft()
    cfg = TrainConfig(epochs=10, lr=1e-2, batch_tokens=400, checkpoint_every=100)
    data = ShardDataset(data_dir, meta, cfg.batch_tokens, cfg.seed)
    torch.manual_seed(0)
    head = Eagle3TrainHead(load_hf_config(tiny_llama_path), vocab.size, target_embedding(tiny_llama_path))
    batches = list(data.batches(0, 0, torch.device("cpu")))

    def loss() -> float:
        with torch.no_grad():
            return sum(float(ttt_loss(head.lm_head, head(b.aux, b.tokens, 3), t2d[b.labels], b.loss_mask)[0])
                       for b in batches)

    before = loss()
    summary = train(head, data, t2d, cfg, str(tmp_path / "ckpt"), torch.device("cpu"))
    assert summary["steps"] == 10 * data.batches_per_epoch
    assert loss() < 0.6 * before


def test_exported_head_is_lossless_in_the_engine(trained, tiny_llama_path):
    out, _ = trained
    prompts = _chat_prompts(tiny_llama_path, 5)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = run_core(make_core(tiny_llama_path, **BASE), prompts, greedy)
    core = make_core(tiny_llama_path, **BASE, speculative_config={"method": "eagle3", "model": out,
                                                                  "num_speculative_tokens": 3})
    got = run_core(core, prompts, greedy)
    assert {r: v["tokens"] for r, v in got.items()} == {r: v["tokens"] for r, v in ref.items()}
    stats = core.scheduler.make_stats()
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens > 0


def test_training_forward_drafts_what_the_engine_drafts(trained, tiny_llama_path):
    """The engine's drafter (paged KV cache, catch-up + decode steps) and the training module's TTT forward over the
    same sequence (committed tokens followed by the drafts) give the same k greedy drafts."""
    from transformers import AutoModelForCausalLM
    from vllm_lite.spec_decode.train.data import target_features
    out, meta = trained
    head, draft_to_target, _ = _load_head(out, tiny_llama_path)
    core = make_core(tiny_llama_path, **BASE, speculative_config={"method": "eagle3", "model": out,
                                                                  "num_speculative_tokens": 3})
    seen = record_drafts(core)
    run_core(core, _chat_prompts(tiny_llama_path, 3), SamplingParams(temperature=0.0, max_tokens=12,
                                                                     ignore_eos=True))
    assert len(seen) >= 6
    target = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    for tokens, drafts in seen[::2][:8]:
        seq = tokens + drafts[:2]
        aux, _ = next(target_features(target, [seq], tuple(meta["aux_layers"]), 10 ** 6))
        with torch.no_grad():
            hidden = head(aux[None], torch.tensor([seq]), 3)
        row = len(tokens) - 2
        assert [int(draft_to_target[head.lm_head(h[0, row]).argmax()]) for h in hidden] == drafts


def test_held_out_sequences_are_not_trained_and_reported(trained):
    """--val-every 4: every 4th sequence of each shard is out of every epoch's batches and only in val_batches; the
    card reports the held-out accuracy and acceptance (a chain: never above the accuracy, never rising)."""
    from vllm_lite.spec_decode.train.dataset import ShardDataset
    out, meta = trained
    data = ShardDataset(os.path.join(out, "data"), meta, 400, 0, val_every=4)
    assert data.num_val_sequences == 4  # 2 shards of 8
    for epoch in (0, 1):
        trained_seqs = {(s, int(i)) for s, g in data.plan(epoch) for i in g}
        held = {(s, int(i)) for s in range(2) for g in data._groups(s, held_out=True) for i in g}
        assert held == {(s, i) for s in range(2) for i in (3, 7)} and not trained_seqs & held
        assert len(trained_seqs) == 12
    assert sum(b.tokens.shape[0] for b in data.val_batches(torch.device("cpu"))) == 4
    card = open(os.path.join(out, "README.md")).read()
    assert "| held out (4 sequences) | loss" in card and "mean acceptance length" in card


def test_evaluate_counts_acceptance_up_to_the_first_miss():
    """Hand-computed: two draft positions over one sequence, predictions given directly (identity lm_head)."""
    from vllm_lite.spec_decode.train.dataset import Batch
    from vllm_lite.spec_decode.train.trainer import TrainConfig, evaluate
    v = 5
    labels = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3]])  # the target's next token after each position
    mask = torch.tensor([[False, True, True, True, True, True, True, False]])
    # step 0 row p aims at labels[p + 1] (rows p = 0..5), step 1 at labels[p + 2] (rows 0..4: the 5 full starts)
    preds = [torch.tensor([[1, 2, 0, 4, 1, 0, 0, 0]]),  # hits at p = 0, 1, 3, 4 of 6 rows
             torch.tensor([[2, 0, 4, 1, 0, 0, 0, 0]])]  # hits at p = 0, 2, 3 of 5 rows

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm_head = torch.nn.Identity()

        def forward(self, aux, tokens, steps):
            return [torch.nn.functional.one_hot(p, v).float() for p in preds[:steps]]

    class Data:
        num_val_sequences = 1

        def val_batches(self, device):
            return [Batch(torch.zeros(1, 8, dtype=torch.int64), torch.zeros(1, 8, 3), labels, mask)]

    got = evaluate(Head(), Data(), torch.arange(v), TrainConfig(draft_steps=2), torch.device("cpu"))
    assert got["val_accuracy_per_position"] == [round(4 / 6, 4), 0.6]
    # chains over starts 0..4: p = 0, 1, 3, 4 hit first; of those p = 0 and 3 hit second too (p = 2 hit only second)
    assert got["val_acceptance_per_position"] == [0.8, 0.4] and got["val_mean_acceptance_length"] == 2.2
    assert got["val_sequences"] == 1 and got["val_loss"] > 0


def test_resume_continues_at_the_same_step(trained, tiny_llama_path, tmp_path, monkeypatch):
    """A run stopped after its step-5 checkpoint, started again, ends on the same weights as one that never
    stopped."""
    from vllm_lite.spec_decode.train import trainer
    from vllm_lite.spec_decode.train.cli import target_embedding
    from vllm_lite.spec_decode.train.data import label_counts
    from vllm_lite.spec_decode.train.dataset import ShardDataset
    from vllm_lite.spec_decode.train.head import Eagle3TrainHead
    from vllm_lite.spec_decode.train.vocab import DraftVocab
    from vllm_lite.model_loader.hf_config import load_hf_config
    out, meta = trained
    data_dir = os.path.join(out, "data")
    vocab = DraftVocab.from_counts(label_counts(data_dir, meta), 160)
    cfg = trainer.TrainConfig(epochs=2, lr=3e-3, batch_tokens=400, checkpoint_every=5, max_steps=8)
    data = ShardDataset(data_dir, meta, cfg.batch_tokens, cfg.seed)
    embed = target_embedding(tiny_llama_path)
    hf_cfg = load_hf_config(tiny_llama_path)

    def fresh() -> Eagle3TrainHead:
        torch.manual_seed(0)
        return Eagle3TrainHead(hf_cfg, vocab.size, embed)

    whole = fresh()
    trainer.train(whole, data, vocab.target_to_draft(), cfg, str(tmp_path / "a"), torch.device("cpu"))
    real_step, calls = trainer._train_step, []

    def stop_at_seven(*args):
        calls.append(1)
        if len(calls) == 7:
            raise Interrupted
        return real_step(*args)

    monkeypatch.setattr(trainer, "_train_step", stop_at_seven)
    with pytest.raises(Interrupted):
        trainer.train(fresh(), data, vocab.target_to_draft(), cfg, str(tmp_path / "b"), torch.device("cpu"))
    monkeypatch.setattr(trainer, "_train_step", real_step)
    assert torch.load(tmp_path / "b" / trainer.CHECKPOINT, weights_only=True)["step"] == 5
    resumed = fresh()
    summary = trainer.train(resumed, data, vocab.target_to_draft(), cfg, str(tmp_path / "b"), torch.device("cpu"))
    assert summary["steps"] == 8
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_time_budget_cuts_the_run(trained, tiny_llama_path, tmp_path, monkeypatch):
    """With a budget the probe steps' time allows no more of, the run ends right after the probe and its checkpoint
    plans that many steps (a resumed run keeps them)."""
    from vllm_lite.spec_decode.train import trainer
    from vllm_lite.spec_decode.train.cli import target_embedding
    from vllm_lite.spec_decode.train.data import label_counts
    from vllm_lite.spec_decode.train.dataset import ShardDataset
    from vllm_lite.spec_decode.train.head import Eagle3TrainHead
    from vllm_lite.spec_decode.train.vocab import DraftVocab
    from vllm_lite.model_loader.hf_config import load_hf_config
    out, meta = trained
    data_dir = os.path.join(out, "data")
    vocab = DraftVocab.from_counts(label_counts(data_dir, meta), 160)
    monkeypatch.setattr(trainer, "PROBE", (1, 3))
    cfg = trainer.TrainConfig(epochs=5, batch_tokens=400, time_budget_s=1e-3)
    data = ShardDataset(data_dir, meta, cfg.batch_tokens, cfg.seed)
    head = Eagle3TrainHead(load_hf_config(tiny_llama_path), vocab.size, target_embedding(tiny_llama_path))
    summary = trainer.train(head, data, vocab.target_to_draft(), cfg, str(tmp_path), torch.device("cpu"))
    assert summary["steps"] == summary["total_steps"] == 3 < 5 * data.batches_per_epoch
    assert torch.load(tmp_path / trainer.CHECKPOINT, weights_only=True)["total_steps"] == 3
    assert trainer.train(head, data, vocab.target_to_draft(), cfg, str(tmp_path), torch.device("cpu"))["steps"] == 3


@pytest.mark.slow
def test_bench_spec_eagle3_fills_the_card(trained, tiny_llama_path):
    """`vllm-lite bench spec eagle3` on the tiny model and its head: outputs identical, acceptance in the card."""
    from vllm_lite.benchmarks import spec
    out, _ = trained
    result = spec.main(["eagle3", "--model", tiny_llama_path, "--head", out, "--num-prompts", "2", "--output-len",
                        "8", "--device", "cpu", "--dtype", "float32", "--max-model-len", "512"])
    assert result["identical_outputs"] == "2/2" and result["num_drafts"] > 0
    card = open(os.path.join(out, "README.md")).read()
    assert f"mean acceptance length {result['mean_acceptance_length']}" in card


@pytest.mark.slow
def test_bench_spec_eagle3_batched_identity(trained, tiny_llama_path):
    """--batched: every prompt in one batch, outputs compared, no TPOT and the card left as it was."""
    from vllm_lite.benchmarks import spec
    out, _ = trained
    card = open(os.path.join(out, "README.md")).read()
    result = spec.main(["eagle3", "--model", tiny_llama_path, "--head", out, "--num-prompts", "3", "--output-len",
                        "8", "--device", "cpu", "--dtype", "float32", "--max-model-len", "512", "--batched"])
    assert result["identical_outputs"] == "3/3" and result["num_drafts"] > 0 and result["identity_shown"]
    assert result["speculative_config"]["disable_by_batch_size"] is None  # a batch over 64 must still draft
    assert result["speedup"] is None and result["plain_tpot_ms"] is None
    assert open(os.path.join(out, "README.md")).read() == card


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_draft_on_cuda(prompts_file, tmp_path):
    """The CUDA path: data from the engine in bf16 (FlashInfer, CUDA graphs) and transformers on the device, bf16
    autocast training; the head then drafts in a float32 engine whose greedy output is the plain run's exactly."""
    from tiny_models import make_tiny_model
    from vllm_lite.entrypoints.cli import main
    target = make_tiny_model(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    out = str(tmp_path / "head")
    assert main(["train-draft", "--model", target, "--data", prompts_file, "--out", out, *ARGS[2:],
                 "--device", "cuda", "--dtype", "bfloat16"]) == 0
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    cuda = dict(BASE, device="cuda", attention_backend="torch", enforce_eager=True)
    prompts = _chat_prompts(target, 5)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = run_core(make_core(target, **cuda), prompts, greedy)
    core = make_core(target, **cuda, speculative_config={"method": "eagle3", "model": out,
                                                         "num_speculative_tokens": 3})
    assert {r: v["tokens"] for r, v in run_core(core, prompts, greedy).items()} == \
        {r: v["tokens"] for r, v in ref.items()}
    assert core.scheduler.make_stats().num_draft_tokens > 0


class Interrupted(Exception):
    pass


def test_draft_vocabulary_mappings():
    from vllm_lite.spec_decode.train.vocab import DraftVocab
    counts = np.array([0, 5, 1, 5, 0, 9, 2])
    vocab = DraftVocab.from_counts(counts, 4)
    assert vocab.draft_ids.tolist() == [1, 3, 5, 6]
    assert (torch.arange(4) + vocab.d2t).tolist() == [1, 3, 5, 6]
    assert vocab.t2d.tolist() == [False, True, False, True, False, True, True]
    assert vocab.target_to_draft().tolist() == [-1, 0, -1, 1, -1, 2, 3]
    assert vocab.coverage(counts) == pytest.approx(21 / 22)
    assert DraftVocab.from_counts(counts, 100).size == 7


def test_a_run_under_one_epoch_is_called_undertrained(trained, tiny_llama_path, prompts_file, tmp_path, capsys):
    """A head trained for less than one pass over its data says so (result JSON, card); a full run does not."""
    import shutil
    from vllm_lite.entrypoints.cli import main
    out, _ = trained
    assert "undertrained" not in open(os.path.join(out, "README.md")).read()
    short = str(tmp_path / "short")
    shutil.copytree(os.path.join(out, "data"), os.path.join(short, "data"))  # the same data, generated once
    capsys.readouterr()
    assert main(["train-draft", "--model", tiny_llama_path, "--data", prompts_file, "--out", short, *ARGS,
                 "--max-steps", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 1 and result["epochs"] < 1 and result["undertrained"] is True
    assert "**undertrained**" in open(os.path.join(short, "README.md")).read()
