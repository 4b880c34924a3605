"""Greedy decoding through ``generate`` and on the simulator, shared by the deployment tests (the deployed cache must
generate exactly the tokens the simulator predicts)."""

import torch
from model_helpers import left_pad

from polykv_learn.deploy import compress
from polykv_learn.policies import get_policy
from polykv_learn.simulator import Simulator

NEW_TOKENS = 32
PAD = 2  # pad = eos of SmolLM2 and of the tiny models


def greedy_generate(model, ids, new_tokens=NEW_TOKENS, **kwargs):
    """Greedy ``generate`` of one prompt (1, n) -> list of new tokens (shorter only if it stopped at EOS)."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD, **kwargs
    )
    return out[0, ids.shape[1] :].tolist()


def simulator_greedy(model, ids, plan, new_tokens=NEW_TOKENS, capture=None):
    """Greedy decoding on the simulator's masked forward: one prefill, then the growing probe under ``plan``;
    ``capture``: the simulator's capture options (a PolyKV artifact's ``polykv.capture``; None: the defaults)."""
    sim = Simulator(model, capture)
    used = [get_policy(p) for p in plan.policies]
    capture = sim.capture(
        ids,
        accumulate=any(p.needs_accumulated_attn for p in used),
        reconstruct=any(p.needs_reconstruct_attn for p in used),
    )
    biases = sim.hard_biases(capture, [plan])
    tokens = [int(capture.last_logits.argmax())]
    with torch.no_grad():
        while len(tokens) < new_tokens:
            logits = sim.probe_logits(capture, torch.tensor([tokens]), biases)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens


def assert_same_greedy(generated, expected, eos=PAD):
    """``generate`` stops at EOS; the simulator does not: compare up to the end of ``generated``."""
    assert generated == expected[: len(generated)], (generated, expected)
    assert len(generated) == len(expected) or generated[-1] == eos


def assert_batch_equals_singles(model, prompts, new_tokens, **how):
    """Greedy ``generate`` of a left-padded batch under ``compress(model, **how)`` equals each prompt alone."""
    with compress(model, **how):
        singles = [greedy_generate(model, p, new_tokens=new_tokens) for p in prompts]
        ids, mask = left_pad(prompts)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=PAD)
    for i, single in enumerate(singles):
        row = out[i, ids.shape[1] :].tolist()
        assert row[: len(single)] == single, f"sequence {i}: batch {row} vs alone {single}"
        assert all(t == PAD for t in row[len(single) :])
