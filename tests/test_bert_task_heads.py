"""BERT's token-classification and question-answering heads (``BertForTokenClassification``,
``BertForQuestionAnswering``) against the real transformers and peft on tiny random models: the
outputs and losses, checkpoints both ways, PEFT TOKEN_CLS / QUESTION_ANS adapters both ways with
every adapter tensor random (the head copy PEFT trains too), and one LoRA gradient against torch's."""

import copy
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
import jpeft.models
from jpeft.hf import load_peft, save_peft

torch = __import__("torch")  # a test dependency: missing means a broken install, not a skip
peft = __import__("peft")
transformers = __import__("transformers")
sys.path.insert(0, os.path.dirname(__file__))
import _models_tiny as tiny  # noqa: E402

TASKS = {"token": ("BertForTokenClassification", "TOKEN_CLS", 3), "qa": ("BertForQuestionAnswering", "QUESTION_ANS", 2)}


@functools.lru_cache(maxsize=None)
def _hf(task: str):
    """``(torch_model, folder)``: a random tiny transformers model of the task, saved."""
    cls, _, labels = TASKS[task]
    cfg = tiny._hf_config("bert")
    cfg.num_labels = labels
    cfg.id2label, cfg.label2id = {i: f"LABEL_{i}" for i in range(labels)}, {f"LABEL_{i}": i for i in range(labels)}
    torch.manual_seed(0)
    model = tiny._randomize(getattr(transformers, cls)(cfg), seed=11 + labels)
    folder = os.path.join(tiny.ROOT, f"bert_{task}")
    model.save_pretrained(folder)
    return model, folder


def _torch_out(m, ids, mask, **kw):
    """The model's outputs as numpy: logits [b, s, labels], or start and end logits stacked [2, b, s]."""
    with torch.no_grad():
        o = m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw)
    return o.logits.numpy() if "logits" in o else np.stack([o.start_logits.numpy(), o.end_logits.numpy()])


def _np(out):
    return np.stack([np.asarray(x) for x in out]) if isinstance(out, tuple) else np.asarray(out)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_forward_and_checkpoints_match_transformers(task, tmp_path):
    """from_pretrained reads the head config.json's architectures names (it was refused), gives
    transformers' outputs on random weights, and save_pretrained writes a folder transformers loads
    as the same class with the same outputs (also for a head built from a config of another task)."""
    hf, folder = _hf(task)
    model, params = jpeft.models.from_pretrained(folder)
    assert type(model).__name__ == TASKS[task][0]
    assert "pooler" not in params["params"]["bert"]  # transformers' heads have no pooler (add_pooling_layer=False)
    ids, mask = tiny.batch("bert")
    want = _torch_out(hf, ids, mask)
    got = _np(model.apply(params, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == want.shape == ((3, 8, 3) if task == "token" else (2, 3, 8))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    other = type(model)(model.config.replace(task="sequence_classification"))  # the head decides what is written
    jpeft.models.save_pretrained(str(tmp_path), other, params)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [TASKS[task][0]]
    back = getattr(transformers, TASKS[task][0]).from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(_torch_out(back, ids, mask), want, atol=1e-6, rtol=0)


def test_heads_load_from_a_plain_checkpoint_by_task_override():
    """A sequence-classification checkpoint read as a token classifier (``task=``): its pooler is
    dropped and its classifier read as the token head, as transformers' from_pretrained does; read
    as a question-answering model, its classifier is dropped and qa_outputs freshly initialised."""
    _, folder = tiny.hf_model("bert")
    model, params = jpeft.models.from_pretrained(folder, task="token_classification")
    ref = transformers.BertForTokenClassification.from_pretrained(folder).eval()
    ids, mask = tiny.batch("bert")
    np.testing.assert_allclose(_np(model.apply(params, jnp.asarray(ids), jnp.asarray(mask))), _torch_out(ref, ids, mask),
                               atol=1e-5, rtol=0)
    with pytest.raises(jpeft.errors.ConfigError, match="question_answering.*num_labels=2"):
        jpeft.models.from_pretrained(folder, task="question_answering")  # the tiny classifier has 3 labels
    with pytest.warns(UserWarning, match=r"no weights for \['qa_outputs'\]; they are freshly initialised"):
        model, params = jpeft.models.from_pretrained(folder, task="question_answering", num_labels=2)
    assert type(model).__name__ == "BertForQuestionAnswering" and "classifier" not in params["params"]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_losses_match_transformers(task):
    """token_classification_loss ignores -100 labels; question_answering_loss clamps positions to
    [0, seq] and ignores seq (an answer outside the row): both as transformers computes its loss."""
    hf, folder = _hf(task)
    model, params = jpeft.models.from_pretrained(folder)
    ids, mask = tiny.batch("bert")
    out = model.apply(params, jnp.asarray(ids), jnp.asarray(mask))
    rng = np.random.default_rng(0)
    if task == "token":
        labels = np.where(mask == 1, rng.integers(0, 3, ids.shape), -100)
        kw = dict(labels=torch.tensor(labels))
        got = jpeft.models.token_classification_loss(out, jnp.asarray(labels))
    else:
        start, end = np.array([2, 40, -3]), np.array([5, 1, 8])  # 40 past the row: ignored; -3 clamped to 0
        kw = dict(start_positions=torch.tensor(start), end_positions=torch.tensor(end))
        got = jpeft.models.question_answering_loss(*out, jnp.asarray(start), jnp.asarray(end))
    with torch.no_grad():
        want = float(hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).loss)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    if task == "token":
        with pytest.raises(jpeft.InputValidationError, match="labels must have the logits' shape"):
            jpeft.models.token_classification_loss(out, jnp.asarray(labels[:, :4]))
        wrong = labels.copy()
        wrong[0, 0] = 3  # past the 3 labels: optax would clamp it silently, transformers raises
        with pytest.raises(jpeft.InputValidationError, match=r"label 3 is outside \[0, 3\)"):
            jpeft.models.token_classification_loss(out, jnp.asarray(wrong))
        assert np.isnan(float(jax.jit(jpeft.models.token_classification_loss)(out, jnp.asarray(wrong))))


PEFT_METHODS = {
    "lora": lambda task: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type=task),
    "ia3": lambda task: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                       feedforward_modules=["output.dense"], task_type=task),
    "loha": lambda task: peft.LoHaConfig(r=2, target_modules=["query", "value"], task_type=task),
}


def _randomized(pm, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad:  # every adapter tensor and the head copy PEFT trains; IA3's scales away from 1
                p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if "ia3_l" in name else 0.0))
    return pm.eval()


@pytest.mark.parametrize("task,method", [("token", "lora"), ("token", "ia3"), ("qa", "lora"), ("qa", "loha")])
def test_peft_adapters_of_the_task_round_trip(task, method, tmp_path):
    """A PEFT TOKEN_CLS / QUESTION_ANS adapter (refused by name before) loads into jpeft with PEFT's
    outputs; changed in jpeft and saved ("auto" picks the task of the params), PEFT loads it with
    jpeft's outputs."""
    hf, folder = _hf(task)
    ptask = TASKS[task][1]
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), PEFT_METHODS[method](ptask)), seed=5)
    pm.save_pretrained(str(tmp_path / "a"))
    ids, mask = tiny.batch("bert")
    want = _torch_out(pm, ids, mask)
    assert np.abs(want - _torch_out(hf, ids, mask)).max() > 1e-2
    model, params = jpeft.models.from_pretrained(folder)
    cfg, ad = load_peft(str(tmp_path / "a"), params)
    head = "classifier" if task == "token" else "qa_outputs"
    assert isinstance(ad[head], jpeft.SavedModule)  # PEFT trains the head's copy: LoRA's modules_to_save, or a site
    np.testing.assert_allclose(_np(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask))), want,
                               atol=1e-4, rtol=0)
    leaves, tdef = jax.tree.flatten(jpeft.trainable(ad))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    moved = jpeft.join_frozen(jax.tree.unflatten(tdef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]),
                              jpeft.split_frozen(ad)[1])
    j2 = _np(jpeft.apply(model, params, moved, jnp.asarray(ids), jnp.asarray(mask)))
    save_peft(str(tmp_path / "b"), cfg, moved, params=params, task_type="auto" if method != "lora" else ptask)
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["task_type"] == ptask and head in written["modules_to_save"]
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    assert np.abs(j2 - want).max() > 1e-2
    np.testing.assert_allclose(_torch_out(pm2, ids, mask), j2, atol=1e-4, rtol=0)


def test_task_adapters_on_another_head_or_as_prompt_learning_are_refused(tmp_path):
    """A TOKEN_CLS adapter read for the sequence classifier's params (its classifier has the same
    name and shape, and would run on the pooled first token), a QUESTION_ANS one for params without
    qa_outputs, a saved TOKEN_CLS file for sequence-classifier params, and PEFT's prompt tuning of
    these task types (which jpeft does not run) are refused by name."""
    hf, _ = _hf("token")
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), PEFT_METHODS["lora"]("TOKEN_CLS")), seed=2)
    pm.save_pretrained(str(tmp_path / "tok"))
    _, seq_params = jpeft.models.from_pretrained(tiny.hf_model("bert")[1])
    with pytest.raises(jpeft.errors.BaseMismatchError, match="TOKEN_CLS.*sequence classifier's.*task='token_classification'"):
        load_peft(str(tmp_path / "tok"), seq_params)
    _, tok_params = jpeft.models.from_pretrained(_hf("token")[1])
    cfg, ad = load_peft(str(tmp_path / "tok"), tok_params)
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="TOKEN_CLS.*sequence classifier's"):
        save_peft(str(tmp_path / "x"), cfg, ad, params=seq_params, task_type="TOKEN_CLS")
    assert not (tmp_path / "x").exists()
    hq, _ = _hf("qa")
    peft.get_peft_model(copy.deepcopy(hq), PEFT_METHODS["ia3"]("QUESTION_ANS")).save_pretrained(str(tmp_path / "qa"))
    with pytest.raises(jpeft.errors.BaseMismatchError, match="QUESTION_ANS.*qa_outputs.*BertForQuestionAnswering"):
        load_peft(str(tmp_path / "qa"), tok_params)
    peft.get_peft_model(copy.deepcopy(hq), peft.PromptTuningConfig(num_virtual_tokens=2, task_type="QUESTION_ANS")
                        ).save_pretrained(str(tmp_path / "prompt"))
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match="QUESTION_ANS.*prompt and prefix tuning"):
        load_peft(str(tmp_path / "prompt"), jpeft.models.from_pretrained(_hf("qa")[1])[1])


@pytest.mark.parametrize("task", ["qa"])  # the start/end pair through jpeft.apply; the token loss's value is checked above
def test_lora_gradient_of_the_task_loss_matches_torch(task, tmp_path):
    """One step's gradient of the task loss with respect to LoRA's tensors and the head copy (all
    random), from jpeft's loss and from PEFT's model loss backward in torch."""
    hf, folder = _hf(task)
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), PEFT_METHODS["lora"](TASKS[task][1])), seed=9)
    pm.save_pretrained(str(tmp_path))
    ids, mask = tiny.batch("bert")
    if task == "token":
        labels = np.where(mask == 1, np.arange(ids.size).reshape(ids.shape) % 3, -100)
        kw = dict(labels=torch.tensor(labels))
    else:
        start, end = np.array([1, 4, 2]), np.array([3, 5, 9])
        kw = dict(start_positions=torch.tensor(start), end_positions=torch.tensor(end))
    pm.zero_grad()
    pm(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), **kw).loss.backward()
    tgrads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}
    model, params = jpeft.models.from_pretrained(folder)
    _, ad = load_peft(str(tmp_path), params)

    def loss(adapter):
        out = jpeft.apply(model, params, adapter, jnp.asarray(ids), jnp.asarray(mask))
        if task == "token":
            return jpeft.models.token_classification_loss(out, jnp.asarray(labels))
        return jpeft.models.question_answering_loss(*out, jnp.asarray(start), jnp.asarray(end))

    grads = jax.jit(jax.grad(loss))(ad)
    layer = "base_model.model.bert.encoder.layer.1.attention.self.value"
    got = grads["bert/encoder/layer_1/attention/self/value"]
    np.testing.assert_allclose(np.asarray(got.lora_A), tgrads[f"{layer}.lora_A.default.weight"].T, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(got.lora_B), tgrads[f"{layer}.lora_B.default.weight"].T, atol=1e-5, rtol=1e-4)
    head = "classifier" if task == "token" else "qa_outputs"
    np.testing.assert_allclose(np.asarray(grads[head].params["kernel"]),
                               tgrads[f"base_model.model.{head}.modules_to_save.default.weight"].T, atol=1e-5, rtol=1e-4)
    assert np.abs(tgrads[f"{layer}.lora_A.default.weight"]).max() > 1e-4
