"""Every fenced Python and shell block of README.md and docs/*.md runs, so an example can no
longer drift from the code.

A block runs unless the line before its fence says why it cannot:

* ``<!-- docs-test: skip REASON -->``: not run (it needs a GPU, a pod, minutes of compute, or
  names defined in the text around it); its ``jpeft`` names and commands are still checked
  (below), which is the dry run;
* ``<!-- docs-test: write FILE -->``: the block (e.g. a TOML config) is written to FILE in the
  working folder, for the shell blocks after it;
* ``<!-- docs-test: append ARGS -->``: ARGS are appended to each command of a shell block
  (e.g. ``--set train.steps=2`` to keep a training run short).

Python blocks of one document share a namespace (like notebook cells) and run in one
subprocess with the shell blocks (``jpeft ...`` through ``jpeft.cli.main``, ``python -m ...``
through runpy), in a folder holding a tiny ``my-model`` (Llama + tokenizer), ``train.jsonl``
and ``eval.jsonl``. New blocks run with no change here. Besides, for every block, skipped
or not: each ``jpeft.x.y`` name in the docs resolves, each ``jpeft`` command parses with the
real argument parser, each ``python -m MODULE`` names an importable module, and no untagged
block holds commands (tag it ``bash``).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HELPERS = ROOT / "tests" / "helpers"
sys.path.insert(0, str(HELPERS))
import docs_runner  # noqa: E402
import tiny_hf  # noqa: E402

DOCS = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
SHELL = {"bash", "sh", "shell", "console", "zsh"}
KINDS = {"skip", "write", "append"}
_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(\w+)\s*(.*?)\s*-->\s*$")


def blocks(doc: str) -> list[dict]:
    """The fenced blocks of ``doc``: ``{"doc", "line", "lang", "code", "kind", "arg"}``."""
    lines = (ROOT / doc).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(2).lower()
        j = i + 1
        while j < len(lines) and not _FENCE.match(lines[j]):
            j += 1
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        d = _DIRECTIVE.match(prev)
        out.append(dict(doc=doc, line=start + 1, lang=lang, code=textwrap.dedent("\n".join(lines[start + 1:j])) + "\n",
                        kind=d.group(1) if d else None, arg=d.group(2) if d else ""))
        i = j + 1
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]
RUNNABLE = [b for b in ALL if (b["lang"] == "python" or b["lang"] in SHELL or b["kind"] == "write")
            and b["kind"] != "skip"]


def _id(b) -> str:
    return f"{b['doc']}:{b['line']}"


# ---------------------------------------------------------------------------- dry-run checks
def test_directives_are_known_and_skips_say_why():
    for b in ALL:
        if b["kind"] is not None:
            assert b["kind"] in KINDS, f"{_id(b)}: unknown docs-test directive {b['kind']!r}; use one of {sorted(KINDS)}"
            assert b["arg"], f"{_id(b)}: `docs-test: {b['kind']}` needs an argument (the reason, file or arguments)"
    assert RUNNABLE, "no runnable block found: the fence parser is broken"


def test_untagged_blocks_hold_no_commands():
    for b in ALL:
        if b["lang"] == "":
            first = next((ln.strip() for ln in b["code"].splitlines() if ln.strip()), "")
            assert not re.match(r"(\$ )?(jpeft|python3?|pip|bash|\.venv)\b", first), \
                f"{_id(b)} holds commands ({first!r}) but no language: tag the fence ```bash so the docs test runs it"


def _resolve(name: str) -> bool:
    parts = name.split(".")
    obj = importlib.import_module(parts[0])
    for i, p in enumerate(parts[1:], 1):
        if hasattr(obj, p):
            obj = getattr(obj, p)
            continue
        try:
            obj = importlib.import_module(".".join(parts[:i + 1]))
        except ImportError:
            return False
    return True


@pytest.mark.parametrize("doc", DOCS)
def test_every_jpeft_name_in_the_docs_exists(doc):
    text = (ROOT / doc).read_text()
    names = sorted(set(re.findall(r"\bjpeft(?:\.[A-Za-z_]\w*)+", text)))
    imports = re.findall(r"^\s*from (jpeft[\w.]*) import ([\w, ]+)", text, re.M)
    missing = [n for n in names if not _resolve(n)]
    imported = [f"{m}.{a.split(' as ')[0].strip()}" for m, names_ in imports for a in names_.split(",") if a.strip()]
    missing += [n for n in imported if not _resolve(n)]
    assert not missing, f"{doc} names what jpeft does not have: {missing}"


def test_every_command_in_a_shell_block_parses():
    from jpeft.cli import UsageError, build_parser

    parser = build_parser()
    n = 0
    for b in ALL:
        if b["lang"] not in SHELL:
            continue
        for argv in docs_runner.shell_commands(b["code"]):
            if argv[0] == "jpeft":
                n += 1
                try:
                    args, extra = parser.parse_known_args(argv[1:] + shlex.split(b["arg"] if b["kind"] == "append" else ""))
                except UsageError as e:
                    pytest.fail(f"{_id(b)}: `{shlex.join(argv)}` does not parse: {e}")
                except SystemExit as e:  # --help / --version
                    assert e.code == 0, f"{_id(b)}: `{shlex.join(argv)}` exits {e.code}"
                    continue
                assert not extra, f"{_id(b)}: `{shlex.join(argv)}`: unrecognized arguments {extra}"
            elif argv[0].endswith(("python", "python3")) and "-m" in argv:
                mod = argv[argv.index("-m") + 1]
                if mod not in ("venv", "pip", "pytest"):
                    n += 1
                    assert importlib.util.find_spec(mod) is not None, f"{_id(b)}: no module {mod!r}"
    assert n > 0


# ------------------------------------------------------------------------------------- running
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every runnable block once, in one subprocess, and returns its results."""
    work = tmp_path_factory.mktemp("docs")
    tok = tiny_hf.tokenizer()
    tiny_hf.llama_folder(work / "my-model", tok, max_positions=256)
    tiny_hf.jsonl(work / "train.jsonl", 20, 24, chars=600)
    tiny_hf.jsonl(work / "eval.jsonl", 60, 16, chars=600)
    spec = [dict(doc=b["doc"], line=b["line"], lang=b["lang"], code=b["code"],
                 write=b["arg"] if b["kind"] == "write" else None,
                 append=b["arg"] if b["kind"] == "append" else None) for b in RUNNABLE]
    (work / "_blocks.json").write_text(json.dumps(spec))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", MPLBACKEND="Agg", JPEFT_CACHE=str(work / "_cache"),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(HELPERS / "docs_runner.py"), "_blocks.json", "_results.json"], cwd=work,
                       capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, f"the docs runner crashed:\n{r.stderr[-4000:]}"
    return json.loads((work / "_results.json").read_text())


@pytest.mark.parametrize("doc", sorted({b["doc"] for b in RUNNABLE}))
def test_docs_blocks_run(doc, results):
    got = results.get(doc, [])
    want = [b["line"] for b in RUNNABLE if b["doc"] == doc]
    assert [r["line"] for r in got] == want
    failures = [f"{doc}:{r['line']}:\n{r['error']}" for r in got if not r["ok"]]
    assert not failures, "a docs block failed (fix the code or the docs; mark it `<!-- docs-test: skip REASON -->` " \
                         "only if it cannot run here):\n" + "\n".join(failures)


def test_every_cli_option_with_a_default_says_it_in_its_help():
    """`jpeft X --help` states each option's default (the serve timeouts did not)."""
    import argparse

    from jpeft.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"jpeft {name} {'/'.join(a.option_strings)} (default {a.default!r})"
               for name, p in sub.choices.items() for a in p._actions
               if a.option_strings and a.help not in (None, argparse.SUPPRESS) and not isinstance(a.default, bool)
               and a.default not in (None, [], argparse.SUPPRESS) and "default" not in a.help.lower()]
    assert not missing, f"options whose --help does not give their default: {missing}"


_SCRIPT_FLAGS = r'''
import argparse, runpy, sys, json
class Parsed(Exception):
    pass
orig = argparse.ArgumentParser.parse_known_args
def parse_known_args(self, args=None, namespace=None):
    raise Parsed(orig(self, args, namespace)[1])
argparse.ArgumentParser.parse_known_args = parse_known_args
bad = []
out = sys.argv[2]
for where, argv in json.loads(sys.argv[1]):
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        bad.append(f"{where}: {' '.join(argv)}: the script ran without parsing its arguments")
    except Parsed as e:
        if e.args[0]:
            bad.append(f"{where}: {' '.join(argv)}: unrecognized arguments {e.args[0]}")
    except SystemExit as e:
        if e.code not in (None, 0):
            bad.append(f"{where}: {' '.join(argv)}: exits {e.code} (bad arguments)")
with open(out, "w") as f:  # not stdout: some benchmark modules reassign sys.stdout on import
    json.dump(bad, f)
'''


def test_every_repository_script_command_in_the_docs_parses(tmp_path):
    """`python benchmarks/X.py --flags` (and tpu/, examples/) in a shell block: the flags exist.
    Each script's argument parser is run on the documented arguments and nothing else runs
    (one subprocess; `[--optional ...]` brackets and `$F` placeholders are dropped)."""
    cmds, seen = [], set()
    for b in ALL:
        if b["lang"] not in SHELL:
            continue
        code = re.sub(r"\[--[^\]]*\]\]?", "", b["code"]).replace("$F", "")
        for argv in docs_runner.shell_commands(code):
            argv = [a for a in argv if a != "&"]
            if argv[0].endswith(("python", "python3")) and len(argv) > 1 and argv[1].endswith(".py") \
                    and (ROOT / argv[1]).is_file() and tuple(argv[1:]) not in seen:
                seen.add(tuple(argv[1:]))
                cmds.append((_id(b), argv[1:]))
    assert cmds, "no `python <script>.py` command found in the docs"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "bad.json"
    r = subprocess.run([sys.executable, "-c", _SCRIPT_FLAGS, json.dumps(cmds), str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0 and out.exists(), r.stderr[-3000:]
    bad = json.loads(out.read_text())
    assert not bad, "documented script commands whose arguments do not parse:\n" + "\n".join(bad)


def test_the_architecture_module_map_names_every_module():
    """docs/ARCHITECTURE.md's module map has a row for every module of the package (each
    jpeft/*.py, each subpackage) and its jpeft/methods/ row names every file there: a module
    added without a row (jpeft/data.py, errors.py, methods/adalora.py and vera.py had none)
    is a map a reader cannot trust."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Module map"):]
    pkg = ROOT / "jpeft"
    missing = [f"jpeft/{p.name}" for p in sorted(pkg.glob("*.py"))
               if p.name != "__init__.py" and f"`jpeft/{p.name}`" not in table]
    missing += [f"jpeft/{d.name}/" for d in sorted(pkg.iterdir())
                if (d / "__init__.py").is_file() and f"`jpeft/{d.name}/`" not in table]
    methods_row = next(line for line in table.splitlines() if line.startswith("| `jpeft/methods/`"))
    missing += [f"jpeft/methods/{p.name}" for p in sorted((pkg / "methods").glob("*.py"))
                if p.name != "__init__.py" and f"`{p.name}`" not in methods_row]
    assert not missing, f"modules without a row in docs/ARCHITECTURE.md's module map: {missing}"


def test_every_public_name_is_in_the_docs():
    """Each name `jpeft/__init__.py` exports (`jpeft.__all__`) is named in README.md or docs/*.md:
    a public function or class a reader cannot find in the documentation is not part of a small,
    documented API (`adapter_shardings`, `shard_batch`, `AdapterInfo` and five method nodes
    were exported without a word)."""
    import jpeft

    text = "\n".join((ROOT / doc).read_text() for doc in DOCS)
    missing = [n for n in jpeft.__all__ if not n.startswith("__") and not re.search(rf"(?<![\w.])(jpeft\.)?{n}\b", text)]
    assert not missing, f"public names (jpeft.__all__) that README.md and docs/*.md never name: {missing}"
