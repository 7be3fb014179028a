"""bfloat16 weights in the engine with each `linear` kernel forced in turn: avx512bf16 (input rows rounded to bf16,
vdpbf16ps dot products; the default where the CPU has AVX512_BF16) and the float32-activation kernels. Batched ==
batch 1 and lossless self-speculation on every kernel; and on SmolLM2 (slow) the accuracy of the rounded
activations against the float32-activation path on the same bf16 weights, measured as tests/test_quant_smollm2.py
measures the packed engine against its dequantized reference: max relative logit error, greedy agreement over 64
tokens (free-running and teacher-forced), held-out perplexity."""
import copy
import os

import pytest
import torch

import layerskip_ext
from layerskip_ext import engine as engine_mod
from layerskip_ext import ops
from conftest import make_hf_checkpoint

pytestmark = pytest.mark.skipif(not engine_mod.is_available(), reason="C++ extension not built")

HAS_BF16DOT = "avx512bf16" in ops.linear_kernels()
needs_bf16dot = pytest.mark.skipif(not HAS_BF16DOT, reason="CPU without AVX512_BF16")
# the float32-activation kernel the bf16 dot product is measured against: the best other one
WIDE = next(k for k in ops.linear_kernels() if k != "avx512bf16")
KERNELS = (["avx512bf16"] if HAS_BF16DOT else []) + [WIDE]

PROMPTS = ["The capital of France is", "Write a short story about a robot who learns to paint.",
           "def fibonacci(n):", "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n"
           "<|im_start|>assistant\n"]
README = os.path.join(os.path.dirname(__file__), "..", "README.md")  # held-out text (not SmolLM2's training data)


@pytest.fixture
def kernel():
    """ops.set_linear_kernel, restored to "auto" after the test."""
    yield ops.set_linear_kernel
    ops.set_linear_kernel("auto")


def test_default_kernel_for_bf16_weights():
    """The automatic choice is the bf16 dot product where the CPU has it (the environment variable
    LAYERSKIP_LINEAR_KERNEL=avx512 keeps float32 activations)."""
    if os.environ.get("LAYERSKIP_LINEAR_KERNEL"):
        pytest.skip("LAYERSKIP_LINEAR_KERNEL is set")
    ops.set_linear_kernel("auto")
    assert ops.linear_kernel() == ops.linear_kernels()[0]
    assert ops.linear_rounds_bf16_inputs() == HAS_BF16DOT


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bf16dot")
    return layerskip_ext.load(make_hf_checkpoint(directory, seed=5, num_hidden_layers=4, hidden_size=96,
                                                 num_attention_heads=6, num_key_value_heads=2,
                                                 intermediate_size=200, vocab_size=300))


@pytest.mark.parametrize("name", KERNELS)
def test_bf16_weights_batched_equal_batch1_and_lossless(small_model, kernel, name):
    """bf16 weights on each kernel: row i of a batched call == the batch-1 call with prompt i (greedy and seeded
    sampling), and self-speculative greedy == autoregressive greedy."""
    kernel(name)
    prompts = [[5, 17, 42, 7, 99, 3, 61], [11, 2], [200, 4, 4, 4, 9, 31, 8, 1, 77, 60, 12, 5, 5], [9]]
    common = dict(max_new_tokens=20, stop_token_ids=[], backend="engine", weight_dtype=torch.bfloat16)
    auto = layerskip_ext.generate(small_model, prompts, **common)
    for kw in (dict(), dict(strategy="self_speculative", exit_layer=1, num_speculations=3),
               dict(strategy="self_speculative", exit_layer=2, num_speculations=5, temperature=0.8, seed=4)):
        batch = layerskip_ext.generate(small_model, prompts, **common, **kw)
        for i, p in enumerate(prompts):
            alone = layerskip_ext.generate(small_model, p, **common, **kw)
            assert batch[i].tokens == alone.tokens, (name, kw, i)
            if "temperature" not in kw:
                assert batch[i].tokens == auto[i].tokens, (name, kw, i)  # lossless


def bf16_module(model):
    """A copy of model.module whose linear layers hold bf16 weights and run torch.ops.layerskip.linear: the
    logits of the engine with weight_dtype=bfloat16 under the kernel in use, through the PyTorch forward."""
    module = copy.deepcopy(model.module)
    for name, child in list(module.named_modules()):
        if isinstance(child, torch.nn.Linear):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, attr, Bf16Linear(child.weight))
    return module


class Bf16Linear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight_bf16 = weight.detach().bfloat16()  # [N, K]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        out = ops.linear(x.reshape(-1, x.shape[-1]).float(), self.weight_bf16)  # [rows, N]
        return out.reshape(*x.shape[:-1], -1)


def agreement(a: list[int], b: list[int]) -> tuple[int, int]:
    """(tokens equal position by position, length of the common prefix)."""
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return sum(x == y for x, y in zip(a, b)), prefix


@pytest.mark.slow
@needs_bf16dot
def test_smollm2_bf16_dot_accuracy(smollm2, kernel):
    """bf16 activations (avx512bf16) against float32 activations (the other kernel) on the same bf16 weights:
    max relative logit error < 5%; greedy argmax teacher-forced on the float32 path's 64 tokens equal at >= 60 of
    64 for each prompt; held-out perplexity within 0.5%. Free-running greedy agreement is printed beside the same
    figure for bf16 against float32 weights (both float32 activations): once a near tie flips, the rest of a
    free-running continuation differs, so it measures how close the prompt's ties are as much as accuracy.
    The figures are in benchmarks/results_bf16dot.md."""
    module = bf16_module(smollm2)
    with open(README, encoding="utf-8") as f:
        text_ids = torch.tensor([smollm2.encode(f.read())[:512]])  # [1, 512]
    logits, nll, tokens = {}, {}, {}
    common = dict(max_new_tokens=64, stop_token_ids=[], backend="engine")
    for name in (WIDE, "avx512bf16"):
        kernel(name)
        with torch.no_grad():
            logits[name] = [module(torch.tensor([smollm2.encode(p)]))[0] for p in PROMPTS[:2]]  # [T, V] each
            nll[name] = torch.nn.functional.cross_entropy(module(text_ids)[0, :-1], text_ids[0, 1:]).item()
        tokens[name] = [layerskip_ext.generate(smollm2, p, weight_dtype=torch.bfloat16, **common).tokens
                        for p in PROMPTS]
    tokens_fp32 = [layerskip_ext.generate(smollm2, p, weight_dtype=torch.float32, **common).tokens for p in PROMPTS]
    rels = [((got - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()
            for ref, got in zip(logits[WIDE], logits["avx512bf16"])]
    print(f"max relative logit error (per position, max-norm): {', '.join(f'{r:.5f}' for r in rels)}")
    forced_all = []
    for prompt, ref, got, f32 in zip(PROMPTS, tokens[WIDE], tokens["avx512bf16"], tokens_fp32):
        ids = smollm2.encode(prompt)
        with torch.no_grad():
            forced_logits = module(torch.tensor([ids + ref]))[0, len(ids) - 1:-1]  # [64, V], avx512bf16
        forced = int((forced_logits.argmax(-1) == torch.tensor(ref)).sum())
        forced_all.append(forced)
        (same, prefix), (same_w, prefix_w) = agreement(ref, got), agreement(ref, f32)
        print(f"{prompt[:24]!r}: bf16 vs fp32 activations: teacher-forced {forced}/64, free-running {same}/64 "
              f"(first {prefix} identical); bf16 vs fp32 weights (fp32 activations): free-running {same_w}/64 "
              f"(first {prefix_w})")
    ppl_wide, ppl_dot = torch.tensor([nll[WIDE], nll["avx512bf16"]]).exp().tolist()
    print(f"perplexity (README, 512 tokens): float32 activations {ppl_wide:.4f}, bf16 activations {ppl_dot:.4f} "
          f"({ppl_dot / ppl_wide - 1:+.3%})")
    assert max(rels) < 0.05
    assert min(forced_all) >= 60
    assert abs(ppl_dot / ppl_wide - 1) < 0.005
