"""The ``adapter_config.json`` key checks of ``jpeft.hf``: the keys every format reads are checked
there, a method's own keys by its ``Method.check_hf_keys`` (LoRA's in ``jpeft/methods/lora_hf.py``),
and every method's check runs on every file (AdaLoRA's and VeRA's files carry LoRA's keys too)."""

from __future__ import annotations

import ast
import json
import pathlib

import pytest

import jpeft
from jpeft.errors import LoadError

ROOT = pathlib.Path(__file__).resolve().parents[1] / "jpeft"


@pytest.mark.parametrize("peft_type, key, value, message", [
    ("LORA", "r", "8", r"'r' must be an integer, found str 8\."),
    ("LORA", "use_dora", 1, r"'use_dora' must be true/false or null, found int 1\."),
    ("LORA", "lora_alpha", float("inf"), r"'lora_alpha' must be a positive finite number, found inf"),
    ("VERA", "lora_alpha", 0, r"'lora_alpha' must be a positive finite number, found 0"),
    ("ADALORA", "rank_pattern", {"q_proj": [True, 1]}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ("LORA", "alpha_pattern", {"q_proj": -2.0}, r"alpha_pattern\['q_proj'\] must be a positive finite number"),
    ("IA3", "fan_in_fan_out", "yes", r"'fan_in_fan_out' must be true/false or null, found str yes\."),
    ("LOHA", "target_modules", 3, r"'target_modules' must be a string or a list or null, found int 3\."),
])
def test_wrongly_typed_keys_are_refused_by_name(tmp_path, peft_type, key, value, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": peft_type, key: value}))
    with pytest.raises(LoadError, match=rf"adapter_config\.json: {message}"):
        jpeft.hf.peft_config(str(tmp_path))


def test_hf_py_names_no_method_s_keys():
    """``jpeft/hf.py`` is method-neutral: no string it uses (docstrings aside) names LoRA's PEFT
    keys, settings or the PEFT types LoRA covers; they live in ``jpeft/methods/lora_hf.py`` and
    reach ``jpeft.hf`` through LoRA's ``Method`` record (``check_hf_keys``, ``hf_base``,
    ``peft_hints``)."""
    tree = ast.parse((ROOT / "hf.py").read_text())
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
               and id(n) not in docs]
    lora = ("lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern",
            "init_lora_weights", "TRAINABLE_TOKENS", "trainable_token_indices")
    found = sorted({w for s in strings for w in lora if w in s})
    assert found == [], found
