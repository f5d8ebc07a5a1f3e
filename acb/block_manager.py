"""The KV-cache block manager: which physical blocks are free, who holds the others, and which hold a cached prefix.

Pure Python. The KV tensors themselves live in :mod:`acb.kv_cache`; this module hands out block indices and owns
every piece of bookkeeping about them: reference counts, and for *prefix caching* the hash of each full block's
content.

Prefix caching: a full block (``block_size`` positions, all computed) is identified by a chained hash of its
parent's hash, its token ids and anything else that changes the KV (``extra``). A new sequence takes the longest run
of cached blocks matching its first full blocks and computes only the rest; several sequences share such blocks
(reference counts). Shared blocks are full, so nobody writes to them: the last partial block of a sequence is always
its own, and when a whole prompt is cached its last full block is recomputed into a fresh block (a step needs at
least one token to produce logits).

A block is registered for sharing only once the step that wrote its last position completed (:meth:`commit`), so a
failed step never leaves a hash pointing at garbage. A block whose last holder lets go keeps its content and its
hash, as long as nobody needs the space: blocks are handed out empty ones first, then cached ones in least recently
freed order (an eviction). Each hash stores its block's token ids, so a lookup compares content, not just hashes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["BlockManager", "OutOfBlocksError", "PrefixStats"]


class OutOfBlocksError(RuntimeError):
    """Internal: asked for more blocks than are free (the scheduler checks first, so this is a bug)."""


@dataclass(slots=True)
class PrefixStats:
    """Prefix-cache counters since the engine started (clearing the cache does not reset them)."""

    queries: int = 0  # sequences that started (or restarted after preemption)
    hits: int = 0  # ... with at least one cached block
    queried_tokens: int = 0  # prompt tokens looked up
    cached_tokens: int = 0  # ... of which came from the cache
    evictions: int = 0  # cached blocks reused for other content


class BlockManager:
    """``num_blocks`` fixed-size blocks, reference-counted, with a prefix cache of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._empty = list(range(num_blocks - 1, -1, -1))  # free, no content worth keeping; lowest index first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # free, holding a cached prefix; oldest first
        self._refs = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks  # the chained hash of a registered full block
        self._by_hash: dict[int, tuple[int, tuple[int, ...]]] = {}  # hash -> (block, its token ids)
        self.stats = PrefixStats()

    # -- capacity -------------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (empty ones and unreferenced cached ones)."""
        return len(self._empty) + len(self._cached_free)

    @property
    def num_cached(self) -> int:
        """Blocks registered in the prefix cache (referenced or not)."""
        return len(self._by_hash)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` positions."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    # -- handing out and taking back ------------------------------------------------------------------------------

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks for new content: empty ones first, then the least recently freed cached ones."""
        if n > self.num_free:
            raise OutOfBlocksError(f"asked for {n} blocks, {self.num_free} free")
        out = []
        for _ in range(n):
            if self._empty:
                b = self._empty.pop()
            else:
                b, _ = self._cached_free.popitem(last=False)
                self._forget(b)
                self.stats.evictions += 1
            self._refs[b] = 1
            out.append(b)
        return out

    def free(self, blocks: list[int]) -> None:
        """Let go of ``blocks`` (one reference each). A block nobody holds keeps its cached prefix, if any, until its
        space is needed."""
        for b in reversed(blocks):
            refs = self._refs[b]
            if refs <= 0:
                raise RuntimeError(f"block {b} freed twice")
            self._refs[b] = refs - 1
            if refs == 1:
                if self._hash[b] is not None:
                    self._cached_free[b] = None
                else:
                    self._empty.append(b)

    # -- the prefix cache -----------------------------------------------------------------------------------------

    def match(self, token_ids: list[int], limit: int, extra: object = None) -> tuple[list[int], int | None]:
        """The longest run of cached blocks holding ``token_ids``' first full blocks, at most ``limit`` tokens' worth,
        and the chained hash of the last one: a pure lookup (see :meth:`take`)."""
        if not self.prefix_caching:
            return [], None
        bs = self.block_size
        out: list[int] = []
        parent: int | None = None
        for i in range(min(limit, len(token_ids)) // bs):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash((parent, tokens, extra))
            found = self._by_hash.get(h)
            if found is None or found[1] != tokens:
                break
            out.append(found[0])
            parent = h
        return out, parent

    def count_query(self, queried: int, cached: int) -> None:
        """Count a sequence that started: ``queried`` tokens looked up, ``cached`` of them found."""
        s = self.stats
        s.queries += 1
        s.hits += cached > 0
        s.queried_tokens += queried
        s.cached_tokens += cached

    def cost(self, blocks: list[int]) -> int:
        """How many free blocks taking ``blocks`` would use up (those nobody holds now)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """Hold matched blocks (one reference each); unreferenced ones leave the free pool."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached_free[b]
            self._refs[b] += 1

    def commit(
        self, token_ids: list[int], table: list[int], done: int, parent: int | None, upto: int, extra: object = None
    ) -> tuple[int, int | None]:
        """Register the full blocks of a sequence whose positions ``< upto`` are computed. ``done`` of its blocks
        were handled before, the last with chained hash ``parent``; returns the new ``(done, parent)``. A block whose
        content the cache already holds in another block (the same prefix computed twice at once) stays private."""
        bs = self.block_size
        full = min(upto // bs, len(table), len(token_ids) // bs)
        if not self.prefix_caching or full <= done:
            return done, parent
        by_hash, hashes = self._by_hash, self._hash
        for i in range(done, full):
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            h = hash((parent, tokens, extra))
            b = table[i]
            if h not in by_hash and hashes[b] is None:
                hashes[b] = h
                by_hash[h] = (b, tokens)
            parent = h
        return full, parent

    # -- a sequence's table: the only place it changes ----------------------------------------------------------

    def extend(self, seq, n: int) -> None:
        """Give ``seq`` ``n`` more blocks for new content."""
        if n > 0:
            seq.block_table.extend(self.allocate(n))

    def reuse(self, seq, cached: list[int], parent: int | None) -> None:
        """Start ``seq``'s table with cached blocks (from :meth:`match` on its tokens)."""
        self.take(cached)
        seq.block_table.extend(cached)
        seq.num_hashed, seq.prefix_hash = len(cached), parent

    def release(self, seq) -> None:
        """Let go of every block of ``seq`` (finished, failed or preempted); its table starts over."""
        self.free(seq.block_table)
        seq.block_table = []
        seq.num_hashed, seq.prefix_hash = 0, None

    def commit_seq(self, seq, upto: int) -> None:
        """``seq``'s positions below ``upto`` are computed: offer its full blocks to the cache (see :meth:`commit`)."""
        seq.num_hashed, seq.prefix_hash = self.commit(
            seq.token_ids, seq.block_table, seq.num_hashed, seq.prefix_hash, upto
        )

    def clear(self) -> int:
        """Drop every cached prefix (blocks in use keep their content, but are no longer shared with newcomers).
        Returns how many blocks were cached."""
        n = len(self._by_hash)
        for b in self._cached_free:
            self._hash[b] = None
            self._empty.append(b)
        self._cached_free.clear()
        for _, (b, _) in self._by_hash.items():
            self._hash[b] = None
        self._by_hash.clear()
        return n

    def refs(self, block: int) -> int:
        return self._refs[block]

    def _forget(self, b: int) -> None:
        h = self._hash[b]
        if h is not None:
            self._hash[b] = None
            if self._by_hash.get(h, (None,))[0] == b:
                del self._by_hash[h]
