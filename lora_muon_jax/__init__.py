"""lora_muon_jax: LoRA-Muon (spectral steepest descent on the low-rank manifold) for JAX/Optax.

Public surface, in three tiers:

* pure array math: ``matrix_sign``, ``inverse_sqrt``, ``lora_muon_direction``;
* transformations: ``scale_by_lora_muon``, ``scale_by_split_weight_decay``,
  ``with_gauge_rebalancing``; the shared skeleton ``scale_by_pair_direction`` that
  every pair-aware optimizer of this package (``baselines``) is built on;
* the optimizer: ``lora_muon(learning_rate, ...)``;

plus factor-pair discovery: ``find_lora_pairs``, ``lora_param_labels``,
``default_pair_rule``, ``LoRADimensionNumbers``, ``maxtext_dimension_numbers``,
``LoRAPair``, and
``pair_diagnostics`` (condition numbers, balance and step stable rank to log).

The core imports only jax and optax.
"""

from lora_muon_jax import _deprecation
from lora_muon_jax._base import DECAY_RULES, PairDirection, scale_by_pair_direction
from lora_muon_jax._direction import (
    METHODS,
    FactorPair,
    Method,
    lora_muon_direction,
    lora_muon_directions,
)
from lora_muon_jax._lora_muon import (
    ScaleByLoRAMuonState,
    ScaleBySplitWeightDecayState,
    lora_muon,
    scale_by_lora_muon,
    scale_by_split_weight_decay,
)
from lora_muon_jax._lora_muon_ogd import lora_muon_ogd, scale_by_lora_muon_ogd
from lora_muon_jax._ogd_bases import (
    BASIS_MODES,
    OGDBasis,
    ScaleByLoRAMuonOGDState,
    ogd_bases_from_delta,
    update_ogd_bases,
)
from lora_muon_jax._ogd_direction import lora_muon_ogd_direction
from lora_muon_jax._pairs import (
    LoRADimensionNumbers,
    LoRAPair,
    PairName,
    default_pair_rule,
    find_lora_pairs,
    lora_param_labels,
    maxtext_dimension_numbers,
)
from lora_muon_jax._polar import inverse_sqrt, matrix_sign
from lora_muon_jax._rebalance import with_gauge_rebalancing
from lora_muon_jax.diagnostics import PairDiagnostics, pair_diagnostics

__version__ = "0.1.0"

__all__ = [
    "BASIS_MODES",
    "DECAY_RULES",
    "METHODS",
    "FactorPair",
    "LoRADimensionNumbers",
    "LoRAPair",
    "Method",
    "OGDBasis",
    "PairDiagnostics",
    "PairDirection",
    "PairName",
    "ScaleByLoRAMuonOGDState",
    "ScaleByLoRAMuonState",
    "ScaleBySplitWeightDecayState",
    "default_pair_rule",
    "find_lora_pairs",
    "inverse_sqrt",
    "lora_muon",
    "lora_muon_direction",
    "lora_muon_directions",
    "lora_muon_ogd",
    "lora_muon_ogd_direction",
    "lora_param_labels",
    "matrix_sign",
    "maxtext_dimension_numbers",
    "ogd_bases_from_delta",
    "pair_diagnostics",
    "scale_by_lora_muon",
    "scale_by_lora_muon_ogd",
    "scale_by_pair_direction",
    "scale_by_split_weight_decay",
    "update_ogd_bases",
    "with_gauge_rebalancing",
]

__getattr__ = _deprecation.renamed(
    __name__,
    {
        "LoraPair": ("LoRAPair", LoRAPair),
        "LoraDimensionNumbers": ("LoRADimensionNumbers", LoRADimensionNumbers),
        "ScaleByLoraMuonState": ("ScaleByLoRAMuonState", ScaleByLoRAMuonState),
    },
)
