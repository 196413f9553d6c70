"""``jpeft export``: write a jpeft adapter in the Hugging Face PEFT format."""

from __future__ import annotations

import os

from _jpeft_args import add_export as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft import hf
from jpeft.cli._ckpt import ADAPTER_JSON, checkpoint_steps, load_adapter_with_base, note_quantized_training, untie_for
from jpeft.cli._model import example_ids, load_folder
from jpeft.cli.merge_cmd import check_out
from jpeft.errors import ConfigError, SaveError



def run(args) -> int:
    if args.base_name is not None and not args.base_name.strip():
        # "" fell back to the --model path without a word, though the user asked for another name
        raise ConfigError("--base-name is empty; give the name PEFT should load the base by (a hub name such as "
                          "meta-llama/Llama-2-7b-hf, or a path), or leave the option out for --model's absolute path.")
    check_out(args.out, args.force, **{"--model": args.model, "--adapter": args.adapter})
    held = _held_adapter(args.out)
    if held:
        raise SaveError(f"--out {args.out!r} holds {held}; `--adapter {args.out}` would then read "
                        + ("it instead of the exported PEFT files" if held.startswith("a jpeft") else
                           "the exported PEFT files instead of the run's adapter")
                        + " (--force does not allow it). Give a new folder for the output.")
    loaded = load_folder(args.model, tokenizer=False, untie=untie_for(args.adapter, args.model))
    # a PiSSA/OLoRA PEFT folder: its sites keep their mark, so the export says init_lora_weights as the input did
    adapter, config, _ = load_adapter_with_base(args.adapter, params=loaded.params, model=loaded.model,
                                                example=example_ids())

    hf.save_peft(args.out, config, adapter, base_model_name_or_path=args.base_name or os.path.abspath(args.model))
    note_quantized_training(args.adapter, None, "PEFT applies the exported adapter to whatever base it is loaded on: on "
                            "the full-precision weights of --model its outputs differ from the quantized training model's "
                            "by the quantization error.")
    print(f"exported {config.peft_type} adapter to {os.path.abspath(args.out)} (Hugging Face PEFT format)")
    return 0


def _held_adapter(out: str):
    """What ``out`` already holds that a PEFT export there would mix with: a jpeft adapter
    (``jpeft_adapter.json``, read before PEFT files, so the export would be shadowed) or a
    training run (``adapter/``, ``checkpoints/``: ``--adapter RUN`` would read the export
    instead of the run's adapter); ``None`` when neither."""
    if os.path.isfile(os.path.join(out, ADAPTER_JSON)):
        return f"a jpeft adapter ({ADAPTER_JSON})"
    if (os.path.isfile(os.path.join(out, "adapter", ADAPTER_JSON)) or checkpoint_steps(os.path.join(out, "checkpoints"))
            or checkpoint_steps(out)):
        return "a training run (its adapter/ or checkpoints)"
    return None
