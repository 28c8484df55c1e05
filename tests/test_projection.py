"""Kronecker projections on synthetic gradients, against exact numpy/torch references."""

from __future__ import annotations

import numpy as np
import pytest

from lite_influence.errors import UserError
import torch

from lite_influence.layers import Unit
from lite_influence.projection import (eigen_side, from_arrays, pca_projector, random_projector,
                                       random_side, to_arrays)


def unit(name="block.q", kind="linear", n_in=12, n_out=10, bias=False):
    """A synthetic unit; in_dim counts the bias feature, as discover_units does."""
    return Unit(name, kind, "attention", 0, n_in + bias, n_out, bias, (f"{name}.weight",))


def projected(projector, x, delta):
    """phi = sum_t (R_out^T delta_t)(R_in^T x_t)^T, flattened, as gradients.py computes it."""
    a = projector.project_input(x)
    b = projector.project_output(delta)
    return torch.einsum("to,ti->oi", b, a).flatten()


def exact(x, delta, bias):
    """G = sum_t delta_t x_t^T, with the bias's constant-1 input as the last column."""
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    return delta.T @ x


def test_random_side_is_seeded_by_seed_and_unit_name():
    a = random_side(20, 4, seed=3, unit_name="block.q", side="in")
    again = random_side(20, 4, seed=3, unit_name="block.q", side="in")
    assert torch.equal(a.matrix, again.matrix) and a.matrix.shape == (20, 4)
    for other in (random_side(20, 4, 4, "block.q", "in"), random_side(20, 4, 3, "block.k", "in"),
                  random_side(20, 4, 3, "block.q", "out")):
        assert not torch.allclose(a.matrix, other.matrix)
    # the global torch RNG plays no part: another process (or query machine) regenerates it
    torch.manual_seed(123)
    assert torch.equal(random_side(20, 4, 3, "block.q", "in").matrix, a.matrix)
    # k >= dim keeps the side exactly
    assert random_side(4, 4, 3, "block.q", "in").matrix is None


def test_random_projector_regenerates_identically():
    u = unit(bias=True)
    first, second = random_projector(u, 3, 7), random_projector(u, 3, 7)
    assert torch.equal(first.inp.matrix, second.inp.matrix)
    assert torch.equal(first.out.matrix, second.out.matrix)
    assert first.dim == 9
    # regenerated through from_arrays with nothing stored
    again = from_arrays([u], 3, 7, {}, "random")[0]
    assert torch.equal(again.inp.matrix, first.inp.matrix) and torch.equal(again.out.matrix, first.out.matrix)


@pytest.mark.parametrize("bias", [False, True])
def test_projection_equals_kronecker_formula(bias):
    """phi = R_out^T G R_in for one seed, from the token-wise computation."""
    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(5, 12, generator=g), torch.randn(5, 10, generator=g)
    p = random_projector(unit(bias=bias), 3, 11)
    expected = p.out.matrix.T @ exact(x, delta, bias) @ p.inp.matrix
    torch.testing.assert_close(projected(p, x, delta), expected.flatten(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_random_projection_inner_product_is_unbiased(bias):
    """E<phi(a), phi(b)> = <G(a), G(b)> over seeds. The tolerance is 5 standard errors of the
    seed mean, estimated from the same samples, so it follows the actual spread."""
    g = torch.Generator().manual_seed(1)
    xa, da = torch.randn(4, 12, generator=g, dtype=torch.float64), torch.randn(4, 10, generator=g, dtype=torch.float64)
    xb = xa + 0.5 * torch.randn(4, 12, generator=g, dtype=torch.float64)  # correlated with a
    db = da + 0.5 * torch.randn(4, 10, generator=g, dtype=torch.float64)
    truth = float((exact(xa, da, bias) * exact(xb, db, bias)).sum())
    u = unit(bias=bias)
    samples = []
    for seed in range(3000):
        p = random_projector(u, 3, seed)
        p.inp.matrix, p.out.matrix = p.inp.matrix.double(), p.out.matrix.double()
        samples.append(float(projected(p, xa, da) @ projected(p, xb, db)))
    samples = np.array(samples)
    stderr = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - truth) < 5 * stderr, (samples.mean(), truth, stderr)
    assert stderr < 0.1 * abs(truth)  # the check has power: the spread is small against the truth


def test_embedding_input_side_is_a_row_lookup():
    u = Unit("emb", "embedding", "embeddings", None, 30, 8, False, ("emb.weight",))
    p = random_projector(u, 4, 0)
    tokens = torch.tensor([3, 7, 3, 29])
    one_hot = torch.nn.functional.one_hot(tokens, 30).float()
    torch.testing.assert_close(p.project_input(tokens), one_hot @ p.inp.matrix)


def known_covariance(dim=8, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    values = np.array([9.0, 7.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.25])[:dim]
    return torch.from_numpy(q @ np.diag(values) @ q.T), q, values


def test_eigen_side_picks_top_eigenvectors_with_a_fixed_sign():
    cov, q, values = known_covariance()
    side = eigen_side(cov, 3)
    assert side.matrix.shape == (8, 3) and side.matrix.dtype == torch.float32
    np.testing.assert_allclose(side.eigenvalues.numpy(), values[:3], rtol=1e-5)
    m = side.matrix.double().numpy()
    for j in range(3):  # each column is +-q_j; the sign puts the largest entry positive
        reference = q[:, j] * np.sign(q[np.argmax(np.abs(q[:, j])), j])
        np.testing.assert_allclose(m[:, j], reference, atol=1e-5)
        assert m[np.argmax(np.abs(m[:, j])), j] > 0
    # the same subspace from a covariance built with flipped eigenvector signs: same matrix
    flipped = q * np.array([-1, 1, -1, 1, 1, -1, 1, 1])
    again = eigen_side(torch.from_numpy(flipped @ np.diag(values) @ flipped.T), 3)
    torch.testing.assert_close(again.matrix, side.matrix, atol=1e-5, rtol=0)
    assert torch.equal(eigen_side(cov, 3).matrix, side.matrix)
    # k >= dim keeps the side exactly, in its whole eigenbasis (a rotation: curvature.py needs
    # that basis); a diagonal covariance's whole eigenbasis is the identity
    full = eigen_side(cov, 12)
    assert full.k == 8 and full.matrix.shape == (8, 8)
    np.testing.assert_allclose(full.matrix.double().numpy().T @ full.matrix.double().numpy(), np.eye(8), atol=1e-6)
    np.testing.assert_allclose(full.eigenvalues.numpy(), values, rtol=1e-5)
    assert torch.equal(full.matrix[:, :3], side.matrix)
    assert eigen_side(torch.tensor([3.0, 1.0, 2.0]), 3).matrix is None


def test_pca_projector_round_trips_through_arrays():
    u = unit(n_in=12, n_out=10, bias=True)
    cov_in, _, _ = known_covariance(8, 1)
    cov_in = torch.block_diag(cov_in, torch.eye(5, dtype=torch.float64))  # 13 = 12 + bias
    cov_out, _, _ = known_covariance(8, 2)
    cov_out = torch.block_diag(cov_out, torch.eye(2, dtype=torch.float64))
    fitted = pca_projector(u, 3, 5, {"in": cov_in, "out": cov_out})
    half = pca_projector(u, 3, 5, {"out": cov_out})  # input side random, as for embeddings
    arrays = to_arrays([fitted])
    assert set(arrays) == {"block.q/in", "block.q/in_eigenvalues", "block.q/out", "block.q/out_eigenvalues"}
    arrays = {k: v.copy() for k, v in arrays.items()}  # as if read back from projection.npz
    (back,) = from_arrays([u], 3, 5, arrays, "pca")
    for a, b in ((fitted.inp, back.inp), (fitted.out, back.out)):
        assert torch.equal(a.matrix, b.matrix) and torch.equal(a.eigenvalues, b.eigenvalues)
    with pytest.raises(UserError, match="lacks the eigenbasis block.q/in"):
        from_arrays([u], 3, 5, to_arrays([half]), "pca")  # a pca index missing a side
    (back_half,) = from_arrays([u], 3, 5, to_arrays([half]), "random")
    assert torch.equal(back_half.out.matrix, half.out.matrix)
    assert torch.equal(back_half.inp.matrix, random_side(13, 3, 5, "block.q", "in").matrix)
    assert back_half.inp.eigenvalues is None
    x, delta = torch.randn(4, 12), torch.randn(4, 10)
    torch.testing.assert_close(projected(back, x, delta), projected(fitted, x, delta))


def test_diagonal_covariance_keeps_the_most_frequent_tokens_exactly():
    """The embeddings' token side: counts in, one-hot columns of the k most frequent tokens
    out (ties to the lower token id), so a token's projected row is exact or zero."""
    counts = torch.tensor([0.0, 5, 2, 9, 2, 0, 7], dtype=torch.float64)
    side = eigen_side(counts, 3)
    assert side.matrix.shape == (7, 3)
    kept = side.matrix.argmax(0).tolist()
    assert kept == [3, 6, 1]
    assert torch.equal(side.matrix.sum(0), torch.ones(3)) and side.eigenvalues.tolist() == [9, 7, 5]
    tie = eigen_side(counts, 4)
    assert tie.matrix.argmax(0).tolist() == [3, 6, 1, 2]
    assert torch.equal(tie.matrix[4], torch.zeros(4))  # token 4 ties with 2 and loses: dropped


# ------------------------------------------------------------------ hybrid


def _covariance(dim, rank, seed=0):
    """A covariance whose energy sits in ``rank`` directions, plus a small isotropic rest."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    values = torch.cat([torch.linspace(10, 5, rank), torch.full((dim - rank,), 0.01)]).double()
    return (basis * values) @ basis.T, basis[:, :rank]


def test_hybrid_side_keeps_the_eigenbasis_exactly_and_sketches_only_its_complement():
    from lite_influence.projection import hybrid_side

    cov, _ = _covariance(12, 3)
    side = hybrid_side(unit(), "out", cov, k=6, seed=0, kept=3, scale=1.0)
    reference = eigen_side(cov, 3).matrix.double()
    m = side.matrix.double()
    assert m.shape == (12, 6) and torch.equal(side.matrix[:, :3], eigen_side(cov, 3).matrix)
    assert torch.allclose(reference.T @ m[:, 3:], torch.zeros(3, 3, dtype=torch.float64), atol=1e-6)  # complement only
    assert side.eigenvalues.shape == (3,)
    # seeded by (seed, unit, side): regenerated identically, another seed differs
    assert torch.equal(hybrid_side(unit(), "out", cov, 6, 0, 3, 1.0).matrix, side.matrix)
    assert not torch.equal(hybrid_side(unit(), "out", cov, 6, 1, 3, 1.0).matrix, side.matrix)
    # a complement weight c < 1 scales only the sketch columns
    shrunk = hybrid_side(unit(), "out", cov, 6, 0, 3, 0.5).matrix
    assert torch.equal(shrunk[:, :3], side.matrix[:, :3]) and torch.allclose(shrunk[:, 3:], 0.5 * side.matrix[:, 3:])
    # nothing to sketch: plain pca; k >= dim: the whole eigenbasis
    assert torch.equal(hybrid_side(unit(), "out", cov, 6, 0, 6).matrix, eigen_side(cov, 6).matrix)
    assert torch.equal(hybrid_side(unit(), "out", cov, 12, 0).matrix, eigen_side(cov, 12).matrix)


@pytest.mark.parametrize("bias", [False, True])
def test_hybrid_inner_product_is_exact_on_the_kept_part_and_unbiased_on_the_rest(bias):
    """Against dense numpy: gradients that live in the kept eigen directions keep their inner
    product exactly (any seed); arbitrary gradients keep it on average over seeds, while pca
    alone loses the part outside its directions (a rare cause)."""
    from lite_influence.projection import hybrid_projector

    u = unit(n_in=12, n_out=10, bias=bias)
    cov_in, top_in = _covariance(u.in_dim, 2, seed=1)
    cov_out, top_out = _covariance(10, 2, seed=2)
    g = torch.Generator().manual_seed(3)
    # in the kept span: G = U_out A U_in^T, so the exact inner product survives any sketch
    ga, gb = (top_out @ torch.randn(2, 2, generator=g, dtype=torch.float64) @ top_in.T for _ in range(2))
    kept = {"in": 2, "out": 2}
    for seed in range(3):
        p = hybrid_projector(u, 5, seed, {"in": cov_in, "out": cov_out}, kept, scale=1.0)
        r_in, r_out = p.inp.matrix.double(), p.out.matrix.double()
        pa, pb = (r_out.T @ x @ r_in for x in (ga, gb))
        assert torch.allclose((pa * pb).sum(), (ga * gb).sum(), rtol=1e-5)
    # arbitrary gradients: the average over seeds approaches the exact inner product
    x, delta = torch.randn(5, u.in_dim - bias, generator=g), torch.randn(5, 10, generator=g)
    y, eps = x + 0.5 * torch.randn(x.shape, generator=g), delta + 0.5 * torch.randn(delta.shape, generator=g)
    target = float((exact(x, delta, bias) * exact(y, eps, bias)).sum())
    estimates = []
    for seed in range(600):
        p = hybrid_projector(u, 5, seed, {"in": cov_in, "out": cov_out}, kept, scale=1.0)
        estimates.append(float(projected(p, x, delta) @ projected(p, y, eps)))
    assert abs(np.mean(estimates) - target) < 4 * np.std(estimates) / np.sqrt(len(estimates)) + 1e-3 * abs(target)
    pca = pca_projector(u, 2, 0, {"in": cov_in, "out": cov_out})
    assert abs(float(projected(pca, x, delta) @ projected(pca, y, eps)) - target) > abs(np.mean(estimates) - target)


def test_hybrid_embeddings_keep_frequent_rows_exactly_and_sketch_every_other_token():
    from lite_influence.projection import hybrid_projector

    u = Unit("emb", "embedding", "embedding", None, 50, 6, False, ("emb.weight",))
    counts = torch.zeros(50, dtype=torch.float64)
    counts[[7, 3, 11]] = torch.tensor([30.0, 20.0, 10.0], dtype=torch.float64)
    p = hybrid_projector(u, 6, 0, {"in": counts}, {"in": 3, "out": 6}, scale=1.0)
    m = p.inp.matrix
    assert torch.equal(m[[7, 3, 11], :3], torch.eye(3)) and not m[[7, 3, 11], 3:].any()
    others = [v for v in range(50) if v not in (7, 3, 11)]
    # every other token (rare or never seen) has one +-1 in a sketch column: none is dropped
    assert torch.equal(m[others].abs().sum(1), torch.ones(len(others)))
    assert not m[others, :3].any()
    # the row lookup is the dense one-hot product, and E[R R^T] = I over seeds (count sketch)
    ids = torch.tensor([[7, 20, 21, 3]])
    assert torch.equal(p.project_input(ids), torch.nn.functional.one_hot(ids, 50).float() @ m)
    mean = sum(hybrid_projector(u, 6, s, {"in": counts}, {"in": 3, "out": 6}, scale=1.0).inp.matrix.double()
               @ hybrid_projector(u, 6, s, {"in": counts}, {"in": 3, "out": 6}, scale=1.0).inp.matrix.double().T
               for s in range(400)) / 400
    assert torch.allclose(torch.diag(mean), torch.ones(50, dtype=torch.float64))
    assert (mean - torch.diag(torch.diag(mean))).abs().max() < 0.25


def test_hybrid_round_trips_through_arrays_and_old_indexes_still_read():
    from lite_influence.projection import FITTED, fitted_projector

    u = unit(bias=True)
    cov_in, _ = _covariance(u.in_dim, 3, seed=4)
    cov_out, _ = _covariance(10, 3, seed=5)
    built = fitted_projector("hybrid", u, 4, 9, {"in": cov_in, "out": cov_out})
    arrays = {k: v.copy() for k, v in to_arrays([built]).items()}
    (back,) = from_arrays([u], 4, 9, arrays, "hybrid")
    assert torch.equal(back.inp.matrix, built.inp.matrix) and torch.equal(back.out.matrix, built.out.matrix)
    pca = fitted_projector("pca", u, 4, 9, {"in": cov_in, "out": cov_out})
    assert torch.equal(pca.inp.matrix, pca_projector(u, 4, 9, {"in": cov_in, "out": cov_out}).inp.matrix)
    assert not torch.equal(pca.inp.matrix, built.inp.matrix)


def test_hybrid_defaults_are_per_side_and_a_share_of_one_is_plain_pca(monkeypatch):
    """HYBRID_KEPT / HYBRID_SCALE are read per side ("in", "out", "tokens"); a side whose share
    is 1 is exactly the eigenbasis, the other keeps its share of eigen columns and sketches the
    rest with its own weight."""
    import lite_influence.projection as projection

    u = unit(bias=True)
    cov_in, _ = _covariance(u.in_dim, 3, seed=6)
    cov_out, _ = _covariance(10, 3, seed=7)
    monkeypatch.setitem(projection.HYBRID_KEPT, "in", 0.5)
    monkeypatch.setitem(projection.HYBRID_KEPT, "out", 1.0)
    monkeypatch.setitem(projection.HYBRID_SCALE, "in", 1.0)
    p = projection.fitted_projector("hybrid", u, 6, 0, {"in": cov_in, "out": cov_out})
    assert torch.equal(p.out.matrix, eigen_side(cov_out, 6).matrix)
    assert projection.hybrid_kept(u, "in", 6) == 3 and projection.hybrid_kept(u, "out", 6) == 6
    assert torch.allclose(p.inp.matrix[:, :3], eigen_side(cov_in, 3).matrix)
    rest = p.inp.matrix[:, 3:].double()
    assert torch.allclose(eigen_side(cov_in, 3).matrix.double().T @ rest, torch.zeros(3, 3, dtype=torch.float64), atol=1e-5)
    monkeypatch.setitem(projection.HYBRID_SCALE, "in", 0.5)
    shrunk = projection.fitted_projector("hybrid", u, 6, 0, {"in": cov_in, "out": cov_out}).inp.matrix[:, 3:]
    assert torch.allclose(shrunk, p.inp.matrix[:, 3:] * 0.5, atol=1e-6)


def test_mixed_is_a_random_input_side_and_an_eigen_output_side_of_their_own_sizes():
    """--projection mixed --proj-dim-in 6 --proj-dim 3: the input side is the seeded random
    side at 6 columns (regenerated, not stored), the output side the top-3 eigenvectors of the
    output covariance (stored), and the vector holds 6 x 3 numbers; it round-trips through the
    index's arrays, and an index missing the eigenbasis is refused."""
    from lite_influence.projection import fitted_projector, unit_k

    u = unit(bias=True)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, u.out_dim))
    cov = {"in": torch.eye(u.in_dim, dtype=torch.float64), "out": torch.from_numpy(a.T @ a)}
    k = unit_k(u, 3, 0, 6)
    assert k == (6, 3)
    mixed = fitted_projector("mixed", u, k, 5, cov)
    assert torch.equal(mixed.inp.matrix, random_side(u.in_dim, 6, 5, u.name, "in").matrix)
    assert torch.equal(mixed.out.matrix, eigen_side(cov["out"], 3).matrix) and mixed.dim == 18
    arrays = to_arrays([mixed])
    assert set(arrays) == {f"{u.name}/out", f"{u.name}/out_eigenvalues"}
    (back,) = from_arrays([u], 3, 5, arrays, "mixed", proj_dim_in=6)
    assert torch.equal(back.inp.matrix, mixed.inp.matrix) and torch.equal(back.out.matrix, mixed.out.matrix)
    with pytest.raises(UserError, match="lacks the eigenbasis"):
        from_arrays([u], 3, 5, {}, "mixed", proj_dim_in=6)
    x, delta = torch.randn(7, u.in_dim - 1), torch.randn(7, u.out_dim)
    np.testing.assert_allclose(projected(mixed, x, delta).numpy(),
                               (mixed.out.matrix.T @ exact(x, delta, True) @ mixed.inp.matrix).flatten().numpy(),
                               rtol=1e-4, atol=1e-5)


def test_a_mixed_build_reproduces_its_vectors_through_the_session(bert_dir, train_tsv, tmp_path):
    from lite_influence import build_index
    from lite_influence.session import Session

    index = build_index(bert_dir, train_tsv, tmp_path / "idx", projection="mixed", proj_dim=2, proj_dim_in=6,
                        metric="dot", fit_examples=8)
    block = next(l for l in index.manifest["layers"] if l["name"] == "block1")
    assert {(u["k_in"], u["k_out"]) for u in block["units"]} == {(6, 2)} and block["dim"] == 4 * 12
    rows = [line.split("\t") for line in train_tsv.read_text().splitlines()[1:]]
    grads = Session(index.manifest, index.store).gradients([r[0] for r in rows], labels=[int(r[1]) for r in rows])
    np.testing.assert_allclose(grads.vectors["block1"], index.vectors("block1"), rtol=1e-4, atol=1e-6)


def test_mixed_output_width_follows_the_energy_rule():
    """--energy E: mixed's output side keeps the fewest eigenvectors that hold E of the output
    covariance's trace (numpy's cumulative eigenvalues), never fewer than --proj-dim nor more
    than --proj-dim-max; those columns are the top eigenvectors, and the width round-trips
    through the index's arrays. --energy 0 keeps exactly --proj-dim."""
    from lite_influence.projection import fitted_projector

    u = unit(bias=True, n_out=10)
    a = np.random.default_rng(1).normal(size=(60, 10)) * np.linspace(3, 0.2, 10)
    cov = torch.from_numpy(a.T @ a)
    values = np.sort(np.linalg.eigvalsh(a.T @ a))[::-1]
    held = np.cumsum(values) / values.sum()
    widths = set()
    for energy in (0.3, 0.6, 0.9, 0.99):
        want = int(np.argmax(held >= energy)) + 1
        p = fitted_projector("mixed", u, (6, 1), 0, {"out": cov}, energy, 64)
        assert p.out.k == want and p.dim == 6 * want
        assert torch.allclose(p.out.matrix, eigen_side(cov, want).matrix)
        assert fitted_projector("mixed", u, (6, 1), 0, {"out": cov}, energy, 3).out.k == min(want, 3)
        assert fitted_projector("mixed", u, (6, 4), 0, {"out": cov}, energy, 64).out.k == max(want, 4)
        (back,) = from_arrays([u], 1, 0, to_arrays([p]), "mixed", proj_dim_in=6)
        assert torch.equal(back.out.matrix, p.out.matrix)
        widths.add(want)
    assert len(widths) >= 3  # the rule really moved the width
    assert fitted_projector("mixed", u, (6, 3), 0, {"out": cov}, 0.0, 64).out.k == 3


def test_energy_is_a_share_and_only_mixed_uses_it():
    from lite_influence.config import BuildConfig

    for bad in (-0.1, 1.5):
        with pytest.raises(UserError, match="--energy must be a share between 0 and 1"):
            BuildConfig(energy=bad).validate()
    assert BuildConfig(projection="pca", energy=0.8).validate().energy == 0.0
    assert BuildConfig(projection="mixed", energy=0.5).validate().energy == 0.5
    with pytest.raises(UserError, match="--proj-dim-max must be at least 1"):
        BuildConfig(proj_dim_max=0).validate()
