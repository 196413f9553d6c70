"""LoRA's Hugging Face PEFT format (``peft_type`` ``"LORA"``), both ways, and LoRA's registration.

LoRA spans four files: :mod:`jpeft.methods.lora` (config, nodes, init), ``dora.py``, ``pissa.py``
(residual inits) and this one, which sees them all and so holds the one
:func:`~jpeft.methods.base.register_method` call: plain LoRA, rsLoRA, DoRA, PiSSA/OLoRA (residual
bases), rank_pattern, alpha_pattern, ensure_weight_tying, lora_bias, bias,
modules_to_save (:class:`~jpeft.methods._common.SavedModule`) and trainable_token_indices
(:class:`~jpeft.methods.lora.TrainableTokens`). Keys and orientation: see :mod:`jpeft.hf`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jpeft import scan
from jpeft.errors import BaseMismatchError, CheckpointError, ConfigError, UnsupportedAdapterError
from jpeft.methods import pissa
from jpeft.methods._common import (BASE_BIAS, PEFT_CONV_FORWARD, SavedModule, base_bias_from_hf, conv_rows_from_torch,
                                   conv_rows_to_torch, other_bias_keys, peft_site_layout, saved_from_hf, saved_to_hf,
                                   trained_biases_from_hf, trained_biases_to_hf)
from jpeft.methods.base import Kind, Method, register_method
from jpeft.methods.lora import (LoraConfig, LoraWeights, TrainableTokens, budget_rows, from_low_rank,
                                init_lora, is_residual_init, tied_head_scales, tied_output_from_params, token_sites)
from jpeft.peft_format import (CONFIG_FILE, CONV1D, FLAG, PEFT_PREFIX, ExportContext, ImportContext, add_site_pattern,
                               check_base_copy, check_keys, check_same_copies, config_from_peft, needs_peft, peft_key,
                               check_value_types, overlap_fix, split_peft_key,
                               ties_word_embeddings, to_np, warn_overlapping_patterns)
from jpeft.tree import compile_pattern, from_hf_name, hf_name, linear_only, regex_fullmatch, tied_embedding

# the PEFT whose OLoRA init honours fan_in_fan_out (GPT-2's Conv1D, weights stored [in, out]; before, it factored the
# stored weight, a residual base unlike jpeft's, and lora_A of the wrong shape where in != out); the version from which
# its conv lora_A takes the base's dilation and padding_mode is _common.PEFT_CONV_FORWARD, the one from which
# modules_to_save names and trainable_token_indices keys match whole name components lora.peft_names_match's
_PEFT_OLORA_CONV1D = (0, 22)


# -- LoRA ------------------------------------------------------------------------------------

def _hf_targets(config: LoraConfig, paths) -> Any:
    names = [hf_name(p) for p in paths]
    t = config.target_modules
    if isinstance(t, str):
        if all(regex_fullmatch(t, n) for n in names):
            return t
        return sorted(names)
    conv = [hf_name(str(x).replace(".", "/")) for x in t]
    # keep the user's names when Hugging Face's suffix rule selects every site with them
    if all(any(n == c or n.endswith("." + c) for c in conv) for n in names):
        return sorted(set(conv))
    return sorted(names)


def _lora_to_hf(config: LoraConfig, adapter, ctx: ExportContext):
    tensors: dict[str, np.ndarray] = {}
    rank_pattern, alpha_pattern = {}, {}
    saved = {p: n for p, n in adapter.items() if isinstance(n, SavedModule)}
    for path, node in saved.items():
        if not config.saves(path) and not (config.bias == "all" and set(node.params) == {"bias"}):
            raise UnsupportedAdapterError(
                f"the adapter holds a full copy of {path!r}, but the config's modules_to_save="
                f"{list(config.modules_to_save or [])} does not name it; save with the config the adapter was made with."
            )
        tensors.update(saved_to_hf(path, node))
    tied = False
    for path, node in saved.items():
        if node.tie_output and node.tied_output is not False and "embedding" in node.params:
            _check_peft_ties(path, node)
            # PEFT's ensure_weight_tying shares the embedding's copy with lm_head and saves it under both names
            tensors[peft_key("lm_head", "weight")] = tensors[peft_key(path, "weight")]
            tied = True
    adapter = {p: n for p, n in adapter.items() if p not in saved}
    tokens = {p: n for p, n in adapter.items() if isinstance(n, TrainableTokens)}
    for path, node in tokens.items():
        _check_peft_token_tie(path, node, ctx.hf_config)
        tensors[peft_key(path, _TOKENS_KEY)] = to_np(node.values)
    token_indices = _hf_token_indices(config, tokens)
    adapter = {p: n for p, n in adapter.items() if p not in tokens}
    paths = sorted(adapter)
    new_conv = {}  # conv sites only PEFT >= 0.22 computes as jpeft: {path: why PEFT 0.21 does not}
    for path in paths:
        node = adapter[path]
        r = node.r
        alpha = node.scale * (math.sqrt(r) if config.use_rslora else r)
        add_site_pattern(rank_pattern, alpha_pattern, path, r, alpha, config)
        if node.layout.kind == Kind.EMBED:
            tensors[peft_key(path, "lora_embedding_A")] = to_np(node.lora_A).T.copy()
            tensors[peft_key(path, "lora_embedding_B")] = to_np(node.lora_B).T.copy()
            if node.tie_output and node.tied_output is not False:
                _check_peft_ties(path, node)
                # PEFT's ensure_weight_tying gives lm_head a LoRA sharing the embedding's factors, scaled by
                # lm_head's own r / alpha: the embedding's too, or that half of the update is rescaled
                tensors[peft_key("lm_head", "lora_A.weight")] = to_np(node.lora_B).copy()
                tensors[peft_key("lm_head", "lora_B.weight")] = to_np(node.lora_A).copy()
                add_site_pattern(rank_pattern, alpha_pattern, "lm_head", r, alpha, config)
                tied = True
        elif node.layout.kind in (Kind.DENSE, Kind.CONV):
            if node.layout.kind == Kind.CONV:  # PEFT's ConvNd LoRA: lora_A a conv, lora_B a 1x1 conv
                if node.layout.peft_lora_differs is not None:
                    new_conv[path] = node.layout.peft_lora_differs
                a_t, b_t = _conv_factors_to_hf(to_np(node.lora_A), to_np(node.lora_B), node.layout)
            else:
                a_t, b_t = to_np(node.lora_A).T.copy(), to_np(node.lora_B).T.copy()
            tensors[peft_key(path, "lora_A.weight")] = a_t
            tensors[peft_key(path, "lora_B.weight")] = b_t
            if node.lora_bias is not None:
                tensors[peft_key(path, "lora_B.bias")] = to_np(node.lora_bias)
            tensors.update(trained_biases_to_hf(path, node, config.bias, "LoraConfig.bias"))
        else:
            raise UnsupportedAdapterError(
                f"site {path!r} adapts a {node.layout.kind} kernel; the Hugging Face PEFT format is written for "
                "nn.Dense, nn.Conv and nn.Embed sites (PEFT's Linear, ConvNd and Embedding)."
            )
        if node.magnitude is not None:
            mag = to_np(node.magnitude)
            if node.layout.kind == Kind.CONV:  # PEFT's ConvNd DoRA: [1, out, 1, ...]
                mag = mag.reshape((1, -1) + (1,) * (len(node.layout.kernel_shape) - 2))
            tensors[peft_key(path, "lora_magnitude_vector")] = mag
        if (node.lora_bias is not None) != config.lora_bias:
            raise UnsupportedAdapterError(
                f"the config says lora_bias={config.lora_bias}, but the site {path!r} "
                f"{'has' if node.lora_bias is not None else 'has no'} LoRA bias; PEFT records one lora_bias per adapter. "
                "Save with the config the adapter was made with."
            )
    init = _residual_init_for_peft(config, adapter)
    conv1d = _olora_conv1d_sites(init, paths)
    d = config.to_dict()
    d.pop("peft_type", None)
    d.update(
        target_modules=_hf_targets(config, paths),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=ctx.fan_in_fan_out,
        bias=config.bias,
        modules_to_save=_hf_modules_to_save(config, [p for p in saved if config.saves(p)]),
        trainable_token_indices=token_indices,
        lora_bias=config.lora_bias,
        ensure_weight_tying=tied,
        # PEFT re-runs the init when it loads: True leaves the base alone; "pissa"/"olora" make it
        # recompute the residual base these factors are relative to (jpeft.init_pissa/init_olora)
        init_lora_weights=init,
    )
    needs_peft(d, PEFT_CONV_FORWARD, new_conv, f"their nn.Conv has {' / '.join(sorted(set(new_conv.values())))}, and PEFT 0.21 "
               "builds a conv's lora_A from the base's kernel_size, stride and padding alone (undilated, zero-padded), "
               "so its unmerged output differs from its merged one and from jpeft's")
    needs_peft(d, _PEFT_OLORA_CONV1D, conv1d, "their OLoRA residual base is of GPT-2 Conv1D modules (fan_in_fan_out), and PEFT "
               "before 0.22 factors the stored [in, out] weight instead, so it rebuilds another base (or fails on the "
               "shapes)")
    return d, tensors


_TOKENS_KEY = "token_adapter.trainable_tokens_delta"


def _hf_modules_to_save(config: LoraConfig, saved) -> Optional[list]:
    """``modules_to_save`` as both PEFTs read it: the config's names, but where one also ends the
    name of a module it copies (``saved``) off a component boundary (``norm`` for each layer's
    ``input_layernorm``), which PEFT < 0.22 copies as jpeft does and PEFT >= 0.22 leaves frozen,
    the full dotted names of the modules it copies, which both read alike."""
    if not config.modules_to_save:
        return None
    names = []
    for m in config.modules_to_save:
        hits = [p for p in saved if config.saved_by(p, m)]
        same = all(config.saved_by_component(p, m) for p in hits)
        names += [m] if same else [hf_name(p) for p in sorted(hits)]
    return list(dict.fromkeys(names))


def _modules_to_save_as_written(config: LoraConfig, d: Mapping[str, Any], ctx: ImportContext) -> LoraConfig:
    """The config whose ``modules_to_save`` selects, by jpeft's rule (:meth:`LoraConfig.saves`, PEFT
    < 0.22's suffix test), the modules that the PEFT which wrote the file copied
    (``LoraConfig.saves(path, ctx.peft_version)``): PEFT >= 0.22 matches a name on whole
    components of the dotted name only (:func:`jpeft.methods.lora.peft_names_match`), so a name
    the two rules read differently on this base becomes the full dotted names of the modules PEFT
    >= 0.22 copied (the outermost ones), which both rules read alike, as :func:`_peft_patterns`
    does for rank_pattern."""
    if not config.modules_to_save:
        return config
    leaves, folder, version = ctx.leaves, ctx.folder, ctx.peft_version
    modules = sorted({"/".join(p.split("/")[:i]) for p in leaves for i in range(1, p.count("/") + 2)})
    names = []
    for m in config.modules_to_save:
        if all(config.saved_by(p, m) == config.saved_by(p, m, version) for p in leaves):
            names.append(m)
            continue
        hits = [p for p in modules if config.saved_by(p, m, version)]
        names += [hf_name(p) for p in hits if not any(p.startswith(q + "/") for q in hits)]
    new = dataclasses.replace(config, modules_to_save=tuple(dict.fromkeys(names)) or None)
    want = sorted(p for p in leaves if config.saves(p, version))
    got = sorted(p for p in leaves if new.saves(p))
    if got != want:
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} was written by PEFT {d.get('peft_version')}, which copies a module whose dotted "
            f"name is a name of modules_to_save={list(config.modules_to_save)} or ends with '.' + that name: "
            f"{[hf_name(p) for p in want][:8]} in this base; jpeft's LoRA matches those names as plain suffixes (PEFT "
            f"< 0.22's rule) and cannot name exactly these modules (it would copy {[hf_name(p) for p in got][:8]}). "
            "jpeft cannot hold this selection: load the adapter with PEFT, or re-save it from PEFT with modules_to_save "
            "naming modules whose names end no other module's (full dotted names)."
        )
    return new


def _hf_token_indices(config: LoraConfig, tokens: Mapping[str, TrainableTokens]):
    """``trainable_token_indices`` as PEFT reads it: the config's list when one site holds it,
    else ``{dotted embedding name: ids}``."""
    if not tokens:
        if config.trainable_token_indices is not None:
            raise UnsupportedAdapterError(
                "the config sets trainable_token_indices, but the adapter has no trainable tokens; save with the "
                "config the adapter was made with."
            )
        return None
    if isinstance(config.trainable_token_indices, tuple) and len(tokens) == 1:
        (node,) = tokens.values()
        if node.indices == config.trainable_token_indices:
            return list(node.indices)
    return {hf_name(p): list(n.indices) for p, n in sorted(tokens.items())}


def _check_peft_token_tie(path, node, hf_config=None):
    """PEFT applies trainable tokens to a tied output projection exactly when the model ties its
    word embeddings; refuse a site whose tie PEFT would not reproduce (``hf_config``: the
    config.json of the base the file names, when it is a local folder)."""
    if node.tie_output is None:
        raise UnsupportedAdapterError(
            f"the trainable tokens at {path!r} do not know whether the model reads the embedding as its tied output "
            "projection (PEFT then uses the rows there too); create the adapter with jpeft.init(config, params, key, "
            "model, *example_inputs) or on jpeft.models params."
        )
    _check_token_tie_matches(path, bool(node.tie_output), hf_config, UnsupportedAdapterError)


def _check_token_tie_matches(path, tied: bool, hf_config, err) -> None:
    """Refuses trainable tokens where the jpeft base and PEFT's base (``hf_config``) disagree on
    whether lm_head is tied to the embedding: PEFT applies the rows at the output projection
    exactly when its model ties them, jpeft when its params do (no lm_head of their own), e.g. a
    tied checkpoint loaded with from_pretrained(folder, tie_word_embeddings=False)."""
    peft_tied = ties_word_embeddings(hf_config)
    if peft_tied is None or peft_tied == tied or path not in ("model/embed_tokens", "transformer/wte"):
        return
    raise err(
        f"trainable tokens at {hf_name(path)!r}: jpeft's base here {'ties' if tied else 'does not tie'} its output "
        f"projection to the embedding (its params {'have no' if tied else 'have an'} lm_head of their own), but the "
        f"adapter's base_model_name_or_path has tie_word_embeddings="
        f"{str(peft_tied).lower()}, where PEFT {'uses' if peft_tied else 'does not use'} the tokens' rows in lm_head "
        "too: the outputs would differ. Use the base as its config.json says (jpeft.models.from_pretrained(folder) "
        "without a tie_word_embeddings override), or a base_model_name_or_path folder saved from the base used here "
        "(jpeft.models.save_pretrained)."
    )


def _check_peft_ties(path, node):
    """A site (an embedding LoRA, or a modules_to_save copy) that acts on the tied output
    projection too is written for PEFT only where PEFT ties it as well."""
    if path != "model/embed_tokens" or node.tied_output is None:
        raise UnsupportedAdapterError(
            f"site {path!r} adapts the embedding and its tied output projection together (ensure_weight_tying), but "
            "PEFT ties the output projection (its LoRA, or its modules_to_save copy) only for Llama-style models "
            "with tie_word_embeddings (model.embed_tokens -> lm_head); for this model its unmerged adapter changes "
            "the input embedding only. Use LoraConfig(ensure_weight_tying=False) to save an adapter PEFT reproduces."
        )
    if isinstance(node, SavedModule):
        return
    if node.residual is not None or node.magnitude is not None:
        raise UnsupportedAdapterError(f"site {path!r}: a tied embedding LoRA is saved for PEFT as plain LoRA only.")


def _residual_init_for_peft(config, adapter):
    """``init_lora_weights`` to write: ``True``, or the residual init every site shares, after
    refusing what PEFT would rebuild differently on load."""
    loras = [node for node in adapter.values() if isinstance(node, LoraWeights)]
    # PEFT's Embedding layer has no PiSSA/OLoRA init: under init_lora_weights="pissa" / "olora" it starts
    # plain on the unchanged embedding, as load_peft reads such a file (plain embedding sites beside
    # residual ones); so a plain embedding site does not take part in the init the file records
    kinds = {n.residual for n in loras if n.residual is not None or n.layout.kind != Kind.EMBED} or {None}
    frozen_b = {n.frozen_b for n in loras}
    if frozen_b == {True} and kinds == {None}:  # MiCA: PEFT rebuilds its init on load and keeps lora_B frozen
        return "mica"
    if len(frozen_b) > 1:
        raise UnsupportedAdapterError(
            "the adapter mixes MiCA sites (lora_B frozen) with sites that train both factors; PEFT records one "
            "init_lora_weights per adapter. Save them as separate adapters.")
    if kinds == {None}:
        if is_residual_init(config.init_weights) and any(n.layout.kind != Kind.EMBED for n in loras):
            raise UnsupportedAdapterError(
                f"the config says init_weights={config.init_weights!r}, but the adapter's sites are not relative to a residual base "
                f"(they do not come from jpeft.init_{config.init_weights.split('_')[0]}); PEFT would subtract the initial factors from the "
                "base on load. Save with the config the adapter was made with (init_weights='default')."
            )
        return True
    if len(kinds) > 1:
        raise UnsupportedAdapterError(
            f"the adapter mixes sites relative to different bases ({sorted(map(str, kinds))}); PEFT records one "
            "init_lora_weights per adapter. Save the sites of each init as separate adapters."
        )
    (kind,) = kinds
    if kind.startswith("pissa_niter_"):
        raise UnsupportedAdapterError(
            f"this adapter comes from jpeft.init_pissa(..., niter={kind.rsplit('_', 1)[1]}): its base is the residual "
            "of a randomized SVD, which PEFT would redo with its own random draw on load (a different base). "
            "Convert it to a plain LoRA of the original params (jpeft.convert_residual_adapter(adapter, params, "
            "residual_params), saved with jpeft.convert_residual_config(config)), re-create it with niter=None (exact "
            "SVD, which PEFT reproduces), or merge it (jpeft.merge(residual_params, adapter)) and save full weights "
            "with jpeft.models.save_pretrained."
        )
    if kind == "milora" or kind.startswith("corda"):
        why = ("its base is the principal part of each kernel, and Hugging Face PEFT 0.21 has no MiLoRA init to "
               "rebuild that base on load (its 'mica' init is a different method)") if kind == "milora" else (
               "its base depends on calibration data, which PEFT rebuilds on load only after preprocess_corda on "
               "the same data")
        raise UnsupportedAdapterError(
            f"this adapter comes from jpeft.init_{kind.split('_')[0]}: {why}. Convert it to a plain LoRA of the "
            "original params (jpeft.convert_residual_adapter(adapter, params, residual_params), saved with "
            "jpeft.convert_residual_config(config)), or merge it (jpeft.merge(residual_params, adapter)) and save "
            "full weights with jpeft.models.save_pretrained."
        )
    embeds = [p for p, n in adapter.items() if isinstance(n, LoraWeights) and n.layout.kind == Kind.EMBED
              and n.residual is not None]
    if embeds:
        raise UnsupportedAdapterError(
            f"sites {embeds} are {kind} embeddings, but PEFT's LoRA Embedding layer has no {kind} init (it would load "
            "the factors onto the unchanged embedding). Leave embeddings out of target_modules for PiSSA/OLoRA."
        )
    convs = [p for p, n in adapter.items() if isinstance(n, LoraWeights) and n.layout.kind == Kind.CONV]
    if convs:
        raise UnsupportedAdapterError(
            f"sites {convs} are {kind} convolutions, but {_NO_CONV_RESIDUAL.format(kind=kind)} Convert it to a plain "
            "LoRA of the original params (jpeft.convert_residual_adapter(adapter, params, residual_params), saved with "
            "jpeft.convert_residual_config(config)), or leave convolutions out of target_modules for PiSSA/OLoRA."
        )
    return kind


def _olora_conv1d_sites(init, paths) -> list:
    """The GPT-2 Conv1D sites among ``paths`` (jpeft module paths) of an adapter whose init is ``init``,
    when it is OLoRA: their residual base is PEFT's only from PEFT 0.22 on."""
    return sorted(p for p in paths if CONV1D.match(p)) if init == "olora" else []


def _refuse_old_olora_conv1d(d: Mapping[str, Any], paths, ctx: ImportContext) -> None:
    """Refuses a PEFT OLoRA file with GPT-2 Conv1D sites written by PEFT before 0.22, whose residual
    base jpeft does not compute."""
    sites = _olora_conv1d_sites(d.get("init_lora_weights"), paths)
    if not sites or (ctx.peft_version or (0, 0)) >= _PEFT_OLORA_CONV1D:
        return
    folder = ctx.folder
    raise UnsupportedAdapterError(
        f"the OLoRA adapter in {folder!r} adapts GPT-2 Conv1D modules {[hf_name(p) for p in sites[:4]]} "
        f"(fan_in_fan_out) and was written by PEFT {d.get('peft_version') or 'before 0.18 (no peft_version)'}; "
        "expected PEFT >= 0.22. PEFT before 0.22 factored the stored [in, out] weight without honouring "
        "fan_in_fan_out, so the residual base its from_pretrained rebuilds is not the one PEFT >= 0.22 and jpeft "
        "compute (PEFT's own conversion to plain LoRA assumes that base too). Merge it with the PEFT that wrote it "
        "(peft_model.merge_and_unload().save_pretrained(folder)) and load the full weights with "
        "jpeft.models.from_pretrained, or train the OLoRA adapter with PEFT >= 0.22."
    )


_LORA_TENSORS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", BASE_BIAS, _TOKENS_KEY, "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "base_layer.weight")


def _lora_from_hf(d: Mapping[str, Any], tensors: Mapping[str, np.ndarray], params, ctx: ImportContext):
    config, residual = _lora_config_from_hf(d, ctx.folder)
    config = _modules_to_save_as_written(config, d, ctx)
    found = _sort_lora_tensors(tensors, config, ctx)
    leaves, by_site = ctx.leaves, found.by_site
    _refuse_old_olora_conv1d(d, by_site, ctx)
    tied_paths = _take_tied_output(d, by_site, leaves, ctx.folder)
    for path in tied_paths:  # PEFT scales the shared factors by each module's own r / alpha; a tied site has one
        differ = tied_head_scales(config, path, *config.rank_alpha(path, hf_only=True), hf_only=True)
        if differ:
            raise UnsupportedAdapterError(
                f"the adapter in {ctx.folder!r} ties lm_head to {hf_name(path)} (ensure_weight_tying), but its "
                f"rank_pattern / alpha_pattern give them different scales: {differ}. PEFT applies the shared factors "
                "with each module's own scale; jpeft's tied site has one. Give lm_head the embedding's r and alpha in "
                "adapter_config.json."
            )
    candidates = [p for p, own in leaves.items() if "kernel" in own or "embedding" in own]
    candidates = linear_only(config.target_modules, leaves, candidates)
    expected = [p for p in candidates if config.selects(p)]
    _refuse_saved_targets(config, [p for p in by_site if p in leaves], expected, ctx.folder)
    unknown = [p for p in by_site if p not in leaves]
    check_keys([p for p in by_site if p in leaves], expected,
               unmatched_keys=found.unmatched + [k for p in unknown for k in _keys_of(p, by_site[p])])

    warn_overlapping_patterns(d, [p for p in by_site if p in leaves], ctx.folder)
    config = _peft_patterns(config, [p for p in by_site if p in leaves])
    adapter = {path: _lora_site_from_hf(path, by_site[path], config, residual, path in tied_paths, ctx)
               for path in sorted(by_site)}
    adapter.update(_saved_sites_from_hf(config, found, ctx))
    adapter.update(_tokens_from_hf(config, found.token_values, leaves, ctx))
    # a module of modules_to_save holds its bias already
    adapter.update(trained_biases_from_hf({p: v for p, v in found.biases.items() if p not in adapter}, config.bias,
                                          leaves, ctx.dtype, adapter))
    return config, adapter


def _lora_config_from_hf(d: Mapping[str, Any], folder: str) -> tuple[LoraConfig, Optional[str]]:
    """``(config, residual init or None)`` from a PEFT LoRA ``adapter_config.json``, refusing the
    options jpeft does not implement and a file without ``target_modules``."""
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    # the PEFT options jpeft does not implement, at anything but their "off" value (one list:
    # LoraConfig._unsupported_hf_options); the data-driven inits' options steer only the init, whose result the
    # file holds (or, for the inits that change the base, _residual_of refuses by the init's name)
    bad = {k: d[k] for k, ok in LoraConfig._unsupported_hf_options.items()
           if k in d and k not in fields and k not in _INIT_OPTIONS
           and not any(d[k] is v or (type(d[k]) is type(v) and d[k] == v) for v in ok)}
    if bad:
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {folder!r} uses options jpeft cannot load: {bad}. Supported: plain LoRA, "
            "rsLoRA, DoRA, PiSSA/OLoRA, rank_pattern, alpha_pattern, ensure_weight_tying, exclude_modules, "
            "layers_to_transform/layers_pattern, lora_bias, modules_to_save, trainable_token_indices and bias."
        )
    hf_keys = LoraConfig.key_names()
    kept = {k: v for k, v in d.items() if k in hf_keys}
    # a file without lora_alpha (written by hand: PEFT writes every field) means PEFT's default, 8, not
    # LoraConfig's 16 (which would scale every update 2x); r and the other defaults are PEFT's
    kept.setdefault("lora_alpha", 8)
    residual = _residual_of(kept.get("init_lora_weights", True), folder)
    # besides the residual inits, the init does not matter for loading, but for MiCA's frozen lora_B
    kept["init_lora_weights"] = residual or ("mica" if kept.get("init_lora_weights") == "mica" else True)
    if kept.get("target_modules") is None:
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {folder!r} has target_modules=null (PEFT's per-architecture default); "
            "set target_modules in adapter_config.json explicitly."
        )
    return config_from_peft(LoraConfig, kept, os.path.join(folder, CONFIG_FILE)), residual


def _lora_hf_config(d: Mapping[str, Any], folder: str) -> LoraConfig:
    """``Method.hf_config``: the config :func:`_lora_from_hf` reads from the file (PEFT's default
    ``lora_alpha`` where the file has none, its init reduced to what loading needs)."""
    return _lora_config_from_hf(d, folder)[0]


@dataclasses.dataclass
class _LoraTensors:
    """A PEFT LoRA file's tensors sorted by what they are (module paths are jpeft's)."""

    by_site: dict = dataclasses.field(default_factory=dict)  # path -> {PEFT tensor name: LoRA tensor}
    saved: dict = dataclasses.field(default_factory=dict)  # path -> {"weight"/"bias": modules_to_save copy}
    token_values: dict = dataclasses.field(default_factory=dict)  # path -> trainable_token_indices values
    biases: dict = dataclasses.field(default_factory=dict)  # bias="all": the biases of modules without a LoRA site
    tied_head: Optional[np.ndarray] = None  # ensure_weight_tying's lm_head copy of the saved embedding
    wrapped: dict = dataclasses.field(default_factory=dict)  # bias="all": path -> the saved copy's bias, PEFT's 2nd key
    unmatched: list = dataclasses.field(default_factory=list)  # keys of no known kind: named by the key check


def _wrapped_bias(k: str, config: LoraConfig, leaves) -> Optional[tuple[str, bool]]:
    """``(module path, whether it is the trained copy)`` for a key of a ``bias="all"`` file that names
    a bias inside PEFT's wrapper of a module of ``modules_to_save``, else ``None``. PEFT's bias filter
    keeps every ``.bias`` key of the model, so such a file holds the copy's bias a second time
    (``<module>.modules_to_save[.<adapter>].<sub>.bias``, beside ``<module>.<sub>.bias``) and the
    wrapped original's (``<module>.original_module.<sub>.bias``)."""
    if config.bias != "all" or not config.modules_to_save or not k.startswith(PEFT_PREFIX) or not k.endswith(".bias"):
        return None
    parts = k[len(PEFT_PREFIX):-len(".bias")].split(".")
    for i, part in enumerate(parts):
        if part in ("modules_to_save", "original_module"):
            # PEFT drops the adapter's name after modules_to_save only where it comes right before ".bias"
            subs = [parts[i + 1:]] + ([parts[i + 2:]] if part == "modules_to_save" and len(parts) > i + 1 else [])
            for sub in subs:
                path = from_hf_name(".".join(parts[:i] + sub))
                if "bias" in leaves.get(path, {}) and config.saves(path):
                    return path, part == "modules_to_save"
    return None


def _sort_lora_tensors(tensors: Mapping[str, np.ndarray], config: LoraConfig, ctx: ImportContext) -> _LoraTensors:
    """Sorts the file's tensors by kind; checks a saved copy of a tied ``lm_head`` against the embedding,
    and PEFT's second key of a saved copy's bias (``bias="all"``) against the first."""
    out = _LoraTensors()
    other_biases = other_bias_keys(tensors, config.bias, ctx.leaves)  # bias="all": <module>.bias without a site
    for k, v in tensors.items():
        sp = split_peft_key(k, _LORA_TENSORS)
        wrapped = _wrapped_bias(k, config, ctx.leaves) if sp is None else None
        if wrapped is not None:
            if wrapped[1]:
                out.wrapped[wrapped[0]] = v
            # else the wrapped original's bias: PEFT loads it into the original module, which no output reads
            # while the adapter is active (with bias="all" PEFT marks it trainable, but it gets no gradient)
            continue
        if sp is None:
            sm = split_peft_key(k, ("weight", "bias")) if config.modules_to_save or config.bias == "all" else None
            if sm is not None and sm[0] in ctx.leaves and config.saves(sm[0]):
                out.saved.setdefault(sm[0], {})[sm[1]] = v
            elif sm == ("lm_head", "weight") and "lm_head" not in ctx.leaves and config.ensure_weight_tying \
                    and config.saves("model/embed_tokens"):
                out.tied_head = v  # PEFT's ensure_weight_tying saves the embedding's copy under lm_head too
            elif k in other_biases:
                out.biases[other_biases[k]] = v
            else:
                out.unmatched.append(k)
            continue
        path, t = sp
        if t == "base_layer.weight":  # a copy of a module this base lacks (jpeft.hf checked and dropped the others)
            tied_to = tied_embedding(path, ctx.leaves)
            if tied_to is None:
                out.unmatched.append(k)  # a module of another model: named by the key check below
            else:  # lm_head tied to the embedding (no module of its own here): its copy is the embedding
                check_base_copy(path, v, ctx.leaves[tied_to], ctx.folder)
            continue
        if t == _TOKENS_KEY:
            out.token_values[path] = v
            continue
        out.by_site.setdefault(path, {})[t] = v
    for path, v in out.wrapped.items():
        first = out.saved.setdefault(path, {}).setdefault("bias", v)
        check_same_copies(first, v, ctx.folder,
                          f"the bias of its modules_to_save copy of {hf_name(path)!r} (bias='all'): {hf_name(path)}.bias "
                          "and the one under the copy's wrapper (modules_to_save.<adapter>)")
    _take_tied_token_values(out.token_values, ctx)
    return out


def _take_tied_token_values(values: dict, ctx: ImportContext) -> None:
    """On a tied model PEFT's lm_head shares the embedding's trainable tokens, and
    ``save_embedding_layers`` saves that shared delta under lm_head too: drop it where it equals
    the embedding's (jpeft applies the embedding's tokens at the tied output projection)."""
    for path in sorted(values):
        emb = tied_embedding(path, ctx.leaves)
        if emb is None or emb not in values:
            continue  # not a tied lm_head, or no embedding tokens: the token-site check names it
        check_same_copies(values[path], values[emb], ctx.folder,
                          f"the trainable tokens of lm_head and of {hf_name(emb)}, which this base ties (PEFT shares one "
                          "delta between them)")
        del values[path]


def _site_layout(path: str, own, ctx: ImportContext):
    """The layout of the module at ``path``: the traced one for a conv (``load_peft(...,
    model=, example_args=)``), refused in a file of PEFT < 0.22 (or without ``peft_version``) where
    ``Layout.peft_lora_differs`` says that PEFT computes it otherwise than jpeft (a dilated, circular-
    or reflect-padded conv), else the one its kernel's shape alone tells (Dense, Embed)."""
    return peft_site_layout(
        path, own, ctx, "LoRA", convs="Conv1d/2d/3d",
        adapts="Linear, Embedding and ConvNd layers, whose twins are nn.Dense, nn.Embed and nn.Conv",
        differs=lambda lay: lay.peft_lora_differs,
        old=("PEFT < 0.22 builds its lora_A conv from the base's kernel_size, stride and padding alone (undilated, "
             "zero-padded)"),
        new="lora_A with the module's own dilation and padding mode")


def _conv_factors_from_hf(path: str, a_t: np.ndarray, b_t: np.ndarray, layout) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ConvNd LoRA factors (``lora_A``: a conv ``[r, in, *window]``, ``lora_B``: a 1x1 conv
    ``[out, r, 1, ...]``) as jpeft's ``[window * in, r]`` / ``[r, out]`` for a flax ``nn.Conv``
    kernel ``[*window, in, out]`` (its input axes flattened in that order)."""
    nd = len(layout.kernel_shape)
    want_a = (layout.kernel_shape[-2],) + tuple(layout.kernel_shape[:-2])  # [in, *window] after r
    if a_t.ndim != nd or b_t.ndim != nd or any(n != 1 for n in b_t.shape[2:]) \
            or tuple(a_t.shape[1:]) != want_a or b_t.shape[1] != a_t.shape[0]:
        raise BaseMismatchError(
            f"adapter site {hf_name(path)!r}: lora_A has shape {tuple(a_t.shape)} and lora_B {tuple(b_t.shape)}, but "
            f"the base nn.Conv kernel {tuple(layout.kernel_shape)} needs lora_A [r, {layout.kernel_shape[-2]}, "
            f"{', '.join(map(str, layout.kernel_shape[:-2]))}] and lora_B [{layout.kernel_shape[-1]}, r{', 1' * (nd - 2)}]. "
            "Load the adapter on the base it was made for."
        )
    r = a_t.shape[0]
    return conv_rows_from_torch(a_t, layout), b_t.reshape(b_t.shape[0], r).T


def _conv_factors_to_hf(a, b, layout) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`_conv_factors_from_hf`."""
    nd, r = len(layout.kernel_shape), a.shape[1]
    return (np.ascontiguousarray(conv_rows_to_torch(a, layout)),
            np.ascontiguousarray(b.T.reshape((b.shape[1], r) + (1,) * (nd - 2))))


# PEFT 0.21's _ConvNd.update_layer has no PiSSA/OLoRA branch: its reset_lora_parameters raises
_NO_CONV_RESIDUAL = ("PEFT's LoRA ConvNd layer has no {kind} init (PEFT raises \"ValueError: Unknown initialization "
                     "init_lora_weights='{kind}'\" when it builds or loads one), so no PEFT model computes such a file.")


def _lora_site_from_hf(path: str, t: Mapping[str, np.ndarray], config: LoraConfig, residual, tied: bool,
                       ctx: ImportContext) -> LoraWeights:
    """The LoRA site at ``path`` from its PEFT tensors ``t``, after checking each against the
    base module and the config (ranks, shapes, DoRA magnitudes, biases)."""
    own = ctx.leaves[path]
    layout = _site_layout(path, own, ctx)
    if config.init_weights == "mica" and layout.kind == Kind.CONV:
        raise UnsupportedAdapterError(
            f"the adapter in {ctx.folder!r} has init_lora_weights='mica' and a conv site {hf_name(path)!r}: Hugging Face "
            "PEFT's MiCA (lora_B frozen) is for linear and embedding layers, so jpeft cannot tell which factors this "
            "site trains. Leave convolutions out of target_modules for MiCA.")
    if residual is not None and layout.kind == Kind.CONV:
        raise UnsupportedAdapterError(
            f"the adapter in {ctx.folder!r} has init_lora_weights={residual!r} and a conv site {hf_name(path)!r}, but "
            f"{_NO_CONV_RESIDUAL.format(kind=residual)} Save it from PEFT with init_lora_weights=True (or convert it "
            "to a plain LoRA with path_initial_model_for_weight_conversion=...)."
        )
    if layout.kind == Kind.EMBED:
        need = ("lora_embedding_A", "lora_embedding_B")
    else:
        need = ("lora_A.weight", "lora_B.weight")
    miss = [n for n in need if n not in t]
    if miss:
        raise BaseMismatchError(
            f"adapter site {hf_name(path)!r} lacks {miss} (found {sorted(t)}); the base module is a "
            f"{layout.kind} layer. Was the adapter made for another architecture?"
        )
    if layout.kind == Kind.CONV:
        a, b = _conv_factors_from_hf(path, np.asarray(t[need[0]]), np.asarray(t[need[1]]), layout)
    else:
        a = np.asarray(t[need[0]]).T  # [in, r]
        b = np.asarray(t[need[1]]).T  # [r, out]
    r_cfg, alpha = config.rank_alpha(path)
    if a.shape[1] != b.shape[0] or a.shape[1] != r_cfg:
        raise CheckpointError(
            f"adapter site {hf_name(path)!r}: lora_A has rank {a.shape[1]}, lora_B rank {b.shape[0]}, "
            f"adapter_config.json says r={r_cfg}." + (overlap_fix(config.rank_pattern, path)
                                                       or " The files do not belong together.")
        )
    if (a.shape[0], b.shape[1]) != (layout.in_features, layout.out_features):
        raise BaseMismatchError(
            f"adapter site {hf_name(path)!r} maps {a.shape[0]} -> {b.shape[1]} features, but the base module "
            f"maps {layout.in_features} -> {layout.out_features}. Load the adapter on the base it was made for."
        )
    mag = t.get("lora_magnitude_vector")
    if mag is not None and layout.kind == Kind.CONV and mag.ndim == len(layout.kernel_shape) \
            and mag.shape[0] == 1 and all(n == 1 for n in mag.shape[2:]):
        mag = mag.reshape(-1)  # PEFT's ConvNd DoRA keeps it as [1, out, 1, ...] (one per output channel)
    if config.use_dora and mag is None:
        raise CheckpointError(f"use_dora is set but site {hf_name(path)!r} has no lora_magnitude_vector.")
    if mag is not None and (not config.use_dora or mag.shape != (layout.out_features,)):
        raise CheckpointError(
            f"adapter site {hf_name(path)!r} has a lora_magnitude_vector of shape {tuple(mag.shape)}, but "
            f"adapter_config.json says use_dora={config.use_dora} (the module has {layout.out_features} outputs); "
            "loading it would drop or misapply the DoRA magnitudes. The files do not belong together."
        )
    base_bias = base_bias_from_hf(t, config.bias, own, path, ctx.folder, ctx.dtype)
    bias = t.get("lora_B.bias")
    if (bias is not None) != config.lora_bias or (bias is not None and bias.shape != (layout.out_features,)):
        raise CheckpointError(
            f"adapter site {hf_name(path)!r}: adapter_config.json says lora_bias={config.lora_bias}, the file "
            f"{'has a lora_B.bias of shape ' + str(tuple(bias.shape)) if bias is not None else 'has no lora_B.bias'}"
            f" (the module has {layout.out_features} outputs). The files do not belong together."
        )
    return LoraWeights(
        jnp.asarray(a, ctx.dtype), jnp.asarray(b, ctx.dtype),
        None if mag is None else jnp.asarray(mag, ctx.dtype),
        config.scale(r_cfg, alpha), layout, float(config.dropout),
        residual if layout.kind != Kind.EMBED else None,
        tied,
        tied_output_from_params(path, ctx.leaves) if layout.kind == Kind.EMBED else None,
        None if bias is None else jnp.asarray(bias, ctx.dtype),
        base_bias,
        frozen_b=config.init_weights == "mica",  # MiCA: PEFT trains lora_A only
    )


def _saved_sites_from_hf(config: LoraConfig, found: _LoraTensors, ctx: ImportContext) -> dict:
    """The ``modules_to_save`` copies as ``SavedModule`` sites; a saved embedding keeps how PEFT
    ties it to the output projection."""
    out = {}
    for path in sorted(found.saved):
        node = saved_from_hf(path, found.saved[path], ctx.leaves[path], ctx.folder, ctx.dtype)
        if "embedding" in node.params:
            # PEFT ties a copy of model.embed_tokens to a tied lm_head with ensure_weight_tying only
            tie = bool(config.ensure_weight_tying) and path == "model/embed_tokens"
            node = dataclasses.replace(node, tie_output=tie, tied_output=tied_output_from_params(path, ctx.leaves))
            if found.tied_head is not None and path == "model/embed_tokens":
                check_same_copies(found.tied_head, found.saved[path]["weight"], ctx.folder,
                                  "lm_head.weight and its copy of model.embed_tokens (ensure_weight_tying=True)")
        out[path] = node
    return out


def _refuse_saved_targets(config: LoraConfig, site_paths, expected, folder: str) -> None:
    """A module both targeted and in ``modules_to_save``: PEFT wraps it as a full copy and gives it
    no LoRA (weights for one in the file are dropped silently, as task_type SEQ_CLS does with a
    classifier LoRA): LoRA weights for it are refused by name. ``config.selects`` leaves out the
    targets a name covers by whole components, as PEFT does; one that a name only ends (``ead`` of
    ``head``), which PEFT would both wrap and adapt, is refused too."""
    with_weights = sorted(hf_name(p) for p in site_paths if config.saves(p))
    if with_weights:
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} has LoRA weights for {with_weights[:5]}, which its modules_to_save="
            f"{list(config.modules_to_save)} also names: PEFT loads such a module as a full copy and ignores its "
            "LoRA weights, so jpeft cannot reproduce PEFT's outputs with them applied. Re-save the adapter without "
            "the module in modules_to_save (for a SEQ_CLS classifier: task_type 'FEATURE_EXTRACTION')."
        )
    both = sorted(hf_name(p) for p in expected if config.saves(p))
    if both:
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} names {both[:5]} both in target_modules and in modules_to_save; PEFT then trains "
            "a full copy of the module and no LoRA, but jpeft's LoraConfig keeps a module either adapted or saved. "
            "Remove those modules from target_modules in adapter_config.json (the file holds no LoRA for them)."
        )


def _peft_patterns(config: LoraConfig, paths) -> LoraConfig:
    """The config with each site's ``(r, alpha)`` as PEFT derives it from the file's
    rank_pattern / alpha_pattern (the end of the dotted module name only): where a key would
    also match a site's jpeft path (``.*_1.*q_proj`` on ``model/layers_1/self_attn/q_proj``,
    which PEFT leaves at ``r`` / ``lora_alpha``), the patterns become one exact key per site,
    so the config gives every later use (init, jpeft.save_adapter / load_adapter) PEFT's values."""
    want = {p: config.rank_alpha(p, hf_only=True) for p in paths}
    if all(config.rank_alpha(p) == v for p, v in want.items()):
        return config
    rank_pattern, alpha_pattern = {}, {}
    for p, (r, alpha) in sorted(want.items()):
        add_site_pattern(rank_pattern, alpha_pattern, p, r, alpha, config)
    return dataclasses.replace(config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def _tokens_from_hf(config: LoraConfig, values: Mapping[str, np.ndarray], leaves, ctx: ImportContext) -> dict:
    """The TrainableTokens sites of a PEFT file (``...token_adapter.trainable_tokens_delta``)."""
    want = token_sites(config, leaves, ctx.peft_version) if config.trainable_token_indices is not None else {}
    heads = [p for p in values if p.split("/")[-1] == "lm_head" and p in leaves]
    if heads and set(values) - set(heads) == set(want):
        # save_embedding_layers=True on a tied model writes the rows PEFT shares with its tied lm_head there too
        raise BaseMismatchError(
            f"the adapter in {ctx.folder!r} also holds its trainable tokens at {hf_name(heads[0])!r}, as PEFT saves them "
            "for a model whose lm_head is tied to the input embedding (it applies the rows there too), but this base "
            "has an lm_head of its own (a tied checkpoint loaded with tie_word_embeddings=False?), where jpeft's tokens "
            "would change the input lookup only: the outputs would differ. Load the base as its config.json says "
            "(jpeft.models.from_pretrained(folder), tied) for this adapter."
        )
    if set(want) != set(values):
        raise BaseMismatchError(
            f"the adapter in {ctx.folder!r} has trainable tokens for {sorted(hf_name(p) for p in values)}, but its "
            f"trainable_token_indices select {sorted(hf_name(p) for p in want)} in this base. Load it on the base it "
            "was made for."
        )
    out = {}
    for path, ids in want.items():
        v = np.asarray(values[path])
        e = leaves[path]["embedding"]
        if v.shape != (len(ids), e.shape[1]) or max(ids) >= e.shape[0]:
            raise BaseMismatchError(
                f"the trainable tokens of {hf_name(path)!r} have shape {v.shape} for ids {list(ids)[:8]}, but the base "
                f"embedding is {tuple(e.shape)}. Load the adapter on the base it was made for."
            )
        tied = bool(tied_output_from_params(path, leaves))
        _check_token_tie_matches(path, tied, ctx.hf_config, BaseMismatchError)
        if ties_word_embeddings(ctx.hf_config) is None and _head_copies_embedding(path, leaves):
            raise BaseMismatchError(
                f"trainable tokens at {hf_name(path)!r}: this base's lm_head is an exact copy of the embedding (a tied "
                "checkpoint loaded with tie_word_embeddings=False), and the adapter's base_model_name_or_path is no "
                f"local model folder (in {ctx.folder!r}) whose config.json says whether PEFT's base tied them. PEFT "
                "uses the tokens' rows in a tied model's lm_head too, so the outputs differ between the two and the "
                "file does not tell which it was trained on. For an adapter trained on the checkpoint as it is "
                "(tied), load the base as its config.json says (jpeft.models.from_pretrained(folder)); for one "
                "trained on the untied model, set the file's base_model_name_or_path to a folder saved from this "
                "base (jpeft.models.save_pretrained), whose config.json says tie_word_embeddings=false."
            )
        out[path] = TrainableTokens(jnp.asarray(v, ctx.dtype), tuple(ids), tied, vocab=int(e.shape[0]))
    return out


def _head_copies_embedding(path: str, leaves) -> bool:
    """Whether the params' ``lm_head`` kernel is exactly the embedding at ``path`` (a Llama-style
    or GPT-2 word embedding), transposed: a tied checkpoint loaded untied
    (``from_pretrained(folder, tie_word_embeddings=False)`` starts the head as that copy), which a
    trained untied checkpoint's head never is."""
    head, e = leaves.get("lm_head", {}).get("kernel"), leaves.get(path, {}).get("embedding")
    if path not in ("model/embed_tokens", "transformer/wte") or not all(
            isinstance(x, (np.ndarray, jax.Array)) for x in (head, e)) or head.shape != e.shape[::-1]:
        return False
    return bool(np.array_equal(np.asarray(head), np.asarray(e).T))


def _take_tied_output(d, by_site, leaves, folder) -> set:
    """PEFT's ``ensure_weight_tying=True`` on a Llama-style tied model also gives ``lm_head`` a
    LoRA whose factors are the embedding's, transposed: check that, drop those keys (jpeft
    applies the embedding site at ``attend`` too) and return the tied embedding paths."""
    head = by_site.get("lm_head")
    if head is None or "lm_head" in leaves:
        return set()
    emb = by_site.get("model/embed_tokens", {})
    if d.get("ensure_weight_tying") and "lora_magnitude_vector" in head:
        raise UnsupportedAdapterError(
            f"the adapter in {folder!r} ties lm_head to model.embed_tokens (ensure_weight_tying) with DoRA: PEFT gives "
            "the tied lm_head DoRA magnitudes of its own (one per vocabulary row) beside the embedding's, which "
            "jpeft's one tied embedding site cannot hold. Train the embedding without use_dora (or leave "
            "embed_tokens out of target_modules) to load the adapter in jpeft."
        )
    if not d.get("ensure_weight_tying") or "lora_embedding_A" not in emb or set(head) != {"lora_A.weight", "lora_B.weight"}:
        tied = "transformer.wte" if "transformer/wte" in leaves else "model.embed_tokens"
        raise BaseMismatchError(
            f"the adapter in {folder!r} has LoRA weights for lm_head, but this base ties lm_head to "
            f"{tied} (no lm_head of its own); jpeft loads such weights only as PEFT's ensure_weight_tying "
            "copy of a model.embed_tokens LoRA (Llama-style models). Load the base untied, "
            "jpeft.models.from_pretrained(folder, tie_word_embeddings=False) (its lm_head starts as a copy of the "
            "embedding, as PEFT's lm_head of a tied model does), and the adapter on it."
        )
    for h, e in (("lora_A.weight", "lora_embedding_B"), ("lora_B.weight", "lora_embedding_A")):
        check_same_copies(head[h], np.asarray(emb[e]).T, folder,
                          f"lm_head's {h} and model.embed_tokens' {e} (transposed; ensure_weight_tying=True)")
    del by_site["lm_head"]
    return {"model/embed_tokens"}


# PEFT inits that leave the base weight alone: the file's factors are all there is to load
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora")
# the options of PEFT's data-driven inits: PEFT reads each only for its init (eva_config for "eva", ...) and writes
# it into every file of that init ("eva" always with an eva_config), so they say nothing about loading the file
_INIT_OPTIONS = ("eva_config", "corda_config", "astra_config", "loftq_config", "lora_ga_config")


def _residual_of(init, folder) -> Optional[str]:
    """``None`` for an init that leaves the base alone, ``"pissa"``/``"olora"`` for one whose
    residual base jpeft recomputes as PEFT does; a named error for the others."""
    if any(init is v or (isinstance(init, str) and init == v) for v in _PLAIN_INITS):
        return None
    if init == "mica":  # the file holds both factors and the base is unchanged; the sites load with B frozen
        return None
    if init in ("pissa", "olora"):
        return init
    convert = (
        "Convert it with PEFT to a plain LoRA relative to the original base: "
        "peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=<folder of the adapter saved before "
        "training>), then load `out`."
    )
    if isinstance(init, str) and init.startswith(("pissa_niter_", "corda", "astra", "loftq")):
        raise UnsupportedAdapterError(
            f"the LoRA adapter in {folder!r} was saved with init_lora_weights={init!r}: its factors are relative to a "
            "base PEFT rebuilds on load with a randomized SVD, calibration data (CorDA, Astra) or quantization, which "
            f"jpeft cannot reproduce. {convert}"
        )
    raise UnsupportedAdapterError(
        f"the LoRA adapter in {folder!r} has init_lora_weights={init!r}, which jpeft does not know; supported: "
        f"{list(_PLAIN_INITS)}, 'mica', 'pissa' and 'olora'. {convert}"
    )


def _keys_of(path, t):
    return [peft_key(path, n) for n in sorted(t)]


def _lora_nodes(adapter):
    for node in adapter.values():
        node = node.inner if isinstance(node, scan.Stacked) else node
        if isinstance(node, LoraWeights):
            yield node


def lora_hf_base(config: LoraConfig, adapter):
    """``Method.hf_base`` of LoRA: for an adapter whose sites are relative to a PiSSA/OLoRA
    residual base, ``("init_lora_weights=<init>", fn)`` with ``fn(params)`` the residual base
    PEFT computes on load."""
    kinds = {n.residual for n in _lora_nodes(adapter)} - {None}
    if not kinds:
        return None
    kind = sorted(kinds)[0]
    return f"init_lora_weights={kind!r}", lambda params: pissa.residual_params(config, params, adapter, kind)


# adapter_config.json keys of LoRA's format (read by AdaLoRA's and LyCORIS's too), and their JSON types
_HF_VALUE_TYPES = {
    "r": (int,), "lora_alpha": (int, float), "lora_dropout": (int, float), "use_rslora": FLAG, "use_dora": FLAG,
    "rank_pattern": (dict, type(None)), "alpha_pattern": (dict, type(None)),
}


def _check_hf_keys(d: Mapping[str, Any]) -> None:
    """``Method.check_hf_keys`` of LoRA: its keys' JSON types, the patterns of ``rank_pattern``
    and ``alpha_pattern`` (regexes RE2 takes) and their values, and a finite ``lora_alpha``.

    Raises:
      ConfigError: naming the key.
    """
    check_value_types(d, _HF_VALUE_TYPES)
    for k in ("rank_pattern", "alpha_pattern"):
        for pat, v in (d.get(k) or {}).items():
            compile_pattern(pat)
            # rank_pattern: LoRA's ranks, or AdaLoRA's kept-triplet masks (checked by its config)
            ok = ((isinstance(v, int) and v > 0) or (isinstance(v, list) and all(isinstance(b, bool) for b in v))) \
                if k == "rank_pattern" else (isinstance(v, (int, float)) and 0 < v <= float(np.finfo(np.float32).max))
            if isinstance(v, bool) or not ok:
                raise ConfigError(f"{k}[{pat!r}] must be a positive {'integer' if k == 'rank_pattern' else 'finite number'}, "
                                  f"found {str(v)[:80]}")
    if "lora_alpha" in d and not 0 < d["lora_alpha"] <= float(np.finfo(np.float32).max):
        raise ConfigError(f"'lora_alpha' must be a positive finite number, found {d['lora_alpha']!r}")


# PEFT's standalone trainable tokens are LoRA's trainable_token_indices here
_PEFT_HINTS = (("TRAINABLE_TOKENS", (
    " PEFT's standalone TrainableTokensConfig is not read; jpeft trains and reads token rows as part of a LoRA "
    "adapter: in PEFT, train them with LoraConfig(target_modules=[...], trainable_token_indices=[...]) and save "
    "that; in jpeft, use jpeft.LoraConfig(trainable_token_indices=...) (docs/METHODS.md, trainable tokens).")),)


def _tied_residual_mismatch(d, leaves, path: str) -> None:
    """``Method.hf_base_mismatch`` of LoRA: a PiSSA/OLoRA file with ``ensure_weight_tying`` on a tied base: PEFT puts the residual
    init on the ``lm_head`` it ties to the targeted embedding, so the shared table it saves as the
    embedding's base copy is that residual (every row differs from the base), while PEFT's Embedding
    layer keeps its own factors plain on it. jpeft rebuilds a residual base per adapted kernel, not
    one table shared by a plain embedding site and a residual output projection: refused by what
    made the file (the base copy's row check would say a re-initialised table)."""
    init = d.get("init_lora_weights")
    if not (d.get("ensure_weight_tying") and isinstance(init, str) and init.lower().startswith(("pissa", "olora"))
            and tied_embedding("lm_head", leaves) is not None):
        return
    raise UnsupportedAdapterError(
        f"the adapter in {path!r} was saved with init_lora_weights={init!r} and ensure_weight_tying=True on a base with "
        "tied word embeddings: PEFT's residual init on the tied lm_head rewrote the shared embedding table (the file's "
        "embedding base copy is that residual), and jpeft cannot rebuild a residual table that a "
        "plain embedding LoRA and a residual output projection share. Train it without ensure_weight_tying (PEFT then "
        "adapts the input embedding only, which jpeft loads), or leave the embedding out of target_modules.")


LORA = register_method(Method(
    config=LoraConfig,
    init=init_lora,
    nodes=(LoraWeights, SavedModule, TrainableTokens),
    to_hf=_lora_to_hf,
    from_hf=_lora_from_hf,
    hf_config=_lora_hf_config,
    hf_base=lora_hf_base,
    hf_base_mismatch=_tied_residual_mismatch,
    check_hf_keys=_check_hf_keys,
    peft_hints=_PEFT_HINTS,
    budget=budget_rows,
    from_low_rank=from_low_rank,
))
