"""`stream()`: a generation as an iterator of text pieces, as the tokens are accepted.

    for piece in layerskip_ext.stream(model, "Once upon a time", max_new_tokens=64, stop=["\\n\\n"]):
        print(piece, end="", flush=True)

The generation runs in a worker thread (the decoder loop calls back per accepted token); pieces come out
through a queue. Their concatenation is the final text (`it.result.text` once exhausted); no piece ends in a
broken UTF-8 character or in text that could still turn into a stop string (see stopping.TextStream).
Leaving the loop early (break, close(), or dropping the iterator) ends the generation at its next token.
"""
from __future__ import annotations

import queue
import threading

from .errors import LayerSkipError
from .stopping import TextStream, check_stop

_DONE = object()


class TextIterator:
    """Iterator over the text pieces of one generation; `.result` is the GenerationResult once it ends."""

    def __init__(self, model, prompt, stop=None, **generate_kwargs):
        from .api import generate
        if "on_token" in generate_kwargs:
            raise LayerSkipError("stream() does its own on_token; use generate() for a token callback")
        from .api import _is_prompt_list
        if _is_prompt_list(prompt) and len(prompt) > 0:
            raise LayerSkipError("stream() takes one prompt (a string or a list of token ids), got a list of "
                                 f"{len(prompt)} prompts; stream each, or use generate() for a batch")
        self._text = TextStream(model.decode, check_stop(stop))
        self._queue: queue.Queue = queue.Queue()
        self._cancel = threading.Event()
        self.result = None
        self._error: BaseException | None = None

        def on_token(token: int) -> bool:
            piece = self._text.push(token)
            if piece:
                self._queue.put(piece)
            return self._text.stopped or self._cancel.is_set()

        def run() -> None:
            try:
                result = generate(model, prompt, on_token=on_token, **generate_kwargs)
                tail = self._text.finish()
                if tail:
                    self._queue.put(tail)
                result.text = self._text.text
                self.result = result
            except BaseException as e:  # handed to the consumer, raised by __next__
                self._error = e
            self._queue.put(_DONE)

        self._thread = threading.Thread(target=run, name="layerskip-stream", daemon=True)
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._thread is None:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self._thread.join()
            self._thread = None
            if self._error is not None:
                raise self._error
            raise StopIteration
        return item

    def close(self) -> None:
        """Ends the generation at its next token and waits for the worker."""
        self._cancel.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __del__(self):
        cancel = getattr(self, "_cancel", None)  # absent when __init__ raised on a bad argument
        if cancel is not None:
            cancel.set()


def stream(model, prompt, stop=None, **generate_kwargs) -> TextIterator:
    """Text pieces of `generate(model, prompt, **generate_kwargs)` as they are accepted, ending at `stop`."""
    return TextIterator(model, prompt, stop=stop, **generate_kwargs)
