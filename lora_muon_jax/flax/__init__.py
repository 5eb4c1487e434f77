"""Flax integration of LoRA-Muon: LoRA layers, model surgery and merging.

Import explicitly (needs ``flax``; the core ``lora_muon_jax`` does not):

* ``lora_muon_jax.flax.linen``: ``LoRADense``, ``LoRADenseGeneral``, ``lora_scale_fn``.
* ``lora_muon_jax.flax.nnx``: ``LoRALinearGeneral``, ``LoRAAdapter``, ``lora_scale_fn``,
  ``lora_dimension_numbers_fn`` (stacked layers' batch axes, declared to the optimizer).
* ``lora_muon_jax.flax.surgery``: NNX in place — ``lorafy``, ``merge_lora``, ``unmerge_lora``.
* ``lora_muon_jax.flax.params``: parameter trees — ``lora_labels``, ``load_pretrained``,
  ``merge_lora_params``/``unmerge_lora_params``, ``qwix_lora_scale`` (qwix rules -> the
  optimizer's ``lora_scale``).

Workflows (NNX, Linen, qwix) with commands: ``docs/flax.md``.

Every layer stores its factors as sibling ``lora_a (*in, r)`` / ``lora_b (r, *out)``, the
layout ``lora_muon`` pairs by default, and declares its scale ``s = α/r`` through
``lora_scale_fn`` (pass it as ``lora_muon(..., lora_scale=...)``).
"""

from lora_muon_jax import _deprecation
from lora_muon_jax.flax._common import (
    INIT_MODES,
    InitMode,
    LoRADimensionNumbersMap,
    LoRAScaleMap,
)

__all__ = ["INIT_MODES", "InitMode", "LoRADimensionNumbersMap", "LoRAScaleMap"]

__getattr__ = _deprecation.renamed(__name__, {"LoraScaleMap": ("LoRAScaleMap", LoRAScaleMap)})
