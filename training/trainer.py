"""The training loop shared by the recipes: model setup, AdamW + cosine schedule, layer dropout, early-exit loss,
periodic validation, resumable checkpoints in HF format, and DDP under torchrun (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tokenizers import Tokenizer

import layerskip_ext
from layerskip_ext.checkpoint import save_pretrained
from layerskip_ext.config import ModelConfig
from layerskip_ext.reference import ReferenceLlama

from .config import TrainConfig
from .curriculum import EarlyExitCurriculum
from .data import ExampleSampler, WindowSampler, read_examples, token_stream, valid_windows
from .layer_dropout import LayerDropout
from .model import LayerSkipLM, build_hf, model_config, residual_states, to_reference
from .tokenizer import eos_id, train_bpe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- distributed


def dist_setup():
    """(rank, world_size, device) from torchrun's environment; a single process when not under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _barrier(world):
    if world > 1:
        dist.barrier()


# ---------------------------------------------------------------- model and tokenizer


def _init_reference(module: ReferenceLlama) -> None:
    """The Hugging Face Llama initialisation (normal(0, 0.02) matrices, unit norms) for a fresh reference model."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(m.weight, std=0.02)
        elif hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 1:
            torch.nn.init.ones_(m.weight)


def _as_kind(module: ReferenceLlama, kind: str):
    if kind == "reference":
        return module
    lm = build_hf(module.config)
    state = {k: v for k, v in module.state_dict().items()}
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ValueError(f"weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    return lm


def build_model_and_tokenizer(cfg: TrainConfig, rank: int, world: int):
    """(model of cfg.model.kind, tokenizer). Pretraining trains a BPE tokenizer (rank 0) unless one is given."""
    out_tok = os.path.join(cfg.out_dir, "tokenizer.json")
    if cfg.model.init == "scratch":
        if cfg.tokenizer.path:
            tok = Tokenizer.from_file(cfg.tokenizer.path)
        else:
            if rank == 0 and not os.path.isfile(out_tok):
                os.makedirs(cfg.out_dir, exist_ok=True)
                train_bpe(cfg.data.train, cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency).save(out_tok + ".tmp")
                os.replace(out_tok + ".tmp", out_tok)
            _barrier(world)
            tok = Tokenizer.from_file(out_tok)
        m = cfg.model
        if m.hidden_size % m.num_heads:
            raise ValueError(f"model.hidden_size {m.hidden_size} is not a multiple of num_heads {m.num_heads}")
        eos = eos_id(tok)
        config = ModelConfig(num_layers=m.num_layers, hidden_size=m.hidden_size, num_heads=m.num_heads,
                             num_kv_heads=m.num_kv_heads, head_dim=m.hidden_size // m.num_heads,
                             intermediate_size=m.intermediate_size, vocab_size=tok.get_vocab_size(),
                             rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
                             max_position_embeddings=m.max_position_embeddings, bos_token_id=eos,
                             eos_token_ids=() if eos is None else (eos,))
        torch.manual_seed(cfg.seed)
        if m.kind == "hf":
            lm = build_hf(config)
        else:
            lm = ReferenceLlama(config)
            _init_reference(lm)
            if config.tie_word_embeddings:
                lm.lm_head.weight = lm.model.embed_tokens.weight
        return lm, tok
    loaded = layerskip_ext.load(None if cfg.model.init == "default" else cfg.model.init)
    tok = Tokenizer.from_file(cfg.tokenizer.path) if cfg.tokenizer.path else loaded.tokenizer
    if tok is None:
        raise ValueError(f"checkpoint {cfg.model.init!r} has no tokenizer.json: set tokenizer.path")
    return _as_kind(loaded.module, cfg.model.kind).train(), tok


def save_checkpoint(lm, tokenizer, directory: str, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors + tokenizer.json, readable by transformers and layerskip_ext.load."""
    save_pretrained(to_reference(lm), tokenizer, directory, dtype=dtype)


def load_weights(lm, directory: str) -> None:
    state = load_file(os.path.join(directory, "model.safetensors"))
    missing, unexpected = lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model_config(lm).tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory} does not fit the model: missing {missing}, unexpected {unexpected}")


# ---------------------------------------------------------------- optimisation


def lr_at(step: int, cfg: TrainConfig) -> float:
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(lm, cfg: TrainConfig):
    seen, decay, no_decay = set(), [], []
    for p in lm.parameters():  # tied weights appear once
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2),
                             fused=torch.cuda.is_available())


# ---------------------------------------------------------------- validation


@torch.no_grad()
def validate(lm, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[int, float]:
    """{exit layer (1-based): mean CE} on the validation windows."""
    lm.eval()
    L = len(lm.model.layers)
    sums = torch.zeros(L, dtype=torch.float64)
    count = 0
    device = lm.lm_head.weight.device
    for s in range(0, inputs.shape[0], batch_size):
        x, y = inputs[s:s + batch_size].to(device), labels[s:s + batch_size].to(device)
        states = residual_states(lm, x)
        n = int((y != -100).sum())
        for l, h in states.items():
            logits = lm.lm_head(lm.model.norm(h)).float()  # [B, T, V]
            sums[l] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        count += n
    lm.train()
    return {l + 1: float(sums[l] / max(1, count)) for l in range(L)}


# ---------------------------------------------------------------- checkpoints


def _checkpoint_dirs(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step_*")))


def _save_training_state(lm, tokenizer, opt, step: int, cfg: TrainConfig) -> str:
    directory = os.path.join(cfg.out_dir, "checkpoints", f"step_{step:07d}")
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(lm, tokenizer, tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": cfg.to_dict()},
               os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    for old in _checkpoint_dirs(cfg.out_dir)[:-cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Runs a recipe; returns {"final_dir", "steps", "val": {layer: loss}, "tokens_per_second", "rank",
    "world_size", "model" (the trained module), "tokenizer"}."""
    for name, files in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} file {path!r} does not exist")
    rank, world, device = dist_setup()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)
    lm, tok = build_model_and_tokenizer(cfg, rank, world)
    lm.to(device).train()
    mcfg = model_config(lm)
    L = mcfg.num_layers
    eos = eos_id(tok)
    if eos is None and mcfg.eos_token_ids:
        eos = mcfg.eos_token_ids[0]

    # data (rank 0 tokenizes and caches first, the others read the cache)
    cache = os.path.join(cfg.out_dir, "cache")
    if cfg.data.format == "text":
        if rank == 0:
            train_tokens = token_stream(tok, cfg.data.train, eos, cache)
        _barrier(world)
        if rank != 0:
            train_tokens = token_stream(tok, cfg.data.train, eos, cache)
        sampler = WindowSampler(train_tokens, cfg.data.seq_len, cfg.seed)
        if cfg.data.valid:
            vin, vlab = valid_windows(token_stream(tok, cfg.data.valid, eos, cache), cfg.data.seq_len,
                                      cfg.train.eval_batches * cfg.train.batch_size)
    else:
        tin, tlab = read_examples(tok, cfg.data.train, cfg.data.seq_len, eos)
        sampler = ExampleSampler(tin, tlab, cfg.seed)
        if cfg.data.valid:
            vin, vlab = read_examples(tok, cfg.data.valid, cfg.data.seq_len, eos)
            n_valid = cfg.train.eval_batches * cfg.train.batch_size
            vin, vlab = vin[:n_valid], vlab[:n_valid]
    has_valid = bool(cfg.data.valid)

    # LayerSkip pieces
    ld = cfg.layer_dropout
    dropout = LayerDropout(L, ld.p_max, ld.schedule, ld.layers, seed=cfg.seed, time_schedule=ld.time_schedule,
                           total_steps=cfg.train.steps)
    ee = cfg.early_exit
    if ee.enabled:
        exits = list(range(L)) if ee.exit_layers is None else ee.exit_layers
        curriculum = EarlyExitCurriculum(ee.curriculum, exits, L, ee.rotational_period, cfg.train.steps,
                                         ee.gradual_span)
    else:
        curriculum = EarlyExitCurriculum("none", [L - 1], L)
    model = LayerSkipLM(lm, ee.scale, ee.e_scale, ee.recompute)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=dropout.active)
    opt = make_optimizer(lm, cfg)

    # resume
    start = 0
    ckpts = _checkpoint_dirs(cfg.out_dir) if cfg.resume else []
    if ckpts:
        load_weights(lm, ckpts[-1])
        state = torch.load(os.path.join(ckpts[-1], "trainer_state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        if rank == 0:
            print(f"resuming from {ckpts[-1]} at step {start}")
    if rank == 0:
        with open(os.path.join(cfg.out_dir, "train_config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        n_params = sum(p.numel() for p in {id(p): p for p in lm.parameters()}.values())
        print(f"{cfg.recipe}: {n_params / 1e6:.2f}M parameters, {L} layers, {world} process(es), "
              f"layer dropout {[round(p, 3) for p in dropout.rates] if dropout.active else 'off'}"
              f"{' x ' + ld.time_schedule + ' curriculum over steps' if ld.time_schedule != 'constant' else ''}, "
              f"early exit {'curriculum ' + ee.curriculum + ' scale ' + ee.scale if ee.enabled else 'off'}")

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=cfg.train.steps, initial=start, dynamic_ncols=True)
    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if rank == 0 else None
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * world
    t0, tokens_seen, last_val = time.time(), 0, None
    for step in range(start, cfg.train.steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        exits = curriculum.enabled(step)
        loss_sum, per_exit_sum = 0.0, {}
        for micro in range(cfg.train.grad_accum):
            x, y = sampler.batch(step, micro, cfg.train.batch_size, rank, world)
            x, y = x.to(device), y.to(device)
            skip = None
            if dropout.active:  # one draw per (step, micro) so micro-batches differ
                skip = dropout.skip_mask(step, x.shape[0], rank, world, micro, cfg.train.grad_accum).to(device)
            sync = world == 1 or micro == cfg.train.grad_accum - 1
            ctx = model.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                loss, per_exit = model(x, y, exits, skip)
                (loss / cfg.train.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.train.grad_accum
            for l, v in per_exit.items():
                per_exit_sum[l + 1] = per_exit_sum.get(l + 1, 0.0) + float(v) / cfg.train.grad_accum
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(lm.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_seen += tokens_per_step
        done = step + 1
        tok_s = tokens_seen / max(1e-9, time.time() - t0)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{per_exit_sum[L]:.3f}", tok_s=f"{tok_s:.0f}", lr=f"{lr:.2e}")
        record = None
        if rank == 0 and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
            record = {"step": done, "loss": loss_sum, "final_ce": per_exit_sum[L], "exit_ce": per_exit_sum,
                      "lr": lr, "tokens_per_second": tok_s, "elapsed_s": time.time() - t0}
        if has_valid and (done % cfg.train.eval_every == 0 or done == cfg.train.steps):
            if rank == 0:
                last_val = validate(lm, vin, vlab, cfg.train.batch_size)
                record = record or {"step": done}
                record["val_ce"] = last_val
                msg = f"step {done}: val CE final {last_val[L]:.3f} | " + " ".join(
                    f"L{l}:{v:.2f}" for l, v in last_val.items())
                (bar.write if bar is not None else print)(msg)
            _barrier(world)
        if record is not None:
            log.write(json.dumps(record) + "\n")
            log.flush()
        if done % cfg.train.save_every == 0 and done < cfg.train.steps:
            if rank == 0:
                _save_training_state(lm, tok, opt, done, cfg)
            _barrier(world)
    if bar is not None:
        bar.close()
    final_dir = os.path.join(cfg.out_dir, "final")
    if rank == 0:
        _save_training_state(lm, tok, opt, cfg.train.steps, cfg)
        save_checkpoint(lm, tok, final_dir, dtype=_DTYPES[cfg.train.save_dtype])
        log.close()
    _barrier(world)
    elapsed = time.time() - t0
    result = {"final_dir": final_dir, "steps": cfg.train.steps, "val": last_val,
              "tokens_per_second": tokens_seen / max(1e-9, elapsed), "rank": rank, "world_size": world,
              "model": lm, "tokenizer": tok}
    if world > 1:
        dist.destroy_process_group()
    return result

