"""Loading (and saving) a local Hugging Face folder for the CLI: model, params, tokenizer."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jpeft.core import RoundingTally
from jpeft.errors import ConfigError, InputValidationError, SaveError
from jpeft.io import safetensors_index
from jpeft.tree import is_half_float
from jpeft.models import (LlamaForCausalLM, config_from_hf, from_pretrained, load_tokenizer, loading,
                          model_from_config as _m, read_config)


class Loaded(NamedTuple):
    model: Any          # a flax.linen Module
    params: Any         # its variables {"params": ...}
    tokenizer: Any      # a transformers tokenizer, or None
    folder: str
    hf_config: dict     # the folder's config.json


#: set by :func:`jpeft.cli.process_main`: this process runs the ``jpeft`` command alone
#: (:func:`import_transformers_without_torch`)
OWN_PROCESS = False


def import_transformers_without_torch() -> None:
    """In a ``jpeft`` process (:data:`OWN_PROCESS`), imports transformers' tokenizer classes with
    torch hidden, before the first tokenizer is read.

    jpeft reads a tokenizer with transformers, which imports torch whenever it is installed
    (its configuration modules do), although no tokenizer needs it and jpeft computes nothing
    with it: 2.4 of a process's ~5.5 s of CPU start-up (imports and the tokenizer), measured.
    ``sys.modules["torch"] = None`` makes ``importlib.util.find_spec("torch")``, transformers'
    test, answer that torch is absent while transformers is imported; transformers keeps that
    answer (``is_torch_available`` is cached) and says so once (its advisory notice, silenced
    here). torch itself stays importable afterwards (TensorBoard's writer, a user's module).
    Nothing is done when transformers or torch is imported already, or outside a ``jpeft``
    process: a program that calls :func:`jpeft.cli.main` may use transformers' torch models. A
    transformers that cannot be imported so is imported as usual later (only the time is lost)."""
    if not OWN_PROCESS or "transformers" in sys.modules or "torch" in sys.modules:
        return
    quiet = os.environ.get("TRANSFORMERS_NO_ADVISORY_WARNINGS")
    os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = "1"
    sys.modules["torch"] = None
    try:
        import transformers

        transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast  # the lazy names' modules, imported now
    except ImportError:  # a transformers that needs torch to import: forget the half import, read as without this
        for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
            del sys.modules[name]
    finally:
        del sys.modules["torch"]
        if quiet is None:
            os.environ.pop("TRANSFORMERS_NO_ADVISORY_WARNINGS", None)
        else:
            os.environ["TRANSFORMERS_NO_ADVISORY_WARNINGS"] = quiet


def read_tokenizer(folder: str):
    """The folder's tokenizer (:func:`jpeft.models.load_tokenizer`), read in a ``jpeft`` process
    with transformers imported without torch (:func:`import_transformers_without_torch`)."""
    import_transformers_without_torch()
    return load_tokenizer(folder)


#: a Hugging Face PEFT adapter's files, which ``merge --force`` removes from its output folder
PEFT_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # the base dtypes the commands take


def load_folder(folder: str, *, tokenizer: bool = True, scan_layers: bool = False, mesh=None, rules=None,
                quantize=None, dtype: str = "float32", untie: bool = False) -> Loaded:
    """Loads ``config.json`` + safetensors weights (+ the tokenizer) from a local folder;
    ``dtype``: ``"float32"`` or ``"bfloat16"``, the base's compute and storage dtype
    (``from_pretrained(dtype=...)``; adapters made on it are float32);
    ``scan_layers=True`` gives the layer-scanned variant (Llama family only); with ``mesh``
    every weight is read straight into its shard (``from_pretrained(..., mesh=mesh, rules=rules)``);
    ``untie=True`` reads a tied base with its own ``lm_head`` (a copy of the embedding, the same
    logits; ``from_pretrained(..., tie_word_embeddings=False)``), for an adapter of ``lm_head``
    (:func:`save_folder` then writes ``tie_word_embeddings: false``);
    ``quantize``: ``"nf4"`` | ``"int8"`` | ``"fp8"`` quantizes the linear kernels while reading
    (with ``mesh``: each process its own shards).

    Raises:
      LoadError: the folder is missing or is not a Hugging Face model folder.
      ConfigError: ``scan_layers`` for a model family without a scanned variant.
    """
    d = read_config(folder)
    if scan_layers:
        # checked from config.json, before loading: from_pretrained would refuse the override with a ConfigError
        # about GPT2Config's fields that does not name the setting
        llama = loading.model_types_of(LlamaForCausalLM)
        if d.get("model_type") not in llama:
            raise ConfigError(f"train.scan_layers is for Llama-family models ({', '.join(llama)}); {folder!r} is a "
                              f"{d.get('model_type')!r} model. Set scan_layers = false.")
    # the tokenizer first: a mismatch is refused before the weights are read
    tok = read_tokenizer(folder) if tokenizer else None
    vocab = d.get("vocab_size")
    # the highest id, not the count: a vocabulary may skip ids ({"a": 2, "zz": 40} is 2 tokens), and an id past the
    # embedding table reads no row of it (a NaN loss in `jpeft eval`, whose rows no batch check sees)
    top = max(tok.get_vocab().values(), default=-1) + 1 if tok is not None else 0
    if tok is not None and isinstance(vocab, int) and max(len(tok), top) > vocab:
        found = (f"has {len(tok):,} tokens" if len(tok) >= top else
                 f"has {len(tok):,} tokens with ids up to {top - 1:,}")
        raise InputValidationError(
            f"the tokenizer in {folder!r} {found} but the model's vocab_size is {vocab:,}: token ids "
            f">= {vocab:,} have no embedding row. Use the model's own tokenizer, or resize the embeddings."
        )
    model, params = from_pretrained(folder, DTYPES[dtype], mesh=mesh, rules=rules,
                                    quantize=quantize, **({"scan_layers": True} if scan_layers else {}),
                                    **({"tie_word_embeddings": False} if untie and loading.ties_lm_head(d) else {}))
    return Loaded(model, params, tok, folder, d)


def model_from_config(config_dict: dict):
    """The jpeft flax module for a Hugging Face ``config.json`` dict."""
    return _m(config_from_hf(config_dict))


def example_ids():
    """A small integer batch used to trace a model once when (re)building adapters."""
    return jnp.zeros((1, 8), jnp.int32)


def save_folder(out: str, loaded: Loaded, params, *, base=None) -> None:
    """Writes ``params`` as a Hugging Face folder next to a copy of the base's config and
    tokenizer files: ``config.json``, ``model.safetensors`` (Hugging Face names and layouts),
    each tensor in the dtype the base's checkpoint stores it in (a bfloat16 model is computed
    on in float32 and written back in bfloat16, as its copied config.json says). With ``base``
    (the params ``params`` were merged from) a ``UserWarning`` says when that rounding loses more
    than a tenth of the update (:class:`jpeft.core.RoundingTally`)."""
    stored = {}
    for f in loading.weight_files(loaded.folder)[0]:
        stored.update({k: e[0] for k, e in safetensors_index(f)[0].items()})
    inner = params["params"] if "params" in params else params
    file_config = loading.config_from_hf(loaded.hf_config)
    family = loading.FAMILIES[file_config.model_type]
    texts = {}
    if getattr(file_config, "tie_word_embeddings", False) and not getattr(loaded.model.config, "tie_word_embeddings", True):
        # a tied base read untied (an adapter of lm_head): the merged lm_head is its own weight now; the config says
        # so (transformers would tie it back to the embedding), and it is written in the embedding's stored dtype
        texts["config.json"] = json.dumps({**loaded.hf_config, "tie_word_embeddings": False}, indent=2) + "\n"
        floats = [d for d in stored.values() if jnp.issubdtype(d, jnp.floating)]
        if floats:
            stored.setdefault("lm_head.weight", max(set(floats), key=floats.count))
    if base is not None:
        _warn_rounded_update(base["params"] if "params" in base else base, inner, family, stored)
    tensors = loading.hf_tensors(inner, family, stored)
    copies = {}
    for name in os.listdir(loaded.folder):
        if _is_base_file(name) and name not in texts:
            src = os.path.join(loaded.folder, name)
            if os.path.isfile(src):
                copies[name] = src
    # every file is written under a temporary name first, then renamed into place: a full disk or a kill leaves
    # no half-written file over an earlier output (``--force``: its config.json was copied over in place); an
    # older sharded model in ``out``: its index and shards go once the new file is in place
    try:
        loading.write_weights(out, tensors, texts=texts, copies=copies)
    except OSError as e:
        raise SaveError(f"writing the merged model to {out!r} failed: {e}. The files already there are left as they "
                        "were; free space or fix permissions and run again.") from None
    # an earlier `jpeft export` there (``--force``): transformers' from_pretrained(out) would load the base its
    # adapter_config.json names with that old adapter attached, not the merged weights; an earlier merge of another
    # base: its tokenizer files and generation_config.json that this base lacks would load with these weights
    stale = [n for n in os.listdir(out) if _is_base_file(n) and n not in copies and n not in texts and os.path.isfile(os.path.join(out, n))]
    for name in (*PEFT_ADAPTER_FILES, *stale):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def _warn_rounded_update(base, merged, family, stored) -> None:
    """The :class:`jpeft.core.RoundingTally` of writing ``merged`` in the 16-bit dtypes ``stored``
    gives its tensors, against the update from ``base``; one tensor at a time on the host."""
    tally = RoundingTally()
    for k, (keys, _mpath, _transposed, _shape) in loading.hf_key_map(jax.eval_shape(lambda: merged), family).items():
        dt = stored.get(k)
        if not is_half_float(dt):
            continue
        b, m = base, merged
        for c in keys:
            b, m = b[c], m[c]
        if b is not m:  # a weight the merge left alone is the same array
            tally.add({k: b}, {k: m}, {k: jnp.asarray(m).astype(dt)})
    tally.warn("jpeft merge (writing the base's 16-bit dtype)", stacklevel=2)


def _is_base_file(name: str) -> bool:
    """A file ``save_folder`` copies from the base folder: its config, generation config and tokenizer files."""
    return name in ("config.json", "generation_config.json") or name.startswith(
        ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template"))


