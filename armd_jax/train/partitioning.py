"""Device mesh, logical-axis rules and shardings of parameters and batches.

Modules name their axes logically (`armd_jax.models.layers`: params 'vocab', 'embed',
'mlp', 'heads', 'kv', 'pe'; activations 'activation_*'); `config.mesh.rules` maps them
to mesh axes. Parameters are born sharded: `jax.eval_shape(init)` gives the logical
specs, `shardings_of` turns them into `NamedSharding`s, and `jax.jit(init,
out_shardings=...)` creates them in place (see `armd_jax.train.state`).

A mesh axis is dropped from a parameter's spec when it does not divide that dimension
(e.g. a vocabulary of 259 bytes on a 4-way 'model' axis): the parameter is then
replicated along that axis instead of failing.

Inside the jitted steps, `activation_sharding(mesh, rules)` makes the modules'
`nn.with_logical_constraint` calls on activations resolve through the same rule table.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from armd_jax.train.typed import MeshConfig

# Data parallel over 'data', tensor parallel (heads / MLP / vocabulary) over 'model'.
DEFAULT_RULES: Tuple[Tuple[str, Any], ...] = (
    ("activation_batch", "data"),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "model"),
    ("activation_kv", None),
    ("activation_mlp", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("pe", None),
)


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `Mesh` of `mesh_config.shape` over `devices` (default: all); -1 takes the rest."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_config.shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape {mesh_config.shape}: {len(devices)} devices are not "
                       f"divisible by {known}.")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"config.mesh.shape {mesh_config.shape} needs {int(np.prod(shape))} "
                     f"devices, but {len(devices)} are available.")
  grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, mesh_config.axis_names)


def rules_of(mesh_config: MeshConfig) -> Tuple[Tuple[str, Any], ...]:
  """The rule table of the config, or `DEFAULT_RULES` when it is empty."""
  return mesh_config.rules or DEFAULT_RULES


def shardings_of(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of logically partitioned abstract values.

  Args:
    abstract_boxed: output of `jax.eval_shape` on a function returning Flax variables
      still boxed in `nn.LogicallyPartitioned` (unboxed leaves are replicated).
    mesh: the device mesh.
    rules: (logical, mesh axis) pairs.

  Returns:
    A tree of `NamedSharding` with the structure of the unboxed values.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  shapes = nn.meta.unbox(abstract_boxed)
  return jax.tree.map(lambda s, x: _fit(s, x.shape, mesh), shardings, shapes)


def _fit(sharding: NamedSharding, shape: Tuple[int, ...], mesh: Mesh) -> NamedSharding:
  """Drops mesh axes that do not divide the dimension they shard."""
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  fitted = []
  for dim, axes in zip(shape, spec):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if dim % size == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*fitted))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules) -> Iterator[None]:
  """Use inside a traced function: activation constraints follow `rules` on `mesh`."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of [batch, length] arrays: batch over the 'activation_batch' mesh axis."""
  spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length"), rules)
  return NamedSharding(mesh, spec)


def check_batch_size(global_batch_size: int, mesh: Mesh, rules) -> None:
  """Raises ValueError unless the batch divides evenly over its mesh axes and processes."""
  sharding = batch_sharding(mesh, rules)
  axes = sharding.spec[0] if len(sharding.spec) else None
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
  if global_batch_size % ways:
    raise ValueError(f"config.train.global_batch_size={global_batch_size} must be divisible "
                     f"by the {ways}-way batch sharding of mesh {dict(mesh.shape)}.")
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.train.global_batch_size={global_batch_size} must be divisible "
                     f"by the number of processes {jax.process_count()}.")


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """Per-process numpy batch {name: [local_batch, N]} -> global jax Arrays on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}
