"""Keys for exact token prefixes, so a new request can find a stream it continues.

A finished stream's cache covers its first ``N`` tokens exactly; a later
request resumes it only if its prompt begins with those same ``N`` tokens. The
key of a prefix is a SHA-256 chain over whole blocks of tokens, closed by the
tokens of the last partial block and the length, all under a salt (the
engine's streaming settings and the request's ``cache_salt``): computing the
chain of a prompt once gives the key of every prefix length in ``O(block)``
more each. SHA-256 because a collision would hand one conversation's cache to
another (vLLM's prefix cache hashes with SHA-256 for the same reason).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


class PrefixKeys:
    """The keys of every prefix of one token sequence."""

    def __init__(self, tokens: Sequence[int], block_size: int, salt: bytes) -> None:
        self._tokens = np.asarray(tokens, dtype=np.int64)
        self._block_size = block_size
        chain = [hashlib.sha256(salt).digest()]
        for start in range(0, len(self._tokens) - block_size + 1, block_size):
            block = self._tokens[start : start + block_size].tobytes()
            chain.append(hashlib.sha256(chain[-1] + block).digest())
        self._chain = chain

    def key(self, length: int) -> bytes:
        """The key of the first ``length`` tokens."""
        if not 0 <= length <= len(self._tokens):
            raise ValueError(f"prefix of {length} tokens of a {len(self._tokens)}-token sequence")
        full_blocks = length // self._block_size
        tail = self._tokens[full_blocks * self._block_size : length].tobytes()
        return hashlib.sha256(
            self._chain[full_blocks] + tail + length.to_bytes(8, "little")
        ).digest()
