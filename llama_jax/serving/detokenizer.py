"""Incremental detokenization with stop strings.

Text is released in whole characters: a token that ends inside a UTF-8 character (byte-fallback
pieces, multi-byte BPE tokens) decodes to U+FFFD and is held back until the character is
complete. Each step decodes a short window of recent tokens (from the token where the last
released text began) rather than the whole output, and the difference with the window's
previous text is the new text, so SentencePiece's leading-space rule applies to both alike.
Text that could be the start of a stop string is held back too; a stop string found, even one
cut across tokens, ends the text just before it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_jax.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.tokens: list[int] = []
        self.prefix_offset = 0  # window start: where the previous window's text began
        self.read_offset = 0  # tokens whose text is already in self.text
        self.text = ""  # decoded so far (whole characters)
        self.released = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found; self.text ends before it

    def add(self, token: int) -> str:
        """Take the next token; return the text that is now final (possibly empty)."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
        window = self.tokenizer.decode(self.tokens[self.prefix_offset :])
        if len(window) > len(before) and not window.endswith(REPLACEMENT) and window.startswith(before):
            self.text += window[len(before) :]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return self._release(final=False)

    def flush(self) -> str:
        """The output ended (a stop token or max_tokens): release everything held back."""
        if not self.stopped and self.read_offset < len(self.tokens):
            before = self.tokenizer.decode(self.tokens[self.prefix_offset : self.read_offset])
            window = self.tokenizer.decode(self.tokens[self.prefix_offset :])
            self.text += window[len(before) :] if window.startswith(before) else window
            self.read_offset = len(self.tokens)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stopped and self.stop:
            longest = max(map(len, self.stop))
            search_from = max(0, self.released - longest + 1)
            hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text, self.stopped = self.text[: min(hits)], True
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._partial_stop()
        out = self.text[self.released : end]
        self.released = max(self.released, end)
        return out

    def _partial_stop(self) -> int:
        """Length of the longest end of the text that begins some stop string (held back)."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best
