"""Multi-slice meshes: whole slices along the DCN axes, the ICI axes inside one slice.

Devices of several slices come from a real 2-slice TPU topology that libtpu describes on
this CPU host (`jax.experimental.topologies`, each device with its `slice_index`), or from
simulated CPU devices grouped into slices by `consecutive_slices` (CPU devices have no
`slice_index`).
"""

import importlib.util
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from armd_jax.train import partitioning
from armd_jax.train.defaults import base_config
from armd_jax.train.settings import MeshConfig
from conftest import host_devices_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e .[tpu])")


def consecutive_slices(per_slice: int):
  """Simulated slices for devices without `slice_index`: device ids 0..per_slice-1 form
  slice 0, the next per_slice ids slice 1, and so on (a `slice_of` for `make_mesh`)."""
  return lambda device: device.id // per_slice


def block_of(index, ici_shape, dcn_shape) -> int:
  """The slice a mesh position must hold if every slice is one contiguous block: the
  row-major position of (index[i] // ici_shape[i]) on the DCN grid."""
  return int(np.ravel_multi_index([k // n for k, n in zip(index, ici_shape)], dcn_shape))


def assert_slices_are_blocks(grid, slice_ids, ici_shape, dcn_shape):
  """Every position of `grid` holds a device of the slice of its DCN block."""
  for index in np.ndindex(*grid.shape):
    assert slice_ids(grid[index]) == block_of(index, ici_shape, dcn_shape), (index, grid)


@pytest.fixture(scope="module")
def two_slices():
  """The 8 devices of two v5e:2x2 slices (compile-only: nothing runs on them)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # a compile may hold libtpu
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu",
                                           num_slices=2).devices)


@pytest.mark.parametrize("ici_shape,dcn_shape", [((1, 2, 2), (2, 1, 1)), ((2, 1, 3), (1, 2, 1)),
                                                 ((1, 1, 1), (2, 2, 1)), ((2, 2, 1), (1, 1, 3))])
def test_hybrid_grid_puts_each_slice_in_one_contiguous_block(ici_shape, dcn_shape):
  per_slice = int(np.prod(ici_shape))
  slices = [list(range(s * per_slice, (s + 1) * per_slice)) for s in range(int(np.prod(
      dcn_shape)))]
  grid = partitioning.hybrid_grid(slices, ici_shape, dcn_shape)
  assert grid.shape == tuple(d * i for d, i in zip(dcn_shape, ici_shape))
  assert sorted(grid.ravel()) == list(range(grid.size))
  assert_slices_are_blocks(grid, lambda d: d // per_slice, ici_shape, dcn_shape)
  # inside its block a slice keeps its own order (row-major over the ICI shape)
  first = grid[tuple(slice(0, n) for n in ici_shape)]
  assert first.ravel().tolist() == slices[0]


def test_the_config_names_its_dcn_parallelism_with_all_slices_on_data_by_default():
  assert MeshConfig().dcn_shape == (-1, 1, 1)
  assert tuple(base_config().mesh.dcn_shape) == (-1, 1, 1)  # --config.mesh.dcn_shape=... works


@needs_libtpu
@pytest.mark.parametrize("shape,dcn_shape,mesh_shape", [
    ((1, -1, 1), (-1, 1, 1), (2, 4, 1)),   # FSDP inside a slice, data across slices
    ((1, 2, 2), (1, -1, 1), (1, 4, 2)),    # FSDP across slices too
    ((-1, 1, 1), (1, 1, 2), (4, 1, 2)),    # any axis may cross DCN
])
def test_each_tpu_slice_is_one_contiguous_block_along_the_dcn_axes(two_slices, shape, dcn_shape,
                                                                   mesh_shape):
  assert sorted({d.slice_index for d in two_slices}) == [0, 1]
  mesh = partitioning.make_mesh(MeshConfig(shape=shape, dcn_shape=dcn_shape), two_slices)
  assert tuple(mesh.devices.shape) == mesh_shape
  assert sorted(d.id for d in mesh.devices.ravel()) == sorted(d.id for d in two_slices)
  dcn = partitioning.resolve_shape(dcn_shape, 2, "config.mesh.dcn_shape", "slices")
  ici = tuple(m // d for m, d in zip(mesh_shape, dcn))
  assert_slices_are_blocks(mesh.devices, lambda d: d.slice_index, ici, dcn)


@needs_libtpu
def test_one_tpu_slice_keeps_the_single_slice_mesh(two_slices):
  one = [d for d in two_slices if d.slice_index == 0]
  mesh = partitioning.make_mesh(MeshConfig(shape=(1, -1, 2)), one)
  assert mesh.devices.ravel().tolist() == one  # explicit devices: their order is kept
  assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}


@needs_libtpu
@pytest.mark.parametrize("fields,devices,match", [
    (dict(dcn_shape=(3, 1, 1)), 8, r"config.mesh.dcn_shape \(3, 1, 1\) needs 3 slices"),
    (dict(dcn_shape=(-1, 3, 1)), 8, r"config.mesh.dcn_shape \(-1, 3, 1\): 2 slices are not "
                                    "divisible by 3"),
    (dict(shape=(1, 3, 1)), 8, r"config.mesh.shape \(inside one slice\) \(1, 3, 1\) needs 3 "
                               "devices per slice"),
    (dict(), 7, r"config.mesh.dcn_shape .* different numbers of devices \[3, 4\]"),
])
def test_a_dcn_shape_that_does_not_fit_the_slices_names_the_field(two_slices, fields, devices,
                                                                  match):
  with pytest.raises(ValueError, match=match):
    partitioning.make_mesh(MeshConfig(**fields), two_slices[:devices])


def test_malformed_dcn_shapes_and_slices_cpu_does_not_have_name_the_field():
  import jax
  for bad in ((2, 1), (0, 1, 1), (-1, -1, 1)):
    with pytest.raises(ValueError, match="config.mesh.dcn_shape"):
      MeshConfig(dcn_shape=bad)
  # CPU devices form one slice: asking for two is an error, not a silent single slice
  with pytest.raises(ValueError, match=r"config.mesh.dcn_shape \(2, 1, 1\) needs 2 slices, "
                                       "but 1 are available"):
    partitioning.make_mesh(MeshConfig(dcn_shape=(2, 1, 1)), jax.devices()[:1])


SIMULATED = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from armd_jax.train import partitioning
    from armd_jax.train.settings import MeshConfig
    mesh = partitioning.make_mesh(MeshConfig(shape=(1, -1, 2), dcn_shape=(-1, 1, 1)),
                                  slice_of=consecutive_slices(4))  # ids 0-3, 4-7
    x = jax.device_put(jnp.arange(8.0).reshape(2, 4), NamedSharding(mesh, P("data", "fsdp")))
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps(dict(shape=dict(mesh.shape), total=float(total),
                          ids=np.vectorize(lambda d: d.id)(mesh.devices).tolist())))
""")


def test_simulated_cpu_slices_sit_on_the_data_axis_and_run():
  script = inspect.getsource(consecutive_slices) + SIMULATED
  run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=host_devices_env(8))
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["shape"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert out["total"] == 28.0
  ids = np.asarray(out["ids"])
  assert_slices_are_blocks(ids, lambda i: i // 4, (1, 2, 2), (2, 1, 1))


@pytest.mark.slow
@needs_libtpu
def test_tiny_compiles_on_two_slices_with_the_data_axis_across_them(tmp_path):
  out = tmp_path / "report.json"
  run = subprocess.run(
      [sys.executable, "-m", "armd_jax.compile_check", "--config=configs/tiny.py",
       "--topology=v5e:2x2", "--num_slices=2", "--config.sample.num_samples=2",
       "--config.mesh.shape=(1,2,2)", f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "v5e:2x2 x 2 slices: 8 x TPU v5 lite" in run.stdout and "FITS" in run.stdout
  report = json.loads(out.read_text())
  assert (report["num_slices"], report["chips"], report["fits"]) == (2, 8, True)
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


@needs_libtpu
def test_a_run_launched_on_more_slices_than_the_devices_span_is_refused(two_slices):
  mesh = partitioning.make_mesh(MeshConfig(num_slices=2), two_slices)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}  # 2 slices x 4 chips
  with pytest.raises(ValueError, match=r"config.mesh.num_slices=2 .* span 1 slice"):
    partitioning.make_mesh(MeshConfig(num_slices=2), two_slices[:4])
  with pytest.raises(ValueError, match="config.mesh.num_slices"):
    MeshConfig(num_slices=-1)


def xpk_dry_run(*args):
  """launch/xpk.sh --dry_run with `args`: (exit status, stdout, stderr)."""
  run = subprocess.run(["bash", os.path.join(REPO, "launch", "xpk.sh"), "--cluster=c1",
                        "--workload=w1", "--config=configs/owt_small.py",
                        "--workdir=gs://bucket/run", "--dry_run", *args],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
  return run.returncode, run.stdout, run.stderr


def test_xpk_passes_the_slice_count_to_the_training_command():
  rc, out, _ = xpk_dry_run("--num_slices=2")
  create = out.splitlines()[0]
  assert rc == 0 and "--num-slices=2 " in create
  assert create.endswith("--jax_distributed --config.mesh.num_slices=2'")
  rc, out, _ = xpk_dry_run()  # one slice: the command as before
  assert rc == 0 and "mesh.num_slices" not in out
  rc, _, err = xpk_dry_run("--num_slices=2", "--config.mesh.num_slices=3")
  assert rc == 2 and "--config.mesh.num_slices=3 disagrees with --num_slices=2" in err
  rc, _, err = xpk_dry_run("--num_slices=0")
  assert rc == 2 and "--num_slices=0 must be a positive integer" in err
