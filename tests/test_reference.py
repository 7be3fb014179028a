"""The reference model against transformers LlamaForCausalLM: logits of every exit layer, greedy tokens."""
import pytest
import torch

import layerskip_ext


def hf_exit_logits(hf, input_ids):
    """Logits of every exit 1..L from transformers: each decoder layer's output through its norm and head."""
    outputs = []
    hooks = [layer.register_forward_hook(lambda mod, inp, out: outputs.append(out[0] if isinstance(out, tuple) else out))
             for layer in hf.model.layers]
    try:
        final = hf(input_ids).logits
    finally:
        for h in hooks:
            h.remove()
    return [hf.lm_head(hf.model.norm(h)) for h in outputs], final


def load_hf(directory):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


@torch.no_grad()
def test_every_exit_matches_transformers_random_configs(random_checkpoint):
    name, directory = random_checkpoint
    hf = load_hf(directory)
    ours = layerskip_ext.load(directory)
    L = ours.num_layers
    ids = torch.randint(0, ours.config.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    expected, final = hf_exit_logits(hf, ids)
    assert len(expected) == L
    states = ours.module.hidden_states(ids)
    for exit_layer in range(1, L + 1):
        got = ours.module.exit_logits(states[exit_layer])
        torch.testing.assert_close(got, expected[exit_layer - 1], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{name}: exit {exit_layer}: {m}")
        torch.testing.assert_close(ours.module(ids, exit_layer=exit_layer), got, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.module(ids), final, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cached_decoding_matches_full_forward(random_checkpoint):
    """Prefill + one token at a time through the KV cache == one causal forward over the sequence."""
    from layerskip_ext.reference import KVCache

    _, directory = random_checkpoint
    model = layerskip_ext.load(directory).module
    ids = torch.randint(0, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(2))
    full = model(ids)  # [1, 20, V]
    cache = KVCache(model.config, 1, 32, torch.float32)
    x = model.run_layers(model.embed(ids[:, :12]), 0, model.num_layers, 0, cache)
    steps = [model.exit_logits(x)]
    for pos in range(12, 20, 3):  # blocks of 3, 3 and 2 tokens
        block = ids[:, pos:pos + 3]
        steps.append(model.exit_logits(model.run_layers(model.embed(block), 0, model.num_layers, pos, cache)))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@torch.no_grad()
def test_every_exit_matches_transformers_smollm2(smollm2, smollm2_hf):
    ids = torch.tensor([smollm2.encode("The LayerSkip paper shows that early layers of a language model can")])
    expected, final = hf_exit_logits(smollm2_hf, ids)
    states = smollm2.module.hidden_states(ids)
    for exit_layer in (1, 2, 5, 10, 15, 20, 29, 30):
        torch.testing.assert_close(smollm2.module.exit_logits(states[exit_layer]), expected[exit_layer - 1],
                                   rtol=1e-3, atol=1e-3, msg=lambda m: f"exit {exit_layer}: {m}")
    torch.testing.assert_close(smollm2.module.exit_logits(states[-1]), final, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_greedy_tokens_match_transformers_generate_smollm2(smollm2, smollm2_hf):
    prompt = "<|im_start|>user\nWrite a short story about a robot who learns to paint.<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.encode(prompt)
    with torch.no_grad():
        hf_out = smollm2_hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = hf_out[0, len(ids):].tolist()
    result = layerskip_ext.generate(smollm2, ids, max_new_tokens=64, stop_token_ids=[], backend="reference")
    assert len(expected) == 64
    assert result.tokens == expected
