"""Delivery: a finished step's tokens to their requests' streams.

For each request that got tokens, in one pass: text deltas (:mod:`acb.detokenizer`, every request's tokens of the
step decoded together), stop strings (:mod:`acb.stops`), one :class:`~acb.outputs.Token` per token, and a single
hand-over to the request's channel, which wakes its consumer at most once per step, however many tokens the step
brought (a multi-step round brings several). A consumer that lags finds everything delivered since its last read
in one wake-up.
"""

from __future__ import annotations

import logging

from .detokenizer import TextDecoder
from .outputs import Token
from .scheduler import StepOutput
from .sequence import Sequence
from .stream import RequestState

__all__ = ["Delivery"]

log = logging.getLogger("acb")

_token = tuple.__new__  # Token((id, text, logprob, reason, top)) without NamedTuple's keyword handling: one per token


class Delivery:
    def __init__(self, decoder: TextDecoder) -> None:
        self.decoder = decoder

    def deliver(
        self, out: StepOutput, live: dict[str, RequestState]
    ) -> tuple[list[RequestState], list[Sequence], list[tuple[RequestState, Exception]]]:
        """Hand ``out``'s tokens to the live requests' channels. Returns the requests whose stream this ended (for
        the engine to forget), the sequences among them that a stop string ended (for the scheduler to finish), and
        the requests that failed in detokenization, with the error (for the engine to fail)."""
        items = []
        for acc in out.accepted:
            state = live.get(acc[0].request_id)
            if state is not None and state.seq is acc[0] and not state.closed:
                items.append((state, acc))
        ended: list[RequestState] = []
        stopped: list[Sequence] = []
        failed: list[tuple[RequestState, Exception]] = []
        if not items:
            return ended, stopped, failed
        try:  # a stop token's own text is never emitted, so it is not decoded
            texts = self.decoder.deltas(
                [(st.text, ids[:-1] if stop_tok else ids) for st, (_, ids, _, _, stop_tok, _) in items]
            )
        except Exception as exc:  # a tokenizer bug: fail the step's requests, keep serving
            log.exception("detokenizing a step failed")
            return ended, stopped, [(st, exc) for st, _ in items]
        for (state, (seq, ids, lps, reason, _, alts)), deltas in zip(items, texts):
            if reason is None and state.stops is None and len(ids) == 1 and alts is None:  # the common case, inline
                state.channel.put_nowait(
                    _token(Token, (ids[0], deltas[0], None if lps is None else lps[0], None, None))
                )
                continue
            try:
                if self._one(state, ids, lps, reason, deltas, alts):
                    stopped.append(seq)
            except Exception as exc:
                log.exception("detokenizing %s failed", seq.request_id)
                failed.append((state, exc))
                continue
            if state.closed:
                ended.append(state)
        return ended, stopped, failed

    def _one(
        self, state: RequestState, ids: list[int], lps: list[float] | None, reason, deltas: list[str], alts
    ) -> bool:
        """Deliver one request's tokens of the step; True if a stop string ended it."""
        last = len(ids) - 1
        stops = state.stops
        tokens = []
        hit = False
        for j, tok in enumerate(ids):
            text = deltas[j] if j < len(deltas) else ""  # the stop token (last) has no delta
            r = reason if j == last else None
            if r is not None:
                text += self.decoder.flush(state.text)
            if stops is not None:
                text, hit = stops.feed(text, final=r is not None)
                if hit:
                    r = "stop"
            top = None if alts is None else tuple(zip(*alts[j]))
            tokens.append(_token(Token, (tok, text, None if lps is None else lps[j], r, top)))
            if hit:
                break  # a stop string ended the request: this round's later tokens are never emitted
        state.channel.put_many(tokens)
        if tokens[-1][3] is not None:
            state.closed = True
        return hit
