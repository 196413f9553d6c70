"""MiLoRA initialisation (minor singular components in the adapter, principal part in the base):
the residual plus the adapter reconstructs the base, against a torch SVD closed form and
against the minor subspace of Hugging Face PEFT's ``init_lora_weights="mica"`` on the same
weights (PEFT 0.21 has no MiLoRA init of its own)."""

import copy
import dataclasses
import json
import os
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402
import jpeft  # noqa: E402
import jpeft.hf  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft.cli.info_cmd import adapter_summary  # noqa: E402

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip


def _t(x):
    return np.asarray(x.detach().numpy())


def test_milora_reconstructs_base_and_holds_minor_components():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 9))
    w0 = _t(net[0].weight).copy()  # PEFT's [out, in]
    b0 = _t(net[0].bias).copy()
    r, alpha = 3, 6
    model = nn.Dense(9)
    params = {"params": {"kernel": jnp.asarray(w0.T), "bias": jnp.asarray(b0)}}
    res, ad = jpeft.init_milora(jpeft.LoraConfig(r=r, alpha=alpha, target_modules=".*"), params, jax.random.key(0))
    node = ad[""]
    assert node.residual == "milora"

    # closed form from torch's SVD: the minor part U[:, -r:] S[-r:] V[:, -r:]^T goes to the adapter
    u, s, vh = (_t(t) for t in torch.linalg.svd(torch.tensor(w0), full_matrices=False))
    minor = (u[:, -r:] * s[-r:]) @ vh[-r:]  # [out, in]
    np.testing.assert_allclose(node.delta_matrix(), minor.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(res["params"]["kernel"], (w0 - minor).T, rtol=1e-4, atol=1e-5)
    # each factor holds sqrt(S/scale) times its singular vectors (up to sign, as PiSSA's)
    scale = alpha / r
    np.testing.assert_allclose(np.abs(node.lora_B), np.abs(np.sqrt(s[-r:] / scale)[:, None] * u[:, -r:].T), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.abs(node.lora_A), np.abs(vh[-r:].T * np.sqrt(s[-r:] / scale)[None]), rtol=1e-4, atol=1e-5)

    # residual + adapter == the base, as a function and merged
    x = np.random.RandomState(0).randn(4, 12).astype(np.float32)
    np.testing.assert_allclose(jpeft.apply(model, res, ad, jnp.asarray(x)), model.apply(params, jnp.asarray(x)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(jpeft.merge(res, ad)["params"]["kernel"], w0.T, rtol=1e-5, atol=1e-5)
    # the base keeps the principal spectrum, rank min(in, out) - r
    s_res = np.linalg.svd(np.asarray(res["params"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(s_res[: 9 - r], s[: 9 - r], rtol=1e-4, atol=1e-5)
    assert s_res[9 - r:].max() < 1e-5

    # PEFT's MiCA init takes lora_B from the same minor left singular vectors: equal subspaces
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"], init_lora_weights="mica"))
    mica_B = _t(pm.base_model.model[0].lora_B["default"].weight)  # [out, r], orthonormal columns
    q, _ = np.linalg.qr(np.asarray(node.lora_B).T)  # jpeft's B^T spans the same out-space
    np.testing.assert_allclose(q @ q.T, mica_B @ mica_B.T, atol=1e-5)


def test_milora_refusals(tmp_path):
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    with pytest.raises(jpeft.ConfigError, match="init_milora"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="milora"), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="exceeds the rank"):
        jpeft.init_milora(jpeft.LoraConfig(r=4, target_modules=".*"), params, jax.random.key(0))
    res, ad = jpeft.init_milora(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(0))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="no MiLoRA init"):
        jpeft.hf.save_peft(str(tmp_path / "milora"), jpeft.LoraConfig(r=2, target_modules=".*", init_weights="milora"), ad, params=res)


def test_key_is_optional_where_it_is_unused():
    # init_milora / init_olora document their key as unused (init_corda takes None), but
    # key=None raised a bare TypeError from jax.random.split
    model = nn.Dense(3)
    params = model.init(jax.random.key(0), jnp.ones((1, 4)))
    cfg = jpeft.LoraConfig(r=2, alpha=2, target_modules=".*")
    for make in (jpeft.init_milora, jpeft.init_olora, jpeft.init_pissa):
        res, ad = make(cfg, params, None)
        ref_res, ref_ad = make(cfg, params, jax.random.key(3))
        np.testing.assert_allclose(ad[""].delta_matrix(), ref_ad[""].delta_matrix(), atol=1e-6)


# -- MiCA (Hugging Face PEFT's init_lora_weights="mica"): B the minor left singular vectors, frozen; A trained ---------

_MICA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # llama3: 32->32, 32->16 (2 kv heads), 32->64, 64->32


def _mica_base():
    hf, folder = tiny.hf_model("llama3")
    model, params = jpeft.models.from_pretrained(folder)
    return tiny, hf, folder, model, params


def _mica_peft(hf, r=4, alpha=8, seed=5):
    """PEFT's MiCA model of a copy of ``hf``, and its init's factors; then both factors random (as a trained
    file's), kept in the model."""
    pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=_MICA_TARGETS,
                                                                 init_lora_weights="mica"))
    init = {n: _t(p).copy() for n, p in pm.named_parameters() if "lora_" in n}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return pm, init


def _jpeft_name(n):  # base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight -> jpeft path, factor
    mod, factor = n.split(".lora_")
    return mod.replace("base_model.model.", "", 1).replace(".", "/").replace("layers/", "layers_"), "lora_" + factor[0]


def test_mica_init_equals_peft_and_b_is_frozen():
    tiny, hf, folder, model, params = _mica_base()
    pm, init = _mica_peft(hf)
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=_MICA_TARGETS, init_weights="mica")
    ad = jpeft.init(cfg, params, jax.random.key(0))
    assert sorted(ad) == sorted({_jpeft_name(n)[0] for n in init})
    for n, want in init.items():
        path, factor = _jpeft_name(n)
        node = ad[path]
        assert node.frozen_b and node.frozen == ("lora_B",) and node.residual is None
        got = np.asarray(getattr(node, factor)).T  # PEFT's orientation
        if factor == "lora_A":
            np.testing.assert_array_equal(got, want)  # zero: the adapter starts as the identity
            continue
        # B: orthonormal minor left singular vectors; each column's sign is the SVD routine's choice
        signs = np.sign(np.sum(got * want, axis=0))
        np.testing.assert_allclose(got * signs, want, atol=2e-5)
    ids = jnp.asarray(tiny.batch("llama3")[0])
    np.testing.assert_array_equal(jpeft.apply(model, params, ad, ids), model.apply(params, ids))
    train, frozen = jpeft.split_frozen(ad)
    assert all(n.lora_B is None and n.lora_A is not None for n in train.values())
    s = jpeft.summary(params, ad, print_fn=None)
    assert s["trainable"] == sum(p.numel() for n, p in pm.named_parameters() if p.requires_grad)
    # refusals, as PEFT's: r above min(in, out) (v_proj 32 -> 16), a conv module; combinations jpeft does not make
    with pytest.raises(jpeft.ConfigError, match="r <= min"):
        jpeft.init(cfg.replace(r=17), params, jax.random.key(0))
    with pytest.raises(jpeft.ConfigError, match="mica"):
        jpeft.LoraConfig(r=4, target_modules=".*", init_weights="mica", use_dora=True)
    conv = nn.Conv(4, (3, 3))
    with pytest.raises(jpeft.ConfigError, match="linear and embedding"):
        jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*", init_weights="mica"),
                   conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 3))), jax.random.key(0), conv, jnp.ones((1, 5, 5, 3)))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_mica_file_trains_a_only_as_peft(opt, tmp_path):
    """A PEFT MiCA file with both factors random loads with B frozen (no warning); one training step equals
    PEFT's (which trains lora_A only) and leaves B bit-identical."""
    tiny, hf, folder, model, params = _mica_base()
    pm, _ = _mica_peft(hf)
    pm.save_pretrained(str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, ad = jpeft.hf.load_peft(str(tmp_path), params)
    assert cfg.init_weights == "mica" and all(n.frozen_b for n in ad.values())
    ids_np = tiny.batch("llama3")[0]
    ids_np[ids_np == 0] = 3  # no padding: the loss is every next token's
    ids = jnp.asarray(ids_np)

    def loss_fn(p, a, batch, key=None):
        logp = jax.nn.log_softmax(jpeft.apply(model, p, a, batch)[:, :-1].astype(jnp.float32))
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    lr = 0.5 if opt == "sgd" else 1e-2
    tx = optax.sgd(lr) if opt == "sgd" else optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1)
    before = {p: (np.array(n.lora_A), np.array(n.lora_B)) for p, n in ad.items()}
    state = tx.init(jpeft.trainable(ad))
    # the optimizer state is built for A alone (AdamW: its two moments), none for the frozen B
    a_size = sum(n.lora_A.size for n in ad.values())
    assert sum(x.size for x in jax.tree.leaves(state) if x.ndim) == (0 if opt == "sgd" else 2 * a_size)
    new, _, _ = jpeft.make_train_step(loss_fn, tx, donate=False)(params, ad, state, ids, jax.random.key(1))

    pm.train()
    for m in pm.modules():  # no dropout in the tiny model; keep PEFT's forward deterministic anyway
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trained = [p for p in pm.parameters() if p.requires_grad]
    assert trained and all(n.split(".lora_")[1].startswith("A") for n, p in pm.named_parameters() if p.requires_grad)
    topt = (torch.optim.SGD(trained, lr=lr) if opt == "sgd"
            else torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1))
    t_ids = torch.tensor(ids_np)
    logits = pm(input_ids=t_ids).logits.float()
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), t_ids[:, 1:].reshape(-1))
    np.testing.assert_allclose(float(loss_fn(params, ad, ids)), float(loss), rtol=1e-5)
    loss.backward()
    topt.step()
    for n, p in pm.named_parameters():
        if "lora_" not in n:
            continue
        path, factor = _jpeft_name(n)
        got = np.asarray(getattr(new[path], factor))
        if factor == "lora_B":
            np.testing.assert_array_equal(got, before[path][1])  # frozen: bit-identical
            np.testing.assert_array_equal(got.T, _t(p))
        else:
            moved = before[path][0] - _t(p).T
            assert np.abs(moved).max() > 1e-4  # the step moved A
            np.testing.assert_allclose(before[path][0] - got, moved, rtol=2e-3, atol=2e-6)


def test_mica_saves_for_peft_and_jpeft_keeping_b_frozen(tmp_path):
    tiny, hf, folder, model, params = _mica_base()
    cfg = jpeft.LoraConfig(r=4, alpha=8, target_modules=_MICA_TARGETS, init_weights="mica")
    ad = jpeft.init(cfg, params, jax.random.key(0))
    keys = iter(jax.random.split(jax.random.key(3), 2 * len(ad)))
    ad = {p: dataclasses.replace(n, lora_A=0.3 * jax.random.normal(next(keys), n.lora_A.shape),
                                 lora_B=0.3 * jax.random.normal(next(keys), n.lora_B.shape)) for p, n in ad.items()}
    ids, mask = tiny.batch("llama3", seed=2)
    mine = np.asarray(jpeft.apply(model, params, ad, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    jpeft.hf.save_peft(str(tmp_path / "p"), cfg.replace(init_weights="default"), ad, base_model_name_or_path=folder)
    assert json.load(open(tmp_path / "p" / "adapter_config.json"))["init_lora_weights"] == "mica"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "p"), is_trainable=True)
    grads = {n: p.requires_grad for n, p in back.named_parameters() if "lora_" in n}
    assert grads and all(v == (".lora_A." in n) for n, v in grads.items())
    tiny.assert_close_at_tokens(mine, tiny.peft_logits(back.eval(), ids, mask), mask)
    jpeft.save_adapter(str(tmp_path / "own"), cfg, ad)
    cfg2, ad2 = jpeft.load_adapter(str(tmp_path / "own"), params)
    assert cfg2.init_weights == "mica" and jax.tree.structure(ad2) == jax.tree.structure(ad)
    for a, b in zip(jax.tree.leaves(ad2), jax.tree.leaves(ad)):
        np.testing.assert_array_equal(a, b)
    # jpeft info counts B as frozen, in both formats (it counted it as trained)
    sizes = (sum(n.lora_A.size for n in ad.values()), sum(n.lora_B.size for n in ad.values()))
    for folder_ in (tmp_path / "p", tmp_path / "own"):
        res = adapter_summary(str(folder_))
        assert (res["trainable_params"], res["frozen_params"]) == sizes
    merged = jpeft.merge(params, ad)
    tiny.assert_close_at_tokens(np.asarray(model.apply(merged, jnp.asarray(ids), attention_mask=jnp.asarray(mask))),
                                mine, mask)
    for a, b in zip(jax.tree.leaves(jpeft.unmerge(merged, ad)), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


# -- MiCA through merging and the adapter bank -------------------------------------------------------------------------
class _EmbedMlp(nn.Module):  # an embedding and two dense layers: MiCA's two kinds of site
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(16, name="out")(nn.Dense(12, name="mid")(nn.Embed(50, 16, name="embed")(ids)))


def _mica_pair(n=2, r=5):
    """The tiny model, its params and ids, ``n`` MiCA adapters and one plain LoRA, every tensor random."""
    model, ids = _EmbedMlp(), jnp.asarray(np.random.RandomState(0).randint(0, 50, (4, 6)))
    params = model.init(jax.random.key(0), ids)
    cfg = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=".*", init_weights="mica")
    out = []
    for i in range(n + 1):
        ad = jpeft.init(cfg if i < n else cfg.replace(init_weights="default"), params, jax.random.key(i), model, ids)
        keys = jax.random.split(jax.random.key(20 + i), len(ad))
        out.append({p: dataclasses.replace(nd, lora_A=0.3 * jax.random.normal(k, nd.lora_A.shape),
                                           lora_B=0.3 * jax.random.normal(jax.random.fold_in(k, 1), nd.lora_B.shape))
                    for (p, nd), k in zip(sorted(ad.items()), keys)})
    return model, params, ids, cfg, out[:n], out[n]


def _row_loss(y):
    """One loss per row (a sum over rows never mixes two adapters' terms): the reference trains each adapter on
    its own rows alone."""
    return jnp.mean((y - 0.5) ** 2, axis=tuple(range(1, y.ndim)))


def test_mica_slots_train_a_only_through_the_bank():
    """Training through an AdapterBank (make_train_step on bank.weights, AdamW with weight decay), a bank mixing a MiCA
    and a plain LoRA slot and one of MiCA slots only, every tensor random, ranks padded 3 -> 4: no gradient reaches a
    MiCA slot's lora_B, its B stays bit-identical and get gives it back as MiCA without a word, its A equals the
    adapter trained alone on its rows (make_train_step), and the plain slot equals its adapter trained alone. Before,
    the bank trained every slot's B (and AdamW decayed it): get returned a plain LoRA, with a warning."""
    from jpeft.bank import route

    model, params, ids, cfg, (a, b), plain = _mica_pair(r=3)
    x = (jnp.concatenate([ids, ids[::-1]]) * 7 + 3) % 50  # 8 rows
    tx = optax.adamw(3e-2, weight_decay=0.1)

    def bank_loss(p, w, batch, key):
        return _row_loss(jpeft.apply(model, p, route(w, None, batch["ids"]), batch["x"])).sum()

    def alone_loss(p, ad, batch, key):
        return _row_loss(jpeft.apply(model, p, ad, batch["x"])).sum()

    bank_grad = jax.jit(jax.grad(bank_loss, argnums=1))
    bank_step = jpeft.make_train_step(bank_loss, tx, donate=False)
    alone_step = jpeft.make_train_step(alone_loss, tx, donate=False)
    for ads, names in (({"p": plain, "a": a}, ["a", "p", "a", None, "p", "a", "p", None]),
                       ({"a": a, "b": b}, ["b", "a", "a", None, "b", "a", "b", None])):
        bank = jpeft.AdapterBank.from_adapters(ads, capacity=3, max_rank=4)
        batch = {"ids": bank.ids(names), "x": x}
        grads = bank_grad(params, bank.weights, batch, None)
        w, st = bank.weights, jpeft.init_opt_state(tx, bank.weights)
        for _ in range(3):
            w, st, _ = bank_step(params, w, st, batch, None)
        trained = bank.with_weights(w)
        for name, ad in ads.items():
            k, mica = bank.slot(name), name != "p"
            for path, n in ad.items():  # a MiCA slot's B gets exactly no gradient, its A (and a plain B) some
                assert (float(jnp.abs(grads[path].lora_B[k]).max()) == 0.0) == mica, (name, path)
                assert float(jnp.abs(grads[path].lora_A[k]).max()) > 1e-3
            rows = np.asarray([m == name for m in names])
            ref, s = ad, jpeft.init_opt_state(tx, ad)
            for _ in range(3):
                ref, s, _ = alone_step(params, ref, s, {"x": x[rows]}, None)
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                got = trained.get(name)
            for path, n in ref.items():
                assert got[path].frozen_b == n.frozen_b == mica
                np.testing.assert_allclose(got[path].lora_A, n.lora_A, rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(got[path].lora_B, n.lora_B, rtol=1e-5, atol=1e-6)
                assert float(jnp.abs(n.lora_A - ad[path].lora_A).max()) > 1e-2  # A moved
                if mica:  # bit for bit, as the adapter alone keeps it
                    np.testing.assert_array_equal(got[path].lora_B, ad[path].lora_B)
                    np.testing.assert_array_equal(w[path].lora_B[k], bank.weights[path].lora_B[k])
                else:
                    assert float(jnp.abs(n.lora_B - ad[path].lora_B).max()) > 1e-2
    # the mask is a frozen field: weights whose b_frozen an optimizer changed are refused by name
    bad = {p: dataclasses.replace(s_, b_frozen=jnp.zeros_like(s_.b_frozen)) for p, s_ in w.items()}
    with pytest.raises(jpeft.errors.BankError, match="b_frozen.*frozen field"):
        bank.with_weights(bad)


def _delta_of(ads, w):
    return {p: sum(wi * ad[p].delta_matrix() for ad, wi in zip(ads, w)) for p in ads[0]}


def test_mica_merges_keep_b_frozen_only_where_the_result_is_mica(tmp_path):
    """merge_adapters of MiCA adapters: the exact concatenation ('cat', 'linear' without a rank) of MiCA inputs only
    is MiCA (lora_B frozen, as each input's; before, a plain LoRA without a word) and saves as MiCA. An SVD
    re-factorisation, factors=True, a mix with a plain LoRA (either order) and a concatenation of rank above
    min(in, out) give a plain LoRA and warn. Every update equals the closed form."""
    model, params, ids, cfg, (a, b), plain = _mica_pair()
    w = [0.5, 2.0]
    from jpeft.merging import merge_adapters

    for method in ("cat", "linear"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            m = merge_adapters([a, b], w, method=method)
        assert all(n.frozen_b for n in m.values()) and {n.r for n in m.values()} == {10}
        for p, want in _delta_of([a, b], w).items():
            np.testing.assert_allclose(m[p].delta_matrix(), want, rtol=1e-5, atol=1e-5)
    jpeft.save_adapter(str(tmp_path / "cat"), cfg, m)
    cfg2, back = jpeft.load_adapter(str(tmp_path / "cat"), params, model, ids)
    assert cfg2.init_weights == "mica" and all(n.frozen_b for n in back.values())
    np.testing.assert_array_equal(jpeft.apply(model, params, back, ids), jpeft.apply(model, params, m, ids))
    assert all(n.lora_B is None for n in jpeft.trainable(m).values())  # what a step trains: the A's only

    cases = [(([a, b], w), dict(method="svd", rank=4), "SVD"), (([a, b], w), dict(factors=True), "entrywise"),
             (([a, plain], w), dict(method="cat"), "mix"), (([plain, a], w), dict(method="cat"), "mix"),
             (([a, b, a], w + [1.0]), dict(method="cat"), "above min")]
    for (ads, ws), kw, why in cases:
        with pytest.warns(UserWarning, match=f"(?s){why}.*plain LoRA") as rec:
            m = merge_adapters(ads, ws, **kw)
        assert len([r for r in rec if "MiCA" in str(r.message)]) == 1  # once per call, not per site
        assert not any(n.frozen_b for n in m.values()), (kw, why)
        if kw.get("method") == "cat":  # exact: the closed form, whatever the flag
            for p, want in _delta_of(ads, ws).items():
                np.testing.assert_allclose(m[p].delta_matrix(), want, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():  # plain inputs only: nothing to say
        warnings.simplefilter("error")
        merge_adapters([plain, plain], method="svd", rank=3)


def test_mica_in_a_bank_routes_as_alone_and_comes_back_frozen(tmp_path):
    """An AdapterBank holding MiCA and plain adapters: each row equals its adapter alone (every tensor random,
    an embedding and dense sites), and bank.get gives a MiCA adapter back with lora_B frozen and its arrays
    bit-identical (before, as a plain LoRA), a plain one plain, also after replace / remove / add into the freed
    slot; the MiCA adapter got back saves and loads as MiCA. A step of jpeft's through bank.weights keeps every MiCA
    slot's B (test_mica_slots_train_a_only_through_the_bank); an optimizer applied by hand (AdamW's weight decay moves
    a B whose gradient is zero) gives it back plain, with a warning."""
    model, params, ids, cfg, (a, b), plain = _mica_pair(r=3)
    bank = jpeft.AdapterBank.from_adapters({"a": a, "p": plain, "b": b}, capacity=4, max_rank=4)
    names = ["b", "a", None, "p"]
    y = jpeft.apply(model, params, bank.route(bank.ids(names)), ids)
    for i, n in enumerate(names):
        alone = {"a": a, "b": b, "p": plain}.get(n)
        want = model.apply(params, ids) if n is None else jpeft.apply(model, params, alone, ids)
        np.testing.assert_allclose(y[i], want[i], rtol=1e-5, atol=1e-5)
    for name, ad in (("a", a), ("b", b), ("p", plain)):
        got = bank.get(name)
        assert sorted(got) == sorted(ad)
        for p, n in ad.items():
            assert got[p].frozen_b == n.frozen_b == (name != "p")
            np.testing.assert_array_equal(got[p].lora_A, n.lora_A)
            np.testing.assert_array_equal(got[p].lora_B, n.lora_B)
    swapped = bank.replace("b", plain).remove("a").add("c", plain).add("d", a)
    assert swapped.slots == ("c", "p", "b", "d")
    assert [all(n.frozen_b for n in swapped.get(k).values()) for k in swapped.slots] == [False, False, False, True]
    jpeft.save_adapter(str(tmp_path / "a"), cfg, bank.get("a"))
    cfg2, back = jpeft.load_adapter(str(tmp_path / "a"), params, model, ids)
    assert cfg2.init_weights == "mica" and all(n.frozen_b for n in back.values())
    for p, n in a.items():
        np.testing.assert_array_equal(back[p].lora_B, n.lora_B)
    # an optimizer applied to bank.weights by hand, outside jpeft's steps: AdamW's weight decay moves every B, the
    # MiCA slots' too (zero gradient), and get says so; a MiCA slot with no B site moved would still be MiCA
    train, frozen = jpeft.split_frozen(bank.weights)
    tx = optax.adamw(0.1, weight_decay=0.5)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, train), tx.init(train), train)
    decayed = bank.with_weights(jpeft.join_frozen(optax.apply_updates(train, upd), frozen))
    for name in ("a", "b"):
        with pytest.warns(UserWarning, match=f"'{name}'.*plain LoRA"):
            assert not any(n.frozen_b for n in decayed.get(name).values())
