"""Intruder dimensions (Shuttleworth et al. 2024) and PEFT's reduce_intruder_dimension:
jpeft's detection and reduction against PEFT's on the same random LoRA adapter (embedding and
GPT-2 Conv1D sites against PEFT 0.22's, which fixed their orientation); the spectral helpers
against closed forms."""

import copy
import dataclasses
import os
import re
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft import spectral
from jpeft.errors import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _models_tiny as tiny  # noqa: E402
from _models_tiny import BoxedMLP  # noqa: E402
from jpeft import intruder_report, reduce_intruder_dimension
from jpeft.hf import load_peft
from jpeft.tree import get_subtree

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")  # a test dependency: missing means a broken install, not a skip
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce  # noqa: E402

DIMS = {"q_proj": (48, 40), "v_proj": (40, 36), "down_proj": (36, 24)}  # name: (in, out)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for name, (i, o) in DIMS.items():
            setattr(self, name, torch.nn.Linear(i, o))

    def forward(self, x):
        return self.down_proj(torch.tanh(self.v_proj(torch.tanh(self.q_proj(x)))))


class FlaxNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(40, name="q_proj")(x))
        h = jnp.tanh(nn.Dense(36, name="v_proj")(h))
        return nn.Dense(24, name="down_proj")(h)


def _t(x):
    return np.asarray(x.detach().numpy())


@pytest.fixture(scope="module")
def pair():
    """The same base and the same random LoRA (r=4, alpha=8, every factor random) in PEFT and
    jpeft. q_proj's update is large (intruders expected), down_proj's tiny (none expected)."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(TorchNet(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(DIMS))).eval()
    b = pm.base_model.model
    rng = np.random.RandomState(0)
    params = {"params": {n: {"kernel": jnp.asarray(_t(getattr(b, n).base_layer.weight).T),
                             "bias": jnp.asarray(_t(getattr(b, n).base_layer.bias))} for n in DIMS}}
    x = rng.randn(5, 48).astype(np.float32)
    model = FlaxNet()
    ad = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules=list(DIMS)), params, jax.random.key(0), model,
                    jnp.asarray(x))
    size = {"q_proj": 0.6, "v_proj": 0.3, "down_proj": 0.002}
    for n, (i, o) in DIMS.items():
        A = (rng.randn(4, i) * size[n]).astype(np.float32)  # PyTorch orientation [r, in], [out, r]
        B = (rng.randn(o, 4) * size[n]).astype(np.float32)
        layer = getattr(b, n)
        layer.lora_A["default"].weight.data = torch.tensor(A)
        layer.lora_B["default"].weight.data = torch.tensor(B)
        ad[n] = dataclasses.replace(ad[n], lora_A=jnp.asarray(A.T), lora_B=jnp.asarray(B.T))
    np.testing.assert_allclose(jpeft.apply(model, params, ad, jnp.asarray(x)), _t(pm(torch.tensor(x))), rtol=1e-5,
                               atol=1e-5)
    return pm, model, params, ad, x


def _peft_reduce_counts(pm) -> dict:
    """PEFT's reduce_intruder_dimension on ``pm`` (in place, as adapter "intruder_reduced"): the intruder
    count per layer it logs, ``{layer name: count}``."""
    lines = []
    peft_reduce(pm, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75, logging_sink=lines.append)
    counts = {}
    for line in lines:
        m = re.match(r".*?(\w+): (?:Intruders: (\d+)|No intruders)$", line)
        if m:
            counts[m.group(1)] = int(m.group(2) or 0)
    return counts


def test_detection_and_reduction_equal_peft(pair):
    pm, model, params, ad, x = pair
    before = _t(pm(torch.tensor(x)))
    counts = _peft_reduce_counts(pm)
    report = intruder_report(params, ad, top_k=10, threshold_epsilon=0.5)
    assert {k: len(v["indices"]) for k, v in report.items()} == counts
    assert counts["q_proj"] > 0 and counts["down_proj"] == 0  # both branches are exercised

    new = reduce_intruder_dimension(params, ad, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75)
    b = pm.base_model.model
    for n in DIMS:
        layer = getattr(b, n)
        d_peft = _t(layer.get_delta_weight("intruder_reduced"))
        np.testing.assert_allclose(np.asarray(new[n].delta_matrix()).T, d_peft, rtol=1e-4, atol=2e-5, err_msg=n)
        # the factors themselves: equal up to the sign of each singular pair (SVD's only freedom)
        A_p, B_p = _t(layer.lora_A["intruder_reduced"].weight), _t(layer.lora_B["intruder_reduced"].weight)
        A_j, B_j = np.asarray(new[n].lora_A).T, np.asarray(new[n].lora_B).T
        sign = np.sign(np.sum(A_p * A_j, axis=1))
        np.testing.assert_allclose(A_j * sign[:, None], A_p, rtol=1e-3, atol=2e-4, err_msg=n)
        np.testing.assert_allclose(B_j * sign[None, :], B_p, rtol=1e-3, atol=2e-4, err_msg=n)
        if counts[n] == 0:  # unchanged, bit for bit
            assert new[n] is ad[n]
    after = _t(pm(torch.tensor(x)))
    assert np.max(np.abs(after - before)) > 1e-3  # the mitigation changed the model
    np.testing.assert_allclose(jpeft.apply(model, params, new, jnp.asarray(x)), after, rtol=1e-4, atol=2e-5)
    # the reduction removed intruder energy: fewer or equal intruders, never more
    again = intruder_report(params, new, top_k=10, threshold_epsilon=0.5)
    assert sum(len(v["indices"]) for v in again.values()) <= sum(counts.values())


def _linear_twin_reduction(sites, r, alpha):
    """PEFT's reduce_intruder_dimension on nn.Linear twins of ``sites`` (``{name: (W [out, in], A [r, in],
    B [out, r])}``): the orientation every PEFT computes alike. ``(counts, {name: new delta [out, in]})``."""
    net = torch.nn.Module()
    for n, (w, _, _) in sites.items():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = torch.tensor(w)
        net.add_module(n, lin)
    pm = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(sites),
                                                  init_lora_weights=False))
    for n, (_, a, b) in sites.items():
        layer = getattr(pm.base_model.model, n)
        layer.lora_A["default"].weight.data = torch.tensor(a)
        layer.lora_B["default"].weight.data = torch.tensor(b)
    counts = _peft_reduce_counts(pm)
    return counts, {n: _t(getattr(pm.base_model.model, n).get_delta_weight("intruder_reduced")) for n in sites}


@pytest.mark.parametrize("family,targets", [("gpt2", ["wte", "c_attn", "c_proj"]),
                                            ("llama3", ["embed_tokens", "q_proj"])])
def test_embedding_and_conv1d_sites_equal_peft_0_22(family, targets, tmp_path):
    """PEFT 0.22's reduce_intruder_dimension also takes embedding LoRAs and GPT-2's Conv1D (fan_in_fan_out)
    layers, both viewed as [out, in] as lora_B @ lora_A is (PEFT 0.21 decomposed their stored weights, [in, out],
    and its reduced model fails to run). jpeft refused embedding sites; it now reduces them as PEFT 0.22 does: a
    PEFT LoRA (every factor random, tied GPT-2 wte and Llama embed_tokens included) read by load_peft gives
    PEFT's intruder counts and new delta weights per site (PEFT on nn.Linear twins, which every PEFT computes
    alike) and, under PEFT >= 0.22, the logits of PEFT's own reduction of the model."""
    hf, folder = tiny.hf_model(family)
    model, params = jpeft.models.from_pretrained(folder)
    pm = tiny.perturb_trainable(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)), seed=0, scale=1.5)
    pm.save_pretrained(str(tmp_path))
    _, ad = load_peft(str(tmp_path), params)
    sites = {}  # torch orientation W [out, in], A [r, in], B [out, r]; a Dense kernel or embedding table is [in, out]
    for path, node in ad.items():
        k = np.asarray(get_subtree(params["params"], path)[node.layout.param_name], np.float32)
        sites[path.replace("/", "_")] = (k.T, np.asarray(node.lora_A).T, np.asarray(node.lora_B).T)
    counts, deltas = _linear_twin_reduction(sites, 4, 8)
    report = intruder_report(params, ad, top_k=10, threshold_epsilon=0.5)
    assert {p.replace("/", "_"): len(v["indices"]) for p, v in report.items()} == counts
    embed = next(p for p in ad if ad[p].layout.kind == "embed")
    assert counts[embed.replace("/", "_")] > 0  # the embedding site has intruders: the new branch runs
    new = reduce_intruder_dimension(params, ad, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75)
    for path in ad:
        np.testing.assert_allclose(np.asarray(new[path].delta_matrix()).T, deltas[path.replace("/", "_")],
                                   rtol=1e-4, atol=5e-5, err_msg=path)

    ids, mask = tiny.batch(family)
    got = np.asarray(jpeft.apply(model, params, new, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    peft_reduce(pm, top_k=10, threshold_epsilon=0.5, mitigation_lambda=0.75)
    if tiny.peft_at_least(0, 22):
        want = tiny.peft_logits(pm, ids, mask)
        tiny.assert_close_at_tokens(got, want, mask, atol=1e-4)
        assert np.abs(want - tiny.peft_logits(hf, ids, mask)).max() > 0.1  # the reduced adapter still acts
    else:  # PEFT 0.21 wrote [in, out] factors into the [out, in] / embedding layers
        with pytest.raises((RuntimeError, IndexError)):
            tiny.peft_logits(pm, ids, mask)


def test_refusals(pair):
    _, model, params, ad, x = pair
    dora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), params, jax.random.key(0), model,
                      jnp.asarray(x))
    with pytest.raises(ConfigError, match="DoRA"):
        reduce_intruder_dimension(params, dora)
    with pytest.raises(ConfigError, match="mitigation_lambda"):
        reduce_intruder_dimension(params, ad, mitigation_lambda=1.5)


def test_spectral_closed_forms():
    rng = np.random.RandomState(0)
    q1, _ = np.linalg.qr(rng.randn(6, 6))
    q2, _ = np.linalg.qr(rng.randn(5, 5))
    s = np.array([4.0, 2.0, 1.0, 1.0, 0.0])
    w = q1[:, :5] @ np.diag(s) @ q2.T  # [6, 5] with known singular values
    p = s[:4] / s.sum()
    assert spectral.effective_rank(w) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
    assert spectral.rank_for_energy(w, 0.9) == 2  # (16 + 4) / 22 = 0.909
    assert spectral.rank_for_energy(w, 0.95) == 3
    assert spectral.effective_rank(np.zeros((3, 2))) == 0.0
    # base [4, 3] = diag(3, 2, 1): left singular vectors e1, e2, e3. Adding 10 at (4, 3) makes the
    # top singular vector (0, 0, 1, 10) / sqrt(101), |cos| 1/sqrt(101) with e3 and 0 with e1, e2:
    # an intruder; the second (singular value 3) is e1 itself
    base = np.diag([3.0, 2.0, 1.0, 0.0])[:, :3]
    tuned = base.copy()
    tuned[3, 2] = 10.0
    rep = spectral.intruder_dimensions(base, tuned, top_k=2, epsilon=0.5)
    assert rep["indices"] == [0]
    assert rep["similarity"] == pytest.approx([1 / np.sqrt(101), 1.0])


def test_update_spectrum_names_the_changed_kernels_it_cannot_measure():
    """A LoRA on a DenseGeneral kernel [16, 4, 6] changes it when merged; update_spectrum
    measures 2-D kernels only, so it lists that one under skipped, with a warning, instead of
    leaving it out of its numbers unsaid."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 6), name="proj")(x)
            return nn.Dense(5, name="out")(h.reshape(h.shape[:-2] + (24,)))

    x = jnp.ones((2, 16))
    params = M().init(jax.random.key(0), x)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["proj", "out"], init_weights="random"), params,
                         jax.random.key(1), M(), x)
    merged = jpeft.merge(params, adapter)
    with pytest.warns(UserWarning, match=r"1 changed kernel\(s\) of other ranks.*'params/proj/kernel'"):
        rep = spectral.update_spectrum(params, merged)
    assert rep["skipped"] == ["params/proj/kernel"] and rep["changed"] == 1
    assert list(rep["kernels"]) == ["params/out/kernel"]
    assert rep["kernels"]["params/out/kernel"]["rank_for_energy"] <= 2  # a rank-2 update


def test_update_spectrum_names_a_changed_embedding():
    """A merged embedding LoRA changes the `embedding` table; update_spectrum left it out of its
    numbers without a word (neither measured nor under skipped). It is named under skipped, with
    the warning, as the other changed leaves it does not measure."""

    class M(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(5, name="out")(nn.Embed(12, 6, name="embed_tokens")(ids))

    ids = jnp.array([[1, 2, 3]])
    params = M().init(jax.random.key(0), ids)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["embed_tokens", "out"], init_weights="random"), params,
                         jax.random.key(1), M(), ids)
    merged = jpeft.merge(params, adapter)
    with pytest.warns(UserWarning, match=r"'params/embed_tokens/embedding'.*embedding tables"):
        rep = spectral.update_spectrum(params, merged)
    assert rep["skipped"] == ["params/embed_tokens/embedding"] and list(rep["kernels"]) == ["params/out/kernel"]
    import warnings
    with warnings.catch_warnings():  # an unchanged table is not named
        warnings.simplefilter("error")
        spectral.update_spectrum(params, jpeft.merge(params, {"out": adapter["out"]}))


def test_update_spectrum_reads_kernels_boxed_by_with_partitioning():
    """jpeft.init, apply and merge read params boxed by nn.with_partitioning; update_spectrum of such a
    base (against jpeft.merge of it, which is unboxed) raised float()'s raw TypeError on nn.Partitioned.
    It equals the report of the unboxed base, every LoRA factor random."""

    x = jax.random.normal(jax.random.key(0), (4, 12))
    params = BoxedMLP(16, 3).init(jax.random.key(1), x)
    assert isinstance(params["params"]["d"]["kernel"], nn.Partitioned)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d", "o"], init_weights="random"), params, jax.random.key(2))
    adapter = {p: dataclasses.replace(n, lora_B=jax.random.normal(jax.random.key(3), n.lora_B.shape))
               for p, n in adapter.items()}
    want = spectral.update_spectrum(nn.unbox(params), jpeft.merge(nn.unbox(params), adapter))
    assert spectral.update_spectrum(params, jpeft.merge(params, adapter)) == want and want["changed"] == 2
    assert spectral.update_spectrum(params, params)["changed"] == 0  # both boxed
