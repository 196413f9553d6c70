"""``jpeft train`` trains as transformers' ``Trainer`` does: weight decay leaves out what the
Trainer leaves out (biases and norms), checked against ``Trainer.get_decay_parameter_names`` on
the same models with and without PEFT, and training steps run the model's own dropout
(``model.train()``), evaluation none."""

from __future__ import annotations

import copy
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.train import decay_mask

sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as mt  # noqa: E402

CONFIGS = {
    "full": (jpeft.FullFinetuneConfig, {}),
    "ln_tuning": (jpeft.LNTuningConfig, {"target_modules": r".*(layernorm|norm|ln_\w|LayerNorm)"}),
    "lora_bias": (jpeft.LoraConfig, {"r": 2, "target_modules": "all-linear", "bias": "lora_only"}),
}


def _hf_sizes(torch_model, name: str, kw: dict):
    """(decayed, not decayed): sorted element counts of the trainable tensors, as the Trainer splits them."""
    import peft
    from transformers import Trainer

    model = copy.deepcopy(torch_model)
    if name != "full":
        cls = {"ln_tuning": peft.LNTuningConfig, "lora_bias": peft.LoraConfig}[name]
        model = peft.get_peft_model(model, cls(**kw))
    decay = set(Trainer.get_decay_parameter_names(None, model))
    on = sorted(p.numel() for n, p in model.named_parameters() if p.requires_grad and n in decay)
    off = sorted(p.numel() for n, p in model.named_parameters() if p.requires_grad and n not in decay)
    return on, off


@pytest.mark.parametrize("family", ["llama2", "gpt2", "bert"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_decay_mask_leaves_out_what_the_hf_trainer_leaves_out(family, name):
    torch_model, folder = mt.hf_model(family)
    cls, kw = CONFIGS[name]
    _, params = jpeft.models.from_pretrained(folder)
    if family == "bert" and name == "lora_bias":  # PEFT's all-linear keeps BERT's classifier out, jpeft's too, by another rule
        kw = dict(kw, target_modules=["query", "key", "value", "dense"])
    train = jpeft.trainable(jpeft.init(cls(**kw), params, jax.random.key(0)))
    mask = decay_mask(train)
    pairs = list(zip(jax.tree.leaves(train), jax.tree.leaves(mask)))
    on = sorted(int(np.size(x)) for x, m in pairs if m)
    off = sorted(int(np.size(x)) for x, m in pairs if not m)
    hf_kw = dict(kw)
    if name == "ln_tuning":
        hf_kw = {"target_modules": {"llama2": ["input_layernorm", "post_attention_layernorm", "norm"],
                                    "gpt2": ["ln_1", "ln_2", "ln_f"], "bert": ["LayerNorm"]}[family]}
    assert (on, off) == _hf_sizes(torch_model, name, hf_kw)
    assert off, "every case has biases or norms"


@pytest.mark.parametrize("family", ["llama2", "gpt2"])
def test_decay_mask_leaves_out_prefix_projection_biases_as_the_hf_trainer(family):
    """Prefix tuning's projection MLP names its biases ``b1``/``b2`` (PEFT: ``transform.0.bias``,
    ``transform.2.bias``, which the Trainer leaves out of weight decay); they were decayed."""
    import peft
    from transformers import Trainer

    torch_model, folder = mt.hf_model(family)
    _, params = jpeft.models.from_pretrained(folder)
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True)
    train = jpeft.trainable(jpeft.init(cfg, params, jax.random.key(0)))
    pairs = list(zip(jax.tree.leaves(train), jax.tree.leaves(decay_mask(train))))
    got = (sorted(int(np.size(x)) for x, m in pairs if m), sorted(int(np.size(x)) for x, m in pairs if not m))
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.PrefixTuningConfig(
        num_virtual_tokens=2, prefix_projection=True, task_type="CAUSAL_LM"))
    decay = set(Trainer.get_decay_parameter_names(None, pm))
    named = [(n, p.numel()) for n, p in pm.named_parameters() if p.requires_grad]
    assert got == (sorted(k for n, k in named if n in decay), sorted(k for n, k in named if n not in decay))
    assert len(got[1]) == 2


def test_decay_mask_decays_a_users_own_parameter_named_b1():
    """Only prefix tuning's projection MLP has its b1/b2 left out (its node's ``no_decay``): a
    user's own module trained in full (modules_to_save) with parameters w1, b1 -- even one holding
    the same names as the projection MLP -- is decayed as the Trainer decays ``mine.b1`` (no
    "bias" in its name)."""
    _, params = jpeft.models.from_pretrained(mt.hf_model("llama2")[1])
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=4)
    node = jpeft.trainable(jpeft.init(cfg, params, jax.random.key(0)))[""]
    tree = {"mine": {"params": {"w1": jnp.ones((2, 2)), "b1": jnp.ones(2)}},
            "look_alike": {"embedding": jnp.ones((2, 2)), "w1": jnp.ones((2, 2)), "b1": jnp.ones(2),
                           "w2": jnp.ones((2, 2)), "b2": jnp.ones(2)},
            "prefix": node}
    m = decay_mask(tree)
    assert m["mine"]["params"] == {"w1": True, "b1": True}
    assert all(jax.tree.leaves(m["look_alike"]))
    assert (m["prefix"].embedding, m["prefix"].w1, m["prefix"].b1, m["prefix"].w2, m["prefix"].b2) == (
        True, True, False, True, False)


def test_jpeft_train_optimizer_decays_weights_only():
    from jpeft.cli._trainer import make_optimizer

    tree = {"": {"params": {"ln": {"scale": jnp.ones(3), "bias": jnp.ones(3)},
                            "fc": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}}}}
    t = {"learning_rate": 0.1, "warmup_steps": 0, "weight_decay": 0.5, "max_grad_norm": 0.0}
    opt, _ = make_optimizer(t, 10)
    zero = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = opt.update(zero, opt.init(tree), tree)
    new = jax.tree.map(lambda p, u: p + u, tree, updates)
    p = new[""]["params"]
    np.testing.assert_allclose(p["fc"]["kernel"], 1 - 0.1 * 0.5, rtol=1e-6)  # AdamW: p -= lr * wd * p
    for leaf in (p["fc"]["bias"], p["ln"]["scale"], p["ln"]["bias"]):
        np.testing.assert_array_equal(leaf, 1.0)


def test_jpeft_train_runs_the_models_own_dropout_in_training_steps_only():
    from jpeft.cli._trainer import make_loss_fns

    cfg = jpeft.models.GPT2Config(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, max_position_embeddings=16,
                                  initializer_range=0.2)
    ids = jax.random.randint(jax.random.key(0), (2, 10), 1, 40)
    batch = {"input_ids": ids, "loss_mask": jnp.ones_like(ids), "attention_mask": jnp.ones_like(ids)}
    params = jpeft.models.GPT2LMHeadModel(cfg).init(jax.random.key(1), ids)
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["c_attn"]), params, jax.random.key(2))

    def losses(cfg, model_dropout):
        loss_fn, eval_sums = make_loss_fns(jpeft.models.GPT2LMHeadModel(cfg), None, None, model_dropout)
        train = float(loss_fn(params, adapter, batch, jax.random.key(3))[0])
        total, n = eval_sums(params, adapter, batch)
        return train, float(total / n)

    on, off = losses(cfg, True), losses(cfg, False)
    assert abs(on[0] - off[0]) > 1e-3 and on[1] == off[1] == off[0]  # dropout in training only
    for rates in ({"embd_pdrop": 0.0, "resid_pdrop": 0.0}, {"attn_pdrop": 0.0, "resid_pdrop": 0.0},
                  {"attn_pdrop": 0.0, "embd_pdrop": 0.0}):  # each of GPT-2's three dropouts acts on its own
        alone = losses(cfg.replace(**rates), True)
        assert abs(alone[0] - off[0]) > 1e-4, rates
    none = losses(cfg.replace(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0), True)
    assert none[0] == off[0]


def test_resume_of_a_run_saved_before_model_dropout_keeps_it_off(tmp_path, capsys):
    """A run whose resolved_config.json predates ``train.model_dropout`` trained without the
    model's dropout; resumed with the default (true) it switched dropout on mid-run, silently
    (an audit: losses 5.666/5.662/5.598 against 5.664/5.659/5.597 uninterrupted). It now keeps it
    off, with a note; a run that saved the setting is compared as it is."""
    import copy
    import json

    from jpeft.cli._trainer import _check_resumable, _keep_unsaved_settings
    from jpeft.cli.train_cmd import resolve_config
    from jpeft.errors import ConfigError

    raw = {"model": "m", "output_dir": "run", "data": {"train": "t.jsonl"}, "method": {"name": "lora"}}
    cfg = resolve_config(raw, base_dir=str(tmp_path))
    assert cfg["train"]["model_dropout"] is True
    saved = copy.deepcopy(cfg)
    del saved["train"]["model_dropout"]
    (tmp_path / "resolved_config.json").write_text(json.dumps(saved))
    _keep_unsaved_settings(str(tmp_path), cfg)
    assert cfg["train"]["model_dropout"] is False and "resumes with train.model_dropout = false" in capsys.readouterr().err
    _check_resumable(str(tmp_path), cfg)
    saved["train"]["model_dropout"] = False  # a run that saved it: switching it on is a change of the run
    (tmp_path / "resolved_config.json").write_text(json.dumps(saved))
    cfg = resolve_config(raw, base_dir=str(tmp_path))
    _keep_unsaved_settings(str(tmp_path), cfg)
    assert cfg["train"]["model_dropout"] is True
    with pytest.raises(ConfigError, match=r"train.model_dropout: false -> true"):
        _check_resumable(str(tmp_path), cfg)


def test_resuming_checkpoints_of_the_earlier_weight_decay_is_refused_with_cli_advice(tmp_path):
    """Checkpoints of a run with weight decay saved before the decay mask hold AdamW's state
    without the mask's layer: ``jpeft train --resume`` refuses them with advice a CLI user can
    follow (the library's CheckpointError speaks of CheckpointManager arguments)."""
    import flax.linen as nn
    import optax

    from jpeft.checkpoint import CheckpointManager
    from jpeft.cli._trainer import _restore, make_optimizer
    from jpeft.errors import ConfigError

    params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    cfg = jpeft.LoraConfig(r=2, target_modules=".*")
    ad = jpeft.init(cfg, params, jax.random.key(1))
    t = {"learning_rate": 1e-3, "warmup_steps": 0, "weight_decay": 0.1, "max_grad_norm": 1.0}
    old = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))  # before: no mask
    with CheckpointManager(str(tmp_path), cfg, params, optimizer=old) as m:
        m.save(1, ad, old.init(jpeft.trainable(ad)))
    new, _ = make_optimizer(t, 10)
    with CheckpointManager(str(tmp_path), cfg, params, optimizer=new) as m:
        with pytest.raises(ConfigError, match="weight decay left out biases and norms.*jpeft it was started with"):
            _restore(m, str(tmp_path), 10)


def test_tied_lora_embedding_gradient_is_the_sum_of_pefts_two_parameters():
    """docs/METHODS.md's known difference: with ``ensure_weight_tying=True`` PEFT's ``lm_head``
    adapter is a second Parameter over the embedding adapter's storage, each with its own end's
    gradient; jpeft's one site gets their sum (the true gradient), so the Trainer's grad norm
    (which counts the two apart) differs from jpeft's."""
    import peft
    import torch

    torch_model, folder = mt.hf_model("llama3")
    pm = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["embed_tokens"], ensure_weight_tying=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model, params = jpeft.models.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as d:
        pm.save_pretrained(d)
        _, ad = jpeft.hf.load_peft(d, params)
    ids, _ = mt.batch("llama3")
    ids = np.where(ids == 0, 5, ids)  # no padding: every token is a target
    t = torch.tensor(ids)
    pm.eval()
    pm(input_ids=t, labels=t).loss.backward()
    P = {n: p for n, p in pm.named_parameters() if p.requires_grad}
    emb, head = "base_model.model.model.embed_tokens.", "base_model.model.lm_head."
    assert P[head + "lora_A.default.weight"].data_ptr() == P[emb + "lora_embedding_B.default"].data_ptr()
    mask = np.ones_like(ids)
    mask[:, 0] = 0
    grad = jax.grad(lambda a: jpeft.lm_loss(model, params, a, jnp.asarray(ids), jnp.asarray(mask))[0])(ad)
    site = grad["model/embed_tokens"]
    want_a = P[emb + "lora_embedding_A.default"].grad.numpy().T + P[head + "lora_B.default.weight"].grad.numpy()
    want_b = P[emb + "lora_embedding_B.default"].grad.numpy().T + P[head + "lora_A.default.weight"].grad.numpy()
    np.testing.assert_allclose(np.asarray(site.lora_A), want_a, atol=1e-5)
    np.testing.assert_allclose(np.asarray(site.lora_B), want_b, atol=1e-5)
    peft_norm = np.sqrt(sum(float((p.grad ** 2).sum()) for p in P.values()))
    assert abs(float(np.sqrt(sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(grad)))) - peft_norm) > 1e-3


def test_decay_mask_reads_no_decay_of_a_node_inside_a_scanned_site():
    """A layer-scanned site (``scan.Stacked``) holds its node as ``inner``: that node's
    ``no_decay`` fields are left out too, under the stacked path."""
    from jpeft.scan import Stacked

    _, params = jpeft.models.from_pretrained(mt.hf_model("llama2")[1])
    cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=2, prefix_projection=True, encoder_hidden_size=4)
    node = jpeft.trainable(jpeft.init(cfg, params, jax.random.key(0)))[""]
    stacked = Stacked(node, 1)
    m = decay_mask({"model/layers/x": stacked})["model/layers/x"].inner
    assert (m.embedding, m.w1, m.b1, m.w2, m.b2) == (True, True, False, True, False)
