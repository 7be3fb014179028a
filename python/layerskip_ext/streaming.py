"""`stream()`: a generation as an iterator of text pieces, as the tokens are accepted.

    for piece in layerskip_ext.stream(model, "Once upon a time", max_new_tokens=64, stop=["\\n\\n"]):
        print(piece, end="", flush=True)

The generation runs in a worker thread (the decoder loop calls back per accepted token); pieces come out
through a queue. Their concatenation is the final text (`it.result.text` once exhausted); no piece ends in a
broken UTF-8 character or in text that could still turn into a stop string (see stopping.TextStream).
Closing the iterator ends the generation at its next token: close(), a `with` block, or dropping the last
reference to it. `for piece in stream(...): ... break` drops it at the break; an iterator held in a variable keeps
generating after a break until it is closed or deleted (Python cannot tell a break from a pause), so write
`with stream(...) as it:` or call `it.close()` when the loop may end early.
"""
from __future__ import annotations

import queue
import threading

from .errors import LayerSkipError
from .stopping import TextStream, check_stop

_DONE = object()


class _Worker:
    """The worker thread's side of a stream: what it writes and what stops it. The iterator holds it, and nothing
    in it refers back to the iterator, so dropping the iterator runs TextIterator.__del__, which cancels."""

    def __init__(self, text: TextStream):
        self.text = text
        self.queue: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.result = None
        self.error: BaseException | None = None

    def on_token(self, token: int) -> bool:
        piece = self.text.push(token)
        if piece:
            self.queue.put(piece)
        return self.text.stopped or self.cancel.is_set()

    def run(self, generate, model, prompt, generate_kwargs) -> None:
        try:
            result = generate(model, prompt, on_token=self.on_token, **generate_kwargs)
            tail = self.text.finish()
            if tail:
                self.queue.put(tail)
            result.text = self.text.text
            self.result = result
        except BaseException as e:  # handed to the consumer, raised by __next__
            self.error = e
        self.queue.put(_DONE)


class TextIterator:
    """Iterator over the text pieces of one generation; `.result` is the GenerationResult once it ends."""

    def __init__(self, model, prompt, stop=None, **generate_kwargs):
        from .api import _is_prompt_list, generate
        from .engine import running_on_this_thread
        if "on_token" in generate_kwargs:
            raise LayerSkipError("stream() does its own on_token; use generate() for a token callback")
        if _is_prompt_list(prompt) and len(prompt) > 0:
            raise LayerSkipError("stream() takes one prompt (a string or a list of token ids), got a list of "
                                 f"{len(prompt)} prompts; stream each, or use generate() for a batch")
        if running_on_this_thread(model):  # its worker would wait for the engine this thread holds: a hang
            raise RuntimeError("this model's engine is already running a generation on this thread: stream() was "
                               "called from inside an on_token callback; call it after the running generation "
                               "returns")
        self._worker = _Worker(TextStream(model.decode, check_stop(stop)))
        self._thread: threading.Thread | None = threading.Thread(
            target=self._worker.run, args=(generate, model, prompt, generate_kwargs), name="layerskip-stream",
            daemon=True)
        self._thread.start()

    @property
    def result(self):
        """The GenerationResult once the iterator is exhausted (None before)."""
        return self._worker.result

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self._thread is None:
            raise StopIteration
        item = self._worker.queue.get()
        if item is _DONE:
            self._thread.join()
            self._thread = None
            if self._worker.error is not None:
                raise self._worker.error
            raise StopIteration
        return item

    def __enter__(self) -> TextIterator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Ends the generation at its next token and waits for the worker."""
        self._worker.cancel.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __del__(self):
        worker = getattr(self, "_worker", None)  # absent when __init__ raised on a bad argument
        if worker is not None:
            worker.cancel.set()


def stream(model, prompt, stop=None, **generate_kwargs) -> TextIterator:
    """Text pieces of `generate(model, prompt, **generate_kwargs)` as they are accepted, ending at `stop`."""
    return TextIterator(model, prompt, stop=stop, **generate_kwargs)
