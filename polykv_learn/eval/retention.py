"""Needle retention: the share of the gold answer's context tokens that a method's plan keeps (issue #19).

A sample *has a needle* when its first gold answer occurs verbatim in its context (pass keys, key-value needles;
rarely a code-completion line). The needle's tokens are the context tokens whose character span (the tokenizer's
offset mapping of the very token ids the evaluation prefills) overlaps any occurrence of the answer; their
positions in the compressed prompt follow the evaluation's layout (header, context, then in the query-aware
protocol the question) and its ``max_context`` middle cut, which may remove some of them. A sample whose answer
does not occur, or whose occurrences were all cut, has no needle: its records hold ``needle_tokens = 0`` and no
retention, and the summaries count it as excluded.

Retention of a plan at layer ``l`` is the mean over the layer's KV heads of the share of needle positions in the
head's keep set (head-wise plans: each head its own set), exactly the positions the deployed cache keeps
(:meth:`~polykv_learn.cache.CompressedLayer.evict`: the first ``b_h`` of the policy's keep order, a sliding
layer at most its window); a plan's retention is the mean over layers. The full cache retains 1. This reproduces
the diagnostic of issue #19 (share of answer tokens kept per layer and KV head, as in KVzip arXiv:2505.23416's
needle analysis) for every evaluated method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from polykv_learn.data.layout import prompt_layout
from polykv_learn.layout import row_keep_positions
from polykv_learn.plan import Plan
from polykv_learn.policies import LayerStats, get_policy, order_positions
from polykv_learn.rows import row_stats
from polykv_learn.text import lead_before

__all__ = ["kept_positions", "needle_positions", "plan_retention"]


def _occurrences(text: str, needle: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the non-overlapping occurrences of ``needle`` in ``text``."""
    spans, at = [], text.find(needle) if needle else -1
    while at >= 0:
        spans.append((at, at + len(needle)))
        at = text.find(needle, at + len(needle))
    return spans


def needle_positions(
    tokenizer: PreTrainedTokenizerBase, sample: dict[str, Any], chat: bool, max_context: int | None
) -> list[int]:
    """Positions in the compressed prompt of the tokens of the first gold answer's occurrences in the context
    (ascending; empty when it does not occur or the ``max_context`` cut removed every one). ``chat``: the prompt
    goes through the tokenizer's chat template (the header before the context is then non-empty)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("needle retention needs a fast tokenizer (offset mappings); this one is not")
    render = None
    if chat:

        def render(user: str) -> str:
            messages = [{"role": "user", "content": user}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    layout = prompt_layout(sample, render)
    spans = _occurrences(layout.context, str(sample["answers"][0]).strip())
    if not spans:
        return []
    enc = tokenizer(layout.context, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]  # (c, 2) character span of each context token
    hit = [any(s < e_ans and e > s_ans for s_ans, e_ans in spans) for s, e in offsets]
    head_ids = tokenizer(layout.header, add_special_tokens=False).input_ids if layout.header else []
    head = len(lead_before(tokenizer, head_ids or enc["input_ids"])) + len(head_ids)  # as evaluator.prompt_pieces
    c = len(offsets)
    if max_context is None or c <= max_context:  # the evaluation's cut (text.cut_middle): first and last halves
        kept = list(range(c))
    else:
        first = max_context // 2
        kept = list(range(first)) + list(range(c - (max_context - first), c))
    return [head + i for i, j in enumerate(kept) if hit[j]]


def kept_positions(plan: Plan, stats: Sequence[LayerStats]) -> list[list[Tensor]]:
    """Per layer and KV head, the context positions ``plan`` keeps for batch row 0 of ``stats`` (ascending long
    tensors): what :meth:`~polykv_learn.cache.CompressedLayer.evict` keeps with the same statistics."""
    plan.check_num_layers(len(stats))
    out = []
    for i, layer in enumerate(stats):
        rs = row_stats(layer, 0)
        heads = plan.layer_head_budgets(i, rs.num_kv_heads)

        def order(i=i, rs=rs) -> Tensor:  # (G, n)
            return order_positions(get_policy(plan.policies[i]), rs)[0]

        out.append(row_keep_positions(heads, rs.context_length, rs.sliding_window, order, rs.keys.device)[0])
    return out


def plan_retention(plan: Plan | None, stats: Sequence[LayerStats], needle: Sequence[int]) -> list[float]:
    """Per layer, the mean over KV heads of the share of ``needle`` positions that ``plan`` keeps (``None``: the
    full cache, 1 everywhere). ``needle`` must be non-empty."""
    if not needle:
        raise ValueError("needle retention needs at least one needle position")
    if plan is None:
        return [1.0] * len(stats)
    target = torch.tensor(sorted(set(needle)), dtype=torch.long)
    per_layer = []
    for keeps in kept_positions(plan, stats):
        shares = [float(torch.isin(target, keep.cpu()).double().mean()) for keep in keeps]
        per_layer.append(sum(shares) / len(shares))
    return per_layer
