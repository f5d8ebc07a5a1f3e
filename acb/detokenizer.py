"""Incremental detokenization.

:class:`IncrementalDetokenizer` turns a growing list of token ids into text deltas whose concatenation equals
``tokenizer.decode(ids, skip_special_tokens=True)``. It decodes a short sliding window (the tokens since the last
emitted boundary) rather than the whole output, and holds back a delta that ends in an incomplete UTF-8 sequence
(decoded as U+FFFD) until the following tokens complete it.

Stop strings are matched on its output by :mod:`acb.stops`.
"""

from __future__ import annotations

__all__ = ["IncrementalDetokenizer", "decode_many"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: enough context to decode the next tokens the same way as in full
        self._read_offset = 0  # tokens up to here have been turned into emitted text

    def _decode(self, ids: list[int]) -> str:
        return decode_many(self._tokenizer, [ids])[0]

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (possibly ``""``)."""
        self.push(token_id)
        prefix, full = decode_many(self._tokenizer, list(self.windows()))
        return self.resolve(prefix, full)

    # The engine detokenizes a whole step at once: push every request's token, decode all windows in one batched
    # call, then resolve each request's delta.

    def push(self, token_id: int) -> None:
        self._ids.append(token_id)

    def windows(self) -> tuple[list[int], list[int]]:
        """The two windows to decode: the emitted context, and the context plus the new tokens."""
        return self._ids[self._prefix_offset : self._read_offset], self._ids[self._prefix_offset :]

    def resolve(self, prefix: str, full: str) -> str:
        """The delta, given the decoded :meth:`windows`."""
        if len(full) > len(prefix) and not full.endswith(_REPLACEMENT):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end decodes as U+FFFD, as in full)."""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return full[len(prefix) :]


def decode_many(tokenizer, windows: list[list[int]]) -> list[str]:
    """Decode token windows with special tokens skipped and no clean-up, in one call where the tokenizer allows.

    A transformers fast tokenizer's Rust core decodes the whole batch in one call, off the GIL and in parallel;
    the Python wrapper's per-call overhead is several times the decoding itself.
    """
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is not None and hasattr(raw, "decode_batch"):
        return raw.decode_batch(windows, skip_special_tokens=True)
    return [tokenizer.decode(w, skip_special_tokens=True, clean_up_tokenization_spaces=False) for w in windows]
