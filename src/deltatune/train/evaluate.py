"""Evaluation: batched greedy generation, perplexity, and next-token KL for the forgetting report.

Generation is a plain greedy loop over the model's KV cache rather than ``model.generate``: it is
short, has no sampling/config surprises, and lets us control padding exactly. Prompts are sorted by
length so that a batch holds prompts of similar length (less left padding to compute), and the
output order is restored at the end.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

# End-of-turn markers used by chat templates besides the tokenizer's eos (ChatML, Llama 3, Gemma).
_EXTRA_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|endoftext|>")


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Messages | str) -> list[int]:
    """Token ids of one prompt. Message lists go through the chat template with the assistant
    header appended; plain strings are tokenized as they are (with the tokenizer's specials)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    # The template already wrote any bos/system tokens; adding specials again would double them.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, model: nn.Module | None = None) -> set[int]:
    """Ids that end a reply: the tokenizer's eos, the model's generation-config eos (int or list),
    and known end-of-turn tokens present in the vocabulary."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list | tuple):
        ids.update(int(e) for e in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in _EXTRA_STOP_TOKENS if t in vocab)
    return ids


def _accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model.forward`` takes keyword ``name`` explicitly (a ``**kwargs`` wrapper may not pass it on)."""
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _can_select(cache: Any) -> bool:
    return callable(getattr(cache, "batch_select_indices", None))


def _left_pad(seqs: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids padded on the left with ``pad_id`` and the matching 0/1 attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        if s:
            ids[row, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[row, width - len(s) :] = 1
    return ids, mask


def _contiguous_input(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook for the output head during generation.

    ``logits_to_keep=1`` hands the head ``hidden[:, -1:, :]``, a non-contiguous (B, 1, H) slice.
    PyTorch 2.13's matmul folds such an input to 2-D only when the weight requires grad; for a
    frozen head (every adapter method) it expands the (V, H) weight B times into a bmm instead.
    Measured on SmolLM2 (V = 49152, H = 576), 40 prompts, bf16: the prefill took +2.3 GB and 5x
    the time. A copy of the (B, 1, H) slice costs nothing by comparison.
    """
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


@torch.inference_mode()
def greedy_generate_ids(
    model: nn.Module,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    pad_id: int,
) -> list[list[int]]:
    """Greedy continuation of one batch of token-id prompts; each result stops before its first stop id.

    Left padding puts every prompt's last token in the last column, so one (B, 1) step feeds all
    rows. Position ids count real tokens only (cumsum of the mask), so a padded row sees the same
    positions as it would alone; without them RoPE/learned positions would shift by the pad length.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    hook = head.register_forward_pre_hook(_contiguous_input) if isinstance(head, nn.Module) else None
    try:
        return _greedy_generate_ids(model, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids, pad_id=pad_id)
    finally:
        if hook is not None:
            hook.remove()


def _greedy_generate_ids(
    model: nn.Module, prompts: Sequence[list[int]], *, max_new_tokens: int, stop_ids: set[int], pad_id: int
) -> list[list[int]]:
    device = _model_device(model)
    input_ids, mask = _left_pad(prompts, pad_id)
    input_ids, mask = input_ids.to(device), mask.to(device)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    batch = input_ids.shape[0]
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    # Rows still generating, as indices into the original batch; finished rows leave the batch
    # (and the KV cache) so a few long replies don't keep paying for the short ones.
    active = torch.arange(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)  # (b,), aligned with active
    stop = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)
    # Only the last position's logits are needed: on the prefill that skips a (B, T, V) projection,
    # about a fifth of a 135M model's prefill FLOPs with SmolLM2's 49k vocabulary.
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    # transformers 5.x renamed past_key_values → cache (input and output alike); reading the name off
    # the first output and passing the cache back under it works on either side of the rename.
    cache_kw: str | None = None
    cache: Any = None
    step_ids, step_pos = input_ids, positions
    n_steps = 0
    for step in range(max_new_tokens):
        kwargs = {cache_kw: cache} if cache_kw is not None else {}
        res = model(
            input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **extra, **kwargs
        )
        if cache_kw is None:
            cache_kw = "cache" if "cache" in res else "past_key_values"
        cache = res[cache_kw]
        next_tok = res.logits[:, -1, :].argmax(-1)  # (b,) for the b active rows
        out[active, step] = next_tok
        n_steps = step + 1
        done |= torch.isin(next_tok, stop)  # (b,)
        n_done = int(done.sum())
        if n_done == len(active):
            break
        # Compact once a quarter of the rows are done: copying the cache costs about one step.
        if 4 * n_done >= len(active) and _can_select(cache):
            keep = (~done).nonzero().squeeze(1)  # (b',)
            cache.batch_select_indices(keep)
            active, next_tok, mask, step_pos = active[keep], next_tok[keep], mask[keep], step_pos[keep]
            done = done[keep]
        # Finished rows that stay in the batch go on decoding; their tokens after the stop are cut below.
        step_ids = next_tok[:, None]  # (b, 1)
        step_pos = step_pos[:, -1:] + 1  # (b, 1)
        mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=device)], dim=1)
    results: list[list[int]] = []
    for row in out[:, :n_steps].tolist():
        cut = next((i for i, t in enumerate(row) if t in stop_ids), len(row))
        results.append(row[:cut])
    return results


def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages] | Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy replies to ``prompts`` (chat message lists or plain strings), in the input order.

    The model is put in eval mode for the call (dropout off) and restored afterwards. Replies stop
    at eos / end-of-turn tokens and are decoded without special tokens.

    On CPU, bigger batches are cheaper: SmolLM2-135M, 40 chat prompts × ≤48 new tokens, fp32, one
    thread: 24 CPU-s at batch_size=40 vs 32 CPU-s at 16 (same as ``model.generate``: 25 CPU-s).
    bf16 without native CPU support (AVX2 only) cost 4.6x more; ``resolve_dtype("auto")`` avoids it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("tokenizer has neither a pad nor an eos token (see deltatune.models.fix_tokenizer)")
    stops = stop_token_ids(tokenizer, model)
    # Longest first: the slowest batch runs while the progress bar's estimate is still honest, and
    # neighbours in length share a batch, so little compute goes to padding.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    replies: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(encoded), desc="generate", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                new_ids = greedy_generate_ids(
                    model,
                    [encoded[i] for i in idx],
                    max_new_tokens=max_new_tokens,
                    stop_ids=stops,
                    pad_id=int(pad_id),
                )
                for i, ids in zip(idx, new_ids):
                    replies[i] = str(tokenizer.decode(ids, skip_special_tokens=True)).strip()
                bar.update(len(idx))
    finally:
        model.train(was_training)
    return replies


@torch.inference_mode()
def perplexity(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Token-weighted mean next-token loss and its exp over ``batches``.

    Each batch holds ``input_ids`` and ``labels`` (B, T) and optionally ``attention_mask``; labels
    follow the transformers convention (aligned with input_ids, shifted here, -100 = ignore).
    Weighting by token count, not by batch, makes the result independent of how data is batched.
    Returns {"loss", "ppl", "tokens"}.
    """
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            labels = batch["labels"].to(device)[:, 1:]  # (B, T-1): token t+1 is predicted at t
            logits = model(
                input_ids=input_ids, attention_mask=None if mask is None else mask.to(device)
            ).logits
            logits = logits[:, :-1, :].float()  # (B, T-1, V), fp32 so bf16 models sum losses exactly
            total += F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no labelled tokens (all labels are -100)")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(loss), "tokens": float(count)}


def next_token_kl(
    logits_base: torch.Tensor, logits_adapted: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """Mean over unmasked positions of KL(p_base ‖ p_adapted) = Σ_v p_b(v)·(log p_b(v) − log p_a(v)).

    logits_*: (..., V), e.g. (B, T, V); mask: (...) with nonzero/True at positions to count (None:
    all). This is the forgetting measure of MISSION §1: for an adapter, base logits come from the
    same model with the adapter disabled.
    """
    if logits_base.shape != logits_adapted.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_base.shape)} vs {tuple(logits_adapted.shape)}")
    log_p = F.log_softmax(logits_base.float(), dim=-1)  # (..., V)
    log_q = F.log_softmax(logits_adapted.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...)
    if mask is None:
        return float(kl.mean())
    m = mask.to(kl.device).bool()
    if m.shape != kl.shape:
        raise ValueError(f"mask shape {tuple(m.shape)} does not match positions {tuple(kl.shape)}")
    if not bool(m.any()):
        raise ValueError("next_token_kl: mask selects no positions")
    return float(kl[m].mean())


__all__ = [
    "encode_prompt",
    "generate_texts",
    "greedy_generate_ids",
    "next_token_kl",
    "perplexity",
    "stop_token_ids",
]
