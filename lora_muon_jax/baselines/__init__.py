"""Baseline optimizers the LoRA-Muon paper compares with, as optax transformations.

* ``dense_muon`` / ``scale_by_dense_muon``: ``W ← (1 − λη) W − η msign(M)``, η a
  spectral-norm radius on W (LoRA-Muon's units, no shape factor);
* ``spectron`` / ``scale_by_spectron``: factor-wise ``X ← X − ρ msign(M_X)``,
  ``ρ = η / (‖A‖₂ + ‖B‖₂ + 1)`` (not gauge invariant);
* ``lora_rite`` / ``scale_by_lora_rite``: the simplified LoRA-RITE core (QR),
  equal to LoRA-Muon's step at half the learning rate.

AdamW on the factors is ``optax.adamw``. Core dependencies only (jax, optax).
"""

from lora_muon_jax.baselines._dense_muon import (
    ScaleByDecoupledStepState,
    ScaleByDenseMuonState,
    default_is_matrix,
    dense_muon,
    scale_by_decoupled_step,
    scale_by_dense_muon,
)
from lora_muon_jax.baselines._lora_rite import (
    ScaleByLoRARiteState,
    lora_rite,
    lora_rite_direction,
    scale_by_lora_rite,
)
from lora_muon_jax.baselines._spectron import (
    ScaleBySpectronState,
    scale_by_spectron,
    spectral_norm_power,
    spectron,
)

__all__ = [
    "ScaleByDecoupledStepState",
    "ScaleByDenseMuonState",
    "ScaleByLoRARiteState",
    "ScaleBySpectronState",
    "default_is_matrix",
    "dense_muon",
    "lora_rite",
    "lora_rite_direction",
    "scale_by_decoupled_step",
    "scale_by_dense_muon",
    "scale_by_lora_rite",
    "scale_by_spectron",
    "spectral_norm_power",
    "spectron",
]
