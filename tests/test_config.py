"""ModelConfig validates every field and names the bad one."""

import pytest

from armd_jax import ModelConfig


def test_two_stream_layers_default_to_half_the_depth():
  assert ModelConfig(vocab_size=10, num_layers=6).num_two_stream_layers == 3


@pytest.mark.parametrize("fields, name", [
    (dict(d_model=30, num_heads=4), "num_heads"),
    (dict(num_layers=2, num_two_stream_layers=3), "num_two_stream_layers"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_model=12, num_heads=4), "even for RoPE"),
    (dict(dropout_rate=1.0), "dropout_rate"),
    (dict(attention="cuda"), "attention"),
    (dict(query_init="zeros"), "query_init"),
    (dict(dtype="int8"), "dtype"),
    (dict(max_len=-1), "max_len"),
    (dict(kind="gpt"), "kind"),
])
def test_bad_values_raise_value_errors_naming_the_field(fields, name):
  base = dict(vocab_size=10, d_model=32, num_heads=4)
  base.update(fields)
  with pytest.raises(ValueError, match=name):
    ModelConfig(**base)


def test_replace_revalidates():
  with pytest.raises(ValueError, match="num_heads"):
    ModelConfig(vocab_size=10, d_model=32, num_heads=4).replace(num_heads=5)
