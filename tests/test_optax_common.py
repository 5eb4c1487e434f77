"""optax's own generic optimizer checks, run on ``lora_muon``.

The test bodies come from ``optax/contrib/_common_test.py`` (``ContribTest``),
which ships in the optax wheel. That module is **private**: its targets,
helpers and tolerances can change in any release, so the test extra pins optax
exactly (``optax==0.2.8`` in pyproject.toml) and this module checks the version.

How the reuse works: ``absl.testing.parameterized`` expands every upstream test
into ``test_x0, test_x1, ...``; each expanded method is a ``functools.wraps``
wrapper whose ``__wrapped__`` is the original, unparameterized function. We
re-parameterize that original over our own cases. The upstream module is imported
under an alias so pytest does not collect (and run) its ~400 upstream cases, and
``lora_muon`` is registered on ``optax.contrib`` because the bodies look the
optimizer up by name there.

The upstream targets (parabola, Rosenbrock, 2x2 matrix) contain no LoRA pair, so
every leaf goes to ``lora_muon``'s AdamW fallback: these cases check the
fallback plumbing and optax interoperability (``optax.partition``, extra args,
``inject_hyperparams``, ``MultiSteps``, dtypes, schedules). The same properties
on trees that do contain LoRA pairs are in ``test_composability.py``.
"""

from __future__ import annotations

import inspect
import unittest

import jax
import optax
import optax.contrib
import pytest
from absl.testing import parameterized
from optax.contrib import _common_test as optax_common

import lora_muon_jax

if optax.__version__ != "0.2.8":
    pytest.skip(
        f"optax/contrib/_common_test.py is private; these tests are pinned to optax 0.2.8, "
        f"found {optax.__version__}",
        allow_module_level=True,
    )

# The upstream bodies call `getattr(optax.contrib, opt_name)(**opt_kwargs)`.
optax.contrib.lora_muon = lora_muon_jax.lora_muon  # type: ignore[attr-defined]

_CASES = tuple(
    {
        "opt_name": "lora_muon",
        # No LoRA pair in optax's targets: opt out of the no-pair error, and give the
        # fallback its learning rate (the same 1e-2 it defaulted to) so it is not reported.
        "opt_kwargs": {
            "learning_rate": 1e-2,
            "method": method,
            "allow_no_pairs": True,
            "fallback_learning_rate": 1e-2,
        },
        "wrapper_name": None,
        "wrapper_kwargs": None,
    }
    for method in ("gram", "paper")
)

# The upstream convergence test scans 30,000 jitted steps per (case, target); measured at
# < 0.3 s per case on 2 CPU cores, so all four upstream targets are kept (no restriction).
_TARGETS = (
    optax_common._setup_parabola,
    optax_common._setup_rosenbrock,
    optax_common._setup_matrix_parabola,
    optax_common._setup_mixed_tensor_target,
)


def _upstream(name: str):
    """The original (unparameterized) body of ``ContribTest.<name>``."""
    expanded = getattr(optax_common.ContribTest, f"{name}0")
    body = expanded.__wrapped__
    # Guard against absl/optax changing how the original is stored.
    assert body.__name__ == name and "opt_name" in inspect.signature(body).parameters, body
    return body


def _standard_promotion(body):
    """Run an upstream body under standard dtype promotion.

    tests/conftest.py enables ``jax_numpy_dtype_promotion='strict'``. Used only where
    optax's own code (not lora_muon_jax, not the test body) trips over it.
    """

    def wrapped(self, *args, **kwargs):
        with jax.numpy_dtype_promotion("standard"):
            return body(self, *args, **kwargs)

    wrapped.__name__ = body.__name__
    return wrapped


def _no_skip(body):
    """Turn an upstream ``skipTest`` into a failure: a skipped check checks nothing."""

    def wrapped(self, *args, **kwargs):
        try:
            return body(self, *args, **kwargs)
        except unittest.SkipTest as e:
            self.fail(f"upstream check skipped itself for lora_muon: {e}")

    wrapped.__name__ = body.__name__
    return wrapped


class LoraMuonOptaxCommonTest(parameterized.TestCase):
    test_optimizers_accept_extra_args = parameterized.product(_CASES, wrap=[True, False])(
        _upstream("test_optimizers_accept_extra_args")
    )

    test_optimizers = parameterized.product(_CASES, target=_TARGETS, dtype=("float32",))(
        _upstream("test_optimizers")
    )

    test_optimizers_can_be_wrapped_in_inject_hyperparams = parameterized.product(_CASES)(
        _upstream("test_optimizers_can_be_wrapped_in_inject_hyperparams")
    )

    test_preserve_dtype = parameterized.product(_CASES, dtype=("bfloat16", "float32"))(
        _upstream("test_preserve_dtype")
    )

    # optax.MultiSteps itself is not strict-promotion clean (optax 0.2.8,
    # _accumulation.py: `acc + (grad - acc) / (n_acc + 1)` divides by an int32 count,
    # mixes its float32 accumulator with bf16 grads and multiplies int32 by bool), so
    # only this body runs under standard promotion; every other upstream body runs under
    # the conftest's strict mode. The same property on a tree with LoRA pairs is in
    # test_composability.py::test_multi_steps.
    test_gradient_accumulation = parameterized.product(_CASES, dtype=("bfloat16", "float32"))(
        _standard_promotion(_upstream("test_gradient_accumulation"))
    )

    test_state_shape_dtype_shard_stability = parameterized.product(
        _CASES, dtype=(jax.numpy.float16, jax.numpy.bfloat16, jax.numpy.float32, jax.numpy.float64)
    )(_upstream("test_state_shape_dtype_shard_stability"))

    # A skip would hide that lora_muon's signature is unreadable to optax (see below).
    test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such = parameterized.product(
        _CASES
    )(
        _no_skip(
            _upstream("test_optimizers_accept_learning_rate_schedule_if_type_annotated_as_such")
        )
    )


def test_learning_rate_annotation_is_visible_to_inspect() -> None:
    """optax's schedule check reads the *unevaluated* annotation with ``inspect.signature``.

    If the module defining ``lora_muon`` uses ``from __future__ import annotations``
    the annotation is the string ``'optax.ScalarOrSchedule'`` and optax's generic
    schedule test silently skips itself.
    """
    annotation = inspect.signature(lora_muon_jax.lora_muon).parameters["learning_rate"].annotation
    assert annotation in (optax.ScalarOrSchedule, optax.Schedule), repr(annotation)
