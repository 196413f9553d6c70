"""QLoRA (issue 19): a quantized frozen base (NF4, int8, fp8) under jpeft's methods.

NF4 is checked bit for bit against a plain NumPy blockwise implementation written here from
the QLoRA paper and against bitsandbytes' own ``quantize_4bit`` (bitsandbytes 0.50 runs on the
CPU; it is in the test extra), and an adapter trained on jpeft's NF4 base is loaded by peft onto
transformers' bitsandbytes 4-bit model; int8 and fp8 (qwix) against their
analytic round-trip bounds; every method's output on a quantized base against the same
method on the dequantized base, with every adapter tensor random."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.ad_checkpoint  # noqa: F401  (print_saved_residuals)
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qwix

import jpeft  # noqa: E402
from jpeft import quant, scan  # noqa: E402
from jpeft.errors import QuantizationError  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers"))
from apply_checks import assert_same_output_and_writes  # noqa: E402
from _models_tiny import BoxedMLP  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# QLoRA, appendix E (the NF4 data type), as printed in the paper and in bitsandbytes.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def _nearest_ref(table, x):
    """Plain argmin of the distance (ties: lowest index)."""
    return np.argmin(np.abs(x[..., None] - table), axis=-1).astype(np.uint8)


def nf4_reference(w: np.ndarray, offset=None):
    """bitsandbytes' quantize_4bit(blocksize=64, quant_type="nf4", compress_statistics=True),
    written out in NumPy for one [in, out] kernel (PyTorch holds it as [out, in]). The offset
    is the absmaxes' mean (exact, then rounded to float32); jpeft sums in a fixed pairwise
    order, so its offset is within an ulp of this one (checked by the caller)."""
    flat = np.ascontiguousarray(w.T, dtype=np.float32).reshape(-1)
    n = flat.size
    nb = -(-n // 64)
    blocks = np.concatenate([flat, np.zeros(nb * 64 - n, np.float32)]).reshape(nb, 64)
    absmax = np.abs(blocks).max(axis=1)
    codes = _nearest_ref(np.array(PUBLISHED_NF4, np.float32), blocks / np.where(absmax == 0, 1, absmax)[:, None])
    packed = (codes[:, 0::2] << 4 | codes[:, 1::2]).reshape(-1)
    offset = np.float32(absmax.astype(np.float64).mean()) if offset is None else np.float32(offset)
    centred = absmax - offset
    ng = -(-nb // 256)
    groups = np.concatenate([centred, np.zeros(ng * 256 - nb, np.float32)]).reshape(ng, 256)
    scale2 = np.abs(groups).max(axis=1)
    q2 = _nearest_ref(quant.dynamic_code(), groups / np.where(scale2 == 0, 1, scale2)[:, None]).reshape(-1)[:nb]
    return packed, q2, scale2, offset


def test_nf4_table_and_dynamic_code():
    np.testing.assert_array_equal(quant.NF4_LEVELS, np.array(PUBLISHED_NF4, np.float32))
    code = quant.dynamic_code()
    assert code.shape == (256,) and len(np.unique(code)) == 256 and np.all(np.diff(code) > 0)
    assert code[-1] == 1.0 and 0.0 in code and np.isclose(code[0], -0.99296875)
    # 2**i values per decade 10**(i-6) on either side: the smallest step is 0.9e-6 / 2
    assert np.isclose(np.abs(code[code != 0]).min(), 0.55e-6, rtol=1e-6)


def test_nf4_codes_and_scales_equal_the_numpy_reference_bit_for_bit():
    shape = (2, 190, 97)  # two stacked layers; 288 blocks a layer: two groups of 256, a padded end
    w = np.asarray(jax.random.normal(jax.random.key(1), shape)) * 0.05
    w.reshape(-1)[:64] = 0.0  # an all-zero block (absmax 0)
    q = quant.quantize_array(w, "nf4")
    mats = w.reshape((-1,) + shape[-2:])
    for j, mat in enumerate(mats):
        got = jax.tree.map(lambda x: np.asarray(x).reshape((len(mats),) + x.shape[len(shape) - 2:])[j], q)
        packed, q2, scale2, offset = nf4_reference(mat)
        np.testing.assert_array_max_ulp(got.absmax_offset, offset, maxulp=1)
        if got.absmax_offset != offset:  # one ulp apart: go on from jpeft's offset, bit for bit
            packed, q2, scale2, offset = nf4_reference(mat, offset=got.absmax_offset)
        np.testing.assert_array_equal(got.codes, packed)
        np.testing.assert_array_equal(got.absmax_codes, q2)
        np.testing.assert_array_equal(got.absmax_scales, scale2)
        np.testing.assert_array_equal(got.absmax_offset, offset)
        # dequantized: level * (dynamic code * scale2 + offset), in the kernel's orientation
        absmax = quant.dynamic_code()[q2] * np.repeat(scale2, 256)[: q2.size] + offset
        idx = np.stack([packed >> 4, packed & 15], -1).reshape(-1, 64)
        ref = (quant.NF4_LEVELS[idx] * absmax[:, None]).reshape(-1)[: mat.size].reshape(mat.shape[::-1]).T
        deq = np.asarray(quant.dequantize_array(q)).reshape(mats.shape)[j]
        np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-9)
    err = np.abs(np.asarray(quant.dequantize_array(q)) - w).max()
    assert err <= 0.16 * np.abs(w).max()  # half the widest NF4 gap (1 - 0.696) times the absmax


def test_nf4_kernels_of_many_shapes_share_a_few_compiled_programs():
    """A model's kernels come in many shapes; NF4 compiles its two programs per block layout
    (layers and blocks padded to powers of two), not per kernel shape: these seven shapes (1, 2
    or 3 stacked layers, up to 64 blocks) add at most three programs of each kind (once compiled
    per shape: seven each, 6 CPU-s for a tiny model). The padding changes no bit: each kernel,
    given as NumPy or as a JAX array, equals the NumPy reference (traced inside jit, the codes
    and the offset too; an absmax scale may come out an ulp apart there, see quantize_array)."""
    shapes = [(7, 9), (32, 32), (32, 96), (96, 32), (40, 100), (3, 40, 24), (2, 64, 64)]
    rng = np.random.default_rng(3)
    kernels = [(rng.standard_normal(s) * np.exp(rng.standard_normal(s))).astype(np.float32) for s in shapes]
    programs = lambda: (quant._nf4_codes._cache_size(), quant._nf4_absmax_codes._cache_size())  # noqa: E731
    before = programs()
    got = [quant.quantize_array(w, "nf4") for w in kernels]
    assert all(after - b <= 3 for after, b in zip(programs(), before)), (before, programs())
    traced = jax.jit(quant.quantize_array, static_argnums=1)
    for w, q in zip(kernels, got):
        mats = w.reshape((-1,) + w.shape[-2:])
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                     quant.quantize_array(jnp.asarray(w), "nf4"), q)
        t = traced(w, "nf4")
        for field in ("codes", "absmax_codes", "absmax_offset"):
            np.testing.assert_array_equal(np.asarray(getattr(t, field)), np.asarray(getattr(q, field)))
        np.testing.assert_array_max_ulp(np.asarray(t.absmax_scales), np.asarray(q.absmax_scales), maxulp=1)
        assert q.shape == w.shape and q.codes.shape == w.shape[:-2] + (-(-w.shape[-1] * w.shape[-2] // 64) * 32,)
        for j, mat in enumerate(mats):
            one = jax.tree.map(lambda x: np.asarray(x).reshape((len(mats),) + x.shape[w.ndim - 2:])[j], q)
            packed, q2, scale2, offset = nf4_reference(mat, offset=one.absmax_offset)
            np.testing.assert_array_max_ulp(one.absmax_offset, nf4_reference(mat)[3], maxulp=1)
            np.testing.assert_array_equal(one.codes, packed)
            np.testing.assert_array_equal(one.absmax_codes, q2)
            np.testing.assert_array_equal(one.absmax_scales, scale2)


def _torch_kernel(shape, seed, outliers=True):
    import torch

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02
    if outliers:  # a few large weights, as trained LLMs have: they set the absmaxes' spread
        w[0, :5] *= 40
    return w


@pytest.mark.parametrize("shape", [(384, 200), (2048, 640), (96, 97)])
def test_nf4_equals_bitsandbytes_quantize_4bit(shape):
    """bitsandbytes' own quantize_4bit(blocksize=64, "nf4", compress_statistics=True) on the
    same [out, in] weight: the 4-bit codes bit for bit; the offset (the absmaxes' mean) to an
    ulp; given the same offset and 8-bit code, the absmax scales bit for bit and the absmax
    codes bit for bit except for a few percent of them (0.2-2% measured), where bitsandbytes'
    CPU binary search (not an exact nearest) takes a neighbour of the nearest code, which
    jpeft takes."""
    import bitsandbytes.functional as F
    import torch

    w = _torch_kernel(shape, sum(shape))
    q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quant.quantize_array(jnp.asarray(w.numpy().T), "nf4")
    theirs = q.numpy().reshape(-1)  # n / 2 bytes; jpeft pads a last partial block to 64 codes
    np.testing.assert_array_equal(np.asarray(ours.codes)[: theirs.size], theirs)
    assert np.all(np.asarray(ours.codes)[theirs.size:] == 0x77)  # the padding: code 7 is the level 0.0
    np.testing.assert_array_max_ulp(np.asarray(ours.absmax_offset), np.float32(st.offset.item()), maxulp=1)
    # bitsandbytes builds its 8-bit code with torch.linspace, whose last bits depend on the
    # CPU's vector width: within 2 ulps of jpeft's (NumPy) code on every entry
    np.testing.assert_array_max_ulp(F.create_dynamic_map(signed=True).numpy(), quant.dynamic_code(), maxulp=2)

    _, absmax = torch.ops.bitsandbytes.quantize_4bit(w, 64, "nf4", torch.uint8)
    centred = absmax - torch.tensor(np.asarray(ours.absmax_offset))
    q2, st2 = F.quantize_blockwise(centred, code=torch.tensor(quant.dynamic_code()), blocksize=256)
    np.testing.assert_array_equal(np.asarray(ours.absmax_scales), st2.absmax.numpy())
    mine, theirs = np.asarray(ours.absmax_codes).astype(int), q2.numpy().astype(int)
    differ = np.nonzero(mine != theirs)[0]
    assert len(differ) <= 0.03 * mine.size, (len(differ), mine.size)  # measured 0.2-2%
    code = quant.dynamic_code()
    x = (centred.numpy() / np.repeat(st2.absmax.numpy(), 256)[: mine.size])[differ]
    assert np.all(np.abs(mine[differ] - theirs[differ]) == 1)
    assert np.all(np.abs(x - code[mine[differ]]) <= np.abs(x - code[theirs[differ]]))  # jpeft's is the nearest


def test_nf4_offset_is_the_mean_and_keeps_the_absmaxes_fine_with_outliers():
    """The double quantization centres the absmaxes on their mean (bitsandbytes' choice). With
    a few outlier weights the absmaxes' range is wide but their bulk is narrow; centring on
    the mean keeps the bulk near 0, where the dynamic 8-bit code is finest."""
    w = _torch_kernel((1024, 1024), 0).numpy().T
    q = quant.quantize_array(w, "nf4")
    absmax = np.abs(np.ascontiguousarray(w.T).reshape(-1, 64)).max(axis=1)
    np.testing.assert_array_max_ulp(np.asarray(q.absmax_offset), np.float32(absmax.astype(np.float64).mean()), maxulp=1)
    rel = np.abs(np.asarray(quant.nf4_absmax(q)) - absmax) / absmax
    assert np.median(rel) < 0.005 and rel.max() < 0.05
    # the fixed pairwise sum: the same offset bits inside and outside jit, for stacked kernels too
    stacked = np.stack([w, 2 * w])
    a = jax.jit(quant.quantize_array, static_argnums=1)(stacked, "nf4").absmax_offset
    np.testing.assert_array_equal(np.asarray(a), np.asarray(quant.quantize_array(stacked, "nf4").absmax_offset))


def test_an_adapter_trained_on_nf4_loads_on_a_bitsandbytes_4bit_model_in_peft(tmp_path):
    """transformers' own bitsandbytes 4-bit Llama (NF4, double quantization, f32 compute) holds
    the same codes as ``from_pretrained(quantize="nf4")``, gives jpeft's NF4 logits, and with
    a jpeft LoRA adapter (every tensor random) saved in the PEFT format and loaded by peft
    gives jpeft's adapted logits: the recipe of docs/MODELS.md."""
    import bitsandbytes.functional as F
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    # widths multiple of 32: bitsandbytes' CPU kernels need it
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    ref = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(3.0)  # weights large enough for NF4's error to show in the logits
    folder = str(tmp_path / "llama")
    ref.save_pretrained(folder)
    model, q = jpeft.models.from_pretrained(folder, quantize="nf4")
    bnb = transformers.AutoModelForCausalLM.from_pretrained(
        folder, device_map="cpu", quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32))
    n = 0
    for name, mod in bnb.named_modules():
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference kernel computes in bf16; its plain path is dequantize + f32 matmul
            mod.support_avx512bf16_for_cpu = False
            node = q["params"]
            for k in name.replace("layers.", "layers_").split("."):
                node = node[k]
            np.testing.assert_array_equal(np.asarray(node["kernel"].codes), mod.weight.data.numpy().reshape(-1))
            np.testing.assert_allclose(np.asarray(quant.dequantize_array(node["kernel"])).T,
                                       F.dequantize_4bit(mod.weight.data, mod.weight.quant_state).numpy(), atol=1e-7)
            n += 1
    assert n == 14  # seven projections a layer, the LM head kept as bitsandbytes keeps it

    ids = np.random.default_rng(5).integers(0, 96, size=(2, 8))
    with torch.no_grad():
        want_base = bnb(input_ids=torch.tensor(ids)).logits.numpy()
        full = ref(input_ids=torch.tensor(ids)).logits.numpy()
    base = np.asarray(model.apply(jpeft.dequantize(q), jnp.asarray(ids)))
    np.testing.assert_allclose(base, want_base, atol=5e-5)
    assert np.abs(base - full).max() > 0.5  # NF4 moved the logits; the two NF4 models agree

    lora = jpeft.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"])
    adapter = _randomised(jpeft.init(lora, q, jax.random.key(1)))
    jpeft.hf.save_peft(str(tmp_path / "peft"), lora, adapter, base_model_name_or_path=folder)
    pm = peft.PeftModel.from_pretrained(bnb, str(tmp_path / "peft"))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jpeft.apply(model, q, adapter, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, want, atol=5e-5)
    assert np.abs(ours - base).max() > 1.0


def test_int8_and_fp8_round_trip_within_their_bounds():
    w = np.asarray(jax.random.normal(jax.random.key(2), (2, 96, 40))) * np.logspace(-3, 0, 40)
    absmax = np.abs(w).max(axis=1, keepdims=True)  # per layer and output channel
    q8 = quant.quantize_array(w, "int8")
    assert q8.qvalue.dtype == jnp.int8 and q8.scale.shape == (2, 1, 40)
    err = np.abs(np.asarray(quant.dequantize_array(q8)) - w)
    assert np.all(err <= absmax / 254 * (1 + 1e-5))  # half a step of absmax / 127
    qf = quant.quantize_array(w, "fp8")
    assert qf.qvalue.dtype == jnp.float8_e4m3fn
    err = np.abs(np.asarray(quant.dequantize_array(qf)) - w)
    scale = absmax / 448  # e4m3's largest normal
    # 3 mantissa bits: half an ulp is 2**-4 relative for normals; 2**-10 * scale in the subnormal range
    assert np.all(err <= np.maximum(np.abs(w) * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5))


def test_int8_and_fp8_of_a_float16_kernel_keep_its_values():
    """qwix computed a float16 kernel's scale in float16 and replaced any scale below
    sqrt(finfo(float16).tiny) = 0.0078 by 1: every output channel of absmax below 1.0 got int8
    codes 0 (the kernel dequantized to zeros) and fp8 codes of the raw values. The scale is now
    computed in float32 and kept in float16, so the codes equal a float32 kernel's."""
    w = np.asarray(jax.random.normal(jax.random.key(4), (96, 40))) * np.logspace(-2, 0, 40) * 0.1
    w16 = w.astype(np.float16)
    absmax = np.abs(w16.astype(np.float32)).max(axis=0, keepdims=True)
    for scheme, step in (("int8", absmax / 127.5), ("fp8", None)):
        q = quant.quantize_array(jnp.asarray(w16), scheme)
        assert q.scale.dtype == jnp.float16 and quant.dequantize_array(q).dtype == jnp.float16
        q32 = quant.quantize_array(w16.astype(np.float32), scheme)
        np.testing.assert_array_equal(np.asarray(q.qvalue).view(np.uint8), np.asarray(q32.qvalue).view(np.uint8))
        deq = np.asarray(quant.dequantize_array(q), np.float32)
        ref = np.asarray(quant.dequantize_array(q32))
        # the float16 scale's and product's roundings (a subnormal scale: its absolute spacing, 2**-24, per code)
        assert np.all(np.abs(deq - ref) <= np.abs(ref) * 2.0 ** -10 + 448 * 2.0 ** -24)
        if step is not None:  # half a step of absmax / 127.5, plus those roundings
            assert np.all(np.abs(deq - w16.astype(np.float32)) <= step / 2 + np.abs(ref) * 2.0 ** -10 + 128 * 2.0 ** -24)


# ----------------------------------------------------------------------------- a tiny Llama
@pytest.fixture(scope="module")
def llama():
    cfg = jpeft.models.LlamaConfig(vocab_size=61, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
                                   num_kv_heads=2)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 61)
    params = model.init(jax.random.key(0), ids)
    return cfg, model, params, ids, {s: jpeft.quantize(params, s) for s in quant.SCHEMES}


def _randomised(adapter, seed=3):
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_quantize_targets_linear_kernels_only(llama):
    _, _, params, _, qs = llama
    q = qs["nf4"]["params"]
    assert isinstance(q["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"], quant.NF4Array)
    assert isinstance(qs["int8"]["params"]["model"]["layers_0"]["mlp"]["down_proj"]["kernel"], qwix.QArray)
    for keep in (q["lm_head"]["kernel"], q["model"]["embed_tokens"]["embedding"], q["model"]["norm"]["scale"]):
        assert not quant.is_quantized(keep)
    assert jpeft.summary(qs["nf4"], None, print_fn=None)["base"] == jpeft.summary(params, None, print_fn=None)["base"]
    with pytest.raises(QuantizationError, match="nf4"):
        jpeft.quantize(params, "int4")


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_quantized_dense_output_equals_dequantized_kernel_times_x(scheme):
    model = nn.Dense(96)
    x = jax.random.normal(jax.random.key(4), (3, 128))
    params = model.init(jax.random.key(5), x)
    params["params"]["bias"] = 0.1 * jnp.ones(96)
    q = jpeft.quantize(params, scheme, target_modules=".*")
    w = quant.dequantize_array(q["params"]["kernel"])
    got = jax.jit(lambda q: jpeft.apply(model, q, None, x))(q)
    np.testing.assert_allclose(got, x @ w + 0.1, rtol=1e-5, atol=1e-6)
    assert not np.allclose(w, params["params"]["kernel"], atol=1e-6)  # really quantized


def test_non_finite_kernels_are_refused_and_lora_on_a_quantized_embedding():
    """A NaN became a finite code (NF4: the block's absmax; int8: 0) with no error: refused.
    LoRA on an embedding quantized by target_modules (nn.Embed runs setup first, which took
    the quantized re-run's redirect and crashed) equals the same LoRA on the dequantized base,
    every adapter tensor random."""
    w = jnp.ones((64, 64)).at[3, 5].set(jnp.nan)
    for scheme in quant.SCHEMES:
        with pytest.raises(QuantizationError, match="NaN or inf"):
            quant.quantize_array(w, scheme)
    # finite but huge: NF4's double quantization averages the block absmaxes, and the float32 sum overflowed, so
    # every weight dequantized to NaN with no error; int8/fp8 keep a scale per channel and hold it (relative error)
    huge = jax.random.normal(jax.random.key(0), (256, 256)) * 1e36
    with pytest.raises(QuantizationError, match="NF4 block scales .* overflows float32.*'int8' or 'fp8'"):
        quant.quantize_array(huge, "nf4")
    for scheme, tol in (("int8", 1e-2), ("fp8", 1e-1)):
        back = np.asarray(quant.dequantize_array(quant.quantize_array(huge, scheme)))
        assert np.abs(back - np.asarray(huge)).max() <= tol * np.abs(np.asarray(huge)).max()
    big = jax.random.normal(jax.random.key(0), (256, 256)) * 1e30  # large but within range: still quantized
    err = [float(np.abs(np.asarray(quant.quantize_array(w, "nf4").dequantize()) - np.asarray(w)).mean() / s)
           for w, s in ((big, 1e30), (big / 1e30, 1.0))]
    np.testing.assert_allclose(err[0], err[1], rtol=1e-3)  # NF4's error scales with the kernel

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(8, name="out")(nn.Embed(128, 64, name="embed")(ids))

    model, ids = Tiny(), jnp.arange(12).reshape(2, 6)
    params = model.init(jax.random.key(0), ids)
    for scheme in ("nf4", "int8"):
        q = jpeft.quantize(params, scheme, target_modules=["embed"])
        assert quant.is_quantized(q["params"]["embed"]["embedding"])
        ad = _randomised(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["embed", "out"]), q, jax.random.key(1),
                                    model, ids))
        got = jpeft.apply(model, q, ad, ids)
        np.testing.assert_allclose(got, jpeft.apply(model, jpeft.dequantize(q), ad, ids), rtol=1e-5, atol=1e-6)
        assert np.abs(np.asarray(got) - np.asarray(jpeft.apply(model, jpeft.dequantize(q), None, ids))).max() > 1e-3


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_lora_at_init_equals_the_quantized_base(llama, scheme):
    _, model, params, ids, qs = llama
    q = qs[scheme]
    base_out = jpeft.apply(model, q, None, ids)
    np.testing.assert_array_equal(base_out, model.apply(jpeft.dequantize(q), ids))
    assert np.abs(np.asarray(base_out) - np.asarray(model.apply(params, ids))).max() > 1e-4  # really quantized
    adapter = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules="all-linear"), q, jax.random.key(1), model, ids)
    np.testing.assert_array_equal(jpeft.apply(model, q, adapter, ids), base_out)  # B = 0 at init


def test_lora_on_an_nf4_base_trains_and_leaves_it_bit_identical(llama):
    _, model, params, ids, qs = llama
    q = qs["nf4"]
    frozen = jax.tree.map(lambda x: np.array(x), q)
    adapter = jpeft.init(jpeft.LoraConfig(r=4, alpha=8, target_modules="all-linear"), q, jax.random.key(1), model, ids)

    def loss_fn(p, a, batch, key):
        logits = jpeft.apply(model, p, a, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    state = opt.init(adapter)
    losses = []
    for i in range(6):
        adapter, state, m = step(q, adapter, state, ids, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.1, losses
    assert jax.tree.structure(q) == jax.tree.structure(frozen)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8), np.atleast_1d(b).view(np.uint8))
    # the trained adapter acts on the quantized base as on the dequantized one, and merges onto it
    out = jpeft.apply(model, q, adapter, ids)
    np.testing.assert_allclose(out, jpeft.apply(model, jpeft.dequantize(q), adapter, ids), atol=1e-5)
    merged = jpeft.merge(q, adapter)
    assert not quant.has_quantized(merged)
    np.testing.assert_allclose(model.apply(merged, ids), out, atol=1e-4)


def test_backward_keeps_no_dequantized_kernel(llama, capsys):
    """The residuals of a LoRA gradient on an NF4 base hold no float kernel (they are
    dequantized again in the backward pass), only the codes."""
    cfg, model, params, ids, qs = llama
    adapter = jpeft.init(jpeft.LoraConfig(r=4, target_modules=["up_proj"]), qs["nf4"], jax.random.key(1), model, ids)

    def loss(a, q):
        return jnp.mean(jpeft.apply(model, q, a, ids) ** 2)

    jax.ad_checkpoint.print_saved_residuals(loss, adapter, qs["nf4"])
    lines = capsys.readouterr().out.splitlines()
    kernels = ("f32[64,128]", "f32[128,64]", "f32[64,64]", "f32[64,32]", "f32[32,64]")
    assert not [ln for ln in lines if ln.startswith(kernels)], lines
    assert any(ln.startswith("u8[") for ln in lines), lines


@pytest.mark.parametrize("name", ["dora", "ia3", "houlsby", "prefix"])
def test_other_methods_on_an_nf4_base(llama, name):
    _, model, params, ids, qs = llama
    q = qs["nf4"]
    cfg = {
        "dora": jpeft.LoraConfig(r=4, use_dora=True, target_modules=["q_proj", "down_proj"]),
        "ia3": jpeft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
        "houlsby": jpeft.BottleneckConfig.houlsby(reduction_factor=4),
        "prefix": jpeft.PrefixTuningConfig(num_virtual_tokens=3),
    }[name]
    adapter = _randomised(jpeft.init(cfg, q, jax.random.key(1), model, ids))
    deq = jpeft.dequantize(q)

    @jax.jit
    def run(q, deq, a):
        out = jpeft.apply(model, q, a, ids)
        return out, jpeft.apply(model, deq, a, ids), model.apply(deq, ids), jax.grad(
            lambda a: jnp.mean(jpeft.apply(model, q, a, ids) ** 2))(a)

    got, want, bare, g = run(q, deq, adapter)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(bare)).max() > 1e-3  # the adapter acts
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(g)) and any(np.abs(x).max() > 0 for x in jax.tree.leaves(g))


def test_layer_scanned_llama_on_a_quantized_base(llama):
    cfg, model, params, ids, qs = llama
    scanned = jpeft.models.LlamaForCausalLM(cfg.replace(scan_layers=True))
    qs_scan = jpeft.quantize({"params": scan.stack_params(params["params"])}, "nf4")
    # quantizing the stacked kernels gives the per-layer bits stacked
    stacked = {"params": scan.stack_params(qs["nf4"]["params"])}
    for a, b in zip(jax.tree.leaves(qs_scan), jax.tree.leaves(stacked)):
        np.testing.assert_array_equal(a, b)
    lcfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"])
    adapter = _randomised(jpeft.init(lcfg, qs["nf4"], jax.random.key(1), model, ids))
    got = jax.jit(lambda q, a: jpeft.apply(scanned, q, a, ids))(qs_scan, scan.stack_adapter(adapter, cfg.num_layers))
    np.testing.assert_allclose(got, jpeft.apply(model, qs["nf4"], adapter, ids), atol=1e-5)


def _lora_grad_temp_bytes(model, base, ids):
    """XLA's temporary bytes of the compiled LoRA gradient (every linear layer) of ``model`` on ``base``."""
    a = jpeft.init(jpeft.LoraConfig(r=4, target_modules="all-linear"), base, jax.random.key(1), model, ids)
    g = jax.jit(jax.grad(lambda a, q: jnp.mean(jpeft.apply(model, q, a, ids) ** 2)))
    return g.lower(a, base).compile().memory_analysis().temp_size_in_bytes


@functools.lru_cache(maxsize=None)
def _scanned_llama():
    """The layer-scanned Llama of the test below, its f32 params and its f32 base's step bytes:
    the same for every scheme, so built once."""
    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4,
                                   num_kv_heads=2, scan_layers=True)
    model = jpeft.models.LlamaForCausalLM(cfg)
    ids = jnp.zeros((1, 16), jnp.int32)
    params = model.init(jax.random.key(0), ids)
    return model, ids, params, _lora_grad_temp_bytes(model, params, ids)


@pytest.mark.parametrize("scheme", ["nf4", "int8", "fp8"])
def test_a_scanned_quantized_step_holds_one_layer_dequantized_not_the_model(scheme):
    """The compiled LoRA gradient of a layer-scanned Llama on a quantized base needs no more
    temporary memory than on its f32 base, far less than the model's kernels in f32 (XLA's
    memory analysis of the compiled program, not timing). On the CPU the unrolled model holds
    every layer's dequantized kernel (docs/MODELS.md); the scan keeps one layer's at a time.
    fp8 too, but for one copy of the stacked fp8 bytes that XLA makes for the loops (one byte
    per kernel element): its CPU backend had converted each whole stacked fp8 kernel to float16
    before the loop (two bytes per element), which jpeft avoids by slicing the values as bytes
    (``quant.as_bytes``; measured 8.30 MB before, 5.94 MB after, f32 base 3.82 MB)."""
    model, ids, params, t_f32 = _scanned_llama()
    q = jpeft.quantize(params, scheme)
    kernels = sum(4 * int(np.prod(x.shape)) for x in jax.tree.leaves(q, is_leaf=quant.is_quantized) if quant.is_quantized(x))

    # the same numbers as the dequantized model (for fp8: the bytes read back as fp8, exactly); both
    # compiled, as a step runs them (the reference eagerly ran each operation as a program of its own)
    np.testing.assert_allclose(jax.jit(lambda q: jpeft.apply(model, q, None, ids))(q),
                               jax.jit(lambda q: model.apply(quant.dequantize(q), ids))(q), rtol=1e-6, atol=1e-6)
    t_q = _lora_grad_temp_bytes(model, q, ids)
    assert kernels > 9e6  # 4 layers of 2.4 MB
    fp8_bytes = kernels / 4 if scheme == "fp8" else 0
    assert t_q <= 1.1 * t_f32 + fp8_bytes, (t_q, t_f32)  # nf4: measured 3.58 MB vs 3.82 MB
    assert t_q < 0.5 * kernels + fp8_bytes, (t_q, kernels)  # nf4: measured 0.38 of the kernels (unrolled: 1.08)


def test_save_load_bit_exact_safetensors_and_orbax(llama, tmp_path):
    import orbax.checkpoint as ocp

    _, model, params, ids, qs = llama
    for scheme, q in qs.items():
        quant.save(str(tmp_path / f"{scheme}.safetensors"), q)
        back = quant.load(str(tmp_path / f"{scheme}.safetensors"))
        ck = ocp.StandardCheckpointer()
        ck.save(tmp_path / f"orbax_{scheme}", q)
        ck.wait_until_finished()
        restored = ck.restore(tmp_path / f"orbax_{scheme}", jax.eval_shape(lambda: q))
        for other in (back, restored):
            assert jax.tree.structure(other) == jax.tree.structure(q)
            for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(other)):
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8),
                                              np.atleast_1d(np.asarray(b)).view(np.uint8))
        np.testing.assert_array_equal(jpeft.apply(model, back, None, ids), jpeft.apply(model, q, None, ids))


def test_from_pretrained_jpeft_train_and_the_peft_export_on_an_nf4_base(tmp_path, capsys):
    """``from_pretrained(quantize="nf4")`` gives the bits of ``jpeft.quantize``; ``jpeft train``
    with ``[model] quantize = "nf4"`` trains on it; the adapter loads on the quantized base
    and, with every tensor random, exported to the PEFT format gives in peft (on the
    dequantized weights) the logits jpeft gives on the NF4 base."""
    import peft
    import torch
    import transformers

    sys.path.insert(0, os.path.join(HERE, "helpers"))
    import tiny_hf

    from jpeft.cli import main

    folder = tiny_hf.llama_folder(tmp_path / "llama", tiny_hf.tokenizer())
    model, full = jpeft.models.from_pretrained(folder)
    _, q = jpeft.models.from_pretrained(folder, quantize="nf4")
    want = jpeft.quantize(full, "nf4")
    assert jax.tree.structure(q) == jax.tree.structure(want) and quant.has_quantized(q)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)

    tiny_hf.jsonl(tmp_path / "train.jsonl", 0, 12)
    (tmp_path / "run.toml").write_text(
        'output_dir = "run"\n[model]\npath = "llama"\nquantize = "nf4"\n[data]\ntrain = "train.jsonl"\n'
        'eval = "train.jsonl"\nseq_len = 16\n'
        '[method]\nname = "lora"\nr = 2\ntarget_modules = ["q_proj", "v_proj", "down_proj"]\n'
        "[train]\nsteps = 2\nbatch_size = 2\nlearning_rate = 1e-2\neval_every = 0\nsave_every = 2\nlog_every = 1\n")
    assert main(["train", "--config", str(tmp_path / "run.toml"), "--no-progress"]) == 0
    # unrolled on the CPU: the note that says the quantized base saves no training memory so
    assert "train.scan_layers = true" in capsys.readouterr().err
    (tmp_path / "bad.toml").write_text('[model]\npath = "llama"\nquantize = "int4"\n[data]\ntrain = "train.jsonl"\n')
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    # jpeft eval --quantize scores the adapter on the base it was trained on: the run's logged eval_loss
    logged = [json.loads(ln) for ln in open(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in ln][-1]["eval_loss"]
    capsys.readouterr()
    args = ["eval", "--model", folder, "--adapter", str(tmp_path / "run"), "--data", str(tmp_path / "train.jsonl"),
            "--seq-len", "16", "--batch-size", "2", "--json"]
    assert main(args + ["--quantize", "nf4"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["loss"] == pytest.approx(logged, rel=1e-6) and "note:" not in out.err
    assert main(args) == 0  # the full-precision base: another number, and a note that says why
    out = capsys.readouterr()
    assert json.loads(out.out)["loss"] != pytest.approx(logged, rel=1e-6)
    assert "was trained on a nf4-quantized base" in out.err and "pass --quantize nf4" in out.err, out.err
    # merge folds it into the full-precision weights: said (it was silent), and read from a checkpoint step too
    assert main(["merge", "--model", folder, "--adapter", str(tmp_path / "run" / "checkpoints" / "2"),
                 "--out", str(tmp_path / "merged")]) == 0
    assert "nf4-quantized base" in capsys.readouterr().err
    # export too: PEFT applies the file to the base it is given (it was silent)
    assert main(["export", "--model", folder, "--adapter", str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert "nf4-quantized base" in capsys.readouterr().err and (tmp_path / "exp" / "adapter_config.json").is_file()

    ids = np.random.default_rng(5).integers(3, 300, size=(2, 8))
    cfg, adapter = jpeft.io.load_adapter(str(tmp_path / "run" / "adapter"), q, model, jnp.asarray(ids))
    assert sorted(adapter) == [f"model/layers_0/{m}" for m in ("mlp/down_proj", "self_attn/q_proj", "self_attn/v_proj")]
    assert any(np.abs(np.asarray(n.lora_B)).max() > 0 for n in adapter.values())  # it trained
    adapter = _randomised(adapter)
    jpeft.hf.save_peft(str(tmp_path / "peft"), cfg, adapter, base_model_name_or_path=folder)
    jpeft.models.save_pretrained(str(tmp_path / "deq"), model, jpeft.dequantize(q))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "deq"), dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft"))
    with torch.no_grad():
        pref = pm(input_ids=torch.tensor(ids)).logits.numpy()
    ours = np.asarray(jpeft.apply(model, q, adapter, jnp.asarray(ids)))
    np.testing.assert_allclose(ours, pref, atol=1e-4)
    assert np.abs(ours - np.asarray(model.apply(jpeft.dequantize(q), jnp.asarray(ids)))).max() > 1e-3


def test_two_by_two_mesh_equals_one_device():
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_quant_mesh_worker.py")], env=env, cwd=HERE,
                          capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON:")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][5:])
    assert got["devices"] == 4 and got["sharded_leaves"] > 0
    assert got["loss_fell"] and got["base_unchanged"]
    assert got["loss_diff"] < 1e-5 and got["adapter_diff"] < 1e-5


def test_from_pretrained_on_a_mesh_quantizes_each_shard_as_the_whole_model(tmp_path):
    """``from_pretrained(path, mesh=..., quantize=...)`` reads each device's float blocks and
    quantizes them where they are held (it loaded the whole model on every process, then
    sharded it; before that it was refused). For nf4, int8 and fp8, a data x fsdp mesh and the
    tensor-parallel layout, an unrolled untied model and a layer-scanned tied one (whose file
    stores the tied head too): every leaf is placed as ``jpeft.shard_params`` places
    ``jpeft.quantize`` of the whole model, and every shard holds its bits exactly (NF4's
    blocks cross output rows; an odd number of blocks cuts the codes inside a block). A NaN kernel,
    and one whose NF4 scales' mean overflows, are refused with the plain read's message. Also (nf4
    and int8, fsdp; session 66 checked them by hand only): a GPT-2, whose Conv1D kernels the file
    stores [in, out], and a BERT sequence classifier read from an encoder-only checkpoint, whose
    pooler and classifier are initialised fresh from `key` (the pooler then quantized): bit for bit
    jpeft.quantize of the one-device read."""
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_quant_mesh_worker.py"), "loads", str(tmp_path)],
                          env=env, cwd=HERE, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("JSON:")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    got = json.loads(lines[-1][5:])
    assert got["devices"] == 4 and len(got["cases"]) == 12
    assert {(c["scheme"], c["layout"], c["scan"], c["tied"]) for c in got["cases"]} == {
        (s, lay, scan, scan) for s in quant.SCHEMES for lay in ("fsdp", "tensor") for scan in (False, True)}
    for c in got["cases"]:
        assert c["same_tree"] and c["bad"] == [], c
        # every linear kernel quantized (7 a layer; 2 layers unrolled, 1 stacked leaf each when scanned), each cut
        assert c["quantized"] == c["cut_codes"] == (7 if c["scan"] else 14), c
    for scheme, (whole, mesh) in got["nan"].items():  # a NaN in a kernel: refused by name, as the plain read does
        assert whole == mesh and mesh.startswith("the kernel 'model/layers_1/mlp/down_proj/kernel' of shape (40, 28) "
                                                 "holds NaN or inf values"), (scheme, whole, mesh)
    assert [(c["family"], c["scheme"]) for c in got["heads"]] == [(f, s) for f in ("gpt2", "bert") for s in ("nf4", "int8")]
    for c in got["heads"]:
        # GPT-2: c_attn, attn c_proj, c_fc, mlp c_proj; BERT: q, k, v, attention and output dense, intermediate, pooler
        assert c["same_tree"] and c["bad"] == [] and c["quantized"] == c["cut_codes"] == {"gpt2": 4, "bert": 7}[c["family"]], c
        assert c["fresh"] == ([] if c["family"] == "gpt2" else ["classifier", "pooler"]), c
    whole, mesh = got["overflow"]
    assert whole == mesh and mesh.startswith("the kernel 'model/layers_0/mlp/up_proj/kernel' of shape (28, 40) holds "
                                             "values up to 3e+38: the mean of its NF4 block scales"), (whole, mesh)


def test_a_freshly_initialised_kernel_is_quantized_while_reading_as_jpeft_quantize_does():
    """A BERT classifier read as a question-answering model: its ``qa_outputs`` kernel is not in
    the file and is initialised fresh. ``from_pretrained(quantize=...)`` left it float32 while
    ``jpeft.quantize`` of the same base quantizes it (and the mesh load, which places it in the
    quantized tree's layout, must): now the read gives ``jpeft.quantize``'s bits, leaf for leaf."""
    import _models_tiny as tiny

    _, folder = tiny.hf_model("bert")
    kw = dict(task="question_answering", num_labels=2)
    with pytest.warns(UserWarning, match="freshly initialised"):
        _, full = jpeft.models.from_pretrained(folder, **kw)
    with pytest.warns(UserWarning, match="freshly initialised"):
        _, q = jpeft.models.from_pretrained(folder, quantize="int8", **kw)
    want = jpeft.quantize(full, "int8")
    assert quant.is_quantized(q["params"]["qa_outputs"]["kernel"])
    assert jax.tree.structure(q) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_quantize_refuses_non_float_and_empty_kernels_and_re_quantizing():
    """NF4 cast an int, bool or complex kernel to float32 and back (integers rounded to NF4
    levels, the imaginary part dropped) with no error, qwix raised a bare ValueError, and an empty
    kernel a ZeroDivisionError; quantizing an NF4 tree to int8 returned it still in NF4, silently."""
    for bad in (jnp.arange(-6, 6, dtype=jnp.int32).reshape(3, 4) * 100, jnp.ones((3, 4), bool),
                jnp.ones((3, 4), jnp.complex64), jnp.ones((0, 4)), jnp.ones((4, 0))):
        for scheme in quant.SCHEMES:
            with pytest.raises(QuantizationError, match="floating-point|empty"):
                jpeft.quantize({"params": {"kernel": bad}}, scheme)
    params = {"params": {"kernel": jax.random.normal(jax.random.key(0), (64, 32))}}
    q = jpeft.quantize(params, "nf4")
    with pytest.raises(QuantizationError, match="already quantized"):
        jpeft.quantize(q, "int8")
    assert jpeft.quantize(q, "nf4") is not None  # the same scheme: nothing left to do, no error


def test_a_refused_kernel_is_named_by_its_path():
    """The refusals of a non-float, empty or non-finite kernel said "a kernel of shape (64, 64)":
    in a model whose layers share shapes that does not tell which one. They name its path, in
    jpeft.quantize (from_pretrained(quantize=...) passes its tensor path too); integer leaves that are not
    selected kernels are kept as they are."""
    good = jax.random.normal(jax.random.key(0), (64, 64))
    for bad, why in ((jnp.ones((64, 64), jnp.int32), "floating-point"), (good.at[3, 5].set(jnp.nan), "NaN")):
        params = {"params": {"layers_0": {"q": {"kernel": good}}, "layers_1": {"q": {"kernel": bad}},
                             "ids": {"table": jnp.ones((4, 4), jnp.int32)}}}
        with pytest.raises(QuantizationError, match=f"the kernel 'params/layers_1/q/kernel' of shape .*{why}"):
            jpeft.quantize(params, "nf4")
    q = jpeft.quantize({"params": {"q": {"kernel": good}, "lut": {"kernel": jnp.ones((64, 64), jnp.int32)}}}, "int8",
                       target_modules=["q"])
    assert quant.is_quantized(q["params"]["q"]["kernel"]) and q["params"]["lut"]["kernel"].dtype == jnp.int32


def test_residual_inits_on_a_quantized_base_are_refused_by_name(llama):
    """init_pissa / olora / milora on an NF4 base raised float()'s TypeError, init_corda flax's
    ScopeParamShapeError; PEFT refuses PiSSA on a quantized layer too."""
    _, model, params, ids, qs = llama
    cfg = jpeft.LoraConfig(r=2, target_modules=["q_proj"])
    for fn in (jpeft.init_pissa, jpeft.init_olora, jpeft.init_milora):
        with pytest.raises(QuantizationError, match="full-precision base"):
            fn(cfg, qs["nf4"], jax.random.key(1))
    with pytest.raises(QuantizationError, match="full-precision base"):
        jpeft.init_corda(cfg, qs["int8"], jax.random.key(1), model, [ids])


def test_full_finetune_and_a_bert_classifier_on_a_quantized_base(llama, tmp_path):
    """FullFinetuneConfig on a quantized base raised ShapeMismatchError ("made for another
    model"); it now equals full fine-tuning on the dequantized base. save_peft / load_peft of a
    SEQ_CLS adapter on a BERT base whose classifier jpeft.quantize quantized (asked for) raised
    float()'s TypeError."""
    _, model, params, ids, qs = llama
    q = qs["nf4"]
    deq = jpeft.dequantize(q)
    ad = _randomised(jpeft.init(jpeft.FullFinetuneConfig(), q, jax.random.key(1), model, ids), seed=4)
    np.testing.assert_array_equal(jpeft.apply(model, q, ad, ids), jpeft.apply(model, deq, ad, ids))
    np.testing.assert_array_equal(model.apply(jpeft.merge(q, ad), ids), jpeft.apply(model, deq, ad, ids))

    bcfg = jpeft.models.BertConfig(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4, intermediate_size=64,
                                   num_labels=3)
    bert = jpeft.models.BertForSequenceClassification(bcfg)
    bids = jax.random.randint(jax.random.key(0), (2, 7), 0, 64)
    bp = bert.init(jax.random.key(0), bids)
    # the classifier stays full precision by default (as transformers + bitsandbytes keep the last module)
    default = jpeft.quantize(bp, "nf4")
    assert not quant.is_quantized(default["params"]["classifier"]["kernel"])
    assert quant.is_quantized(default["params"]["bert"]["pooler"]["dense"]["kernel"])
    bq = jpeft.quantize(bp, "nf4", target_modules=r".*(query|key|value|dense|classifier)")
    assert quant.is_quantized(bq["params"]["classifier"]["kernel"])
    cfg = jpeft.LoraConfig(r=2, target_modules=["query", "value"])
    ad = _randomised(jpeft.init(cfg, bq, jax.random.key(1), bert, bids))
    jpeft.hf.save_peft(str(tmp_path), cfg, ad, params=bq, task_type="SEQ_CLS")
    _, back = jpeft.hf.load_peft(str(tmp_path), bq)
    np.testing.assert_array_equal(jpeft.apply(bert, bq, back, bids), jpeft.apply(bert, bq, ad, bids))


def test_model_apply_on_a_quantized_base_in_a_train_step_is_a_named_error(llama):
    """A loss_fn calling model.apply (not jpeft.apply) on a quantized base raised flax's
    ScopeParamShapeError ("expected to generate shape (64, 64) ... received (2048,)")."""
    _, model, params, ids, qs = llama
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj"]), qs["nf4"], jax.random.key(1), model, ids)

    def loss_fn(p, a, batch, key):
        return jnp.mean(model.apply(p, batch) ** 2)

    opt = optax.sgd(1e-2)
    step = jpeft.make_train_step(loss_fn, opt, donate=False)
    with pytest.raises(QuantizationError, match="jpeft.apply"):
        step(qs["nf4"], adapter, opt.init(adapter), ids, jax.random.key(2))


def test_cast_base_of_a_quantized_base_changes_the_dequantized_dtype_not_nf4s_scales():
    """cast_base (and with_precision) cast NF4's float32 block scales to bf16: the kernel still
    dequantized to float32, every block's absmax rounded (0.004 off on a unit-normal kernel)."""
    w = {"d": {"kernel": jax.random.normal(jax.random.key(0), (256, 128))}}
    for scheme in ("nf4", "int8"):
        q = jpeft.quantize(w, scheme, target_modules=".*")
        c = jpeft.cast_base(q, jnp.bfloat16)
        k = c["d"]["kernel"]
        assert quant.scheme_of(k) == scheme and k.dtype == jnp.bfloat16
        ref = jpeft.dequantize(q)["d"]["kernel"].astype(jnp.bfloat16)
        got = jpeft.dequantize(c)["d"]["kernel"]
        assert got.dtype == jnp.bfloat16
        if scheme == "nf4":  # the codes and the float32 scales untouched: the float32 kernel rounded once
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))
            assert c["d"]["kernel"].absmax_scales.dtype == jnp.float32
        else:  # qwix's convention: the scale is cast (one bf16 ulp at most)
            np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=2 ** -7)
    np.testing.assert_array_equal(jpeft.cast_base(c, jnp.float32)["d"]["kernel"].qvalue, c["d"]["kernel"].qvalue)


def test_a_damaged_quant_file_is_a_named_error(tmp_path):
    """quant.load of a truncated file raised safetensors' SafetensorError, of damaged metadata
    json's JSONDecodeError; an unknown scheme was read as fp8, and NF4 arrays that do not fit
    the recorded matrix loaded and then failed in a reshape (or dequantized to another shape)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    w = {"params": {"a": {"kernel": jax.random.normal(jax.random.key(0), (128, 64))}}}
    for scheme in quant.SCHEMES:
        p = str(tmp_path / f"{scheme}.safetensors")
        quant.save(p, jpeft.quantize(w, scheme))
        before = open(p, "rb").read()  # an existing file (the full-precision weights, say) is not replaced
        with pytest.raises(jpeft.errors.SaveError, match="already exists"):
            quant.save(p, jpeft.quantize(w, "int8" if scheme != "int8" else "nf4"))
        assert open(p, "rb").read() == before
        quant.save(p, jpeft.quantize(w, scheme), overwrite=True)
        raw = open(p, "rb").read()
        (tmp_path / "t.safetensors").write_bytes(raw[:-100])
        with pytest.raises(QuantizationError, match="truncated"):
            quant.load(str(tmp_path / "t.safetensors"))
        with safe_open(p, "numpy") as f:
            meta = f.metadata()
        tens = load_file(p)

        def bad(tensors, **entry):
            m = dict(meta)
            m["params/a/kernel"] = entry.get("raw") or json.dumps({**json.loads(m["params/a/kernel"]), **entry})
            save_file(tensors, str(tmp_path / "b.safetensors"), metadata=m)
            with pytest.raises(QuantizationError, match="params/a/kernel"):
                quant.load(str(tmp_path / "b.safetensors"))

        bad(tens, scheme="int4")
        bad(tens, raw="{not json")
        key = "params/a/kernel." + ("codes" if scheme == "nf4" else "scale")
        bad({**tens, key: tens[key][..., :1]})
        if scheme == "nf4":
            bad(tens, matrix=[100, 64])
            bad(tens, dtype="int8")


def test_load_reads_an_nf4_file_whose_scales_an_earlier_cast_base_made_bf16(tmp_path):
    """jpeft.cast_base before it kept NF4's float32 block scales cast them to bf16 (tree.map into the
    NF4Array); a base saved after that loaded before load checked the arrays, and must still load,
    dequantizing to the same values (the scales read back as float32, exactly)."""
    q = {"dense": {"kernel": quant.quantize_array(jax.random.normal(jax.random.key(0), (64, 32)), "nf4")}}
    old = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, q)
    assert old["dense"]["kernel"].absmax_scales.dtype == jnp.bfloat16
    quant.save(str(tmp_path / "q.safetensors"), old)
    back = quant.load(str(tmp_path / "q.safetensors"))["dense"]["kernel"]
    np.testing.assert_array_equal(np.asarray(quant.dequantize_array(back)),
                                  np.asarray(quant.dequantize_array(old["dense"]["kernel"])))


def test_intruders_and_the_update_spectrum_on_a_quantized_base(llama):
    """intruder_report, reduce_intruder_dimension and spectral.update_spectrum on an NF4 or int8 base raised
    float()'s TypeError on the NF4Array / QArray; they read the kernel the base dequantizes to (the one the
    adapter acts on), so they equal the same calls on jpeft.dequantize(q), every adapter factor random."""
    from jpeft import spectral

    _, model, params, ids, qs = llama
    cfg = jpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"])
    for scheme in ("nf4", "int8"):
        q = qs[scheme]
        deq = jpeft.dequantize(q)
        ad = jpeft.init(cfg, q, jax.random.key(1))
        keys = iter(jax.random.split(jax.random.key(2), 2 * len(ad)))
        ad = {p: dataclasses.replace(n, lora_A=jax.random.normal(next(keys), n.lora_A.shape),
                                     lora_B=jax.random.normal(next(keys), n.lora_B.shape)) for p, n in ad.items()}
        got, want = jpeft.intruder_report(q, ad), jpeft.intruder_report(deq, ad)
        assert got == want and sum(len(v["indices"]) for v in want.values()) > 0  # there are intruders to reduce
        red, red_deq = jpeft.reduce_intruder_dimension(q, ad), jpeft.reduce_intruder_dimension(deq, ad)
        for p in ad:
            np.testing.assert_array_equal(red[p].lora_A, red_deq[p].lora_A)
            np.testing.assert_array_equal(red[p].lora_B, red_deq[p].lora_B)
        assert any(not np.array_equal(red[p].lora_B, ad[p].lora_B) for p in ad)
        merged = jpeft.merge(q, ad)
        s, s_deq = spectral.update_spectrum(q, merged), spectral.update_spectrum(deq, merged)
        assert s == s_deq and len(s_deq["kernels"]) == 3  # only the three adapted kernels changed


def test_jpeft_train_refuses_quantize_with_full_finetuning(tmp_path, capsys):
    """[model] quantize with name = "full" trained a float copy of every weight started from the dequantized
    NF4 kernels: the saved "adapter" (and `jpeft merge` of it over the full-precision folder) held every
    kernel's NF4 rounding, with no word. Refused by name, before anything is loaded."""
    from jpeft.cli import main

    for model in ('[model]\npath = "llama"\nquantize = "nf4"\n', 'model = "llama"\nquantize = "int8"\n'):
        (tmp_path / "full.toml").write_text(model + '[data]\ntrain = "train.jsonl"\n[method]\nname = "full"\n')
        capsys.readouterr()
        assert main(["train", "--config", str(tmp_path / "full.toml")]) == 2
        err = capsys.readouterr().err
        assert "ConfigError" in err and "full fine-tuning" in err and "Drop quantize" in err, err


def test_quant_load_of_a_missing_path_a_folder_or_a_plain_safetensors_file_is_a_named_error(tmp_path):
    """quant.load of a missing path raised FileNotFoundError, of a folder a bare OSError ("No such device (os
    error 19)"), and a model's own model.safetensors (no jpeft mark) came back as a flat dict of its torch
    tensor names, full precision, with no error."""
    from safetensors.numpy import save_file

    with pytest.raises(jpeft.errors.LoadError, match="does not exist"):
        quant.load(str(tmp_path / "nope.safetensors"))
    with pytest.raises(jpeft.errors.LoadError, match="is a folder"):
        quant.load(str(tmp_path))
    save_file({"model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(QuantizationError, match="not written by jpeft.quant.save.*from_pretrained"):
        quant.load(str(tmp_path / "model.safetensors"))
    quant.save(str(tmp_path / "q.safetensors"), jpeft.quantize({"d": {"kernel": jnp.ones((64, 8))}}, "nf4"))
    assert quant.is_quantized(quant.load(str(tmp_path / "q.safetensors"))["d"]["kernel"])  # jpeft's own file still loads


def test_quantize_all_linear_leaves_the_embedding_alone(llama):
    """target_modules="all-linear" (the linear layers, as LoraConfig's) also quantized the token embedding
    table (matches() selects every path but lm_head): every lookup then read NF4-rounded rows, unasked."""
    _, model, params, ids, qs = llama

    def quantized(tree):
        flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
        return sorted(jax.tree_util.keystr(k) for k, leaf in flat if quant.is_quantized(leaf))

    q = jpeft.quantize(params, "nf4", target_modules="all-linear")
    assert quantized(q) == quantized(qs["nf4"]) and len(quantized(q)) == 7  # the seven projections
    emb = q["params"]["model"]["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb, params["params"]["model"]["embed_tokens"]["embedding"])
    assert quant.is_quantized(jpeft.quantize(params, "nf4", target_modules=["embed_tokens"])["params"]["model"][
        "embed_tokens"]["embedding"])  # named, it is quantized
    for bad in (123, ["q_proj", 7]):  # a raw TypeError from the path matcher before
        with pytest.raises(jpeft.ConfigError, match="target_modules must be a regex string or a list of module names"):
            jpeft.quantize(params, "nf4", target_modules=bad)


def test_quantize_reads_kernels_boxed_by_with_partitioning():
    """A kernel boxed by nn.with_partitioning (nn.Partitioned) sits at '.../kernel/value' in the tree, which no
    selector matched: jpeft.quantize left it full precision with no word (and target_modules naming it was a
    'selected no kernel' error blaming the names). It is quantized as the unboxed tree's, bit for bit."""

    x = jax.random.normal(jax.random.key(0), (4, 64))
    m = BoxedMLP(64, 8)
    p = m.init(jax.random.key(1), x)
    assert isinstance(p["params"]["d"]["kernel"], nn.Partitioned)
    for scheme, targets in (("nf4", None), ("int8", ["d"])):
        q, want = jpeft.quantize(p, scheme, target_modules=targets), jpeft.quantize(nn.unbox(p), scheme, target_modules=targets)
        assert quant.is_quantized(q["params"]["d"]["kernel"])
        np.testing.assert_array_equal(jpeft.dequantize(q)["params"]["d"]["kernel"],
                                      jpeft.dequantize(want)["params"]["d"]["kernel"])
        ad = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["d"]), q, jax.random.key(2))
        ad = {k: dataclasses.replace(n, lora_B=jax.random.normal(jax.random.key(3), n.lora_B.shape)) for k, n in ad.items()}
        np.testing.assert_allclose(jpeft.apply(m, q, ad, x), jpeft.apply(m, want, ad, x), rtol=1e-6, atol=1e-6)


class _OwnKernelAndChild(nn.Module):
    """A module with a kernel of its own (quantized by default, its name being 'kernel') that also calls a
    submodule: a user's fused block."""

    @nn.compact
    def __call__(self, x):
        h = x @ self.param("kernel", nn.initializers.normal(1.0), (64, 64))
        return nn.Dense(32, name="inner")(h)


class _OuterModel(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="head")(_OwnKernelAndChild(name="outer")(x))


def test_an_adapter_on_a_submodule_of_a_module_with_its_own_quantized_kernel():
    """A module with a quantized kernel of its own re-runs on its dequantized params as a clone, whose
    submodules' paths start at the clone ('inner', not 'outer/inner'): the adapter at 'outer/inner' was
    skipped with no word when another site ran (the output off by ~500 from the dequantized base's), and
    alone it was a TargetNotFoundError ('none of the adapter's sites was called'). Every adapter tensor
    random: the output and every gradient equal those on the dequantized base."""
    model, x = _OuterModel(), jax.random.normal(jax.random.key(0), (3, 64))
    params = model.init(jax.random.key(1), x)
    for scheme in ("nf4", "int8"):
        q = jpeft.quantize(params, scheme)
        assert quant.is_quantized(q["params"]["outer"]["kernel"]) and quant.is_quantized(q["params"]["outer"]["inner"]["kernel"])
        deq = jpeft.dequantize(q)
        for cfg in (jpeft.LoraConfig(r=2, target_modules=["inner"]), jpeft.LoraConfig(r=2, target_modules=["inner", "head"]),
                    jpeft.IA3Config(target_modules=["inner"], feedforward_modules=[])):
            ad = _randomised(jpeft.init(cfg, q, jax.random.key(2), model, x), seed=5)

            @jax.jit
            def run(p, a):
                return jax.value_and_grad(lambda a: jnp.mean(jnp.sin(jpeft.apply(model, p, a, x))))(a)

            (got, g), (want, g_deq) = run(q, ad), run(deq, ad)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_deq)):  # float32 rounding of the leaf's largest
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(np.asarray(b)).max()))
            out = jpeft.apply(model, q, ad, x)
            np.testing.assert_allclose(out, jpeft.apply(model, deq, ad, x), rtol=1e-5, atol=1e-5)
            assert np.abs(np.asarray(out) - np.asarray(model.apply(deq, x))).max() > 1e-2  # the adapter acts


class _OwnKernelWritingState(nn.Module):
    """A quantized-kernel module that sows what it computes and has a BatchNorm child."""

    @nn.compact
    def __call__(self, x, train):
        h = x @ self.param("kernel", nn.initializers.normal(1.0), (64, 64))
        self.sow("intermediates", "h", h)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.5, name="bn")(h)
        return nn.Dense(32, name="inner")(h)


class _OuterWritingModel(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(16, name="head")(_OwnKernelWritingState(name="outer")(x, train))


def test_a_module_with_its_own_quantized_kernel_keeps_what_it_writes():
    """The re-run of a module with a quantized kernel was a clone applied with nothing mutable:
    its ``sow`` (and ``capture_intermediates`` of its children) was dropped with no word, and
    its BatchNorm child's ``batch_stats`` update raised flax's raw ModifyScopeVariableError.
    What it writes now equals what the dequantized base writes, and gradients still flow."""
    model, x = _OuterWritingModel(), jax.random.normal(jax.random.key(0), (3, 64))
    variables = model.init(jax.random.key(1), x)
    q = {**variables, "params": jpeft.quantize(variables["params"], "int8")}
    deq = {**variables, "params": jpeft.dequantize(q["params"])}
    assert quant.is_quantized(q["params"]["outer"]["kernel"])
    ad = _randomised(jpeft.init(jpeft.LoraConfig(r=2, target_modules=["inner", "head"]), q, jax.random.key(2), model, x),
                     seed=5)
    for kw in (dict(mutable=["intermediates"]), dict(capture_intermediates=True, mutable=["intermediates"]),
               dict(train=True, mutable=["batch_stats", "intermediates"])):
        (got, got_vars), (want, want_vars) = (jpeft.apply(model, v, ad, x, **kw) for v in (q, deq))
        assert_same_output_and_writes((got, got_vars), (want, want_vars), kw)
    assert "h" in got_vars["intermediates"]["outer"] and "bn" in got_vars["batch_stats"]["outer"]

    @jax.jit
    def run(v, a):
        def loss(a):
            out, new = jpeft.apply(model, v, a, x, train=True, mutable=["batch_stats"])
            return jnp.mean(jnp.sin(out)), new
        return jax.value_and_grad(loss, has_aux=True)(a)

    ((got, got_new), g), ((want, want_new), g_deq) = run(q, ad), run(deq, ad)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((got_new, g)), jax.tree.leaves((want_new, g_deq))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(np.asarray(b)).max())))
