"""The README's quickstart runs as written, and its two set-up commands are what CI runs."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quickstart_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_quickstart_runs_and_learns():
    ns: dict = {}
    exec(compile(_quickstart_code(), "README-quickstart", "exec"), ns)
    import jax.numpy as jnp

    jpeft, model, params, adapter, x = ns["jpeft"], ns["model"], ns["params"], ns["adapter"], ns["x"]
    assert float(ns["metrics"]["loss"]) < 0.2
    np.testing.assert_allclose(model.apply(ns["merged"], x), jpeft.apply(model, params, adapter, x), atol=1e-5)
    assert jnp.isfinite(ns["metrics"]["loss"])


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = [l for l in readme.splitlines() if l.startswith("python3 -m venv")]
    assert len(cmds) == 2, "the README gives exactly two set-up commands"
    assert cmds[1] in ci
