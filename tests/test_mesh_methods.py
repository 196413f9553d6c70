"""Every method trained on a mesh equals one device: each case of tests/test_properties.py's table
(``CASES``, so a method added there is covered here too) trained for 3 AdamW steps from a random
adapter on one device, on a 2 x 4 (data x fsdp) mesh and on a 2 x 2 x 2 (data x fsdp x tensor) mesh
with ``jpeft.tensor_parallel_rules()``, then saved from the mesh and loaded on one device.

One subprocess with eight emulated CPU devices (tests/_mesh_methods_worker.py; XLA_FLAGS must be set
before JAX is imported) imports the table and runs them all; the tests read its numbers, each test
over every case (the table is not imported here: building it compiles its models).

Tolerances: the mesh runs compute the same float32 sums in another order (the batch mean over 8
shards, the fsdp and tensor axes' partial matmul sums all-reduced), which moves a loss of ~3.5 by a
few of its float32 steps (2.4e-7 each): 1.4e-6 measured, 1e-5 allowed; an adapter entry after 3
AdamW steps of lr 1e-2 (each entry moves by up to 3e-2) by 2.7e-7 measured, 1e-5 allowed; Adam's
moments and AdaLoRA's sensitivity averages, relative to each array's largest entry, 9.8e-6 measured
(a second moment is a square: it doubles the gradient's relative error, and an entry near 0 keeps
its absolute error), 1e-4 allowed. The moments are compared because Adam's update is not: it
divides the gradient by its own scale, so a gradient off by a constant factor would move the
adapter alike (measured with the mesh step's gradient divided by 8: LoRA's adapter 7e-6 from one
device's, inside its tolerance; its moments 0.98 of their size). A wrong reduction (one shard's
gradient, a mean over the wrong rows, a per-shard AdaLoRA ranking) is off by the size of the
gradient, orders above these.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "helpers"))
import ckpt_common  # noqa: E402  (env: the environment of a worker on emulated CPU devices)

MESHES = ("2x4", "2x2x2")
# sites jpeft.adapter_specs replicates by design (docs/SCALING.md, "How the adapter is laid out"): their
# adapters are small vectors or blocks whose axes need not match the base's split; on the meshes their
# base is split and their gradient is still reduced over the 8 devices' rows
REPLICATED = {"ia3", "houlsby", "pfeiffer", "prefix", "prompt", "lokr", "lokr_both", "oft", "oft_block_share",
              "oft_coft"}


@pytest.fixture(scope="module")
def meshes(tmp_path_factory):
    out = tmp_path_factory.mktemp("mesh_methods")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_mesh_methods_worker.py"), str(out)],
                          env=ckpt_common.env(8), cwd=HERE, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JSON:")]
    assert proc.returncode == 0 and lines, f"worker failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][5:])


def test_every_method_of_the_table_ran_on_eight_devices(meshes):
    cases = meshes["cases"]
    assert len(cases) >= 26 and REPLICATED <= set(cases), sorted(cases)  # the table held 26 cases (audit round 28)
    # not trivial: every run moved the adapter by about 3 steps of lr (AdamW, lr 1e-2)
    assert {n: r["change"] for n, r in cases.items() if not r["change"] > 1e-2} == {}


def test_every_method_trained_on_a_mesh_equals_one_device(meshes):
    bad = {}
    for name, rec in meshes["cases"].items():
        for tag in MESHES:
            checks = {
                "base split": rec[f"{tag}/base_split"] > 0,  # the base really is split over fsdp (and tensor)
                # at least one adapter array split across devices (none for the replicated sites), kept split
                "adapter split": bool(rec[f"{tag}/split"]) != (name in REPLICATED),
                "kept split": rec[f"{tag}/split_after"] == rec[f"{tag}/split"],
                "loss": rec[f"{tag}/loss_diff"] < 1e-5,
                "adapter": rec[f"{tag}/adapter_diff"] < 1e-5,
                "optimizer state": rec[f"{tag}/opt_state_rel_diff"] < 1e-4,
            }
            failed = [what for what, ok in checks.items() if not ok]
            if failed:
                bad[f"{name} on {tag}"] = (failed, {k: v for k, v in rec.items() if k.startswith(tag)})
    assert bad == {}


def test_the_tensor_axis_splits_more_of_the_adapter_than_fsdp_alone(meshes):
    # a column-split layer's lora_B and a row-split layer's lora_A are split over tensor as well
    lora = meshes["cases"]["lora"]
    assert len(lora["2x2x2/split"]) > len(lora["2x4/split"]) > 0, lora


def test_adaloras_allocation_on_a_mesh_keeps_the_triplets_one_device_keeps(meshes):
    """AdaLoRA's allocation ranks the triplets of every site against each other from sensitivity averages
    over the whole batch: on a mesh the same triplets are pruned (the table's schedule, shortened to
    allocate within the 3 steps, prunes one triplet of each module)."""
    rec = meshes["cases"]["adalora"]
    want = rec["single/rank_pattern"]
    assert want is not None and sum(not k for keep in want.values() for k in keep) > 0, want
    for tag in MESHES:
        assert rec[f"{tag}/rank_pattern"] == want, tag


def test_an_adapter_trained_on_a_mesh_saves_and_loads_on_one_device(meshes):
    """jpeft.save_adapter of the adapter trained on the 2 x 4 mesh (its arrays split across devices),
    jpeft.load_adapter on one device: the same tree and the same values, bit for bit."""
    bad = {n: (r["saved/same_tree"], r["saved/diff"]) for n, r in meshes["cases"].items()
           if not (r["saved/same_tree"] and r["saved/diff"] == 0.0)}
    assert bad == {}
