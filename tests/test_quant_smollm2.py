"""SmolLM2-135M-Instruct as shipped (Q4_1 blocks, Q8_0 embedding / tied head) computed on its packed blocks,
against the reference on the same weights dequantized (gguf's values, fp32): logits, greedy tokens of the
engine, perplexity on held-out text, and lossless self-speculative decoding on the packed weights. The
activations are rounded in two levels (int8x2, the default); llama.cpp's one int8 level is measured too."""
import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext import ops
from layerskip_ext.quant import packed_module

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "Write a short story about a robot who learns to paint.",
           "def fibonacci(n):", "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n"
           "<|im_start|>assistant\n"]
# held-out text: this repository's README (not SmolLM2's training data), first 256 tokens
README = os.path.join(os.path.dirname(__file__), "..", "README.md")


@pytest.fixture(scope="module")
def packed_reference(smollm2_packed):
    return packed_module(smollm2_packed)


@pytest.fixture
def activations():
    """Restores the default activation rounding after a test that changes it."""
    yield ops.set_quant_activations
    ops.set_quant_activations("int8x2")


def test_logits_close_to_dequantized_reference(smollm2, packed_reference):
    for prompt in PROMPTS[:2]:
        ids = torch.tensor([smollm2.encode(prompt)])
        with torch.no_grad():
            ref = smollm2.module(ids)[0]  # [T, V]
            got = packed_reference(ids)[0]
        rel = ((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
        print(f"{prompt[:24]!r}: max relative logit error (per position, max-norm) {rel:.5f}")
        assert rel < 0.01  # int8x2 measured ~3e-4; one int8 level gives 0.05-0.10, a wrong block layout O(1)
        assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_perplexity_within_one_percent(smollm2, packed_reference, activations):
    with open(README, encoding="utf-8") as f:
        ids = torch.tensor([smollm2.encode(f.read())[:256]])
    with torch.no_grad():
        nll = [torch.nn.functional.cross_entropy(smollm2.module(ids)[0, :-1], ids[0, 1:]).item()]
        for mode in ("int8x2", "int8"):
            activations(mode)
            nll.append(torch.nn.functional.cross_entropy(packed_reference(ids)[0, :-1], ids[0, 1:]).item())
    ppl_ref, ppl_packed, ppl_int8 = (torch.tensor(nll).exp()).tolist()
    print(f"perplexity: dequantized reference {ppl_ref:.3f}, packed int8x2 {ppl_packed:.3f} "
          f"({ppl_packed / ppl_ref - 1:+.3%}), packed int8 {ppl_int8:.3f} ({ppl_int8 / ppl_ref - 1:+.3%})")
    assert abs(ppl_packed / ppl_ref - 1) < 0.01


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
def test_engine_greedy_tokens_agree(smollm2, smollm2_packed, packed_reference):
    """Greedy decoding, 64 tokens, the packed engine vs the fp32 engine on the dequantized weights (== the
    reference, test_engine.py): free-running, at least 60 of the 64 tokens equal, for each prompt; and
    teacher-forced on the reference's continuation, the packed reference's argmax agrees at >= 60."""
    for prompt in PROMPTS:
        ref = layerskip_ext.generate(smollm2, prompt, max_new_tokens=64, stop_token_ids=[]).tokens
        got = layerskip_ext.generate(smollm2_packed, prompt, max_new_tokens=64, stop_token_ids=[]).tokens
        same = sum(a == b for a, b in zip(ref, got))
        ids = smollm2.encode(prompt)
        with torch.no_grad():
            logits = packed_reference(torch.tensor([ids + ref]))[0, len(ids) - 1:-1]  # [64, V]
        forced = int((logits.argmax(-1) == torch.tensor(ref)).sum())
        print(f"{prompt[:24]!r}: free-running {same}/64 equal; teacher-forced {forced}/64")
        assert same >= 60 and forced >= 60, prompt


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
@pytest.mark.parametrize("exit_layer,d", [(8, 4), (15, 2)])
def test_self_speculative_lossless_on_packed(smollm2_packed, exit_layer, d):
    prompt = PROMPTS[0]
    auto = layerskip_ext.generate(smollm2_packed, prompt, max_new_tokens=32, stop_token_ids=[])
    spec = layerskip_ext.generate(smollm2_packed, prompt, max_new_tokens=32, stop_token_ids=[],
                                  strategy="self_speculative", exit_layer=exit_layer, num_speculations=d)
    assert spec.tokens == auto.tokens


@pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")
def test_draft_vocab_head_rows_of_interleaved_head(smollm2_packed):
    """A draft vocabulary that is the whole vocabulary permuted: the engine gathers the LM head's rows (kept
    interleaved by 16) in that order, so the drafts, and with them the accepted counts, equal the full head's."""
    prompt = PROMPTS[1]
    kwargs = dict(max_new_tokens=32, stop_token_ids=[], strategy="self_speculative", exit_layer=26,
                  num_speculations=3)  # a late exit: this model was not trained to exit early
    full = layerskip_ext.generate(smollm2_packed, prompt, **kwargs)
    saved = smollm2_packed.draft_vocab
    try:
        vocab = smollm2_packed.config.vocab_size
        smollm2_packed.draft_vocab = torch.randperm(vocab, generator=torch.Generator().manual_seed(0)).tolist()
        permuted = layerskip_ext.generate(smollm2_packed, prompt, draft_vocab_size=vocab, **kwargs)
    finally:
        smollm2_packed.draft_vocab = saved
    assert permuted.tokens == full.tokens
    assert (permuted.stats.drafted, permuted.stats.accepted) == (full.stats.drafted, full.stats.accepted)
    assert full.stats.accepted > 0
