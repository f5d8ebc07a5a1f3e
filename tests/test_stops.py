"""Stop strings: the automaton matches exactly what a brute-force search finds, for any split of the text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from acb.config import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from acb.stops import StopStringMatcher, StopStrings


def brute_force(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """What a request emits: the text before the earliest-starting stop string complete in the text seen so far."""
    seen = ""
    for chunk in chunks:
        seen += chunk
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            return seen[: min(hits)], True
    return seen, False


@settings(max_examples=400, deadline=None)
@given(
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=6), min_size=1, max_size=5),
    chunks=st.lists(st.text(alphabet="abc", max_size=5), min_size=1, max_size=10),
)
def test_matches_brute_force(stops, chunks):
    m = StopStringMatcher(stops)
    out, hit = [], False
    for i, chunk in enumerate(chunks):
        text, hit = m.feed(chunk, final=i == len(chunks) - 1)
        out.append(text)
        # never emit a prefix of a stop string that may still complete
        if not hit and i < len(chunks) - 1:
            emitted = "".join(out)
            held = "".join(chunks[: i + 1])[len(emitted) :]
            assert all(not s.startswith(held) or len(held) < len(s) for s in stops)
        if hit:
            break
    assert ("".join(out), hit) == brute_force(chunks, stops)


@pytest.mark.parametrize(
    "chunks, stops, emitted, hit",
    [
        (["Hello wor", "ld!"], ["world"], "Hello ", True),
        (["abc", "def"], ["xyz"], "abcdef", False),
        (["ab", "c"], ["abd"], "abc", False),  # a held prefix is released once ruled out
        (["start ST", "OP end"], ["STOP"], "start ", True),
        (["x", "y"], ["yz", "xyq"], "xy", False),
        (["abcd"], ["bc", "abcd"], "", True),  # the earliest start wins, not the first end
        (["日本", "語です"], ["本語"], "日", True),
    ],
)
def test_examples(chunks, stops, emitted, hit):
    m = StopStringMatcher(stops)
    out, found = [], False
    for i, c in enumerate(chunks):
        text, found = m.feed(c, final=i == len(chunks) - 1)
        out.append(text)
        if found:
            break
    assert "".join(out) == emitted
    assert found is hit


def test_prefix_is_held_back_mid_stream():
    m = StopStringMatcher(["</end>"])
    assert m.feed("text </e", final=False) == ("text ", False)
    assert m.feed("nd> more", final=False) == ("", True)


def test_the_largest_allowed_set_is_one_automaton_of_bounded_size():
    """The worst case a request may send: states grow with the total length of the strings, not their product, and
    a long adversarial text holds back no more than the longest stop string."""
    stops = tuple(f"{i:02d}" + "a" * (MAX_STOP_STRING_CHARS - 3) + "b" for i in range(MAX_STOP_STRINGS))
    ac = StopStrings(stops)
    assert ac.num_states <= sum(map(len, stops)) + 1
    m = StopStringMatcher(ac)
    emitted = ""
    for _ in range(200):
        text, hit = m.feed("00" + "a" * 300, final=False)  # keeps almost matching
        assert not hit
        emitted += text
    assert len(emitted) >= 200 * 302 - MAX_STOP_STRING_CHARS
