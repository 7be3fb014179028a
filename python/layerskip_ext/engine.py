"""The C++ decoder loop from Python: torch.classes.layerskip.Engine built from a LayerSkipModel.

    engine = layerskip_ext.engine.get_engine(model)            # built once, cached on the model
    result = engine.generate(args)                              # args: generation.GenerationArgs

The Engine holds the weights in its own layout (q|k|v and gate|up fused, matmul weights in float32 or
bfloat16) and its KV / exit-query caches across calls. Without a callback a generation runs in one C++
call; with `on_token` it runs one round per call and forwards the accepted tokens. An engine copies the
weights it fuses when it is built: after changing the model's weights, build a new one
(`get_engine(model, rebuild=True)`).
"""
from __future__ import annotations

import torch

from .generation import GenerationArgs, GenerationResult, GenerationStats
from .sampling import seed_as_int64

try:
    from . import _C  # noqa: F401  (registers the ops and the Engine class)

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # the extension is not built
    _IMPORT_ERROR = e

WEIGHT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
_INITIAL_CAPACITY = 512  # KV positions allocated up front; the engine grows them when a call needs more


def is_available() -> bool:
    """True when the C++ extension is built and importable."""
    return _IMPORT_ERROR is None


def weight_tensors(module) -> list[torch.Tensor]:
    """A ReferenceLlama's weights in the Engine's order: embed, norm, lm_head, then 9 per layer.

    A tied LM head is passed as the embedding tensor itself, so the engine shares it."""
    embed = module.model.embed_tokens.weight.detach()
    tied = module.lm_head.weight is module.model.embed_tokens.weight
    tensors = [embed, module.model.norm.weight.detach(), embed if tied else module.lm_head.weight.detach()]
    for layer in module.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        tensors += [p.weight.detach() for p in (layer.input_layernorm, attn.q_proj, attn.k_proj, attn.v_proj,
                                                 attn.o_proj, layer.post_attention_layernorm, mlp.gate_proj,
                                                 mlp.up_proj, mlp.down_proj)]
    return tensors


class Engine:
    """A model's weights and decoding state in the C++ engine (one generation at a time)."""

    def __init__(self, model, weight_dtype: torch.dtype = torch.float32, capacity: int | None = None):
        if _IMPORT_ERROR is not None:
            raise RuntimeError(f"the layerskip_ext C++ extension is not built: {_IMPORT_ERROR}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be torch.float32 or torch.bfloat16, got {weight_dtype}")
        c = model.config
        table = model.module.rope_cache()  # [max_pos, D] float32: cos | sin
        if capacity is None:
            capacity = min(_INITIAL_CAPACITY, c.max_position_embeddings)
        self.model, self.weight_dtype = model, weight_dtype
        self.last_profile: dict[str, float] = {}
        with torch.no_grad():
            self._engine = torch.classes.layerskip.Engine(
                c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size,
                c.vocab_size, float(c.rms_norm_eps), table, weight_tensors(model.module),
                WEIGHT_DTYPES[weight_dtype], capacity)

    @property
    def capacity(self) -> int:
        """KV-cache positions currently allocated."""
        return self._engine.capacity()

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one full decode step reads (all layers, final norm, LM head, one embedding row)."""
        return self._engine.weight_bytes_per_token()

    def generate(self, args: GenerationArgs, on_token=None, profile: bool = False) -> GenerationResult:
        """Runs one generation with validated arguments (generation.check_generation_args).

        profile: time the decode phase (not the prefill) per category into `self.last_profile`
        (seconds per category: embed, norm, qkv_proj, rotary_kv, attention, o_proj, mlp_proj, silu,
        lm_head, sampling, accept)."""
        e = self._engine
        device = self.model.device
        spec = args.strategy == "self_speculative"
        e.begin(torch.tensor(args.prompt_ids, dtype=torch.int64, device=device), args.strategy, args.exit_layer,
                args.num_speculations if spec else 1, args.max_new_tokens, args.temperature, args.top_k,
                args.top_p, seed_as_int64(args.seed), torch.tensor(args.stop_token_ids, dtype=torch.int64),
                args.context_length)
        seen, stopped = 0, False  # tokens passed to on_token; whether on_token asked to stop
        if profile:
            e.step(1)  # the prefill
            e.reset_profile()
            e.set_profiling(True)
            try:
                e.step(0)
            finally:
                e.set_profiling(False)
            self.last_profile = dict(e.profile())
        elif on_token is None:
            e.step(0)  # the whole generation in one call
        else:
            while not stopped and not e.finished():
                for token in e.step(1).tolist():  # one round: its accepted tokens, in order
                    seen += 1
                    if on_token(token):  # the caller stops here (a stop string): the rest of the round is dropped
                        stopped = True
                        break
        tokens = e.tokens().tolist()
        if stopped:
            tokens = tokens[:seen]
        s = e.stats()
        stats = GenerationStats(args.strategy, None if args.strategy == "autoregressive" else args.exit_layer,
                                args.num_speculations if spec else None, prompt_tokens=len(args.prompt_ids),
                                new_tokens=len(tokens), drafted=int(s["drafted"]), accepted=int(s["accepted"]),
                                rounds=int(s["rounds"]), prefill_time_s=s["prefill_time_s"],
                                decode_time_s=s["decode_time_s"])
        finish_reason = "stop" if stopped else e.finish_reason()
        return GenerationResult(tokens, self.model.decode(tokens), stats, finish_reason, list(args.prompt_ids))


def default_weight_dtype(model) -> torch.dtype:
    """bfloat16 matmul weights for a bfloat16 model (nothing is lost), float32 otherwise."""
    return torch.bfloat16 if model.dtype == torch.bfloat16 else torch.float32


def get_engine(model, weight_dtype: torch.dtype | None = None, rebuild: bool = False) -> Engine:
    """The model's Engine for `weight_dtype`, built on first use and cached on the model (model._engine)."""
    weight_dtype = default_weight_dtype(model) if weight_dtype is None else weight_dtype
    if not isinstance(model._engine, dict):
        model._engine = {}
    if rebuild or weight_dtype not in model._engine:
        model._engine[weight_dtype] = Engine(model, weight_dtype)
    return model._engine[weight_dtype]
