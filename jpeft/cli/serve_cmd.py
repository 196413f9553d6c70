"""``jpeft serve``: an OpenAI-compatible server for one base model and many LoRA adapters."""

from __future__ import annotations

import errno
import json
import os
import socket

import jax

import jpeft
from _jpeft_args import add_serve as add_parser  # noqa: F401  (the options, defined there: no JAX for --help)
from jpeft.bank import AdapterBank, check_lora
from jpeft.cli._ckpt import load_adapter, note_quantized_training, untie_for
from jpeft.cli._common import parse_targets, say
from jpeft.cli._model import example_ids, load_folder, read_tokenizer
from jpeft.errors import BaseMismatchError, ConfigError, LoadError
from jpeft.generate import as_eos_ids
from jpeft.serve.engine import Engine



def _parse_adapters(items) -> dict:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--adapter expects NAME=PATH, found {item!r}.")
        if name in out:
            raise ConfigError(f"--adapter {name!r} is given twice.")
        out[name.strip()] = path.strip()
    return out


def eos_ids_of(folder: str, tokenizer, hf_config: dict) -> tuple:
    """The token ids that end a completion: the union of ``generation_config.json``'s and
    ``config.json``'s ``eos_token_id`` (an id or a list: chat models end a turn with another id
    than the document end, e.g. Llama 3 Instruct's ``[128001, 128009]``) and the tokenizer's
    (transformers' ``generate`` reads ``generation_config.json``'s alone when there is one)."""
    ids = set(as_eos_ids(getattr(tokenizer, "eos_token_id", None))) | set(as_eos_ids(hf_config.get("eos_token_id")))
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                ids |= set(as_eos_ids(json.load(f).get("eos_token_id")))
        except (OSError, ValueError, TypeError) as e:
            raise LoadError(f"{path!r} is not a readable generation config ({e}); fix or remove it.") from None
    return tuple(sorted(ids))


def _check_port(port: int) -> None:
    if not 1 <= port <= 65535:  # uvicorn took 70000 as port 4464 (70000 mod 65536), printed as 70000
        raise ConfigError(f"--port must be a TCP port, 1 to 65535, found {port}.")


def _check_address(host: str, port: int) -> None:
    """Binds ``host:port`` once and lets it go, before the model loads: a port another server holds
    (or a host this machine does not have) is named now, not in uvicorn's own error line after the
    load and the warm-up."""
    _check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can serve on ({e.strerror}); use an IP "
                          "address such as 127.0.0.1 (this machine only) or 0.0.0.0 (every interface).") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed server's port is free
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"port {port} on {host} is in use by another program; stop it or choose another "
                                  "--port.") from None
            raise ConfigError(f"cannot serve on {host}:{port} ({e.strerror}); choose another --host or --port "
                              "(ports below 1024 need administrator rights).") from None


def build(args):
    """The server the parsed arguments describe (loads the model and adapters)."""
    try:  # Starlette and uvicorn: dependencies of jpeft, imported only here
        from jpeft.serve.app import Server
    except ImportError as e:
        raise ConfigError(f"jpeft serve needs Starlette and uvicorn ({e}); reinstall jpeft (pip install -e .) or pip install starlette uvicorn.") from None

    for name in ("slots", "chunk", "max_queue"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}.")
    _check_port(args.port)
    if args.adapters_root is not None and not os.path.isdir(args.adapters_root):
        raise LoadError(f"--adapters-root {args.adapters_root!r} is not a folder.")
    named = _parse_adapters(args.adapter)
    # an adapter of lm_head on a tied base: the shared base is read untied (lm_head a copy of the embedding), which
    # gives every other adapter and the base exactly the numbers of the tied model, for one vocab x hidden matrix more
    heads = [n for n, p in named.items() if untie_for(p, args.model)]
    loaded = load_folder(args.model, tokenizer=False, dtype=args.dtype, untie=bool(heads))
    model, params = loaded.model, loaded.params
    if heads:
        say(f"note: adapter(s) {', '.join(heads)} adapt lm_head, which config.json ties to the input embedding; the "
            "shared base is read with an lm_head of its own (a copy of the embedding, as PEFT unties it: the same "
            "outputs for the base and every other adapter, one vocab x hidden matrix more memory).")
    try:  # the API answers with text: without the folder's tokenizer every completion would be empty
        tok = read_tokenizer(args.model)
    except LoadError as e:
        raise LoadError(f"jpeft serve answers with text, so it needs the model folder's tokenizer: {e}") from None
    example = example_ids()

    def loader(path):
        note_quantized_training(path, None, "jpeft serve applies it to the full-precision base (it has no --quantize), "
                                "so its outputs differ from the quantized training model's by the quantization error.")
        if untie_for(path, args.model) and not heads:  # the shared base was read tied: it has no lm_head to adapt
            raise BaseMismatchError(
                f"the adapter at {path!r} adapts lm_head, which this server's base ties to the input embedding "
                "(tie_word_embeddings) and holds no lm_head of its own. Restart jpeft serve with this adapter among "
                "the --adapter ones: the shared base is then read with an lm_head of its own (a copy of the embedding, "
                "the same outputs for every other adapter).")
        return load_adapter(path, params=params, model=model, example=example)[0]

    base = args.name or os.path.basename(os.path.normpath(args.model))
    if base in named:  # requests naming it would reach the base model, never the adapter
        raise ConfigError(f"--adapter {base!r} has the base model's name in the API; give the adapter another name, "
                          "or the base another one with --name.")
    adapters = {n: loader(p) for n, p in named.items()}
    vocab = int(model.config.vocab_size)
    if not 0 <= args.trainable_tokens <= vocab:
        raise ConfigError(f"--trainable-tokens must be 0 to the vocabulary size {vocab}, found {args.trainable_tokens}.")
    # the sites adapters added live may use: a LoRA at every --targets module, and where asked, token rows and module
    # copies, laid out by jpeft.init as an adapter with those options has them (tied to lm_head where the base ties)
    cfg = jpeft.LoraConfig(r=1, target_modules=parse_targets(args.targets),
                           trainable_token_indices=list(range(args.trainable_tokens)) or None,
                           modules_to_save=parse_targets(args.modules_to_save))
    reserved = dict(jax.eval_shape(lambda: jpeft.init(cfg, params, jax.random.key(0), model, example)))
    template = dict(reserved)
    for ad in adapters.values():
        template.update(ad)
    # the bank's own check first: a DoRA or IA3 adapter is refused naming the adapter and what the bank holds
    ranks = [int(lr.a.shape[-1]) for name, ad in adapters.items() for lr in check_lora(name, ad).values()]
    # `is None`, not `or`: an explicit 0 is refused by the bank by name rather than read as the default
    max_rank = args.max_rank if args.max_rank is not None else max([16] + ranks)
    capacity = args.capacity if args.capacity is not None else max(8, len(adapters))
    # biases at every linear site: a LoRA with lora_bias (PEFT mixes them in a batch) may be added live too; trainable
    # tokens as many as the --adapter ones hold or --trainable-tokens, modules_to_save copies where they have them or
    # --modules-to-save names
    low = {p: n.routed_low_rank() for p, n in template.items()}
    for p, node in reserved.items():  # a module an --adapter adapts with a LoRA keeps the copy or rows reserved there
        if template[p] is not node:
            res = node.routed_low_rank()
            if res.saved is not None and low[p].saved is None:
                low[p] = low[p]._replace(saved=res.saved)
            if res.tokens is not None and low[p].tokens is None:
                low[p] = low[p]._replace(tokens=res.tokens, tie_output=res.tie_output)
    bank = AdapterBank.create(low, capacity=capacity, max_rank=max_rank, lora_bias=True,
                              max_tokens=args.trainable_tokens)
    for n, ad in adapters.items():
        bank = bank.add(n, ad)
    engine = Engine(model, params, bank, tokenizer=tok, eos_ids=eos_ids_of(args.model, tok, loaded.hf_config),
                    slots=args.slots, max_len=args.max_len, chunk=args.chunk,
                    max_queue=args.max_queue, queue_timeout=args.queue_timeout, request_timeout=args.request_timeout)
    server = Server(engine, base_name=base, tokenizer=tok, adapters_root=args.adapters_root, loader=loader)
    return server


def run(args) -> int:
    from jpeft.serve.app import run as serve  # Starlette and uvicorn (build() checked they import)

    _check_address(args.host, args.port)  # before the model loads
    server = build(args)
    server.engine.warmup()  # compile before listening: the first request does not wait for XLA
    print(f"jpeft serve: {server.base_name} with adapters {list(server.engine.adapters())} on "
          f"http://{args.host}:{args.port}/v1 ({server.engine.slots} slots, bank capacity "
          f"{server.engine.bank.capacity})", flush=True)
    serve(server, args.host, args.port)
    return 0
