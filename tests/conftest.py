"""Shared fixtures: tiny models that compile in seconds on 2 CPU cores."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import armd_jax

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
