"""Adapter merging on hand-computed cases, against Hugging Face PEFT's merge_utils, and DARE's
rescaling in expectation."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

import jpeft  # noqa: E402
from jpeft.errors import ConfigError, NotMergeableError, ShapeMismatchError  # noqa: E402
from jpeft.merging import combine, magnitude_prune, merge_adapters, merge_deltas, merge_into_base  # noqa: E402
from jpeft.methods.base import Layout  # noqa: E402
from jpeft.tree import get_subtree  # noqa: E402


def lora(A, B, scale, path=""):
    A, B = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)
    lay = Layout("dense", (A.shape[0], B.shape[1]), (0,), (1,))
    return {path: jpeft.LoraWeights(A, B, None, float(scale), lay, 0.0)}


# Δ1 = 0.5 * [[1],[0]] @ [[2, 0]] = [[1, 0], [0, 0]]
A1 = lora([[1.0], [0.0]], [[2.0, 0.0]], 0.5)
# rsLoRA, r = 4, alpha = 2: scale = 2 / sqrt(4) = 1 (plain LoRA would give 0.5)
_rs = jpeft.LoraConfig(r=4, alpha=2, use_rslora=True, target_modules=".*")
A2 = lora([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], [[1.0, 3.0], [0, 0], [0, 0], [0, 0]], _rs.scale(4, 2))


def test_linear_hand_computed_and_rslora_aware():
    assert _rs.scale(4, 2) == 1.0
    d = merge_deltas([A1, A2], [2.0, -1.0], method="linear")[""]
    np.testing.assert_allclose(d, [[2.0, 0.0], [-1.0, -3.0]], atol=1e-7)
    # as an adapter: exact (no truncation), rank 1 + 4, scale 1
    m = merge_adapters([A1, A2], [2.0, -1.0], method="linear")[""]
    assert m.r == 5 and m.scale == 1.0
    np.testing.assert_allclose(m.delta_matrix(), [[2.0, 0.0], [-1.0, -3.0]], atol=1e-7)
    # weights default to 1 (task arithmetic)
    np.testing.assert_allclose(merge_deltas([A1, A2])[""], [[1.0, 0.0], [1.0, 3.0]], atol=1e-7)


def test_cat_is_the_exact_concatenation():
    m = merge_adapters([A1, A2], [2.0, -1.0], method="cat")[""]
    # A = [A1 | A2], B = [w1 s1 B1 ; w2 s2 B2]
    np.testing.assert_allclose(m.lora_A, [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    np.testing.assert_allclose(m.lora_B[:2], [[2.0, 0.0], [-1.0, -3.0]])
    np.testing.assert_allclose(m.lora_B[2:], 0.0)
    # a site only one adapter has: the other contributes nothing
    extra = lora([[1.0], [1.0]], [[1.0, 1.0]], 2.0, path="other")
    mm = merge_adapters([{**A1, **extra}, A2], [1.0, 3.0], method="cat")
    assert mm["other"].r == 1
    np.testing.assert_allclose(mm["other"].delta_matrix(), 2.0 * np.ones((2, 2)))
    with pytest.raises(ConfigError, match="'cat' is exact"):
        merge_adapters([A1, A2], method="cat", rank=2)


def test_ties_hand_computed():
    t1 = lora([[1.0]], [[3.0, -1.0, 2.0, 0.5]], 1.0)
    t2 = lora([[1.0]], [[-1.0, -2.0, -4.0, 1.0]], 1.0)
    # trim to the top half: [3,0,2,0] and [0,-2,-4,0]; elected sign of the sum [3,-2,-2,0]: + - - +;
    # disjoint mean of the weighted agreeing entries
    d = merge_deltas([t1, t2], [1.0, 1.0], method="ties", density=0.5)[""]
    np.testing.assert_allclose(d, [[3.0, -2.0, -4.0, 0.0]])
    d = merge_deltas([t1, t2], [2.0, 0.5], method="ties", density=0.5)[""]
    np.testing.assert_allclose(d, [[6.0, -1.0, -2.0, 0.0]])
    # "frequency" elects by counting signs: [1,-1,0,0] -> + - + +
    d = merge_deltas([t1, t2], [2.0, 0.5], method="ties", density=0.5, majority_sign="frequency")[""]
    np.testing.assert_allclose(d, [[6.0, -1.0, 4.0, 0.0]])


def test_dare_ties_with_density_one_is_sign_election_and_disjoint_mean():
    t1 = lora([[1.0]], [[3.0, -1.0, 2.0, 0.5]], 1.0)
    t2 = lora([[1.0]], [[-1.0, -2.0, -4.0, 1.0]], 1.0)
    d = merge_deltas([t1, t2], method="dare_ties", density=1.0, key=jax.random.key(0))[""]
    np.testing.assert_allclose(d, [[3.0, -1.5, -4.0, 0.75]])
    d = merge_deltas([t1, t2], [1.0, 2.0], method="dare_linear", density=1.0, key=jax.random.key(0))[""]
    np.testing.assert_allclose(d, [[1.0, -5.0, -6.0, 2.5]])


def test_ties_matches_hugging_face_peft():
    torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
    from peft.utils import merge_utils

    keys = jax.random.split(jax.random.key(1), 6)
    ads = [lora(jax.random.normal(keys[2 * i], (6, 2)), jax.random.normal(keys[2 * i + 1], (2, 5)), 0.5 + i) for i in range(3)]
    w = [1.0, 0.5, 2.0]
    deltas = [torch.tensor(np.asarray(a[""].delta_matrix())) for a in ads]
    for sign in ("total", "frequency"):
        ref = merge_utils.ties(deltas, torch.tensor(w), 0.4, sign).numpy()
        got = merge_deltas(ads, w, method="ties", density=0.4, majority_sign=sign)[""]
        np.testing.assert_allclose(got, ref, atol=1e-6)
    ref = merge_utils.task_arithmetic(deltas, torch.tensor(w)).numpy()
    np.testing.assert_allclose(merge_deltas(ads, w, method="linear")[""], ref, atol=1e-6)


def test_dare_rescaling_in_expectation():
    n = 120
    ones = lora(jnp.ones((n, 1)), jnp.ones((1, n)), 1.0)
    p = 0.3
    d = np.asarray(merge_deltas([ones], method="dare_linear", density=p, key=jax.random.key(3))[""])
    kept = d != 0
    # kept entries are rescaled by exactly 1/density; about a density fraction is kept
    np.testing.assert_allclose(d[kept], 1.0 / p, rtol=1e-6)
    assert abs(kept.mean() - p) < 4 * np.sqrt(p * (1 - p) / n**2)
    # the mean over entries is the original value (sd of the mean: sqrt((1-p)/p)/n)
    assert abs(d.mean() - 1.0) < 4 * np.sqrt((1 - p) / p) / n
    # and over many draws every entry of a non-uniform merge averages to the linear merge
    t = [jax.random.normal(k, (4, 5)) for k in jax.random.split(jax.random.key(4), 2)]
    w = [1.0, -0.5]
    draws = 4000
    keys = jax.random.split(jax.random.key(5), draws)
    many = jax.jit(jax.vmap(lambda k: combine(t, w, "dare_linear", density=0.5, key=k)))(keys)
    lin = combine(t, w, "linear")
    # per-entry sd of one draw: sqrt(sum_i w_i^2 t_i^2 (1-p)/p)
    sd = jnp.sqrt(sum((wi * ti) ** 2 for wi, ti in zip(w, t)) * (1 - 0.5) / 0.5) / np.sqrt(draws)
    assert bool(jnp.all(jnp.abs(many.mean(0) - lin) < 5 * sd + 1e-6))
    np.testing.assert_allclose(many.std(0), sd * np.sqrt(draws), rtol=0.1)  # and each draw really varies that much


def test_svd_truncation_is_the_best_low_rank_approximation():
    keys = jax.random.split(jax.random.key(7), 4)
    a = lora(jax.random.normal(keys[0], (7, 2)), jax.random.normal(keys[1], (2, 6)), 0.7)
    b = lora(jax.random.normal(keys[2], (7, 3)), jax.random.normal(keys[3], (3, 6)), 1.3)
    full = np.asarray(merge_deltas([a, b], [1.0, 0.5])[""])
    u, s, vt = np.linalg.svd(full)
    for r in (1, 3):
        m = merge_adapters([a, b], [1.0, 0.5], method="svd", rank=r)[""]
        assert m.r == r
        np.testing.assert_allclose(m.delta_matrix(), (u[:, :r] * s[:r]) @ vt[:r], atol=1e-4)
    assert merge_adapters([a, b], [1.0, 0.5], method="svd")[""].r == 3  # default: the largest input rank
    np.testing.assert_allclose(merge_adapters([a, b], [1.0, 0.5], method="svd", rank=5)[""].delta_matrix(), full, atol=1e-4)
    m = merge_adapters([a, b], [1.0, 0.5], method="ties", density=0.5, rank="full")[""]
    np.testing.assert_allclose(m.delta_matrix(), merge_deltas([a, b], [1.0, 0.5], method="ties", density=0.5)[""], atol=1e-4)


def test_merge_into_base_for_single_tenant_serving():
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 5))
    params = model.init(jax.random.key(1), x)
    cfg = jpeft.LoraConfig(r=2, alpha=3, target_modules=".*", init_weights="random")
    a = jpeft.init(cfg, params, jax.random.key(2))
    b = jpeft.init(cfg.replace(r=3, use_rslora=True), params, jax.random.key(3))
    # one adapter: the same as jpeft.merge
    one = merge_into_base(params, [a])
    for k1, k2 in zip(jax.tree.leaves(one), jax.tree.leaves(jpeft.merge(params, a))):
        np.testing.assert_allclose(k1, k2, atol=1e-6)
    # two: the base model on the merged params equals the factored exact merge
    merged = merge_into_base(params, [a, b], [0.7, 0.3])
    cat = merge_adapters([a, b], [0.7, 0.3], method="cat")
    np.testing.assert_allclose(model.apply(merged, x), jpeft.apply(model, params, cat, x), atol=1e-5)
    # TIES into the base: base kernel + the TIES update
    tm = merge_into_base(params, [a, b], method="ties", density=0.5)
    d = merge_deltas([a, b], method="ties", density=0.5)
    for path in d:
        layer = path.split("/")[-1]
        np.testing.assert_allclose(tm["params"][layer]["kernel"], params["params"][layer]["kernel"] + d[path], atol=1e-6)
    # an adapter for another base
    other = nn.Dense(4).init(jax.random.key(4), jnp.ones((1, 9)))
    with pytest.raises(ShapeMismatchError, match="params do not have"):
        merge_into_base(other, [a])


def test_merge_errors():
    with pytest.raises(ConfigError, match=r"unknown merge method 'mean'; choose one of \('linear', 'cat'"):
        merge_deltas([A1], method="mean")
    with pytest.raises(ConfigError, match="'ties' needs density in \\(0, 1\\]"):
        merge_deltas([A1, A2], method="ties")
    with pytest.raises(ConfigError, match="pass key=jax.random.key"):
        merge_deltas([A1, A2], method="dare_linear", density=0.5)
    with pytest.raises(ConfigError, match="got 2 adapters but 1 weights"):
        merge_deltas([A1, A2], [1.0])
    with pytest.raises(ConfigError, match="takes a list of adapters"):
        merge_deltas(A1)
    with pytest.raises(ShapeMismatchError, match="different base models"):
        merge_deltas([A1, lora([[1.0]], [[1.0]], 1.0)])
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    dora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", use_dora=True), params, jax.random.key(1))
    with pytest.raises(NotMergeableError, match="DoRA") as err:
        merge_adapters([dora])
    assert "layer-scanned" not in str(err.value)  # the stacked-site hint only where a site is stacked


class _TiedLM(nn.Module):
    """An embedding that is also the output projection (``attend``), as in tied LMs."""

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(20, 8, name="embed_tokens")
        return e.attend(nn.Dense(8, name="q_proj")(e(ids)))


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_merging_keeps_an_embeddings_tied_output_update(method):
    """A LoRA on a tied embedding with ensure_weight_tying acts on the lookup and the output
    projection; a merged adapter must do both, or half the update is silently lost."""
    ids = jnp.array([[1, 5, 7, 3]])
    params = _TiedLM().init(jax.random.key(2), ids)
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=["embed_tokens", "q_proj"], init_weights="random",
                           ensure_weight_tying=True)
    a, b = (jpeft.init(cfg, params, jax.random.key(k), _TiedLM(), ids) for k in (5, 6))
    w = [0.7, -0.4]
    merged = merge_adapters([a, b], w, method=method, rank="full" if method == "svd" else None)
    assert merged["embed_tokens"].tie_output and merged["embed_tokens"].tied_output
    base = np.asarray(_TiedLM().apply(params, ids))
    one = merge_adapters([a], [1.0], method=method, rank="full" if method == "svd" else None)
    alone = np.asarray(jpeft.apply(_TiedLM(), params, a, ids))
    np.testing.assert_allclose(np.asarray(jpeft.apply(_TiedLM(), params, one, ids)), alone, rtol=1e-5, atol=1e-4)
    assert np.abs(alone - base).max() > 1.0  # the adapter really moves the logits
    # and folded into the base (the tied weight carries both halves), as jpeft.merge does
    folded = np.asarray(_TiedLM().apply(merge_into_base(params, [a], [1.0]), ids))
    np.testing.assert_allclose(folded, alone, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(_TiedLM().apply(jpeft.merge(params, one), ids)), alone, rtol=1e-5, atol=1e-4)
    # two adapters (the logits are not linear in an update that acts at both ends, so compare
    # weights): the merged adapter and the folded base carry the weighted sum of the updates
    want = params["params"]["embed_tokens"]["embedding"] + sum(
        wi * ad["embed_tokens"].kernel_delta() for wi, ad in zip(w, [a, b]))
    np.testing.assert_allclose(jpeft.merge(params, merged)["params"]["embed_tokens"]["embedding"], want, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(merge_into_base(params, [a, b], w)["params"]["embed_tokens"]["embedding"], want,
                               rtol=1e-5, atol=1e-6)


def test_merging_refuses_what_would_change_a_tied_output():
    ids = jnp.array([[1, 5, 7, 3]])
    params = _TiedLM().init(jax.random.key(2), ids)
    lookup_only = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["embed_tokens"], init_weights="random"), params,
                             jax.random.key(5), _TiedLM(), ids)
    both = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["embed_tokens"], init_weights="random", ensure_weight_tying=True),
                      params, jax.random.key(6), _TiedLM(), ids)
    # folding a lookup-only update into the shared weight would change the output projection:
    # refused as jpeft.merge refuses it
    with pytest.raises(NotMergeableError, match="tied output projection"):
        jpeft.merge(params, lookup_only)
    with pytest.raises(NotMergeableError, match="tied output projection"):
        merge_into_base(params, [lookup_only], [1.0])
    with pytest.raises(NotMergeableError, match="tied output projection"):
        jpeft.merge(params, merge_adapters([lookup_only], [1.0]))
    # a lookup-only merged adapter stays usable unmerged, equal to the adapter alone
    np.testing.assert_allclose(np.asarray(jpeft.apply(_TiedLM(), params, merge_adapters([lookup_only]), ids)),
                               np.asarray(jpeft.apply(_TiedLM(), params, lookup_only, ids)), rtol=1e-5, atol=1e-5)
    # updates that act on different places have no single merged adapter
    with pytest.raises(NotMergeableError, match=r"adapter 1 adapts the tied output projection.*adapter 0 does not"):
        merge_adapters([lookup_only, both])


def test_merge_refuses_non_finite_weights_and_wrong_types_by_name():
    a, b = A1, lora([[0.5], [1.0]], [[1.0, -2.0]], 1.0)
    # a NaN or infinite weight made every merged base weight NaN, silently
    for w in ([float("nan"), 1.0], [1.0, float("inf")]):
        with pytest.raises(ConfigError, match="weights must be finite"):
            merge_into_base({"params": {"kernel": jnp.ones((2, 2))}}, [a, b], w)
    # these ended in a TypeError or ValueError from inside the merge
    with pytest.raises(ConfigError, match="weights must be a list of numbers"):
        merge_adapters([a, b], 0.5)
    with pytest.raises(ConfigError, match="weights must be a list of numbers"):
        merge_adapters([a, b], ["x", 1.0])
    with pytest.raises(ConfigError, match="needs density in"):
        merge_deltas([a, b], method="ties", density="0.5")
    with pytest.raises(ConfigError, match="pass key=jax.random.key"):
        merge_deltas([a, b], method="dare_linear", density=0.5, key=0)
    with pytest.raises(ConfigError, match="rank must be a positive integer"):
        merge_adapters([a, b], method="svd", rank=True)
    # an adapter that is not one: a model's params, or the (config, adapter) pair of jpeft.load_adapter (a raw
    # AttributeError: 'dict' object has no attribute 'low_rank')
    with pytest.raises(ConfigError, match="adapter 1: the adapter's entry 'params' is a dict, not an adapter node"):
        merge_adapters([a, {"params": {"kernel": jnp.ones((2, 2))}}])
    with pytest.raises(ConfigError, match=r"adapter 0 takes an adapter.*found tuple \(jpeft.load_adapter"):
        merge_into_base({"params": {"kernel": jnp.ones((2, 2))}}, [(None, a), b])
    # what is accepted still works: NumPy/JAX scalars, a raw uint32 key
    d = merge_deltas([a, b], np.array([2.0, -1.0]), method="dare_ties", density=jnp.float32(1.0),
                     key=jax.random.PRNGKey(0))[""]
    np.testing.assert_allclose(d, merge_deltas([a, b], [2.0, -1.0], method="ties", density=1.0)[""], atol=1e-6)


@pytest.mark.parametrize("method,kw", [("svd", {}), ("ties", {"density": 0.5}), ("cat", {})])
def test_a_merged_adapter_saved_with_its_inputs_config_loads_back_unchanged(method, kw, tmp_path):
    """A merged adapter has scale 1 and its own ranks; saved with the inputs' config
    (alpha / r = 8 here) it loaded with scale 8 (svd, ties: every update 8x, silently) or not at
    all (cat: rank 2 + 3 against the config's 2)."""
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (2, 5))
    params = model.init(jax.random.key(1), x)
    cfg = jpeft.LoraConfig(r=2, alpha=16, target_modules=".*", init_weights="random")
    a = jpeft.init(cfg, params, jax.random.key(2))
    b = jpeft.init(cfg.replace(r=3, use_rslora=True), params, jax.random.key(3))
    a, b = (jax.tree.map(lambda t: t + 0.3, ad) for ad in (a, b))  # B random too
    merged = merge_adapters([a, b], [0.5, -1.5], method=method, **kw)
    jpeft.save_adapter(tmp_path / "m", cfg, merged, params=params)
    _, back = jpeft.load_adapter(tmp_path / "m", params)
    for path in merged:
        np.testing.assert_allclose(back[path].delta_matrix(), merged[path].delta_matrix(), atol=1e-5)
    np.testing.assert_allclose(jpeft.apply(model, params, back, x), jpeft.apply(model, params, merged, x), atol=1e-5)
    # an adapter that agrees with its config is saved with the config as given
    jpeft.save_adapter(tmp_path / "a", cfg, a, params=params)
    assert jpeft.load_adapter(tmp_path / "a", params)[0] == cfg


@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_merge_into_base_on_a_quantized_base_equals_jpeft_merge(scheme):
    # an NF4 base raised AttributeError ('NF4Array' object has no attribute 'astype'), int8 a TypeError
    params = nn.Dense(64).init(jax.random.key(0), jnp.ones((1, 64)))
    q = jpeft.quantize(params, scheme)
    a, b = (jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(i)) for i in (1, 2))
    a, b = (jax.tree.map(lambda t: t + 0.1, x) for x in (a, b))  # B random too
    got = merge_into_base(q, [a, b], [0.5, -2.0])["params"]["kernel"]
    want = jpeft.merge(q, merge_adapters([a, b], [0.5, -2.0], method="cat"))["params"]["kernel"]
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(merge_into_base(q, [a])["params"]["kernel"], jpeft.merge(q, a)["params"]["kernel"], atol=1e-6)


def test_dare_draws_do_not_depend_on_the_order_of_the_sites():
    """DARE's per-site key was folded from the site's index in the adapters' dict order: the same
    adapters and key with the sites listed in another order (a save/load, a dict rebuilt, a site
    only some adapters have) dropped other entries (3.2 off on a 2.9-sized update)."""
    rng = np.random.default_rng(0)

    def ad(paths):
        return {p: next(iter(lora(rng.normal(size=(6, 2)), rng.normal(size=(2, 5)), 0.5, p).values())) for p in paths}

    a, b = ad(["x", "y", "z"]), ad(["x", "y", "z"])
    key = jax.random.key(7)
    want = merge_deltas([a, b], method="dare_ties", density=0.5, key=key)
    rev = lambda d: dict(reversed(list(d.items())))  # noqa: E731
    got = merge_deltas([rev(a), rev(b)], method="dare_ties", density=0.5, key=key)
    # a site the first adapter lacks moves the shared ones in the merged site order
    only_b = merge_deltas([{"y": a["y"]}, {"x": b["x"], "y": b["y"]}], method="dare_linear", density=0.5, key=key)
    with_both = merge_deltas([{"x": a["x"], "y": a["y"]}, {"x": b["x"], "y": b["y"]}], method="dare_linear",
                             density=0.5, key=key)
    for p in want:
        np.testing.assert_array_equal(got[p], want[p])
    np.testing.assert_array_equal(only_b["y"], with_both["y"])


@pytest.mark.parametrize("init", ["init_pissa", "init_olora"])
def test_residual_base_adapters_are_refused_by_name(init, tmp_path):
    """A PiSSA/OLoRA adapter's s*A@B is relative to the residual base its init returned: merged, the
    residual mark was dropped, so save_peft wrote a plain LoRA that PEFT applied to the original
    weights (2.3 off in the logits of a tiny Llama, repros/r2_pissa_merge_export.py), and a merge
    with other adapters added updates of two different bases. Merging and the bank refuse it."""
    from jpeft.errors import BankError

    model = nn.Dense(5)
    params = model.init(jax.random.key(0), jnp.ones((1, 6)))
    residual, res = getattr(jpeft, init)(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    plain = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="random"), params, jax.random.key(2))
    for call in (lambda: merge_adapters([res], method="svd", rank=2), lambda: merge_adapters([plain, res], method="cat"),
                 lambda: merge_deltas([plain, res]), lambda: merge_into_base(params, [res])):
        with pytest.raises(NotMergeableError, match=r"adapter \d at '' comes from jpeft.init_.*residual base.*"
                                                    r"jpeft.convert_residual_adapter\(adapter, original_params"):
            call()
    with pytest.raises(BankError, match="residual base.*jpeft.convert_residual_adapter"):
        jpeft.AdapterBank.from_adapters({"p": res})
    assert merge_adapters([plain], method="cat")[""].r == 2  # plain LoRA still merges
    # converted to a plain LoRA of the original params (what the messages name), it merges as its residual model
    res = jax.tree.map(lambda a: a + 0.3, res)  # "trained"
    conv = jpeft.convert_residual_adapter(res, params, residual)
    np.testing.assert_allclose(merge_into_base(params, [conv])["params"]["kernel"],
                               jpeft.merge(residual, res)["params"]["kernel"], atol=1e-5)


def test_combine_refuses_bad_input_by_name():
    """combine is public: one weight for two tensors broadcast silently (t1 - t2 came out as
    t1 + t2 with weight 1 each), and a missing density or key failed deep inside JAX."""
    t = [jnp.ones((2, 3)), -jnp.ones((2, 3))]
    with pytest.raises(ConfigError, match=r"got 2 tensors but weights of shape \(1,\)"):
        combine(t, [1.0], "linear")
    with pytest.raises(ConfigError, match="'ties' needs density in \\(0, 1\\]"):
        combine(t, [1.0, 1.0], "ties")
    with pytest.raises(ConfigError, match="'ties' needs density"):
        combine(t, [1.0, 1.0], "ties", density=1.5)
    with pytest.raises(ConfigError, match="pass key=jax.random.key"):
        combine(t, [1.0, 1.0], "dare_linear", density=0.5)
    with pytest.raises(ConfigError, match="unknown merge method"):
        combine(t, [1.0, 1.0], "mean")
    np.testing.assert_allclose(combine(t, [1.0, -1.0], "linear"), 2.0 * np.ones((2, 3)))


def test_merge_into_base_of_an_nnx_module_is_a_merged_module_as_jpeft_merge():
    """jpeft.merge takes an nnx.Module and returns a merged one; merge_into_base read the module as
    a params dict and ended in a ShapeMismatchError ("a site 'l1' that the params do not have"),
    and could not refuse a site whose kernel another module shares."""
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self):
            self.l1 = nnx.Linear(5, 6, rngs=nnx.Rngs(0))
            self.l2 = nnx.Linear(6, 6, rngs=nnx.Rngs(1))
            self.head = nnx.Linear(6, 3, rngs=nnx.Rngs(2))

        def __call__(self, x):
            return self.head(nnx.relu(self.l2(nnx.relu(self.l1(x)))))

    model, x = Net(), jax.random.normal(jax.random.key(0), (2, 5))
    cfg = jpeft.LoraConfig(r=2, alpha=3, target_modules=".*", init_weights="random")
    a, b = (jax.tree.map(lambda t: t + 0.3, jpeft.init(c, model, jax.random.key(i)))  # B random too
            for i, c in ((1, cfg), (2, cfg.replace(r=3, use_rslora=True))))
    w = [0.7, -1.2]
    merged = merge_into_base(model, [a, b], w)
    assert isinstance(merged, nnx.Module) and merged is not model
    want = jpeft.apply(model, None, merge_adapters([a, b], w, method="cat"), x)
    assert float(jnp.abs(want - model(x)).max()) > 0.1  # the update really moves the output
    np.testing.assert_allclose(merged(x), want, atol=1e-5)
    _, state = nnx.split(model)
    np.testing.assert_allclose(nnx.merge(nnx.split(model)[0], merge_into_base(state, [a, b], w))(x), want, atol=1e-5)
    # a lora_bias input: its weighted bias folds into the module's bias too
    c = T.randomize_adapter(jpeft.init(cfg.replace(lora_bias=True), model, jax.random.key(3)), seed=4)
    want = jpeft.apply(model, None, merge_adapters([a, c], w, method="cat"), x)
    np.testing.assert_allclose(merge_into_base(model, [a, c], w)(x), want, atol=1e-5)

    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
            self.b = nnx.Linear(4, 4, rngs=nnx.Rngs(1))
            self.b.kernel = self.a.kernel

        def __call__(self, x):
            return self.b(self.a(x))

    tied = Tied()
    ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["a"], init_weights="random"), tied, jax.random.key(3))
    with pytest.raises(NotMergeableError, match=r"site 'a' is on a module whose weights another.*b/kernel"):
        merge_into_base(tied, [ad])


@pytest.mark.parametrize("config", [jpeft.VeraConfig(r=4, target_modules=".*"),
                                    jpeft.AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=".*")],
                         ids=["vera", "adalora"])
def test_a_merged_vera_or_adalora_adapter_is_saved_as_lora_not_with_its_inputs_config(config, tmp_path):
    """Merging VeRA or AdaLoRA adapters gives a LoRA adapter; save_adapter wrote it with the inputs'
    config without a word, and load_adapter then failed ("does not fit this base ... saved for another
    model?"): the merge was lost. It is refused by name; saved with a LoraConfig it loads back."""
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (2, 5))
    params = model.init(jax.random.key(1), x)
    a, b = (jax.tree.map(lambda t: t + 0.3, jpeft.init(config, params, jax.random.key(i))) for i in (2, 3))
    merged = merge_adapters([a, b], [0.5, -1.5], method="cat")
    with pytest.raises(ConfigError, match=r"makes \['.*Weights'.*\] sites\) holds a LoraWeights.*"
                                          r"jpeft.LoraConfig"):
        jpeft.save_adapter(tmp_path / "m", config, merged, params=params)
    assert not (tmp_path / "m").exists()
    jpeft.save_adapter(tmp_path / "m", jpeft.LoraConfig(target_modules=".*"), merged, params=params)
    _, back = jpeft.load_adapter(tmp_path / "m", params)
    want = jpeft.apply(model, params, merged, x)
    assert float(jnp.abs(want - model.apply(params, x)).max()) > 0.1  # the merged update moves the output
    np.testing.assert_allclose(jpeft.apply(model, params, back, x), want, atol=1e-5)


def _peft_llama(tmp_path_factory, cfgs: dict, *, seed: int, batch_seed: int, family: str = "llama2"):
    """A tiny ``family`` model (default Llama) under PEFT with the LoRA adapters ``cfgs`` (name ->
    LoraConfig keywords), every tensor random; each loaded into jpeft; the two models' logits on a
    batch (a decoder's at its real tokens, BERT's per sequence); and ``(model, params, folder, hf)``."""
    import os
    import sys
    import warnings

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as T
    from jpeft import hf as H, models as M

    hf, folder = T.hf_model(family)
    model, params = M.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out for GPT-2's Conv1D
        pm = T.peft_with_adapters(hf, cfgs, seed=seed)
    tmp_path = tmp_path_factory.mktemp(f"peft_{family}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(tmp_path))
    ads = [H.load_peft(str(tmp_path / n), params)[1] for n in cfgs]
    ids, mask = T.batch(family, seed=batch_seed)
    sel = slice(None) if family == "bert" else mask == 1

    def peft_logits(name):
        pm.set_adapter(name)
        return T.peft_logits(pm, ids, mask, with_positions=family != "bert")[sel]

    def jpeft_logits(adapter, base=None):
        out = jpeft.apply(model, params if base is None else base, adapter, jnp.asarray(ids),
                          attention_mask=jnp.asarray(mask))
        return np.asarray(out)[sel]

    return pm, ads, peft_logits, jpeft_logits, (model, params, folder, hf)


@pytest.fixture(scope="module")
def peft_llama(tmp_path_factory):
    """A tiny Llama under PEFT with LoRA adapters ``x1`` (embed_tokens too) and ``x2`` (rsLoRA,
    lm_head too), every factor random; each loaded into jpeft; and the two models' logits."""
    cfgs = {"x1": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
            "x2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "lm_head"])}
    return _peft_llama(tmp_path_factory, cfgs, seed=0, batch_seed=3)[:4]


@pytest.mark.parametrize("method,kw", [
    ("linear", {}), ("ties", {"density": 0.5}), ("ties", {"density": 0.5, "majority_sign_method": "frequency"}),
    ("magnitude_prune", {"density": 0.3}), ("dare_ties", {"density": 1.0})], ids=lambda v: str(v))  # DARE at 1: no drop
def test_factors_true_gives_pefts_add_weighted_adapter(peft_llama, method, kw):
    """PEFT's add_weighted_adapter applies "linear", "ties", "dare_*" and "magnitude_prune" to the A and
    B factors separately; jpeft's methods of those names merge the updates, so PEFT code ported as it
    stands got another model without a word (logits 20 off on a tiny Llama for "linear", 27 for "ties"),
    and PEFT's numbers were out of reach. factors=True gives them."""
    pm, ads, peft_logits, jpeft_logits = peft_llama
    w = [0.7, -1.3]
    name = f"factors_{method}_{kw.get('majority_sign_method', 'total')}"
    pm.add_weighted_adapter(["x1", "x2"], w, name, combination_type=method, **kw)
    jkw = {"density": kw.get("density"), "majority_sign": kw.get("majority_sign_method", "total"),
           "key": jax.random.key(0) if method.startswith("dare") else None}
    ref = peft_logits(name)
    np.testing.assert_allclose(jpeft_logits(merge_adapters(ads, w, method=method, factors=True, **jkw)), ref, atol=2e-4)
    if method == "linear":  # the default merges the updates: another model, as documented
        assert np.abs(jpeft_logits(merge_adapters(ads, w, method=method)) - ref).max() > 1.0


@pytest.mark.parametrize("method, kw, ours, new_rank", [
    ("cat", {}, dict(method="cat"), 8), ("linear", {}, dict(method="linear", factors=True), 4),
    ("svd", {"svd_rank": 8}, dict(method="svd", rank=8), 8)], ids=["cat", "linear_factors", "svd"])
def test_rslora_first_in_add_weighted_adapter(peft_llama, method, kw, ours, new_rank):
    """add_weighted_adapter gives the merged adapter the first input's config with r = lora_alpha = the
    new rank: PEFT 0.21 kept that input's use_rslora, so with the rsLoRA adapter first it scaled the
    merged update by sqrt(new rank) (logits 11 to 16 off jpeft's merge on a tiny Llama); PEFT 0.22 sets
    use_rslora=False and gives jpeft's merge. Each version's numbers, from jpeft's merged adapter."""
    import _models_tiny as T

    pm, ads, peft_logits, jpeft_logits = peft_llama
    w = [0.7, -1.3]
    name = f"rs_first_{method}"
    pm.add_weighted_adapter(["x2", "x1"], w, name, combination_type=method, **kw)
    merged = merge_adapters([ads[1], ads[0]], w, **ours)
    if not T.peft_at_least(0, 22):
        merged = {p: dataclasses.replace(n, scale=n.scale * new_rank ** 0.5) for p, n in merged.items()}
    np.testing.assert_allclose(jpeft_logits(merged), peft_logits(name), atol=2e-4)


def test_magnitude_prune_is_pefts_magnitude_prune_svd(peft_llama):
    """The update-space magnitude prune, factored by SVD to the largest input rank (the method was
    missing: PEFT code using it had no jpeft counterpart)."""
    pm, ads, peft_logits, jpeft_logits = peft_llama
    w = [0.7, -1.3]
    pm.add_weighted_adapter(["x1", "x2"], w, "mp_svd", combination_type="magnitude_prune_svd", density=0.3)
    got = merge_adapters(ads, w, method="magnitude_prune", density=0.3)
    np.testing.assert_allclose(jpeft_logits(got), peft_logits("mp_svd"), atol=5e-4)
    # and on the updates: each trimmed to its top 30 %, then the weighted sum
    d = merge_deltas(ads, w, method="magnitude_prune", density=0.3)
    path = "model/layers_0/self_attn/q_proj"
    want = sum(wi * np.asarray(magnitude_prune(ad[path].delta_matrix(), 0.3)) for wi, ad in zip(w, ads))
    np.testing.assert_allclose(d[path], want, atol=1e-6)


def test_factors_refuses_what_peft_cannot_combine_factor_wise():
    b = lora([[0.5, 1.0], [1.0, 0.0]], [[1.0, -2.0], [0.5, 0.5]], 1.0)  # rank 2 against A1's rank 1
    with pytest.raises(ConfigError, match=r"needs equal ranks; found ranks \[1, 2\] at ''"):
        merge_adapters([A1, b], method="linear", factors=True)
    with pytest.raises(ConfigError, match="factors=True combines the A and B factors separately.*found method 'svd'"):
        merge_adapters([A1, A1], method="svd", factors=True)
    with pytest.raises(ConfigError, match="factors=True keeps the inputs' rank"):
        merge_adapters([A1, A1], method="linear", rank=1, factors=True)
    # PEFT's *_svd names: the message names jpeft's method
    with pytest.raises(ConfigError, match=r"PEFT's 'ties_svd' combines the updates.*jpeft's 'ties'"):
        merge_adapters([A1, A1], method="ties_svd", density=0.5)
    # one adapter: PEFT merges it linearly, whatever the type
    one = merge_adapters([A1], [-2.0], method="ties", density=0.5, factors=True)[""]
    np.testing.assert_allclose(one.delta_matrix(), -2.0 * A1[""].delta_matrix(), atol=1e-6)


@pytest.fixture(scope="module")
def peft_bias_llama(tmp_path_factory):
    """A tiny Llama (biased attention and MLP) under PEFT with LoRA adapters ``b1`` (lora_bias),
    ``b2`` (rsLoRA, no lora_bias) and ``b3`` (lora_bias), every tensor random, the biases included;
    each loaded into jpeft; and the two models' logits."""
    cfgs = {"b1": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]),
            "b2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"]),
            "b3": dict(r=4, lora_alpha=5, lora_bias=True, target_modules=["q_proj", "down_proj"])}
    out = _peft_llama(tmp_path_factory, cfgs, seed=5, batch_seed=4)
    assert all(float(m.lora_B["b1"].bias.abs().min()) > 0 for n, m in out[0].named_modules() if n.endswith("v_proj"))
    return out


@pytest.mark.parametrize("method, kw, ours", [
    ("cat", {}, dict(method="cat")), ("linear", {}, dict(method="linear", factors=True)),
    ("svd", {}, dict(method="svd")), ("ties", {"density": 0.5}, dict(method="ties", density=0.5, factors=True)),
    ("magnitude_prune_svd", {"density": 0.3}, dict(method="magnitude_prune", density=0.3))],
    ids=["cat", "linear", "svd", "ties", "magnitude_prune_svd"])
def test_lora_bias_inputs_merge_as_pefts_add_weighted_adapter(peft_bias_llama, method, kw, ours):
    """Merging refused any adapter with a lora_bias. PEFT 0.22's add_weighted_adapter gives the merged
    adapter (scale 1) lora_bias=True when any input has one and the bias sum_i w_i s_i lora_bias_i
    at each site, whatever the combination type; jpeft now does too, for every type (logits equal to
    PEFT 0.22's, every tensor random, the biases included). PEFT 0.21 left that bias at zero: its
    logits are those of jpeft's merge with the biases dropped, and miss the inputs' biases."""
    import _models_tiny as T

    pm, ads, peft_logits, jpeft_logits, _ = peft_bias_llama
    w = [0.7, -1.3, 0.4]
    name = f"bias_{method}"
    pm.add_weighted_adapter(["b1", "b2", "b3"], w, name, combination_type=method, **kw)
    merged = merge_adapters(ads, w, **ours)
    path = "model/layers_0/self_attn/q_proj"
    want = w[0] * ads[0][path].scale * ads[0][path].lora_bias + w[2] * ads[2][path].scale * ads[2][path].lora_bias
    assert merged[path].scale == 1.0
    np.testing.assert_allclose(merged[path].lora_bias, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(merged["model/layers_0/self_attn/o_proj"].lora_bias, 0.0)  # b2 alone: no bias
    got, ref = jpeft_logits(merged), peft_logits(name)
    if T.peft_at_least(0, 22):
        np.testing.assert_allclose(got, ref, atol=1e-4)
    else:  # PEFT 0.21 drops the biases (2 to 3 logits off on this model)
        no_bias = {p: dataclasses.replace(n, lora_bias=jnp.zeros_like(n.lora_bias)) for p, n in merged.items()}
        np.testing.assert_allclose(jpeft_logits(no_bias), ref, atol=1e-4)
        assert np.abs(got - ref).max() > 1.0


def test_a_merged_lora_bias_adapter_saves_for_peft_and_what_is_still_refused(peft_bias_llama, tmp_path):
    """The merged adapter with its lora_bias saves as a PEFT lora_bias adapter that both PEFTs load to
    jpeft's logits. Still refused, by name: lora_bias inputs beside an embedding site in
    merge_adapters / merge_deltas (no bias there; PEFT 0.22 refuses too, PEFT 0.21 merged them without
    the biases). merge_into_base, which records no adapter, folds them: each input's update and bias
    as jpeft.merge folds it alone (it refused them)."""
    import copy
    import warnings

    import peft

    import _models_tiny as T
    from jpeft import hf as H

    pm, ads, _, jpeft_logits, (model, params, folder, hf) = peft_bias_llama
    merged = merge_adapters(ads, [0.7, -1.3, 0.4], method="cat")
    cfg = jpeft.LoraConfig(r=4, alpha=4, lora_bias=True, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    H.save_peft(str(tmp_path / "m"), cfg, merged, base_model_name_or_path=folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "m")).eval()
    ids, mask = T.batch("llama2", seed=4)
    np.testing.assert_allclose(jpeft_logits(merged), T.peft_logits(back, ids, mask)[mask == 1], atol=2e-4)

    cfg_e = jpeft.LoraConfig(r=4, target_modules=["embed_tokens"], init_weights="random")
    emb = jpeft.init(cfg_e, params, jax.random.key(3))
    with pytest.raises(NotMergeableError, match=r"have a lora_bias.*embedding\(s\) \['model/embed_tokens'\]"):
        merge_adapters([ads[0], emb], method="cat")
    if T.peft_at_least(0, 22):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_adapter("emb", peft.LoraConfig(r=4, target_modules=["embed_tokens"]))
        with pytest.raises(ValueError, match="does not support lora_bias combined with nn.Embedding"):
            pm.add_weighted_adapter(["b1", "emb"], [1.0, 1.0], "bias_emb", combination_type="cat")
    with pytest.raises(NotMergeableError, match=r"have a lora_bias.*embedding\(s\) \['model/embed_tokens'\]"):
        merge_deltas([ads[0], emb])
    emb = T.randomize_adapter(emb, seed=6)
    got = merge_into_base(params, [ads[0], emb], [0.7, -1.5])
    scaled = [{p: dataclasses.replace(n, scale=n.scale * w) for p, n in ad.items()} for ad, w in ((ads[0], 0.7), (emb, -1.5))]
    want = jpeft.merge(jpeft.merge(params, scaled[0]), scaled[1])
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-6), got, want)
    q = "model/layers_0/self_attn/q_proj"
    assert np.abs(np.asarray(get_subtree(got["params"], q)["bias"]) - get_subtree(params["params"], q)["bias"]).min() > 0


_BIAS_FAMILIES = {  # every target projection has a bias, but Qwen2's o_proj (adapted without a lora_bias)
    "gpt2": {"b1": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
             "b2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
             "b3": dict(r=4, lora_alpha=5, lora_bias=True, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)},
    "bert": {"b1": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["query", "value"]),
             "b2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["query", "key"]),
             "b3": dict(r=4, lora_alpha=5, lora_bias=True, target_modules=["query", "key"])},
    "qwen2": {"b1": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj", "v_proj"]),
              "b2": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "o_proj"]),
              "b3": dict(r=4, lora_alpha=5, lora_bias=True, target_modules=["q_proj", "k_proj"])},
}


@pytest.fixture(scope="module", params=list(_BIAS_FAMILIES))
def peft_bias_family(request, tmp_path_factory):
    """GPT-2 (Conv1D c_attn), BERT (query) and Qwen2 (q/k/v) under PEFT with lora_bias adapters b1 and b3
    and a plain rsLoRA b2, every tensor random, the biases included, each loaded into jpeft."""
    return request.param, _peft_llama(tmp_path_factory, _BIAS_FAMILIES[request.param], seed=5, batch_seed=4,
                                      family=request.param)


def test_merge_into_base_folds_lora_bias_as_pefts_merge_and_unload(peft_bias_family):
    """merge_into_base refused adapters with a lora_bias. Now it adds sum_i w_i s_i lora_bias_i to the base
    bias, whatever the method, as PEFT 0.22's add_weighted_adapter then merge_and_unload give the merged
    model (PEFT's *_svd types at full rank are jpeft's exact update-space merges): logits of the merged
    base equal PEFT's, every adapter tensor random. PEFT 0.21's merged adapter has a zero bias, so its
    merged model is jpeft's with the inputs' biases zeroed, and misses them. Qwen2's o_proj has no bias:
    PEFT's merged adapter (lora_bias=True everywhere; under 0.21 the first input's config) cannot merge
    there, and jpeft, which folds a bias only where an input has one, equals its unmerged forward."""
    import copy
    import warnings

    family, (pm, ads, peft_logits, jpeft_logits, (model, params, folder, hf)) = peft_bias_family
    w = [0.7, -1.3, 0.4]
    cases = [("cat", {}, dict(method="linear"))]
    if family != "qwen2":  # PEFT's SVD merge fails on Qwen2's [32, 16] k/v projections at svd_rank 32
        cases += [("ties_svd", {"density": 0.5, "svd_rank": 32}, dict(method="ties", density=0.5)),
                  ("magnitude_prune_svd", {"density": 0.3, "svd_rank": 32}, dict(method="magnitude_prune", density=0.3))]
    ids, mask = T.batch(family, seed=4)
    sel = slice(None) if family == "bert" else mask == 1
    no_bias = [{p: dataclasses.replace(n, lora_bias=None if n.lora_bias is None else jnp.zeros_like(n.lora_bias))
                for p, n in ad.items()} for ad in ads]
    for method, kw, ours in cases:
        name = f"fold_{method}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm.add_weighted_adapter(["b1", "b2", "b3"], w, name, combination_type=method, **kw)
        got = jpeft_logits({}, merge_into_base(params, ads, w, **ours))
        pm.set_adapter(name)
        if family == "qwen2":  # either PEFT's merged adapter has lora_bias=True at the bias-less o_proj
            with pytest.raises(RuntimeError, match="base layer has no bias"):
                copy.deepcopy(pm).merge_and_unload()
            ref = peft_logits(name)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                merged_hf = copy.deepcopy(pm).merge_and_unload().eval()
            ref = T.peft_logits(merged_hf, ids, mask, with_positions=family != "bert")[sel]
        if T.peft_at_least(0, 22):
            np.testing.assert_allclose(got, ref, atol=1e-4)
        else:
            np.testing.assert_allclose(jpeft_logits({}, merge_into_base(params, no_bias, w, **ours)), ref, atol=1e-4)
            assert np.abs(got - ref).max() > 0.1


@pytest.mark.parametrize("method, kw", [("linear", {}), ("svd", {}), ("ties", {"density": 0.5}),
                                        ("dare_ties", {"density": 0.5, "key": jax.random.key(3)}),
                                        ("dare_linear", {"density": 0.4, "key": jax.random.key(4)}),
                                        ("magnitude_prune", {"density": 0.5, "majority_sign": "frequency"})])
def test_merge_deltas_gives_the_merged_lora_bias_beside_each_kernel_update(method, kw):
    """merge_deltas refused lora_bias inputs. Now, once any input has one, each site is {"kernel": the
    update as without biases, "bias": sum_i w_i s_i lora_bias_i} (zero where no input has one; never
    trimmed or dropped), merge_adapters's bias, and merge_into_base folds both (a hand-built model)."""
    model = nn.Sequential([nn.Dense(6), nn.relu, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (4, 5))
    params = model.init(jax.random.key(1), x)
    cfg = jpeft.LoraConfig(r=2, alpha=3, target_modules=".*", init_weights="random", lora_bias=True)
    a = T.randomize_adapter(jpeft.init(cfg, params, jax.random.key(2)), seed=1)
    b = T.randomize_adapter(jpeft.init(cfg.replace(r=3, use_rslora=True, lora_bias=False), params, jax.random.key(3)), seed=2)
    c = T.randomize_adapter(jpeft.init(cfg.replace(target_modules=["layers_0"]), params, jax.random.key(4)), seed=3)
    w = [0.7, -1.3, 0.4]
    got = merge_deltas([a, b, c], w, method=method, **kw)
    plain = [{p: dataclasses.replace(n, lora_bias=None) for p, n in ad.items()} for ad in (a, b, c)]
    kernels = merge_deltas(plain, w, method=method, **kw)
    for path in ("layers_0", "layers_2"):
        want = w[0] * a[path].scale * a[path].lora_bias + (w[2] * c[path].scale * c[path].lora_bias if path in c else 0)
        np.testing.assert_allclose(got[path]["bias"], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got[path]["kernel"], kernels[path])
        if method != "svd":  # merge_adapters's SVD-truncated factors; its bias is exact
            continue
        np.testing.assert_allclose(merge_adapters([a, b, c], w, method=method, **kw)[path].lora_bias, want, rtol=1e-6)
    folded = merge_into_base(params, [a, b, c], w, method=method, **kw)
    for path in ("layers_0", "layers_2"):
        own = params["params"][path]
        np.testing.assert_allclose(folded["params"][path]["kernel"], own["kernel"] + got[path]["kernel"], atol=1e-6)
        np.testing.assert_allclose(folded["params"][path]["bias"], own["bias"] + got[path]["bias"], atol=1e-6)
    if method == "linear":  # the merged base computes what the inputs' weighted sum does
        cat = merge_adapters([a, b, c], w, method="cat")
        np.testing.assert_allclose(model.apply(folded, x), jpeft.apply(model, params, cat, x), atol=1e-5)


def test_merge_into_base_refuses_a_lora_bias_where_the_base_layer_has_none():
    """Qwen2's o_proj has no bias: an input's lora_bias there cannot be folded (jpeft.merge and PEFT's
    merge_and_unload refuse too), so merge_into_base refuses by name, naming the site and the inputs."""
    from jpeft import models as M

    _, params = M.from_pretrained(T.hf_model("qwen2")[1])
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj", "o_proj"], init_weights="random", lora_bias=True)
    a = T.randomize_adapter(jpeft.init(cfg, params, jax.random.key(0)), seed=1)
    b = T.randomize_adapter(jpeft.init(cfg.replace(target_modules=["q_proj"]), params, jax.random.key(1)), seed=2)
    with pytest.raises(NotMergeableError, match=r"adapters \[1\] have a lora_bias .* at 'model/layers_0/self_attn/"
                                                r"o_proj', but the base layer has no bias to fold the merged bias \[32\]"):
        merge_into_base(params, [b, a], [1.0, 0.5])
    with pytest.raises(NotMergeableError, match="the base layer has no bias"):
        jpeft.merge(params, a)
    merge_into_base(params, [b], [0.5])  # q_proj has a bias
