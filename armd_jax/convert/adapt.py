"""AR -> ARMD: an ARMD model initialised from an AR model's parameters.

The rule (docs/training.md, "Adapting a pretrained AR model"): every parameter the two
share by name is copied, the ARMD-only ones (`ARMD_ONLY`) keep a fresh initialisation,
and the `SHARED_FIELDS` of the two `ModelConfig`s must agree.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from armd_jax.convert.pretrained import flatten_params, unflatten_params

# ModelConfig fields an ARMD must share with the AR it is adapted from (the shared layers,
# embeddings and output head are copied, so they must be the same function of them).
SHARED_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                 "tie_embeddings", "rope_base", "layer_norm_epsilon", "norm", "mlp_activation",
                 "mlp_bias", "attention_bias", "learned_positions")
# Parameters only ARMD has: they keep their fresh initialisation when adapting.
ARMD_ONLY = ("pe", "bos_pe", "query_norm", "position_proj")


def armd_config_from_ar(ar_config, **overrides):
  """The ARMD `ModelConfig` adapted from an AR one: same shared fields, ARMD defaults
  (or `overrides`) for the ARMD-only ones."""
  return ar_config.replace(kind="armd", **overrides)


def adapt_ar_params(ar_params: Mapping[str, Any], armd_params: Mapping[str, Any],
                    ar_config=None, armd_config=None, source: str = "the AR model"
                    ) -> Dict[str, Any]:
  """ARMD parameters initialised from an AR model's (the rule of docs/training.md).

  Every parameter the two share by name (embedding, start row, position table, layer_i,
  final norm, untied head) is copied from `ar_params`: layer i of ARMD is layer i of the
  AR, and the two-stream lower layers use it for both streams. The ARMD-only parameters
  (`ARMD_ONLY`: PE table, start PE row, query-stream norm and position projection) keep
  their values in `armd_params` (a fresh initialisation).

  Args:
    ar_params, armd_params: {'params': ...} trees (numpy or jax arrays).
    ar_config, armd_config: when given, the `SHARED_FIELDS` must agree.
    source: named in errors (a workdir or folder).

  Returns:
    {'params': ...} with the structure of `armd_params`.

  Raises:
    ValueError: a shared field, a parameter name or a shape differs (names it).
  """
  if ar_config is not None and armd_config is not None:
    for name in SHARED_FIELDS:
      a, b = getattr(ar_config, name), getattr(armd_config, name)
      if a != b:
        raise ValueError(f"{source}: model.{name}={a!r} but the ARMD config has {b!r}; an "
                         "ARMD adapted from an AR model must share it.")
  ar, armd = flatten_params(ar_params), flatten_params(armd_params, as_numpy=False)
  out = {}
  for name, value in armd.items():
    if name.split(".")[0] in ARMD_ONLY:
      out[name] = value
      continue
    if name not in ar:
      raise ValueError(f"{source}: has no parameter {name!r} for the ARMD model.")
    if ar[name].shape != value.shape:
      raise ValueError(f"{source}: parameter {name!r} has shape {ar[name].shape}, the ARMD "
                       f"model needs {value.shape} (model.max_len with learned positions?).")
    out[name] = ar[name].astype(np.dtype(value.dtype))
  unused = sorted(set(ar) - set(out))
  if unused:
    raise ValueError(f"{source}: AR parameters {unused} have no place in the ARMD model.")
  return unflatten_params(out)


def init_params(config, seed: int = 0, seq_len: int = 8) -> Dict[str, Any]:
  """Fresh {'params': ...} (numpy) of `build_model(config)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from armd_jax import orders  # pylint: disable=g-import-not-at-top
  from armd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  seq_len = min(seq_len, config.max_len)
  variables = build_model(config).init(jax.random.PRNGKey(seed),
                                       jnp.zeros((1, seq_len), jnp.int32),
                                       orders.left_to_right(1, seq_len))
  return {"params": jax.tree.map(np.asarray, nn.meta.unbox(variables)["params"])}
