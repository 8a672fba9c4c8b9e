# SPDX-License-Identifier: Apache-2.0
"""Training plans: the model and the local training loop researcher and nodes share.

A plan is a :class:`TrainingPlan` subclass registered by name
(:func:`register_plan`, :func:`get_plan`); the researcher names it in
``Experiment(training_plan="mlp", training_args={...})`` and each node maps the
name to the class in its ``[plans]`` table (``mlp = "secagg.plans:MLPPlan"``).
Both sides build the same architecture from the same ``training_args``, so the
researcher's global ``state_dict`` loads on every node.

``training_args`` is the one dict the researcher sends. It holds

- the **loop** keys, common to every plan: exactly one of ``num_updates`` (the
  number of optimizer steps, one mini-batch each; recommended with secure
  aggregation, as in Fed-BioMed, because every node then does the same amount
  of work whatever its data size) or ``epochs`` (passes over the local data);
  ``batch_size`` (default 32), ``lr`` (default 0.1; plain SGD) and ``seed``
  (default 0; fixes the mini-batch order);
- the plan's **model** keys (:attr:`TrainingPlan.model_args`), which fix the
  architecture. For ``"mlp"``: ``in_features`` (default 20), ``n_classes``
  (default 4) and ``hidden`` (default 32); the defaults match
  :func:`secagg.data.synthetic_classification`. A node whose data has another
  number of features, or labels outside ``[0, n_classes)``, refuses to train
  with a :class:`~mpc_runtime.errors.ConfigError`.

Any other key is refused, by name, so a typo (``"num_update"``) cannot silently
fall back to a default.

torch is imported lazily, so ``import secagg.plans`` never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar, Final, TypeVar

import numpy as np

from mpc_runtime import messages
from mpc_runtime.errors import ConfigError

from .tensors import _require_torch

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOSS_STREAM",
    "LOOP_DEFAULTS",
    "WEIGHTS_STREAM",
    "MLPPlan",
    "TrainingPlan",
    "get_plan",
    "register_plan",
    "registered_plans",
    "resolve_plan",
    "run_local_update",
]

#: The streams of a training round: the flattened trained weights
#: (:func:`secagg.tensors.flatten`), and the node's mean training loss, shape (1,).
WEIGHTS_STREAM: Final = "weights"
LOSS_STREAM: Final = "loss"

#: The loop keys of ``training_args`` and their defaults (``None``: no default;
#: exactly one of ``num_updates`` and ``epochs`` must be given).
LOOP_DEFAULTS: Final[Mapping[str, int | float | None]] = {
    "num_updates": None,
    "epochs": None,
    "batch_size": 32,
    "lr": 0.1,
    "seed": 0,
}

Metrics = dict[str, float | int]
_P = TypeVar("_P", bound="type[TrainingPlan]")


def _positive_int(value: object, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(
            f"expected training_args[{key!r}] an integer, got {type(value).__name__}"
        )
    if value < minimum:
        raise ConfigError(f"expected training_args[{key!r}] >= {minimum}, got {value}")
    return int(value)


class TrainingPlan:
    """Base class of training plans: a model factory plus local SGD training.

    Subclasses set :attr:`name`, declare their architecture keys in
    :attr:`model_args` (name -> default, all integers) and implement
    :meth:`build`. The loop (:meth:`train`) and :meth:`evaluate` are shared:
    cross-entropy on class labels, SGD with a constant learning rate.

    Parameters
    ----------
    **model_args : int
        Values for :attr:`model_args` keys; missing ones take their defaults.

    Raises
    ------
    ConfigError
        An unknown model key or a value that is not an integer >= 1.
    """

    #: The registry name (what ``Experiment(training_plan=...)`` says).
    name: ClassVar[str] = ""
    #: Architecture keys and their defaults; part of ``training_args``.
    model_args: ClassVar[Mapping[str, int]] = {}

    def __init__(self, **model_args: object) -> None:
        unknown = sorted(set(model_args) - set(self.model_args))
        if unknown:
            raise ConfigError(
                f"unknown model argument(s) {unknown} for plan {self.name!r} "
                f"(expected some of {sorted(self.model_args)})"
            )
        self.args: dict[str, int] = {
            k: _positive_int(model_args.get(k, default), k)
            for k, default in self.model_args.items()
        }

    @classmethod
    def from_training_args(cls, training_args: Mapping[str, object]) -> TrainingPlan:
        """Build the plan from the model keys of ``training_args`` (after checking
        all of them with :meth:`check_training_args`).

        Raises
        ------
        ConfigError
            ``training_args`` is invalid.
        """
        args = cls.check_training_args(training_args)
        return cls(**{k: args[k] for k in cls.model_args})

    @classmethod
    def check_training_args(
        cls, training_args: Mapping[str, object] | None
    ) -> dict[str, int | float]:
        """Validate ``training_args`` and return it with every default filled in.

        The result has ``batch_size``, ``lr``, ``seed``, every model key, and
        exactly one of ``num_updates`` and ``epochs``.

        Raises
        ------
        ConfigError
            Not a mapping, an unknown key, a value of the wrong type or range, or
            neither or both of ``num_updates`` and ``epochs``; the message names
            the key.
        """
        if training_args is None:
            training_args = {}
        if not isinstance(training_args, Mapping):
            raise ConfigError(
                f"expected training_args a dict, got {type(training_args).__name__}"
            )
        allowed = set(LOOP_DEFAULTS) | set(cls.model_args)
        unknown = sorted(str(k) for k in training_args if k not in allowed)
        if unknown:
            raise ConfigError(
                f"unknown training_args key(s) {unknown} for plan {cls.name!r} "
                f"(expected some of {sorted(allowed)})"
            )
        given = [k for k in ("num_updates", "epochs") if k in training_args]
        if len(given) != 1:
            raise ConfigError(
                "expected exactly one of training_args['num_updates'] (optimizer "
                f"steps) and training_args['epochs'], got {given or 'neither'}"
            )
        out: dict[str, int | float] = {}
        for key in given:
            out[key] = _positive_int(training_args[key], key)
        out["batch_size"] = _positive_int(
            training_args.get("batch_size", 32), "batch_size"
        )
        out["seed"] = _positive_int(training_args.get("seed", 0), "seed", minimum=0)
        lr = training_args.get("lr", 0.1)
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.floating)):
            raise ConfigError(
                f"expected training_args['lr'] a number, got {type(lr).__name__}"
            )
        if not (math.isfinite(lr) and lr > 0):
            raise ConfigError(f"expected training_args['lr'] finite and > 0, got {lr}")
        out["lr"] = float(lr)
        for key, default in cls.model_args.items():
            out[key] = _positive_int(training_args.get(key, default), key)
        return out

    def build(self) -> torch.nn.Module:
        """Return a new, freshly initialised model of this plan's architecture."""
        raise NotImplementedError

    def model(self, seed: int = 0) -> torch.nn.Module:
        """Return the model with a deterministic initialisation from ``seed``.

        :meth:`build` runs with torch's CPU generator seeded with ``seed`` inside
        ``torch.random.fork_rng``, so every layer type gets torch's default
        initialisation, reproducibly, and the caller's global random state is
        restored afterwards. (Another thread drawing from torch's global
        generator during the call would see the seeded state: build models
        before starting such threads.)

        Raises
        ------
        ConfigError
            ``seed`` is not an integer >= 0.
        """
        _require_torch()
        import torch

        seed = _positive_int(seed, "seed", 0)
        # devices=[]: only the CPU generator is forked (no CUDA warning or cost).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build()

    def check_data(self, X: np.ndarray, y: np.ndarray) -> None:
        """Refuse data the model cannot take (shapes, dtypes, label range).

        Raises
        ------
        ConfigError
            What is wrong with ``X`` or ``y``.
        """
        if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray):
            raise ConfigError(
                f"expected numpy arrays X and y, got {type(X).__name__} "
                f"and {type(y).__name__}"
            )
        if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0] or not len(y):
            raise ConfigError(
                "expected X [n, features] and y [n] with n >= 1, got shapes "
                f"{list(X.shape)} and {list(y.shape)}"
            )
        if y.dtype.kind not in "iu":
            raise ConfigError(f"expected integer labels y, got dtype {y.dtype}")

    def train(
        self,
        model: torch.nn.Module,
        X: np.ndarray,
        y: np.ndarray,
        training_args: Mapping[str, object] | None,
    ) -> Metrics:
        """Train ``model`` in place on ``(X, y)`` with SGD; return metrics.

        Each optimizer step takes one mini-batch of ``batch_size`` rows from a
        random permutation of the data (a new permutation each pass, the last
        batch of a pass may be smaller, as ``DataLoader(shuffle=True)``).

        Returns
        -------
        dict
            ``loss`` (mean training cross-entropy over the steps), ``n_samples``
            (rows of local data) and ``num_updates`` (steps taken).

        Raises
        ------
        ConfigError
            Invalid ``training_args`` or data.
        """
        _require_torch()
        import torch

        args = self.check_training_args(training_args)
        self.check_data(X, y)
        inputs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
        targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        n = len(targets)
        batch = min(int(args["batch_size"]), n)
        per_epoch = math.ceil(n / batch)
        steps = int(args.get("num_updates") or int(args["epochs"]) * per_epoch)
        generator = torch.Generator().manual_seed(int(args["seed"]))
        optimizer = torch.optim.SGD(model.parameters(), lr=float(args["lr"]))
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        total = 0.0
        order = torch.randperm(n, generator=generator)
        for step in range(steps):
            start = (step % per_epoch) * batch
            if step and start == 0:
                order = torch.randperm(n, generator=generator)
            idx = order[start : start + batch]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[idx]), targets[idx])
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
        return {"loss": total / steps, "n_samples": n, "num_updates": steps}

    def evaluate(self, model: torch.nn.Module, X: np.ndarray, y: np.ndarray) -> Metrics:
        """Return ``loss`` (mean cross-entropy), ``accuracy`` and ``n_samples``.

        Raises
        ------
        ConfigError
            Invalid data.
        """
        _require_torch()
        import torch

        self.check_data(X, y)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                inputs = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
                targets = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
                logits = model(inputs)
                loss = torch.nn.functional.cross_entropy(logits, targets)
                correct = (logits.argmax(dim=1) == targets).sum()
        finally:
            model.train(was_training)
        return {
            "loss": float(loss),
            "accuracy": int(correct) / len(y),
            "n_samples": len(y),
        }


_REGISTRY: dict[str, type[TrainingPlan]] = {}


def register_plan(cls: _P) -> _P:
    """Register a plan class under its :attr:`~TrainingPlan.name`; usable as a
    decorator. Registering the same class again is a no-op.

    Raises
    ------
    ConfigError
        ``cls`` is not a :class:`TrainingPlan` subclass, its name is invalid, or
        another class already has the name.
    """
    if not (isinstance(cls, type) and issubclass(cls, TrainingPlan)):
        raise ConfigError(f"expected a TrainingPlan subclass, got {cls!r:.200}")
    try:
        messages.check_name(cls.name, "plan name")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__qualname__}: {e}") from None
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing is not cls:
        raise ConfigError(
            f"plan name {cls.name!r} is already registered by "
            f"{existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def get_plan(name: str) -> type[TrainingPlan]:
    """Return the plan class registered as ``name``.

    Raises
    ------
    ConfigError
        No plan has that name; the message lists the registered ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(
            f"unknown training plan {name!r:.200} "
            f"(registered: {', '.join(sorted(_REGISTRY)) or 'none'})"
        ) from None


def resolve_plan(reference: str) -> type[TrainingPlan]:
    """Import a node's ``[plans]`` entry ``"module:Class"`` and return the class.

    Importing the module registers its plans as a side effect, as usual.

    Raises
    ------
    ConfigError
        A malformed reference, a module that fails to import (only the
        exception's type is reported), or an attribute that is not a
        :class:`TrainingPlan` subclass.
    """
    from .config import import_reference

    cls = import_reference(reference, "plan")
    if not (isinstance(cls, type) and issubclass(cls, TrainingPlan)):
        raise ConfigError(f"{reference!r} is not a TrainingPlan subclass")
    return cls


def registered_plans() -> tuple[str, ...]:
    """The registered plan names, sorted."""
    return tuple(sorted(_REGISTRY))


@register_plan
class MLPPlan(TrainingPlan):
    """``"mlp"``: Linear(in_features, hidden) - ReLU - Linear(hidden, n_classes).

    Model keys of ``training_args``: ``in_features`` (20), ``n_classes`` (4) and
    ``hidden`` (32), defaults matching :func:`secagg.data.synthetic_classification`.
    """

    name: ClassVar[str] = "mlp"
    model_args: ClassVar[Mapping[str, int]] = {
        "in_features": 20,
        "n_classes": 4,
        "hidden": 32,
    }

    def build(self) -> torch.nn.Module:
        _require_torch()
        import torch

        a = self.args
        return torch.nn.Sequential(
            torch.nn.Linear(a["in_features"], a["hidden"]),
            torch.nn.ReLU(),
            torch.nn.Linear(a["hidden"], a["n_classes"]),
        )

    def check_data(self, X: np.ndarray, y: np.ndarray) -> None:
        super().check_data(X, y)
        if X.shape[1] != self.args["in_features"]:
            raise ConfigError(
                f"expected X with {self.args['in_features']} features (plan "
                f"argument in_features), got {X.shape[1]}"
            )
        if y.min() < 0 or y.max() >= self.args["n_classes"]:
            raise ConfigError(
                f"expected labels in [0, {self.args['n_classes']}) (plan argument "
                f"n_classes), got values in [{y.min()}, {y.max()}]"
            )


def run_local_update(
    plan: TrainingPlan,
    global_state_dict: Mapping[str, torch.Tensor],
    X: np.ndarray,
    y: np.ndarray,
    training_args: Mapping[str, object] | None,
) -> tuple[dict[str, torch.Tensor], Metrics]:
    """The node's side of one round: load the global weights, train, return them.

    Parameters
    ----------
    plan : TrainingPlan
        The plan instance (``get_plan(name).from_training_args(training_args)``).
    global_state_dict : Mapping[str, torch.Tensor]
        The researcher's current model; it is copied, never modified.
    X, y : numpy.ndarray
        The node's local data (:func:`secagg.data.load_arrays`).
    training_args : Mapping[str, object] or None
        As for :meth:`TrainingPlan.train`.

    Returns
    -------
    state_dict : dict[str, torch.Tensor]
        The trained weights (own memory, no gradient), ready for
        :func:`secagg.tensors.flatten` and secure aggregation.
    metrics : dict
        :meth:`TrainingPlan.train`'s metrics.

    Raises
    ------
    ConfigError
        Invalid ``training_args`` or data, model keys in ``training_args`` that
        differ from ``plan.args``, or global weights that do not fit the plan's
        architecture.

    Notes
    -----
    Training runs on one intra-op thread: node daemons set ``OMP_NUM_THREADS=1``
    and this function calls ``torch.set_num_threads(1)`` too, so a node does not
    compete with the masking kernel or oversubscribe a shared host (for models of
    this size, more threads only add synchronisation). The setting is process-wide
    and stays in force after the call: restoring a larger value made the next
    multi-threaded call re-create torch's thread pool, which cost seconds on a
    loaded 2-core host. It is done here, not at import time, so merely importing
    the plans never touches torch.
    """
    _require_torch()
    import torch

    if not isinstance(plan, TrainingPlan):
        raise ConfigError(f"expected a TrainingPlan, got {type(plan).__name__}")
    args = plan.check_training_args(training_args)
    differ = sorted(k for k, v in plan.args.items() if args[k] != v)
    if differ:
        raise ConfigError(
            f"training_args model key(s) {differ} differ from the plan's "
            f"{plan.args}: build the plan with from_training_args"
        )
    model = plan.model()
    try:
        model.load_state_dict(dict(global_state_dict), strict=True)
    except (RuntimeError, TypeError, AttributeError) as e:
        # load_state_dict raises RuntimeError listing missing/unexpected keys and
        # shape mismatches: names and shapes only, never values.
        raise ConfigError(
            f"the global weights do not fit plan {plan.name!r}: {e}"
        ) from None
    # One intra-op thread: see Notes. Not restored afterwards (see Notes).
    torch.set_num_threads(1)
    metrics = plan.train(model, X, y, training_args)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, metrics
