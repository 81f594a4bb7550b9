"""`vllm-lite train-draft --model MODEL [--data PROMPTS.jsonl] --out HEAD_DIR`: data, draft vocabulary, training,
export. HEAD_DIR/data keeps the shards and HEAD_DIR/checkpoints the last checkpoint, so the same command run again
resumes where it stopped (delete them to start over)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict

import torch

from vllm_lite.config import DEFAULT_MODEL
from vllm_lite.model_loader.hf_config import load_hf_config
from vllm_lite.model_loader.weights import checkpoint_weights
from vllm_lite.spec_decode.train.data import DataConfig, generate_data, label_counts
from vllm_lite.spec_decode.train.dataset import ShardDataset
from vllm_lite.spec_decode.train.export import write_head
from vllm_lite.spec_decode.train.head import Eagle3TrainHead
from vllm_lite.spec_decode.train.trainer import TrainConfig, evaluate, train
from vllm_lite.spec_decode.train.vocab import DraftVocab


EXPORT_MARGIN_S = 20.0  # writing the head and the card, kept out of the training's share of --time-budget-s
MIN_EPOCHS = 1.0  # less training than this over the data set is reported as undertrained


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vllm-lite train-draft", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL, help="target model (folder, .gguf, hub id or the default)")
    ap.add_argument("--data", default=None, help="JSONL of prompts ('messages', 'prompt' or 'question' per row); "
                                                 "default: GSM8K's train.jsonl from shared/data/gsm8k")
    ap.add_argument("--out", required=True, help="the head folder to write")
    g = ap.add_argument_group("data")
    g.add_argument("--num-samples", type=int, default=None, help="use the first N prompts (default: all)")
    g.add_argument("--max-tokens", type=int, default=512, help="response length limit")
    g.add_argument("--max-seq-len", type=int, default=1024, help="prompt + response tokens kept per sequence")
    g.add_argument("--prompts-per-shard", type=int, default=1024)
    g.add_argument("--forward-batch-tokens", type=int, default=16384, help="tokens per hidden-state forward")
    g.add_argument("--aux-layers", default=None, help="the three target layers read, e.g. 2,15,27 "
                                                      "(default: 2, L/2, L-3)")
    g = ap.add_argument_group("training")
    g.add_argument("--draft-vocab-size", type=int, default=8192)
    g.add_argument("--num-draft-steps", type=int, default=3, help="draft positions trained (TTT depth)")
    g.add_argument("--val-every", type=int, default=50,
                   help="hold every N-th sequence out of training and report the head's accuracy and expected "
                        "acceptance on them (0: none)")
    for name, value in asdict(TrainConfig()).items():
        if name not in ("draft_steps", "time_budget_s"):
            g.add_argument("--" + name.replace("_", "-"), type=float if isinstance(value, float) else int,
                           default=value)
    g.add_argument("--time-budget-s", type=float, default=None,
                   help="seconds for the whole command: training is cut to what the data generation left, minus a "
                        "margin for the export (its cosine schedule follows)")
    g = ap.add_argument_group("engine")
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    g.add_argument("--dtype", default="auto", help="target dtype for generation and hidden states")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="the generating engine's share (transformers runs the target beside it)")
    g.add_argument("--enforce-eager", action="store_true")
    return ap


def target_embedding(path: str) -> torch.Tensor:
    """The target's token embedding (the head reads it, frozen, and shares it at inference)."""
    for name, tensor in checkpoint_weights(path):
        if name == "model.embed_tokens.weight":
            return tensor
    raise ValueError(f"{path} has no model.embed_tokens.weight")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    engine = dict(device=device.type, dtype=args.dtype, seed=args.seed, enforce_eager=args.enforce_eager or None)
    if device.type == "cuda":
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    data_dir = os.path.join(args.out, "data")
    data_cfg = DataConfig(model=args.model, data=args.data, out_dir=data_dir, num_samples=args.num_samples,
                          max_tokens=args.max_tokens, max_seq_len=args.max_seq_len,
                          prompts_per_shard=args.prompts_per_shard, forward_batch_tokens=args.forward_batch_tokens,
                          engine_kwargs=engine)
    aux = tuple(int(x) for x in args.aux_layers.split(",")) if args.aux_layers else None
    t0 = time.perf_counter()
    meta = generate_data(data_cfg, aux)
    data_seconds = time.perf_counter() - t0
    _say(f"data: {len(meta['shards'])} shards, {sum(s['num_tokens'] for s in meta['shards'])} tokens, "
         f"{meta['num_output_tokens']} generated in {meta['generation_seconds']:.1f} s, target hidden states "
         f"{meta['forward_seconds']:.1f} s ({data_seconds:.1f} s this run)")
    counts = label_counts(data_dir, meta)
    vocab = DraftVocab.from_counts(counts, args.draft_vocab_size)
    cfg = load_hf_config(meta["model_path"])
    embed = target_embedding(meta["model_path"])
    torch.manual_seed(args.seed)
    head = Eagle3TrainHead(cfg, vocab.size, embed).to(device)
    train_cfg = TrainConfig(draft_steps=args.num_draft_steps, epochs=args.epochs, max_steps=args.max_steps or None,
                            lr=args.lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
                            grad_clip=args.grad_clip, batch_tokens=args.batch_tokens,
                            checkpoint_every=args.checkpoint_every, seed=args.seed,
                            time_budget_s=None if args.time_budget_s is None else
                            max(args.time_budget_s - (time.perf_counter() - t0) - EXPORT_MARGIN_S, 1.0))
    dataset = ShardDataset(data_dir, meta, train_cfg.batch_tokens, train_cfg.seed, args.val_every)
    _say(f"training: {dataset.batches_per_epoch} batches per epoch, draft vocabulary {vocab.size} "
         f"({100 * vocab.coverage(counts):.2f} % of response tokens), {train_cfg.draft_steps} draft steps, {device}; "
         f"{dataset.num_val_sequences} sequences held out")
    summary = train(head, dataset, vocab.target_to_draft(), train_cfg, os.path.join(args.out, "checkpoints"), device)
    summary.update(evaluate(head, dataset, vocab.target_to_draft(), train_cfg, device))
    if "val_mean_acceptance_length" in summary:
        _say(f"held out: accuracy per position {summary['val_accuracy_per_position']}, greedy acceptance "
             f"{summary['val_acceptance_per_position']}, mean acceptance length "
             f"{summary['val_mean_acceptance_length']} at k = {train_cfg.draft_steps}")
    # A time budget mostly spent on data (a cold machine: model conversion, compilation) or a small --max-steps
    # leaves a head that only looks finished: say so in the result and the card instead of shipping it silently.
    summary["undertrained"] = summary["epochs"] < MIN_EPOCHS
    if summary["undertrained"]:
        logging.getLogger(__name__).warning(
            "training ran %.3f epochs (below %.1f; time budget for training %s s): the head is undertrained. Delete "
            "%s and run again with a larger --time-budget-s or --max-steps (the data shards are reused)",
            summary["epochs"], MIN_EPOCHS, train_cfg.time_budget_s, os.path.join(args.out, "checkpoints"))
    save_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with open(os.path.join(meta["model_path"], "config.json")) as f:
        target_config = json.load(f)
    card = {**summary, "model": args.model, "data": args.data or "GSM8K train questions",
            "num_prompts": meta["num_prompts"], "num_sequences": sum(len(s["seq_lens"]) for s in meta["shards"]),
            "num_tokens": sum(s["num_tokens"] for s in meta["shards"]),
            "num_loss_tokens": sum(s["num_loss_tokens"] for s in meta["shards"]), "aux_layers": meta["aux_layers"],
            "draft_vocab_size": vocab.size, "vocab_coverage": vocab.coverage(counts), "lr": train_cfg.lr,
            "batch_tokens": train_cfg.batch_tokens, "draft_steps": train_cfg.draft_steps, "device": str(device),
            "data_seconds": round(meta["generation_seconds"] + meta["forward_seconds"], 1),
            "train_seconds": summary["train_seconds_this_run"]}
    write_head(args.out, head, vocab, target_config, tuple(meta["aux_layers"]), save_dtype, card)
    result = {**summary, "out": args.out, "data_seconds_this_run": round(data_seconds, 1),
              "generation_seconds": round(meta["generation_seconds"], 1),
              "forward_seconds": round(meta["forward_seconds"], 1), "draft_vocab_size": vocab.size,
              "vocab_coverage": round(vocab.coverage(counts), 5), "total_seconds_this_run":
              round(time.perf_counter() - t0, 1)}
    print(json.dumps(result, indent=2))
    return 0


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
