"""Split-Digits: scikit-learn's bundled 8x8 handwritten digits split into 5 two-class tasks
(0/1, 2/3, 4/5, 6/7, 8/9), the usual stand-in for Split-MNIST, in the two scenarios of van
de Ven & Tolias (2019):

* **task-incremental** (``scenario="task"``): the task's identity is given at train and test
  time; the network has one 10-way output layer and each task uses only its own two units
  ("multi-headed" by masking);
* **class-incremental** (``scenario="class"``): no task identity; after task ``i`` the model
  must choose among all ``2 (i + 1)`` classes seen so far.

Data: the 1,797 images scaled to ``[0, 1]``, one fixed stratified 70/30 train/test split
(``random_state=0``), so seeds change initialisation and batch order only. Model: a linen
MLP 64-128-128-10 with ReLU (:class:`MLP`).

>>> b = SplitDigits("task", steps_per_task=1)
>>> b.task_names
('0/1', '2/3', '4/5', '6/7', '8/9')
>>> b.train_set(0)["x"].shape[1]
64
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.errors import ConfigError
from jpeft.forgetting import regularizers as R
from jpeft.forgetting.benchmark import Benchmark, MethodSpec

NEG = -1e9


class MLP(nn.Module):
    """A small ReLU MLP classifier (``Dense_0`` ... ``Dense_{len(hidden)}``)."""

    hidden: Sequence[int] = (128, 128)
    classes: int = 10

    @nn.compact
    def __call__(self, x):
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.classes)(x)


def load_split_digits(test_size: float = 0.3):
    """``(x_train, y_train, x_test, y_test)`` from ``sklearn.datasets.load_digits``, scaled to
    ``[0, 1]``, stratified split with ``random_state=0``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


class SplitDigits(Benchmark):
    """The Split-Digits benchmark (module docstring).

    Args:
      scenario: ``"task"`` or ``"class"``.
      steps_per_task: Adam steps per task.
      batch_size: examples per step.
      hidden: MLP hidden widths.
      num_tasks: use only the first ``num_tasks`` tasks (for quick checks).
    """

    score_name = "accuracy"
    higher_is_better = True
    fisher_estimator = "exact"
    learning_name = "mean accuracy on each task just after training it"

    def __init__(self, scenario: str = "task", *, steps_per_task: int = 300, batch_size: int = 32, hidden=(128, 128),
                 num_tasks: int = 5):
        if scenario not in ("task", "class"):
            raise ConfigError(f"scenario must be 'task' or 'class', found {scenario!r}.")
        if num_tasks not in (2, 3, 4, 5):
            raise ConfigError(f"num_tasks must be 2 to 5 (the first tasks of 0/1, 2/3, 4/5, 6/7, 8/9), found {num_tasks!r}.")
        self.scenario = scenario
        self.name = f"split-digits-{scenario}"
        self.steps_per_task = int(steps_per_task)
        self.batch_size = int(batch_size)
        self.task_names = ("0/1", "2/3", "4/5", "6/7", "8/9")[:num_tasks]
        self.model = MLP(tuple(hidden))
        xtr, ytr, xte, yte = load_split_digits()
        self._train = [{"x": xtr[(ytr // 2) == t], "y": ytr[(ytr // 2) == t]} for t in range(5)]
        self._test = [{"x": xte[(yte // 2) == t], "y": yte[(yte // 2) == t]} for t in range(5)]
        self._eval = jax.jit(self._eval_logits)

    def settings(self) -> dict:
        return {"hidden": [int(h) for h in self.model.hidden]}

    # -- model ---------------------------------------------------------------------------------
    def example_input(self):
        return (jnp.zeros((1, 64), jnp.float32),)

    def base_params(self, seed: int):
        return self.model.init(jax.random.key(seed), jnp.zeros((1, 64), jnp.float32))

    def train_set(self, t: int) -> dict:
        return self._train[t]

    def class_mask(self, y, t):
        """``[B, 10]`` booleans: the output units a prediction may use (task: the example's own
        task's two units; class: every class seen through task ``t``)."""
        c = jnp.arange(10)
        if self.scenario == "task":
            return (c[None, :] // 2) == (y[:, None] // 2)
        return jnp.broadcast_to(c[None, :] < 2 * (t + 1), (y.shape[0], 10))

    def loss(self, logits, data, t):
        masked = jnp.where(self.class_mask(data["y"], t), logits, NEG)
        return optax.softmax_cross_entropy_with_integer_labels(masked, data["y"]).mean()

    def distill(self, student, teacher, data, t, temperature):
        """LwF: KL to the previous model's predictions on the current inputs, over the output
        units of the earlier tasks (class: one softmax over all old classes; task: one
        softmax per old task's head, averaged over the old tasks). 0 on the first task."""
        if self.scenario == "class":
            old = jnp.arange(10)[None, :] < 2 * t
            s = jnp.where(old, student, NEG)
            te = jnp.where(old, teacher, NEG)
            return jnp.where(t > 0, R.distillation_kl(s, te, temperature=temperature), 0.0)
        B = student.shape[0]
        s = student.reshape(B, 5, 2)
        te = teacher.reshape(B, 5, 2)
        heads = (jnp.arange(5) < t).astype(jnp.float32)
        mask = jnp.broadcast_to(heads[None, :], (B, 5))
        return jnp.where(t > 0, R.distillation_kl(s, te, temperature=temperature, mask=mask), 0.0)

    def fisher_data(self, t: int, n: int):
        d = self._train[t]
        x, y = d["x"][:n], d["y"][:n]
        mask = np.asarray(self.class_mask(jnp.asarray(y), t))
        return self._fisher_out, {"x": jnp.asarray(x), "mask": jnp.asarray(mask)}, jnp.asarray(y), None

    def _fisher_out(self, params, adapter, inputs):
        logits = jpeft.apply(self.model, params, adapter, inputs["x"])
        return jnp.where(inputs["mask"], logits, NEG)

    def _eval_logits(self, params, adapter, x):
        return jpeft.apply(self.model, params, adapter, x)

    def evaluate(self, params, adapter, j: int, step: int) -> float:
        d = self._test[j]
        logits = self._eval(params, adapter, jnp.asarray(d["x"]))
        mask = self.class_mask(jnp.asarray(d["y"]), step)
        pred = jnp.argmax(jnp.where(mask, logits, NEG), axis=-1)
        return float(jnp.mean(pred == jnp.asarray(d["y"])))

    def default_methods(self) -> list:
        """naive, EWC, online EWC, replay, LwF, O-LoRA (a LoRA per task, orthogonal to the
        earlier ones, on the shared network) and (task-incremental only) one LoRA adapter per
        task. Hyper-parameters were set once, before the runs reported in docs/FORGETTING.md,
        from the values the literature uses; none were tuned on these results."""
        full = jpeft.FullFinetuneConfig()
        out = [
            MethodSpec("naive", full, lr=1e-3),
            MethodSpec("EWC", full, lr=1e-3, ewc=1000.0),
            MethodSpec("online EWC", full, lr=1e-3, ewc=1000.0, ewc_gamma=0.9),
            MethodSpec("replay", full, lr=1e-3, replay=0.5, replay_capacity=200),
            MethodSpec("LwF", full, lr=1e-3, distill=1.0, temperature=2.0),
        ]
        # O-LoRA (Wang et al. 2023): lambda_1 = 0.5 as in the paper's T5 runs
        out.append(MethodSpec("O-LoRA", jpeft.LoraConfig(r=8, alpha=16, target_modules=".*"), lr=3e-3, orthogonal=0.5))
        if self.scenario == "task":
            out.append(MethodSpec("LoRA per task", jpeft.LoraConfig(r=8, alpha=16, target_modules=".*"), lr=3e-3,
                                  per_task_adapter=True))
        return out
