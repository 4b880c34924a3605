"""The simulator-driven plan search (polykv_learn.search): exact totals and bounds for every move, never worse
than its start, the known optimum on constructed cases, and determinism."""

import random

import pytest
import torch
from model_helpers import random_ids
from transformers import AutoModelForCausalLM

from polykv_learn.capture import CaptureOptions
from polykv_learn.models import TINY_CONFIGS, load_model
from polykv_learn.plan import Plan
from polykv_learn.policies import policy_names
from polykv_learn.search import neighbours, search_plan, spread
from polykv_learn.simulator import Simulator, kl_to_full

POOL = policy_names(routable_only=True)


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama's simulator and one captured context (n = 160) with a 14-token probe."""
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    sim = Simulator(model, CaptureOptions(window=16, future=16, accumulate=True, reconstruct=True))
    return sim, sim.capture(random_ids(160, seed=11)), random_ids(14, seed=12)


def two_layer_model(dead_layer: int | None = None):
    """tiny-llama cut to 2 layers; ``dead_layer``'s attention output is zero (its keep set cannot matter)."""
    config = TINY_CONFIGS["tiny-llama"]()
    config.num_hidden_layers = 2
    config.polykv_name = config._name_or_path = "tiny-llama-2"
    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = AutoModelForCausalLM.from_config(config).eval()
    if dead_layer is not None:
        with torch.no_grad():
            model.model.layers[dead_layer].self_attn.o_proj.weight.zero_()
    return model


@torch.no_grad()
def sim_losses(sim, capture, probe, plans, start, loss="nll"):
    """Reference losses, by the simulator's evaluation of each plan on its own."""
    out = []
    for plan in plans:
        logits = sim.probe_logits(capture, probe, sim.hard_biases(capture, [plan]))[0]  # (m, V)
        pred = logits[start - 1 : -1]  # rows predicting tokens start..m-1
        if loss == "kl":
            full_plan = Plan.uniform("streaming", capture.context_length, capture.num_layers)
            full = sim.probe_logits(capture, probe, sim.hard_biases(capture, [full_plan]))[0][start - 1 : -1]
            out.append(float(kl_to_full(full, pred[None])[0]))
        else:
            out.append(float(torch.nn.functional.cross_entropy(pred, probe[0, start:])))
    return out


def test_spread_is_even_and_exact():
    assert spread([5, 5, 5], 7) == [3, 2, 2]
    assert spread([1, 10, 10], 9) == [1, 4, 4]
    assert spread([0, 3, 2], 5) == [0, 3, 2]
    assert spread([4, 4], 0) == [0, 0]
    rng = random.Random(0)
    for _ in range(300):
        caps = [rng.randrange(0, 20) for _ in range(rng.randrange(1, 7))]
        total = rng.randrange(0, sum(caps) + 1)
        out = spread(caps, total)
        assert sum(out) == total and all(0 <= o <= c for o, c in zip(out, caps, strict=True))
        # water-filling: an entry below its room is never more than one unit below any other entry
        assert all(o >= max(out) - 1 for o, c in zip(out, caps, strict=True) if o < c)
    with pytest.raises(ValueError, match="cannot spread 7 units over room 6"):
        spread([3, 3], 7)


@pytest.mark.parametrize("pairwise", [False, True])
def test_every_neighbour_keeps_the_total_and_the_bounds(pairwise):
    rng = random.Random(1)
    for _ in range(40):
        num, budget = rng.randrange(2, 6), rng.choice([8, 16, 24])
        n, b_min = rng.randrange(budget + 1, 4 * budget), rng.choice([1, 4, 30])
        lo = min(b_min, budget)
        # a random feasible plan: uniform, then random pairwise transfers within the bounds
        budgets = [budget] * num
        for _ in range(10):
            i, j = rng.sample(range(num), 2)
            d = rng.randrange(0, min(budgets[i] - lo, n - budgets[j]) + 1)
            budgets[i], budgets[j] = budgets[i] - d, budgets[j] + d
        plan = Plan.from_lists([rng.choice(POOL) for _ in range(num)], budgets)
        moves = neighbours(plan, budget, n, POOL, b_min=b_min, pairwise=pairwise)
        cands = [c for _, c in moves]
        assert len(set(cands)) == len(cands) and plan not in cands
        for move, cand in moves:
            assert cand.total_budget == num * budget, move
            assert min(cand.budgets) >= lo and max(cand.budgets) <= n, move
        # every layer that can grow gets its whole-context move (funded by the others) when the others can pay
        for j in range(num):
            if n - budgets[j] <= sum(b - lo for k, b in enumerate(budgets) if k != j) and budgets[j] < n:
                assert any(c.budgets[j] == n and c.policies == plan.policies for c in cands)
        # every single-layer policy swap is there
        changed = [(c, [k for k in range(num) if c.policies[k] != plan.policies[k]]) for c in cands]
        swaps = {(ks[0], c.policies[ks[0]]) for c, ks in changed if c.budgets == plan.budgets and len(ks) == 1}
        assert swaps == {(k, p) for k in range(num) for p in POOL if p != plan.policies[k] and budgets[k] < n}
        # with pairwise: every transfer of B (cut to the bounds) from one layer to another
        for i in range(num) if pairwise else ():
            for j in range(num):
                d = min(budget, budgets[i] - lo, n - budgets[j])
                if i != j and d > 0:
                    moved = list(budgets)
                    moved[i], moved[j] = moved[i] - d, moved[j] + d
                    assert Plan(plan.policies, tuple(moved)) in cands


def test_neighbours_refuse_an_infeasible_plan():
    with pytest.raises(ValueError, match=r"plan budgets \[10, 10\] must sum to 16 within \[1, 40\]"):
        neighbours(Plan.uniform("snapkv", 10, 2), 8, 40, POOL)


def test_result_never_worse_than_start_and_bounds_hold(tiny):
    sim, capture, probe = tiny
    for loss in ("nll", "kl"):
        result = search_plan(sim, capture, probe, 24, POOL, loss=loss, answer_start=8, b_min=4, max_rounds=3)
        uniform = sim_losses(sim, capture, probe, [Plan.uniform(p, 24, 4) for p in POOL], 8, loss)
        assert result.start_loss == pytest.approx(min(uniform), abs=1e-5)
        assert result.start_plan == Plan.uniform(POOL[uniform.index(min(uniform))], 24, 4)
        assert result.loss <= result.start_loss
        assert [s.loss for s in result.history] == sorted((s.loss for s in result.history), reverse=True)
        assert result.history and result.history[-1].plan == result.plan  # a random model: some move helps
        for plan in [result.plan, *(s.plan for s in result.history)]:
            assert plan.total_budget == 4 * 24 and min(plan.budgets) >= 4 and max(plan.budgets) <= 160
        # the loss it reports is the plan's loss evaluated on its own
        assert result.loss == pytest.approx(sim_losses(sim, capture, probe, [result.plan], 8, loss)[0], abs=1e-5)


def test_at_least_as_good_as_every_uniform_and_single_whole_context_plan(tiny):
    sim, capture, probe = tiny
    result = search_plan(sim, capture, probe, 64, POOL, loss="nll", answer_start=8, max_rounds=2)
    base = result.start_plan.policies[0]
    rivals = [Plan.uniform(p, 64, 4) for p in POOL]
    for j in range(4):  # layer j keeps all 160 positions, the other three share the rest evenly (32 each)
        rivals.append(Plan((base,) * 4, tuple(160 if k == j else 32 for k in range(4))))
    assert all(r.total_budget == 256 for r in rivals)
    assert result.loss <= min(sim_losses(sim, capture, probe, rivals, 8)) + 1e-5


def test_a_given_start_plan_is_a_candidate_and_is_checked(tiny):
    """An extra start (e.g. the learned plan) that beats every uniform plan becomes the start; a bad one is refused."""
    sim, capture, probe = tiny
    uniform = search_plan(sim, capture, probe, 24, POOL, answer_start=8, max_rounds=0)
    better = search_plan(sim, capture, probe, 24, POOL, answer_start=8, max_rounds=2).plan
    assert sim_losses(sim, capture, probe, [better], 8)[0] < uniform.loss
    started = search_plan(sim, capture, probe, 24, POOL, answer_start=8, max_rounds=0, starts=[better])
    assert started.start_plan == better and started.plan == better
    assert started.loss == pytest.approx(sim_losses(sim, capture, probe, [better], 8)[0], abs=1e-5)
    worse = Plan(("streaming",) * 4, (90, 2, 2, 2))
    assert search_plan(sim, capture, probe, 24, POOL, answer_start=8, max_rounds=0, starts=[worse]).plan != worse
    with pytest.raises(ValueError, match="a start plan must have 4 layers, total 96"):
        search_plan(sim, capture, probe, 24, POOL, answer_start=8, starts=[Plan.uniform("snapkv", 20, 4)])


def test_finds_the_whole_context_optimum_of_a_constructed_model():
    """Two layers; layer 0's attention output is zero, so only layer 1's keep set matters and KL is 0 exactly
    when layer 1 keeps its whole context. Brute force over every budget split agrees."""
    model = two_layer_model(dead_layer=0)
    sim = Simulator(model, CaptureOptions(window=8, future=8))
    capture, probe = sim.capture(random_ids(48, seed=5)), random_ids(10, seed=6)
    budget, n = 32, 48
    splits = [Plan.from_lists(["snapkv", "snapkv"], [2 * budget - b1, b1]) for b1 in range(2 * budget - n, n + 1)]
    brute = sim_losses(sim, capture, probe, splits, 1, "kl")
    assert min(brute) <= 1e-6 and brute[-1] == min(brute)  # the optimum: layer 1 at n
    assert min(brute[:-1]) > 1e-4  # and only there
    result = search_plan(sim, capture, probe, budget, ["snapkv", "streaming"], loss="kl", answer_start=1)
    assert result.plan.budgets == (2 * budget - n, n)
    assert result.loss <= min(brute) + 1e-6 and result.start_loss > 1e-4
    assert result.history[0].move == "layer 1 +16 (whole context) from the others"


def test_brute_force_bounds_the_search_on_two_layers():
    """On a 2-layer model every plan of one policy pair is enumerable: the search's loss is that of its plan
    and no lower than the best of all splits and policy pairs."""
    model = two_layer_model()
    sim = Simulator(model, CaptureOptions(window=8, future=8))
    capture, probe = sim.capture(random_ids(40, seed=7)), random_ids(9, seed=8)
    pool = ["snapkv", "streaming"]
    plans = [Plan.from_lists([p, q], [48 - b1, b1]) for p in pool for q in pool for b1 in range(8, 41)]
    brute = dict(zip(plans, sim_losses(sim, capture, probe, plans, 4), strict=True))
    result = search_plan(sim, capture, probe, 24, pool, answer_start=4)
    assert result.plan in brute and result.loss == pytest.approx(brute[result.plan], abs=1e-5)
    assert min(brute.values()) - 1e-5 <= result.loss <= result.start_loss


def test_a_pool_policy_without_its_statistics_is_refused():
    model, _ = load_model("tiny-llama", with_tokenizer=False)
    sim = Simulator(model, CaptureOptions(window=8, future=8))
    capture, probe = sim.capture(random_ids(40, seed=9)), random_ids(5, seed=10)
    with pytest.raises(ValueError, match="^policy 'kvzip' needs the reconstruction attention; capture with recon"):
        search_plan(sim, capture, probe, 16, ["snapkv", "kvzip"])
    with pytest.raises(ValueError, match="^policy 'h2o' needs the prefill's accumulated attention"):
        search_plan(sim, capture, probe, 16, ["h2o", "snapkv"])


def test_deterministic(tiny):
    sim, capture, probe = tiny
    runs = [search_plan(sim, capture, probe, 24, POOL, answer_start=8, max_rounds=2) for _ in range(2)]
    assert runs[0] == runs[1]


def test_nothing_to_evict_returns_the_uniform_plan(tiny):
    sim, capture, probe = tiny
    result = search_plan(sim, capture, probe, 200, POOL, answer_start=8)
    assert result.history == () and result.plan == result.start_plan and result.plan.budgets == (200,) * 4
    assert result.evaluated == len(POOL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss": "mse"}, "loss must be one of nll, kl, got 'mse'"),
        ({"answer_start": 14}, r"answer_start must be an integer in \[0, 13\] \(the probe has 14 tokens\), got 14"),
        ({"max_rounds": -1}, "max_rounds must be an integer >= 0, got -1"),
        ({"plans_per_pass": 0}, "plans_per_pass must be an integer >= 1, got 0"),
        ({"policies": []}, "policies is empty"),
        ({"policies": ["snapkvv"]}, "unknown policy 'snapkvv'"),
    ],
)
def test_bad_arguments_fail_clearly(tiny, kwargs, message):
    sim, capture, probe = tiny
    policies = kwargs.pop("policies", POOL)
    with pytest.raises(ValueError, match=message):
        search_plan(sim, capture, probe, 24, policies, **kwargs)


def test_h2o_needs_the_accumulated_attention(tiny):
    sim, _, probe = tiny
    capture = sim.capture(random_ids(60, seed=1), accumulate=False)
    with pytest.raises(ValueError, match="policy 'h2o' needs the prefill's accumulated attention"):
        search_plan(sim, capture, probe, 24, ["snapkv", "h2o"])
