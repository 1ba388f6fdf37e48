"""The experiment ConfigDict turned once into typed, validated, frozen dataclasses.

`configs/*.py` return an ml-collections `ConfigDict` with the sections `model`, `data`,
`order`, `optim`, `train`, `mesh`, `checkpoint`, `eval` and `sample`. Nothing below the
trainer reads the ConfigDict directly: each section is converted here, with a
`ValueError` naming the bad `config.<section>.<field>` for unknown or bad values.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Optional, Tuple, Type, TypeVar

if TYPE_CHECKING:  # annotations only: the settings import without ml_collections
  import ml_collections

from armd_jax import orders
from armd_jax.models import ModelConfig
from armd_jax.sampling.sampler import NOISES

LR_SCHEDULES = ("cosine", "constant")
SECTIONS = ("model", "data", "order", "optim", "train", "mesh", "checkpoint", "eval", "sample")

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class OrderConfig:
  """The training order schedule (docs/method.md, section 3), drawn inside the train step.

  Attributes:
    kind: a training order of `armd_jax.orders.ORDERS` ('left_to_right' (an AR
      model), 'progressive_permutation' (k(step) tokens' slots shuffled, k ramping
      1 -> rho between i_ar and i_perm), 'strided' (SBP with S drawn uniformly from
      `streams` each step) or 'masked_diffusion' (multi-token blocks from a
      `num_steps`-step schedule)). Read by kinds whose `uses_config_order` is True.
    i_ar: progressive_permutation: last step of pure left-to-right training.
    i_perm: progressive_permutation: step at which k reaches rho.
    rho: progressive_permutation: final number of shuffled tokens (seq_len = uniform order).
    streams: strided: the set S is drawn from, uniformly, every step.
    num_steps: masked_diffusion: number of masking steps T.
    schedule: masked_diffusion: 'linear' or 'cosine' alpha(t).
    mix_kind: an order of `armd_jax.orders.MIX_ORDERS` that replaces `kind` in a share of
      the rows of every batch ('strided' with `streams`, or 'random' singleton orders).
    mix_share: the probability that a row is drawn from `mix_kind` (0 = `kind` alone;
      each row chooses independently).
  """

  kind: str = "progressive_permutation"
  i_ar: int = 0
  i_perm: int = 1
  rho: int = 1
  streams: Tuple[int, ...] = (1,)
  num_steps: int = 128
  schedule: str = "linear"
  mix_kind: str = "strided"
  mix_share: float = 0.0

  def __post_init__(self):
    _choice("order", "kind", self.kind, orders.TRAIN_ORDERS)
    _choice("order", "mix_kind", self.mix_kind, orders.MIX_ORDERS)
    if not 0.0 <= self.mix_share <= 1.0:
      raise ValueError(f"config.order.mix_share={self.mix_share} must be in [0, 1].")
    _choice("order", "schedule", self.schedule, orders.SCHEDULES)
    object.__setattr__(self, "streams", tuple(int(s) for s in self.streams))
    if not self.streams or min(self.streams) < 1:
      raise ValueError(f"config.order.streams={self.streams} must be a non-empty tuple of "
                       "positive ints.")
    if not 0 <= self.i_ar <= self.i_perm:
      raise ValueError(f"config.order needs 0 <= i_ar <= i_perm, got i_ar={self.i_ar}, "
                       f"i_perm={self.i_perm}.")
    if self.rho < 1:
      raise ValueError(f"config.order.rho={self.rho} must be >= 1.")
    if self.num_steps < 1:
      raise ValueError(f"config.order.num_steps={self.num_steps} must be >= 1.")

  def check_length(self, seq_len: int) -> None:
    """Raises ValueError if an order needs a length that `seq_len` is not."""
    if self.kind == "strided" or (self.mix_share > 0 and self.mix_kind == "strided"):
      bad = [s for s in self.streams if seq_len % s]
      if bad:
        raise ValueError(f"config.order.streams {bad} do not divide config.train.seq_len="
                         f"{seq_len}.")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine decay or constant; clipping; EMA.

  Attributes:
    learning_rate: peak learning rate.
    warmup_steps: linear warmup from 0 to the peak.
    schedule: 'cosine' (decay to `end_lr_factor` * peak at the last step) or 'constant'.
    end_lr_factor: cosine: final learning rate as a fraction of the peak.
    weight_decay: decoupled weight decay on matrices (ndim >= 2) only.
    b1, b2, eps: Adam moments and epsilon.
    grad_clip_norm: clip the global gradient norm to this (0 = no clipping).
    ema_decay: decay of the parameter EMA kept in the train state (0 = no EMA).
  """

  learning_rate: float = 3e-4
  warmup_steps: int = 100
  schedule: str = "cosine"
  end_lr_factor: float = 0.1
  weight_decay: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip_norm: float = 1.0
  ema_decay: float = 0.0

  def __post_init__(self):
    _choice("optim", "schedule", self.schedule, LR_SCHEDULES)
    if self.learning_rate <= 0:
      raise ValueError(f"config.optim.learning_rate={self.learning_rate} must be > 0.")
    if self.warmup_steps < 0:
      raise ValueError(f"config.optim.warmup_steps={self.warmup_steps} must be >= 0.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"config.optim.ema_decay={self.ema_decay} must be in [0, 1).")
    if self.grad_clip_norm < 0 or self.weight_decay < 0:
      raise ValueError("config.optim.grad_clip_norm and config.optim.weight_decay must be "
                       f">= 0, got {self.grad_clip_norm} and {self.weight_decay}.")
    if not 0.0 <= self.end_lr_factor <= 1.0:
      raise ValueError(f"config.optim.end_lr_factor={self.end_lr_factor} must be in [0, 1].")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Loop settings.

  Attributes:
    num_steps: total optimiser steps.
    global_batch_size: sequences per step over all processes.
    seq_len: tokens per sequence.
    seed: seed of parameter init, of the per-step rng and (unless config.data.seed) of
      the data order.
    log_every: steps between progress lines and train-metric writes.
    eval_every: steps between validation runs (0 = only at the end).
    checkpoint_every: steps between checkpoints (0 = only at the end).
    tensorboard: also write TensorBoard summaries through CLU (needs `tensorboard`).
  """

  num_steps: int = 1000
  global_batch_size: int = 32
  seq_len: int = 128
  seed: int = 0
  log_every: int = 50
  eval_every: int = 500
  checkpoint_every: int = 500
  tensorboard: bool = True

  def __post_init__(self):
    for name in ("num_steps", "global_batch_size", "seq_len", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"config.train.{name}={getattr(self, name)} must be >= 1.")
    for name in ("eval_every", "checkpoint_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"config.train.{name}={getattr(self, name)} must be >= 0.")


MESH_AXES = ("data", "fsdp", "tensor")
RULE_TABLES = ("data_parallel", "fsdp", "fsdp_tensor")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh ('data', 'fsdp', 'tensor') and the logical-axis rule table.

  Attributes:
    shape: sizes of the mesh axes ('data', 'fsdp', 'tensor') inside one slice (all the
      devices when there is one slice: CPU, GPU, a single TPU slice); one -1 takes the
      remaining devices of the slice. The batch is split over data x fsdp; parameters,
      Adam moments and EMA over fsdp (their embed dimension) and tensor (heads / MLP /
      vocabulary).
    dcn_shape: how many slices each mesh axis spans (TPU multi-slice: the slices talk
      over the data-centre network, DCN, much slower than the links inside a slice).
      Mesh axis i has size shape[i] * dcn_shape[i]; one -1 takes the remaining slices.
      The default (-1, 1, 1) puts all slices on 'data' (one gradient all-reduce per step
      crosses DCN); (1, -1, 1) would split the parameters across slices too. With one
      slice it resolves to (1, 1, 1).
    num_slices: the number of slices the run was launched on (`launch/xpk.sh
      --num_slices` passes it); the mesh is refused when the devices span another
      number (e.g. slices that cannot see each other). 0: whatever the devices span.
    rule_table: which rule table of `armd_jax.train.partitioning.RULE_TABLES` maps the
      modules' logical axes to the mesh: 'data_parallel' (replicated parameters),
      'fsdp' (parameters sharded over 'fsdp') or 'fsdp_tensor' (and heads / MLP /
      vocabulary over 'tensor').
    rules: explicit (logical axis, mesh axis / tuple of mesh axes / None) pairs that
      replace the named table when non-empty.
  """

  shape: Tuple[int, ...] = (-1, 1, 1)
  dcn_shape: Tuple[int, ...] = (-1, 1, 1)
  num_slices: int = 0
  rule_table: str = "fsdp_tensor"
  rules: Tuple[Tuple[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
    object.__setattr__(self, "dcn_shape", tuple(int(s) for s in self.dcn_shape))
    object.__setattr__(self, "rules", tuple((str(a), _mesh_axes(m)) for a, m in self.rules))
    _choice("mesh", "rule_table", self.rule_table, RULE_TABLES)
    if len(self.shape) != len(MESH_AXES):
      raise ValueError(f"config.mesh.shape {self.shape} must have one size per mesh axis "
                       f"{MESH_AXES}, e.g. (-1, 1, 1) for data parallel or (1, -1, 4) for "
                       "FSDP with 4-way tensor parallelism.")
    if len(self.dcn_shape) != len(MESH_AXES):
      raise ValueError(f"config.mesh.dcn_shape {self.dcn_shape} must have one slice count "
                       f"per mesh axis {MESH_AXES}, e.g. (-1, 1, 1): all slices on 'data'.")
    for name, sizes in (("shape", self.shape), ("dcn_shape", self.dcn_shape)):
      if sum(s == -1 for s in sizes) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh.{name} {sizes} must hold positive sizes and at "
                         "most one -1.")
    if self.num_slices < 0:
      raise ValueError(f"config.mesh.num_slices={self.num_slices} must be >= 0 (0: as many "
                       "slices as the devices span).")
    for logical, mesh_axis in self.rules:
      names = () if mesh_axis is None else (
          (mesh_axis,) if isinstance(mesh_axis, str) else mesh_axis)
      bad = [n for n in names if n not in MESH_AXES]
      if bad:
        raise ValueError(f"config.mesh.rules maps {logical!r} to {bad}, not mesh axes "
                         f"{MESH_AXES}.")


def _mesh_axes(value: Any) -> Any:
  """None, one axis name, or a tuple of axis names (a list from JSON becomes a tuple)."""
  if value is None or isinstance(value, str):
    return value
  return tuple(str(v) for v in value)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """Checkpointing.

  Attributes:
    max_to_keep: checkpoints kept in <workdir>/checkpoints.
    async_save: save in a background thread (orbax async checkpointing).
    init_from: a workdir (or its checkpoints/ folder) whose latest parameters (and EMA)
      start a fresh run when the workdir holds no checkpoint ('' = scratch).
    lock_timeout_s: the workdir lock (`armd_jax.train.lock`) is stale, and taken over,
      when its holder's heartbeat is older than this (whatever host wrote it).
  """

  max_to_keep: int = 3
  async_save: bool = True
  init_from: str = ""
  lock_timeout_s: float = 600.0

  def __post_init__(self):
    if self.max_to_keep < 1:
      raise ValueError(f"config.checkpoint.max_to_keep={self.max_to_keep} must be >= 1.")
    if not self.lock_timeout_s > 0:
      raise ValueError(f"config.checkpoint.lock_timeout_s={self.lock_timeout_s} must be > 0.")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Validation under the left-to-right order (exact NLL).

  Attributes:
    num_batches: held-out batches per evaluation (0 = the whole split).
    use_ema: evaluate the EMA parameters when the run keeps them.
  """

  num_batches: int = 0
  use_ema: bool = True

  def __post_init__(self):
    if self.num_batches < 0:
      raise ValueError(f"config.eval.num_batches={self.num_batches} must be >= 0.")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  """Samples printed at the end of training (through `armd_jax.sampling.generate`).

  Attributes:
    num_samples: sequences generated (0 = none).
    length: tokens per sample (<= model max_len; divisible by `streams`).
    streams: strided parallel streams S (N/S + S - 1 network calls).
    temperature, top_k, top_p: sampler controls (top_k 0 / top_p 1.0 = off).
    seed: sampling rng seed.
    noise: the sampler's categorical noise, 'precise' (float32 relative precision down
      to 2^-48) or 'fast' (jax's float32 Gumbel noise); `SamplerConfig.noise`.
  """

  num_samples: int = 0
  length: int = 128
  streams: int = 1
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  noise: str = "precise"

  def __post_init__(self):
    _choice("sample", "noise", self.noise, NOISES)
    if self.num_samples < 0 or self.length < 1 or self.streams < 1:
      raise ValueError("config.sample needs num_samples >= 0, length >= 1 and streams >= 1; "
                       f"got {self.num_samples}, {self.length}, {self.streams}.")
    if self.num_samples and self.length % self.streams:
      raise ValueError(f"config.sample.streams={self.streams} must divide "
                       f"config.sample.length={self.length}.")


def section(config: ml_collections.ConfigDict, name: str, cls: Type[T]) -> T:
  """Builds dataclass `cls` from `config.<name>`; unknown fields are a ValueError."""
  if name not in config:
    raise ValueError(f"config has no section {name!r}; expected sections {SECTIONS}.")
  return from_mapping(config[name], cls, f"config.{name}")


def from_mapping(values: Any, cls: Type[T], where: str) -> T:
  """Builds dataclass `cls` from a ConfigDict/dict, naming unknown fields in the error."""
  values = values.to_dict() if hasattr(values, "to_dict") else dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"Unknown field(s) {unknown} in {where}; known fields: {sorted(known)}.")
  try:
    return cls(**values)
  except TypeError as e:  # e.g. a missing required field
    raise ValueError(f"{where}: {e}") from e


def model_config_from(config: ml_collections.ConfigDict,
                      vocab_size: Optional[int] = None) -> ModelConfig:
  """The typed `ModelConfig` of `config.model`.

  `config.model.vocab_size` may be None in a config file: the trainer fills it from the
  data vocabulary (and saves the filled config in the workdir); pass `vocab_size` to
  fill it here.
  """
  values = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  if vocab_size is not None:
    values["vocab_size"] = int(vocab_size)
  if values.get("vocab_size") is None:
    raise ValueError("config.model.vocab_size is unset: set it, or let train_and_evaluate "
                     "fill it from the data vocabulary.")
  return from_mapping(values, ModelConfig, "config.model")


def order_config_from(config: ml_collections.ConfigDict) -> OrderConfig:
  """The typed order schedule of `config.order`."""
  return section(config, "order", OrderConfig)


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every typed section of an experiment config except `model` and `data`."""

  order: OrderConfig
  optim: OptimConfig
  train: TrainConfig
  mesh: MeshConfig
  checkpoint: CheckpointConfig
  eval: EvalConfig
  sample: SampleConfig


def settings_from(config: ml_collections.ConfigDict) -> Settings:
  """Validates every section of `config` (all errors name `config.<section>.<field>`)."""
  unknown = sorted(set(config.keys()) - set(SECTIONS))
  if unknown:
    raise ValueError(f"Unknown config section(s) {unknown}; expected {SECTIONS}.")
  settings = Settings(
      order=section(config, "order", OrderConfig),
      optim=section(config, "optim", OptimConfig),
      train=section(config, "train", TrainConfig),
      mesh=section(config, "mesh", MeshConfig),
      checkpoint=section(config, "checkpoint", CheckpointConfig),
      eval=section(config, "eval", EvalConfig),
      sample=section(config, "sample", SampleConfig))
  settings.order.check_length(settings.train.seq_len)
  return settings


def _choice(section_name: str, name: str, value: Any, choices: Tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"config.{section_name}.{name}={value!r} must be one of {list(choices)}.")

