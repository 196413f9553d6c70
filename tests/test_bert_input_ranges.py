"""BERT refuses token types outside its table and sequences longer than its positions, where
transformers raises: the gather would otherwise wrap a negative type onto another row (finite,
wrong logits) or give NaN past the table (found by an audit)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.errors import InputValidationError


def _tiny():
    cfg = jpeft.models.BertConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                  max_position_embeddings=8, type_vocab_size=2, num_labels=3)
    model = jpeft.models.BertForSequenceClassification(cfg)
    ids = jnp.ones((2, 6), jnp.int32)
    return model, model.init(jax.random.key(0), ids), ids


@pytest.mark.parametrize("bad", [-1, 2])
def test_token_type_outside_the_table_is_refused(bad):
    model, params, ids = _tiny()
    tt = np.zeros((2, 6), np.int32)
    tt[0, 3] = bad
    with pytest.raises(InputValidationError, match="token_type_ids"):
        model.apply(params, ids, None, jnp.asarray(tt))


def test_valid_token_types_still_run():
    model, params, ids = _tiny()
    tt = jnp.asarray(np.array([[0, 0, 0, 1, 1, 1], [0, 1, 0, 1, 0, 1]], np.int32))
    out = model.apply(params, ids, jnp.ones((2, 6), jnp.int32), tt)
    assert np.isfinite(np.asarray(out)).all()
    jitted = jax.jit(lambda p, i, t: model.apply(p, i, None, t))(params, ids, tt)  # traced types are not read
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model.apply(params, ids, None, tt)), rtol=1e-6, atol=1e-6)


def test_token_types_of_another_shape_are_refused_by_name_and_broadcastable_ones_run():
    """token_type_ids of a shape that does not broadcast to the inputs failed in the embedding sum with
    a raw TypeError ('add got incompatible shapes'); GPT-2 named it. (1, seq), (batch, 1) and (seq,)
    broadcast, as in transformers' BERT."""
    model, params, ids = _tiny()
    with pytest.raises(InputValidationError, match=r"token_type_ids must have the shape of the inputs \(2, 6\)"):
        model.apply(params, ids, None, jnp.zeros((2, 5), jnp.int32))
    with pytest.raises(InputValidationError, match="token_type_ids"):
        jax.jit(lambda p, t: model.apply(p, ids, None, t))(params, jnp.zeros((2, 6, 1), jnp.int32))
    row = jnp.asarray([0, 0, 1, 1, 1, 0], jnp.int32)
    full = np.asarray(model.apply(params, ids, None, jnp.broadcast_to(row, (2, 6))))
    for tt in (row[None], row):
        np.testing.assert_array_equal(np.asarray(model.apply(params, ids, None, tt)), full)
    per_row = jnp.asarray([[1], [0]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(model.apply(params, ids, None, per_row)),
                                  np.asarray(model.apply(params, ids, None, jnp.broadcast_to(per_row, (2, 6)))))


def test_sequence_longer_than_the_positions_is_refused():
    model, params, _ = _tiny()
    long_ids = jnp.ones((1, 9), jnp.int32)
    with pytest.raises(InputValidationError, match="max_position_embeddings"):
        model.apply(params, long_ids)
    with pytest.raises(InputValidationError, match="max_position_embeddings"):  # the length is static: jit too
        jax.jit(lambda p, i: model.apply(p, i))(params, long_ids)
    assert model.apply(params, jnp.ones((1, 8), jnp.int32)).shape == (1, 3)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_out_of_range_ids_at_padding_do_not_reach_the_real_tokens(family):
    """The id check skips padded positions (a collator's -100), but the lookup ran there and its
    NaN reached the real tokens through the attention (0 * NaN); the padded ids are clipped into
    the vocabulary, so the real tokens' outputs equal those with in-range padding."""
    if family == "bert":
        model, params, _ = _tiny()
    else:
        cfg = jpeft.models.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2)
        model = jpeft.models.LlamaForCausalLM(cfg)
        params = model.init(jax.random.key(0), jnp.ones((1, 6), jnp.int32))
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    ok = model.apply(params, jnp.asarray([[1, 5, 6, 7, 0, 0]]), mask)
    for pad in (999, -100):
        bad = model.apply(params, jnp.asarray([[1, 5, 6, 7, pad, pad]]), mask)
        jitted = jax.jit(model.apply)(params, jnp.asarray([[1, 5, 6, 7, pad, pad]]), mask)
        real = slice(None) if family == "bert" else (slice(None), slice(0, 4))
        np.testing.assert_allclose(np.asarray(bad)[real], np.asarray(ok)[real], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(jitted)[real], np.asarray(ok)[real], rtol=1e-5, atol=1e-5)


def test_gpt2_sequence_longer_than_its_positions_is_refused():
    """GPT-2 read its position table past the end: NaN logits, silently (transformers raises)."""
    cfg = jpeft.models.GPT2Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=8)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))
    assert np.isfinite(np.asarray(model.apply(params, jnp.ones((1, 8), jnp.int32)))).all()
    with pytest.raises(InputValidationError, match="max_position_embeddings"):
        model.apply(params, jnp.ones((1, 9), jnp.int32))


def test_save_pretrained_keeps_problem_type_and_label_names(tmp_path):
    """save_pretrained wrote LABEL_i and no problem_type: transformers then inferred BCE for a
    3-output regression model it had trained with MSE (loss 0.65 instead of 1.43), and the
    label names were lost. Both round-trip now, and transformers' loss is the one before."""
    import torch
    import transformers as t

    torch.manual_seed(0)
    cfg = t.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=16, problem_type="regression",
                       id2label={0: "valence", 1: "arousal", 2: "dominance"},
                       label2id={"valence": 0, "arousal": 1, "dominance": 2})
    hf = t.BertForSequenceClassification(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    model, params = jpeft.models.from_pretrained(str(tmp_path / "hf"))
    assert model.config.problem_type == "regression"
    assert model.config.label_names == ("valence", "arousal", "dominance")
    jpeft.models.save_pretrained(str(tmp_path / "out"), model, params)
    back = t.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert back.config.problem_type == "regression"
    assert back.config.id2label == {0: "valence", 1: "arousal", 2: "dominance"}
    ids = torch.tensor([[1, 5, 6, 7]])
    labels = torch.tensor([[0.5, -1.0, 2.0]])
    with torch.no_grad():
        want, got = hf(input_ids=ids, labels=labels).loss, back(input_ids=ids, labels=labels).loss
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    with pytest.raises(jpeft.errors.ConfigError, match="problem_type"):
        jpeft.models.BertConfig(problem_type="ranking")


def _tiny_gpt2():
    cfg = jpeft.models.GPT2Config(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, max_position_embeddings=8)
    model = jpeft.models.GPT2LMHeadModel(cfg)
    ids = jnp.ones((2, 6), jnp.int32)
    return model, model.init(jax.random.key(0), ids), ids


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_explicit_positions_past_the_table_are_refused(family):
    """Explicit position_ids past the learned table gave NaN logits silently (transformers
    raises IndexError); found by an audit. Padded positions are clipped into the table, so an
    out-of-range position there neither raises nor reaches the real tokens."""
    model, params, ids = _tiny() if family == "bert" else _tiny_gpt2()
    def call(pos, mask=None):
        return model.apply(params, ids, mask, position_ids=pos)

    for bad in (8, -1):
        pos = np.tile(np.arange(6, dtype=np.int32), (2, 1))
        pos[1, 2] = bad
        with pytest.raises(InputValidationError, match="position_ids"):
            call(pos=jnp.asarray(pos))
    mask = np.ones((2, 6), np.int32)
    mask[1, 4:] = 0
    pos = np.tile(np.arange(6, dtype=np.int32), (2, 1))
    ok = np.asarray(call(pos=jnp.asarray(pos), mask=jnp.asarray(mask)))
    pos[1, 4:] = 100
    out = np.asarray(call(pos=jnp.asarray(pos), mask=jnp.asarray(mask)))
    assert np.isfinite(out).all()
    if family == "bert":
        np.testing.assert_allclose(out, ok, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(out[1, :4], ok[1, :4], rtol=1e-6, atol=1e-6)


def test_position_ids_of_another_shape_and_empty_inputs_are_refused_by_name():
    """BERT's explicit position_ids of a shape that does not broadcast to the inputs raised a raw
    ValueError from jnp.broadcast_to, and a (batch, 0) input an IndexError from the pooler; the
    decoders name both. Broadcastable positions ((1, seq), (seq,)) still work."""
    model, params, ids = _tiny()
    with pytest.raises(InputValidationError, match=r"position_ids must have the shape of the inputs \(2, 6\)"):
        model.apply(params, ids, position_ids=jnp.arange(5)[None])
    with pytest.raises(InputValidationError, match="no tokens"):
        model.apply(params, jnp.zeros((2, 0), jnp.int32))
    full = model.apply(params, ids, position_ids=jnp.broadcast_to(jnp.arange(6), (2, 6)))
    for pos in (jnp.arange(6)[None], jnp.arange(6)):
        np.testing.assert_array_equal(np.asarray(model.apply(params, ids, position_ids=pos)), np.asarray(full))


def test_num_labels_that_disagrees_with_id2label_wins_as_in_transformers(tmp_path):
    """A config.json with num_labels 3 beside an id2label of two names (one edited without the other):
    transformers builds 3 labels (LABEL_0..2) and loads the 3-row classifier; jpeft read two labels from
    id2label and refused the checkpoint's classifier by shape. It reads num_labels now, and the logits
    equal transformers'."""
    import json
    import os
    import shutil
    import sys

    import torch
    import transformers as t

    sys.path.insert(0, os.path.dirname(__file__))
    import _models_tiny as T

    hf, folder = T.hf_model("bert")
    shutil.copytree(folder, tmp_path / "m")
    with open(tmp_path / "m" / "config.json") as f:
        d = json.load(f)
    d.update(num_labels=3, id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1})
    with open(tmp_path / "m" / "config.json", "w") as f:
        json.dump(d, f)
    ref_model = t.BertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert ref_model.config.num_labels == 3
    model, params = jpeft.models.from_pretrained(str(tmp_path / "m"))
    assert (model.config.num_labels, model.config.label_names) == (3, None)
    ids, mask = T.batch("bert")
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    out = np.asarray(model.apply(params, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # an agreeing num_labels keeps the names
    from jpeft.models.loading import config_from_hf
    assert config_from_hf(dict(d, num_labels=2)).label_names == ("neg", "pos")
