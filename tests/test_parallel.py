"""Scale-out training (issue 5): pmap / mesh / fsdp against one device, placements, mixed
precision, remat, gradient accumulation, multi-host, and the TPU launch script.

The eight-device checks run in a subprocess (tests/_parallel_worker.py) because XLA_FLAGS
must be set before JAX is imported; the two-process check runs tpu/train_multihost.py twice
joined through jax.distributed on 127.0.0.1.
"""

import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

import jpeft
from jpeft import distributed as dist
from jpeft.train import accumulate_loss_and_grad, loss_and_grad

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _load_common():
    spec = importlib.util.spec_from_file_location("_parallel_common", os.path.join(HERE, "_parallel_common.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


C = _load_common()


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


# ------------------------------------------------------------------ eight emulated devices
@pytest.fixture(scope="module")
def eight():
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_parallel_worker.py"), "20"],
        env=_env(8), cwd=HERE, capture_output=True, text=True, timeout=900,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON:")]
    assert proc.returncode == 0 and lines, f"worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][5:])


def test_eight_devices_really_used(eight):
    assert eight["devices"] == 8
    # the runs are not trivial: the adapter moves and the loss falls over the 20 steps
    for opt in ("sgd", "adam"):
        assert eight[f"single/{opt}/adapter_change"] > 1e-3
        losses = eight[f"single/{opt}/losses"]
        assert len(losses) == 20 and losses[-1] < losses[0] - 0.1


def test_full_fine_tuning_on_an_fsdp_mesh_splits_its_copy_like_the_base(eight):
    """Full fine-tuning's trainable copy of the model (and Adam's two moments, laid out like it)
    was replicated on a (data, fsdp) mesh: with fsdp = 4 every device held the whole model three
    times over a quarter of the base. Each device now holds a quarter of each, and 5 Adam steps on
    the 2 x 4 mesh equal one device's."""
    share = eight["full/device_share"]
    assert share == {"base": 0.25, "copy": 0.25, "mu": 0.25, "nu": 0.25}, share
    assert eight["full/specs_follow_base"]
    assert eight["full/adapter_change"] > 1e-3
    assert eight["full/loss_diff"] < 1e-5 and eight["full/adapter_diff"] < 1e-5, eight


@pytest.mark.parametrize("strategy", ["pmap", "mesh8", "mesh2x4"])
def test_strategies_match_one_device_sgd(eight, strategy):
    assert eight[f"{strategy}/sgd/loss_diff"] < 1e-5
    assert eight[f"{strategy}/sgd/adapter_diff"] < 1e-5


@pytest.mark.parametrize("strategy", ["pmap", "mesh8", "mesh2x4", "mesh2x4_acc2"])
def test_strategies_match_one_device_adam(eight, strategy):
    assert eight[f"{strategy}/adam/loss_diff"] < 1e-4
    assert eight[f"{strategy}/adam/adapter_diff"] < 1e-4


@pytest.mark.parametrize("strategy", ["pmap", "mesh2x4_acc2"])
def test_token_mean_counts_each_device_and_micro_batch_by_its_tokens(eight, strategy):
    """loss_weight="targets": a per-token mean over rows with different numbers of loss tokens
    trains as on one device (the whole batch's mean), and the token count is summed."""
    assert eight[f"tokens/{strategy}/loss_diff"] < 1e-5
    assert eight[f"tokens/{strategy}/adapter_diff"] < 1e-5
    assert eight[f"tokens/{strategy}/counted"] == eight["tokens/total"]


def test_token_mean_without_loss_weight_averages_the_devices_means(eight):
    # the plain pmean (right for per-example means) is not the whole batch's token mean here
    assert eight["tokens/pmap_unweighted/adapter_diff"] > 1e-3


@pytest.mark.parametrize("strategy", ["pmap", "mesh2x4"])
def test_mica_keeps_b_bit_identical_and_moves_a_as_one_device(eight, strategy):
    """MiCA (lora_B frozen) through the pmap step and the 2 x 4 (data x fsdp) mesh step: after 3 AdamW steps
    (weight decay 0.1) every B is bit-identical to the start and A equals one device's make_train_step."""
    assert eight["mica/single/a_change"] > 1e-3
    assert eight[f"mica/{strategy}/frozen_b"]
    assert eight[f"mica/{strategy}/b_diff"] == 0.0
    assert eight[f"mica/{strategy}/a_diff"] < 1e-5, eight[f"mica/{strategy}/a_diff"]


def test_bank_trains_mica_slots_a_only_on_a_mesh_as_on_one_device(eight):
    """An AdapterBank of a MiCA and a plain LoRA adapter trained through the bank (3 AdamW steps, weight decay 0.1)
    on one device and on the 2 x 4 (data x fsdp) mesh: the MiCA slot's B stays bit-identical and comes back MiCA
    from bank.get, its A and the plain slot's factors move, and the mesh equals one device. Before, the bank
    trained (and decayed) the MiCA slot's B."""
    for tag in ("single", "mesh2x4"):
        assert eight[f"bank/{tag}/mica_b_diff"] == 0.0
        assert eight[f"bank/{tag}/mica_frozen_b"]
        assert eight[f"bank/{tag}/mica_a_change"] > 1e-3 and eight[f"bank/{tag}/lora_b_change"] > 1e-3
    assert eight["bank/mesh2x4/diff"] < 1e-5, eight["bank/mesh2x4/diff"]


def test_pmap_replicas_identical(eight):
    assert eight["pmap/sgd/replicas_equal"] == 0.0
    assert eight["pmap/adam/replicas_equal"] == 0.0


def test_fsdp4_each_device_holds_a_quarter(eight):
    shards = eight["fsdp4/sharded"]
    # every leaf of the tiny model has a dimension divisible by 4, so every one is sharded
    assert len(shards) == eight["fsdp4/n_leaves"] == 21
    for s in shards:
        assert s["devices"] == 8, s
        assert s["fractions"] == [0.25], s
        assert "fsdp" in s["spec"], s
    by_path = {s["path"]: s for s in shards}
    # largest divisible dimension: [16, 64] shards its 64, [256, 16] its 256
    assert by_path["['params']['layers_0']['up_proj']['kernel']"]["spec"] == "P(None, 'fsdp')"
    assert by_path["['params']['embed']['embedding']"]["spec"] == "P('fsdp',)"


def test_adapter_and_optimizer_state_follow_base(eight):
    ex = eight["mesh2x4/example_specs"]
    # up_proj kernel [in=16, out=64] sharded on its output dim: B follows, A replicated
    assert ex["kernel"] == "P(None, 'fsdp')"
    assert ex["lora_A"] == "P(None, None)" and ex["lora_B"] == "P(None, 'fsdp')"
    # q_proj kernel [16, 16] sharded on its input dim: A follows, B replicated
    assert ex["q_kernel"] == "P('fsdp',)"
    assert ex["q_lora_A"] == "P('fsdp', None)" and ex["q_lora_B"] == "P(None, None)"
    assert eight["mesh2x4/adapter_specs_kept"] is True
    assert eight["mesh2x4/opt_specs_follow_adapter"] is True
    assert eight["mesh2x4/opt_count_replicated"] is True


# ------------------------------------------------------------------ partition specs (no devices)
MESH = AbstractMesh((2, 4), ("data", "fsdp"))
S = jax.ShapeDtypeStruct


def test_default_spec_largest_divisible_dimension():
    base = {"params": {
        "a": {"kernel": S((12, 8), jnp.float32)},   # 12 > 8, both divisible -> dim 0
        "b": {"kernel": S((6, 8), jnp.float32)},    # 6 not divisible -> dim 1
        "c": {"kernel": S((3, 5), jnp.float32)},    # nothing divisible -> replicated
        "d": {"kernel": S((8, 8), jnp.float32)},    # tie -> the first
        "e": {"bias": S((4,), jnp.float32), "n": S((), jnp.int32)},
    }}
    with pytest.warns(UserWarning, match=r"'c/kernel' \(3, 5\) 60 bytes"):  # named: 60 of 508 bytes
        sp = jpeft.param_specs(base, MESH)["params"]
    assert sp["a"]["kernel"] == P("fsdp")
    assert sp["b"]["kernel"] == P(None, "fsdp")
    assert sp["c"]["kernel"] == P()
    assert sp["d"]["kernel"] == P("fsdp")
    assert sp["e"]["bias"] == P("fsdp") and sp["e"]["n"] == P()
    # min_size keeps small leaves whole; a data-only mesh replicates everything
    assert jpeft.param_specs(base, MESH, min_size=50)["params"]["a"]["kernel"] == P("fsdp")
    assert jpeft.param_specs(base, MESH, min_size=97)["params"]["a"]["kernel"] == P()
    flat = jax.tree.leaves(jpeft.param_specs(base, AbstractMesh((8, 1), ("data", "fsdp"))),
                           is_leaf=lambda x: isinstance(x, P))
    assert all(s == P() for s in flat)


def test_an_fsdp_size_that_divides_no_dimension_is_named_or_refused():
    """A weight no dimension of which the fsdp size divides stays whole on every device: a user
    asking for fsdp = 8 to fit memory silently got full copies of it. Such weights holding 1% of
    the base or more are named in a warning (shape, bytes, the fsdp sizes of the mesh's device
    count that would split them); a base of which nothing at all would be sharded is refused."""
    mesh = AbstractMesh((1, 8), ("data", "fsdp"))
    embed, up = S((98, 7), jnp.float32), S((16, 64), jnp.float32)  # 98 = 2 x 7 x 7: only fsdp = 2 splits it
    with pytest.warns(UserWarning) as seen:
        sp = jpeft.param_specs({"params": {"embed": {"embedding": embed}, "up": {"kernel": up}}}, mesh)["params"]
    assert sp["embed"]["embedding"] == P() and sp["up"]["kernel"] == P(None, "fsdp")
    assert [str(w.message) for w in seen] == [
        "fsdp = 8 divides no dimension of 1 weight(s) of the base, which every device therefore holds whole "
        "(replicated: 2,744 bytes of the base's 6,840 bytes): 'embed/embedding' (98, 7) 2,744 bytes. The fsdp sizes "
        "(divisors of this mesh's 8 devices) that split them all: 2; use one of them to save their memory."]
    with pytest.raises(jpeft.errors.ShardingError) as e:
        jpeft.param_specs({"params": {"embed": {"embedding": embed}, "bias": S((3,), jnp.float32)}}, mesh)
    assert str(e.value) == (
        "fsdp = 8 divides no dimension of any weight of the base, so nothing would be sharded and every device would "
        "hold the whole base (2,756 bytes): 'embed/embedding' (98, 7) 2,744 bytes, 'bias' (3,) 12 bytes. No fsdp "
        "size that divides this mesh's 8 devices splits them all. Use fsdp = 1 (plain data parallelism) to "
        "replicate the base on purpose.")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # silent: a whole leaf under 1% of the base; fsdp = 1; a rule's own choice
        jpeft.param_specs({"params": {"up": {"kernel": S((64, 64), jnp.float32), "bias": S((3,), jnp.float32)}}}, mesh)
        jpeft.param_specs({"params": {"embed": {"embedding": embed}}}, AbstractMesh((8, 1), ("data", "fsdp")))
        jpeft.param_specs({"params": {"embed": {"embedding": embed}, "up": {"kernel": up}}}, mesh,
                          [(r"embed/.*", None)])


def test_a_trainable_copy_of_base_weights_is_sharded_like_them():
    """Full fine-tuning's copy of the whole model and a ``modules_to_save`` copy were replicated on
    an fsdp mesh (with their optimizer state): every device held them whole. Each array of the
    copy now takes the spec of the base weight it copies."""
    class TwoDense(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="head")(nn.Dense(64, name="q")(x))

    params = TwoDense().init(jax.random.key(0), jnp.ones((1, 16)))
    specs = jpeft.param_specs(params, MESH)
    assert specs["params"]["head"] == {"kernel": P("fsdp"), "bias": P("fsdp")}
    full = jpeft.init(jpeft.FullFinetuneConfig(), params, jax.random.key(1))
    assert jpeft.adapter_specs(full, specs)[""].params == specs["params"]
    lora = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q"], modules_to_save=["head"]), params, jax.random.key(1))
    assert jpeft.adapter_specs(lora, specs)["head"].params == specs["params"]["head"]


def test_stacked_layer_axis_never_sharded():
    base = {"params": {"blocks": {"mlp": {"kernel": S((64, 16, 32), jnp.float32)}}, "head": {"kernel": S((64, 16, 32), jnp.float32)}}}
    sp = jpeft.param_specs(base, MESH, stacked=r"blocks/.*")["params"]
    assert sp["blocks"]["mlp"]["kernel"] == P(None, None, "fsdp")  # 32 of (16, 32), never the 64 layers
    assert sp["head"]["kernel"] == P("fsdp")  # not stacked: the 64 is fair game


def test_rules_override_in_order():
    base = {"params": {"q": {"kernel": S((16, 64), jnp.float32)}, "k": {"kernel": S((16, 64), jnp.float32)}}}
    rules = [(r"q/kernel", ("fsdp", None)), (r".*/kernel", None)]
    sp = jpeft.param_specs(base, MESH, rules)["params"]
    assert sp["q"]["kernel"] == P("fsdp", None)
    assert sp["k"]["kernel"] == P()
    sp = jpeft.param_specs(base, MESH, [(r"k/.*", P(None, ("data", "fsdp")))])["params"]
    assert sp["k"]["kernel"] == P(None, ("data", "fsdp"))
    assert sp["q"]["kernel"] == P(None, "fsdp")  # default


def test_rule_errors_say_what_and_how():
    base = {"params": {"q": {"kernel": S((6, 64), jnp.float32)}}}
    with pytest.raises(jpeft.errors.ShardingError, match=r"names the mesh axis 'model'.*axes \('data', 'fsdp'\)"):
        jpeft.param_specs(base, MESH, [("q/kernel", ("model", None))])
    with pytest.raises(jpeft.errors.ShardingError, match=r"dimension 0 \(size 6\) over 'fsdp' \(size 4\).*replicate"):
        jpeft.param_specs(base, MESH, [("q/kernel", ("fsdp", None))])
    with pytest.raises(jpeft.errors.ShardingError, match=r"3 entries.*2 dims"):
        jpeft.param_specs(base, MESH, [("q/kernel", (None, None, "fsdp"))])
    with pytest.raises(jpeft.errors.ShardingError, match=r"\(regex, spec\) pairs"):
        jpeft.param_specs(base, MESH, ["q/kernel"])


def test_make_mesh_errors():
    with pytest.raises(jpeft.errors.ShardingError, match=r"fsdp=3 does not divide the 1 available devices"):
        jpeft.make_mesh(fsdp=3)
    with pytest.raises(jpeft.errors.ShardingError, match=r"must equal the number of devices \(1\).*data=2, fsdp=1"):
        jpeft.make_mesh(data=2)
    with pytest.raises(jpeft.errors.ShardingError, match="positive integer"):
        jpeft.make_mesh(fsdp=0)
    with pytest.raises(jpeft.errors.ShardingError, match=r"fsdp=1, tensor=2 does not divide the 1 available devices"):
        jpeft.make_mesh(tensor=2)
    mesh = jpeft.make_mesh()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert dict(jpeft.make_mesh(tensor=1).shape) == {"data": 1, "fsdp": 1}  # no tensor axis unless asked for



def test_unreplicate_refuses_a_tree_that_was_never_replicated():
    """unreplicate took row 0 of every leaf whatever it held: an adapter that was never
    replicated came back cut to its first rows (lora_A [in, r] -> [r]) with no word, and a
    scalar leaf raised a raw IndexError."""
    params = nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1))
    back = jpeft.unreplicate(jpeft.replicate(adapter))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), back, adapter))
    with pytest.raises(jpeft.errors.InputValidationError, match=r"leaves leading with \[2, 3\] entries.*pmap step"):
        jpeft.unreplicate(adapter)
    with pytest.raises(jpeft.errors.InputValidationError, match=r"a leaf of shape \(\)"):
        jpeft.unreplicate({"loss": jnp.float32(1.0)})


def test_split_for_pmap_refuses_leaves_of_different_batch_sizes():
    """split_for_pmap split each leaf on its own: input ids of 4 rows and labels of 6 gave each
    device 2 rows of one and 3 of the other, with no word (a later shape error at best)."""
    batch = {"input_ids": jnp.arange(8).reshape(4, 2), "labels": jnp.arange(4)}
    out = jpeft.split_for_pmap(batch, 2)
    assert out["input_ids"].shape == (2, 2, 2) and out["labels"].tolist() == [[0, 1], [2, 3]]
    with pytest.raises(jpeft.errors.InputValidationError, match=r"same number of examples.*'input_ids': 4, 'labels': 6"):
        jpeft.split_for_pmap(dict(batch, labels=jnp.arange(6)), 2)


class _Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((4, 8), name="qkv")(x)              # kernel [16, 4, 8]: in (0,), out (1, 2)
        e = nn.Embed(32, 16, name="emb")(jnp.zeros(x.shape[:-1], jnp.int32))
        return nn.Dense(16, name="out")(h.reshape(x.shape[:-1] + (32,))) + e


def test_adapter_specs_follow_kernel_axes():
    model = _Heads()
    x = jnp.ones((2, 16))
    params = model.init(jax.random.key(0), x)
    cfg = jpeft.LoraConfig(r=4, target_modules=["qkv", "emb", "out"], use_dora=False)
    adapter = jpeft.init(cfg, params, jax.random.key(1), model, x)
    specs = {"params": {
        "qkv": {"kernel": P(None, "fsdp", None), "bias": P()},    # major output axis sharded
        "emb": {"embedding": P("fsdp", None)},                    # vocab axis = LoRA's input axis
        "out": {"kernel": P("fsdp", None), "bias": P()},
    }}
    got = jpeft.adapter_specs(adapter, specs)
    assert (got["qkv"].lora_A, got["qkv"].lora_B) == (P(None, None), P(None, "fsdp"))
    assert (got["emb"].lora_A, got["emb"].lora_B) == (P("fsdp", None), P(None, None))
    assert (got["out"].lora_A, got["out"].lora_B) == (P("fsdp", None), P(None, None))
    # a minor output axis cannot be carried over to the flattened [r, 4 * 8] factor
    specs["params"]["qkv"]["kernel"] = P(None, None, "fsdp")
    got = jpeft.adapter_specs(adapter, specs)
    assert got["qkv"].lora_B == P(None, None)
    # the result is a tree shaped like the adapter (same static fields), usable as shardings
    assert jax.tree.structure(got) == jax.tree.structure(jax.tree.map(lambda _: P(), adapter))


def test_adapter_specs_stacked_and_dora():
    model = nn.Dense(64)
    x = jnp.ones((2, 16))
    params = model.init(jax.random.key(0), x)
    dora = jpeft.init(jpeft.LoraConfig(r=4, target_modules=".*", use_dora=True), params, jax.random.key(1))
    got = jpeft.adapter_specs(dora, {"params": {"kernel": P(None, "fsdp"), "bias": P()}})[""]
    assert (got.lora_A, got.lora_B, got.magnitude) == (P(None, None), P(None, "fsdp"), P("fsdp"))
    # a scanned site: factors with a leading layer axis [L, in, r] / [L, r, out]
    node = jpeft.init(jpeft.LoraConfig(r=4, target_modules=".*"), params, jax.random.key(1))[""]
    stacked = dataclasses.replace(node, lora_A=jnp.zeros((3,) + node.lora_A.shape), lora_B=jnp.zeros((3,) + node.lora_B.shape))
    got = jpeft.adapter_specs({"blocks": stacked}, {"params": {"blocks": {"kernel": P(None, "fsdp", None)}}})["blocks"]
    assert (got.lora_A, got.lora_B) == (P(None, "fsdp", None), P(None, None, None))


def test_adapter_specs_missing_base_leaf():
    model = nn.Dense(4)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))
    adapter = jpeft.init(jpeft.LoraConfig(target_modules=".*"), params, jax.random.key(1))
    with pytest.raises(jpeft.errors.ShardingError, match=r"site '' \(LoRA\) adapts the base leaf 'kernel'.*another model"):
        jpeft.adapter_specs(adapter, {"params": {"other": {"kernel": P()}}})


# ------------------------------------------------------------------ one-device mesh, in process
def _tiny():
    model, params, adapter, loss_fn = C.setup()
    return model, params, C.random_adapter(adapter), loss_fn


def test_sharded_step_on_one_device_mesh_equals_train_step():
    model, params, adapter, loss_fn = _tiny()
    data = C.batches(3)
    opt = optax.adam(1e-2)
    ref_losses, ref = C.single_device_run(loss_fn, opt, params, adapter, data)
    mesh = jpeft.make_mesh()
    p = jpeft.shard_params(params, mesh)
    a = jpeft.shard_adapter(adapter, mesh, p)
    s = jpeft.init_opt_state(opt, a)
    step = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    key = jax.random.key(0)
    for i, b in enumerate(data):
        a, s, m = step(p, a, s, b, jax.random.fold_in(key, i))
        assert abs(float(m["loss"]) - ref_losses[i]) < 1e-6
    assert C.max_diff(a, ref) < 1e-6
    # the donated step left the caller's unsharded adapter intact
    assert not any(x.is_deleted() for x in jax.tree.leaves(adapter))


def test_donating_multi_device_steps_name_the_argument_given_again():
    """The sharded and pmap steps donate the adapter and optimizer state, as make_train_step does; given
    them again they failed with JAX's bare "Array has been deleted" / "Buffer has been deleted or donated"
    and now name the argument and the builder, as make_train_step's step does (one wrapper)."""
    _, params, adapter, loss_fn = _tiny()
    b = C.batches(1)[0]
    opt = optax.adam(1e-2)
    mesh = jpeft.make_mesh()
    p = jpeft.shard_params(params, mesh)
    a = jpeft.shard_adapter(adapter, mesh, p)
    s = jpeft.init_opt_state(opt, a)
    step = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    a2, s2, _ = step(p, a, s, b, jax.random.key(0))
    with pytest.raises(jpeft.errors.InputValidationError,
                       match=r"the adapter given to this training step was donated to an earlier call of it and is "
                             r"gone \(.* is deleted; .*\): jpeft\.make_sharded_train_step donates"):
        step(p, a, s2, b, jax.random.key(1))
    assert C.max_diff(step(p, a2, s2, b, jax.random.key(1))[0], adapter) > 0  # what the step returned still trains
    pstep = jpeft.make_pmap_train_step(loss_fn, opt)
    pp, pa = jpeft.replicate(params), jpeft.replicate(adapter)
    ps = jpeft.replicate(opt.init(adapter))
    pa2, ps2, _ = pstep(pp, pa, ps, jpeft.split_for_pmap(b), jax.random.key(0))
    with pytest.raises(jpeft.errors.InputValidationError,
                       match=r"the opt_state given .* jpeft\.make_pmap_train_step\(\.\.\., donate=False\)"):
        pstep(pp, pa2, ps, jpeft.split_for_pmap(b), jax.random.key(1))
    assert jpeft.make_pmap_train_step(loss_fn, opt, donate=False).__class__.__name__ != "DonationNamed"


def test_a_step_given_an_array_deleted_another_way_does_not_blame_its_donation():
    """The donating step named "the params given to this training step was donated to an earlier call
    of it" for a params array the caller deleted (``x.delete()``): the step never donates its params.
    A deleted array of an argument it does not donate is now said to have been deleted before the
    call; one of the adapter (which looks the same to JAX as a donated one) names both causes."""
    _, params, adapter, loss_fn = _tiny()
    b = C.batches(1)[0]
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss_fn, opt)
    gone = jax.tree.map(jnp.copy, params)
    jax.tree.leaves(gone)[0].delete()
    with pytest.raises(jpeft.errors.InputValidationError,
                       match=r"the params given to this training step hold a deleted array \(.+\); jpeft\.make_train_step "
                             r"donates only its adapter and optimizer-state arguments, so this one was deleted before "
                             r"the call \(x\.delete\(\), or donated to another jitted function\)") as e:
        step(gone, jax.tree.map(jnp.copy, adapter), opt.init(adapter), b, jax.random.key(0))
    assert "donated to an earlier call" not in str(e.value)
    mine = jax.tree.map(jnp.copy, adapter)
    jax.tree.leaves(mine)[0].delete()
    with pytest.raises(jpeft.errors.InputValidationError,
                       match=r"the adapter given to this training step was donated to an earlier call of it and is gone "
                             r"\(.+ is deleted; or it was deleted some other way, x\.delete\(\), which looks the same\)"):
        step(params, mine, opt.init(adapter), b, jax.random.key(0))
    a2, s2, m = step(params, jax.tree.map(jnp.copy, adapter), opt.init(adapter), b, jax.random.key(0))
    assert np.isfinite(float(m["loss"]))  # live arguments still train


def test_sharded_step_refuses_unplaced_state():
    model, params, adapter, loss_fn = _tiny()
    mesh = jpeft.make_mesh()
    opt = optax.sgd(0.1)
    step = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    with pytest.raises(jpeft.errors.ShardingError, match=r"adapter is not placed on the step's mesh.*jpeft.shard_adapter"):
        step(params, adapter, opt.init(adapter), C.batches(1)[0], None)


def test_opt_state_shardings_match_adapter_copies():
    _, params, adapter, _ = _tiny()
    mesh = jpeft.make_mesh()
    a = jpeft.shard_adapter(adapter, jpeft.make_mesh(), jpeft.shard_params(params, mesh))
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    sh = jpeft.opt_state_shardings(opt, a)
    state = jpeft.init_opt_state(opt, a)
    assert jax.tree.structure(state) == jax.tree.structure(jax.eval_shape(opt.init, adapter))
    assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state)) == jax.tree.leaves(sh)
    with pytest.raises(jpeft.errors.ShardingError, match="adapter placed on a mesh"):
        jpeft.opt_state_shardings(opt, adapter)


def test_factored_optimizer_state_on_a_sharded_adapter():
    """Adafactor's factored second moment (``v_row`` / ``v_col``) has the adapter's tree
    structure but other shapes: it was given the adapter's shardings, and a sharded adapter
    (here every factor's first axis over ``fsdp``) made ``init_opt_state`` fail with JAX's raw
    rank error. Such leaves are replicated; the mesh step trains like one device."""
    from jax.sharding import NamedSharding

    model, params, adapter, loss_fn = _tiny()
    data = C.batches(2)
    opt = optax.adafactor(1e-2, min_dim_size_to_factor=4)
    ref_losses, ref = C.single_device_run(loss_fn, opt, params, adapter, data)
    mesh = jpeft.make_mesh()
    p = jpeft.shard_params(params, mesh)
    a = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("fsdp", *[None] * (x.ndim - 1)))), adapter)
    state = jpeft.init_opt_state(opt, a)
    assert jax.tree.structure(state) == jax.tree.structure(opt.init(adapter))
    for x in jax.tree.leaves(state):  # every leaf's sharding fits its own shape
        assert x.sharding.spec == P() or len(x.sharding.spec) <= x.ndim
    step = jpeft.make_sharded_train_step(loss_fn, opt, mesh, donate=False)
    for i, b in enumerate(data):
        a, state, m = step(p, a, state, b, jax.random.fold_in(jax.random.key(0), i))
        np.testing.assert_allclose(float(m["loss"]), ref_losses[i], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ gradient accumulation
def test_accumulation_equals_big_batch():
    model, params, adapter, loss_fn = _tiny()
    big = C.batches(1, batch=16)[0]
    key = jax.random.key(3)
    acc4 = jax.jit(lambda a, b: accumulate_loss_and_grad(loss_fn, params, a, b, key, 4))
    one = jax.jit(lambda a, b: loss_and_grad(loss_fn, params, a, b, key))
    (l4, _), g4 = acc4(adapter, big)
    (l1, _), g1 = one(adapter, big)
    assert abs(float(l4) - float(l1)) < 1e-5
    assert C.max_diff(g4, g1) < 1e-5
    # and equals the mean over the four strided micro-batches computed one by one
    parts = [one(adapter, {"tokens": big["tokens"][j::4]}) for j in range(4)]
    g_manual = jax.tree.map(lambda *g: sum(g) / 4, *[g for _, g in parts])
    assert C.max_diff(g4, g_manual) < 1e-6
    assert float(optax.tree.norm(g4)) > 1e-3  # not trivially zero
    # whole training runs: 4 micro-batches of 4 == one batch of 16 (Adam, 3 updates)
    data = C.batches(3, batch=16)
    opt = optax.adam(1e-2)
    la, aa = C.single_device_run(loss_fn, opt, params, adapter, data, accumulate_steps=4)
    lb, ab = C.single_device_run(loss_fn, opt, params, adapter, data)
    assert np.max(np.abs(np.array(la) - np.array(lb))) < 1e-5
    assert C.max_diff(aa, ab) < 1e-5
    assert C.max_diff(aa, adapter) > 1e-3


def test_accumulation_of_a_token_mean_counts_each_micro_batch_by_its_tokens():
    """A per-token mean over rows with different numbers of loss tokens: with
    ``loss_weight="targets"`` four micro-batches give the whole batch's loss, gradients and
    updates; the plain average of the micro-batches' means does not (so the test can tell)."""
    model, params, adapter, _ = _tiny()
    loss_fn = C.token_mean_loss(model)
    big = C.with_uneven_masks(C.batches(1, batch=16))[0]
    counts = [float(big["mask"][j::4].sum()) for j in range(4)]
    assert len(set(counts)) == 4, counts  # every micro-batch holds a different number of tokens
    key = jax.random.key(3)
    (l1, a1), g1 = jax.jit(lambda a: loss_and_grad(loss_fn, params, a, big, key))(adapter)
    (lw, aw), gw = jax.jit(lambda a: accumulate_loss_and_grad(loss_fn, params, a, big, key, 4,
                                                              loss_weight="targets"))(adapter)
    (lp, _), gp = jax.jit(lambda a: accumulate_loss_and_grad(loss_fn, params, a, big, key, 4))(adapter)
    assert abs(float(lw) - float(l1)) < 1e-5 and C.max_diff(gw, g1) < 1e-5
    assert float(aw["targets"]) == float(a1["targets"]) == sum(counts)  # the count is summed, not averaged
    assert C.max_diff(gp, g1) > 1e-3 and abs(float(lp) - float(l1)) > 1e-3
    # whole runs through the jitted step (Adam, 3 updates): weighted accumulation == one batch
    data = C.with_uneven_masks(C.batches(3, batch=16))
    opt = optax.adam(1e-2)
    la, aa = C.single_device_run(loss_fn, opt, params, adapter, data, accumulate_steps=4, loss_weight="targets")
    lb, ab = C.single_device_run(loss_fn, opt, params, adapter, data)
    assert np.max(np.abs(np.array(la) - np.array(lb))) < 1e-5 and C.max_diff(aa, ab) < 1e-5
    assert C.max_diff(aa, adapter) > 1e-3
    # a name the loss does not return is refused at the first call, with what it found
    bad = jpeft.make_train_step(loss_fn, opt, donate=False, accumulate_steps=2, loss_weight="tokens")
    with pytest.raises(jpeft.ConfigError, match=r"loss_weight='tokens'.*aux metrics are \['targets'\]"):
        bad(params, adapter, opt.init(adapter), data[0], key)
    with pytest.raises(jpeft.ConfigError, match=r"loss_weight='targets'.*aux metrics are \[\]"):
        accumulate_loss_and_grad(lambda p, a, b, k: loss_fn(p, a, b, k)[0], params, adapter, big, key, 1,
                                 loss_weight="targets")


def test_accumulation_errors():
    _, params, adapter, loss_fn = _tiny()
    with pytest.raises(jpeft.InputValidationError, match=r"accumulate_steps=3.*shape \(16, 9\).*multiple of 3"):
        accumulate_loss_and_grad(loss_fn, params, adapter, C.batches(1)[0], None, 3)
    with pytest.raises(jpeft.ConfigError, match="accumulate_steps must be a positive integer, found 0"):
        jpeft.make_train_step(loss_fn, optax.sgd(0.1), accumulate_steps=0)


# ------------------------------------------------------------------ rematerialization
_NO_REMAT: dict = {}


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_remat_same_gradients(policy):
    _, params, adapter, loss_fn = _tiny()
    _, _, _, loss_remat = C.setup(remat=policy)
    batch = C.batches(1)[0]
    if not _NO_REMAT:
        _NO_REMAT["out"] = jax.jit(lambda a: loss_and_grad(loss_fn, params, a, batch, None))(adapter)
    (l0, _), g0 = _NO_REMAT["out"]
    (l1, _), g1 = jax.jit(lambda a: loss_and_grad(loss_remat, params, a, batch, None))(adapter)
    assert abs(float(l0) - float(l1)) < 1e-6
    assert C.max_diff(g0, g1) < 1e-6
    assert float(optax.tree.norm(g1)) > 1e-3
    # remat is really in the program: the flag adds checkpoint primitives (LoRA's merged form has its
    # own, around the input's tangent, in both programs)
    jx = str(jax.make_jaxpr(lambda a: loss_and_grad(loss_remat, params, a, batch, None))(adapter))
    jx0 = str(jax.make_jaxpr(lambda a: loss_and_grad(loss_fn, params, a, batch, None))(adapter))
    assert jx.count("checkpoint") + jx.count("remat") > jx0.count("checkpoint") + jx0.count("remat")


def test_remat_policy_names():
    assert jpeft.remat_policy("full") is None
    assert jpeft.remat_policy("dots_saveable") is jax.checkpoint_policies.dots_saveable
    pol = jax.checkpoint_policies.nothing_saveable
    assert jpeft.remat_policy(pol) is pol
    with pytest.raises(jpeft.ConfigError, match=r"remat policy must be one of .*'dots_saveable'.*found 'fast'"):
        jpeft.remat_policy("fast")


# ------------------------------------------------------------------ mixed precision
def test_mixed_precision_bf16_base_f32_master():
    model, params, adapter, loss_fn = _tiny()
    base16 = jpeft.cast_base(params, jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(base16)} == {jnp.dtype(jnp.bfloat16)}
    assert jpeft.summary(base16, None, print_fn=None)["base"] == jpeft.summary(params, None, print_fn=None)["base"]
    lf16 = jpeft.with_precision(loss_fn, jnp.bfloat16)
    batch = C.batches(1)[0]
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(lf16, opt, donate=False)
    new, state, m = step(base16, adapter, opt.init(adapter), batch, None)
    assert m["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(new)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    g = jax.eval_shape(lambda a: loss_and_grad(lf16, base16, a, batch, None)[1], adapter)
    assert {x.dtype for x in jax.tree.leaves(g)} == {jnp.dtype(jnp.float32)}
    # the forward really runs in bfloat16 (matmuls on bf16 operands), and stays close to f32
    jx = str(jax.make_jaxpr(lambda a: lf16(base16, a, batch, None))(adapter))
    assert "dot_general" in jx and "bf16[" in jx
    l32 = float(jax.jit(loss_fn)(params, adapter, batch, None))
    assert abs(float(m["loss"]) - l32) / l32 < 2e-2
    # compute dtype is independent of storage: a bf16-stored base computed in f32
    lf32 = jpeft.with_precision(loss_fn, jnp.float32)
    jx32 = str(jax.make_jaxpr(lambda a: lf32(base16, a, batch, None))(adapter))
    assert "bf16[" in jx32  # the stored weights
    assert abs(float(jax.jit(lf32)(base16, adapter, batch, None)) - l32) / l32 < 2e-2


def test_with_precision_leaves_a_jpeft_models_compute_dtype():
    """jpeft's models compute in their config's dtype (docs/SCALING.md): with_precision casts
    the stored base, but an f32-configured Llama still runs its matmuls in float32, and a
    bf16-configured one in bfloat16; the LoRA branch follows the module's output dtype."""
    from jpeft.models import LlamaConfig, LlamaForCausalLM

    ids = jnp.arange(12).reshape(2, 6) % 32
    batch = {"ids": ids, "mask": jnp.ones_like(ids)}

    def dot_dtypes(model, params, compute):
        adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), params, jax.random.key(1))
        loss_fn = lambda p, a, b, k: jpeft.lm_loss(model, p, a, b["ids"], b["mask"])[0]  # noqa: E731
        jx = jax.make_jaxpr(jpeft.with_precision(loss_fn, compute))(params, adapter, batch, None)
        found = set()

        def walk(jaxpr):
            for e in jaxpr.eqns:
                if e.primitive.name == "dot_general":
                    found.add(jnp.dtype(e.outvars[0].aval.dtype))
                for sub in jax.core.jaxprs_in_params(e.params):
                    walk(sub)
        walk(jx.jaxpr)
        return found

    for dt, other in ((jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)):
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1,
                                             num_heads=2, dtype=dt))
        params = jpeft.cast_base(model.init(jax.random.key(0), ids), jnp.bfloat16)
        assert jnp.dtype(dt) in dot_dtypes(model, params, other)  # the config's dtype, not with_precision's
        if dt == jnp.float32:
            assert dot_dtypes(model, params, other) == {jnp.dtype(jnp.float32)}


def test_precision_errors():
    with pytest.raises(jpeft.ConfigError, match=r"compute_dtype must be a floating dtype.*int32"):
        jpeft.with_precision(lambda *a: 0.0, jnp.int32)
    with pytest.raises(jpeft.ConfigError, match=r"cast_base: dtype must be a floating dtype"):
        jpeft.cast_base({"w": jnp.ones(2)}, "int8")


# ------------------------------------------------------------------ multi-process helpers
def test_process_slices_and_batches():
    assert dist.process_slice(12, index=2, count=3) == slice(8, 12)
    with pytest.raises(jpeft.InputValidationError, match=r"12 rows cannot be split evenly over 5 processes"):
        dist.process_slice(12, index=0, count=5)
    b = {"tokens": np.arange(24).reshape(12, 2)}
    np.testing.assert_array_equal(dist.host_local_batch(b, index=1, count=3)["tokens"], b["tokens"][4:8])
    mesh = jpeft.make_mesh()
    g = dist.global_batch(b, mesh)
    np.testing.assert_array_equal(np.asarray(g["tokens"]), b["tokens"])
    assert g["tokens"].sharding == jpeft.shard_batch(b, mesh)["tokens"].sharding
    assert dist.gather(g)["tokens"].tolist() == b["tokens"].tolist()


def test_initialize_arguments():
    info = dist.initialize()  # no coordinator, no cluster: a single-process run, nothing joined
    assert info == {"process_index": 0, "process_count": 1, "local_devices": 1, "global_devices": 1}
    assert dist.is_main_process()
    with pytest.raises(jpeft.errors.DistributedError, match=r"also give num_processes and process_id"):
        dist.initialize("127.0.0.1:1234")
    with pytest.raises(jpeft.errors.DistributedError, match=r"need a coordinator_address"):
        dist.initialize(num_processes=2, process_id=1)
    # forced auto-detection outside a cluster says so (in a subprocess: it calls jax.distributed)
    env = {k: v for k, v in os.environ.items() if k not in dist._CLUSTER_ENV}
    r = subprocess.run([sys.executable, "-c", "from jpeft import distributed as d; d.initialize(auto=True)"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "cluster auto-detection found no cluster" in r.stderr, r.stderr[-2000:]
    # JAX's refusal of an out-of-range process id, quoted once: its message ends in a period, and the fix followed
    # it after another one ("...num_processes=2.. Check that")
    r = subprocess.run([sys.executable, "-c", "from jpeft import distributed as d; d.initialize('127.0.0.1:1', 2, 5)"],
                       capture_output=True, text=True, timeout=120, env=env)
    line = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and "process_id=5, num_processes=2. Check that every process uses" in line, line


_SPLIT_READ_WORKER = r"""
import sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
import jpeft
from jpeft.errors import ShardingError
from jpeft.tree import host_array
mesh = jax.make_mesh((2,), ("d",))
me = jax.process_index()
split = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full((2, 3), me, np.int32), (4, 3))
rep = jax.make_array_from_process_local_data(NamedSharding(mesh, P()), np.arange(3, dtype=np.int32), (3,))
out = [host_array(rep).tolist(), jpeft.distributed.gather({"w": split})["w"][:, 0].tolist()]
for read in (lambda: host_array(split), lambda: jpeft.io.content_hash({"w": split}),
             lambda: jpeft.validate.check_token_ids(split, 10)):
    try:
        read()
        out.append("read")
    except ShardingError as e:
        out.append("ShardingError" if "jpeft.distributed.gather" in str(e) else str(e))
print("OUT", out, flush=True)
jax.distributed.shutdown()
"""


def test_host_reads_of_an_array_split_across_processes_are_refused_by_name():
    """A host read (a content hash, a token check, ``tree.host_array``) of an array split across
    processes raised JAX's raw RuntimeError; it is a ShardingError naming ``gather``. A replicated
    array is read from this process's copy, and ``gather`` reads the split one whole."""
    port = C.free_port()
    outs, _ = C.run_processes([[sys.executable, "-c", _SPLIT_READ_WORKER, str(port), str(i)] for i in range(2)],
                              env=_env(1))
    want = "OUT " + str([[0, 1, 2], [0, 0, 1, 1]] + ["ShardingError"] * 3)
    assert all(want in o for o in outs), "\n----\n".join(o[-3000:] for o in outs)


_STREAMED_SAVE_WORKER = r"""
import sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
sys.path.insert(0, "tests")
import numpy as np
import jpeft
from jpeft import distributed as dist
from _models_tiny import randomize_adapter
sys.path.insert(0, "tests/helpers")
import ckpt_common as C
params = C.params()
adapter = randomize_adapter(jpeft.init(jpeft.FullFinetuneConfig(), params, jax.random.key(1)), seed=3)
mesh = jpeft.make_mesh(fsdp=2)
split = jpeft.shard_adapter(adapter, mesh, jpeft.shard_params(params, mesh))
leaves = jax.tree.leaves(split)
print("SPLIT", sum(not x.is_fully_addressable for x in leaves), len(leaves), flush=True)
# process 0 writes; a process 0 that cannot write (a file where its folder goes) still takes part in every gather
for out in (sys.argv[3], sys.argv[3] + "/jpeft_adapter.json/x"):
    try:
        print("SAVED", jpeft.save_adapter(out, jpeft.FullFinetuneConfig(), split, params=params, gather=dist.gather_array),
              flush=True)
    except jpeft.errors.SaveError as e:
        print("SAVE_ERROR", str(e)[:33], flush=True)
jax.distributed.shutdown()
"""


def test_a_model_split_across_processes_is_written_one_array_at_a_time(tmp_path):
    """``jpeft train`` gathered a full fine-tuning's whole model to the host of every process
    before process 0 wrote it. ``save_adapter(gather=jpeft.distributed.gather_array)`` gathers one
    array at a time, every process in the same order, process 0 writing each before the next:
    the file is byte for byte one process's save of the same (random) model, the other process
    writes nothing, and a process 0 that cannot write still takes part in every gather (the
    other does not hang) and raises its SaveError."""
    here = os.path.dirname(__file__)
    sys.path[:0] = [here, os.path.join(here, "helpers")]
    import ckpt_common
    from _models_tiny import randomize_adapter

    port = C.free_port()
    out = tmp_path / "full"
    outs, codes = C.run_processes([[sys.executable, "-c", _STREAMED_SAVE_WORKER, str(port), str(i), str(out)]
                                   for i in range(2)], env=_env(1), timeout=120)
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    lines = [[ln for ln in o.splitlines() if ln.split(" ")[0] in ("SPLIT", "SAVED", "SAVE_ERROR")] for o in outs]
    assert lines[0][0] == lines[1][0] and lines[0][0] != "SPLIT 0 " + lines[0][0].split()[-1], lines  # really split
    assert lines[0][1:] == [f"SAVED {out}", "SAVE_ERROR cannot create a directory next to"], lines[0]
    assert lines[1][1:] == ["SAVED None", "SAVED None"], lines[1]
    params = ckpt_common.params()
    cfg = jpeft.FullFinetuneConfig()
    ref = jpeft.save_adapter(tmp_path / "one", cfg, randomize_adapter(jpeft.init(cfg, params, jax.random.key(1)), seed=3),
                             params=params)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
    assert sorted(os.listdir(tmp_path)) == ["full", "one"]


_TIED_HEAD_WORKER = r"""
import sys
import jax
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
import jpeft
from jpeft.models import loading
rows, real = [], loading._read_slice
def counting(fname, name, spans, index):  # the rows of the stored head this process reads (the check alone reads it)
    block = real(fname, name, spans, index)
    rows.extend(range(index[0].start, index[0].stop) if name == "lm_head.weight" else ())
    return block
loading._read_slice = counting
for folder in sys.argv[3:]:
    rows.clear()
    try:
        jpeft.models.from_pretrained(folder, mesh=jpeft.make_mesh(data=1, fsdp=2))
        print("LOADED", min(rows), max(rows), len(rows), flush=True)
    except jpeft.errors.CheckpointError as e:
        print("REFUSED", min(rows), max(rows), len(rows), e, flush=True)
"""


def test_the_tied_head_check_of_a_two_process_load_reads_each_processs_rows_and_agrees(tmp_path):
    """A tied checkpoint that also stores ``lm_head.weight``: each process of a load over a mesh
    across processes compared both whole vocabulary tables; now each compares its half of the
    rows and one gather tells both the result. The copy loads on both; a head that differs in one
    row, of process 1's half or of process 0's, is refused on BOTH with the same message."""
    from safetensors.numpy import load_file, save_file

    cfg = jpeft.models.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                   num_kv_heads=1, tie_word_embeddings=True)
    model = jpeft.models.LlamaForCausalLM(cfg)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                          jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 4), np.int32)))
    folders = []
    for name, row in (("copy", None), ("row_of_process_1", 50), ("row_of_process_0", 3)):
        folder = tmp_path / name
        jpeft.models.save_pretrained(str(folder), model, params)
        w = load_file(folder / "model.safetensors")
        head = w["model.embed_tokens.weight"].copy()
        if row is not None:
            head[row, 5] += 1e-3
        save_file({**w, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
        folders.append(str(folder))
    port = C.free_port()
    outs, codes = C.run_processes([[sys.executable, "-c", _TIED_HEAD_WORKER, str(port), str(i), *folders]
                                   for i in range(2)], env=_env(1), timeout=120)
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    got = [[ln for ln in o.splitlines() if ln.startswith(("LOADED", "REFUSED"))] for o in outs]
    # process 0 reads rows 0-31 of the stored head, process 1 rows 32-63 (both read all 64 before)
    assert [ln.split()[:4] for ln in got[0]] == [["LOADED", "0", "31", "32"]] + [["REFUSED", "0", "31", "32"]] * 2, got
    assert [ln.split()[:4] for ln in got[1]] == [["LOADED", "32", "63", "32"]] + [["REFUSED", "32", "63", "32"]] * 2, got
    for a, b, folder in zip(got[0][1:], got[1][1:], folders[1:]):
        msg = a.split(" ", 4)[4]
        assert msg == b.split(" ", 4)[4] and msg.startswith(f"config.json in {folder!r} says tie_word_embeddings=true, "
                                                            "but the weights also hold an lm_head.weight that differs")


_USER_SCRIPT = r"""
import sys
from jpeft import distributed as dist
port, me, fail = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.initialize(f"127.0.0.1:{port}", 2, me)  # docs/SCALING.md's pattern, as a user writes it
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np, optax
import jpeft
model = nn.Dense(4)
mesh = jpeft.make_mesh()
params = jpeft.shard_params(model.init(jax.random.key(0), jnp.zeros((1, 8))), mesh)
adapter = jpeft.shard_adapter(jpeft.init(jpeft.LoraConfig(r=2, target_modules=".*"), params, jax.random.key(1)), mesh,
                              params)
opt = optax.sgd(1e-2)
loss_fn = lambda p, a, b, k: jnp.mean((jpeft.apply(model, p, a, b["x"]) - 1.0) ** 2)
step = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
def batches():
    for i in range(4):
        if fail == "bad_batch" and i == 2:  # this host's rows cannot be read
            raise ValueError("row 2 of this host's data file is damaged")
        yield dist.global_batch(dist.host_local_batch({"x": np.full((4, 8), i, np.float32)}), mesh)
result = jpeft.fit(step, params, adapter, jpeft.init_opt_state(opt, adapter), batches(), key=jax.random.key(2))
host = dist.gather(result.adapter)
def save(tree):
    if fail == "full_disk":
        raise OSError(28, "No space left on device")
dist.on_main_process(save, host)
print("finished", flush=True)
"""


@pytest.mark.parametrize("case", ["full_disk", "bad_batch"])
def test_a_users_two_process_script_ends_both_processes_when_one_fails(tmp_path, case):
    """A user's own script built on the helpers docs/SCALING.md teaches (``initialize``,
    ``global_batch``, ``jpeft.fit``, ``gather``, ``on_main_process``), run as two processes,
    one of which raises an exception it does not catch: process 0's write in
    ``on_main_process`` (a full disk), or process 1's data in the middle of ``fit``. The other
    process used to wait for it in the next barrier or step (over 150 s measured, killed), while
    the failing one waited in ``jax.distributed``'s shutdown and then aborted with a C++ stack.
    Now the failing process prints its traceback and ends with status 1, and the other ends
    with one ``DistributedError`` line naming it (``initialize``'s ``fail_together``)."""
    who = 0 if case == "full_disk" else 1
    port = C.free_port()
    outs, codes = C.run_processes([[sys.executable, "-c", _USER_SCRIPT, str(port), str(i), case if i == who else ""]
                                   for i in range(2)], env=_env(1), timeout=150)
    assert codes == [1, 1], "\n----\n".join(o[-3000:] for o in outs)
    error = {"full_disk": "OSError: [Errno 28] No space left on device",
             "bad_batch": "ValueError: row 2 of this host's data file is damaged"}[case]
    mine, other = outs[who].splitlines(), outs[1 - who].splitlines()
    assert "Traceback (most recent call last):" in mine and mine[-1] == error, outs[who]
    assert other[-1].startswith(f"jpeft.errors.DistributedError: process {who} of this job stopped: {error}; this "
                                "process stops too"), outs[1 - who]
    assert "Traceback" not in outs[1 - who] and "finished" not in outs[0] + outs[1]


_JOIN_ALONE = """
import socket, sys
from jpeft import distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.initialize(f"127.0.0.1:{port}", 2, int(sys.argv[1]), initialization_timeout=3)
print("joined")
"""


def _outputs(procs) -> list:
    """Each process's ``(stdout, stderr)``, waiting up to 120 s; any process still running is killed."""
    try:
        return [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_a_process_whose_peers_never_join_stops_with_one_line():
    """Process 0 started alone (process 1 never started, or given another port), and process 1
    started with no coordinator listening: JAX's client gave up at its initialization_timeout
    and aborted each with a C++ stack ("Terminating process because the JAX distributed service
    detected fatal errors ... DEADLINE_EXCEEDED", SIGABRT, status 134; after 300 s by default),
    which no Python code can catch; the same happened to the process left waiting when two were
    given the same process id. Each now ends just before, with one DistributedError line that
    says what to check, status 1."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    procs = [subprocess.Popen([sys.executable, "-c", _JOIN_ALONE, str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    outs = _outputs(procs)
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 1 and "joined" not in out, err[-3000:]
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            "jpeft.errors.DistributedError: not every process of this job joined it within initialization_timeout = "
            f"3 s (process {i} of 2, coordinator 127.0.0.1:"), err[-3000:]
        assert "two were given the same process id" in lines[0]


_JOIN_TWICE = """
import sys
from jpeft import distributed as dist
dist.initialize(f"127.0.0.1:{sys.argv[1]}", 3, int(sys.argv[2]), initialization_timeout=10)
print("joined")
"""


def test_two_processes_given_the_same_process_id_end_with_one_line_each():
    """Processes 0, 1 and 1 again of a job of 3: the coordination service refuses one of the two
    registrations of id 1 and JAX's client aborted that process at once with a C++ stack (SIGABRT,
    status 134, "ALREADY_EXISTS: Aborted connect attempt as there is a request from a newer
    incarnation"), no line naming the process id. It now ends, after JAX's lines, with one
    DistributedError line naming the duplicated id and the fix, status 1; the others end at the
    join timeout with theirs."""
    port = C.free_port()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")  # JAX's own reason stays visible above jpeft's line
    procs = [subprocess.Popen([sys.executable, "-c", _JOIN_TWICE, str(port), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1, 1)]
    outs = _outputs(procs)
    last = [([ln for ln in err.splitlines() if ln.strip()] or [""])[-1] for _, err in outs]
    assert [p.returncode for p in procs] == [1, 1, 1] and not any("joined" in o for o, _ in outs), \
        "\n----\n".join(err[-3000:] for _, err in outs)
    assert all(ln.startswith("jpeft.errors.DistributedError: ") for ln in last), last
    aborted = [ln for ln in last if "aborted this process while it joined the job (process 1 of 3" in ln]
    assert len(aborted) == 1, last
    assert "another process was started with the same process id 1 (jpeft train: --process-id)" in aborted[0]


def test_an_error_typed_at_one_processs_prompt_ends_no_process():
    """Two processes joined by ``initialize`` (``fail_together`` by default) at Python's
    interactive prompt (``python -i``), as one explores a job by hand: a typo at process 1's
    prompt ended both processes with status 1 (``sys.excepthook`` announced it as a process
    stopping), losing both sessions. The prompt prints the error and goes on, as Python does:
    both then meet in a collective operation and exit normally."""
    port = C.free_port()
    init = f"from jpeft import distributed as dist; dist.initialize('127.0.0.1:{port}', 2, %d)"
    after = ("from jax.experimental import multihost_utils\n"
             "multihost_utils.sync_global_devices('after_the_typo'); print('synced', flush=True)\n")
    outs, codes = C.run_processes([[sys.executable, "-i", "-c", init % i] for i in range(2)], env=_env(1), timeout=150,
                                  stdin=[after, "undefined_name\n" + after])
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    assert "NameError: name 'undefined_name' is not defined" in outs[1], outs[1]
    assert all("synced" in o and "DistributedError" not in o for o in outs), "\n----\n".join(outs)


def test_two_processes_match_one(tmp_path):
    steps = 10
    args = ["--steps", str(steps), "--fsdp", "2", "--width", str(C.WIDTH), "--layers", str(C.LAYERS),
            "--seq-len", str(C.SEQ), "--global-batch", str(C.BATCH), "--rank", str(C.RANK),
            "--out", str(tmp_path), "--write-every-process", "--log-every", "0"]
    port = C.free_port()
    outs, codes = C.run_processes([[sys.executable, C.SCRIPT, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                    "2", "--process-id", str(i)] + args for i in range(2)], env=_env(2), timeout=600)
    assert codes == [0, 0], "\n----\n".join(o[-3000:] for o in outs)
    infos = [json.load(open(tmp_path / f"losses.process{i}.json")) for i in range(2)]
    assert [i["process_index"] for i in infos] == [0, 1]
    assert all(i["process_count"] == 2 and i["global_devices"] == 4 for i in infos)
    a0, a1 = (dict(np.load(tmp_path / f"adapter.process{i}.npz")) for i in range(2))
    assert sorted(a0) == sorted(a1) and len(a0) == 10
    for k in a0:
        np.testing.assert_array_equal(a0[k], a1[k])  # identical on both processes
    assert infos[0]["losses"] == infos[1]["losses"]
    # every process took part in jpeft.save_adapter (one array gathered at a time), process 0 wrote it
    assert (tmp_path / "jpeft_adapter.json").exists() and (tmp_path / "jpeft_adapter.safetensors").exists()
    # a single-process run on the same global batches
    s = C.script()
    _, params, adapter, loss_fn = C.setup()
    opt = s.make_optimizer("adam", 1e-2)
    ref_losses, ref = C.single_device_run(loss_fn, opt, params, adapter, C.batches(steps))
    assert np.max(np.abs(np.array(infos[0]["losses"]) - np.array(ref_losses))) < 1e-5
    cfg, saved = jpeft.load_adapter(tmp_path, params)  # the base's fingerprint matches the script's base
    assert cfg == s.lora_config(C.RANK) and sorted(saved) == sorted(ref)
    for path, node in ref.items():
        np.testing.assert_allclose(a0[f"{path}.lora_A"], np.asarray(node.lora_A), atol=1e-5, rtol=0)
        np.testing.assert_allclose(a0[f"{path}.lora_B"], np.asarray(node.lora_B), atol=1e-5, rtol=0)
        np.testing.assert_array_equal(np.asarray(saved[path].lora_A), a0[f"{path}.lora_A"])
        np.testing.assert_array_equal(np.asarray(saved[path].lora_B), a0[f"{path}.lora_B"])
    assert max(float(np.abs(np.asarray(n.lora_B)).max()) for n in ref.values()) > 1e-3  # it trained


# ------------------------------------------------------------------ TPU launch script
def test_tpu_dry_run_prints_the_command_sequence():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "tpu", "launch_pod.sh"), "--dry-run", "--name", "jpeft-ci", "--zone", "europe-west4-a",
         "--accelerator-type", "v5litepod-16", "--project", "proj-1", "--out", "out dir", "--",
         "--steps", "7", "--fsdp", "4"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(l) for l in proc.stdout.strip().splitlines()]
    tpu = [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]]
    assert [c[4] for c in tpu] == ["create", "scp", "ssh", "ssh", "scp", "delete"]
    for c in tpu:
        assert c[5] == "jpeft-ci" or c[4] == "scp"
        assert c[c.index("--zone") + 1] == "europe-west4-a" and c[c.index("--project") + 1] == "proj-1"
    create, copy, setup, train, gather, delete = tpu
    assert create[create.index("--accelerator-type") + 1] == "v5litepod-16" and "--version" in create
    assert copy[-1] == "--worker=all" and copy[5:7] == ["/tmp/jpeft-ci-jpeft.tar.gz", "jpeft-ci:jpeft.tar.gz"]
    assert "--worker=all" in setup and "pip install" in setup[setup.index("--command") + 1]
    run = train[train.index("--command") + 1]
    assert "--worker=all" in train
    assert shlex.split(run)[3:] == ["python3", "tpu/train_multihost.py", "--cluster-auto", "--out",
                                   "/tmp/jpeft_adapter", "--steps", "7", "--fsdp", "4"]
    assert "--worker=0" in gather and gather[gather.index("--recurse") + 2] == "out dir/"
    assert delete[-1] == "--quiet"
    # the archive is made before it is copied, the local folder before the gather
    order = [c[0] for c in cmds]
    assert order.index("git") < [i for i, c in enumerate(cmds) if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]][0]
    assert ["mkdir", "-p", "out dir"] in cmds
    # the training command it runs exists and documents itself
    help_ = subprocess.run([sys.executable, C.SCRIPT, "--help"], capture_output=True, text=True, timeout=120)
    assert help_.returncode == 0 and "--cluster-auto" in help_.stdout and "--fsdp" in help_.stdout


def test_pod_scripts_run_jpeft_train_on_a_config():
    """launch_pod.sh --config and slurm_gpu.sbatch run `jpeft train --cluster-auto` on the
    example Llama configs, which resolve (paths, [mesh], method) with the CLI's own checks."""
    from jpeft.cli.train_cmd import _load_toml, resolve_config

    cfg = os.path.join(ROOT, "tpu", "llama_tpu.toml")
    proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "launch_pod.sh"), "--dry-run", "--name", "llama-ci",
                           "--config", cfg, "--run-dir", "/mnt/gcs/runs/x", "--", "--set", "train.steps=5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    cmds = [shlex.split(l) for l in proc.stdout.strip().splitlines()]
    copy = next(c for c in cmds if c[4:5] == ["scp"] and c[5] == cfg)
    assert copy[6] == "llama-ci:jpeft-config.toml" and "--worker=all" in copy
    train = next(c for c in cmds if c[4:5] == ["ssh"] and "jpeft.cli" in c[c.index("--command") + 1])
    assert shlex.split(train[train.index("--command") + 1])[3:] == [
        "python3", "-m", "jpeft.cli", "train", "--config", "../jpeft-config.toml", "--cluster-auto", "--no-progress",
        "--output-dir", "/mnt/gcs/runs/x", "--set", "train.steps=5"]
    gather = next(c for c in cmds if "--recurse" in c)
    assert gather[gather.index("--recurse") + 1] == "llama-ci:/mnt/gcs/runs/x/adapter/*"
    env = dict(os.environ, DRY_RUN="1", CONFIG="tpu/llama_gpu.toml", RUN_DIR="/shared/r", SLURM_JOB_ID="7")
    proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "slurm_gpu.sbatch")], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == ["srun", "--kill-on-bad-exit=1", "python", "-m", "jpeft.cli", "train", "--config",
                                        "tpu/llama_gpu.toml", "--cluster-auto", "--no-progress", "--output-dir", "/shared/r"]
    for name, ways in (("llama_tpu.toml", 16), ("llama_gpu.toml", 16)):
        path = os.path.join(ROOT, "tpu", name)
        c = resolve_config(_load_toml(path), base_dir=os.path.dirname(path))
        assert c["mesh"]["data"] * c["mesh"]["fsdp"] == ways and c["train"]["batch_size"] % ways == 0
        assert c["method"]["target_modules"][-1] == "down_proj" and c["model"].endswith("Llama-3.1-8B")


def test_tpu_launch_rejects_bad_input():
    proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "launch_pod.sh"), "--dry-run", "--name", "Bad_Name"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "not a valid TPU name" in proc.stderr
    proc = subprocess.run(["bash", os.path.join(ROOT, "tpu", "launch_pod.sh"), "--bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option '--bogus'" in proc.stderr


def test_remat_flag_of_jpeft_models_same_gradients():
    """jpeft's Llama with ``remat=True`` (each decoder layer under jax.checkpoint) trains the
    same adapter gradients as without, and FSDP specs work on its parameter tree."""
    from jpeft.models import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=1, max_position_embeddings=16)
    tokens = jnp.asarray(C.batches(1, batch=4, seq=8)[0]["tokens"] % 64)
    model = LlamaForCausalLM(cfg)
    params = model.init(jax.random.key(0), tokens[:, :-1])
    adapter = jpeft.init(jpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_weights="random"),
                         params, jax.random.key(1))

    def make_loss(m):
        def loss_fn(params, adapter, batch, key):
            logits = jpeft.apply(m, params, adapter, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return loss_fn

    ref = jax.jit(lambda a: loss_and_grad(make_loss(model), params, a, tokens, None))(adapter)
    remat_model = LlamaForCausalLM(cfg.replace(remat=True, remat_policy="dots_saveable"))
    f = lambda a: loss_and_grad(make_loss(remat_model), params, a, tokens, None)
    got = jax.jit(f)(adapter)
    assert abs(float(ref[0][0]) - float(got[0][0])) < 1e-6
    assert C.max_diff(ref[1], got[1]) < 1e-6 and float(optax.tree.norm(got[1])) > 1e-4
    jx = str(jax.make_jaxpr(f)(adapter))
    assert "checkpoint" in jx or "remat" in jx
    specs = jpeft.param_specs(params, AbstractMesh((2, 2), ("data", "fsdp")))
    q = specs["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert q == P("fsdp")
    a_specs = jpeft.adapter_specs(adapter, specs)
    assert a_specs["model/layers_0/self_attn/q_proj"].lora_A == P("fsdp", None)


def test_init_does_not_depend_on_params_key_order():
    """Params created under jax.jit (as a sharded base is) come back with sorted dict keys;
    the adapter must be the same as for the eagerly created params (core fix, issue 5)."""
    _, params, adapter, _ = C.setup()
    reordered = jax.jit(lambda p: p)(params)
    assert list(reordered["params"]["layers_0"]) != list(params["params"]["layers_0"])
    again = jpeft.init(C.script().lora_config(C.RANK), reordered, jax.random.key(1))
    assert sorted(again) == sorted(adapter)
    assert C.max_diff({k: adapter[k] for k in sorted(adapter)}, {k: again[k] for k in sorted(again)}) == 0.0


def test_sharded_step_refuses_unplaced_base():
    _, params, adapter, loss_fn = _tiny()
    mesh = jpeft.make_mesh()
    opt = optax.sgd(0.1)
    a = jpeft.shard_adapter(adapter, mesh, jpeft.param_specs(params, mesh))
    step = jpeft.make_sharded_train_step(loss_fn, opt, mesh)
    host_params = jax.tree.map(np.asarray, params)
    with pytest.raises(jpeft.errors.ShardingError, match=r"frozen base is not placed on the step's mesh.*jpeft.shard_params"):
        step(host_params, a, jpeft.init_opt_state(opt, a), C.batches(1)[0], None)


# ------------------------------------------------------------ sharded Hugging Face loading
def test_a_column_block_is_read_without_the_bytes_between_its_runs(tmp_path, monkeypatch):
    """The block of a kernel split by the file's columns (``q_proj``, ``down_proj`` under the
    default fsdp rule) is one short run per row; each process must ask the file for those runs
    only. A buffered file read a whole buffer at every seek: a 64-column block of a 1024 x 1024
    float32 tensor (256 KiB) read 4 MiB, the whole tensor, as would a 4096-wide bf16 kernel
    over fsdp=8 read 4x its block. Counted at the raw file object (what the OS is asked for)."""
    import builtins
    import io

    from safetensors.numpy import save_file

    from jpeft.io import safetensors_index
    from jpeft.models import loading

    w = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    path = str(tmp_path / "w.safetensors")
    save_file({"w": w}, path)
    asked = []

    class Counting(io.FileIO):
        def readinto(self, b):
            n = super().readinto(b)
            asked.append(n or 0)
            return n

    def counting_open(file, mode="r", buffering=-1, **kw):
        if file != path:
            return builtins.open(file, mode, buffering, **kw)
        raw = Counting(file, "rb")
        return raw if buffering == 0 else io.BufferedReader(raw, io.DEFAULT_BUFFER_SIZE)

    monkeypatch.setattr(loading, "open", counting_open, raising=False)
    spans = safetensors_index(path)[0]
    for cols in (slice(0, 64), slice(960, 1024), slice(512, 1024)):
        asked.clear()
        block = loading._read_slice(path, "w", spans, (slice(None), cols))
        np.testing.assert_array_equal(block, w[:, cols])
        assert sum(asked) == block.nbytes, (cols, sum(asked), block.nbytes)
    asked.clear()  # a row block is one contiguous run
    np.testing.assert_array_equal(loading._read_slice(path, "w", spans, (slice(256, 512),)), w[256:512])
    assert sum(asked) == 256 * 1024 * 4


def test_from_pretrained_on_a_mesh_reads_only_its_shards(tmp_path):
    """`from_pretrained(path, mesh=...)` on 4 emulated devices (data=2 x fsdp=2): every leaf in
    the sharding `param_shardings` gives, each device holding exactly its block of the weight,
    logits equal to the ordinary load, and every fsdp-sharded weight read from the file in
    blocks (never the whole tensor) -- for one file, a sharded folder (index.json), bf16 and
    the layer-scanned layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    hf = LlamaForCausalLM(cfg)
    hf.save_pretrained(tmp_path / "single")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_load_worker.py"), str(tmp_path / "single"),
                           str(tmp_path / "sharded")], env=_env(4), cwd=HERE, capture_output=True, text=True,
                          timeout=600)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("JSON:")]
    assert proc.returncode == 0 and lines, f"worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    got = json.loads(lines[-1][5:])
    assert got["devices"] == 4
    for tag in ("f32", "index", "bf16", "scan", "tensor"):
        r = got[tag]
        assert r["bad_sharding"] == [] and r["bad_values"] == [], (tag, r)
        assert r["sharded_leaves"] == r["leaves"], (tag, r)  # every weight of this model splits over fsdp=2
        assert r["partial_reads"] == r["reads"] > 0, (tag, r)  # no read of a whole tensor
        if tag != "tensor":  # each of the 4 devices read its half of every weight: once per data replica
            assert r["bytes_read"] == 2 * r["bytes_in_files"], (tag, r)
        else:  # matmul weights in quarters (read once), norms in halves over fsdp (once per tensor rank)
            assert r["bytes_in_files"] < r["bytes_read"] < 1.1 * r["bytes_in_files"], (tag, r)
        # the weights are bitwise equal (above); the logits differ by the sharded matmuls' summation order
        assert r["logits_diff"] <= (1e-5 if tag != "bf16" else 0.05), (tag, r)
    t = got["tensor_specs"]  # Megatron: q column-split, o row-split, embedding by vocabulary
    assert t["q_proj"] == ["fsdp", "tensor"] and t["o_proj"] == ["tensor", "fsdp"] and t["embed"] == ["tensor", "fsdp"]
    # LoRA follows: q's B split by columns over tensor, o's A by rows over tensor (no gather of the base)
    assert t["q_lora"] == [["fsdp", None], [None, "tensor"]] and t["o_lora"] == [["tensor", None], [None, "fsdp"]]
