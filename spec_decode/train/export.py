"""The head folder `{"method": "eagle3", "model": DIR}` loads (spec_decode/eagle.py): config.json (a one-layer Llama
config with draft_vocab_size, target_hidden_size and eagle_config.eagle_aux_hidden_state_layer_ids), model.safetensors
(the head's weights in the public names, d2t, t2d; no embed_tokens: the target's is shared) and a README.md model
card that the acceptance benchmark can complete later."""
from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from vllm_lite.spec_decode.train.head import Eagle3TrainHead
from vllm_lite.spec_decode.train.vocab import DraftVocab

# Target config fields a head keeps (attention shape, rotary, norms); everything else is the head's own.
_KEPT = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
         "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "vocab_size",
         "bos_token_id", "eos_token_id", "pad_token_id")
CARD = "README.md"
ACCEPTANCE_MARK = "<!-- acceptance -->"


def head_config(target_config: dict[str, Any], draft_vocab_size: int, aux_layers: tuple[int, ...],
                dtype: torch.dtype) -> dict[str, Any]:
    cfg = {k: target_config[k] for k in _KEPT if k in target_config}
    cfg.update(architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1, hidden_act="silu",
               attention_bias=False, mlp_bias=False, tie_word_embeddings=False,
               draft_vocab_size=int(draft_vocab_size), target_hidden_size=int(target_config["hidden_size"]),
               torch_dtype=str(dtype).removeprefix("torch."),
               eagle_config={"eagle_aux_hidden_state_layer_ids": [int(i) for i in aux_layers]})
    return cfg


def write_head(out_dir: str, head: Eagle3TrainHead, vocab: DraftVocab, target_config: dict[str, Any],
               aux_layers: tuple[int, ...], dtype: torch.dtype, card: dict[str, Any]) -> None:
    os.makedirs(out_dir, exist_ok=True)
    weights = {k: v.detach().to("cpu", dtype).contiguous() for k, v in head.state_dict().items()}
    weights.update(d2t=vocab.d2t, t2d=vocab.t2d)
    save_file(weights, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(head_config(target_config, vocab.size, aux_layers, dtype), f, indent=2)
    with open(os.path.join(out_dir, CARD), "w") as f:
        f.write(model_card(card))


def model_card(info: dict[str, Any]) -> str:
    """The card: what was trained on what, and how well (training accuracy; acceptance once benchmarked)."""
    acc = ", ".join(f"{a:.3f}" for a in info["final_accuracy_per_position"])
    return f"""# EAGLE-3 draft head for {info['model']}

Trained with `vllm-lite train-draft` (self-distillation: the target's own greedy responses).

Use it with vllm-lite: `LLM("{info['model']}", speculative_config={{"method": "eagle3", "model": "THIS_FOLDER",
"num_speculative_tokens": {info['draft_steps']}}})`.

| | |
| --- | --- |
| data | {info['data']}: {info['num_prompts']} prompts, {info['num_sequences']} sequences, {info['num_tokens']} tokens ({info['num_loss_tokens']} response tokens trained) |
| target layers read | {info['aux_layers']} |
| draft vocabulary | {info['draft_vocab_size']} tokens ({100 * info['vocab_coverage']:.2f} % of the response tokens) |
| training | {'**undertrained** (under one epoch): ' if info.get('undertrained') else ''}{info['steps']} steps ({info['epochs']} epochs), TTT over {info['draft_steps']} draft positions, lr {info['lr']}, {info['batch_tokens']} tokens per batch, {info['device']} |
| time | data {info['data_seconds']} s, training {info['train_seconds']} s |
| final loss | {info['final_loss']} |
| top-1 accuracy per draft position (training, last steps) | {acc} |
{_held_out_row(info)}
{ACCEPTANCE_MARK}
Acceptance: not measured yet (`vllm-lite bench spec eagle3 --head THIS_FOLDER`).
"""


def _held_out_row(info: dict[str, Any]) -> str:
    if "val_mean_acceptance_length" not in info:
        return ""
    acc = ", ".join(f"{a:.3f}" for a in info["val_accuracy_per_position"])
    chain = ", ".join(f"{a:.3f}" for a in info["val_acceptance_per_position"])
    return (f"| held out ({info['val_sequences']} sequences) | loss {info['val_loss']}; top-1 accuracy {acc}; greedy "
            f"acceptance per position {chain}; mean acceptance length {info['val_mean_acceptance_length']} |\n")


def record_acceptance(out_dir: str, text: str) -> None:
    """Replace the card's acceptance section (everything after the mark) with `text`."""
    path = os.path.join(out_dir, CARD)
    if not os.path.exists(path):
        return
    with open(path) as f:
        card = f.read()
    head, mark, _ = card.partition(ACCEPTANCE_MARK)
    with open(path, "w") as f:
        f.write(head + (mark or ACCEPTANCE_MARK) + "\n" + text.rstrip() + "\n")
