"""PEFT LoRA on torch Conv1d/Conv2d layers against jpeft on the flax nn.Conv twin (kernel
``[*window, in, out]``, NHWC): load_peft(..., model=, example_args=) gives PEFT's numbers,
save_peft writes files PEFT loads with the same numbers, and without the model the refusal
names the fix (a file for another conv window is refused). Every adapter tensor random."""

import copy
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft import hf as H
from jpeft.errors import BaseMismatchError, LayoutError

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


@pytest.mark.parametrize("kw", [
    dict(r=2, lora_alpha=3, rank_pattern={"c1": 4}, alpha_pattern={"d1": 7.0}),
    dict(r=2, lora_alpha=3, use_dora=True),
    dict(r=3, lora_alpha=4, use_rslora=True, lora_bias=True),
], ids=["lora_patterns", "dora", "rslora_lora_bias"])
def test_conv_lora_from_and_to_peft(tmp_path, kw):
    tnet, params, x, fx = _twin()
    with torch.no_grad():
        base = tnet(torch.tensor(x)).numpy()
    assert np.abs(np.asarray(_FlaxNet().apply(params, fx)) - base).max() < 1e-5  # the twin is the same network
    pm = _random_lora(peft.get_peft_model(copy.deepcopy(tnet), peft.LoraConfig(
        target_modules=["c1", "c2", "d1", "lin"], init_lora_weights=False, **kw)))
    pm.save_pretrained(str(tmp_path / "peft"))
    with torch.no_grad():
        ref = pm(torch.tensor(x)).numpy()
        merged_ref = copy.deepcopy(pm).merge_and_unload()(torch.tensor(x)).numpy()
    assert np.abs(ref - base).max() > 0.1  # the adapter changes the output

    config, adapter = H.load_peft(str(tmp_path / "peft"), params, model=_FlaxNet(), example_args=(fx,))
    assert {adapter[p].layout.kind for p in ("c1", "c2", "d1")} == {"conv"}
    out = np.asarray(jpeft.apply(_FlaxNet(), params, adapter, fx))
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    merged = np.asarray(_FlaxNet().apply(jpeft.merge(params, adapter), fx))
    np.testing.assert_allclose(merged, merged_ref, atol=2e-5, rtol=1e-5)

    H.save_peft(str(tmp_path / "back"), config, adapter, params=params)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(tnet), str(tmp_path / "back")).eval()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.tensor(x)).numpy(), ref, atol=2e-5, rtol=1e-5)


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
