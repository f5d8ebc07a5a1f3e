"""Stop strings: find the first stop string in a stream of text deltas, and hold back any tail that may become one.

The stop strings of a request are compiled once into an Aho-Corasick automaton (a trie with failure links). Feeding
a delta then costs one transition per new character, whatever the number and length of the stop strings, and the
automaton's state after the delta says how long a tail of the text is still a prefix of some stop string: exactly
the text to hold back. A stop string is never emitted, not even in part.

Semantics: when a delta completes one or more stop strings, the output is cut before the earliest-starting one
among those complete in the text seen so far.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache

__all__ = ["StopStrings", "StopStringMatcher", "compile_stops"]

_SHIFT = 21  # code points are < 2**21: a transition's key is (state << 21) | ord(char)


class StopStrings:
    """The compiled automaton of one set of stop strings (immutable; shared by every request using the set)."""

    __slots__ = ("_goto", "_fail", "_depth", "_out", "max_len")

    def __init__(self, stops: tuple[str, ...]) -> None:
        goto: dict[int, int] = {}
        depth = [0]
        term = [0]  # length of the stop string ending exactly at this node
        children: list[list[tuple[int, int]]] = [[]]  # (char, child) per node, for the breadth-first pass
        for s in stops:
            node = 0
            for ch in s:
                key = (node << _SHIFT) | ord(ch)
                nxt = goto.get(key)
                if nxt is None:
                    nxt = len(depth)
                    goto[key] = nxt
                    depth.append(depth[node] + 1)
                    term.append(0)
                    children.append([])
                    children[node].append((ord(ch), nxt))
                node = nxt
            term[node] = len(s)
        fail = [0] * len(depth)
        out = term[:]  # longest stop string that is a suffix of the node's string
        queue = deque(children[0])
        while queue:
            c, v = queue.popleft()
            for cc, w in children[v]:
                f = fail[v]
                while f and ((f << _SHIFT) | cc) not in goto:
                    f = fail[f]
                fw = goto.get((f << _SHIFT) | cc, 0)
                fail[w] = fw if fw != w else 0
                out[w] = term[w] or out[fail[w]]
                queue.append((cc, w))
        self._goto, self._fail, self._depth, self._out = goto, fail, depth, out
        self.max_len = max(map(len, stops), default=0)

    @property
    def num_states(self) -> int:
        return len(self._depth)


@lru_cache(maxsize=256)
def _cached(stops: tuple[str, ...]) -> StopStrings:
    return StopStrings(stops)


def compile_stops(stops: tuple[str, ...]) -> StopStrings:
    """The automaton for ``stops``; small sets (the common case: a few short strings) are cached."""
    if sum(map(len, stops)) <= 1024:
        return _cached(stops)
    return StopStrings(stops)


class StopStringMatcher:
    """Per-request matching state over a :class:`StopStrings` automaton."""

    __slots__ = ("_ac", "_state", "_held")

    def __init__(self, stops: StopStrings | tuple[str, ...] | list[str]) -> None:
        self._ac = stops if isinstance(stops, StopStrings) else compile_stops(tuple(stops))
        self._state = 0
        self._held = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        """Take new text; return ``(text safe to emit, stop string found)``.

        After a stop string is found nothing more should be fed. With ``final`` the held tail is released.
        """
        ac = self._ac
        goto, fail, out = ac._goto, ac._fail, ac._out
        state = self._state
        base = len(self._held)
        best = -1  # earliest start of a complete stop string, in held + text coordinates
        for i, ch in enumerate(text):
            c = ord(ch)
            while True:
                nxt = goto.get((state << _SHIFT) | c)
                if nxt is not None:
                    state = nxt
                    break
                if state == 0:
                    break
                state = fail[state]
            n = out[state]
            if n:
                start = base + i + 1 - n
                if best < 0 or start < best:
                    best = start
                if base + i + 2 - ac.max_len >= best:
                    break  # any later match starts after this one
        buf = self._held + text
        if best >= 0:
            self._held, self._state = "", 0
            return buf[:best], True
        if final:
            self._held, self._state = "", 0
            return buf, False
        keep = ac._depth[state]  # the longest tail that is still a prefix of some stop string
        self._state = state
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False
