"""Training throughput (tokens/s) of one model under plain loss, LayerSkip (all exits) and LayerSkip with the
rotational curriculum, on random tokens. Prints one line per setting.

    python benchmarks/train_throughput.py [--layers 8 --hidden 192 --heads 3 --kv-heads 1 --ffn 512 --vocab 2048
                                           --batch 16 --seq 128 --steps 5 --kind hf]
"""
import argparse
import time

import torch

from layerskip_ext.config import ModelConfig
from layerskip_ext.reference import ReferenceLlama
from layerskip_ext.training.curriculum import EarlyExitCurriculum
from layerskip_ext.training.layer_dropout import LayerDropout
from layerskip_ext.training.model import LayerSkipLM, build_hf


def main():
    ap = argparse.ArgumentParser()
    for name, default in (("layers", 8), ("hidden", 192), ("heads", 3), ("kv-heads", 1), ("ffn", 512),
                          ("vocab", 2048), ("batch", 16), ("seq", 128), ("steps", 5), ("threads", 0)):
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--kind", choices=("hf", "reference"), default="hf")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = ModelConfig(num_layers=a.layers, hidden_size=a.hidden, num_heads=a.heads, num_kv_heads=a.kv_heads,
                      head_dim=a.hidden // a.heads, intermediate_size=a.ffn, vocab_size=a.vocab,
                      tie_word_embeddings=True, max_position_embeddings=max(1024, a.seq))
    L = a.layers
    settings = {
        "plain": (EarlyExitCurriculum("none", [L - 1], L), None),
        "layerskip (all exits, dropout 0.2)": (EarlyExitCurriculum("none", list(range(L)), L),
                                               LayerDropout(L, 0.2, "exp")),
        "layerskip (rotational 2, dropout 0.2)": (EarlyExitCurriculum("rotational", list(range(L)), L, period=2),
                                                  LayerDropout(L, 0.2, "exp")),
    }
    for name, (curriculum, dropout) in settings.items():
        torch.manual_seed(0)
        lm = build_hf(cfg) if a.kind == "hf" else ReferenceLlama(cfg)
        model = LayerSkipLM(lm)
        opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1))
        times = []
        for step in range(a.steps + 1):  # the first step warms up
            t0 = time.perf_counter()
            skip = None if dropout is None else dropout.skip_mask(step, a.batch)
            loss, _ = model(ids[:, :-1], ids[:, 1:], curriculum.enabled(step), skip)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        per_step = sum(times[1:]) / a.steps
        print(f"{name:40s} {a.batch * a.seq / per_step:8.0f} tokens/s  ({per_step * 1000:.0f} ms/step)")


if __name__ == "__main__":
    main()
