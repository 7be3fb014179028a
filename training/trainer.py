"""The training loop shared by the recipes: model setup, AdamW + cosine schedule, layer dropout, early-exit loss,
periodic validation, resumable checkpoints in HF format, and DDP under torchrun (gloo on CPU, nccl on CUDA)."""
from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass

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
from .evaluate import exit_metrics
from .layer_dropout import LayerDropout
from .model import LayerSkipLM, build_hf, model_config, to_reference
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
    if tok.get_vocab_size() > loaded.config.vocab_size:  # its ids would index past the embedding (IndexError)
        raise ValueError(f"the tokenizer has {tok.get_vocab_size()} tokens but the checkpoint {cfg.model.init!r} "
                         f"embeds {loaded.config.vocab_size}: use the checkpoint's own tokenizer (unset "
                         "tokenizer.path) or one of at most that many tokens")
    if cfg.data.seq_len > loaded.config.max_position_embeddings:
        raise ValueError(f"data.seq_len {cfg.data.seq_len} exceeds the checkpoint's max_position_embeddings "
                         f"{loaded.config.max_position_embeddings}")
    return _as_kind(loaded.module, cfg.model.kind).train(), tok


def save_checkpoint(lm, tokenizer, directory: str, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors + tokenizer.json, readable by transformers and layerskip_ext.load."""
    save_pretrained(to_reference(lm), tokenizer, directory, dtype=dtype)


def load_weights(lm, directory: str) -> None:
    state = load_file(os.path.join(directory, "model.safetensors"))
    try:
        missing, unexpected = lm.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    except RuntimeError as e:  # shapes of another architecture (the config changed since the checkpoint)
        raise ValueError(f"checkpoint {directory} does not fit the model (was the architecture changed since it "
                         f"was written?): {str(e).splitlines()[0]} ...") from None
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


def validate(lm, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[int, float]:
    """{exit layer (1-based): mean CE} on the validation windows (evaluate.exit_metrics, in eval mode)."""
    lm.eval()
    try:
        rows = exit_metrics(lm, inputs, labels, batch_size)
    finally:
        lm.train()
    return {r["exit"]: r["loss"] for r in rows}


# ---------------------------------------------------------------- checkpoints
#
# checkpoints/step_NNNNNNN/ holds the HF files (config.json, model.safetensors, tokenizer.json) and trainer_state.pt:
# {"step", "optimizer" (AdamW state_dict: tensors, numbers, lists), "config"}, plain containers read back with
# torch.load(weights_only=True), so a checkpoint cannot run code. Nothing else needs saving: the batches
# (data.WindowSampler) and the layer-dropout draws are pure functions of (seed, step), and the model is built
# from the seed. A checkpoint is written into step_N.tmp and renamed when complete; resuming reads only complete
# ones, so a run killed while saving resumes from the previous checkpoint.

_STEP_DIR = re.compile(r"step_\d{7}$")


def _checkpoint_dirs(out_dir: str) -> list[str]:
    """Complete checkpoints of a run, oldest first (unfinished step_N.tmp folders are ignored)."""
    root = os.path.join(out_dir, "checkpoints")
    names = sorted(n for n in os.listdir(root) if _STEP_DIR.match(n)) if os.path.isdir(root) else []
    return [os.path.join(root, n) for n in names]


def _replace_dir(tmp: str, directory: str) -> None:
    """Moves the finished folder `tmp` to `directory` (replacing an older one of the same name)."""
    if os.path.isdir(directory):
        old = directory + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def _save_training_state(lm, tokenizer, opt, step: int, cfg: TrainConfig) -> str:
    directory = os.path.join(cfg.out_dir, "checkpoints", f"step_{step:07d}")
    tmp = directory + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(lm, tokenizer, tmp)
    torch.save({"step": step, "optimizer": opt.state_dict(), "config": cfg.to_dict()},
               os.path.join(tmp, "trainer_state.pt"))
    _replace_dir(tmp, directory)
    for old in _checkpoint_dirs(cfg.out_dir)[:-cfg.train.keep_checkpoints]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def _load_training_state(lm, opt, directory: str) -> int:
    """Weights and optimizer state from a checkpoint folder; returns its step."""
    load_weights(lm, directory)
    path = os.path.join(directory, "trainer_state.pt")
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds more than tensors and plain containers; refusing to unpickle it "
                         f"(it could run code): {str(e).splitlines()[0]}") from None
    opt.load_state_dict(state["optimizer"])
    return int(state["step"])


def _export_final(lm, tokenizer, cfg: TrainConfig) -> str:
    final_dir = os.path.join(cfg.out_dir, "final")
    shutil.rmtree(final_dir + ".tmp", ignore_errors=True)
    save_checkpoint(lm, tokenizer, final_dir + ".tmp", dtype=_DTYPES[cfg.train.save_dtype])
    _replace_dir(final_dir + ".tmp", final_dir)
    return final_dir


def _trim_log(path: str, last_step: int) -> None:
    """Drops the log records of steps after `last_step` (written before a crash, redone by the resumed run)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------- the run's parts


@dataclass
class Run:
    """Everything a training run holds; built once by `prepare`, advanced one step at a time by `train_step`."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    lm: torch.nn.Module          # the HF or reference model being trained
    tokenizer: Tokenizer
    sampler: object              # WindowSampler or ExampleSampler: .batch(step, micro, B, rank, world)
    valid: tuple | None          # (inputs [N, T], labels [N, T]) held-out windows, or None
    dropout: LayerDropout
    curriculum: EarlyExitCurriculum
    model: torch.nn.Module       # LayerSkipLM (DDP-wrapped under torchrun)
    opt: torch.optim.Optimizer
    start: int = 0               # first step to run (after a resume)

    @property
    def num_layers(self) -> int:
        return len(self.lm.model.layers)


def _check_files(cfg: TrainConfig) -> None:
    for name, files in (("data.train", cfg.data.train), ("data.valid", cfg.data.valid)):
        for path in files:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{name} file {path!r} does not exist")


def _load_data(cfg: TrainConfig, tok, eos: int | None, rank: int, world: int):
    """(sampler, valid windows or None); rank 0 tokenizes and caches text first, the other ranks read the cache."""
    cache = os.path.join(cfg.out_dir, "cache")
    valid = None
    if cfg.data.format == "text":
        if rank == 0:
            train_tokens = token_stream(tok, cfg.data.train, eos, cache)
        _barrier(world)
        if rank != 0:
            train_tokens = token_stream(tok, cfg.data.train, eos, cache)
        sampler = WindowSampler(train_tokens, cfg.data.seq_len, cfg.seed)
        if cfg.data.valid:
            valid = valid_windows(token_stream(tok, cfg.data.valid, eos, cache), cfg.data.seq_len,
                                  cfg.train.eval_batches * cfg.train.batch_size)
    else:
        tin, tlab = read_examples(tok, cfg.data.train, cfg.data.seq_len, eos)
        sampler = ExampleSampler(tin, tlab, cfg.seed)
        if cfg.data.valid:
            vin, vlab = read_examples(tok, cfg.data.valid, cfg.data.seq_len, eos)
            n_valid = cfg.train.eval_batches * cfg.train.batch_size
            valid = (vin[:n_valid], vlab[:n_valid])
    return sampler, valid


def _layerskip_parts(cfg: TrainConfig, num_layers: int):
    """(LayerDropout, EarlyExitCurriculum) of the config; plain training: no dropout, the last exit only."""
    ld, ee = cfg.layer_dropout, cfg.early_exit
    dropout = LayerDropout(num_layers, ld.p_max, ld.schedule, ld.layers, seed=cfg.seed,
                           time_schedule=ld.time_schedule, total_steps=cfg.train.steps)
    if ee.enabled:
        exits = list(range(num_layers)) if ee.exit_layers is None else ee.exit_layers
        curriculum = EarlyExitCurriculum(ee.curriculum, exits, num_layers, ee.rotational_period, cfg.train.steps,
                                         ee.gradual_span)
    else:
        curriculum = EarlyExitCurriculum("none", [num_layers - 1], num_layers)
    return dropout, curriculum


def _describe(run: Run) -> str:
    ld, ee, dropout = run.cfg.layer_dropout, run.cfg.early_exit, run.dropout
    n_params = sum(p.numel() for p in {id(p): p for p in run.lm.parameters()}.values())
    return (f"{run.cfg.recipe}: {n_params / 1e6:.2f}M parameters, {run.num_layers} layers, {run.world} process(es), "
            f"layer dropout {[round(p, 3) for p in dropout.rates] if dropout.active else 'off'}"
            f"{' x ' + ld.time_schedule + ' curriculum over steps' if ld.time_schedule != 'constant' else ''}, "
            f"early exit {'curriculum ' + ee.curriculum + ' scale ' + ee.scale if ee.enabled else 'off'}")


def prepare(cfg: TrainConfig) -> Run:
    """Processes, model and tokenizer, data, LayerSkip pieces, optimizer, and the resume from the last checkpoint."""
    _check_files(cfg)
    rank, world, device = dist_setup()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)
    lm, tok = build_model_and_tokenizer(cfg, rank, world)
    lm.to(device).train()
    eos = eos_id(tok)
    if eos is None and model_config(lm).eos_token_ids:
        eos = model_config(lm).eos_token_ids[0]
    sampler, valid = _load_data(cfg, tok, eos, rank, world)
    num_layers = model_config(lm).num_layers
    dropout, curriculum = _layerskip_parts(cfg, num_layers)
    ee = cfg.early_exit
    model = LayerSkipLM(lm, ee.scale, ee.e_scale, ee.recompute)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=dropout.active)
    run = Run(cfg, rank, world, device, lm, tok, sampler, valid, dropout, curriculum, model, make_optimizer(lm, cfg))
    ckpts = _checkpoint_dirs(cfg.out_dir) if cfg.resume else []
    if ckpts:
        run.start = _load_training_state(lm, run.opt, ckpts[-1])
        if run.start > cfg.train.steps:  # it went on to write a checkpoint labelled with the smaller step
            raise ValueError(f"{ckpts[-1]} is at step {run.start}, past train.steps {cfg.train.steps}: raise "
                             "train.steps, choose another out_dir, or set resume=false")
        if rank == 0:
            print(f"resuming from {ckpts[-1]} at step {run.start}")
    if rank == 0:
        _trim_log(os.path.join(cfg.out_dir, "log.jsonl"), run.start)
        _write_json(os.path.join(cfg.out_dir, "train_config.json"), cfg.to_dict())
        print(_describe(run))
    return run


def train_step(run: Run, step: int) -> tuple[float, dict[int, float]]:
    """One optimizer step (grad_accum micro-batches) -> (loss, {exit (1-based): CE}), averaged over micro-batches."""
    cfg = run.cfg
    accum = cfg.train.grad_accum
    for g in run.opt.param_groups:
        g["lr"] = lr_at(step, cfg)
    exits = run.curriculum.enabled(step)
    loss_sum, per_exit_sum = 0.0, {}
    for micro in range(accum):
        x, y = run.sampler.batch(step, micro, cfg.train.batch_size, run.rank, run.world)  # [B, T] each
        x, y = x.to(run.device), y.to(run.device)
        skip = None
        if run.dropout.active:  # [L, B]; one draw per (step, micro) so micro-batches differ
            skip = run.dropout.skip_mask(step, x.shape[0], run.rank, run.world, micro, accum).to(run.device)
        sync = run.world == 1 or micro == accum - 1
        with run.model.no_sync() if not sync else contextlib.nullcontext():
            loss, per_exit = run.model(x, y, exits, skip)
            (loss / accum).backward()
        loss_sum += float(loss.detach()) / accum
        for l, v in per_exit.items():
            per_exit_sum[l + 1] = per_exit_sum.get(l + 1, 0.0) + float(v) / accum
    if not math.isfinite(loss_sum):  # stop before the optimizer spreads it into the weights
        raise ValueError(f"step {step + 1}: the training loss is {loss_sum} (not finite); a learning rate too high, "
                         "a batch with no target tokens (a fine-tune example whose prompt fills seq_len), or "
                         "non-finite weights in the initial checkpoint")
    if cfg.train.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.lm.parameters(), cfg.train.grad_clip)
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    return loss_sum, per_exit_sum


class Meter:
    """Rank 0's progress bar and log.jsonl; tokens/s counted from the start of this process."""

    def __init__(self, run: Run, progress: bool):
        cfg = run.cfg
        self.run, self.active = run, run.rank == 0
        self.bar = None
        if progress and self.active:
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.steps, initial=run.start, dynamic_ncols=True)
        self.log = open(os.path.join(cfg.out_dir, "log.jsonl"), "a") if self.active else None
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len * cfg.train.grad_accum * run.world
        self.t0, self.tokens_seen = time.time(), 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_seen / max(1e-9, time.time() - self.t0)

    def record(self, done: int, loss: float, per_exit: dict[int, float]) -> dict | None:
        """Counts the step's tokens; the log record of step `done` when it is a logging step (rank 0), else None."""
        self.tokens_seen += self.tokens_per_step
        cfg, L = self.run.cfg, self.run.num_layers
        lr = lr_at(done - 1, cfg)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{per_exit[L]:.3f}", tok_s=f"{self.tokens_per_second:.0f}", lr=f"{lr:.2e}")
        if self.active and (done % cfg.train.log_every == 0 or done == cfg.train.steps):
            return {"step": done, "loss": loss, "final_ce": per_exit[L], "exit_ce": per_exit, "lr": lr,
                    "tokens_per_second": self.tokens_per_second, "elapsed_s": time.time() - self.t0}
        return None

    def message(self, text: str) -> None:
        (self.bar.write if self.bar is not None else print)(text)

    def write(self, record: dict | None) -> None:
        if record is not None:
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def validate_if_due(run: Run, done: int, record: dict | None, meter: Meter) -> tuple[dict | None, dict | None]:
    """Every eval_every steps and at the end: rank 0 validates -> (record with val_ce, {exit: CE}) or (record, None)."""
    cfg = run.cfg
    if run.valid is None or (done % cfg.train.eval_every and done != cfg.train.steps):
        return record, None
    val = None
    if run.rank == 0:
        val = validate(run.lm, *run.valid, cfg.train.batch_size)
        record = dict(record or {"step": done}, val_ce=val)
        meter.message(f"step {done}: val CE final {val[run.num_layers]:.3f} | "
                      + " ".join(f"L{l}:{v:.2f}" for l, v in val.items()))
    _barrier(run.world)
    return record, val


def save_if_due(run: Run, done: int) -> None:
    if done % run.cfg.train.save_every == 0 and done < run.cfg.train.steps:
        if run.rank == 0:
            _save_training_state(run.lm, run.tokenizer, run.opt, done, run.cfg)
        _barrier(run.world)


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Runs a recipe; returns {"final_dir", "steps", "val": {layer: loss}, "tokens_per_second", "rank",
    "world_size", "model" (the trained module), "tokenizer"}."""
    run = prepare(cfg)
    meter = Meter(run, progress)
    last_val = None
    for step in range(run.start, cfg.train.steps):
        loss, per_exit = train_step(run, step)
        record = meter.record(step + 1, loss, per_exit)
        record, val = validate_if_due(run, step + 1, record, meter)
        last_val = val or last_val
        meter.write(record)
        save_if_due(run, step + 1)
    final_dir = os.path.join(cfg.out_dir, "final")
    if run.rank == 0:
        _save_training_state(run.lm, run.tokenizer, run.opt, cfg.train.steps, cfg)
        final_dir = _export_final(run.lm, run.tokenizer, cfg)
    meter.close()
    _barrier(run.world)
    result = {"final_dir": final_dir, "steps": cfg.train.steps, "val": last_val,
              "tokens_per_second": meter.tokens_per_second, "rank": run.rank, "world_size": run.world,
              "model": run.lm, "tokenizer": run.tokenizer}
    if run.world > 1:
        dist.destroy_process_group()
    return result
