"""Rank / alpha patterns and saved configs must mean what the adapter computes (audit of the LyCORIS,
OFT and PEFT-format paths): overlapping first-match patterns through the sorted JSON files, layer-specific
patterns on a layer-scanned model, and save_peft with another config than the adapter's."""

import copy
import json
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

import jpeft  # noqa: E402
import jpeft.models  # noqa: E402
from jpeft.errors import ConfigError, UnsupportedAdapterError  # noqa: E402
from jpeft import LoHaConfig  # noqa: E402
from jpeft import LoKrConfig  # noqa: E402
from jpeft import OFTConfig  # noqa: E402

torch = __import__("torch")
peft = __import__("peft")
PEFT_22 = tiny.peft_at_least(0, 22)  # PEFT 0.22 keeps the patterns' order

FAMILY = "llama2"


def _random(adapter, seed=1, std=0.3):
    rs = np.random.RandomState(seed)
    leaves, tdef = jax.tree.flatten(adapter)
    return jax.tree.unflatten(tdef, [jnp.asarray(std * rs.randn(*x.shape), jnp.float32) for x in leaves])


def _peft_logits(folder, ids, mask):
    hf, _ = tiny.hf_model(FAMILY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
    with torch.no_grad():
        return pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  position_ids=torch.tensor(tiny.positions(mask))).logits.numpy()


def _jpeft_logits(model, params, adapter, ids, mask):
    return np.asarray(jpeft.apply(model, params, adapter, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))


@pytest.mark.parametrize("cfg", [
    # overlapping keys: the first one (v_proj) wins in jpeft and in PEFT's in-memory config, but the JSON is
    # written with sorted keys, after which PEFT's first match for layer 0 was the other key
    LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 5, r"layers\.0\.self_attn\.v_proj": 60}),
    # the adapter made with alpha 16 and saved with a config saying 8
    "other-config",
], ids=["overlapping-alpha-pattern", "saved-with-other-alpha"])
def test_lycoris_export_keeps_each_sites_scale(cfg, tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(FAMILY, seed=3)
    made = LoKrConfig(r=2, alpha=16, target_modules=["q_proj", "v_proj"]) if cfg == "other-config" else cfg
    saved = made.replace(alpha=8) if cfg == "other-config" else cfg
    ad = _random(jpeft.init(made, params, jax.random.key(0)))
    jpeft.hf.save_peft(str(tmp_path), saved, ad, base_model_name_or_path=folder)
    sel = mask.astype(bool)
    np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], _peft_logits(str(tmp_path), ids, mask)[sel],
                               atol=1e-4, rtol=0)
    # and back: jpeft reads the file as PEFT does
    _, back = jpeft.hf.load_peft(str(tmp_path), params)
    assert {k: v.scale for k, v in back.items()} == pytest.approx({k: v.scale for k, v in ad.items()})


def test_lycoris_save_with_a_config_of_other_shapes_is_refused(tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    _, params = jpeft.models.from_pretrained(folder)
    ad = jpeft.init(LoHaConfig(r=2, target_modules=["q_proj"]), params, jax.random.key(0))
    with pytest.raises(UnsupportedAdapterError, match="the config the adapter was made with"):
        jpeft.hf.save_peft(str(tmp_path), LoHaConfig(r=4, target_modules=["q_proj"]), ad)


def test_scanned_lycoris_matches_patterns_per_layer(tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    smodel, sparams = jpeft.models.from_pretrained(folder, scan_layers=True)
    ids, mask = tiny.batch(FAMILY, seed=3)
    x = jnp.asarray(ids)
    # a key naming one layer: refused on the scanned model (it silently applied to no layer)
    one_layer = LoHaConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], alpha_pattern={"model.layers.1.self_attn.q_proj": 30})
    with pytest.raises(ConfigError, match="scan_layers=False"):
        jpeft.init(one_layer, sparams, jax.random.key(0), smodel, x)
    # a key naming every layer by its index: the scanned sites get it, as the unrolled ones (and PEFT) do
    every = LoKrConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj"], alpha_pattern={r"model\.layers\.\d+\.self_attn\.v_proj": 30})
    sad = _random(jpeft.init(every, sparams, jax.random.key(0), smodel, x))
    uad = jpeft.init(every, params, jax.random.key(0))
    assert sad["model/layers/self_attn/v_proj"].inner.scale == uad["model/layers_0/self_attn/v_proj"].scale == 15.0
    jpeft.hf.save_peft(str(tmp_path), every, sad, base_model_name_or_path=folder)
    sel = mask.astype(bool)
    np.testing.assert_allclose(_jpeft_logits(smodel, sparams, sad, ids, mask)[sel], _peft_logits(str(tmp_path), ids, mask)[sel],
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("made", [OFTConfig(oft_block_size=8, use_cayley_neumann=False, target_modules=["q_proj"]),
                                  OFTConfig(oft_block_size=8, coft=True, eps=1e-2, target_modules=["q_proj"])],
                         ids=["exact-cayley", "coft"])
def test_oft_save_with_other_settings_is_refused(made, tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    _, params = jpeft.models.from_pretrained(folder)
    ad = jpeft.init(made, params, jax.random.key(0))
    with pytest.raises(UnsupportedAdapterError, match="the config the adapter was made with"):
        jpeft.hf.save_peft(str(tmp_path), OFTConfig(oft_block_size=8, target_modules=["q_proj"]), ad)
    jpeft.hf.save_peft(str(tmp_path), made, ad)  # its own config saves


@pytest.mark.parametrize("cls", [LoHaConfig, jpeft.LoraConfig])
def test_native_round_trip_keeps_first_match_pattern_order(cls, tmp_path):
    _, folder = tiny.hf_model(FAMILY)
    _, params = jpeft.models.from_pretrained(folder)
    cfg = cls(r=2, alpha=3, target_modules=["q_proj", "v_proj"], alpha_pattern={"v_proj": 5, r"layers\.0\.self_attn\.v_proj": 60})
    ad = jpeft.init(cfg, params, jax.random.key(0))
    jpeft.save_adapter(str(tmp_path / "a"), cfg, ad)
    back = jpeft.load_adapter(str(tmp_path / "a"), params)
    back = back[1] if isinstance(back, tuple) else back
    assert {k: v.scale for k, v in back.items()} == {k: v.scale for k, v in ad.items()}


@pytest.mark.parametrize("make", [lambda pat: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False, alpha_pattern=pat),
                                  lambda pat: peft.LoHaConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"],
                                                              alpha_pattern=pat)], ids=["lora", "loha"])
def test_a_peft_file_whose_alpha_pattern_keys_overlap_warns_and_reads_as_peft_reloads_it(make, tmp_path):
    """PEFT applies the first alpha_pattern key that matches a module, and save_pretrained writes
    adapter_config.json with sorted keys: {"q_proj": 1, "layers\\.1\\.self_attn\\.q_proj": 9} trains
    layer 1's q_proj with alpha 1 and reloads it (in PEFT's from_pretrained and in jpeft) with 9, logits
    about 1.5 apart, without a word. jpeft reads it as PEFT reloads it and now warns of the overlap.
    PEFT 0.22 writes the patterns in their own order: its file reloads as trained, and jpeft reads such a
    file (peft_version >= 0.22; written by hand under PEFT 0.21) with the trained logits and no warning."""
    hf, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(FAMILY, seed=3)
    sel = mask.astype(bool)
    trained_order = {"q_proj": 1, r"layers\.1\.self_attn\.q_proj": 9}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = tiny.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), make(dict(trained_order))), 3)
        pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        trained = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(tiny.positions(mask))).logits.numpy()
    reloaded = _peft_logits(str(tmp_path), ids, mask)
    f = tmp_path / "adapter_config.json"
    d = json.loads(f.read_text())
    assert list(d["alpha_pattern"]) == (list(trained_order) if PEFT_22 else sorted(trained_order))
    if PEFT_22:  # PEFT's own reload is the trained model, and jpeft reads it quietly
        np.testing.assert_allclose(reloaded[sel], trained[sel], atol=1e-5, rtol=0)
    else:  # PEFT's own reload differs from the trained model
        assert np.abs(trained - reloaded)[sel].max() > 0.1
        with pytest.warns(UserWarning, match=r"alpha_pattern keys that overlap .*model\.layers\.1\.self_attn\.q_proj"):
            cfg, ad = jpeft.hf.load_peft(str(tmp_path), params)
        np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], reloaded[sel], atol=1e-4, rtol=0)
        f.write_text(json.dumps(dict(d, alpha_pattern=trained_order, peft_version="0.22.0")))  # as PEFT 0.22 writes it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, ad = jpeft.hf.load_peft(str(tmp_path), params)
    np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], trained[sel], atol=1e-4, rtol=0)
    # an adapter jpeft exports writes one exact key per module: no overlap, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jpeft.hf.save_peft(str(tmp_path / "j"), cfg, ad, params=params)
        _, back = jpeft.hf.load_peft(str(tmp_path / "j"), params)
    assert {k: v.scale for k, v in back.items()} == pytest.approx({k: v.scale for k, v in ad.items()})


@pytest.mark.parametrize("cfg", [OFTConfig(oft_block_size=4, target_modules="all-linear"),
                                 jpeft.IA3Config(target_modules="all-linear", feedforward_modules=["down_proj"])],
                         ids=["oft", "ia3"])
def test_all_linear_leaves_out_embeddings_as_peft_does(cfg, tmp_path):
    """OFT and IA3 with PEFT's "all-linear" shorthand refused the embedding with advice to remove
    it from target_modules (which the user cannot do); they take the linear layers but lm_head, as
    PEFT does, and the exported adapter (every tensor random) gives PEFT's logits."""
    _, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(FAMILY, seed=3)
    ad = _random(jpeft.init(cfg, params, jax.random.key(0)), std=0.1)
    assert len(ad) == 14 and not any("embed" in p or "lm_head" in p for p in ad)
    jpeft.hf.save_peft(str(tmp_path), cfg, ad, base_model_name_or_path=folder)
    sel = mask.astype(bool)
    np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], _peft_logits(str(tmp_path), ids, mask)[sel],
                               atol=1e-4, rtol=0)


def test_ia3_feedforward_suffix_and_exclude_modules_as_peft(tmp_path):
    """PEFT takes IA3's feedforward_modules entries as plain suffixes (``"proj"`` is every
    ``*_proj``); jpeft needed a dot boundary and refused PEFT's file as corrupted. A PEFT file
    with exclude_modules (which IA3Config lacks) is refused by name, not as another model's."""
    hf, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(FAMILY, seed=3)
    sel = mask.astype(bool)
    for name, cfg in [("suffix", peft.IA3Config(target_modules=["o_proj", "proj"], feedforward_modules=["proj"])),
                      ("exclude", peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                                 exclude_modules=["model.layers.0.mlp.down_proj"]))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(copy.deepcopy(hf), cfg)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
        pm.save_pretrained(str(tmp_path / name))
        if name == "exclude":
            with pytest.raises(UnsupportedAdapterError, match="exclude_modules"):
                jpeft.hf.load_peft(str(tmp_path / name), params)
            continue
        _, ad = jpeft.hf.load_peft(str(tmp_path / name), params)
        assert all(n.feedforward for p, n in ad.items() if not p.endswith("o_proj"))
        np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel],
                                   _peft_logits(str(tmp_path / name), ids, mask)[sel], atol=1e-4, rtol=0)


def test_a_config_through_to_json_keeps_which_pattern_key_wins():
    """rank_pattern / alpha_pattern take the first matching key (PEFT's get_pattern_key), but
    AdapterConfig.to_json sorted the keys inside them too: from_json(to_json(c)) compared equal to
    c yet gave layer 0's q_proj rank 6 where c gives 2 (and v_proj's alpha 5 for 3), so an adapter
    made from the round-tripped config was another adapter. to_json now sorts the fields only."""
    _, folder = tiny.hf_model(FAMILY)
    _, params = jpeft.models.from_pretrained(folder)
    c = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], init_weights="random",
                         rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6},
                         alpha_pattern={"v_proj": 3.0, r"layers\.1\.self_attn\.v_proj": 5.0})
    back = jpeft.LoraConfig.from_json(c.to_json())
    assert list(back.rank_pattern) == list(c.rank_pattern) and list(back.alpha_pattern) == list(c.alpha_pattern)
    want, got = jpeft.init(c, params, jax.random.key(0)), jpeft.init(back, params, jax.random.key(0))
    assert got["model/layers_0/self_attn/q_proj"].r == 2 and got["model/layers_1/self_attn/v_proj"].scale == 3.0 / 4
    assert {p: (n.r, n.scale) for p, n in got.items()} == {p: (n.r, n.scale) for p, n in want.items()}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_a_peft_file_whose_rank_pattern_keys_overlap_is_refused_naming_the_keys_and_the_fix(tmp_path):
    """PEFT trains layer 0's q_proj with rank 2 under {"q_proj": 2, "layers\\.0\\.self_attn\\.q_proj": 6}
    (the first key), and save_pretrained sorts the keys, so the file's first match gives it 6: PEFT's
    from_pretrained fails on the shapes, and jpeft warned, then said "The files do not belong
    together" (they do). The CheckpointError now names the overlapping keys and the fix; the file
    fixed as it says loads with the trained model's logits. PEFT 0.22 keeps the keys' order: its file
    (and a 0.21 file put back in that order, with peft_version 0.22.0) loads as trained, with no warning."""
    hf, folder = tiny.hf_model(FAMILY)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch(FAMILY, seed=3)
    sel = mask.astype(bool)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = tiny.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), cfg), 3)
        pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        trained = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     position_ids=torch.tensor(tiny.positions(mask))).logits.numpy()
    f = tmp_path / "adapter_config.json"
    if not PEFT_22:  # PEFT 0.22's file: the keys in their own order
        f.write_text(json.dumps(dict(json.loads(f.read_text()), peft_version="0.22.0",
                                     rank_pattern={"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, ad = jpeft.hf.load_peft(str(tmp_path), params)
    np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], trained[sel], atol=1e-4, rtol=0)
    # a file of PEFT before 0.22 (sorted keys)
    f.write_text(json.dumps(dict(json.loads(f.read_text()), peft_version="0.21.2",
                                 rank_pattern={r"layers\.0\.self_attn\.q_proj": 6, "q_proj": 2})))
    with pytest.warns(UserWarning, match="rank_pattern keys that overlap"), pytest.raises(
            jpeft.errors.CheckpointError, match=r"lora_A has rank 2, .* says r=6\. Its rank_pattern keys .* overlap at this "
            r"module: .* Put an exact key for the module first in adapter_config.json's rank_pattern, "
            r"'model\\\\.layers\\\\.0\\\\.self_attn\\\\.q_proj'"):
        jpeft.hf.load_peft(str(tmp_path), params)
    d = json.loads(f.read_text())
    d["rank_pattern"] = {r"model\.layers\.0\.self_attn\.q_proj": 2, **d["rank_pattern"]}
    f.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="rank_pattern keys that overlap"):  # they still do; the exact key wins
        _, ad = jpeft.hf.load_peft(str(tmp_path), params)
    np.testing.assert_allclose(_jpeft_logits(model, params, ad, ids, mask)[sel], trained[sel], atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [jpeft.LoraConfig, LoHaConfig])
def test_configs_whose_pattern_keys_come_in_another_order_are_not_equal(cls):
    """rank_pattern / alpha_pattern take the first matching key (PEFT's get_pattern_key), but a
    config's equality (the dataclass's) compared them as unordered dicts: two configs that give
    layer 0's q_proj rank 2 and 6 compared equal. They now differ; so does any other order of the
    keys (whether two keys match a module in common depends on the model, which a config does not
    know). Each order gives every module the rank and alpha PEFT's get_pattern_key gives it.
    A dict whose order means nothing (AdaLoRA's rank_pattern, exact names) still compares as one."""
    from peft.utils.other import get_pattern_key

    _, folder = tiny.hf_model(FAMILY)
    _, params = jpeft.models.from_pretrained(folder)
    ranks = {"q_proj": 2, r"layers\.0\.self_attn\.q_proj": 6}
    alphas = {"v_proj": 3.0, r"layers\.1\.self_attn\.v_proj": 5.0}

    def make(rank_pattern, alpha_pattern):
        return cls(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern=rank_pattern,
                   alpha_pattern=alpha_pattern)

    c = make(ranks, alphas)
    flipped = make(dict(reversed(ranks.items())), dict(reversed(alphas.items())))
    got = []
    for config in (c, flipped):
        assert config == make(dict(config.rank_pattern), dict(config.alpha_pattern))
        assert cls.from_json(config.to_json()) == config
        sites = jpeft.init(config, params, jax.random.key(0))
        for path, site in sites.items():
            name = path.replace("/", ".").replace("layers_", "layers.")
            r = config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), config.r)
            alpha = config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), config.alpha)
            assert site.r == r and float(site.scale) == pytest.approx(alpha / r), path
        got.append({p: (s.r, float(s.scale)) for p, s in sites.items()})
    assert got[0]["model/layers_0/self_attn/q_proj"][0] == 2 and got[1]["model/layers_0/self_attn/q_proj"][0] == 6
    assert c != flipped and flipped != c and not cls.same_field("rank_pattern", ranks, flipped.rank_pattern)
    apart = {"q_proj": 2, "v_proj": 6}  # no module matches both keys, but the config cannot tell
    assert make(apart, {}) != make(dict(reversed(apart.items())), {})
    mask = {"model.layers.0.self_attn.q_proj.lora_E": [True, False],
            "model.layers.1.self_attn.q_proj.lora_E": [True, True]}
    ada = jpeft.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["q_proj"], rank_pattern=mask)
    assert ada == jpeft.AdaLoraConfig(init_r=2, target_r=1, total_step=10, target_modules=["q_proj"],
                                      rank_pattern=dict(reversed(mask.items())))
