"""Chat templates against transformers' apply_chat_template; stop strings; text streaming."""
from __future__ import annotations

import json
import os
import shutil

import pytest

import layerskip_ext
from layerskip_ext.chat import ChatTemplate, find_chat_template
from layerskip_ext.stopping import TextStream

DEMO = os.path.join(os.path.dirname(__file__), "..", "checkpoints", "layerskip-demo")

# Meta-Llama-3-Instruct's template: BOS from the tokenizer, headers, trimmed content
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
    "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Zephyr's: one statement per line, so trim_blocks / lstrip_blocks decide the whitespace
ZEPHYR_TEMPLATE = """{% for message in messages %}
{% if message['role'] == 'user' %}
{{ '<|user|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'system' %}
{{ '<|system|>\n' + message['content'] + eos_token }}
{% elif message['role'] == 'assistant' %}
{{ '<|assistant|>\n'  + message['content'] + eos_token }}
{% endif %}
{% if loop.last and add_generation_prompt %}
{{ '<|assistant|>' }}
{% endif %}
{% endfor %}"""
# Mistral-style: alternation enforced with raise_exception
ALTERNATING_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# plain-text roles, for the demo model (its only special token is <|endoftext|>)
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello there!"}],
    "system_multi_turn": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is a lighthouse?"},
        {"role": "assistant", "content": "  A tower with a light that guides ships.  "},
        {"role": "user", "content": "Who keeps it?\nAnd why?"},
    ],
}


def write_tokenizer_dir(directory, template, bos="<s>", eos="</s>"):
    """A transformers-readable tokenizer directory (the demo tokenizer.json) with a chat template."""
    os.makedirs(directory, exist_ok=True)
    shutil.copy(os.path.join(DEMO, "tokenizer.json"), os.path.join(directory, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
              "eos_token": {"__type": "AddedToken", "content": eos, "special": True},  # the dict form
              "chat_template": template}
    with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    return str(directory)


def transformers_render(directory, messages, add_generation_prompt):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(directory)
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("name,template,bos,eos", [
    pytest.param("llama3", LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", id="llama3"),
    pytest.param("zephyr", ZEPHYR_TEMPLATE, "<s>", "</s>", id="zephyr"),
    pytest.param("plain", PLAIN_TEMPLATE, "<|endoftext|>", "<|endoftext|>", id="plain"),
])
def test_template_matches_transformers(tmp_path, name, template, bos, eos):
    from transformers import AutoTokenizer
    directory = write_tokenizer_dir(tmp_path / name, template, bos, eos)
    tok = AutoTokenizer.from_pretrained(directory)
    ours = find_chat_template(directory)
    for messages in CONVERSATIONS.values():
        for add_generation_prompt in (True, False):
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
            assert ours.render(messages, add_generation_prompt) == expected


@pytest.mark.parametrize("template", [LLAMA3_TEMPLATE, ZEPHYR_TEMPLATE, PLAIN_TEMPLATE], ids=["llama3", "zephyr", "plain"])
def test_assistant_content_none_as_transformers(tmp_path, template):
    """An assistant turn with content None (OpenAI's tool-call turns) reaches the template without the key, as in
    transformers: the same text where transformers renders it, an error naming the template where it fails (it
    rendered the word None before, and earlier still was refused)."""
    directory = write_tokenizer_dir(tmp_path / "t", template)
    messages = [{"role": "user", "content": "Hi", "name": None}, {"role": "assistant", "content": None},
                {"role": "user", "content": "Again"}]
    try:
        expected = transformers_render(directory, messages, True)
    except Exception:
        with pytest.raises(layerskip_ext.LayerSkipError, match="the chat template failed to render"):
            find_chat_template(directory).render(messages)
    else:
        assert find_chat_template(directory).render(messages) == expected


def test_raise_exception_is_a_value_error(tmp_path):
    directory = write_tokenizer_dir(tmp_path / "alt", ALTERNATING_TEMPLATE)
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert find_chat_template(directory).render(good) == transformers_render(directory, good, True)
    with pytest.raises(ValueError, match="must alternate"):
        find_chat_template(directory).render(CONVERSATIONS["system_multi_turn"])


def test_sandbox_blocks_attribute_escapes():
    evil = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception, match="unsafe|not safely|access"):
        evil.render(CONVERSATIONS["single"])


@pytest.mark.parametrize("template,error", [
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ 1 + 'a' }}", "TypeError"),
    ("{% for i in range(10**9) %}x{% endfor %}", "OverflowError"),  # the sandbox's range limit
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 'abc'.index('z') }}", "ValueError"),
    # found by a hostile-input audit: these hung or tried to allocate 10 GB
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "OverflowError"),
    ("{{ 'a' * 10**10 }}", "OverflowError"),
    ("{{ [1] * 10**10 }}", "OverflowError"),
    ("{{ 7 ** 100000000 }}", "OverflowError"),
])
def test_template_runtime_errors_are_layerskip_errors(template, error):
    """A template that fails while rendering raised the bare Python exception (ZeroDivisionError, TypeError,
    the sandbox's OverflowError, RecursionError); the documented error is LayerSkipError naming the cause."""
    with pytest.raises(layerskip_ext.LayerSkipError, match=f"the chat template failed to render: {error}"):
        ChatTemplate(template).render(CONVERSATIONS["single"])


@pytest.mark.parametrize("messages,match", [
    ([], "non-empty"), ("hi", "non-empty"), ([{"content": "x"}], "role"), ([{"role": "user"}], "content"), ([{"role": "user", "content": None}], "content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], "text parts"),
])
def test_bad_messages(messages, match):
    with pytest.raises(ValueError, match=match):
        ChatTemplate(PLAIN_TEMPLATE).render(messages)


def test_add_generation_prompt_must_be_a_bool():
    with pytest.raises(layerskip_ext.LayerSkipError, match="add_generation_prompt"):
        ChatTemplate(PLAIN_TEMPLATE).render(CONVERSATIONS["single"], add_generation_prompt="no")


def test_text_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there!"}]}]
    t = ChatTemplate(PLAIN_TEMPLATE)
    assert t.render(parts) == t.render(CONVERSATIONS["single"]) == "User: Hello there!\nAssistant:"


def test_model_without_template_errors(tmp_path):
    model = layerskip_ext.load(DEMO)  # the demo checkpoint ships no tokenizer_config.json
    with pytest.raises(ValueError, match="no chat template"):
        layerskip_ext.apply_chat_template(model, CONVERSATIONS["single"])
    # an explicit template works
    assert layerskip_ext.apply_chat_template(model, CONVERSATIONS["single"], chat_template=PLAIN_TEMPLATE) == \
        "User: Hello there!\nAssistant:"


@pytest.fixture(scope="module")
def demo_chat_dir(tmp_path_factory):
    """The demo checkpoint plus a tokenizer_config.json with PLAIN_TEMPLATE."""
    directory = tmp_path_factory.mktemp("demo_chat")
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.abspath(os.path.join(DEMO, name)), directory / name)
    return write_tokenizer_dir(directory, PLAIN_TEMPLATE, "<|endoftext|>", "<|endoftext|>")


def test_chat_equals_generate_on_transformers_prompt(demo_chat_dir):
    from transformers import AutoTokenizer
    model = layerskip_ext.load(demo_chat_dir)
    messages = CONVERSATIONS["system_multi_turn"]
    ids = AutoTokenizer.from_pretrained(demo_chat_dir).apply_chat_template(messages, tokenize=True,
                                                                           add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    expected = layerskip_ext.generate(model, list(ids), max_new_tokens=12, stop_token_ids=[])
    result = layerskip_ext.chat(model, messages, max_new_tokens=12, stop_token_ids=[])
    assert result.prompt_tokens == list(ids)
    assert result.tokens == expected.tokens and result.text == expected.text


@pytest.mark.slow
def test_smollm2_gguf_template_matches_transformers(smollm2):
    from transformers import AutoTokenizer
    from layerskip_ext.checkpoint import default_model_path
    path = default_model_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for messages in CONVERSATIONS.values():
        for add in (True, False):
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert layerskip_ext.apply_chat_template(smollm2, messages, add) == expected
    # the rendered prompt encodes to the same ids
    text = layerskip_ext.apply_chat_template(smollm2, CONVERSATIONS["system_multi_turn"])
    from layerskip_ext.chat import chat_prompt_ids
    assert chat_prompt_ids(smollm2, CONVERSATIONS["system_multi_turn"]) == \
        tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------
# stop strings and streaming


def byte_decoder(pieces):
    """decode() of a toy byte-level tokenizer: token i is the byte string pieces[i]."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def run_stream(stream, ids):
    out = []
    for t in ids:
        out.append(stream.push(t))
        if stream.stopped:
            break
    out.append(stream.finish())
    return out


def test_text_stream_holds_back_split_characters():
    text = "añb 日本 🎉!"
    data = text.encode()
    pieces = [data[i:i + 1] for i in range(len(data))]  # one byte per token: every multi-byte char is split
    out = run_stream(TextStream(byte_decoder(pieces)), range(len(pieces)))
    assert "".join(out) == text
    assert all("\ufffd" not in p for p in out)
    assert out.count("") >= 5  # the continuation bytes of ñ, 日, 本 and 🎉 (3 of them) gave nothing new


@pytest.mark.parametrize("stop,expected_text,expected_tokens", [
    (["lo wo"], "hel", 4),  # spans tokens "hel" "lo" " w" "orld"
    (["world", "lo"], "hel", 2),  # the earliest match wins
    (["xyz"], "hello world!", 6),  # never found: everything, at finish()
    (["!"], "hello world", 6),
    ("o", "hell", 2),
])
def test_text_stream_stop_strings(stop, expected_text, expected_tokens):
    pieces = [b"hel", b"lo", b" w", b"or", b"ld", b"!"]
    s = TextStream(byte_decoder(pieces), stop)
    out = run_stream(s, range(len(pieces)))
    assert "".join(out) == s.text == expected_text
    assert len(s.tokens) == expected_tokens


def test_text_stream_holds_back_a_possible_stop_prefix():
    pieces = [b"ab", b"User", b":", b"x"]
    s = TextStream(byte_decoder(pieces), ["User:"])
    assert s.push(0) == "ab" and s.push(1) == ""  # "User" could be the start of "User:"
    assert s.push(2) == "" and s.stopped and s.text == "ab"
    s = TextStream(byte_decoder([b"ab", b"Use", b"d"]), ["User:"])
    assert [s.push(0), s.push(1), s.push(2)] == ["ab", "", "Used"]


@pytest.mark.parametrize("bad", [[""], [1], 5])
def test_bad_stop(bad):
    model = layerskip_ext.load(DEMO)
    with pytest.raises(ValueError, match="stop"):
        layerskip_ext.generate(model, "It was", max_new_tokens=4, stop=bad)


@pytest.fixture(scope="module")
def demo():
    return layerskip_ext.load(DEMO)


PROMPT = "It is a truth universally acknowledged, that"


def round_ends(model, n):
    """Token counts at which the engine's greedy self-speculative rounds (E=3, d=3) end, over n tokens.

    Rounds are not visible through on_token: this replays them with the row interface, one round per step."""
    from layerskip_ext.engine import Engine
    from layerskip_ext.generation import check_generation_args
    args = check_generation_args(model.config, model.tokenizer, PROMPT, max_new_tokens=n, strategy="self_speculative",
                                 exit_layer=3, num_speculations=3, temperature=0.0, top_k=0, top_p=1.0, seed=0,
                                 stop_token_ids=[], context_length=model.config.max_position_embeddings)
    engine = Engine(model)
    row = engine.add_row(args)
    ends = [0]
    while not engine.finish_reason(row):
        for _, tokens in engine.step():
            ends.append(ends[-1] + len(tokens))
    engine.remove_row(row)
    return set(ends)


@pytest.mark.parametrize("strategy", ["autoregressive", "self_speculative"])
def test_generate_stop_strings_match_the_full_text(demo, strategy):
    kwargs = dict(max_new_tokens=40, stop_token_ids=[], strategy=strategy)
    if strategy == "self_speculative":
        kwargs.update(exit_layer=3, num_speculations=3)
    full = layerskip_ext.generate(demo, PROMPT, **kwargs)
    checked_inside_a_round = False
    ends = round_ends(demo, 40) if strategy == "self_speculative" else set()
    for k in range(2, 30, 3):
        # a stop string across the boundary of tokens k-1 and k
        before, upto = demo.decode(full.tokens[:k - 1]), demo.decode(full.tokens[:k + 1])
        stop = upto[max(0, len(before) - 2):len(before) + 2]
        if not stop.strip():
            continue
        result = layerskip_ext.generate(demo, PROMPT, stop=[stop], **kwargs)
        cut = full.text.find(stop)
        assert result.text == full.text[:cut]
        assert result.finish_reason == "stop"
        # the tokens end with the first one whose text completes the stop string
        n = next(i for i in range(1, len(full.tokens) + 1) if stop in demo.decode(full.tokens[:i]))
        assert result.tokens == full.tokens[:n]
        checked_inside_a_round |= n not in ends
    if strategy == "self_speculative":
        assert checked_inside_a_round  # some stop fell inside an accepted block, not at a round's end
    # the reference backend stops at the same token
    reference = layerskip_ext.generate(demo, PROMPT, stop=[stop], backend="reference", **kwargs)
    assert (reference.text, reference.tokens, reference.finish_reason) == (result.text, result.tokens, "stop")


def test_stream_concatenates_to_generate(demo):
    kwargs = dict(max_new_tokens=30, stop_token_ids=[], strategy="self_speculative", exit_layer=3,
                  num_speculations=2)
    full = layerskip_ext.generate(demo, PROMPT, **kwargs)
    it = layerskip_ext.stream(demo, PROMPT, **kwargs)
    pieces = list(it)
    assert len(pieces) > 3 and "".join(pieces) == full.text == it.result.text
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 3]
    it = layerskip_ext.stream(demo, PROMPT, stop=stop, **kwargs)
    assert "".join(it) == full.text[:full.text.find(stop)] == it.result.text


def test_stream_errors_and_early_close(demo):
    with pytest.raises(ValueError, match="exit_layer"):
        list(layerskip_ext.stream(demo, PROMPT, strategy="self_speculative", exit_layer=99))
    it = layerskip_ext.stream(demo, PROMPT, max_new_tokens=200, stop_token_ids=[])
    next(it)
    it.close()  # ends the generation early
    assert list(it) == []
    assert layerskip_ext.generate(demo, PROMPT, max_new_tokens=3).stats.new_tokens == 3  # the engine is usable


def test_stream_dropped_after_break_ends_the_generation(demo):
    """Leaving a for loop over stream() (no close()) drops the iterator, which ends its generation at the next token:
    its worker thread ends and the engine is free at once (the worker's closures held the iterator, so it generated
    all 3000 tokens, holding the engine, and the next generate waited for it)."""
    import threading
    import time
    import weakref
    refs = []

    def first_piece():
        it = layerskip_ext.stream(demo, PROMPT, max_new_tokens=3000, stop_token_ids=[])
        refs.append(weakref.ref(it))
        for piece in it:
            return piece

    first_piece()
    assert refs[0]() is None  # nothing but the caller held the iterator: dropped (and so cancelled) at once
    deadline = time.monotonic() + 10
    while any(t.name == "layerskip-stream" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "layerskip-stream" for t in threading.enumerate())
    assert layerskip_ext.generate(demo, PROMPT, max_new_tokens=3).stats.new_tokens == 3


def test_stream_with_block_ends_the_generation_at_a_break(demo):
    """An iterator held in a variable is not closed by a break (Python cannot tell it from a pause); a `with`
    block closes it: the generation ends at once and the engine is free."""
    import threading
    import time
    with layerskip_ext.stream(demo, PROMPT, max_new_tokens=3000, stop_token_ids=[]) as it:
        for _ in it:
            break
    assert not any(t.name == "layerskip-stream" for t in threading.enumerate())  # close() joined the worker
    start = time.monotonic()
    assert layerskip_ext.generate(demo, PROMPT, max_new_tokens=3).stats.new_tokens == 3
    assert it.result is None or it.result.stats.new_tokens < 3000
    assert time.monotonic() - start < 30


def test_stream_inside_on_token_raises_instead_of_hanging(demo):
    """stream() from an on_token callback of a running generation on the same model is refused, as generate() is
    (its worker would wait for the engine the callback's thread holds)."""
    def callback(token):
        layerskip_ext.stream(demo, "Hello", max_new_tokens=2)

    with pytest.raises(RuntimeError, match="inside an on_token callback"):
        layerskip_ext.generate(demo, PROMPT, max_new_tokens=3, on_token=callback)
    assert layerskip_ext.generate(demo, PROMPT, max_new_tokens=3).stats.new_tokens == 3


def test_stream_real_tokenizer_never_splits_a_character(demo):
    text = "Naïve café — 日本語 🎉 done"
    ids = demo.encode(text)
    assert any("\ufffd" in demo.decode(ids[:i]) for i in range(len(ids)))  # the tokenizer does split characters
    s = TextStream(demo.decode)
    pieces = [s.push(t) for t in ids] + [s.finish()]
    assert "".join(pieces) == demo.decode(ids) and all("\ufffd" not in p for p in pieces)


def test_chat_repl_streams_each_reply(demo_chat_dir, monkeypatch, capsys):
    """`layerskip-ext chat`: two turns from stdin; each printed reply is chat() on the history so far."""
    import io
    from layerskip_ext.cli import main
    monkeypatch.setattr("sys.stdin", io.StringIO("Tell me of Emma.\nAnd her sister?\n"))
    assert main(["chat", "--model", demo_chat_dir, "--strategy", "self_speculative", "--exit-layer", "3",
                 "--num-speculations", "2", "--max-new-tokens", "12", "--system", "You tell stories."]) == 0
    out = capsys.readouterr().out
    model = layerskip_ext.load(demo_chat_dir)
    history = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "Tell me of Emma."}]
    kwargs = dict(max_new_tokens=12, strategy="self_speculative", exit_layer=3, num_speculations=2, temperature=0)
    first = layerskip_ext.chat(model, history, **kwargs).text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "And her sister?"}]
    second = layerskip_ext.chat(model, history, **kwargs).text
    assert out == f"> {first}\n> {second}\n> "
