"""Helpers of the adaptive-cache tests: a router that routes by layer depth, a left-padded batch, a prefill."""

import torch
from artifact_helpers import make_artifact
from model_helpers import random_ids

from polykv_learn import adapter
from polykv_learn.deploy.artifact import read_artifact, write_artifact
from polykv_learn.deploy.polykv import PolyKV

PAD = 2
LENGTHS = (150, 90, 55)


def depth_router(directory, model, policies, scale):
    """A linear router on the relative depth x = scale * l / 3: logit_k = k x - k^2 / 2, so layer l gets policy
    round(x) (margins of at least 1/6 for the scales used: no near tie)."""
    path = make_artifact(directory, model, policies=policies)
    config, tensors = read_artifact(path)
    depth = torch.zeros(len(config["feature_names"]))
    depth[config["feature_names"].index("depth")] = scale
    k = torch.arange(len(policies), dtype=torch.float32)
    tensors = {key: v for key, v in tensors.items() if not key.startswith("router.")}
    tensors["router.net.0.weight"], tensors["router.net.0.bias"] = k[:, None] * depth[None, :], -(k**2) / 2
    config = {key: v for key, v in config.items() if key != "format"}
    config["router"] = {**config["router"], "num_hidden_layers": 0}
    return PolyKV.from_pretrained(write_artifact(path, config, tensors))


def left_padded(lengths=LENGTHS, seed=3):
    n = max(lengths)
    ids = torch.full((len(lengths), n), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), n, dtype=torch.long)
    for i, m in enumerate(lengths):
        ids[i, n - m :] = random_ids(m, seed=seed + m)[0]
        mask[i, n - m :] = 1
    return ids, mask


def prefill(model, cache, ids, mask):
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # what generate gives a left-padded batch
    with torch.no_grad():
        adapter.forward(model, ids, cache, attention_mask=mask, position_ids=positions, logits_to_keep=1)
