"""Layer dropout: per-layer rates against hand-computed values, and which samples skip which layers."""
import math

import pytest
import torch

from layerskip_ext.config import ModelConfig
from layerskip_ext.reference import ReferenceLlama
from layerskip_ext.sampling import uniform_from_counter
from layerskip_ext.training.layer_dropout import LayerDropout, layer_dropout_rates, time_factor
from layerskip_ext.training.model import residual_states

# L = 5 layers: x = l / 4 = 0, .25, .5, .75, 1
X = [0.0, 0.25, 0.5, 0.75, 1.0]


def _sig(v):
    return 1 / (1 + math.exp(-10 * (v - 0.5)))


@pytest.mark.parametrize("schedule,expected", [
    ("uniform", [1, 1, 1, 1, 1]),
    ("linear", X),
    ("exp", [0.0, 2 ** 0.25 - 1, 2 ** 0.5 - 1, 2 ** 0.75 - 1, 1.0]),
    ("log", [0.0, math.log2(1.25), math.log2(1.5), math.log2(1.75), 1.0]),
    ("sine", [0.0, math.sin(math.pi / 8), math.sin(math.pi / 4), math.sin(3 * math.pi / 8), 1.0]),
    ("sigmoid", [(_sig(x) - _sig(0)) / (_sig(1) - _sig(0)) for x in X]),
    ("step", [0, 0, 1, 1, 1]),
])
def test_rates_by_schedule(schedule, expected):
    rates = layer_dropout_rates(5, 0.2, schedule)
    assert rates == pytest.approx([0.2 * e for e in expected], abs=1e-12)
    assert all(a <= b + 1e-12 for a, b in zip(rates, rates[1:])), "rates must grow with depth"


def test_rates_only_on_chosen_layers():
    assert layer_dropout_rates(5, 0.4, "linear", layers=[1, 4]) == pytest.approx([0, 0.1, 0, 0, 0.4])
    assert layer_dropout_rates(1, 0.3, "exp") == [0.3]


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule"):
        layer_dropout_rates(4, 0.1, "cubic")
    with pytest.raises(ValueError, match="p_max"):
        layer_dropout_rates(4, 1.5)
    with pytest.raises(ValueError, match="out of range"):
        layer_dropout_rates(4, 0.1, layers=[4])


def test_skip_mask_hand_computed():
    ld = LayerDropout(3, 0.5, "linear", seed=7)  # rates 0, .25, .5
    step, B = 4, 6
    mask = ld.skip_mask(step, B)
    for l, p in enumerate([0.0, 0.25, 0.5]):
        for b in range(B):
            u = uniform_from_counter(7, (step * 3 + l) * B + b)
            assert bool(mask[l, b]) == (u < p and p > 0)
    assert not mask[0].any()


def test_skip_mask_ranks_split_the_global_batch():
    ld = LayerDropout(4, 0.9, "uniform", seed=1)
    full = ld.skip_mask(3, 8)  # one process, global batch 8
    halves = [ld.skip_mask(3, 4, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(halves, dim=1), full)
    assert full.any() and not full.all()  # p = 0.9 over 32 draws: both outcomes occur for this seed
    assert not torch.equal(ld.skip_mask(3, 8), ld.skip_mask(4, 8)), "each step draws anew"


@pytest.mark.parametrize("time_schedule,expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", X),
    ("exp", [0.0, 2 ** 0.25 - 1, 2 ** 0.5 - 1, 2 ** 0.75 - 1, 1.0]),
])
def test_time_curriculum_scales_the_rates(time_schedule, expected):
    T = 40  # steps 0, 10, 20, 30, 40 are t / T = X
    ld = LayerDropout(3, 0.4, "linear", time_schedule=time_schedule, total_steps=T)  # depth rates 0, .2, .4
    for step, c in zip([0, 10, 20, 30, 40], expected):
        assert ld.rates_at(step) == pytest.approx([0.0, 0.2 * c, 0.4 * c], abs=1e-12)
        assert time_factor(time_schedule, step, T) == pytest.approx(c, abs=1e-12)
    assert ld.rates == pytest.approx([0.0, 0.2, 0.4]), "rates keeps the depth schedule at full strength"


def test_time_curriculum_changes_which_samples_skip():
    ld = LayerDropout(2, 0.8, "uniform", seed=3, time_schedule="linear", total_steps=100)
    assert not ld.skip_mask(0, 64).any(), "rate 0 at the first step"
    step, B = 50, 64  # rate 0.8 * 0.5 = 0.4
    mask = ld.skip_mask(step, B)
    for l in range(2):
        for b in range(B):
            assert bool(mask[l, b]) == (uniform_from_counter(3, (step * 2 + l) * B + b) < 0.4)


def test_micro_batches_draw_anew_with_the_step_rate():
    ld = LayerDropout(2, 0.5, "uniform", seed=5, time_schedule="linear", total_steps=10)
    step, B, accum = 6, 4, 3  # rate 0.3, draw index step * accum + micro
    for micro in range(accum):
        mask = ld.skip_mask(step, B, micro=micro, grad_accum=accum)
        for l in range(2):
            for b in range(B):
                u = uniform_from_counter(5, ((step * accum + micro) * 2 + l) * B + b)
                assert bool(mask[l, b]) == (u < 0.5 * 0.6)


def test_bad_time_schedule():
    with pytest.raises(ValueError, match="time schedule"):
        LayerDropout(4, 0.1, time_schedule="cosine", total_steps=10)
    with pytest.raises(ValueError, match="total_steps"):
        LayerDropout(4, 0.1, time_schedule="exp", total_steps=0)


def test_skipped_samples_bypass_the_layer_and_others_are_unchanged():
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, intermediate_size=64,
                      vocab_size=50, max_position_embeddings=32)
    lm = ReferenceLlama(cfg).eval()
    ids = torch.randint(0, 50, (3, 10))
    skip = torch.tensor([[False, False, False], [True, False, True], [False, False, True]])  # [L, B]
    got = residual_states(lm, ids, skip=skip)[2]  # [B, T, H]
    plain = residual_states(lm, ids)[2]
    torch.testing.assert_close(got[1], plain[1])  # sample 1 skips nothing
    cos, sin = lm.rope(0, 10, "cpu")
    x0 = lm.model.embed_tokens(ids[0:1])
    x0 = lm.model.layers[0](x0, cos, sin)
    x0 = lm.model.layers[2](x0, cos, sin)  # sample 0 skips layer 1
    torch.testing.assert_close(got[0:1], x0)
    x2 = lm.model.layers[0](lm.model.embed_tokens(ids[2:3]), cos, sin)  # sample 2 skips layers 1 and 2
    torch.testing.assert_close(got[2:3], x2)
