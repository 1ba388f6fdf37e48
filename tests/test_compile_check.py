"""compile_check: the real train step and a decode call compiled for a TPU topology on CPU."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from armd_jax import compile_check

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compiled(**fields):
  values = dict(seconds=1.0, argument_bytes=100, output_bytes=100, alias_bytes=90,
                temp_bytes=50, code_bytes=5, flops=2e12, bytes_accessed=1e9, peak_bytes=0,
                mosaic_calls=0)
  values.update(fields)
  return compile_check.Compiled(**values)


def test_total_bytes_counts_donated_outputs_once():
  assert _compiled().total_bytes == 100 + 100 - 90 + 50 + 5


def test_roofline_takes_the_slower_of_compute_and_memory():
  chip = compile_check.Chip("x", peak_flops=1e12, hbm_bytes=1e9, hbm_bandwidth=1e9, source="")
  rl = compile_check.roofline(_compiled(flops=2e12, bytes_accessed=1e9), chip,
                              tokens_per_step=4000, num_chips=2)
  assert (rl["compute_s"], rl["memory_s"], rl["step_s"], rl["bound"]) == (2.0, 1.0, 2.0,
                                                                          "compute")
  assert rl["tokens_per_s_per_chip"] == 1000.0
  rl = compile_check.roofline(_compiled(flops=1e11, bytes_accessed=3e9), chip, 4000, 2)
  assert (rl["step_s"], rl["bound"]) == (3.0, "memory")


def test_state_bytes_per_chip_sums_shard_sizes():
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  mesh = Mesh(np.array(jax.devices()[:1]), ("fsdp",))
  split = NamedSharding(mesh, PartitionSpec("fsdp"))
  tree = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=split),
          "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16, sharding=split)}
  assert compile_check.state_bytes_per_chip(tree) == 8 * 4 * 4 + 3 * 2


def test_published_chip_figures():
  v5e, v5p = compile_check.CHIPS["TPU v5 lite"], compile_check.CHIPS["TPU v5"]
  assert (v5e.peak_flops, v5e.hbm_bytes, v5e.hbm_bandwidth) == (197e12, 16e9, 819e9)
  assert (v5p.peak_flops, v5p.hbm_bytes, v5p.hbm_bandwidth) == (459e12, 95e9, 2765e9)


def compile_tiny(tmp_path, *flags):
  """`compile_check` of configs/tiny.py (2 samples) for v5e:2x2: (the run, report path)."""
  out = tmp_path / "report.json"
  run = subprocess.run(
      [sys.executable, "-m", "armd_jax.compile_check", "--config=configs/tiny.py",
       "--topology=v5e:2x2", "--config.sample.num_samples=2", *flags, f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=900,
      env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
  return run, out


NEEDS_LIBTPU = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="needs libtpu (pip install -e .[tpu])")


@pytest.fixture(scope="module")
def tiny_fsdp_tensor(tmp_path_factory):
  """One compile of tiny on an fsdp x tensor mesh for v5e:2x2: (the run, report path)."""
  return compile_tiny(tmp_path_factory.mktemp("tiny"), "--config.mesh.shape=(1,2,2)",
                      "--config.mesh.rule_table=fsdp_tensor")


@pytest.mark.slow
@NEEDS_LIBTPU
def test_tiny_compiles_for_v5e_2x2_and_fits(tiny_fsdp_tensor):
  run, out = tiny_fsdp_tensor
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "FITS" in run.stdout and "tokens/s per chip" in run.stdout
  report = json.loads(out.read_text())
  assert (report["chips"], report["device_kind"], report["fits"]) == (4, "TPU v5 lite", True)
  assert report["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  assert report["rule_table"] == "fsdp_tensor"
  step = report["train_step"]
  # tiny: 8 x 16 tokens per step; every chip does real work.
  assert step["flops"] > 6 * report["params"] * 8 * 16 / 4
  # float32 params, two Adam moments and the EMA: 16 bytes per parameter unsharded; split
  # over fsdp x tensor each chip holds between a quarter and less than all of it (exact
  # shard sizes; the compiled arguments add the batch and TPU tile padding on top).
  assert 16 * report["params"] / 4 <= report["state_bytes"] < 16 * report["params"]
  assert step["argument_bytes"] >= report["state_bytes"]
  assert 0 < step["total_bytes"] < report["chip"]["hbm_bytes"]
  assert step["roofline"]["tokens_per_s_per_chip"] > 0
  assert report["decode"]["total_bytes"] > 0 and report["decode"]["num_samples"] == 2


@pytest.mark.slow
@NEEDS_LIBTPU
def test_the_command_a_report_records_runs_as_written(tiny_fsdp_tensor):
  """The report's `command`, pasted into a shell at the repository root, compiles the
  same program again (its mesh shape's parentheses quoted) and writes the same report."""
  run, out = tiny_fsdp_tensor
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  first = json.loads(out.read_text())
  command = first["command"]
  assert command.startswith("python -m armd_jax.compile_check --config=configs/tiny.py ")
  out.unlink()
  env = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
         "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
  again = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=env)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  second = json.loads(out.read_text())
  assert second["command"] == command and second["mesh"] == first["mesh"]
  assert second["train_step"]["flops"] == first["train_step"]["flops"]


def _stored_reports():
  folder = os.path.join(REPO, "benchmarks", "results", "compile")
  return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".json")]


def test_every_stored_compile_report_records_the_command_that_writes_it():
  """Each benchmarks/results/compile/*.json names, as one shell command from the repository
  root, compile_check with an existing config file and --out pointing at that very file;
  the cases of benchmarks/compile_reports.py record the same command."""
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import compile_reports  # pylint: disable=import-outside-toplevel
  cases = {c[0]: c for c in compile_reports.cases() + compile_reports.extra_cases()}
  reports = _stored_reports()
  assert reports
  for path in reports:
    with open(path, encoding="utf-8") as f:
      command = json.load(f)["command"]
    words = shlex.split(command)
    assert words[:3] == ["python", "-m", "armd_jax.compile_check"], (path, command)
    flags = dict(w[2:].split("=", 1) for w in words[3:] if "=" in w)
    assert os.path.isfile(os.path.join(REPO, flags["config"])), (path, command)
    assert os.path.join(REPO, flags["out"]) == path, (path, command)
    name = os.path.basename(path)[:-len(".json")]
    if name in cases:
      assert command == compile_check.command_line(compile_reports.case_flags(*cases[name]))


@pytest.mark.slow
@NEEDS_LIBTPU
def test_a_step_xla_cannot_fit_is_reported_as_not_fitting(tmp_path):
  run, out = compile_tiny(tmp_path, "--config.train.global_batch_size=4096",
                          "--config.train.seq_len=1024", "--config.model.max_len=1024")
  assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]
  assert "XLA ran out of HBM" in run.stdout and "DOES NOT FIT" in run.stdout
  report = json.loads(out.read_text())
  oom = report["train_step"]["out_of_memory"]
  assert report["fits"] is False and oom["temp_gib"] > oom["available_gib"] > 14
  assert report["decode"]["total_bytes"] > 0  # the decode call is still compiled


def test_out_of_memory_messages_are_parsed():
  message = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the "
             "total memory required for HLO temporaries (17.11G) exceeds available HBM "
             "(15.75G).")
  oom = compile_check.out_of_memory_report("traceback\n" + message, 12.0)
  assert (oom["temp_gib"], oom["available_gib"], oom["seconds"]) == (17.11, 15.75, 12.0)
  assert oom["message"] == message
  assert compile_check.out_of_memory_report("RESOURCE_EXHAUSTED: other", 1.0)["temp_gib"] is None


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e .[tpu])")
def test_bad_topology_is_a_clear_error():
  run = subprocess.run(
      [sys.executable, "-m", "armd_jax.compile_check", "--config=configs/tiny.py",
       "--topology=v5litepod-4"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
  assert run.returncode != 0 and "Could not describe TPU topology 'v5litepod-4'" in run.stderr


CALLER_SHARD_MAP = textwrap.dedent("""
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import armd_jax
    from armd_jax.losses import cross_entropy
    mesh = Mesh(np.array(topologies.get_topology_desc("v5e:2x2", "tpu").devices), ("data",))
    n = 256
    model = armd_jax.build_model(armd_jax.ModelConfig(
        attention="pallas", vocab_size=256, d_model=128, num_layers=2, num_heads=1,
        mlp_dim=256, max_len=n, dtype="bfloat16"))
    params = jax.eval_shape(lambda r: nn.meta.unbox(model.init(
        r, jnp.zeros((1, n), jnp.int32), armd_jax.orders.left_to_right(1, n))),
        jax.random.PRNGKey(0))

    def step(params, tokens, ids):  # per device: its own rows
      loss_fn = lambda p: cross_entropy(model.apply(p, tokens, ids), tokens, ids)[0]
      loss, grads = jax.value_and_grad(loss_fn)(params)
      return jax.lax.pmean(grads, "data"), jax.lax.pmean(loss, "data")

    sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                    out_specs=(P(), P()), check_vma=True))
    as_sds = lambda a, spec: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                                  sharding=NamedSharding(mesh, spec))
    batch = as_sds(jax.ShapeDtypeStruct((4, n), jnp.int32), P("data"))
    compiled = sharded.lower(jax.tree.map(lambda a: as_sds(a, P()), params), batch,
                             batch).compile()
    assert "tpu_custom_call" in compiled.as_text()
    print("COMPILED")
""")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -e .[tpu])")
def test_the_pallas_model_inside_a_callers_shard_map_with_check_vma_compiles_for_tpu():
  # Inside the caller's shard_map the model calls the kernel on its per-device rows
  # directly; wrapping it in a second shard_map (unchecked, as a CPU host picks) made the
  # custom VJP's cotangents lose their varying axes and check_vma reject the backward.
  run = subprocess.run([sys.executable, "-c", CALLER_SHARD_MAP], cwd=REPO, capture_output=True,
                       text=True, timeout=900,
                       env={**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "JAX_PLATFORMS": ""})
  assert run.returncode == 0 and "COMPILED" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
