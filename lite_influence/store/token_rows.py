"""The word embeddings' gradient kept exactly on its token side: sparse rows, scored by token.

An example's embedding gradient ``G = sum_t delta_t e(x_t)^T`` is zero outside the rows of its
own tokens, so projecting its token side (random or eigen columns) only mixes rare tokens with
each other and with frequent ones: a backdoor token, a name, a rare word is then lost in the
sketch (DESIGN.md, "What a sketch must keep"). Instead each example keeps, for each distinct
token t it holds, the projected output-side sum ``u[t] = sum_{x_s = t} R_out^T delta_s``
(``k`` numbers). The influence of two examples is then exactly the sum over the tokens they
share of ``<u_q[t], u_i[t]>`` (in the output sketch), which is also what the paper's TracIn_we
computes by masking to shared tokens.

Stored as CSR (``indptr``, ``tokens``, ``values``), rows sorted by token, plus a by-token order
of the entries (computed once per process), so a query touches only the posting lists of its
own tokens: the cost is the number of (example, token) entries that share a token with the
query, not N x dims. Pure numpy; the arrays may be memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def by_token(tokens: np.ndarray) -> np.ndarray:
    """The entries' order sorted by token (stable): the posting lists, which a build stores
    (by_token.npy) and an index without them sorts on first use."""
    return np.argsort(tokens, kind="stable")


@dataclass
class TokenRows:
    indptr: np.ndarray  # (N + 1,) int64: example i owns entries indptr[i]:indptr[i+1]
    tokens: np.ndarray  # (nnz,) integer ids, increasing within each example
    values: np.ndarray  # (nnz, k) float32
    _postings: tuple | None = field(default=None, repr=False, compare=False)
    _by_token: np.ndarray | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_lists(cls, rows: list[tuple[np.ndarray, np.ndarray]], k: int) -> "TokenRows":
        """``rows[i] = (tokens, values)`` of example i; repeated tokens are summed."""
        indptr, tokens, values = [0], [], []
        for ids, vecs in rows:
            ids, vecs = np.asarray(ids, np.int64), np.asarray(vecs, np.float32).reshape(len(ids), k)
            unique, inverse = np.unique(ids, return_inverse=True)
            summed = np.zeros((len(unique), k), np.float64)
            np.add.at(summed, inverse, vecs)
            tokens.append(unique)
            values.append(summed.astype(np.float32))
            indptr.append(indptr[-1] + len(unique))
        return cls(np.asarray(indptr, np.int64),
                   np.concatenate(tokens) if tokens else np.zeros(0, np.int64),
                   np.concatenate(values) if values else np.zeros((0, k), np.float32))

    @property
    def n(self) -> int:
        return len(self.indptr) - 1

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.indptr[i], self.indptr[i + 1]
        return self.tokens[start:end], self.values[start:end]

    def subset(self, ids) -> "TokenRows":
        """The rows of ``ids``, in that order (a query by training-example id)."""
        return TokenRows.from_lists([self.row(int(i)) for i in ids], self.k)

    def scaled(self, factors: np.ndarray) -> "TokenRows":
        """Each example's row times its factor (1 / norm: unit rows for cosine)."""
        values = self.values * np.repeat(np.asarray(factors, np.float64), np.diff(self.indptr))[:, None]
        return TokenRows(self.indptr, self.tokens, values.astype(np.float32))

    def squared_norms(self) -> np.ndarray:
        """Each example's squared norm (of its sketched gradient), in float64."""
        squares = np.einsum("ij,ij->i", self.values, self.values, dtype=np.float64)
        return np.bincount(self._example_of(), weights=squares, minlength=self.n)

    def norms(self) -> np.ndarray:
        return np.sqrt(self.squared_norms())

    def _example_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.n), np.diff(self.indptr))

    def postings(self, order: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entry order sorted by token, tokens in that order, their examples), once; ``order``
        is the stored ``by_token`` (else it is sorted here)."""
        if self._postings is None:
            order = by_token(self.tokens) if order is None else np.asarray(order)
            tokens = np.asarray(self.tokens)[order]
            if len(order) and (np.bincount(order, minlength=len(order)).max() != 1 or (np.diff(tokens) < 0).any()):
                raise ValueError("the by-token order is not a sorting permutation of the entries")
            self._postings = (order, tokens, self._example_of()[order])
        return self._postings

    def keep_in_memory(self) -> None:
        """Copy the values into memory in posting-list order (a server's warm-up): a query then
        reads each of its tokens' postings as one contiguous block instead of gathering them
        from across the file ([CLS] and [SEP] are in every example: 100k x 2 scattered rows at
        N = 100k). Costs the values' size in memory (about N x 12.5 x k x 4 bytes)."""
        if self._by_token is None:
            self._by_token = np.ascontiguousarray(self.values[self.postings()[0]])

    def scores(self, tokens: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Inner products of one query (its distinct tokens and their vectors) with every
        example, in float64: only the posting lists of the query's tokens are read."""
        from .views import chunked_product

        order, sorted_tokens, examples = self.postings()
        starts = np.searchsorted(sorted_tokens, tokens, side="left")
        ends = np.searchsorted(sorted_tokens, tokens, side="right")
        weights, owners = [], []
        for q, (start, end) in enumerate(zip(starts, ends)):
            if end > start:
                rows = self._by_token[start:end] if self._by_token is not None else self.values[order[start:end]]
                weights.append(chunked_product(rows, np.asarray(values[q], np.float64)[:, None])[:, 0])
                owners.append(examples[start:end])
        if not weights:
            return np.zeros(self.n, np.float64)
        return np.bincount(np.concatenate(owners), weights=np.concatenate(weights), minlength=self.n).astype(np.float64)

    def gram(self, other: "TokenRows") -> np.ndarray:
        """(other.n, self.n) inner products: every query of ``other`` against every example."""
        return np.stack([self.scores(*other.row(q)) for q in range(other.n)]) if other.n else np.zeros((0, self.n))
