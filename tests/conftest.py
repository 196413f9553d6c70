"""Strict JAX flags for the whole suite (as equinox does): implicit rank promotion raises.

Strict dtype promotion is not used: optax's Adam mixes int and float internally."""

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Helper scripts run in subprocesses (multi-device, multi-process, crash tests): never
# import them while collecting (pytest runs with --doctest-modules).
collect_ignore_glob = ["helpers/*", "_*.py"]
