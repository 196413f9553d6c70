"""BERT's token-classification, question-answering and multiple-choice heads
(``BertForTokenClassification``, ``BertForQuestionAnswering``, ``BertForMultipleChoice``) against the
real transformers and peft on tiny random models: the outputs and losses, checkpoints both ways, PEFT
TOKEN_CLS / QUESTION_ANS adapters (prompt tuning included) and multiple-choice LoRA both ways with
every adapter tensor random (the head copy PEFT trains too), and gradients against torch's."""

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


def test_task_adapters_on_another_head_or_as_a_prefix_are_refused(tmp_path):
    """A TOKEN_CLS adapter read for the sequence classifier's params (its classifier has the same
    name and shape, and would run on the pooled first token), a QUESTION_ANS one (LoRA, IA3, prompt
    tuning) for params without qa_outputs, a saved TOKEN_CLS file for sequence-classifier params,
    and PEFT's prefix tuning of these task types (which PEFT itself cannot run on BERT) are refused
    by name."""
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
    for name, make in (("ia3", PEFT_METHODS["ia3"]), ("prompt", lambda t: peft.PromptTuningConfig(num_virtual_tokens=2, task_type=t))):
        peft.get_peft_model(copy.deepcopy(hq), make("QUESTION_ANS")).save_pretrained(str(tmp_path / name))
        with pytest.raises(jpeft.errors.BaseMismatchError, match="QUESTION_ANS.*qa_outputs.*BertForQuestionAnswering"):
            load_peft(str(tmp_path / name), tok_params)
    for task, model in (("TOKEN_CLS", hf), ("QUESTION_ANS", hq)):
        peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(num_virtual_tokens=2, task_type=task)
                            ).save_pretrained(str(tmp_path / task))
        with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=f"task_type='{task}'.*PEFT cannot run"):
            load_peft(str(tmp_path / task), jpeft.models.from_pretrained(_hf("token" if task == "TOKEN_CLS" else "qa")[1])[1])


T = 3  # virtual tokens


@pytest.mark.parametrize("task", sorted(TASKS))
def test_peft_prompt_tuning_of_the_task_both_ways(task, tmp_path):
    """PEFT's TOKEN_CLS / QUESTION_ANS prompt tuning (refused by name before), prompt embeddings and
    head copy random: jpeft's outputs are PEFT's at the real tokens (PEFT returns the T virtual
    positions too; jpeft cuts them, the start/end logits [batch, seq] included); token types as PEFT
    (TOKEN_CLS prepends T zeros; PEFT's QUESTION_ANS drops them, so jpeft refuses them); the task loss
    and its gradient (prompt and head copy) equal torch's: PEFT's model loss with -100-padded labels
    for TOKEN_CLS, transformers' question-answering loss on PEFT's real-token logits for QUESTION_ANS
    (PEFT's own loss indexes the positions into the virtual tokens too, docs/MODELS.md). Moved in
    jpeft and saved ("auto" keeps the task type), PEFT loads it with jpeft's outputs."""
    from transformers.loss.loss_utils import ForQuestionAnsweringLoss

    hf, folder = _hf(task)
    ptask = TASKS[task][1]
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), peft.PromptTuningConfig(num_virtual_tokens=T,
                                                                                     task_type=ptask)), seed=7)
    pm.save_pretrained(str(tmp_path / "a"))
    ids, mask = tiny.batch("bert")
    types = np.where(np.arange(8) >= 4, 1, 0) * mask
    model, params = jpeft.models.from_pretrained(folder)
    cfg, ad = load_peft(str(tmp_path / "a"), params)
    head = "classifier" if task == "token" else "qa_outputs"
    assert cfg.task_type == ptask and isinstance(ad[head], jpeft.SavedModule)

    def real(out):  # PEFT's outputs at the real tokens
        return out[:, T:] if task == "token" else out[:, :, T:]

    want = real(_torch_out(pm, ids, mask))
    assert np.abs(want - _torch_out(hf, ids, mask)).max() > 1e-2
    got = _np(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    if task == "token":
        typed = real(_torch_out(pm, ids, mask, token_type_ids=torch.tensor(types)))
        assert np.abs(typed - want).max() > 1e-2
        np.testing.assert_allclose(_np(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask),
                                                   token_type_ids=jnp.asarray(types))), typed, atol=1e-4, rtol=0)
    else:
        np.testing.assert_allclose(real(_torch_out(pm, ids, mask, token_type_ids=torch.tensor(types))), want, atol=0, rtol=0)
        with pytest.raises(jpeft.InputValidationError, match="QUESTION_ANS.*drops token_type_ids"):
            jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask), token_type_ids=jnp.asarray(types))

    # the loss and its gradient
    pm.zero_grad()
    t_ids, t_mask = torch.tensor(ids), torch.tensor(mask)
    if task == "token":
        labels = np.where(mask == 1, np.arange(ids.size).reshape(ids.shape) % 3, -100)
        padded = np.concatenate([np.full((3, T), -100), labels], axis=1)  # PEFT's labels count the virtual tokens
        tloss = pm(input_ids=t_ids, attention_mask=t_mask, labels=torch.tensor(padded)).loss
    else:
        start, end = np.array([1, 4, 2]), np.array([3, 5, 9])  # 9 is past the row: ignored
        o = pm(input_ids=t_ids, attention_mask=t_mask)
        tloss = ForQuestionAnsweringLoss(o.start_logits[:, T:], o.end_logits[:, T:], torch.tensor(start), torch.tensor(end))
    tloss.backward()
    tgrads = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.requires_grad}

    def loss(adapter):
        out = jpeft.apply(model, params, adapter, jnp.asarray(ids), jnp.asarray(mask))
        if task == "token":
            return jpeft.models.token_classification_loss(out, jnp.asarray(labels))
        return jpeft.models.question_answering_loss(*out, jnp.asarray(start), jnp.asarray(end))

    value, grads = jax.jit(jax.value_and_grad(loss))(ad)
    np.testing.assert_allclose(float(value), float(tloss.detach()), rtol=1e-5)
    g_prompt = tgrads["prompt_encoder.default.embedding.weight"]
    assert np.abs(g_prompt).max() > 1e-4
    np.testing.assert_allclose(np.asarray(grads[""].embedding), g_prompt, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(grads[head].params["kernel"]),
                               tgrads[f"base_model.{head}.modules_to_save.default.weight"].T, atol=1e-5, rtol=1e-4)

    # moved in jpeft, saved, loaded by PEFT
    moved = tiny.randomize_adapter(ad, seed=3)
    j2 = _np(jpeft.apply(model, params, moved, jnp.asarray(ids), jnp.asarray(mask)))
    save_peft(str(tmp_path / "b"), cfg, moved, params=params)
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["task_type"] == ptask and head in written["modules_to_save"]
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    assert np.abs(j2 - want).max() > 1e-2
    np.testing.assert_allclose(real(_torch_out(pm2, ids, mask)), j2, atol=1e-4, rtol=0)


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


def test_jpeft_prefix_on_the_task_heads_exports_as_feature_extraction(tmp_path):
    """A prefix made in jpeft on the token-classification and question-answering models (MLP and
    every tensor random) is written as FEATURE_EXTRACTION, the one task type PEFT runs a BERT prefix
    with, and PEFT's logits (start/end logits) with the base's own head equal jpeft's."""
    ids, mask = tiny.batch("bert")
    for task in sorted(TASKS):
        hf, folder = _hf(task)
        model, params = jpeft.models.from_pretrained(folder)
        cfg = jpeft.PrefixTuningConfig(num_virtual_tokens=T, prefix_projection=True)
        ad = tiny.randomize_adapter(jpeft.init(cfg, params, jax.random.key(0)), seed=2)
        got = _np(jpeft.apply(model, params, ad, jnp.asarray(ids), jnp.asarray(mask)))
        save_peft(str(tmp_path / task), cfg, ad, params=params, base_model_name_or_path=folder)
        assert json.loads((tmp_path / task / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / task)).eval()
        assert np.abs(got - _torch_out(hf, ids, mask)).max() > 1e-2
        np.testing.assert_allclose(_torch_out(pm, ids, mask), got, atol=1e-4, rtol=0)


@functools.lru_cache(maxsize=None)
def _hf_mc():
    """``(torch_model, folder)``: a random tiny transformers BertForMultipleChoice, saved."""
    torch.manual_seed(0)
    model = tiny._randomize(transformers.BertForMultipleChoice(tiny._hf_config("bert")), seed=21)
    folder = os.path.join(tiny.ROOT, "bert_mc")
    model.save_pretrained(folder)
    return model, folder


def _mc_batch():
    """``(ids, mask, types)`` [2 questions, 4 choices, 7 tokens], right-padded choices of several lengths."""
    rng = np.random.default_rng(0)
    mask = np.ones((2, 4, 7), np.int64)
    mask[:, 1:, 5:] = 0
    mask[1, 3, 3:] = 0
    ids = rng.integers(3, tiny.VOCAB, mask.shape) * mask
    return ids, mask, (np.arange(7) >= 3).astype(np.int64) * mask


def _mc_torch(m, ids, mask, types, **kw):
    with torch.no_grad():
        return m(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types), **kw)


def test_multiple_choice_matches_transformers_and_saves_as_its_class(tmp_path):
    """BertForMultipleChoice (refused by name before): from_pretrained reads its checkpoint (the
    pooler and a one-output classifier scoring each choice's pooled row), logits [batch, choices]
    and multiple_choice_loss equal transformers' with every weight random, token types included;
    save_pretrained writes a folder transformers loads as the same class with the same logits. Inputs
    that are not [batch, choices, seq] are refused by name."""
    hf, folder = _hf_mc()
    model, params = jpeft.models.from_pretrained(folder)
    assert type(model).__name__ == "BertForMultipleChoice" and params["params"]["classifier"]["kernel"].shape == (32, 1)
    ids, mask, types = _mc_batch()
    labels = np.array([2, 0])
    want = _mc_torch(hf, ids, mask, types, labels=torch.tensor(labels))
    got = model.apply(params, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    assert got.shape == (2, 4)
    np.testing.assert_allclose(np.asarray(got), want.logits.numpy(), atol=1e-5, rtol=0)
    assert np.abs(want.logits.numpy() - _mc_torch(hf, ids, mask, 0 * types).logits.numpy()).max() > 1e-2
    np.testing.assert_allclose(float(jpeft.models.multiple_choice_loss(got, jnp.asarray(labels))), float(want.loss), rtol=1e-5)
    with pytest.raises(jpeft.InputValidationError, match=r"multiple_choice_loss: label 4 is outside \[0, 4\)"):
        jpeft.models.multiple_choice_loss(got, jnp.asarray([4, 0]))
    with pytest.raises(jpeft.InputValidationError, match=r"input_ids \[batch, choices, seq\].*found \(2, 7\)"):
        model.apply(params, jnp.asarray(ids[:, 0]))
    with pytest.raises(jpeft.InputValidationError, match=r"attention_mask must have the inputs' shape \(2, 4, 7\)"):
        model.apply(params, jnp.asarray(ids), jnp.asarray(mask[:, 0]))
    jpeft.models.save_pretrained(str(tmp_path), model, params)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForMultipleChoice"]
    back = transformers.BertForMultipleChoice.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(_mc_torch(back, ids, mask, types).logits.numpy(), want.logits.numpy(), atol=1e-6, rtol=0)


def test_token_cls_adapter_on_multiple_choice_params_names_both_pooled_heads(tmp_path):
    """BertForMultipleChoice's params (a pooler and a one-output classifier) read as a sequence
    classifier's, so a TOKEN_CLS file refused on them (loading or saving) said "these params are a
    sequence classifier's", untrue for them: a one-output classifier names both models that have it
    (the params alone cannot tell them apart), a classifier of several outputs the sequence classifier."""
    hf, _ = _hf("token")
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), PEFT_METHODS["lora"]("TOKEN_CLS")), seed=2)
    pm.save_pretrained(str(tmp_path / "tok"))
    model, mc_params = jpeft.models.from_pretrained(_hf_mc()[1])
    assert type(model).__name__ == "BertForMultipleChoice"
    both = "sequence classifier's or a multiple-choice model's"
    with pytest.raises(jpeft.errors.BaseMismatchError, match=f"TOKEN_CLS.*{both}.*task='token_classification'"):
        load_peft(str(tmp_path / "tok"), mc_params)
    cfg, ad = load_peft(str(tmp_path / "tok"), jpeft.models.from_pretrained(_hf("token")[1])[1])
    with pytest.raises(jpeft.errors.UnsupportedAdapterError, match=f"TOKEN_CLS.*{both}"):
        save_peft(str(tmp_path / "x"), cfg, ad, params=mc_params, task_type="TOKEN_CLS")
    assert not (tmp_path / "x").exists()
    _, seq_params = jpeft.models.from_pretrained(tiny.hf_model("bert")[1])  # a classifier of 2 outputs
    assert seq_params["params"]["classifier"]["kernel"].shape[-1] > 1
    with pytest.raises(jpeft.errors.BaseMismatchError, match="TOKEN_CLS.*are a sequence classifier's \\(") as e:
        load_peft(str(tmp_path / "tok"), seq_params)
    assert "multiple-choice" not in str(e.value)


def test_multiple_choice_lora_through_peft_both_ways(tmp_path):
    """PEFT has no multiple-choice task type: LoRA on BertForMultipleChoice is a plain PeftModel
    (task_type None) with the classifier as a module to save. Every LoRA tensor and the classifier
    copy random, it loads into jpeft with PEFT's logits; moved in jpeft and saved, PEFT loads it with
    jpeft's logits. Prompt and prefix tuning, which PEFT cannot run on the model (its torch.cat of
    the virtual tokens fails), are refused by name."""
    hf, folder = _hf_mc()
    pm = _randomized(peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])), seed=4)
    assert type(pm) is peft.PeftModel
    pm.save_pretrained(str(tmp_path / "a"))
    ids, mask, types = _mc_batch()
    want = _mc_torch(pm, ids, mask, types).logits.numpy()
    assert np.abs(want - _mc_torch(hf, ids, mask, types).logits.numpy()).max() > 1e-2
    model, params = jpeft.models.from_pretrained(folder)
    cfg, ad = load_peft(str(tmp_path / "a"), params)
    assert isinstance(ad["classifier"], jpeft.SavedModule)
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
    np.testing.assert_allclose(np.asarray(jpeft.apply(model, params, ad, *args)), want, atol=1e-4, rtol=0)
    moved = tiny.randomize_adapter(ad, seed=6)
    j2 = np.asarray(jpeft.apply(model, params, moved, *args))
    save_peft(str(tmp_path / "b"), cfg, moved, params=params)
    written = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert written["task_type"] == "FEATURE_EXTRACTION" and written["modules_to_save"] == ["classifier"]
    pm2 = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "b")).eval()
    assert np.abs(j2 - want).max() > 1e-2
    np.testing.assert_allclose(_mc_torch(pm2, ids, mask, types).logits.numpy(), j2, atol=1e-4, rtol=0)
    for c in (jpeft.PromptTuningConfig(num_virtual_tokens=2), jpeft.PrefixTuningConfig(num_virtual_tokens=2)):
        with pytest.raises(jpeft.errors.UnsupportedModuleError, match=r"\(2, 4, 7\).*PEFT cannot run prompt or prefix"):
            jpeft.apply(model, params, jpeft.init(c, params, jax.random.key(0)), *args)
