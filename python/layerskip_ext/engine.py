"""The C++ decoder loop from Python: torch.classes.layerskip.Engine built from a LayerSkipModel.

    engine = layerskip_ext.engine.get_engine(model)            # built once, cached on the model
    result = engine.generate(args)                              # args: generation.GenerationArgs
    results = engine.generate_batch([args0, args1, ...])        # one result per row, batched steps

Without an on_token callback a generation runs in the C++ loop (Engine.run), back in Python every 0.5 s only
to adapt the thread count to the machine's load; with one, each step returns its tokens to Python.

Continuous batching (a server) drives the row interface of its own Engine instance:

    engine = Engine(model, max_rows=8)
    row = engine.add_row(args)            # validated; a failed call leaves the engine unchanged
    for row, tokens in engine.step():     # prefills new rows, then one round for every unfinished row
        ...                               # engine.finish_reason(row) is set once a row is done
    result = engine.result(row); engine.remove_row(row)   # frees the row's cache slot at once

Rows may differ in every argument (strategy, exit layer, draft length, sampling, seed, stop ids, limits); a step
groups rows by (strategy, exit_layer, num_speculations) and runs each group batched. Row i of a batch yields
exactly the tokens it would alone.

Concurrency: an Engine runs one call at a time. Its methods hold a lock, so calls from several threads are
serialized (two threads calling `layerskip_ext.generate` on one model each get correct results, one after
the other). A call made from inside an `on_token` callback of a running call on the same engine (the same
thread) cannot wait for the lock: it raises RuntimeError instead of corrupting the running generation.
The engine copies the weights it fuses when it is built: after changing the model's weights, build a new one
(`get_engine(model, rebuild=True)`).
"""
from __future__ import annotations

import contextlib
import mmap
import os
import threading
import time
import weakref

import torch

from .errors import LayerSkipError
from .generation import GenerationArgs, GenerationResult, GenerationStats
from .quant import PackedWeight
from .reference import rope_cos_sin_cache
from .sampling import seed_as_int64
from .validation import as_int, check_int

try:
    from . import _C  # noqa: F401  (registers the ops and the Engine class)

    _IMPORT_ERROR: ImportError | None = None
except ImportError as e:  # the extension is not built
    _IMPORT_ERROR = e

WEIGHT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}
PACKED = "packed"  # weight_dtype that keeps a model's packed GGUF blocks (load(weights="q4_1"), a GGUF file)


def default_threads() -> int:
    """The engine's thread cap: LAYERSKIP_THREADS when set (0: torch's thread count), else 0; in that default
    the engine drops to one thread while other processes fill every core (Engine._adapt_threads)."""
    value = os.environ.get("LAYERSKIP_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) > 4096:
            raise ValueError(f"LAYERSKIP_THREADS must be an integer in [0, 4096], got {value!r}")
        return int(value)
    return 0


def _own_running_threads() -> int:
    """This process's threads in state R (running or runnable), at least 1: the calling thread."""
    running = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # the thread ended
            continue
        running += stat[stat.rindex(b")") + 2:][:1] == b"R"
    return max(running, 1)


def _runnable_others() -> float:
    """Other processes' runnable threads now, machine-wide: /proc/stat procs_running (least of three reads) less
    this process's own runnable threads."""
    others = []
    for _ in range(3):
        with open("/proc/stat", "rb") as f:
            line = next(ln for ln in f if ln.startswith(b"procs_running"))
        others.append(int(line.split()[1]) - _own_running_threads())
    return float(max(min(others), 0))


def _cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the machine has been busy, CPU seconds this process has used), since boot / its start."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat", "rb") as f:
        fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
    busy = sum(int(fields[i]) for i in (1, 2, 3, 6, 7, 8))  # all but idle and iowait
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    own = stat[stat.rindex(b")") + 2:].split()  # from field 3 (state): utime and stime are fields 14 and 15
    return busy / tick, (int(own[11]) + int(own[12])) / tick


_AVERAGE_WINDOW_MAX = 1.5  # seconds: an older previous reading is a pause, answered by a fresh snapshot
_last_sample: dict = {}  # the previous free_cores reading: time, busy and own CPU seconds, result


def free_cores() -> int | None:
    """Cores of this process's affinity mask that other processes leave free: the CPU time the rest of the machine
    used since the previous call (0.2-1.5 s earlier: a generation checks every 0.5 s), in cores, or on a first call
    and after a pause its runnable threads now (an average over a pause would count what ran while we were idle: a
    benchmark's other program between two of our generations took a core away from the next one); counted on our
    share of the machine's CPUs (a container pinned to 2 of 64 CPUs sees the whole host). An average over the
    interval, not a snapshot: a process that is runnable now and then (a client parsing streamed replies) does not
    take a core away. None when it cannot tell (not Linux)."""
    try:
        cores = len(os.sched_getaffinity(0))
        share = cores / max(os.cpu_count() or cores, cores)
        now = time.monotonic()
        busy, own = _cpu_seconds()
        last = dict(_last_sample)
        elapsed = now - last["time"] if last else None
        if elapsed is not None and elapsed < 0.2:
            return last["free"]
        if elapsed is not None and elapsed <= _AVERAGE_WINDOW_MAX:
            others = max((busy - last["busy"]) - (own - last["own"]), 0.0) / elapsed  # cores' worth
        else:
            others = _runnable_others()
        free = max(cores - round(others * share), 0)
        _last_sample.update(time=now, busy=busy, own=own, free=free)
        return free
    except (OSError, StopIteration, ValueError, AttributeError, IndexError):
        return None


def release_file_pages(model) -> int:
    """Drops from this process the pages of the GGUF files whose blocks the engine has copied (interleaved, see
    csrc/cpu/quant_interleave.h): after building an engine they are ~the file's size of resident memory that
    nothing reads. madvise(MADV_DONTNEED) on a read-only file mapping is always safe: a later read (the
    reference module, another engine) faults the pages back in from the page cache. Not done with
    LAYERSKIP_QUANT_INTERLEAVE=0, where the engine computes on the mapped blocks. -> maps released."""
    if os.environ.get("LAYERSKIP_QUANT_INTERLEAVE") == "0":
        return 0
    maps = {id(w.file_map): w.file_map for w in model.weights.values()
            if isinstance(w, PackedWeight) and w.file_map is not None}
    released = 0
    for m in maps.values():
        try:
            m.madvise(mmap.MADV_DONTNEED)
            released += 1
        except (AttributeError, OSError, ValueError):  # no madvise on this platform, or a closed map
            pass
    return released


_RUN_SLICE_S = 0.5  # seconds Engine.run steps before generate() looks at the machine's load again
_INITIAL_CAPACITY = 512  # KV positions per row allocated up front; the engine grows them when a row needs more


def is_available() -> bool:
    """True when the C++ extension is built and importable."""
    return _IMPORT_ERROR is None


def weight_tensors(module) -> dict[str, torch.Tensor]:
    """A ReferenceLlama's weights by their Hugging Face names; a tied LM head is left out (the engine reuses
    the embedding)."""
    tied = module.lm_head.weight is module.model.embed_tokens.weight
    return {name: p.detach() for name, p in module.named_parameters()
            if not (tied and name == "lm_head.weight")}


# Matrices the engine fuses into one: their blocks must share a format.
_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def packed_weight_tensors(model) -> tuple[dict[str, torch.Tensor], dict[str, int], str]:
    """A model with packed weights -> (tensors by HF name, GGUF format by name of the packed ones, the dtype
    name of the float matrices).

    Packed matrices go as their uint8 blocks [N, row bytes], never widened. A fused group (q|k|v, gate|up) that
    mixes formats (some GGUF files do: Q4_K_M keeps some v / down in Q6_K) goes dequantized. Float matrices
    (K-quants loaded as bfloat16) go in bfloat16 when any is bfloat16, else float32."""
    w = model.weights
    mixed = set()
    for i in range(model.config.num_layers):
        for group in _FUSED:
            names = [f"model.layers.{i}.{m}.weight" for m in group]
            if len({getattr(w[n], "fmt", "float") for n in names}) > 1:
                mixed.update(names)
    tensors, formats = {}, {}
    for name, t in w.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if isinstance(t, PackedWeight) and name not in mixed:
            tensors[name], formats[name] = t.data, t.format_id
        else:
            tensors[name] = (t.dequantize() if isinstance(t, PackedWeight) else t).detach()
    bf16 = any(t.dtype == torch.bfloat16 for n, t in tensors.items() if n not in formats and t.dim() == 2)
    return tensors, formats, "bfloat16" if bf16 else "float32"


def check_weight_dtype(model, weight_dtype) -> None:
    """LayerSkipError unless weight_dtype is torch.float32, torch.bfloat16, or "packed" for a model with packed
    weights (generate checks it whatever the backend, so a typo never passes unnoticed)."""
    packed = isinstance(weight_dtype, str) and weight_dtype == PACKED
    if not packed and not (isinstance(weight_dtype, torch.dtype) and weight_dtype in WEIGHT_DTYPES):
        raise LayerSkipError(f"weight_dtype must be torch.float32, torch.bfloat16 or 'packed', got {weight_dtype!r}")
    if packed and not model.packed_formats:
        raise LayerSkipError("weight_dtype 'packed' needs a model with packed weights (a Q8_0 / Q4_0 / Q4_1 GGUF, "
                             "or load(..., weights='q8_0'))")


class Engine:
    """A model's weights and batched decoding state in the C++ engine (one call at a time, see the module doc)."""

    def __init__(self, model, weight_dtype: torch.dtype | str = torch.float32, capacity: int | None = None,
                 max_rows: int = 1):
        """weight_dtype: torch.float32 / torch.bfloat16 (every matmul weight in that dtype; packed ones
        dequantized through the reference module), or "packed" (a model's packed blocks as they are)."""
        if _IMPORT_ERROR is not None:
            raise RuntimeError(f"the layerskip_ext C++ extension is not built: {_IMPORT_ERROR}")
        check_weight_dtype(model, weight_dtype)
        c = model.config
        max_rows = check_int("max_rows", max_rows, 1, 4096)
        if capacity is None:
            capacity = min(_INITIAL_CAPACITY, c.max_position_embeddings)
        capacity = check_int("capacity", capacity, 1, c.max_position_embeddings)  # positions per row
        # [P, D] float32 cos | sin for the first P >= capacity positions, not max_position_embeddings of them:
        # _add grows it when a row's context reaches further
        table = rope_cos_sin_cache(c, capacity)
        self.model, self.weight_dtype = model, weight_dtype
        self.last_profile: dict[str, float] = {}
        self._lock = threading.Lock()
        self._owner: int | None = None  # thread running a call
        self._row_interface = False  # add_row was called: rows outside generate_batch may be the caller's
        self._forked_while_busy = False  # set in a forked child when the parent was running a call (_after_fork)
        _LIVE_ENGINES.add(self)
        self._draft_vocab: tuple[int, ...] | None = None  # token ids of the engine's reduced draft head
        config = dict(num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_heads,
                      num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, intermediate_size=c.intermediate_size,
                      vocab_size=c.vocab_size, max_rows=max_rows, capacity=capacity,
                      max_positions=c.max_position_embeddings)
        with torch.no_grad():
            if weight_dtype == PACKED:
                tensors, formats, dtype_name = packed_weight_tensors(model)
            else:
                tensors, formats, dtype_name = weight_tensors(model.module), {}, WEIGHT_DTYPES[weight_dtype]
            self._engine = torch.classes.layerskip.Engine(config, float(c.rms_norm_eps), table, tensors, formats,
                                                          dtype_name)
            if weight_dtype == PACKED:
                release_file_pages(model)
        self._threads = default_threads()
        self._auto_threads = not os.environ.get("LAYERSKIP_THREADS", "").strip()  # adapt to contention
        self._threads_checked = 0.0  # time.monotonic() of the last contention check
        self._engine.set_threads(self._threads)

    @property
    def threads(self) -> int:
        """Threads the engine's CPU ops may use (0: torch's thread count; see default_threads)."""
        return self._engine.threads()

    @threads.setter
    def threads(self, value: int) -> None:
        """Fixes the thread cap (no more adapting to contention)."""
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096:
            raise ValueError(f"threads must be an integer in [0, 4096] (0: torch's thread count), got {value!r}")
        with self._exclusive() as e:
            self._threads, self._auto_threads = value, False
            e.set_threads(value)

    def leave_cores(self, n: int) -> None:
        """In the automatic mode, use at most this machine's cores less n (at least one thread). The server does so
        (n = 1, a core for its HTTP event loop) only when the CPU ops run on OpenMP (LAYERSKIP_WORK_POOL=0): an
        OpenMP team that shares the cores with the event loop waits for a descheduled worker in every parallel
        region (benchmarks/results_serve.md: SmolLM2 Q4_1 on 2 cores, one client, 10.2 ms/token with 2 threads,
        5.9 with 1). A fixed thread count (LAYERSKIP_THREADS, --threads, the `threads` setter) is left as it is."""
        if not self._auto_threads:
            return
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        most = max(1, min(cores, torch.get_num_threads()) - n)
        with self._exclusive() as e:
            self._threads = most
            e.set_threads(most)

    def _adapt_threads(self, e) -> None:
        """In the default (automatic) mode, at most every 0.5 s: as many threads as there are free cores (at least
        one, at most the default cap). A worker on a core that another process keeps busy gets a slice of it and
        stalls every parallel region of a step (benchmarks/results_contention.md)."""
        if not self._auto_threads or self._threads == 1:
            return
        now = time.monotonic()
        if now - self._threads_checked < 0.5:
            return
        self._threads_checked = now
        free = free_cores()
        wanted = self._threads or torch.get_num_threads()
        e.set_threads(self._threads if free is None or free >= wanted else max(free, 1))

    @contextlib.contextmanager
    def _exclusive(self):
        """Holds the engine for one call: waits for other threads, refuses re-entry from a callback."""
        if self._owner == threading.get_ident():
            raise RuntimeError("this model's engine is already running a generation on this thread: generate() "
                               "(or another engine call) was made from inside an on_token callback; collect the "
                               "tokens and call it after the running generation returns")
        if self._forked_while_busy:
            raise RuntimeError("this engine was running a generation in the parent process when the process forked: "
                               "its state is not usable here; use a new model (or layerskip_ext.generate, which "
                               "builds a new engine)")
        with self._lock:
            try:
                self._owner = threading.get_ident()
                yield self._engine
            finally:
                self._owner = None

    def set_cuda_graphs(self, enabled: bool) -> None:
        """On a CUDA device, decode steps and uniform speculative rounds replay captured CUDA graphs (default on;
        LAYERSKIP_CUDA_GRAPHS=0 turns them off); False runs every step eagerly. Drops captured graphs."""
        with self._exclusive() as e:
            e.set_cuda_graphs(bool(enabled))

    @property
    def graph_replays(self) -> int:
        """Steps and rounds run from a captured CUDA graph since the graphs were last reset."""
        return self._engine.graph_replays()

    @property
    def capacity(self) -> int:
        """KV-cache positions per row currently allocated."""
        return self._engine.capacity()

    @property
    def rope_positions(self) -> int:
        """Positions the engine's rotary table covers (grown as rows reach further; at most
        max_position_embeddings)."""
        return self._engine.rope_positions()

    @property
    def weight_bytes_per_token(self) -> int:
        """Bytes of weights one full decode step reads (all layers, final norm, LM head, one embedding row)."""
        return self._engine.weight_bytes_per_token()

    def weight_read_bandwidth(self, reps: int = 5) -> float:
        """GB/s of a plain read of the weights one decode step reads, from the engine's own pages on its threads
        (median of `reps` reads): the memory roofline of this engine where its weights live (a fresh buffer may
        sit in faster or slower memory: benchmarks/results_llamacpp.md). CPU engines only."""
        with self._exclusive() as e:
            return e.weight_bytes_per_token() / e.weight_read_seconds(int(reps)) / 1e9

    # ---------------------------------------------------------------------------------------------------------
    # Row interface (continuous batching)

    def add_row(self, args: GenerationArgs) -> int:
        """Adds a row with validated arguments (generation.check_generation_args); returns its id.
        Prefilled by the next step(). Raises without changing the engine if an argument is invalid."""
        if not isinstance(args, GenerationArgs):
            raise TypeError(f"add_row needs the GenerationArgs of check_generation_args, got {type(args).__name__}")
        with self._exclusive() as e:
            self._row_interface = True
            self._use_draft_vocab(e, args)
            return self._add(e, args)

    def _add(self, e, args: GenerationArgs) -> int:
        device = self.model.device
        spec = args.strategy == "self_speculative"
        # a row never outgrows its context: a larger max_new_tokens (even >= 2**63) ends at the context limit
        max_new_tokens = min(args.max_new_tokens, args.context_length)
        self._grow_rope_table(e, _positions_reached(args, max_new_tokens))
        row = e.add_row(torch.tensor(args.prompt_ids, dtype=torch.int64, device=device), args.strategy,
                        args.exit_layer, args.num_speculations if spec else 1, max_new_tokens, args.temperature,
                        args.top_k, args.top_p, seed_as_int64(args.seed),
                        torch.tensor(args.stop_token_ids, dtype=torch.int64), args.context_length)
        if spec:  # the drafting policy (draft_policy.h); a failure leaves the engine without the row
            try:
                e.set_row_policy(row, args.draft_threshold, args.adaptive, args.probe_interval,
                                 args.draft_vocab is not None)
            except Exception:
                e.remove_row(row)
                raise
        return row

    def _reserve_cache(self, e, args_list: list[GenerationArgs]) -> None:
        """Grows the KV cache once for every row of a batch (adding rows one by one past the allocated ones copied
        the whole cache at each: quadratic in the rows), after checking that the memory exists: a LayerSkipError
        naming the sizes instead of a process killed for memory."""
        if not args_list:
            return
        rows = max(len(args_list), e.max_rows())
        positions = max(max(_positions_reached(a, min(a.max_new_tokens, a.context_length)) for a in args_list),
                        e.capacity())
        held, need = e.cache_bytes(), e.cache_bytes_for(rows, positions)
        available = available_memory(self.model.device)
        if need > held and available is not None and need - held > 0.9 * available:
            gib = 1 << 30
            raise LayerSkipError(f"the KV cache for {len(args_list)} rows of up to {positions} positions needs "
                                 f"{need / gib:.1f} GiB, more than the {available / gib:.1f} GiB of memory available: "
                                 "generate fewer prompts at once, or lower max_new_tokens / context_length")
        e.reserve(rows, positions)

    def _grow_rope_table(self, e, positions: int) -> None:
        """Makes the engine's rotary table cover `positions` positions (the model's cached table, grown by
        doubling: a few rebuilds over a model's life, never more than the contexts used)."""
        if positions > e.rope_positions():
            limit = self.model.config.max_position_embeddings
            doubled = min(max(positions, 2 * e.rope_positions()), limit)
            if positions > limit:
                raise LayerSkipError(f"positions up to {positions} exceed max_position_embeddings ({limit})")
            e.set_rope_table(rope_cos_sin_cache(self.model.config, doubled))

    def _use_draft_vocab(self, e, args: GenerationArgs) -> None:
        """Makes args.draft_vocab the engine's reduced draft head (one per engine while it holds rows)."""
        if args.strategy != "self_speculative" or args.draft_vocab is None or args.draft_vocab == self._draft_vocab:
            return
        if len(e.row_ids()) != 0:
            raise LayerSkipError("every row of an engine drafting with a reduced head must use the same draft "
                             "vocabulary (draft_vocab_size)")
        e.set_draft_vocab(torch.tensor(args.draft_vocab, dtype=torch.int64))
        self._draft_vocab = args.draft_vocab

    def step(self) -> list[tuple[int, list[int]]]:
        """One step over every unfinished row: [(row id, new tokens in order)] for the rows that produced some."""
        with self._exclusive() as e:
            self._adapt_threads(e)
            return _group(e.step())

    def remove_row(self, row: int) -> None:
        """Releases a row (finished or not) and its cache slot."""
        row = _row_id(row)
        with self._exclusive() as e:
            e.remove_row(row)

    def finish_reason(self, row: int) -> str | None:
        """None while the row runs, else "stop" | "length" | "context" | "error"."""
        return self._engine.finish_reason(_row_id(row)) or None

    def result(self, row: int, args: GenerationArgs) -> GenerationResult:
        """The row's tokens, text, statistics and finish reason so far."""
        row = _row_id(row)
        e = self._engine
        tokens = e.tokens(row).tolist()
        s = e.stats(row)
        spec = args.strategy == "self_speculative"
        stats = GenerationStats(args.strategy, None if args.strategy == "autoregressive" else args.exit_layer,
                                args.num_speculations if spec else None, prompt_tokens=len(args.prompt_ids),
                                new_tokens=len(tokens), drafted=int(s["drafted"]), accepted=int(s["accepted"]),
                                rounds=int(s["rounds"]), prefill_time_s=s["prefill_time_s"],
                                decode_time_s=s["decode_time_s"])
        reason = e.finish_reason(row) or "length"
        return GenerationResult(tokens, self.model.decode(tokens), stats, reason, list(args.prompt_ids))

    # ---------------------------------------------------------------------------------------------------------
    # Whole generations

    def generate(self, args: GenerationArgs, on_token=None, profile: bool = False) -> GenerationResult:
        """Runs one generation with validated arguments (generation.check_generation_args).

        on_token(token) is called with each accepted token, in order. profile: time the decode phase (not the
        prefill) per category into `self.last_profile` (seconds: embed, attention, mlp, lm_head, sampling,
        accept)."""
        callback = None if on_token is None else (lambda row, token: on_token(token))
        return self.generate_batch([args], on_token=callback, profile=profile)[0]

    def generate_batch(self, args_list: list[GenerationArgs], on_token=None,
                       profile: bool = False) -> list[GenerationResult]:
        """Runs one generation per row in batched steps; on_token(row index, token), which may return True to end
        that row there (the rest of its round is dropped; finish reason "stop"). The engine must hold no
        other rows (a server's engine is its own instance). Raises RuntimeError naming the row if a row's logits
        become non-finite; the engine is left empty and usable whatever happens."""
        with self._exclusive() as e:
            if len(e.row_ids()) != 0:
                if self._row_interface:
                    raise RuntimeError("generate() needs an engine with no rows of its own; this one holds rows "
                                       "added with add_row (use a separate Engine for the row interface)")
                for row in e.row_ids():  # left by a generate whose clean-up a KeyboardInterrupt cut short
                    e.remove_row(row)
            vocabs = {a.draft_vocab for a in args_list if a.strategy == "self_speculative"} - {None}
            if len(vocabs) > 1:
                raise LayerSkipError("the rows of a batch must draft with one reduced head (one draft_vocab_size)")
            for args in args_list:
                self._use_draft_vocab(e, args)
            self._reserve_cache(e, args_list)
            ids: list[int] = []
            try:
                for args in args_list:
                    ids.append(self._add(e, args))
                index = {row: i for i, row in enumerate(ids)}
                if profile:
                    e.step()  # the prefills
                    e.reset_profile()
                    e.set_profiling(True)
                seen = [0] * len(ids)  # tokens passed to on_token, per row
                stopped: dict[int, GenerationResult] = {}  # row index -> result, rows whose on_token ended them
                while e.has_unfinished():
                    self._adapt_threads(e)
                    if on_token is None:  # the engine steps on its own, back here every 0.5 s to adapt threads
                        e.run(_RUN_SLICE_S)
                        continue
                    pairs = e.step()  # a callback sees every step's tokens
                    for row, token in pairs.tolist():
                        i = index[row]
                        if i in stopped:
                            continue
                        seen[i] += 1
                        if on_token(i, token):  # the caller stops this row here (a stop string)
                            r = self.result(row, args_list[i])
                            r.tokens, r.finish_reason, r.stats.new_tokens = r.tokens[:seen[i]], "stop", seen[i]
                            r.text = self.model.decode(r.tokens)  # the rest of its last round is dropped
                            stopped[i] = r
                            e.remove_row(row)  # its slot and compute are freed at once
                if profile:
                    e.set_profiling(False)
                    self.last_profile = dict(e.profile())
                results = [stopped[i] if i in stopped else self.result(row, args)
                           for i, (row, args) in enumerate(zip(ids, args_list))]
                for i, row in enumerate(ids):
                    if results[i].finish_reason == "error":
                        raise RuntimeError(f"generation of row {i} failed: {e.error(row)} (the model produced "
                                           "NaN or infinite logits)")
                return results
            finally:
                e.set_profiling(False)
                for row in e.row_ids():
                    e.remove_row(row)
                if e.cache_bytes() > _KEEP_CACHE_BYTES:  # a large batch or long rows: give the memory back
                    e.release_cache()


def _row_id(row) -> int:
    """A row id as an int (ids come from add_row: integers in int64), or LayerSkipError; bools are refused."""
    value = as_int(row)
    if value is None or not -(1 << 63) <= value < (1 << 63):
        raise LayerSkipError(f"row must be a row id from add_row, got {row!r}")
    return value


def _positions_reached(args: GenerationArgs, max_new_tokens: int) -> int:
    """Cache positions a row may use: the prompt, the new tokens and one verify block past the last one, within
    the context (the engine's row capacity, engine.cpp add_row)."""
    prompt = len(args.prompt_ids)
    if max_new_tokens >= args.context_length - prompt:
        return args.context_length
    drafts = args.num_speculations if args.strategy == "self_speculative" else 0
    return min(args.context_length, prompt + max_new_tokens + drafts + 1)


def _group(pairs: torch.Tensor) -> list[tuple[int, list[int]]]:
    """[n, 2] (row, token) pairs -> [(row, [tokens])] in order of first appearance."""
    out: dict[int, list[int]] = {}
    for row, token in pairs.tolist():
        out.setdefault(row, []).append(token)
    return list(out.items())


def default_weight_dtype(model) -> torch.dtype | str:
    """The model's packed blocks when it has them; bfloat16 matmul weights for a bfloat16 model or one loaded
    with weights="bf16" (nothing is lost), float32 otherwise."""
    if model.packed_formats:
        return PACKED
    bf16 = model.dtype == torch.bfloat16 or getattr(model, "weight_mode", None) == "bf16"
    return torch.bfloat16 if bf16 else torch.float32


_KEEP_CACHE_BYTES = 512 << 20  # a KV cache larger than this is freed when a generate() ends (one SmolLM2 row
# of the whole 8192-position context, 377 MiB, stays)


def available_memory(device: torch.device) -> int | None:
    """Bytes a new allocation may take on `device`: free CUDA memory, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_ENGINES_LOCK = threading.Lock()
_LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """In a forked child only the forking thread exists: a lock another thread held at the fork stays held for
    ever. Every lock gets a fresh copy; an engine that was running a call (its C++ state mid-step) is dropped from
    its model's cache, so that generate() builds a new one, and refuses further calls with an error; and torch
    ops run on one thread (as torch's DataLoader workers do), since the parent's OpenMP team may have been busy."""
    global _ENGINES_LOCK
    _ENGINES_LOCK = threading.Lock()
    busy = False
    for engine in list(_LIVE_ENGINES):
        if engine._lock.locked():
            busy = engine._forked_while_busy = True
            cache = getattr(engine.model, "_engine", None)
            if isinstance(cache, dict):
                engine.model._engine = {k: v for k, v in cache.items() if v is not engine}
        engine._lock = threading.Lock()
        engine._owner = None
    if busy:  # the parent may have been inside an OpenMP region of torch's: its team cannot be used here
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_after_fork_in_child)


def running_on_this_thread(model) -> bool:
    """Whether one of the model's engines is running a call on the calling thread (we are inside its on_token)."""
    engines = model._engine if isinstance(getattr(model, "_engine", None), dict) else {}
    return any(e._owner == threading.get_ident() for e in list(engines.values()))


def get_engine(model, weight_dtype: torch.dtype | str | None = None, rebuild: bool = False) -> Engine:
    """The model's Engine for `weight_dtype`, built on first use and cached on the model (model._engine)."""
    weight_dtype = default_weight_dtype(model) if weight_dtype is None else weight_dtype
    with _ENGINES_LOCK:  # two threads must not build two engines for one model
        if not isinstance(model._engine, dict):
            model._engine = {}
        if rebuild or weight_dtype not in model._engine:
            model._engine[weight_dtype] = Engine(model, weight_dtype)
        return model._engine[weight_dtype]
