"""Shared fixtures: tiny models that compile in seconds on 2 CPU cores."""

import os

# The suite runs on the CPU. With the [tpu] extra installed (the compile_check tests use
# libtpu), JAX would otherwise probe for a TPU at start-up and log an error line in every
# process; subprocesses started by the tests inherit this too. A user's own setting wins.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import armd_jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides) -> armd_jax.ModelConfig:
  """A 4-layer (2 two-stream) model with width 32."""
  fields = dict(vocab_size=13, d_model=32, num_layers=4, num_heads=4, mlp_dim=64, max_len=32,
                d_pe=16)
  fields.update(overrides)
  return armd_jax.ModelConfig(**fields)


def init_model(config: armd_jax.ModelConfig, length: int = 8, seed: int = 0):
  """Returns (model, unboxed float32 params)."""
  model = armd_jax.ARMD(config)
  tokens = jnp.zeros((1, length), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), tokens, armd_jax.orders.left_to_right(1, length))
  return model, nn.meta.unbox(params)


@pytest.fixture
def tiny():
  return init_model(tiny_config())
