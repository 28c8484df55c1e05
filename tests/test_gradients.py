"""Projected gradients against exact per-example autograd gradients (the independent reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import exact_unit_gradients, random_batch, tiny_classifier
from lite_influence.gradients import CovarianceCollector, ProjectedGradients, frozen
from lite_influence.layers import discover_units, select_units
from lite_influence.projection import pca_fits, pca_projector, random_projector

ARCHS = ["bert", "gpt2", "llama"]


def exact_gradients(model, batch, labels, units):
    """Per-example weight gradients by autograd, one unpadded example at a time."""
    def loss(row):
        n = int(batch["attention_mask"][row].sum())
        single = {k: v[row : row + 1, :n] for k, v in batch.items()}
        return F.cross_entropy(model(**single).logits, labels[row : row + 1], reduction="sum")

    return exact_unit_gradients(model, units, [lambda row=row: loss(row) for row in range(labels.shape[0])])


def projected(model, batch, labels, projectors):
    with frozen(model), ProjectedGradients(model, projectors) as capture:
        capture.mask = batch["attention_mask"].bool()
        F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
        return capture.vectors()


@pytest.mark.parametrize("arch", ARCHS)
def test_full_width_projection_equals_exact_gradient(arch):
    """With k >= every dimension the projection is the identity: phi must be G itself."""
    model = tiny_classifier(arch)
    batch, labels = random_batch()
    units = discover_units(model)
    exact = exact_gradients(model, batch, labels, units)
    phi = projected(model, batch, labels, [random_projector(u, 10_000, 0) for u in units])
    for unit in units:
        torch.testing.assert_close(phi[unit.name], exact[unit.name].flatten(1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_random_projection_inner_products_converge(arch):
    """Error of projected pairwise inner products shrinks as k grows (JL), averaged over seeds."""
    model = tiny_classifier(arch)
    batch, labels = random_batch(batch=6)
    units = select_units(discover_units(model), "block1")
    exact = exact_gradients(model, batch, labels, units)
    g = torch.cat([exact[u.name].flatten(1) for u in units], 1).double()
    gram = g @ g.T
    errors = []
    for k in (2, 6, 14):  # dims are 16-17 per side; random errors are heavy-tailed: 16 seeds
        err = 0.0
        for seed in range(16):
            phi = projected(model, batch, labels, [random_projector(u, k, seed) for u in units])
            v = torch.cat([phi[u.name] for u in units], 1).double()
            err += ((v @ v.T - gram).norm() / gram.norm()).item()
        errors.append(err / 16)
    assert errors[0] > errors[1] > errors[2], errors


def test_pca_projection_keeps_more_than_random_at_same_size():
    model = tiny_classifier("bert")
    batch, labels = random_batch(batch=6)
    units = select_units(discover_units(model), "block1")
    exact = exact_gradients(model, batch, labels, units)
    g = torch.cat([exact[u.name].flatten(1) for u in units], 1).double()
    gram = g @ g.T
    with frozen(model), CovarianceCollector(model, units, pca_fits) as collector:
        collector.mask = batch["attention_mask"].bool()
        F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
    k = 4
    pca = [pca_projector(u, k, 0, collector.covariances[u.name]) for u in units]
    def gram_error(projectors):
        phi = projected(model, batch, labels, projectors)
        v = torch.cat([phi[u.name] for u in units], 1).double()
        return ((v @ v.T - gram).norm() / gram.norm()).item()
    random_err = sum(gram_error([random_projector(u, k, s) for u in units]) for s in range(4)) / 4
    assert gram_error(pca) < random_err


def test_hooks_leave_no_state_behind():
    model = tiny_classifier("bert")
    batch, labels = random_batch()
    units = discover_units(model)
    flags = [p.requires_grad for p in model.parameters()]
    model.train()
    projected(model, batch, labels, [random_projector(u, 4, 0) for u in units])
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    for module in model.modules():
        assert not module._forward_hooks and not module._backward_hooks


def test_vectors_do_not_depend_on_batch_composition():
    model = tiny_classifier("bert")
    batch, labels = random_batch(batch=4)
    projectors = [random_projector(u, 4, 0) for u in discover_units(model)]
    together = projected(model, batch, labels, projectors)
    n = int(batch["attention_mask"][1].sum())
    alone = projected(model, {k: v[1:2, :n] for k, v in batch.items()}, labels[1:2], projectors)
    for name, vectors in alone.items():
        torch.testing.assert_close(together[name][1:2], vectors, rtol=1e-4, atol=1e-6)


def test_embedding_input_covariance_is_token_counts_without_padding():
    model = tiny_classifier("bert")
    batch, labels = random_batch()
    embedding = [u for u in discover_units(model) if u.kind == "embedding"]
    with frozen(model), CovarianceCollector(model, embedding, pca_fits) as collector:
        collector.mask = batch["attention_mask"].bool()
        F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
    counts = collector.covariances[embedding[0].name]["in"]
    expected = [0] * embedding[0].in_dim
    for row, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
        for token, keep in zip(row, mask):
            expected[token] += keep
    assert counts.tolist() == expected


@pytest.mark.parametrize("k", [16, 5])
def test_exact_token_rows_equal_the_embedding_gradient_rows(k):
    """The embeddings' exact token side: example i keeps, for each token it holds, R_out^T
    G_i[:, token] (all of the hidden side at k = 16, a seeded sketch at k = 5), and nothing for
    the tokens it does not hold: its rows are the exact gradient's columns, sketched."""
    from lite_influence.projection import token_projector

    model = tiny_classifier("bert")
    batch, labels = random_batch(batch=6)
    unit = next(u for u in discover_units(model) if u.kind == "embedding")
    exact = exact_gradients(model, batch, labels, [unit])[unit.name].double()  # (B, hidden, vocab)
    projector = token_projector("random", unit, k, 0)
    rows = projected(model, batch, labels, [projector])[unit.name]
    r = torch.eye(unit.out_dim, dtype=torch.float64) if projector.out.matrix is None else projector.out.matrix.double()
    expected = exact.transpose(1, 2) @ r  # (B, vocab, k)
    stored = torch.zeros_like(expected)
    for i in range(rows.n):
        tokens, values = rows.row(i)
        stored[i, torch.from_numpy(tokens)] = torch.from_numpy(values).double()
        assert set(tokens.tolist()) == set(batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist())
    torch.testing.assert_close(stored, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_exact_norms_equal_autograd_gradient_norms_at_any_projection_size(arch):
    """||G||^2 per example and unit is exact whatever the sketch keeps (k = 2 here), for
    every unit kind (embeddings by token equality, a head that sees one vector, biased and
    unbiased linears); GPT-2's tied embeddings have none (their second use is not counted)."""
    model = tiny_classifier(arch)
    batch, labels = random_batch(batch=5)
    units = discover_units(model)
    exact = exact_gradients(model, batch, labels, units)
    with frozen(model), ProjectedGradients(model, [random_projector(u, 2, 0) for u in units]) as capture:
        capture.mask = batch["attention_mask"].bool()
        F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
        squares = capture.squared_norms()
    for unit in units:
        if unit.tied:
            assert squares[unit.name] is None
            continue
        expected = exact[unit.name].double().flatten(1).square().sum(1)
        torch.testing.assert_close(squares[unit.name], expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_query_s_pass_without_norms_gives_the_same_vectors_and_no_norms(arch):
    """A query's gradient skips the exact norms (``norms=False``, what Session.run asks):
    the projected vectors are unchanged, and no norm is computed."""
    model = tiny_classifier(arch)
    batch, labels = random_batch(batch=4)
    projectors = [random_projector(u, 3, 0) for u in discover_units(model)]
    runs = []
    for norms in (True, False):
        with frozen(model), ProjectedGradients(model, projectors, norms=norms) as capture:
            capture.mask = batch["attention_mask"].bool()
            F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
            runs.append((capture.vectors(), capture.squared_norms()))
    (with_norms, squares), (without, none) = runs
    assert set(with_norms) == set(without) and any(v is not None for v in squares.values())
    assert all(value is None for value in none.values())
    for name, vector in with_norms.items():
        if isinstance(vector, torch.Tensor):
            torch.testing.assert_close(without[name], vector, rtol=0, atol=0)


def test_exact_norms_take_either_route_to_the_same_value():
    """The token-pair Gram route (few tokens) and the materialised-G route (many) agree."""
    from lite_influence.gradients import exact_squared_norms

    g = torch.Generator().manual_seed(0)
    x, delta = torch.randn(3, 40, 4, generator=g), torch.randn(3, 40, 5, generator=g)  # 40 tokens: through G
    few_x, few_delta = x[:, :2], delta[:, :2]  # 2 tokens: through the Grams
    for xs, ds in ((x, delta), (few_x, few_delta)):
        reference = torch.einsum("bto,bti->boi", ds.double(), xs.double()).square().sum((1, 2))
        torch.testing.assert_close(exact_squared_norms(xs, ds), reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_stops_at_the_lowest_indexed_unit(arch):
    """--layers late,head: the vectors are the exact gradients (full width), and no gradient is
    computed below the late blocks: nothing under them requires grad, so autograd never runs
    the early blocks' or the embeddings' backward."""
    model = tiny_classifier(arch)
    batch, labels = random_batch()
    units = select_units(discover_units(model), "late,head")
    assert units and {u.block for u in units} <= {2, None}
    exact = exact_gradients(model, batch, labels, units)
    blocks = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == 3)
    below = [model.get_input_embeddings(), blocks[0], blocks[1]]
    seen, reached = [], []
    handles = [m.register_forward_hook(lambda m, i, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
               for m in below]
    handles += [m.register_full_backward_hook(lambda m, gi, go: reached.append(m)) for m in below]
    try:
        phi = projected(model, batch, labels, [random_projector(u, 10_000, 0) for u in units])
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == 3 and not any(seen) and not reached
    for unit in units:
        torch.testing.assert_close(phi[unit.name], exact[unit.name].flatten(1), rtol=1e-4, atol=1e-6)


def _pass(capture, model, batch, labels):
    capture.mask = batch["attention_mask"].bool()
    F.cross_entropy(model(**batch).logits, labels, reduction="sum").backward()
    return capture.vectors(), capture.squared_norms()


def _same_bits(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()
    return all(getattr(a, f).tobytes() == getattr(b, f).tobytes() for f in ("indptr", "tokens", "values"))


@pytest.mark.parametrize("arch", ARCHS)
def test_one_pass_held_over_many_batches_gives_each_batch_what_a_fresh_pass_gives(arch):
    """A build freezes the model and hooks it once for all its batches (``gradient_pass``);
    each batch's vectors, token rows and exact norms must be those of a pass opened for that
    batch alone, to the bit, though batches differ in shape and what units share (query, key
    and value read one tensor) is kept per batch; the model is left as it was."""
    from lite_influence.projection import token_projector

    model = tiny_classifier(arch)
    units = discover_units(model)
    projectors = [token_projector("random", u, 5, 0) if u.kind == "embedding" and not u.tied else random_projector(u, 3, 0)
                  for u in units]
    batches = [random_batch(batch=b, length=n, seed=s) for s, (b, n) in enumerate(((4, 9), (3, 5), (5, 12)))]
    fresh = []
    for batch, labels in batches:
        with frozen(model), ProjectedGradients(model, projectors) as capture:
            fresh.append(_pass(capture, model, batch, labels))
    with frozen(model), ProjectedGradients(model, projectors) as capture:
        held = [_pass(capture, model, batch, labels) for batch, labels in batches]
    for (vectors, squares), (want_vectors, want_squares) in zip(held, fresh):
        assert set(vectors) == set(want_vectors) and set(squares) == set(want_squares)
        assert all(_same_bits(vectors[k], want_vectors[k]) for k in vectors)
        assert all(_same_bits(squares[k], want_squares[k]) for k in squares)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_a_batch_s_token_rows_are_made_as_per_example_rows_are_to_the_bit():
    """``batch_token_rows`` (one pass over the batch) against ``TokenRows.from_lists`` (one
    example at a time, what the build did before): same entries, same float32 bytes, with
    repeated tokens, padding and values of very different sizes."""
    from lite_influence.exact_sides import batch_token_rows
    from lite_influence.store.token_rows import TokenRows

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 6, (7, 13), generator=g)
        mask = torch.rand(7, 13, generator=g) > 0.3
        values = torch.randn(7, 13, 5, generator=g) * 10.0 ** torch.randint(-4, 4, (7, 13, 1), generator=g)
        want = TokenRows.from_lists([(ids[i][mask[i]].numpy(), values[i][mask[i]].numpy()) for i in range(7)], 5)
        assert _same_bits(batch_token_rows(ids, mask, values), want)
