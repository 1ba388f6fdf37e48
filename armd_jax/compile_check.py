"""Will a config fit a TPU slice, and how fast could it go? Compiled here, on a CPU host.

  python -m armd_jax.compile_check --config=configs/owt_medium.py --topology=v5e:8x8 \\
      [--config.model.attention=pallas] [--config.mesh.shape='(16,4)'] [--out=report.json] \\
      [--num_slices=2 [--config.mesh.dcn_shape='(-1,1,1)']]
  python -m armd_jax.compile_check --workdir=gs://BUCKET/RUN --topology=v5e:8x8

`--workdir` (a local path or a URL, see `armd_jax.storage`) compiles the config a run
saved in its `config.json` instead of a config file; `--out` may be a URL too.

Lowers and compiles, with libtpu, for the described TPU topology (nothing runs; no TPU is
needed; `jax.experimental.topologies` describes the chips):
- the real train step (`armd_jax.train.make_train_step`: loss, gradients, AdamW, EMA)
  on the config's mesh and rule table, the global batch
  `train.global_batch_size x train.seq_len`;
- one sampler decode call (`armd_jax.sampling.decoding.decode_program`: the whole
  KV-cached strided generation of `sample.num_samples x sample.length` tokens with
  `sample.streams` streams, one jitted call) with the parameters sharded as in training.
For each it prints the per-chip memory from `compiled.memory_analysis()` (arguments,
temporaries, outputs, generated code; donated outputs counted once) against the chip's
HBM, and for the train step the FLOPs and HBM bytes per chip from XLA's cost analysis
and a roofline step time `max(flops / peak_flops, bytes / hbm_bandwidth)` with the
tokens/s per chip it implies. A roofline is an upper bound on speed: it ignores
communication between chips, and XLA's cost analysis may count a loop body once.

Exit status: 0 when every compiled program fits the chip's HBM, 1 when one does not,
2 on a bad flag or config.

Needs the `[tpu]` extra (libtpu matching jax: `pip install -e .[tpu]`). Installing
libtpu makes jax probe for a TPU at start-up; on a CPU host that logs one harmless
error line, and `ALLOW_MULTIPLE_LIBTPU_LOAD=1` lets several such processes run at once.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU chip's published peak figures.

  Attributes:
    name: short name ('v5e').
    peak_flops: peak bf16 FLOP/s per chip.
    hbm_bytes: HBM capacity per chip in bytes.
    hbm_bandwidth: HBM bandwidth per chip in bytes/s.
    source: where the figures are published.
  """

  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  source: str


# Keyed by `device.device_kind` as libtpu reports it. Figures from Google Cloud's TPU
# pages ("Peak compute per chip (bf16)", "HBM capacity and bandwidth"); GB = 1e9 bytes
# as published there (the smaller reading of '16 GB', so a 'fits' is not optimistic).
CHIPS: Dict[str, Chip] = {
    "TPU v5 lite": Chip("v5e", 197e12, 16e9, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "TPU v5": Chip("v5p", 459e12, 95e9, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
}


def tpu_devices(topology: str, num_slices: int = 1) -> List[Any]:
  """The devices of `num_slices` TPU slices of a topology such as 'v5e:8x8' or
  'v5p:4x4x8', described by libtpu (each device carries its `slice_index`).

  Raises:
    SystemExit: libtpu is missing, the name is not a TPU topology or num_slices < 1.
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if num_slices < 1:
    raise SystemExit(f"compile_check: --num_slices={num_slices} must be at least 1.")
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                              num_slices=num_slices).devices)
  except Exception as error:  # pylint: disable=broad-except
    raise SystemExit(f"Could not describe TPU topology {topology!r} ({error}). Names look like "
                     "'v5e:8x8' or 'v5p:4x4x8'; libtpu must be installed (pip install -e "
                     ".[tpu]).") from error


@dataclasses.dataclass(frozen=True)
class Compiled:
  """What compiling one program for a topology tells us (per chip).

  Attributes:
    seconds: wall time of lower + compile on this host.
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: from
      `compiled.memory_analysis()`; alias = outputs written into donated arguments.
    flops, bytes_accessed: from `compiled.cost_analysis()` (0 when XLA gives none).
    peak_bytes: XLA's peak memory estimate (`peak_memory_in_bytes`; 0 if not given).
    mosaic_calls: number of Pallas (Mosaic) kernels in the compiled program.
  """

  seconds: float
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  flops: float
  bytes_accessed: float
  peak_bytes: int
  mosaic_calls: int

  @property
  def total_bytes(self) -> int:
    """HBM the program needs per chip: arguments + outputs - aliased + temporaries + code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)


def compile_program(jitted, *args) -> Compiled:
  """Lowers and compiles `jitted(*args)` (abstract args with shardings) and measures it."""
  start = time.time()
  compiled = jitted.lower(*args).compile()
  seconds = time.time() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  cost = cost or {}
  return Compiled(seconds=seconds, argument_bytes=int(mem.argument_size_in_bytes),
                  output_bytes=int(mem.output_size_in_bytes),
                  alias_bytes=int(mem.alias_size_in_bytes),
                  temp_bytes=int(mem.temp_size_in_bytes),
                  code_bytes=int(mem.generated_code_size_in_bytes),
                  flops=float(cost.get("flops", 0.0)),
                  bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                  peak_bytes=int(getattr(mem, "peak_memory_in_bytes", 0)),
                  mosaic_calls=compiled.as_text().count("tpu_custom_call"))


def abstract_like(tree: Any, sharding) -> Any:
  """ShapeDtypeStructs of `tree`'s arrays, all placed with `sharding`."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding),
                      tree)


def state_bytes_per_chip(abstract_state) -> int:
  """Bytes of the train state (params, optimiser moments, EMA) on the fullest chip.

  Exact from the shardings alone (no compile): each array's shard shape times its item
  size, summed. The compiled step's `argument_bytes` adds the batch to this.
  """
  import jax  # pylint: disable=g-import-not-at-top
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_state))


def default_vocab_size(config) -> int:
  """config.model.vocab_size, else the size the config's vocabulary is known to have."""
  if config.model.get("vocab_size") is not None:
    return int(config.model.vocab_size)
  vocab, tokenizer = config.data.get("vocab"), config.data.get("hf_tokenizer")
  if vocab == "hf" and tokenizer == "gpt2":
    return 50257  # GPT-2 BPE, <|endoftext|> included
  if vocab in (None, "byte"):
    from armd_jax.data.vocab import ByteVocabulary  # pylint: disable=g-import-not-at-top
    return ByteVocabulary().vocab_size
  raise SystemExit(f"compile_check: config.model.vocab_size is unset and vocabulary "
                   f"{vocab!r} needs data to size it; pass --config.model.vocab_size=N.")


def compile_train_step(config, devices: Sequence[Any]) -> Dict[str, Any]:
  """Compiles the config's real train step on `devices`; returns the figures of the step."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from armd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from armd_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from armd_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from armd_jax.train.settings import model_config_from, settings_from  # pylint: disable=g-import-not-at-top

  settings = settings_from(config)
  tc = settings.train
  model = build_model(model_config_from(config))
  mesh = partitioning.make_mesh(settings.mesh, devices)
  rules = partitioning.rules_of(settings.mesh)
  partitioning.check_mesh(mesh, rules)
  partitioning.check_batch_size(tc.global_batch_size, mesh, rules)
  batch_shard = partitioning.batch_sharding(mesh, rules)
  _, abstract, shardings = state_lib.train_state_layout(
      model, settings.optim, tc.num_steps, tc.seq_len, tc.seed, mesh, rules)
  step = state_lib.make_train_step(model, settings.order, settings.optim, tc.num_steps,
                                   shardings, batch_shard, rules)
  batch = {k: jax.ShapeDtypeStruct((tc.global_batch_size, tc.seq_len), jnp.int32,
                                   sharding=batch_shard) for k in ("tokens", "mask")}
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  state_bytes = state_bytes_per_chip(abstract)
  print(f"train state (params, optimiser, EMA) per chip: {state_bytes / GIB:.3f} GiB; "
        "compiling the train step ...", flush=True)
  out = dict(mesh=dict(mesh.shape), params=num_params, abstract=abstract, model=model,
             state_bytes=state_bytes, compiled=None, out_of_memory=None)
  start = time.time()
  try:
    out["compiled"] = compile_program(step, abstract, batch)
  except jax.errors.JaxRuntimeError as e:  # XLA could not schedule it in the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    out["out_of_memory"] = out_of_memory_report(str(e), time.time() - start)
  return out


def out_of_memory_report(message: str, seconds: float) -> Dict[str, Any]:
  """What XLA's out-of-HBM compile error says: the message, and the temporaries it needed
  against the HBM it had (GiB, as XLA prints them with a 'G'), when it names them."""
  found = re.search(r"temporaries \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                    message)
  line = next((l for l in message.splitlines() if "RESOURCE_EXHAUSTED" in l), message[:300])
  return dict(message=line.strip(), seconds=seconds,
              temp_gib=float(found.group(1)) if found else None,
              available_gib=float(found.group(2)) if found else None)


def compile_decode(config, model, abstract_state, devices: Sequence[Any]) -> Optional[Compiled]:
  """Compiles one sampler decode call (config.sample) with training's parameter shardings.

  Returns None when the config samples nothing or its model kind is not ARMD (the
  baselines have their own samplers).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from armd_jax.sampling import decoding, plan  # pylint: disable=g-import-not-at-top
  from armd_jax.sampling.sampler import SamplerConfig  # pylint: disable=g-import-not-at-top
  from armd_jax.train import partitioning  # pylint: disable=g-import-not-at-top
  from armd_jax.train.settings import settings_from  # pylint: disable=g-import-not-at-top

  sc = settings_from(config).sample
  if sc.num_samples == 0 or model.config.kind != "armd":
    return None
  sampler = SamplerConfig(temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                          noise=sc.noise)
  known = np.zeros((sc.num_samples, sc.length), bool)
  block_ids = plan.conditional_strided_order(known, sc.streams)
  positions = np.broadcast_to(np.arange(sc.length, dtype=np.int32), known.shape)
  run, inputs, _ = decoding.decode_program(model, np.zeros(known.shape, np.int32), known,
                                           block_ids, positions, sampler)
  replicated = partitioning.replicated(jax.tree.leaves(abstract_state.params)[0].sharding.mesh)
  rng = jax.ShapeDtypeStruct((2,), np.uint32, sharding=replicated)
  params = abstract_state.ema_params if abstract_state.ema_params is not None else \
      abstract_state.params
  return compile_program(run, params, rng, *abstract_like(inputs, replicated))


def roofline(compiled: Compiled, chip: Chip, tokens_per_step: int,
             num_chips: int) -> Dict[str, float]:
  """Step time bound max(flops / peak, bytes / bandwidth) and the tokens/s per chip it allows."""
  compute_s = compiled.flops / chip.peak_flops
  memory_s = compiled.bytes_accessed / chip.hbm_bandwidth
  step_s = max(compute_s, memory_s)
  return dict(compute_s=compute_s, memory_s=memory_s, step_s=step_s,
              bound="compute" if compute_s >= memory_s else "memory",
              tokens_per_s_per_chip=tokens_per_step / step_s / num_chips if step_s else 0.0,
              mfu_at_roofline=compute_s / step_s if step_s else 0.0)


def _memory_lines(name: str, c: Compiled, chip: Optional[Chip]) -> List[str]:
  hbm = f" of {chip.hbm_bytes / GIB:.2f} GiB HBM ({chip.name})" if chip else ""
  return [f"{name}: compiled in {c.seconds:.0f} s, {c.mosaic_calls} Pallas (Mosaic) calls",
          f"  memory per chip: arguments {c.argument_bytes / GIB:.3f} GiB, temporaries "
          f"{c.temp_bytes / GIB:.3f} GiB, outputs {c.output_bytes / GIB:.3f} GiB (aliased "
          f"{c.alias_bytes / GIB:.3f}), code {c.code_bytes / GIB:.3f} GiB",
          f"  total {c.total_bytes / GIB:.3f} GiB{hbm}"]


def check(config, topology: str, num_slices: int = 1) -> Dict[str, Any]:
  """Compiles the train step and one decode call of `config` for `num_slices` slices of
  `topology` (several slices: the hybrid mesh of config.mesh.shape inside a slice times
  config.mesh.dcn_shape across slices); the report (figures per chip)."""
  config.model.vocab_size = default_vocab_size(config)
  if config.model.get("attention") == "auto":  # 'auto' follows the backend: on TPU, Pallas
    config.model.attention = "pallas"
    print("config.model.attention='auto' compiles as 'pallas' (what it resolves to on TPU).",
          flush=True)
  devices = tpu_devices(topology, num_slices)
  kind = devices[0].device_kind
  chip = CHIPS.get(kind)
  print(f"{topology}" + (f" x {num_slices} slices" if num_slices > 1 else "")
        + f": {len(devices)} x {kind}"
        + (f" ({chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes / 1e9:.0f} GB HBM, "
           f"{chip.hbm_bandwidth / 1e9:.0f} GB/s)" if chip else
           " (no published peak known here: memory only)"), flush=True)
  train = compile_train_step(config, devices)
  tc = config.train
  tokens = int(tc.global_batch_size) * int(tc.seq_len)
  step: Optional[Compiled] = train["compiled"]
  report: Dict[str, Any] = dict(
      topology=topology, num_slices=num_slices, chips=len(devices), device_kind=kind,
      chip=dataclasses.asdict(chip) if chip else None, mesh=train["mesh"],
      params=train["params"], state_bytes=train["state_bytes"],
      attention=config.model.attention,
      rule_table=config.mesh.get("rule_table"), remat=config.model.get("remat", "none"),
      global_batch=int(tc.global_batch_size), seq_len=int(tc.seq_len),
      train_step=(dict(dataclasses.asdict(step), total_bytes=step.total_bytes) if step else
                  dict(out_of_memory=train["out_of_memory"])))
  print(f"model {config.model.kind} {train['params'] / 1e6:.1f}M parameters, attention "
        f"{report['attention']}, remat {report['remat']}, mesh {train['mesh']} "
        f"({report['rule_table']}), batch {tc.global_batch_size} x {tc.seq_len}", flush=True)
  if step is None:
    oom = train["out_of_memory"]
    print(f"train step: XLA ran out of HBM compiling it after {oom['seconds']:.0f} s "
          f"(temporaries {oom['temp_gib']}G, available {oom['available_gib']}G): "
          f"{oom['message']}", flush=True)
    fits = [False]
  else:
    for line in _memory_lines("train step", step, chip):
      print(line, flush=True)
    fits = [chip is None or step.total_bytes <= chip.hbm_bytes]
    print(f"  FLOPs per chip per step {step.flops:.4g}, HBM bytes accessed "
          f"{step.bytes_accessed:.4g}", flush=True)
  if chip and step is not None:
    rl = roofline(step, chip, tokens, len(devices))
    report["train_step"]["roofline"] = rl
    print(f"  roofline step {rl['step_s'] * 1e3:.1f} ms ({rl['bound']}-bound: compute "
          f"{rl['compute_s'] * 1e3:.1f} ms, HBM {rl['memory_s'] * 1e3:.1f} ms) -> "
          f"{rl['tokens_per_s_per_chip']:.0f} tokens/s per chip "
          f"({rl['tokens_per_s_per_chip'] * len(devices):.0f} on the "
          f"{f'{num_slices} slices' if num_slices > 1 else 'slice'})", flush=True)
  decode = compile_decode(config, train["model"], train["abstract"], devices)
  if decode is not None:
    sc = config.sample
    report["decode"] = dict(dataclasses.asdict(decode), total_bytes=decode.total_bytes,
                            num_samples=int(sc.num_samples), length=int(sc.length),
                            streams=int(sc.streams))
    for line in _memory_lines(f"decode call ({sc.num_samples} x {sc.length} tokens, "
                              f"{sc.streams} streams)", decode, chip):
      print(line, flush=True)
    fits.append(chip is None or decode.total_bytes <= chip.hbm_bytes)
  report["fits"] = all(fits)
  print("FITS" if report["fits"] else "DOES NOT FIT", flush=True)
  return report


def command_line(flags: Sequence[str]) -> str:
  """The shell command that runs compile_check with `flags`, runnable as written from the
  repository root (each flag quoted for the shell: mesh shapes hold parentheses)."""
  return shlex.join(["python", "-m", "armd_jax.compile_check", *flags])


def main(argv) -> None:
  """Entry point: `python -m armd_jax.compile_check --config=... --topology=...`."""
  if len(argv) > 1:
    raise SystemExit(f"compile_check: unexpected arguments {argv[1:]}")
  from absl import flags  # pylint: disable=g-import-not-at-top

  from armd_jax import storage  # pylint: disable=g-import-not-at-top
  config, source = config_of(flags.FLAGS.config, flags.FLAGS.workdir)
  report = check(config, flags.FLAGS.topology, flags.FLAGS.num_slices)
  report["config"] = source
  report["command"] = command_line(sys.argv[1:])
  if flags.FLAGS.out:
    storage.write_atomic(flags.FLAGS.out, json.dumps(report, indent=1, default=str))
    print(f"wrote {flags.FLAGS.out}", flush=True)
  sys.exit(0 if report["fits"] else 1)


def config_of(config: Any, workdir: str) -> tuple:
  """(config, where it came from): the `--config` file's, or the one a run saved in
  `--workdir` (exactly one of the two; SystemExit(2) naming the flags otherwise)."""
  if (config is None) == (not workdir):
    print("compile_check: pass exactly one of --config=FILE and --workdir=DIR.",
          file=sys.stderr)
    raise SystemExit(2)
  if workdir:
    from armd_jax.train import checkpoints  # pylint: disable=g-import-not-at-top
    return checkpoints.load_config(workdir), f"{workdir}/config.json"
  from absl import flags  # pylint: disable=g-import-not-at-top
  return config, getattr(flags.FLAGS["config"], "config_filename", None)


def _define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:8x8 (64 chips), v5p:4x4x8 (128).")
  flags.DEFINE_integer("num_slices", 1, "Number of slices of --topology (multi-slice over "
                       "DCN; the mesh is config.mesh.shape per slice x config.mesh.dcn_shape).")
  flags.DEFINE_string("workdir", "", "Compile the config a training run saved here "
                      "(<workdir>/config.json; a local path or a URL) instead of --config.")
  flags.DEFINE_string("out", "", "Also write the report as JSON here (a path or a URL).")
  flags.mark_flags_as_required(["topology"])


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  _define_flags()
  app.run(main)
