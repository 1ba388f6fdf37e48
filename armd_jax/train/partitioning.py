"""Device mesh, logical-axis rules and shardings of parameters and batches.

The mesh has three axes, `MESH_AXES` = ('data', 'fsdp', 'tensor'), sized by
`config.mesh.shape` inside a slice times `config.mesh.dcn_shape` across TPU slices
(multi-slice: each slice is one contiguous block along the DCN axes, see `make_mesh`;
with one slice dcn_shape is (1, 1, 1)). Modules name their axes logically (`armd_jax.models.layers`:
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
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from armd_jax.models.layers import divisible_spec
from armd_jax.train.settings import MeshConfig

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


def slice_index(device: jax.Device) -> int:
  """The TPU slice `device` belongs to: its `slice_index`, 0 for devices without one
  (CPU and GPU devices, and single-slice TPUs of older runtimes)."""
  return int(getattr(device, "slice_index", 0) or 0)


def group_by_slice(devices: Sequence[Any],
                   slice_of: Callable[[Any], int] = slice_index) -> List[List[Any]]:
  """`devices` grouped by slice, in order of slice id; each group keeps the given order."""
  groups: Dict[int, List[Any]] = {}
  for device in devices:
    groups.setdefault(int(slice_of(device)), []).append(device)
  return [groups[key] for key in sorted(groups)]


def resolve_shape(sizes: Sequence[int], count: int, field: str, what: str) -> Tuple[int, ...]:
  """`sizes` with its -1 (if any) filled so that their product is `count`.

  Args:
    sizes: one size per mesh axis, at most one -1.
    count: the number of things (devices, slices) the sizes must multiply to.
    field: the config field, for errors ('config.mesh.shape').
    what: what is counted, for errors ('devices', 'slices').

  Raises:
    ValueError: naming `field`, when the sizes cannot multiply to `count`.
  """
  shape = list(sizes)
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if count % known:
      raise ValueError(f"{field} {tuple(sizes)}: {count} {what} are not divisible by {known}.")
    shape[shape.index(-1)] = count // known
  if int(np.prod(shape)) != count:
    raise ValueError(f"{field} {tuple(sizes)} needs {int(np.prod(shape))} {what}, but "
                     f"{count} are available.")
  return tuple(shape)


def hybrid_grid(slices: Sequence[Sequence[Any]], ici_shape: Sequence[int],
                dcn_shape: Sequence[int]) -> np.ndarray:
  """Lays out whole slices on a grid: axis i has dcn_shape[i] x ici_shape[i] devices.

  Slice s (in `slices`' order) sits at position `unravel(s, dcn_shape)` of the DCN grid
  and fills one contiguous block of ici_shape devices (in its own order): along axis i,
  index k belongs to DCN block k // ici_shape[i], so no ICI sub-axis mixes slices.

  Args:
    slices: prod(dcn_shape) lists of prod(ici_shape) devices each.
    ici_shape, dcn_shape: sizes per mesh axis inside a slice / across slices.

  Returns:
    An object array of devices of shape dcn_shape * ici_shape (elementwise).
  """
  rank = len(ici_shape)
  blocks = np.empty((len(slices),) + tuple(ici_shape), dtype=object)
  for s, group in enumerate(slices):
    blocks[s] = np.asarray(group, dtype=object).reshape(ici_shape)
  grid = blocks.reshape(tuple(dcn_shape) + tuple(ici_shape))  # [*dcn, *ici]
  grid = grid.transpose([a for i in range(rank) for a in (i, rank + i)])  # [d0, i0, d1, i1..]
  return grid.reshape([d * i for d, i in zip(dcn_shape, ici_shape)])


def make_mesh(mesh_config: MeshConfig, devices: Sequence[jax.Device] | None = None,
              slice_of: Callable[[Any], int] = slice_index) -> Mesh:
  """The ('data', 'fsdp', 'tensor') `Mesh` over `devices`.

  Inside a slice the axes have `mesh_config.shape` (-1 takes the rest of the slice's
  devices); across slices `mesh_config.dcn_shape` (-1 takes the rest of the slices), so
  axis i has size shape[i] * dcn_shape[i]. One slice (CPU, GPU, a single TPU slice):
  `jax.experimental.mesh_utils` orders the devices so that the inner axes ('tensor',
  then 'fsdp') sit on the fastest links (same chip / host / ICI ring); with explicit
  `devices` their order is kept. Several slices: each slice is one contiguous block
  along the DCN axes (`mesh_utils.create_hybrid_device_mesh` when the devices carry a
  `slice_index`, else `hybrid_grid` in the given order), so only the DCN axes cross the
  slow links between slices.

  Args:
    mesh_config: config.mesh.
    devices: defaults to all devices of all processes.
    slice_of: the slice id of a device (default: its `slice_index`, 0 when it has none;
      tests group simulated CPU devices into slices with it).

  Raises:
    ValueError: naming config.mesh.shape / config.mesh.dcn_shape when the sizes do not
      match the devices and slices, or config.mesh.num_slices when it is set (> 0) and
      the devices span another number of slices.
  """
  explicit = devices is not None
  devices = list(jax.devices() if devices is None else devices)
  slices = group_by_slice(devices, slice_of)
  if mesh_config.num_slices and len(slices) != mesh_config.num_slices:
    raise ValueError(f"config.mesh.num_slices={mesh_config.num_slices} (the slices the run "
                     f"was launched on), but the devices span {len(slices)} slice(s). On a "
                     "TPU multi-slice run every process must see every slice (the "
                     "MEGASCALE_* variables that xpk sets); else set the launch's slice count.")
  dcn = resolve_shape(mesh_config.dcn_shape, len(slices), "config.mesh.dcn_shape", "slices")
  if len(slices) == 1:
    shape = list(resolve_shape(mesh_config.shape, len(devices), "config.mesh.shape",
                               "devices"))
    if explicit or len(devices) == 1:
      grid = np.asarray(devices, dtype=object).reshape(shape)
    else:
      from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
      try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
      except (ValueError, NotImplementedError, AssertionError):  # unknown topology
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)
  sizes = sorted({len(group) for group in slices})
  if len(sizes) > 1:
    raise ValueError(f"config.mesh.dcn_shape {mesh_config.dcn_shape}: the {len(slices)} "
                     f"slices hold different numbers of devices {sizes}; every slice must "
                     "be the same size.")
  ici = resolve_shape(mesh_config.shape, sizes[0], "config.mesh.shape (inside one slice)",
                      "devices per slice")
  grid = None
  if slice_of is slice_index and all(hasattr(d, "slice_index") for d in devices):
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    try:
      grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices,
                                                  allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):  # unknown slice topology
      grid = None
  if grid is None:
    grid = hybrid_grid(slices, ici, dcn)
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
