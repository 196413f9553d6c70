"""Keeps the suite's scratch files inside pytest's own temporary folder (which pytest prunes to
the last three runs): the doctests under jpeft/, the notebooks and the CLI subprocesses call
``tempfile.mkdtemp()`` as a user would, and without this each run left folders in /tmp."""

import os
import tempfile

import pytest


@pytest.fixture(scope="session", autouse=True)
def _scratch_inside_pytest_basetemp(tmp_path_factory):
    scratch = str(tmp_path_factory.mktemp("tempfile"))
    old_dir, old_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = scratch, scratch  # this process and its subprocesses
    yield
    tempfile.tempdir = old_dir
    if old_env is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = old_env
