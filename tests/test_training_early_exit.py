"""Early-exit loss: scales, curricula and the combined loss against hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from layerskip_ext.config import ModelConfig
from layerskip_ext.reference import ReferenceLlama
from layerskip_ext.training.curriculum import EarlyExitCurriculum
from layerskip_ext.training.early_exit_loss import early_exit_loss, loss_scales
from layerskip_ext.training.model import LayerSkipLM


def _norm(v):
    return [x / sum(v) for x in v]


@pytest.mark.parametrize("scale,raw", [
    ("uniform", [1, 1, 1]),
    ("l", [1, 2, 4]),
    ("sum_l", [1, 3, 10]),
    ("sqrt_l", [1, math.sqrt(2), 2]),
    ("inv_l", [1, 1 / 2, 1 / 4]),
    ("inv_sqrt_l", [1, 1 / math.sqrt(2), 1 / 2]),
])
def test_scales(scale, raw):
    # L = 4, exits after layers 0, 1, 3 (depths 1, 2, 4)
    assert loss_scales([0, 1, 3], 4, scale) == pytest.approx(_norm(raw))
    # e_scale multiplies the early exits only
    assert loss_scales([0, 1, 3], 4, scale, e_scale=0.5) == pytest.approx(_norm([raw[0] / 2, raw[1] / 2, raw[2]]))


def test_scale_errors():
    with pytest.raises(ValueError, match="scale"):
        loss_scales([0], 2, "square")
    with pytest.raises(ValueError, match="out of range"):
        loss_scales([2], 2)
    with pytest.raises(ValueError, match="sum to 0"):
        loss_scales([0], 2, e_scale=0.0)


def test_curricula():
    none = EarlyExitCurriculum("none", [0, 1, 2, 3, 4], 6)
    assert none.enabled(0) == none.enabled(17) == [0, 1, 2, 3, 4, 5]
    rot = EarlyExitCurriculum("rotational", [0, 1, 2, 3, 4], 6, period=2)
    assert [rot.enabled(t) for t in range(3)] == [[0, 2, 4, 5], [1, 3, 5], [0, 2, 4, 5]]
    rot3 = EarlyExitCurriculum("rotational", [1, 3, 5], 6, period=3)  # 5 is the last layer: always on; 2 early
    assert [rot3.enabled(t) for t in range(4)] == [[1, 5], [3, 5], [5], [1, 5]]
    # gradual: k = 3 early exits over 8 steps: floor(t * 4 / 8) deepest exits enabled
    grad = EarlyExitCurriculum("gradual", [0, 2, 4], 6, total_steps=8)
    assert [grad.enabled(t) for t in range(9)] == [
        [5], [5], [4, 5], [4, 5], [2, 4, 5], [2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5]]
    # span 0.5: the same stages in half the run (one more exit every 0.5 * 8 / 4 = 1 step), then all on
    half = EarlyExitCurriculum("gradual", [0, 2, 4], 6, total_steps=8, gradual_span=0.5)
    assert [half.enabled(t) for t in range(9)] == [
        [5], [4, 5], [2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5], [0, 2, 4, 5]]
    # span 0.75 over 10 steps with 2 early exits: floor(t * 3 / 7.5): on at t = 3 (1 exit) and t = 5 (both)
    odd = EarlyExitCurriculum("gradual", [1, 3], 5, total_steps=10, gradual_span=0.75)
    assert [len(odd.enabled(t)) - 1 for t in range(10)] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    with pytest.raises(ValueError, match="curriculum"):
        EarlyExitCurriculum("random", [0], 2)
    with pytest.raises(ValueError, match="gradual_span"):
        EarlyExitCurriculum("gradual", [0], 2, total_steps=4, gradual_span=0.0)


def test_loss_hand_computed():
    torch.manual_seed(0)
    H, V = 4, 5
    norm = torch.nn.Identity()
    head = torch.nn.Linear(H, V, bias=False)
    hidden = {0: torch.randn(2, 3, H), 2: torch.randn(2, 3, H)}
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    loss, per_exit = early_exit_loss(hidden, norm, head, labels, num_layers=3, scale_type="l", e_scale=1.0)
    expected_ce = {}
    for l, h in hidden.items():
        logp = torch.log_softmax(h @ head.weight.T, dim=-1)  # [2, 3, V]
        terms = [-logp[b, t, labels[b, t]] for b in range(2) for t in range(3) if labels[b, t] != -100]
        expected_ce[l] = sum(terms) / len(terms)
    for l in hidden:
        torch.testing.assert_close(per_exit[l], expected_ce[l].detach())
    torch.testing.assert_close(loss, (1 / 4) * expected_ce[0] + (3 / 4) * expected_ce[2])  # scales 1 : 3


def _tiny(tied=True):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                      vocab_size=40, tie_word_embeddings=tied, max_position_embeddings=32)
    return ReferenceLlama(cfg)


def test_only_enabled_exits_are_unembedded():
    lm = _tiny()
    calls = []
    lm.lm_head.register_forward_hook(lambda m, i, o: calls.append(tuple(o.shape)))
    ids, labels = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    LayerSkipLM(lm)(ids, labels, exits=[1, 3])
    assert len(calls) == 2
    calls.clear()
    LayerSkipLM(lm)(ids, labels, exits=[3])
    assert len(calls) == 1


def test_wrapper_matches_full_model_logits_and_recompute_matches():
    lm = _tiny(tied=False)
    ids, labels = torch.randint(0, 40, (2, 8)), torch.randint(0, 40, (2, 8))
    loss, per_exit = LayerSkipLM(lm, scale_type="uniform")(ids, labels, exits=[0, 2, 3])
    want = [F.cross_entropy(lm(ids, exit_layer=e).flatten(0, 1), labels.flatten()) for e in (1, 3, 4)]
    torch.testing.assert_close(loss, sum(want) / 3)
    grads = torch.autograd.grad(loss, list(lm.parameters()))
    loss2, _ = LayerSkipLM(lm, scale_type="uniform", recompute=True)(ids, labels, exits=[0, 2, 3])
    grads2 = torch.autograd.grad(loss2, list(lm.parameters()))
    torch.testing.assert_close(loss2, loss)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g2, g)
