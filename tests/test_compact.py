"""The store's FAISS kinds beyond Flat: ``compact`` (4-bit codes searched, float rows kept for
the exact re-scoring), HNSW's search depth, and what each keeps; checked against numpy."""

from __future__ import annotations

import numpy as np

from test_lookup import write_store


def units(vectors):
    v = vectors.astype(np.float64)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_compact_keeps_exact_rows_beside_codes_eight_times_smaller(tmp_path):
    """compact's FAISS file: codes a query scans (at most 1/8 of the float rows' bytes) and the
    float rows themselves, which the store reads back bit for bit; a stored row's own query
    finds it first, with its exact cosine."""
    from lite_influence.store.combine import exact_rows
    from lite_influence.store.faiss_layers import _refine, faiss_module, normalise

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(4000, 256)).astype(np.float32)
    store = write_store(tmp_path, vectors, metric="cosine", factory="compact")
    assert store.approximate and store.metrics == ("cosine",) and exact_rows(store, "layer")
    np.testing.assert_array_equal(store.vectors("layer"), normalise(vectors))
    np.testing.assert_array_equal(store.vectors("layer", [7, 3999, 0]), normalise(vectors)[[7, 3999, 0]])
    base = _refine(store.faiss_index("layer")).base_index
    centroids = faiss_module().extract_index_ivf(base).nlist * 256 * 4
    assert 8 * (faiss_module().serialize_index(base).nbytes - centroids) <= vectors.nbytes  # codes + ids
    queries = store.prepare_queries(vectors[[5, 1234, 3000]])
    scores, ids = store.search("layer", queries, 10)
    assert ids[:, 0].tolist() == [5, 1234, 3000]
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", units(vectors)[ids], units(vectors[[5, 1234, 3000]])),
                               atol=1e-5)


def test_a_deep_search_returns_every_id_asked_for(tmp_path):
    """HNSW explores only max(efSearch, k) nodes and stopped at a few hundred ids (efSearch 16)
    when the audit asked for thousands; compact asks its codes for k_factor x k, capped at N:
    both return full lists, near the brute-force top list (random rows: IVF's probe misses some)."""
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 8)).astype(np.float32)
    for factory in ("HNSW8", "compact"):
        store = write_store(tmp_path / factory, vectors, metric="cosine", factory=factory)
        queries = store.prepare_queries(rng.normal(size=(2, 8)).astype(np.float32))
        _, ids = store.search("layer", queries, 1000)
        assert (ids >= 0).all(), factory
        truth = np.argsort(-(units(vectors) @ units(queries).T), axis=0)[:1000].T
        overlap = [len(set(a) & set(b)) / 1000 for a, b in zip(ids.tolist(), truth.tolist())]
        assert min(overlap) >= (0.99 if factory == "HNSW8" else 0.9), (factory, overlap)  # IVF probes 1/32


def test_compact_resolves_per_layer_by_rows_and_dim():
    """One name for every layer: its lists follow N, its codes the layer's dim (2 dims a code)."""
    from lite_influence.store.faiss_layers import check_factory, compact_factory, layer_factory

    check_factory("compact")
    assert compact_factory(60_614, 256) == "IVF985,PQ128x4fs,RFlat"
    assert compact_factory(60_614, 770) == "IVF985,PQ385x4fs,RFlat"
    assert compact_factory(1_000_000, 1024) == "IVF4000,PQ512x4fs,RFlat"
    assert compact_factory(100, 6) == "IVF2,PQ3x4fs,RFlat" and compact_factory(10, 6) == "Flat"
    assert layer_factory("auto", 200_000, 64).startswith("IVF1789,") and layer_factory("Flat", 5, 3) == "Flat"
