"""Device mesh, logical-axis rules and shardings of parameters and batches.

The mesh has three axes, `MESH_AXES` = ('data', 'fsdp', 'tensor'), sized by
`config.mesh.shape`. Modules name their axes logically (`armd_jax.models.layers`:
params 'vocab', 'embed', 'mlp', 'heads', 'kv', 'pe'; activations 'activation_*'); a
rule table maps them to mesh axes: one of `RULE_TABLES` ('data_parallel', 'fsdp',
'fsdp_tensor'), named by `config.mesh.rule_table`, or explicit `config.mesh.rules`. Parameters are born sharded: `jax.eval_shape(init)` gives the logical
specs, `shardings_of` turns them into `NamedSharding`s, and `jax.jit(init,
out_shardings=...)` creates them in place (see `armd_jax.train.state`).

A mesh axis is dropped from a parameter's spec when it does not divide that dimension
(e.g. a vocabulary of 259 bytes on a 4-way 'tensor' axis): the parameter is then
replicated along that axis instead of failing.

Inside the jitted steps, `activation_sharding(mesh, rules)` makes the modules'
`nn.with_logical_constraint` calls on activations resolve through the same rule table.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from armd_jax.models.layers import divisible_spec
from armd_jax.train.typed import MeshConfig

MESH_AXES: Tuple[str, ...] = ("data", "fsdp", "tensor")
BATCH_AXES: Tuple[str, ...] = ("data", "fsdp")  # the batch is split over both


def _rules(embed, tensor) -> Tuple[Tuple[str, Any], ...]:
  """One rule table: parameters' 'embed' dimension over `embed`, heads / MLP /
  vocabulary (parameters and activations) over `tensor`, the batch over data x fsdp."""
  return (
      ("activation_batch", BATCH_AXES),
      ("activation_length", None),
      ("activation_embed", None),
      ("activation_heads", tensor),
      ("activation_kv", None),
      ("activation_mlp", tensor),
      ("vocab", tensor),
      ("embed", embed),
      ("mlp", tensor),
      ("heads", tensor),
      ("kv", None),
      ("pe", None),
  )


# The named rule tables of `config.mesh.rule_table`. In every table the batch (and
# with it the activations) is split over 'data' x 'fsdp'; they differ in how the
# parameters, Adam moments and EMA are laid out:
#   data_parallel: replicated on every device (use a mesh (-1, 1, 1)).
#   fsdp:          each matrix split over 'fsdp' on its embed (d_model) dimension and
#                  all-gathered by XLA where it is used (ZeRO-3 / FSDP).
#   fsdp_tensor:   as fsdp, plus heads / MLP / vocabulary split over 'tensor' (Megatron
#                  style tensor parallelism); the attention's q, k and v of both ARMD
#                  streams carry the same ('activation_heads') sharding.
RULE_TABLES: Dict[str, Tuple[Tuple[str, Any], ...]] = {
    "data_parallel": _rules(None, None),
    "fsdp": _rules("fsdp", None),
    "fsdp_tensor": _rules("fsdp", "tensor"),
}
DEFAULT_RULES = RULE_TABLES["fsdp_tensor"]  # on a (-1, 1, 1) mesh: plain data parallel


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp', 'tensor') `Mesh` of `mesh_config.shape` over `devices`.

  `devices` defaults to all devices of all processes; -1 in the shape takes the rest.
  `jax.experimental.mesh_utils` orders the devices so that the inner axes ('tensor',
  then 'fsdp') sit on the fastest links (same chip / host / ICI ring); with explicit
  `devices` their order is kept.
  """
  explicit = devices is not None
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
  if explicit or len(devices) == 1:
    grid = np.asarray(devices, dtype=object).reshape(shape)
  else:
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    try:
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # unknown topology
      grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES)


def check_mesh(mesh: Mesh, rules) -> None:
  """Raises ValueError if a mesh axis of size > 1 is used by no rule of `rules`.

  Such an axis would only replicate the whole computation (e.g. a 'tensor' axis of 4
  under the 'fsdp' table): almost certainly a config mistake.
  """
  used = set()
  for _, axes in rules:
    used.update((axes,) if isinstance(axes, str) else tuple(axes or ()))
  idle = [a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in used]
  if idle:
    raise ValueError(f"mesh {dict(mesh.shape)}: axis/axes {idle} have size > 1 but no rule of "
                     "the rule table uses them; choose config.mesh.rule_table (e.g. "
                     "'fsdp_tensor') or set their size to 1 in config.mesh.shape.")


def rules_of(mesh_config: MeshConfig) -> Tuple[Tuple[str, Any], ...]:
  """`config.mesh.rules` when given, else the named `RULE_TABLES[config.mesh.rule_table]`."""
  return mesh_config.rules or RULE_TABLES[mesh_config.rule_table]


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
  return NamedSharding(mesh, divisible_spec(sharding.spec, shape, mesh))


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
