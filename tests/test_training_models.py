"""The same loss (and gradients) from transformers LlamaForCausalLM and the reference model, same weights and batch."""
import pytest
import torch

from layerskip_ext.config import ModelConfig
from layerskip_ext.training.model import LayerSkipLM, build_hf, model_kind, to_reference

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", [True, False])
def test_hf_and_reference_same_loss_and_grads(tied):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=12, intermediate_size=96,
                      vocab_size=61, tie_word_embeddings=tied, max_position_embeddings=64, rope_theta=500.0)
    hf = build_hf(cfg)
    ref = to_reference(hf)
    assert model_kind(hf) == "hf" and model_kind(ref) == "reference"
    ids, labels = torch.randint(0, 61, (3, 12)), torch.randint(0, 61, (3, 12))
    labels[0, :4] = -100
    skip = torch.tensor([[False, True, False], [True, False, False], [False, False, True]])  # [L, B]
    out = {}
    for name, lm in (("hf", hf), ("ref", ref)):
        loss, per_exit = LayerSkipLM(lm, scale_type="sqrt_l", e_scale=0.7)(ids, labels, [0, 1, 2], skip)
        params = dict(lm.named_parameters())
        grads = torch.autograd.grad(loss, [params[k] for k in sorted(params)])
        out[name] = (loss, per_exit, dict(zip(sorted(params), grads)))
    torch.testing.assert_close(out["hf"][0], out["ref"][0], rtol=1e-5, atol=1e-5)
    for l in range(3):
        torch.testing.assert_close(out["hf"][1][l], out["ref"][1][l], rtol=1e-5, atol=1e-5)
    assert out["hf"][2].keys() == out["ref"][2].keys()
    for k in out["hf"][2]:
        torch.testing.assert_close(out["hf"][2][k], out["ref"][2][k], rtol=1e-4, atol=1e-6)
    # and the last exit is transformers' own loss when nothing is skipped
    loss, per_exit = LayerSkipLM(hf)(ids, labels, [2])
    torch.testing.assert_close(loss, hf(input_ids=ids).logits.flatten(0, 1).log_softmax(-1).gather(
        1, labels.flatten().clamp(min=0)[:, None])[labels.flatten() != -100].mean().neg(), rtol=1e-5, atol=1e-5)


def test_rejects_other_models():
    with pytest.raises(TypeError, match="LlamaForCausalLM"):
        LayerSkipLM(torch.nn.Linear(2, 2))
