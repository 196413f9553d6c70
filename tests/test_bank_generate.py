"""A routed bank through jpeft's Llama and greedy generation: each row generates exactly what it
generates with its own adapter alone, and swapping adapters does not recompile generate; PEFT
adapters loaded into one bank give peft's own mixed-batch (``adapter_names``) forward and generate."""

import contextlib
import copy
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.bank import AdapterBank
from jpeft.hf import load_peft

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as T  # noqa: E402

CFG = jpeft.models.LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, max_position_embeddings=64)
MODEL = jpeft.models.LlamaForCausalLM(CFG)
PROMPT = jax.random.randint(jax.random.key(0), (5, 6), 1, 48)
MASK = jnp.ones((5, 6), jnp.int32).at[1, :2].set(0).at[3, :3].set(0)  # left-padded rows
PARAMS = MODEL.init(jax.random.key(1), PROMPT)
TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj", "lm_head"]


def _adapter(r, key, rslora=False):
    cfg = jpeft.LoraConfig(r=r, alpha=2 * r, target_modules=TARGETS, init_weights="random", use_rslora=rslora)
    return jpeft.init(cfg, PARAMS, key)


ADAPTERS = {"a": _adapter(2, jax.random.key(2)), "b": _adapter(4, jax.random.key(3), rslora=True), "c": _adapter(2, jax.random.key(4))}
NAMES = ["b", "a", None, "c", "b"]


def test_routed_forward_and_greedy_generation_match_each_adapter_alone():
    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    routed = bank.route(NAMES)
    fwd = jax.jit(lambda p, a, x, m: jpeft.apply(MODEL, p, a, x, attention_mask=m))
    y = fwd(PARAMS, routed, PROMPT, MASK)
    out = jpeft.generate(MODEL, PARAMS, routed, PROMPT, 8, attention_mask=MASK)
    alone = {}
    for name in set(NAMES):
        ad = None if name is None else ADAPTERS[name]
        alone[name] = (fwd(PARAMS, ad, PROMPT, MASK), jpeft.generate(MODEL, PARAMS, ad, PROMPT, 8, attention_mask=MASK))
    for i, name in enumerate(NAMES):
        np.testing.assert_allclose(y[i], alone[name][0][i], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out[i], alone[name][1][i])
    # the adapters change what is generated (otherwise the comparison would prove nothing)
    gens = {n: tuple(np.asarray(g[1][0, 6:]).tolist()) for n, g in alone.items()}
    assert len(set(gens.values())) == len(gens)

    # hot swap under generate: no backend compilation at all, and the new contents take effect
    b2 = bank.replace("a", ADAPTERS["c"]).remove("b").add("b2", ADAPTERS["b"])
    routed2 = b2.route(["a", "b2", None, "c", "b2"])
    with count_compiles() as compiles:
        out2 = jpeft.generate(MODEL, PARAMS, routed2, PROMPT, 8, attention_mask=MASK)
        out2.block_until_ready()
    assert compiles == []
    np.testing.assert_array_equal(out2[0], alone["c"][1][0])
    np.testing.assert_array_equal(out2[1], alone["b"][1][1])
    np.testing.assert_array_equal(out2[2], alone[None][1][2])


def test_generate_given_the_bank_itself_or_a_loaded_pair_says_what_to_pass():
    """jpeft.generate(model, params, bank, ...) (the bank, not bank.route(names)) and a (config, adapter)
    pair were raw TypeErrors from jax.jit ('Error interpreting argument ... as an abstract array');
    jpeft.apply named them."""
    import pytest

    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    for call in (jpeft.generate, lambda m, p, a, x, n: jpeft.apply(m, p, a, x)):
        with pytest.raises(jpeft.ConfigError, match=r"found AdapterBank \(an AdapterBank is routed first: pass bank.route"):
            call(MODEL, PARAMS, bank, PROMPT, 2)
    with pytest.raises(jpeft.ConfigError, match="return a pair: unpack it"):
        jpeft.generate(MODEL, PARAMS, (None, ADAPTERS["a"]), PROMPT, 2)


@contextlib.contextmanager
def count_compiles():
    """Records every XLA backend compilation (jax.monitoring's compile-duration event)."""
    seen = []

    def listener(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_a_bank_on_layer_scanned_params_says_so():
    """The same base with scan_layers was refused as 'the bank belongs to another base model'."""
    import pytest
    from jpeft.errors import BankShapeError

    bank = AdapterBank.from_adapters(ADAPTERS, capacity=4)
    with pytest.raises(BankShapeError, match=r"layer-scanned .* Serve the unrolled model"):
        bank.check(jpeft.scan.stack_params(PARAMS))
    bank.check(PARAMS)
    from jpeft.errors import BankError

    stacked = jpeft.scan.stack_adapter(ADAPTERS["a"], CFG.num_layers)  # a layer-scanned adapter: the hint names it
    assert jpeft.scan.is_stacked(stacked)
    with pytest.raises(BankError, match="layer-scanned jpeft.scan.Stacked; unstack the adapter"):
        bank.add("stacked", stacked)


# ---------------------------------------------------------------------------------------------
# PEFT adapters trained separately, served together: the bank against peft's own mixed batch
# ---------------------------------------------------------------------------------------------
_PEFT_BANK_CASES = {
    # name: peft.LoraConfig keywords; all options that change a site's rank, scale or presence
    "llama2": {
        "qv": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
        "all": dict(r=4, lora_alpha=8, use_rslora=True, target_modules="all-linear"),
        "mixed": dict(r=2, lora_alpha=3, target_modules=["embed_tokens", "lm_head", "o_proj", "up_proj"],
                      layers_to_transform=[1], rank_pattern={"up_proj": 3}, alpha_pattern={"o_proj": 7}),
    },
    "gpt2": {  # Conv1D projections (fan_in_fan_out) and the tied wte
        "qv": dict(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True),
        "all": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
        "mixed": dict(r=2, lora_alpha=3, target_modules=["wte", "c_fc"], layers_to_transform=[1],
                      rank_pattern={"c_fc": 3}, fan_in_fan_out=True),
    },
}


def _peft_folders(family, root):
    """Saves one PEFT adapter per case, every adapter tensor random (PEFT inits lora_B to zero)."""
    import copy

    import peft
    import torch

    hf = T.hf_model(family)[0]
    folders = {}
    for i, (name, kw) in enumerate(_PEFT_BANK_CASES[family].items()):
        pm = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**kw))
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))
        folders[name] = str(root / name)
        pm.save_pretrained(folders[name])
    return folders


@pytest.mark.parametrize("family", ["llama2", "gpt2"])
def test_peft_adapters_in_one_bank_equal_peft_mixed_batch_forward_and_generate(family, tmp_path):
    """Adapters of other ranks, alphas, rsLoRA, target modules, layers, patterns and an
    embedding, loaded from PEFT folders into one bank: each row of a mixed batch (base rows,
    repeated adapters, left padding) gives PEFT's ``adapter_names`` forward and greedy generate."""
    import peft
    import torch

    folders = _peft_folders(family, tmp_path)
    model, params = jpeft.models.from_pretrained(T.hf_model(family)[1])
    bank = AdapterBank.from_adapters({n: load_peft(f, params)[1] for n, f in folders.items()}, capacity=4)
    names = list(folders)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(T.hf_model(family)[0]), folders[names[0]], adapter_name=names[0])
    for n in names[1:]:
        pm.load_adapter(folders[n], adapter_name=n)
    pm.eval()
    rows = ["all", "__base__", "qv", "mixed", "all"]
    rng = np.random.default_rng(0)
    mask = np.ones((len(rows), 8), np.int64)
    mask[1, :3] = 0
    mask[3, :2] = 0
    ids = np.where(mask == 1, rng.integers(3, T.VOCAB, size=mask.shape), 0)
    routed = bank.route(rows)  # PEFT's adapter_names as they are: "__base__" is the bare base in both
    got = np.asarray(jpeft.apply(model, params, routed, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        want = pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=rows,
                  position_ids=torch.tensor(T.positions(mask))).logits.numpy()
        base = T.torch_logits(family, ids, mask)
    for i, r in enumerate(rows):
        real = mask[i] == 1
        np.testing.assert_allclose(got[i][real], want[i][real], atol=1e-4, rtol=0, err_msg=r)
        assert r == "__base__" or np.abs(want[i][real] - base[i][real]).max() > 0.1  # every adapter changes its rows
    out = np.asarray(jpeft.generate(model, params, routed, jnp.asarray(ids), 4, attention_mask=jnp.asarray(mask)))
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), adapter_names=rows,
                          max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(out[:, 8:], ref[:, 8:].numpy())


def test_a_compiled_forward_after_add_and_replace_equals_peft_mixed_batch(tmp_path):
    """A jitted forward routing inside it (``bank.route(ids, weights=w)``, ``w`` an argument),
    compiled on a bank of one PEFT adapter, then given the bank after ``add`` and ``replace``
    (other ranks, alphas, rsLoRA; every adapter tensor random): each row equals PEFT's
    ``adapter_names`` forward. The added adapter's rows ran as the bare base (scale 0) and the
    replaced one kept its old scale, with no word."""
    import peft
    import torch

    folders = _peft_folders("llama2", tmp_path)  # "qv" (r 2, alpha 4), "all" (r 4, rsLoRA, alpha 8), "mixed"
    model, params = jpeft.models.from_pretrained(T.hf_model("llama2")[1])
    ads = {n: load_peft(f, params)[1] for n, f in folders.items()}
    bank = AdapterBank.create({**ads["mixed"], **ads["all"]}, capacity=3, max_rank=4).add("qv", ads["qv"])

    @jax.jit
    def fwd(params, weights, slots, ids):
        return jpeft.apply(model, params, bank.route(slots, weights=weights), ids)

    pm = peft.PeftModel.from_pretrained(copy.deepcopy(T.hf_model("llama2")[0]), folders["qv"], adapter_name="qv")
    for n in ("all", "mixed"):
        pm.load_adapter(folders[n], adapter_name=n)
    pm.eval()
    ids = np.random.default_rng(1).integers(3, T.VOCAB, size=(4, 7))
    fwd(params, bank.weights, bank.ids(["qv"] * 4), jnp.asarray(ids))
    jpeft.generate(model, params, bank.route(["qv"] * 4), jnp.asarray(ids), 3)  # generate compiled before the swaps too
    bank = bank.add("all", ads["all"])
    b2 = bank.replace("qv", ads["mixed"])  # the slot of "qv" (scale 2) now holds "mixed" (scale 1.5, 3.5 at o_proj)
    for b, rows, names in ((bank, ["all", "qv", "__base__", "all"], ["all", "qv", "__base__", "all"]),
                           (b2, ["qv", "all", "qv", "__base__"], ["mixed", "all", "mixed", "__base__"])):
        got = np.asarray(fwd(params, b.weights, b.ids(rows), jnp.asarray(ids)))
        with torch.no_grad():
            want = pm(input_ids=torch.tensor(ids), adapter_names=names).logits.numpy()
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        out = np.asarray(jpeft.generate(model, params, b.route(rows), jnp.asarray(ids), 3))
        with torch.no_grad():
            ref = pm.generate(input_ids=torch.tensor(ids), adapter_names=names, max_new_tokens=3, do_sample=False,
                              pad_token_id=0, eos_token_id=None)
        np.testing.assert_array_equal(out[:, 7:], ref[:, 7:].numpy())
