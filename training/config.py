"""Training configuration: nested dataclasses read from a JSON or YAML file, with `section.key=value` overrides."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

RECIPES = ("pretrain", "continual", "finetune")


@dataclass
class ModelSection:
    kind: str = "hf"            # "hf" (transformers LlamaForCausalLM) or "reference" (layerskip_ext ReferenceLlama)
    init: str = "scratch"       # "scratch", "default" (layerskip_ext.load(): SmolLM2-135M) or a checkpoint path
    num_layers: int = 8         # the rest: architecture of a model built from scratch
    hidden_size: int = 256
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 768
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 1024


@dataclass
class TokenizerSection:
    path: str | None = None     # tokenizer.json; None: the checkpoint's own (continual / finetune) or train one
    vocab_size: int = 4096      # byte-level BPE trained on the training files (pretrain without a path)
    min_frequency: int = 2


@dataclass
class DataSection:
    train: list[str] = field(default_factory=list)   # text files (pretrain / continual) or JSONL (finetune)
    valid: list[str] = field(default_factory=list)
    format: str = "text"        # "text" or "jsonl" ({"prompt": ..., "response": ...}, loss on the response only)
    seq_len: int = 256


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 8         # per process
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1   # cosine decay to lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    threads: int = 0            # torch.set_num_threads; 0 keeps the default
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    save_every: int = 500
    keep_checkpoints: int = 2   # the newest resume checkpoints kept (at least 1)
    save_dtype: str = "float32"  # dtype of the final export: float32, bfloat16 or float16


@dataclass
class LayerDropoutSection:
    p_max: float = 0.0
    schedule: str = "exp"                   # over depth: uniform, linear, exp, log, sine, sigmoid, step
    layers: list[int] | None = None
    time_schedule: str = "constant"         # over training: constant, exp (2^(t/T) - 1), linear


@dataclass
class EarlyExitSection:
    enabled: bool = False
    exit_layers: list[int] | None = None   # 0-based; None: every layer
    scale: str = "l"
    e_scale: float = 1.0
    curriculum: str = "none"
    rotational_period: int = 2
    gradual_span: float = 1.0               # gradual: fraction of the run over which the exits are switched on
    recompute: bool = False                 # recompute each exit's logits in backward (memory for time)


@dataclass
class TrainConfig:
    recipe: str = "pretrain"
    out_dir: str = "runs/default"
    seed: int = 0
    resume: bool = True
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    layer_dropout: LayerDropoutSection = field(default_factory=LayerDropoutSection)
    early_exit: EarlyExitSection = field(default_factory=EarlyExitSection)

    def validate(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}")
        if self.model.kind not in ("hf", "reference"):
            raise ValueError(f"model.kind must be 'hf' or 'reference', got {self.model.kind!r}")
        if self.recipe == "pretrain" and self.model.init != "scratch":
            raise ValueError("recipe 'pretrain' trains from scratch: set model.init to 'scratch'")
        if self.recipe != "pretrain" and self.model.init == "scratch":
            raise ValueError(f"recipe {self.recipe!r} needs a checkpoint: set model.init to 'default' or a path")
        if self.data.format not in ("text", "jsonl"):
            raise ValueError(f"data.format must be 'text' or 'jsonl', got {self.data.format!r}")
        if not self.data.train:
            raise ValueError("data.train lists no files")
        minimums = {"train.steps": 1, "train.batch_size": 1, "train.grad_accum": 1, "train.log_every": 1,
                    "train.eval_every": 1, "train.save_every": 1, "train.eval_batches": 1, "data.seq_len": 1,
                    "train.warmup_steps": 0, "train.threads": 0, "train.keep_checkpoints": 1, "seed": 0,
                    "tokenizer.vocab_size": 1, "tokenizer.min_frequency": 1}
        for name, low in minimums.items():  # integer fields and their least values
            value = self
            for part in name.split("."):
                value = getattr(value, part)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        t = self.train
        ranges = [("train.lr", t.lr, 0.0, math.inf, False), ("train.min_lr_ratio", t.min_lr_ratio, 0.0, 1.0, True),
                  ("train.weight_decay", t.weight_decay, 0.0, math.inf, True),
                  ("train.beta1", t.beta1, 0.0, 1.0, True), ("train.beta2", t.beta2, 0.0, 1.0, True),
                  ("train.grad_clip", t.grad_clip, 0.0, math.inf, True)]  # grad_clip 0: no clipping
        for name, value, low, high, low_included in ranges:
            if not (low <= value if low_included else low < value) or not value <= high:
                raise ValueError(f"{name} must be in {'[' if low_included else '('}{low}, {high}], got {value!r}")
        if self.recipe == "pretrain" and self.data.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"data.seq_len {self.data.seq_len} exceeds model.max_position_embeddings "
                             f"{self.model.max_position_embeddings}")
        if self.train.save_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"train.save_dtype must be float32, bfloat16 or float16, got {self.train.save_dtype!r}")
        self._validate_layerskip()

    def _validate_layerskip(self) -> None:
        """Names and ranges of the LayerSkip options, checked before any tokenizer or model work starts."""
        from .curriculum import CURRICULA
        from .early_exit_loss import SCALE_TYPES
        from .layer_dropout import SCHEDULES, TIME_SCHEDULES
        ld, ee = self.layer_dropout, self.early_exit
        checks = [("layer_dropout.schedule", ld.schedule, SCHEDULES),
                  ("layer_dropout.time_schedule", ld.time_schedule, TIME_SCHEDULES),
                  ("early_exit.scale", ee.scale, SCALE_TYPES), ("early_exit.curriculum", ee.curriculum, CURRICULA)]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not isinstance(ld.p_max, (int, float)) or not 0.0 <= ld.p_max <= 1.0:
            raise ValueError(f"layer_dropout.p_max must be a number in [0, 1], got {ld.p_max!r}")
        if not isinstance(ee.e_scale, (int, float)) or ee.e_scale < 0:
            raise ValueError(f"early_exit.e_scale must be a number >= 0, got {ee.e_scale!r}")
        if not isinstance(ee.gradual_span, (int, float)) or not 0.0 < ee.gradual_span <= 1.0:
            raise ValueError(f"early_exit.gradual_span must be a number in (0, 1], got {ee.gradual_span!r}")
        if not isinstance(ee.rotational_period, int) or ee.rotational_period < 1:
            raise ValueError(f"early_exit.rotational_period must be a positive integer, got {ee.rotational_period!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _matches(value, kind: str) -> bool:
    """Whether value has the field type `kind` (a dataclass annotation: int, float, bool, str, list[...], X | None).
    bool is not an int, a float must be finite (JSON overrides accept NaN and Infinity), an int is a valid float."""
    options = [k.strip() for k in kind.split("|")]
    if len(options) > 1:
        return any(_matches(value, k) for k in options)
    if kind == "None":
        return value is None
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("list[") and kind.endswith("]"):
        return isinstance(value, list) and all(_matches(v, kind[5:-1]) for v in value)
    raise AssertionError(f"no check for field type {kind!r}")


def _build(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"config section {where or 'top level'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown config keys in {where or 'top level'}: {unknown} (known: {sorted(fields)})")
    kwargs = {}
    for name, value in d.items():
        default = fields[name].default_factory() if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value, f"{where}{name}.")
        elif not _matches(value, fields[name].type):  # "False" for a bool was true, true for an int was 1
            raise ValueError(f"{where}{name} must be of type {fields[name].type}, got {value!r}")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """overrides like ["train.steps=10", "early_exit.enabled=true", "data.train=[\"a.txt\"]"] (JSON values)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = d
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a config section")
        node[parts[-1]] = _parse_value(value)
    return d


def read_config_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml
        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config {path} is not valid YAML: {e}") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config {path} is not valid JSON: {e}") from None
    return d


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """A TrainConfig from a JSON/YAML file (None: the defaults) plus overrides; validated."""
    d = read_config_file(path) if path else {}
    d = apply_overrides(d, list(overrides))
    config = _build(TrainConfig, d, "")
    config.validate()
    return config


def config_from_dict(d: dict) -> TrainConfig:
    config = _build(TrainConfig, d, "")
    config.validate()
    return config


def default_config_dir() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
