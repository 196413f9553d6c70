"""``jpeft merge``: fold an adapter into the base weights and save a Hugging Face folder."""

from __future__ import annotations

import os

import jpeft
from _jpeft_args import add_merge as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft.cli._ckpt import find_adapter, load_adapter_with_base, note_quantized_training, run_folder_of, untie_for
from jpeft.cli._model import example_ids, load_folder, save_folder
from jpeft.errors import SaveError
from jpeft._files import check_folder



def check_out(out: str, force: bool, **inputs: str) -> None:
    """Refuses an ``--out`` that is a file, a non-empty folder without ``--force``, or one of
    the command's input folders (``inputs``: option name -> path), even with ``--force``:
    writing there would replace the base model's weights (``merge``) or make the base folder
    load with the adapter attached (``export``). The same holds for the folder ``--adapter``
    is actually read from (a run folder's ``adapter/`` or newest checkpoint) and any folder
    holding it (the run folder, where an export would be read before the run's ``adapter/``)."""
    check_folder(out, "--out")
    for name, path in inputs.items():
        if path is not None and os.path.isdir(path) and os.path.realpath(path) == os.path.realpath(out):
            raise SaveError(f"--out {out!r} is the {name} folder; writing there would replace what the command reads "
                            f"(--force does not allow it). Give a new folder for the output.")
    adapter = inputs.get("--adapter")
    if adapter is not None and os.path.isdir(out):
        # the folder actually read (a run's adapter/ or newest checkpoint) and the run folder holding it: writing
        # there mixes the output into the run, and a later --adapter RUN would read a PEFT export before adapter/
        found = find_adapter(adapter).path
        if os.path.realpath(out) in (os.path.realpath(found), run_folder_of(found)):
            raise SaveError(f"--out {out!r} holds the adapter the command reads ({found}); writing there would mix the "
                            "output into that adapter or its run folder, and a later --adapter of the run could read "
                            "the output instead (--force does not allow it). Give a new folder for the output.")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise SaveError(f"--out {out!r} is not empty; pass --force to overwrite its files.")


def run(args) -> int:
    check_out(args.out, args.force, **{"--model": args.model, "--adapter": args.adapter})
    # save_folder copies the tokenizer files as they are; a PEFT folder adapting lm_head reads a tied base untied
    loaded = load_folder(args.model, tokenizer=False, untie=untie_for(args.adapter, args.model))
    # a PiSSA/OLoRA PEFT folder applies to the residual base PEFT recomputes: merged into it, as merge_and_unload()
    adapter, config, base = load_adapter_with_base(args.adapter, params=loaded.params, model=loaded.model,
                                                   example=example_ids())
    note_quantized_training(args.adapter, None, "merging it into the full-precision weights of --model, as PEFT's "
                            "merge_and_unload() does; the merged model's outputs differ from the quantized training "
                            "model's by the quantization error.")
    merged = jpeft.merge(base, adapter)
    save_folder(args.out, loaded, merged, base=base)
    print(f"merged {config.peft_type} adapter {args.adapter} into {args.model}; saved to {os.path.abspath(args.out)}")
    return 0
