"""Admission: turn what a user submitted into a validated token list, or a typed error at the boundary.

Short prompts are tokenized on the event loop (microseconds); long ones in a worker thread so the loop stays
responsive while a tokenizer chews through them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence as SequenceABC

from .config import SamplingParams
from .errors import InvalidPromptError, InvalidSamplingParamsError, PromptTooLongError, RequestFailedError

__all__ = ["Admission", "Prompt"]

Prompt = str | list[int]


class Admission:
    def __init__(
        self, tokenizer, *, vocab_size: int, max_model_len: int, max_cache_tokens: int, long_prompt_chars: int
    ) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_cache_tokens = max_cache_tokens
        self.long_prompt_chars = long_prompt_chars

    def check_params(self, params: SamplingParams | None) -> SamplingParams:
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidSamplingParamsError(f"params must be a SamplingParams, got {type(params).__name__}")
        bad = [t for t in params.stop_token_ids if t >= self.vocab_size]
        if bad:
            raise InvalidSamplingParamsError(
                f"stop_token_ids {bad} outside the vocabulary (size {self.vocab_size})", param="stop_token_ids"
            )
        return params

    async def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt`` (a string, or token ids that are checked against the vocabulary)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidPromptError("the prompt is empty")
            try:
                if len(prompt) > self.long_prompt_chars:
                    ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
                else:
                    ids = self.tokenizer.encode(prompt)
            except Exception as exc:  # a tokenizer bug or a pathological input: fail this request only
                raise RequestFailedError(f"tokenizing the prompt failed: {exc!r}") from exc
            ids = list(ids)
        elif isinstance(prompt, SequenceABC) and not isinstance(prompt, (bytes, bytearray)):
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise InvalidPromptError("a token-id prompt must be a list of ints")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                shown = f"{bad[:8]}{'...' if len(bad) > 8 else ''}"
                raise InvalidPromptError(f"token ids {shown} outside the vocabulary (size {self.vocab_size})")
        else:
            raise InvalidPromptError(f"a prompt is a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise InvalidPromptError("the prompt is empty (no tokens)")
        return ids

    def check_fits(self, num_prompt: int, params: SamplingParams) -> None:
        if num_prompt >= self.max_model_len:
            raise PromptTooLongError(
                f"the prompt has {num_prompt} tokens; max_model_len is {self.max_model_len}, which leaves no room "
                "for a new token"
            )
        # The whole sequence must fit in the cache on its own, or it could never finish, even alone.
        needed = min(num_prompt + params.max_new_tokens, self.max_model_len) - 1
        if needed > self.max_cache_tokens:
            raise PromptTooLongError(
                f"prompt ({num_prompt} tokens) + max_new_tokens ({params.max_new_tokens}) needs {needed} KV slots; "
                f"the whole KV cache holds {self.max_cache_tokens}"
            )
