"""Incremental detokenization: each generated token's text delta, such that the deltas of a request concatenate to
``tokenizer.decode(ids, skip_special_tokens=True)``.

Two ways, chosen once per tokenizer (:func:`text_decoder`):

- **byte table** (byte-level BPE tokenizers: GPT-2, Llama 3, Qwen 2/3, ...). Their decoder concatenates each token's
  bytes and decodes the result as UTF-8, so a token's delta is its bytes fed to an incremental UTF-8 decoder, which
  holds back an incomplete character until the next tokens complete it. One table lookup and one C call per token,
  no tokenizer call at all. The table is built and checked against the tokenizer's own decode at start-up; a
  tokenizer that does not match exactly falls back to windows.
- **windows** (any other tokenizer): decode a short sliding window (the tokens since the last emitted boundary)
  rather than the whole output, and hold back a delta that ends in U+FFFD until the following tokens complete it.
  All requests' windows of a step go to the Rust core in one ``decode_batch`` call.

Stop strings are matched on the deltas by :mod:`acb.stops`.
"""

from __future__ import annotations

import codecs
import random

__all__ = ["TextDecoder", "ByteTableDecoder", "WindowDecoder", "text_decoder", "IncrementalDetokenizer", "decode_many"]

_REPLACEMENT = "\ufffd"
_utf8 = codecs.getincrementaldecoder("utf-8")


def decode_many(tokenizer, windows: list[list[int]]) -> list[str]:
    """Decode token windows with special tokens skipped and no clean-up, in one call where the tokenizer allows.

    A transformers fast tokenizer's Rust core decodes the whole batch in one call, off the GIL and in parallel;
    the Python wrapper's per-call overhead is several times the decoding itself.
    """
    raw = getattr(tokenizer, "_tokenizer", None)
    if raw is not None and hasattr(raw, "decode_batch"):
        return raw.decode_batch(windows, skip_special_tokens=True)
    return [tokenizer.decode(w, skip_special_tokens=True, clean_up_tokenization_spaces=False) for w in windows]


class TextDecoder:
    """Turns one step's new tokens of many requests into text deltas. ``new_state()`` makes a request's state."""

    def new_state(self):
        raise NotImplementedError

    def deltas(self, items: list[tuple[object, list[int]]]) -> list[list[str]]:
        """``[(state, new token ids)]`` -> each token's text delta, per item."""
        raise NotImplementedError

    def flush(self, state) -> str:
        """The text still held back at the end of a request (an incomplete character decodes as U+FFFD)."""
        raise NotImplementedError


class ByteTableDecoder(TextDecoder):
    """Deltas from each token's bytes. A token whose bytes are complete UTF-8 on their own, arriving when nothing
    is held back (nearly always), is a table lookup; otherwise an incremental UTF-8 decoder takes over until the held
    bytes are resolved."""

    def __init__(self, table: list[bytes]) -> None:
        self.table = table
        self.text: list[str | None] = [_complete(b) for b in table]

    def new_state(self):
        return _ByteText()

    def deltas(self, items):
        text = self.text
        out = []
        for state, ids in items:
            res = []
            for t in ids:
                if not state.pending:
                    piece = text[t]
                    if piece is not None:
                        res.append(piece)
                        continue
                res.append(self.held(state, t))
            out.append(res)
        return out

    def held(self, state: _ByteText, token: int) -> str:
        """The slow path: feed the token's bytes to the request's incremental decoder."""
        if state.decoder is None:
            state.decoder = _utf8(errors="replace")
        piece = state.decoder.decode(self.table[token])
        state.pending = bool(state.decoder.getstate()[0])
        return piece

    def flush(self, state) -> str:
        if state.decoder is None:
            return ""
        state.pending = False
        return state.decoder.decode(b"", final=True)


class _ByteText:
    """A request's state for :class:`ByteTableDecoder`: bytes may be held back in its incremental decoder."""

    __slots__ = ("pending", "decoder")

    def __init__(self) -> None:
        self.pending = False
        self.decoder = None


def _complete(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


class WindowDecoder(TextDecoder):
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def new_state(self):
        return IncrementalDetokenizer(self.tokenizer)

    def deltas(self, items):
        # One batched decode per token position: the windows of a request's second token in this step depend on
        # what its first one emitted.
        out: list[list[str]] = [[] for _ in items]
        for r in range(max((len(ids) for _, ids in items), default=0)):
            active = [(i, state, ids[r]) for i, (state, ids) in enumerate(items) if r < len(ids)]
            windows: list[list[int]] = []
            for _, state, t in active:
                state.push(t)
                windows.extend(state.windows())
            decoded = decode_many(self.tokenizer, windows)
            for j, (i, state, _) in enumerate(active):
                out[i].append(state.resolve(decoded[2 * j], decoded[2 * j + 1]))
        return out

    def flush(self, state) -> str:
        return state.flush()


def text_decoder(tokenizer) -> TextDecoder:
    """The fastest exact decoder for ``tokenizer`` (cached on it: engines sharing a tokenizer build it once)."""
    cached = getattr(tokenizer, "_acb_text_decoder", None)
    if cached is not None:
        return cached
    table = byte_table(tokenizer)
    decoder = ByteTableDecoder(table) if table is not None else WindowDecoder(tokenizer)
    try:
        tokenizer._acb_text_decoder = decoder
    except AttributeError:  # a tokenizer object that takes no attributes: build again next time
        pass
    return decoder


def byte_table(tokenizer) -> list[bytes] | None:
    """Each token's bytes, for a byte-level BPE tokenizer whose decode is their UTF-8 decoding; special tokens map to
    no bytes (they are skipped). ``None`` if the tokenizer is of another kind or the table disagrees with its
    decode on any single token or on random sequences."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.decoder).__name__ != "ByteLevel":
        return None
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    added = backend.get_added_tokens_decoder()
    special = {i for i, t in added.items() if t.special}
    size = backend.get_vocab_size(with_added_tokens=True)
    table = []
    for i in range(size):
        piece = backend.id_to_token(i)
        if piece is None or i in special:
            table.append(b"")
        elif all(c in byte_of for c in piece):
            table.append(bytes(byte_of[c] for c in piece))
        else:  # the decoder keeps such a token's own UTF-8 bytes
            table.append(piece.encode("utf-8"))
    return table if _agrees(tokenizer, table, set(added)) else None


def _agrees(tokenizer, table: list[bytes], special: set[int]) -> bool:
    """Check the table against the tokenizer's decode: every added token and a sample of the others alone, and
    random sequences (which also cover characters split across tokens)."""
    n = len(table)
    rng = random.Random(0)
    sample = rng.sample(range(n), min(n, 8192))
    singles = [[i] for i in sorted(set(sample) | special | set(range(min(n, 512))))]
    runs = [[rng.randrange(n) for _ in range(rng.randint(1, 40))] for _ in range(256)]
    decoded = decode_many(tokenizer, singles + runs)
    for ids, text in zip(singles + runs, decoded):
        if b"".join(table[i] for i in ids).decode("utf-8", errors="replace") != text:
            return False
    return True


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as byte-level BPE vocabularies spell tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class IncrementalDetokenizer:
    """The window method for one request (see the module doc)."""

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
