import numpy as np

from lite_influence.store.token_rows import TokenRows


def _random_rows(rng, n, vocab, k):
    rows = []
    for _ in range(n):
        length = rng.integers(0, 12)
        rows.append((rng.integers(0, vocab, length), rng.normal(size=(length, k))))
    return rows


def _dense(rows, vocab, k):
    """The brute-force reference: each example's full V x k matrix."""
    dense = np.zeros((len(rows), vocab, k))
    for i, (ids, vecs) in enumerate(rows):
        np.add.at(dense[i], ids, vecs)
    return dense.reshape(len(rows), -1)


def test_scores_equal_dense_inner_products():
    rng = np.random.default_rng(0)
    rows = _random_rows(rng, 60, vocab=25, k=3)
    queries = _random_rows(rng, 7, vocab=25, k=3)
    store, asked = TokenRows.from_lists(rows, 3), TokenRows.from_lists(queries, 3)
    expected = _dense(queries, 25, 3) @ _dense(rows, 25, 3).T
    np.testing.assert_allclose(store.gram(asked), expected, rtol=1e-5, atol=1e-5)


def test_rows_kept_in_memory_in_posting_order_score_the_same():
    """A server's copy of the values in posting order (keep_in_memory) changes where the rows
    are read from, not what they score: equal to the brute force, and to the unkept rows."""
    rng = np.random.default_rng(2)
    rows = _random_rows(rng, 80, vocab=12, k=4)
    queries = _random_rows(rng, 5, vocab=15, k=4)  # tokens 12-14: in no stored example
    store, asked = TokenRows.from_lists(rows, 4), TokenRows.from_lists(queries, 4)
    before = store.gram(asked)
    store.keep_in_memory()
    np.testing.assert_array_equal(store.gram(asked), before)
    np.testing.assert_allclose(before, _dense(queries, 15, 4) @ _dense(rows, 15, 4).T, rtol=1e-5, atol=1e-5)


def test_norms_equal_dense_norms_and_empty_rows_are_zero():
    rng = np.random.default_rng(1)
    rows = _random_rows(rng, 30, vocab=10, k=4) + [(np.zeros(0, int), np.zeros((0, 4)))]
    store = TokenRows.from_lists(rows, 4)
    np.testing.assert_allclose(store.norms(), np.linalg.norm(_dense(rows, 10, 4), axis=1), rtol=1e-5)
    assert store.norms()[-1] == 0


def test_repeated_tokens_are_summed_and_a_rare_token_is_kept_exactly():
    k = 2
    rows = [(np.array([5, 5, 1]), np.array([[1.0, 0], [2.0, 0], [0, 1.0]])),
            (np.array([1]), np.array([[0, 3.0]])),
            (np.array([99]), np.array([[4.0, 4.0]]))]  # the rare token
    store = TokenRows.from_lists(rows, k)
    tokens, values = store.row(0)
    assert list(tokens) == [1, 5] and values[1].tolist() == [3.0, 0]
    scores = store.scores(np.array([99]), np.array([[1.0, 1.0]]))
    assert scores.tolist() == [0.0, 0.0, 8.0]  # only the example that holds it
