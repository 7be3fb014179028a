"""Token ids -> text pieces, as tokens arrive: stop strings and whole UTF-8 characters.

    stream = TextStream(model.decode, stop=["\\n\\n", "User:"])
    for token in tokens:
        piece = stream.push(token)      # text that is final: print or send it
        if stream.stopped:              # a stop string appeared: `stream.tokens` ends with the token that made it
            break
    piece = stream.finish()             # what was held back, at the end of generation

The concatenation of every piece is `stream.text`: the decoded tokens up to (not including) the first stop
string. A piece never ends in a broken character (byte-level tokenizers decode an incomplete UTF-8 sequence as
U+FFFD, which is held back until the next token completes it), and text that could still become the start of a
stop string is held back until it cannot.
"""
from __future__ import annotations

from .errors import LayerSkipError
from .validation import check_unicode

_REPLACEMENT = "\ufffd"


def check_stop(stop) -> tuple[str, ...]:
    """None, a string or a list of strings -> a tuple of non-empty stop strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise LayerSkipError(f"stop must be a string or a list of strings, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str) or s == "":
            raise LayerSkipError(f"every stop string must be a non-empty string, got {s!r}")
        check_unicode(s, "a stop string")
    return tuple(stop)


class TextStream:
    """Decodes a growing list of token ids into final text pieces, ending at the first stop string."""

    def __init__(self, decode, stop=None):
        self.decode = decode
        self.stop = check_stop(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # a stop string may start this far back
        self.tokens: list[int] = []  # every token pushed (the last one completed the stop string, if stopped)
        self.text = ""  # the text sent so far
        self.stopped = False

    def push(self, token: int) -> str:
        """Adds one token; returns the new text that is final (possibly empty)."""
        if self.stopped:
            raise RuntimeError("push() after a stop string was found")
        self.tokens.append(token)
        full = self.decode(self.tokens)
        # a stop string can only start in text not yet sent, or in the held-back tail before it
        start = max(0, len(self.text) - self._hold)
        hits = [i for i in (full.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return self._advance(full[:min(hits)])
        end = len(full)
        while end > len(self.text) and full[end - 1] == _REPLACEMENT:  # an incomplete character
            end -= 1
        end = min(end, max(len(self.text), len(full) - self._longest_stop_prefix(full)))
        return self._advance(full[:end])

    def finish(self) -> str:
        """Generation ended: returns the held-back tail (everything decoded, unless a stop string ended it)."""
        if self.stopped:
            return ""
        return self._advance(self.decode(self.tokens))

    def _longest_stop_prefix(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:n]):
                    best = n
                    break
        return best

    def _advance(self, upto: str) -> str:
        # the decoded text of more tokens extends the text of fewer: what was sent is a prefix of `upto`
        piece = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += piece
        return piece


def stop_strings_hook(model, stop, on_token=None, rows: int = 1):
    """(an on_token(row, token) for generate() that ends each row at its first stop string, after calling the
    caller's on_token(row, token); one TextStream per row, holding its text)."""
    streams = [TextStream(model.decode, stop) for _ in range(rows)]
    if model.tokenizer is None and streams[0].stop:
        raise LayerSkipError("stop strings need a tokenizer; this model has none (use stop_token_ids)")

    def hook(row: int, token: int) -> bool:
        asked = bool(on_token(row, token)) if on_token is not None else False
        streams[row].push(token)
        return asked or streams[row].stopped

    return hook, streams
