"""The training loop: training-time test over `draft_steps` steps (loss weights 0.8^j, as in EAGLE-3's reference
trainer), AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on CUDA (float32 on the CPU), a
progress bar with the loss and the top-1 accuracy of each draft position, and one checkpoint (weights, optimizer,
schedule, step) rewritten every `checkpoint_every` steps; a run started again resumes from it at the same step and
sees the same batches it would have seen.

The labels are the target's greedy tokens, so position j's accuracy estimates the chance that draft j matches the
target given drafts 0 .. j-1 did (labels outside the draft vocabulary count as misses; they carry no loss).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from vllm_lite.spec_decode.train.dataset import Batch, ShardDataset
from vllm_lite.spec_decode.train.head import Eagle3TrainHead

STEP_WEIGHT = 0.8  # loss weight of draft position j: STEP_WEIGHT ** j
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    draft_steps: int = 3  # TTT depth (draft positions trained)
    epochs: int = 2
    max_steps: int | None = None  # stop earlier (the schedule is sized to it)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    grad_clip: float = 0.5
    batch_tokens: int = 16384  # padded tokens per batch
    checkpoint_every: int = 500
    seed: int = 0
    # Seconds the training may take: steps PROBE[0] .. PROBE[1] are timed and the run (and its cosine schedule) is
    # cut to the steps that fit. A resumed run keeps the step count its checkpoint planned.
    time_budget_s: float | None = None


PROBE = (5, 25)


def _shift(x: torch.Tensor, n: int, fill: int | bool) -> torch.Tensor:
    """x[:, n:] padded back to x's length with `fill`."""
    return F.pad(x[:, n:], (0, min(n, x.shape[1])), value=fill)


def ttt_loss(lm_head: torch.nn.Module, hidden: list[torch.Tensor], labels: torch.Tensor, mask: torch.Tensor
             ) -> tuple[torch.Tensor, list[float]]:
    """hidden: the head's normed output per step [B, T, H]; labels [B, T]: draft ids of the target's greedy token
    after each position (-1: not in the draft vocabulary); mask: positions that train. Step j's row p is scored
    against position p + 1 + j; only those rows go through lm_head. -> (loss, accuracy per step)."""
    loss = hidden[0].new_zeros((), dtype=torch.float32)
    accs = []
    for j, h in enumerate(hidden):
        target = _shift(labels, 1 + j, -1)
        rows = _shift(mask, 1 + j, False)
        if not bool(rows.any()):
            accs.append(float("nan"))
            continue
        picked, tgt = lm_head(h[rows]).float(), target[rows]
        known = tgt >= 0
        if bool(known.any()):
            loss = loss + STEP_WEIGHT ** j * F.cross_entropy(picked[known], tgt[known])
        accs.append(float((picked.argmax(dim=-1) == tgt).float().mean()))
    return loss, accs


def _schedule(plan: dict[str, int], warmup: int):
    """Linear warm-up, then cosine decay to zero at plan["total"] (read live: a time budget may shorten it)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(plan["total"] - warmup, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(head: Eagle3TrainHead, data: ShardDataset, target_to_draft: torch.Tensor, cfg: TrainConfig,
          ckpt_dir: str, device: torch.device) -> dict:
    """Train `head` in place; returns the run's summary (steps, tokens, seconds, the last steps' mean loss and
    per-position accuracy)."""
    total = data.batches_per_epoch * cfg.epochs
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    plan = {"total": total}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(plan, max(1, int(cfg.warmup_ratio * total))))
    os.makedirs(ckpt_dir, exist_ok=True)
    ckpt_path = os.path.join(ckpt_dir, CHECKPOINT)
    step, history = 0, []
    if os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location=device, weights_only=True)
        if cfg.time_budget_s and state["total_steps"] <= total:
            total = plan["total"] = state["total_steps"]
        if state["total_steps"] != total:
            raise ValueError(f"the checkpoint in {ckpt_dir} belongs to a run of {state['total_steps']} steps, this "
                             f"one has {total}; use the same --epochs/--max-steps/--batch-tokens/--val-every or "
                             f"another --out")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        step, history = state["step"], state["history"]
    target_to_draft = target_to_draft.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, desc="train-draft", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 10.0)
    t0, tokens, first, probe_t = time.perf_counter(), 0, step, 0.0
    head.train()
    while step < total:
        epoch, skip = divmod(step, data.batches_per_epoch)
        for batch in data.batches(epoch, skip, device):
            loss, accs = _train_step(head, batch, target_to_draft, cfg, opt, autocast)
            sched.step()
            step += 1
            tokens += int(batch.loss_mask.sum())
            history = (history + [[loss] + accs])[-50:]
            bar.update(1)
            bar.set_postfix_str(f"loss {loss:.3f} acc " + "/".join(f"{a:.2f}" for a in accs) +
                                f" lr {sched.get_last_lr()[0]:.1e}", refresh=False)
            if cfg.time_budget_s and first == 0 and step in PROBE:
                now = time.perf_counter()
                if step == PROBE[1]:
                    fit = step + int((cfg.time_budget_s - (now - t0)) / ((now - probe_t) / (PROBE[1] - PROBE[0])))
                    total = plan["total"] = max(step, min(total, fit))
                    bar.total = total
                probe_t = now
            if step % cfg.checkpoint_every == 0 or step == total:
                _save(ckpt_path, {"step": step, "total_steps": total, "head": head.state_dict(),
                                  "optim": opt.state_dict(), "sched": sched.state_dict(), "history": history,
                                  "config": asdict(cfg)})
            if step >= total:
                break
    bar.close()
    head.eval()
    mean = [sum(h[i] for h in history if h[i] == h[i]) / max(1, sum(h[i] == h[i] for h in history))
            for i in range(1 + cfg.draft_steps)] if history else [float("nan")] * (1 + cfg.draft_steps)
    return {"steps": step, "total_steps": total, "epochs": round(step / data.batches_per_epoch, 3),
            "trained_tokens_this_run": tokens, "train_seconds_this_run": round(time.perf_counter() - t0, 1),
            "final_loss": round(mean[0], 4), "final_accuracy_per_position": [round(a, 4) for a in mean[1:]]}


@torch.no_grad()
def evaluate(head: Eagle3TrainHead, data: ShardDataset, target_to_draft: torch.Tensor, cfg: TrainConfig,
             device: torch.device) -> dict:
    """The held-out sequences (`ShardDataset.val_batches`): loss, top-1 accuracy per draft position, and what a
    greedy verifier would accept. Training accuracy scores each position whatever the earlier drafts did; a
    verifier stops at the first miss, so position j's acceptance counts a start only where drafts 0 .. j all hit
    (starts with every position's label), and 1 + their sum is the bench's mean acceptance length."""
    head.eval()
    target_to_draft = target_to_draft.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    steps = cfg.draft_steps
    loss_sum, batches = 0.0, 0
    hits, rows_n = torch.zeros(steps), torch.zeros(steps)
    chain, starts = torch.zeros(steps), 0
    for batch in data.val_batches(device):
        aux = batch.aux if batch.aux.device.type == "cuda" else batch.aux.float()
        labels = target_to_draft[batch.labels]
        with autocast:
            hidden = head(aux, batch.tokens, steps)
            loss, _ = ttt_loss(head.lm_head, hidden, labels, batch.loss_mask)
            preds = [head.lm_head(h).argmax(dim=-1) for h in hidden]
        loss_sum, batches = loss_sum + float(loss), batches + 1
        full = torch.ones_like(batch.loss_mask)
        hit_so_far = torch.ones_like(batch.loss_mask)
        per_step = []
        for j, pred in enumerate(preds):
            rows = _shift(batch.loss_mask, 1 + j, False)
            hit = (pred == _shift(labels, 1 + j, -1)) & rows
            hits[j] += float(hit.sum())
            rows_n[j] += float(rows.sum())
            full &= rows
            hit_so_far = hit_so_far & hit
            per_step.append(hit_so_far)
        starts += int(full.sum())
        for j, ok in enumerate(per_step):
            chain[j] += float((ok & full).sum())
    head.train()
    if not batches:
        return {}
    accept = (chain / max(starts, 1)).tolist()
    return {"val_sequences": data.num_val_sequences, "val_loss": round(loss_sum / batches, 4),
            "val_accuracy_per_position": [round(a, 4) for a in (hits / rows_n.clamp(min=1)).tolist()],
            "val_acceptance_per_position": [round(a, 4) for a in accept],
            "val_mean_acceptance_length": round(1 + sum(accept), 4)}


def _train_step(head: Eagle3TrainHead, batch: Batch, target_to_draft: torch.Tensor, cfg: TrainConfig,
                opt: torch.optim.Optimizer, autocast: torch.autocast) -> tuple[float, list[float]]:
    aux = batch.aux if batch.aux.device.type == "cuda" else batch.aux.float()  # CPU: float32 throughout
    with autocast:
        hidden = head(aux, batch.tokens, cfg.draft_steps)
        loss, accs = ttt_loss(head.lm_head, hidden, target_to_draft[batch.labels], batch.loss_mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), cfg.grad_clip)
    opt.step()
    return float(loss.detach()), accs
