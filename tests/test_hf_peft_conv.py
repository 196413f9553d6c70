"""PEFT LoRA (and LoHa, LoKr, AdaLoRA, OFT) on torch Conv1d/Conv2d layers against jpeft on the
flax nn.Conv twin (kernel ``[*window, in, out]``, NHWC): load_peft(..., model=, example_args=) gives PEFT's numbers,
save_peft writes files PEFT loads with the same numbers, and without the model the refusal
names the fix (a file for another conv window is refused). Every adapter tensor random."""

import copy
import os
import re
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import hf as H
from jpeft.errors import BaseMismatchError, LayoutError, UnsupportedAdapterError

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip


class _TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(8, 6, 1)
        self.d1 = torch.nn.Conv1d(6, 5, 3, padding=1)
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x):  # x [b, 3, 8, 8]
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # [b, 6, 4, 4]
        h = torch.relu(self.d1(h.flatten(2)))  # [b, 5, 16]
        return self.lin(h.transpose(1, 2))  # [b, 16, 4]


class _FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [b, 8, 8, 3]
        h = nn.relu(nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), name="c1")(x))
        h = nn.relu(nn.Conv(6, (1, 1), name="c2")(h))  # [b, 4, 4, 6]
        h = nn.relu(nn.Conv(5, (3,), padding=((1, 1),), name="d1")(h.reshape(h.shape[0], 16, 6)))
        return nn.Dense(4, name="lin")(h)


def _twin():
    torch.manual_seed(0)
    tnet = _TorchNet().eval()
    t = lambda w: jnp.asarray(w.detach().numpy())  # noqa: E731
    params = {"params": {
        "c1": {"kernel": t(tnet.c1.weight).transpose(2, 3, 1, 0), "bias": t(tnet.c1.bias)},
        "c2": {"kernel": t(tnet.c2.weight).transpose(2, 3, 1, 0), "bias": t(tnet.c2.bias)},
        "d1": {"kernel": t(tnet.d1.weight).transpose(2, 1, 0), "bias": t(tnet.d1.bias)},
        "lin": {"kernel": t(tnet.lin.weight).T, "bias": t(tnet.lin.bias)}}}
    x = np.random.RandomState(0).randn(2, 3, 8, 8).astype(np.float32)
    return tnet, params, x, jnp.asarray(x.transpose(0, 2, 3, 1))


def _random_lora(pm, seed=2):
    return tiny.perturb_trainable(pm, seed)  # every trainable tensor + 0.3 N(0, 1)


def _check_both_ways(tmp_path, tnet, params, x, fx, fmodel, targets, kw, channels_last, load=H.load_peft):
    """PEFT's LoRA ``kw`` on ``targets`` of ``tnet`` with every tensor random: jpeft's load (``load``,
    with the model) gives PEFT's unmerged and merged outputs, and its save loads in PEFT with them."""
    with torch.no_grad():
        base = tnet(torch.tensor(x)).numpy()
    assert np.abs(channels_last(np.asarray(fmodel.apply(params, fx))) - base).max() < 1e-5  # the twin is the same network
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        target_modules=targets, init_lora_weights=False, **kw)))
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
        merged_ref = copy.deepcopy(pm).merge_and_unload()(torch.tensor(x)).numpy()
    assert np.abs(ref - base).max() > 0.1  # the adapter changes the output

    got = load(str(tmp_path / "peft"), params, model=fmodel, example_args=(fx,))
    config, adapter = got[0], got[-1]
    if len(got) == 3:
        assert got[1] is params  # a plain LoRA: the base as given
    out = channels_last(np.asarray(jpeft.apply(fmodel, params, adapter, fx)))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    merged = channels_last(np.asarray(fmodel.apply(jpeft.merge(params, adapter), fx)))
    np.testing.assert_allclose(merged, merged_ref, atol=2e-5, rtol=1e-5)

    H.save_peft(str(tmp_path / "back"), config, adapter, params=params)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "back")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(x)).numpy(), ref, atol=2e-5, rtol=1e-5)
    return config, adapter


@pytest.mark.parametrize("kw", [
    dict(r=2, lora_alpha=3, rank_pattern={"c1": 4}, alpha_pattern={"d1": 7.0}),
    dict(r=2, lora_alpha=3, use_dora=True),
    dict(r=3, lora_alpha=4, use_rslora=True, lora_bias=True),
], ids=["lora_patterns", "dora", "rslora_lora_bias"])
def test_conv_lora_from_and_to_peft(tmp_path, kw):
    tnet, params, x, fx = _twin()
    _, adapter = _check_both_ways(tmp_path, tnet, params, x, fx, _FlaxNet(), ["c1", "c2", "d1", "lin"], kw,
                                  lambda y: y)
    assert {adapter[p].layout.kind for p in ("c1", "c2", "d1")} == {"conv"}


def test_conv_lora_without_model_names_the_fix(tmp_path):
    tnet, params, _, _ = _twin()
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        r=2, target_modules=["c1"], init_lora_weights=False)))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(LayoutError, match=r"load_peft\(path, params, model=model, example_args=\(x,\)\)"):
        H.load_peft(str(tmp_path), params)


    class OtherWindow(nn.Module):  # a 1x9 window: as many inputs (9 * 3) as the file's 3x3, so only the window tells
        @nn.compact
        def __call__(self, x):
            return nn.Conv(8, (1, 9), name="c1")(x)

    fx = jnp.zeros((1, 8, 8, 3))
    other = OtherWindow().init(jax.random.key(0), fx)
    with pytest.raises(BaseMismatchError, match=r"needs lora_A \[r, 3, 1, 9\]"):
        H.load_peft(str(tmp_path), other, model=OtherWindow(), example_args=(fx,))


class _TorchOne(torch.nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.c = conv

    def forward(self, x):
        return self.c(x)


class _FlaxOne(nn.Module):
    conv: dict  # nn.Conv's arguments

    @nn.compact
    def __call__(self, x):
        return nn.Conv(name="c", **self.conv)(x)


def _one_conv(conv, flax_conv, in_shape):
    """A torch net of the one ConvNd ``conv`` and its flax twin (``nn.Conv(**flax_conv)``, channels last)."""
    torch.manual_seed(0)
    tnet = _TorchOne(conv).eval()
    w = tnet.c.weight.detach().numpy()
    nd = w.ndim
    params = {"params": {"c": {"kernel": jnp.asarray(w.transpose(tuple(range(2, nd)) + (1, 0))),
                               "bias": jnp.asarray(tnet.c.bias.detach().numpy())}}}
    x = np.random.RandomState(0).randn(*in_shape).astype(np.float32)
    fx = jnp.asarray(np.moveaxis(x, 1, -1))
    return tnet, params, x, fx, _FlaxOne(flax_conv), lambda y: np.moveaxis(y, -1, 1)


_CONV1D = lambda: _one_conv(torch.nn.Conv1d(3, 5, 3, stride=2, padding=1),  # noqa: E731
                            dict(features=5, kernel_size=(3,), strides=2, padding=((1, 1),)), (2, 3, 9))
_CONV3D = lambda: _one_conv(torch.nn.Conv3d(3, 4, (2, 3, 1), stride=(1, 2, 1), padding=(1, 0, 0)),  # noqa: E731
                            dict(features=4, kernel_size=(2, 3, 1), strides=(1, 2, 1),
                                 padding=((1, 1), (0, 0), (0, 0))), (2, 3, 5, 6, 7))


@pytest.mark.parametrize("net", [_CONV1D, _CONV3D], ids=["conv1d", "conv3d"])
@pytest.mark.parametrize("kw", [
    dict(r=2, lora_alpha=3, use_dora=True),
    dict(r=3, lora_alpha=4, use_rslora=True, lora_bias=True),
], ids=["dora", "rslora_lora_bias"])
def test_conv1d_conv3d_lora_from_and_to_peft(tmp_path, net, kw):
    """Conv1d and Conv3d (a strided, padded, non-square window), DoRA's [1, out, 1, ...] magnitude and
    lora_bias, every tensor random; read through load_peft_with_base (a plain LoRA: the base as given)."""
    tnet, params, x, fx, fmodel, cl = net()
    _, adapter = _check_both_ways(tmp_path, tnet, params, x, fx, fmodel, ["c"], kw, cl, load=H.load_peft_with_base)
    assert adapter["c"].layout.kind == "conv"


def test_an_adapter_holding_more_numbers_than_its_base_loads(tmp_path):
    """A 1x1 Conv1d 3 -> 5 (20 parameters) with DoRA r=2 (6 + 10 + 5 = 21 numbers): the reader's guard
    against a file declaring absurd sizes refused it as "truncated or corrupted" (it allowed no more
    numbers than the base). It loads to PEFT's numbers both ways; an absurd declaration is still refused."""
    tnet, params, x, fx, fmodel, cl = _one_conv(torch.nn.Conv1d(3, 5, 1), dict(features=5, kernel_size=(1,)),
                                                (2, 3, 4))
    _check_both_ways(tmp_path, tnet, params, x, fx, fmodel, ["c"], dict(r=2, lora_alpha=3, use_dora=True), cl)
    f = tmp_path / "peft" / "adapter_model.safetensors"
    arrays = {k: np.asarray(v) for k, v in jpeft.io.read_safetensors(str(f))[0].items()}
    a_key = next(k for k in arrays if k.endswith("lora_A.weight"))
    arrays[a_key] = np.zeros((3 << 20, 3, 1), np.float32)  # 9.4M numbers declared over a base of 20
    from safetensors.numpy import save_file
    save_file(arrays, str(f))
    with pytest.raises(jpeft.errors.CheckpointError, match=r"more than 8 times the 20 parameters"):
        H.load_peft(str(tmp_path / "peft"), params, model=fmodel, example_args=(fx,))


PEFT_22 = tiny.peft_at_least(0, 22)


def _relabel(folder, version):
    """The PEFT file in ``folder`` with its ``peft_version`` set to ``version`` (``None``: removed, as
    PEFT < 0.18 wrote it)."""
    import json
    f = folder / "adapter_config.json"
    d = json.loads(f.read_text())
    d.pop("peft_version", None)
    if version is not None:
        d["peft_version"] = version
    f.write_text(json.dumps(d))


@pytest.mark.parametrize("torch_conv, flax_conv, in_shape, why, dora", [
    (lambda: torch.nn.Conv2d(4, 5, 3, dilation=2, padding="same"),
     dict(features=5, kernel_size=(3, 3), kernel_dilation=2, padding="SAME"), (2, 4, 8, 8), "kernel_dilation=2", False),
    (lambda: torch.nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular"),
     dict(features=5, kernel_size=(3, 3), padding="CIRCULAR"), (2, 4, 8, 8), "padding='CIRCULAR'", False),
    (lambda: torch.nn.Conv2d(4, 5, 3, stride=(2, 1), padding=1, padding_mode="reflect"),
     dict(features=5, kernel_size=(3, 3), strides=(2, 1), padding="REFLECT"), (2, 4, 8, 7), "padding='REFLECT'", False),
    (lambda: torch.nn.Conv1d(3, 5, 3, dilation=2, padding=2, padding_mode="circular"),
     dict(features=5, kernel_size=(3,), kernel_dilation=2, padding="CIRCULAR"), (2, 3, 9),
     "kernel_dilation=2.*padding='CIRCULAR'", False),
    (lambda: torch.nn.Conv2d(4, 5, 3, stride=(2, 1), padding=1, padding_mode="reflect"),
     dict(features=5, kernel_size=(3, 3), strides=(2, 1), padding="REFLECT"), (2, 4, 8, 7), "padding='REFLECT'", True),
], ids=["dilated", "circular", "reflect", "conv1d_dilated_circular", "reflect_dora"])
def test_conv_lora_dilated_or_padded_loads_as_its_peft_computes(tmp_path, torch_conv, flax_conv, in_shape, why,
                                                                  dora):
    """PEFT 0.21 builds lora_A from the base's kernel_size, stride and padding only: on a dilated, circular- or
    reflect-padded conv its unmerged output is neither its merged one nor jpeft's (which applies lora_A as the
    module does, as merging does). PEFT 0.22 gives lora_A the base's dilation and padding_mode: its unmerged
    output is its merged one and jpeft's. A file loads by the peft_version it records: >= 0.22 to PEFT 0.22's
    numbers, < 0.22 or none refused by name (reflect padding loaded silently with 0.21's file 17 off); jpeft's
    own adapter on such a conv is written with peft_version 0.22.0 and one warning (it was refused). DoRA too."""
    tnet, params, x, fx, fmodel, cl = _one_conv(torch_conv(), flax_conv, in_shape)
    assert np.abs(cl(np.asarray(fmodel.apply(params, fx))) - tnet(torch.tensor(x)).detach().numpy()).max() < 1e-5
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["c"], init_lora_weights=False, use_dora=dora)))
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        base = tnet(torch.tensor(x)).numpy()
        merged = copy.deepcopy(pm).merge_and_unload()(torch.tensor(x)).numpy()
        try:
            unmerged = pm(torch.tensor(x)).numpy()
        except RuntimeError as e:  # PEFT 0.21's undilated lora_A on a dilated Conv1d: another output length
            assert not PEFT_22 and "must match the size" in str(e), e
            unmerged = None
    assert np.abs(merged - base).max() > 0.5  # the adapter changes the output
    load = lambda: H.load_peft(str(tmp_path / "peft"), params, model=fmodel, example_args=(fx,))  # noqa: E731
    apply = lambda ad: cl(np.asarray(jpeft.apply(fmodel, params, ad, fx)))  # noqa: E731
    refused = why + r".*peft_version is (0\.21|none).*PEFT >= 0\.22 computes it as jpeft"
    if PEFT_22:
        np.testing.assert_allclose(unmerged, merged, atol=2e-5, rtol=1e-5)  # PEFT 0.22 agrees with itself
        np.testing.assert_allclose(apply(load()[1]), unmerged, atol=2e-5, rtol=1e-5)
        _relabel(tmp_path / "peft", "0.21.1.dev0@3f2a1b")  # what 0.21 computes from the same tensors: refused
        with pytest.raises(UnsupportedAdapterError, match=refused):
            load()
    else:
        assert unmerged is None or np.abs(unmerged - merged).max() > 1.0  # PEFT 0.21 disagrees with itself
        with pytest.raises(UnsupportedAdapterError, match=refused):
            load()
        # labelled as PEFT 0.22's, the same tensors give what PEFT 0.22 computes: 0.21's merged model
        _relabel(tmp_path / "peft", "0.22.0")
        np.testing.assert_allclose(apply(load()[1]), merged, atol=2e-5, rtol=1e-5)
    _relabel(tmp_path / "peft", None)  # no peft_version: older than PEFT 0.18
    with pytest.raises(UnsupportedAdapterError, match=why + r".*peft_version is none"):
        load()

    config = jpeft.LoraConfig(r=2, alpha=3.0, target_modules=["c"], use_dora=dora)
    adapter = tiny.randomize_adapter(jpeft.init(config, params, jax.random.key(0), fmodel, fx), 3)
    out = apply(adapter)
    np.testing.assert_allclose(out, cl(np.asarray(fmodel.apply(jpeft.merge(params, adapter), fx))),
                               atol=2e-5, rtol=1e-5)
    with pytest.warns(UserWarning, match=r"only PEFT >= 0\.22 computes as jpeft does \(c\).*" + why) as got:
        H.save_peft(str(tmp_path / "back"), config, adapter, params=params)
    assert len([w for w in got if "PEFT >= 0.22" in str(w.message)]) == 1
    assert jpeft.peft_format.peft_version_of(H.read_peft_config(str(tmp_path / "back"))) == (0, 22)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "back")).eval()
    if PEFT_22:
        with torch.no_grad():
            np.testing.assert_allclose(back(torch.tensor(x)).numpy(), out, atol=2e-5, rtol=1e-5)
    elif unmerged is not None:  # what the warning says: PEFT 0.21 computes another output
        with torch.no_grad():
            assert np.abs(back(torch.tensor(x)).numpy() - out).max() > 0.5
    _, again = H.load_peft(str(tmp_path / "back"), params, model=fmodel, example_args=(fx,))
    np.testing.assert_allclose(apply(again), out, atol=2e-5, rtol=1e-5)


_PEFT_CFG = {
    "LOHA": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["c"], init_weights=False),
    "LOHA_CP": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=["c"], init_weights=False,
                                       use_effective_conv2d=True),
    "LOKR": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=["c"], init_weights=False, rank_pattern={"c": 3}),
    "LOKR_CP": lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["c"], init_weights=False,
                                       use_effective_conv2d=True, decompose_factor=2),
    "ADALORA": lambda: peft.AdaLoraConfig(init_r=3, target_r=2, total_step=10, target_modules=["c"],
                                          init_lora_weights=False, lora_alpha=5),
    "OFT": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["c"], init_weights=False),
    "OFT_SHARED_COFT": lambda: peft.OFTConfig(oft_block_size=6, r=0, target_modules=["c"], init_weights=False,
                                              block_share=True, coft=True, eps=0.5),
    "OFT_EXACT_BIAS": lambda: peft.OFTConfig(oft_block_size=2, r=0, target_modules=["c"], init_weights=False,
                                             use_cayley_neumann=False, bias="oft_only"),
}
_PLAIN = (lambda: torch.nn.Conv2d(4, 5, (3, 2), stride=2, padding=1),  # a non-square window: its axis order tells
          dict(features=5, kernel_size=(3, 2), strides=2, padding=((1, 1), (1, 1))), (2, 4, 8, 8))
_DILATED_1D = (lambda: torch.nn.Conv1d(4, 5, 3, dilation=2, padding=2),
               dict(features=5, kernel_size=(3,), kernel_dilation=2, padding=((2, 2),)), (2, 4, 9))
_REFLECT_DILATED = (lambda: torch.nn.Conv2d(4, 5, 3, stride=(2, 1), dilation=2, padding=2, padding_mode="reflect"),
                    dict(features=5, kernel_size=(3, 3), strides=(2, 1), kernel_dilation=2, padding="REFLECT"),
                    (2, 4, 8, 7))
# torch's circular padding=1 pads 1 on each side, flax's CIRCULAR (k - 1) // 2 before and k // 2 after: twins for
# an odd window
_CIRCULAR = (lambda: torch.nn.Conv2d(4, 5, 3, padding=1, padding_mode="circular"),
             dict(features=5, kernel_size=(3, 3), padding="CIRCULAR"), (2, 4, 6, 7))
_ONE_BY_ONE = (lambda: torch.nn.Conv2d(4, 5, 1, stride=2), dict(features=5, kernel_size=(1, 1), strides=2),
               (2, 4, 7, 7))
# why PEFT < 0.22's LoHa / LoKr / AdaLoRA, and its OFT, differ: (the conv's option, what that PEFT does)
_PADDED = (r"padding='(REFLECT|CIRCULAR)'", "zero-padded")
_PATCHES = (r"a \d(x\d)* window", "unpadded kh x kw patches")


@pytest.mark.parametrize("method, conv, old_differs", [
    ("LOHA", _PLAIN, None), ("LOHA_CP", _REFLECT_DILATED, _PADDED), ("LOHA", _DILATED_1D, None),
    ("LOKR", _CIRCULAR, _PADDED), ("LOKR_CP", _PLAIN, None),
    ("ADALORA", _PLAIN, None), ("ADALORA", _REFLECT_DILATED, _PADDED),
    ("OFT", _PLAIN, _PATCHES), ("OFT_SHARED_COFT", _REFLECT_DILATED, _PATCHES), ("OFT_EXACT_BIAS", _ONE_BY_ONE, None),
], ids=["loha_plain", "loha_cp_reflect_dilated", "loha_conv1d_dilated", "lokr_circular", "lokr_cp_plain",
        "adalora_plain", "adalora_reflect_dilated", "oft_plain", "oft_shared_coft_reflect_dilated",
        "oft_exact_bias_1x1"])
def test_lycoris_adalora_oft_conv_loads_as_its_peft_computes(tmp_path, method, conv, old_differs):
    """PEFT's LoHa, LoKr (their CP forms too), AdaLoRA and OFT on a Conv1d / Conv2d, every tensor random. PEFT 0.21
    adds LoHa's, LoKr's and AdaLoRA's update through F.conv1d / F.conv2d with the base's stride, padding and dilation
    but zero-padded, and its OFT rotates stride-1, unpadded input patches and sums them back (F.fold; it refuses a
    dilated conv); PEFT 0.22 runs the update through the base's own _conv_forward and rotates OFT's conv weight. So
    both compute the merged model on a zero-padded conv (OFT: a 1x1 window), and elsewhere 0.21's unmerged output is
    not its merged one (``old_differs``: why). jpeft reads the file by the peft_version it records: its numbers are
    PEFT 0.22's (the merged model), and where 0.21's differ a file of PEFT < 0.22 (or without peft_version) is
    refused by name. save_peft writes the sites back; PEFT 0.22 loads them with the same numbers, and one that 0.21
    computes otherwise records peft_version 0.22.0 with one warning. (It was refused: jpeft read these formats for
    Linear sites only, and its OFT adapted no conv.)"""
    torch_conv, flax_conv, in_shape = conv
    tnet, params, x, fx, fmodel, cl = _one_conv(torch_conv(), flax_conv, in_shape)
    with torch.no_grad():
        base = tnet(torch.tensor(x)).numpy()
    assert np.abs(cl(np.asarray(fmodel.apply(params, fx))) - base).max() < 1e-5  # the twin is the same network
    if method.startswith("OFT") and tnet.c.dilation != (1, 1) and not PEFT_22:
        with pytest.raises(ValueError, match="dilation > 1 is not supported by OFT"):  # PEFT 0.21 has no such file
            peft.get_peft_model(copy.deepcopy(tnet), _PEFT_CFG[method]())
        return
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), _PEFT_CFG[method]())).eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    load = lambda: H.load_peft(str(tmp_path / "peft"), params, model=fmodel, example_args=(fx,))  # noqa: E731
    apply = lambda ad: cl(np.asarray(jpeft.apply(fmodel, params, ad, fx)))  # noqa: E731
    name = {"LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA", "OFT": "OFT"}[method.split("_")[0]]
    why = None if old_differs is None else f"{old_differs[0]}.*{old_differs[1]}"
    refused = None if old_differs is None else \
        rf"PEFT {name} of conv site 'c'.*has {old_differs[0]}.*, and the file's peft_version is %s.*{old_differs[1]}"
    if name == "OFT" and not PEFT_22 and len(set(tnet.c.kernel_size)) > 1:
        # PEFT 0.21's OFT Conv2d sizes its rotation for a kh x kh window: its forward and merge fail on a kh x kw one
        with torch.no_grad(), pytest.raises(RuntimeError, match="is invalid for input of size"):
            pm(torch.tensor(x))
        with pytest.raises(UnsupportedAdapterError, match=refused % r"0\.21"):
            load()
        return
    with torch.no_grad():
        unmerged = pm(torch.tensor(x)).numpy()
        merged = copy.deepcopy(pm).merge_and_unload()(torch.tensor(x)).numpy()
    assert np.abs(merged - base).max() > 0.1  # the adapter changes the output
    if PEFT_22 or old_differs is None:
        np.testing.assert_allclose(unmerged, merged, atol=5e-5, rtol=1e-5)  # PEFT agrees with itself
    else:
        assert np.abs(unmerged - merged).max() > 0.1  # PEFT 0.21 computes another output
    if old_differs is not None and not PEFT_22:
        with pytest.raises(UnsupportedAdapterError, match=refused % r"0\.21"):
            load()
        _relabel(tmp_path / "peft", "0.22.0")  # labelled as PEFT 0.22's, the same tensors give what 0.22 computes
    config, adapter = load()
    assert adapter["c"].layout.kind == "conv"
    out = apply(adapter)
    np.testing.assert_allclose(out, merged, atol=5e-5, rtol=1e-5)
    np.testing.assert_allclose(cl(np.asarray(fmodel.apply(jpeft.merge(params, adapter), fx))), merged,
                               atol=5e-5, rtol=1e-5)
    for version in ("0.21.1.dev0@3f2a1b", None):  # what PEFT 0.21 (or < 0.18) computes from the same tensors
        _relabel(tmp_path / "peft", version)
        if version is None and name == "OFT" and config.use_cayley_neumann:  # refused for the series first
            with pytest.raises(UnsupportedAdapterError, match="PEFT 0.18 changed that series"):
                load()
        elif old_differs is not None:
            with pytest.raises(UnsupportedAdapterError, match=refused % (r"0\.21" if version else "none")):
                load()
        else:
            np.testing.assert_allclose(apply(load()[1]), merged, atol=5e-5, rtol=1e-5)

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        H.save_peft(str(tmp_path / "back"), config, adapter, params=params)
    said = [str(w.message) for w in got if "PEFT >= 0.22" in str(w.message)]
    assert len(said) == (old_differs is not None), said
    assert all(re.search(why, m) for m in said), said
    assert (jpeft.peft_format.peft_version_of(H.read_peft_config(str(tmp_path / "back"))) == (0, 22)) \
        == (old_differs is not None)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "back")).eval()
    with torch.no_grad():
        again = back(torch.tensor(x)).numpy()
    if PEFT_22 or old_differs is None:
        np.testing.assert_allclose(again, out, atol=5e-5, rtol=1e-5)
    else:  # what the warning says: PEFT 0.21 computes another output
        assert np.abs(again - out).max() > 0.1
    np.testing.assert_allclose(apply(H.load_peft(str(tmp_path / "back"), params, model=fmodel,
                                                 example_args=(fx,))[1]), out, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [
    jpeft.LoHaConfig(r=2, alpha=3, target_modules=["c"]), jpeft.LoKrConfig(r=2, alpha=3, target_modules=["c"]),
    jpeft.AdaLoraConfig(init_r=2, target_r=2, total_step=10, target_modules=["c"]),
    jpeft.OFTConfig(oft_block_size=6, r=0, target_modules=["c"], use_cayley_neumann=False),
], ids=["loha", "lokr", "adalora", "oft"])
def test_own_conv_sites_apply_as_they_merge_and_load_in_peft(tmp_path, config):
    """jpeft's own LoHa, LoKr, AdaLoRA and OFT on a circular-padded conv, every array random: applied as merged,
    unmerged back to the base; written for PEFT with peft_version 0.22.0 (PEFT 0.21 zero-pads the update, or rotates
    patches), which PEFT 0.22 loads with jpeft's numbers. A Conv1d site is refused by name where PEFT's method has no
    Conv1d layer (AdaLoRA's SVDConv2d, OFT's Conv2d): on export, on reading (AdaLoRA), at init (jpeft's OFT)."""
    tnet, params, x, fx, fmodel, cl = _one_conv(_CIRCULAR[0](), *_CIRCULAR[1:])
    adapter = tiny.randomize_adapter(jpeft.init(config, params, jax.random.key(0), fmodel, fx), 4)
    out = cl(np.asarray(jpeft.apply(fmodel, params, adapter, fx)))
    merged = jpeft.merge(params, adapter)
    np.testing.assert_allclose(out, cl(np.asarray(fmodel.apply(merged, fx))), atol=5e-5, rtol=1e-5)
    assert np.abs(out - tnet(torch.tensor(x)).detach().numpy()).max() > 0.1  # the adapter changes the output
    np.testing.assert_allclose(jpeft.unmerge(merged, adapter)["params"]["c"]["kernel"], params["params"]["c"]["kernel"],
                               atol=1e-5)
    with pytest.warns(UserWarning, match=r"only PEFT >= 0\.22 computes as jpeft does \(c\)"):
        H.save_peft(str(tmp_path / "back"), config, adapter, params=params)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "back")).eval()
    with torch.no_grad():
        again = back(torch.tensor(x)).numpy()
    if PEFT_22:
        np.testing.assert_allclose(again, out, atol=5e-5, rtol=1e-5)
    else:
        assert np.abs(again - out).max() > 0.1
    if isinstance(config, (jpeft.AdaLoraConfig, jpeft.OFTConfig)):
        tnet1, params1, _, fx1, fmodel1, _ = _one_conv(_DILATED_1D[0](), *_DILATED_1D[1:])
        if isinstance(config, jpeft.OFTConfig):  # jpeft's OFT adapts no Conv1d either
            with pytest.raises(jpeft.errors.UnsupportedModuleError, match="1-D nn.Conv.*torch.nn.Conv2d"):
                jpeft.init(config, params1, jax.random.key(0), fmodel1, fx1)
            return
        ad1 = jpeft.init(config, params1, jax.random.key(0), fmodel1, fx1)
        with pytest.raises(UnsupportedAdapterError, match="1-D convolution; Hugging Face PEFT's AdaLoRA"):
            H.save_peft(str(tmp_path / "back1"), config, ad1, params=params1)
        assert not (tmp_path / "back1").exists()
        # the Conv2d file on a 1-D conv of as many inputs (3 x 12 = 3 x 3 x 4): no PEFT computes such a site
        conv1d = _FlaxOne(dict(features=5, kernel_size=(3,)))
        fx12 = jnp.zeros((1, 6, 12))
        with pytest.raises(UnsupportedAdapterError, match="a 1-D nn.Conv; Hugging Face PEFT's AdaLoRA adapts Linear "
                                                          "and Conv2d layers only"):
            H.load_peft(str(tmp_path / "back"), conv1d.init(jax.random.key(0), fx12), model=conv1d,
                        example_args=(fx12,))


def test_grouped_conv_lora_from_peft_is_refused(tmp_path):
    """PEFT adapts a grouped conv (lora_B grouped; it cannot merge it); jpeft adapts no grouped conv."""
    tnet, params, x, fx, fmodel, _ = _one_conv(torch.nn.Conv2d(4, 6, 3, padding=1, groups=2),
                                               dict(features=6, kernel_size=(3, 3), padding=1, feature_group_count=2),
                                               (2, 4, 8, 8))
    with pytest.warns(UserWarning, match="groups > 1"):
        pm = peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(r=2, target_modules=["c"], init_lora_weights=False))
    _random_lora(pm).save_pretrained(str(tmp_path))
    with pytest.raises(LayoutError, match="grouped"):
        H.load_peft(str(tmp_path), params, model=fmodel, example_args=(fx,))


def test_pissa_with_conv_in_the_model_loads_with_base(tmp_path):
    """load_peft_with_base takes load_peft's model= (one reading): a PiSSA adapter of the conv net's
    Linear, every tensor random after PEFT's init, gives PEFT's output on the residual base PEFT recomputes.
    PEFT has no PiSSA/OLoRA init on a ConvNd: such a file (here, a conv LoRA relabelled) is refused by
    name, as PEFT refuses it, and jpeft's own PiSSA on a conv is not saved for PEFT."""
    tnet, params, x, fx = _twin()
    with pytest.raises(ValueError, match="Unknown initialization"):
        peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(r=2, target_modules=["c1"], init_lora_weights="pissa"))
    pm = peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"],
                                                                   init_lora_weights="pissa"))
    _random_lora(pm).save_pretrained(str(tmp_path / "pissa"))
    with torch.no_grad():
        ref = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "pissa")).eval()(torch.tensor(x)).numpy()
    with pytest.raises(UnsupportedAdapterError, match=r"load_peft_with_base\(path, params, model=model"):
        H.load_peft(str(tmp_path / "pissa"), params, model=_FlaxNet(), example_args=(fx,))
    _, residual, adapter = H.load_peft_with_base(str(tmp_path / "pissa"), params, model=_FlaxNet(), example_args=(fx,))
    np.testing.assert_allclose(np.asarray(jpeft.apply(_FlaxNet(), residual, adapter, fx)), ref, atol=2e-5, rtol=1e-5)

    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        r=2, target_modules=["c1"], init_lora_weights=False)))
    pm.save_pretrained(str(tmp_path / "conv"))
    cfg_path = tmp_path / "conv" / "adapter_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"init_lora_weights": false', '"init_lora_weights": "pissa"'))
    with pytest.raises(ValueError, match="Unknown initialization"):
        peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "conv"))
    with pytest.raises(UnsupportedAdapterError, match="ConvNd layer has no pissa init"):
        H.load_peft_with_base(str(tmp_path / "conv"), params, model=_FlaxNet(), example_args=(fx,))

    config = jpeft.LoraConfig(r=2, target_modules=["c1"], init_weights="pissa")
    _, own = jpeft.init_pissa(config, params, jax.random.key(0), _FlaxNet(), fx)
    with pytest.raises(UnsupportedAdapterError, match="ConvNd layer has no pissa init"):
        H.save_peft(str(tmp_path / "own"), config, own, params=params)


class _ScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return nn.relu(nn.Conv(4, (3,), padding=1, name="conv")(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):  # x [b, 7, 4]
        return nn.scan(_ScanBlock, variable_axes={"params": 0, "jpeft_adapter": 0}, split_rngs={"params": True},
                       length=2)(name="layers")(x, None)[0]


class _TorchLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.ModuleDict({"conv": torch.nn.Conv1d(4, 4, 3, padding=1)})
                                           for _ in range(2)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer["conv"](x))
        return x


def test_conv_lora_on_a_layer_scanned_base(tmp_path):
    """A layer-scanned base (nn.scan over a block with a Conv1d): the traced layout of the scanned module
    serves each layer's site (it was not used: the refusal asked for the model= it had been given)."""
    torch.manual_seed(0)
    tnet = _TorchLayers().eval()
    t = lambda w: jnp.asarray(w.detach().numpy())  # noqa: E731
    params = {"params": jpeft.scan.stack_params({f"layers_{i}": {"conv": {
        "kernel": t(tnet.layers[i]["conv"].weight).transpose(2, 1, 0), "bias": t(tnet.layers[i]["conv"].bias)}}
        for i in range(2)})}
    x = np.random.RandomState(0).randn(2, 4, 7).astype(np.float32)
    _check_both_ways(tmp_path, tnet, params, x, jnp.asarray(x.transpose(0, 2, 1)), _Scanned(), ["conv"],
                     dict(r=2, lora_alpha=3, use_dora=True), lambda y: np.moveaxis(y, -1, 1))
    with pytest.raises(LayoutError, match=r"model=model, example_args=\(x,\)"):
        H.load_peft(str(tmp_path / "peft"), params)


def test_conv_lora_on_an_nnx_model(tmp_path):
    """An NNX model's nnx.Conv: load_peft(module, model=module, example_args=) traces it (it was refused,
    and without the model the refusal asked for it: the two pointed at each other)."""
    nnx = pytest.importorskip("flax.nnx")
    tnet, params, x, fx, _, cl = _CONV1D()

    class Net(nnx.Module):
        def __init__(self):
            self.c = nnx.Conv(3, 5, (3,), strides=2, padding=((1, 1),), rngs=nnx.Rngs(0))

        def __call__(self, h):
            return self.c(h)

    net = Net()
    net.c.kernel[...] = params["params"]["c"]["kernel"]
    net.c.bias[...] = params["params"]["c"]["bias"]
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=["c"], init_lora_weights=False, use_dora=True)))
    pm.save_pretrained(str(tmp_path))
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
    with pytest.raises(LayoutError, match=r"model=model, example_args=\(x,\)"):
        H.load_peft(str(tmp_path), net)
    _, adapter = H.load_peft(str(tmp_path), net, model=net, example_args=(fx,))
    np.testing.assert_allclose(cl(np.asarray(jpeft.apply(net, None, adapter, fx))), ref, atol=2e-5, rtol=1e-5)


def test_own_conv_lora_merges_unmerges_and_loads_in_peft(tmp_path):
    """jpeft.init's LoRA and DoRA on linen nn.Conv (every tensor random): merge equals the factored
    output, unmerge gives the base back (LoRA), and PEFT loads save_peft's file with the same output."""
    tnet, params, x, fx = _twin()
    for i, config in enumerate([jpeft.LoraConfig(r=2, alpha=3.0, target_modules=["c1", "c2", "d1"]),
                                jpeft.LoraConfig(r=3, alpha=2.0, use_dora=True, target_modules=["c1", "d1", "lin"])]):
        adapter = tiny.randomize_adapter(jpeft.init(config, params, jax.random.key(0), _FlaxNet(), fx), i)
        out = np.asarray(jpeft.apply(_FlaxNet(), params, adapter, fx))
        assert np.abs(out - np.asarray(_FlaxNet().apply(params, fx))).max() > 0.1
        merged = jpeft.merge(params, adapter)
        np.testing.assert_allclose(np.asarray(_FlaxNet().apply(merged, fx)), out, atol=2e-5, rtol=1e-5)
        if not config.use_dora:  # a merged DoRA is not invertible (NotInvertibleError, tests/test_methods_dora.py)
            for a, b in zip(jax.tree.leaves(jpeft.unmerge(merged, adapter)), jax.tree.leaves(params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
        H.save_peft(str(tmp_path / str(i)), config, adapter, params=params)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / str(i))).eval()
        with torch.no_grad():
            np.testing.assert_allclose(back(torch.tensor(x)).numpy(), out, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("peft_type, ours, targets", [
    ("cat", dict(method="cat"), ["c1", "c2", "d1"]),
    ("linear", dict(method="linear", factors=True), ["c1", "c2", "d1"]),
    ("svd", dict(method="svd", rank=4), ["c1", "c2"]),
], ids=["cat", "linear_factors", "svd_full_rank"])
def test_merging_conv_loras_equals_peft_add_weighted_adapter(tmp_path, peft_type, ours, targets):
    """jpeft.merging.merge_adapters on conv LoRAs read from PEFT equals PEFT's add_weighted_adapter
    (``svd`` at full rank, 4 = the sum of the two ranks, where both are exact). PEFT 0.21's ``svd`` works on
    Conv2d only: on a Conv1d it raises a RuntimeError (a size mismatch), where jpeft's is the same merge;
    PEFT 0.22 flattens every ConvNd's update and merges the Conv1d as jpeft does."""
    tnet, params, x, fx = _twin()
    if peft_type == "svd" and PEFT_22:
        targets = targets + ["d1"]
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        r=2, lora_alpha=3, target_modules=targets, init_lora_weights=False))
    _random_lora(pm, seed=5).save_pretrained(str(tmp_path / "a"))
    _random_lora(pm, seed=6).save_pretrained(str(tmp_path / "b"))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "a"))
    pm.load_adapter(str(tmp_path / "b"), adapter_name="b")
    if peft_type == "svd" and not PEFT_22:
        d1 = peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(r=2, target_modules=["d1"], init_lora_weights=False))
        d1.add_adapter("b", peft.LoraConfig(r=2, target_modules=["d1"], init_lora_weights=False))
        with pytest.raises(RuntimeError, match="size mismatch"):
            d1.add_weighted_adapter(["default", "b"], [0.5, 2.0], "m", combination_type="svd", svd_rank=4)
    pm.add_weighted_adapter(["default", "b"], [0.5, 2.0], "m", combination_type=peft_type,
                            **({"svd_rank": 4} if peft_type == "svd" else {}))
    pm.set_adapter("m")
    with torch.no_grad():
        ref = pm.eval()(torch.tensor(x)).numpy()
    ads = [H.load_peft(str(tmp_path / n), params, model=_FlaxNet(), example_args=(fx,))[1] for n in "ab"]
    m = jpeft.merging.merge_adapters(ads, [0.5, 2.0], **ours)
    np.testing.assert_allclose(np.asarray(jpeft.apply(_FlaxNet(), params, m, fx)), ref, atol=5e-5, rtol=1e-4)
