"""Chat templates: a model's own Jinja template rendered in a sandbox, and `chat()` on top of `generate()`.

    model = layerskip_ext.load()
    prompt = layerskip_ext.apply_chat_template(model, [{"role": "user", "content": "Hi"}])
    result = layerskip_ext.chat(model, [{"role": "user", "content": "Hi"}], max_new_tokens=64)

The template comes from `chat_template` in the checkpoint directory's tokenizer_config.json (or a
chat_template.jinja file beside it), or from `tokenizer.chat_template` in a GGUF file's metadata. It renders
as transformers renders it: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the
loop-controls extension, a `tojson` that does not escape HTML, `raise_exception` and `strftime_now`, and the
tokenizer's special tokens (bos_token, eos_token, ...) as variables.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

from .errors import CheckpointError, LayerSkipError
from .validation import check_unicode

ROLES_REQUIRED = ("role", "content")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template and the special-token strings it may refer to."""
    source: str
    special_tokens: dict = field(default_factory=dict)  # e.g. {"bos_token": "<|begin_of_text|>"}

    def render(self, messages, add_generation_prompt: bool = True, **variables) -> str:
        """The conversation as the model's prompt text (ends with the assistant header when add_generation_prompt)."""
        import jinja2
        messages = check_messages(messages)
        if not isinstance(add_generation_prompt, bool):  # "no" would be true in the template
            raise LayerSkipError(f"add_generation_prompt must be True or False, got {add_generation_prompt!r}")
        context = dict(self.special_tokens)
        context.update(variables)
        context["range"] = _budgeted_range()  # loops in all, not one range at a time: nested loops hung
        try:
            return _compile(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **context)
        except jinja2.TemplateError as e:
            raise LayerSkipError(f"the chat template failed to render: {e}") from None
        except Exception as e:  # the template's own expressions: 1/0, 'a' + 1, the sandbox's range limit, recursion
            raise LayerSkipError(f"the chat template failed to render: {type(e).__name__}: {e}") from None


def check_messages(messages) -> list[dict]:
    """Validates an OpenAI-style message list; returns plain dicts (text-part lists joined into one string)."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise LayerSkipError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise LayerSkipError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise LayerSkipError(f"messages[{i}] has no 'role' string")
        # keys set to None are dropped, as transformers' apply_chat_template does (OpenAI clients send
        # content / tool_calls / name as null): templates test for a missing key, and would print "None"
        m = {key: value for key, value in m.items() if value is not None}
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # an assistant turn without text (beside tool calls)
            out.append(m)
            continue
        if isinstance(content, list):  # OpenAI content parts: only text parts are supported
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise LayerSkipError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                     f"are supported, got {part!r}")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise LayerSkipError(f"messages[{i}] has no 'content' string")
        check_unicode(content, f"messages[{i}].content")
        out.append({**m, "content": content})
    return out


RANGE_BUDGET = 1_000_000  # range() items one rendering may create in all
SEQUENCE_LIMIT = 1_000_000  # items (characters) a product like 'a' * n may have


def _budgeted_range():
    """A range() for one rendering that fails once its ranges hold more than RANGE_BUDGET items together (the
    sandbox caps each range at 100000, so two nested loops of 100000 ran for hours)."""
    left = [RANGE_BUDGET]

    def budgeted_range(*args):
        r = range(*args)
        left[0] -= len(r)
        if left[0] < 0:
            raise OverflowError(f"the template's range() loops exceed {RANGE_BUDGET} items in all")
        return r
    return budgeted_range


@lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled once per source text, in transformers' sandboxed environment."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Environment(ImmutableSandboxedEnvironment):
        """Also bounds 'a' * n and n ** m ('a' * 10**10 tried to allocate 10 GB)."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > SEQUENCE_LIMIT:
                        raise OverflowError(f"a repeated sequence of {len(seq) * n} items (at most {SEQUENCE_LIMIT})")
            if operator == "**" and isinstance(right, int) and abs(right) > 1024:
                raise OverflowError(f"an exponent of {right} (at most 1024)")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise LayerSkipError(f"the chat template is not valid Jinja: {e}") from None


# ----------------------------------------------------------------------------------------------
# finding a checkpoint's template


def _token_string(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _from_hf_directory(path: str) -> ChatTemplate | None:
    config_path = os.path.join(path, "tokenizer_config.json")
    config = {}
    if os.path.isfile(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{config_path} is not valid JSON: {e}", path=config_path) from None
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if source is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            source = f.read()
    if not isinstance(source, str):
        return None
    tokens = {k: _token_string(config.get(k)) for k in _SPECIAL_TOKEN_KEYS}
    return ChatTemplate(source, {k: v for k, v in tokens.items() if v is not None})


def _from_gguf(path: str) -> ChatTemplate | None:
    from .gguf_read import GGUFFile
    try:  # the reader load() uses: a file it refuses (duplicate tensors, ...) is refused here alike
        fields = GGUFFile(path).fields
    except Exception as e:
        raise CheckpointError(f"cannot read the chat template of {path}: {type(e).__name__}: {e}", path) from None
    source = fields.get("tokenizer.chat_template")
    if not isinstance(source, str):
        return None
    vocab = fields.get("tokenizer.ggml.tokens") or []
    tokens = {}
    for key in _SPECIAL_TOKEN_KEYS:
        gguf_key = "padding" if key == "pad_token" else key.split("_")[0]  # bos, eos, unk, padding
        name = f"tokenizer.ggml.{gguf_key}_token_id"
        token_id = fields.get(name)
        if token_id is None:
            continue
        if isinstance(token_id, bool) or not isinstance(token_id, int):  # "abc" or 1.5: not an id
            raise CheckpointError(f"{path}: {name} must be an integer token id, got {token_id!r}", path, name)
        if 0 <= token_id < len(vocab) and isinstance(vocab[token_id], str):
            tokens[key] = vocab[token_id]
    return ChatTemplate(source, tokens)


def find_chat_template(path) -> ChatTemplate | None:
    """The chat template stored with a checkpoint (HF directory or .gguf; None: the default model), or None."""
    from .checkpoint import default_model_path
    path = default_model_path() if path is None else os.fspath(path)
    if os.path.isdir(path):
        return _from_hf_directory(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        return _from_gguf(path)
    return None


def get_chat_template(model, chat_template: str | None = None) -> ChatTemplate:
    """`chat_template` (Jinja source) if given, else the model's own, read once and cached on the model.

    Raises LayerSkipError when the model has none."""
    if chat_template is not None:
        if not isinstance(chat_template, str) or not chat_template.strip():
            raise LayerSkipError("chat_template must be a non-empty Jinja template string")
        own = _cached_lookup(model)  # its special tokens still apply
        return ChatTemplate(chat_template, own.special_tokens if own else {})
    template = _cached_lookup(model)
    if template is None:
        where = model.path or "the default model"
        raise LayerSkipError(f"{where} has no chat template (no 'chat_template' in tokenizer_config.json or GGUF "
                         f"'tokenizer.chat_template'): pass chat_template=... (a Jinja string) or use a plain prompt")
    return template


def _cached_lookup(model) -> ChatTemplate | None:
    if not hasattr(model, "_chat_template"):
        model._chat_template = find_chat_template(model.path)
    return model._chat_template


def apply_chat_template(model, messages, add_generation_prompt: bool = True, chat_template: str | None = None,
                        **variables) -> str:
    """The rendered prompt text for `messages` (the same string as transformers' apply_chat_template)."""
    return get_chat_template(model, chat_template).render(messages, add_generation_prompt, **variables)


def chat_prompt_ids(model, messages, chat_template: str | None = None, **variables) -> list[int]:
    """The rendered prompt as token ids; the template writes its own BOS, so the tokenizer adds none."""
    if model.tokenizer is None:
        raise LayerSkipError("this model has no tokenizer, so it cannot chat")
    text = apply_chat_template(model, messages, True, chat_template, **variables)
    return model.tokenizer.encode(text, add_special_tokens=False).ids


def chat(model, messages, chat_template: str | None = None, **generate_kwargs):
    """The assistant's reply to `messages` (OpenAI-style dicts): `generate()` on the rendered prompt.

    generate_kwargs: everything `layerskip_ext.generate` takes (max_new_tokens, strategy, stop, ...)."""
    from .api import generate
    return generate(model, chat_prompt_ids(model, messages, chat_template), **generate_kwargs)
