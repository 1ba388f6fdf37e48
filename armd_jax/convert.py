"""Weights in and out: safetensors export, Hugging Face causal-LM import, AR -> ARMD.

Commands:
  python -m armd_jax.convert export --workdir=DIR --out=DIR2 [--raw]
      The EMA (or with --raw the raw) parameters of a training workdir as
      DIR2/model.safetensors (flat names: the parameter-tree path joined by '.', e.g.
      'layer_0.attn.query.kernel') and DIR2/config.json (the `ModelConfig` and the
      vocabulary: kind plus its file, copied beside). `load_pretrained(DIR2)` reads it back.
  python -m armd_jax.convert import --hf_dir=DIR --kind=ar|armd --workdir=OUT [--seed=0]
      A GPT-2 or Llama-family checkpoint (DIR/config.json + DIR/model.safetensors, or a
      sharded model.safetensors.index.json) as a normal workdir of ours: OUT/config.json
      and an orbax checkpoint at step 0 (params and EMA params, no optimiser state) that
      `sample`, `evaluate` and `config.checkpoint.init_from` read. DIR/tokenizer.json, when
      present, becomes the run's vocabulary ('hf').

The imported model is the same function as the Hugging Face one with one convention of
ours: a start row. Our AR scores tokens x_0..x_{N-1} as the Hugging Face model scores
[bos, x_0, .., x_{N-2}] (`bos_token_id` of its config.json), so `bos_embedding` is the
bos token's embedding row and stream row j is Hugging Face position j (`max_len` is the
Hugging Face length minus one). `--kind=armd` adapts the AR weights to ARMD by
`adapt_ar_params` (docs/training.md, "Adapting a pretrained AR model").
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "armd-jax-pretrained-v1"

# ModelConfig fields an ARMD must share with the AR it is adapted from (the shared layers,
# embeddings and output head are copied, so they must be the same function of them).
SHARED_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_dim",
                 "tie_embeddings", "rope_base", "layer_norm_epsilon", "norm", "mlp_activation",
                 "mlp_bias", "attention_bias", "learned_positions")
# Parameters only ARMD has: they keep their fresh initialisation when adapting.
ARMD_ONLY = ("pe", "bos_pe", "query_norm", "position_proj")


# -- flat names ------------------------------------------------------------------------


def flatten_params(params: Mapping[str, Any], as_numpy: bool = True) -> Dict[str, Any]:
  """{'params': tree} (or the tree itself) -> {'layer_0.attn.query.kernel': array}
  (numpy arrays, or the leaves as they are with `as_numpy=False`)."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  tree = params["params"] if set(params) == {"params"} else params
  flat = traverse_util.flatten_dict(dict(tree), sep=".")
  return {name: np.asarray(value) if as_numpy else value for name, value in flat.items()}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  """The inverse of `flatten_params`: {'params': nested dict of arrays}."""
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  return {"params": traverse_util.unflatten_dict(dict(flat), sep=".")}


def _model_config_dict(config) -> Dict[str, Any]:
  """A `ModelConfig` as JSON-ready values (the dtype as its name)."""
  values = dataclasses.asdict(config)
  if not isinstance(values["dtype"], str):
    values["dtype"] = np.dtype(values["dtype"]).name
  return values


# -- export / load_pretrained ----------------------------------------------------------


def export(workdir: str, out: str, raw: bool = False) -> str:
  """Writes a workdir's parameters as `out`/model.safetensors plus `out`/config.json.

  Args:
    workdir: a training workdir (local or URL) with config.json and a checkpoint.
    out: a local directory (created).
    raw: export the raw parameters instead of the EMA ones (a run without EMA always
      exports its raw parameters).

  Returns:
    the path of the written model.safetensors.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  from armd_jax.train.loading import load_trained  # pylint: disable=g-import-not-at-top
  trained = load_trained(workdir, use_ema=not raw, with_vocab=False)
  os.makedirs(out, exist_ok=True)
  vocab = _export_vocab(trained.config, workdir, out)
  flat = flatten_params(trained.params)
  path = os.path.join(out, WEIGHTS_FILE)
  save_file(flat, path, metadata={"format": FORMAT})
  has_ema = bool(trained.config.optim.get("ema_decay", 0.0))
  description = {"format": FORMAT, "model": _model_config_dict(trained.model_config),
                 "vocab": vocab,
                 "source": {"workdir": str(workdir), "step": trained.step,
                            "params": "ema" if has_ema and not raw else "raw"}}
  with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(description, f, indent=2, sort_keys=True)
  return path


def _export_vocab(config, workdir: str, out: str) -> Dict[str, Any]:
  """The vocabulary description of a run; its file (if any) copied into `out`."""
  from armd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from armd_jax import storage  # pylint: disable=g-import-not-at-top
  vocab = data_lib.load_vocab(config.data, workdir)
  name = type(vocab).__name__
  if name == "ByteVocabulary":
    return {"kind": "byte"}
  if name == "SentencePieceVocabulary":
    shutil.copyfile(storage.local_copy(vocab.model_file), os.path.join(out, "vocab.model"))
    return {"kind": "sentencepiece", "file": "vocab.model"}
  if name == "HuggingFaceVocabulary":
    if os.path.isfile(vocab.name_or_path):
      shutil.copyfile(vocab.name_or_path, os.path.join(out, "tokenizer.json"))
      return {"kind": "hf", "file": "tokenizer.json"}
    return {"kind": "hf", "name": vocab.name_or_path}
  # A seqio vocabulary lives in its task's registry, not in files we can carry.
  return {"kind": "seqio", "task": config.data.task,
          "note": "not portable: load_pretrained returns vocab None"}


def load_pretrained(directory: str) -> Tuple[Any, Dict[str, Any], Any]:
  """Reads an exported model back: `(model, params, vocab)`.

  Args:
    directory: a folder written by `export` (model.safetensors + config.json).

  Returns:
    model: the Flax module (`build_model` of the saved `ModelConfig`).
    params: {'params': ...} of jnp float32 arrays, bitwise the exported ones.
    vocab: the vocabulary (`armd_jax.data` classes), or None for a seqio vocabulary.

  Raises:
    FileNotFoundError: a file is missing; ValueError: config.json is not ours.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  from armd_jax.models import ModelConfig, build_model  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(directory, CONFIG_FILE)
  weights_path = os.path.join(directory, WEIGHTS_FILE)
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"'{path}' does not exist: not a folder written by "
                              "`python -m armd_jax.convert export`.")
  with open(config_path, encoding="utf-8") as f:
    description = json.load(f)
  if description.get("format") != FORMAT:
    raise ValueError(f"'{config_path}' has format {description.get('format')!r}, expected "
                     f"{FORMAT!r} (a Hugging Face folder? use `convert import`).")
  model_config = ModelConfig(**description["model"])
  params = unflatten_params(load_file(weights_path))
  params = {"params": _map_tree(jnp.asarray, params["params"])}
  return build_model(model_config), params, _load_vocab(description["vocab"], directory)


def _map_tree(fn, tree):
  return {k: _map_tree(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _load_vocab(vocab: Dict[str, Any], directory: str):
  from armd_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
  kind = vocab["kind"]
  if kind == "byte":
    return vocab_lib.ByteVocabulary()
  if kind == "sentencepiece":
    return vocab_lib.SentencePieceVocabulary(os.path.join(directory, vocab["file"]))
  if kind == "hf":
    return vocab_lib.HuggingFaceVocabulary(
        os.path.join(directory, vocab["file"]) if "file" in vocab else vocab["name"])
  return None


# -- Hugging Face import ---------------------------------------------------------------


def read_hf_checkpoint(hf_dir: str) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """config.json and every tensor (float32 numpy) of a Hugging Face model folder."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"--hf_dir={hf_dir!r} has no config.json.")
  with open(config_path, encoding="utf-8") as f:
    hf_config = json.load(f)
  single = os.path.join(hf_dir, WEIGHTS_FILE)
  index = os.path.join(hf_dir, WEIGHTS_FILE + ".index.json")
  if os.path.isfile(single):
    files = [single]
  elif os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      files = [os.path.join(hf_dir, name) for name in sorted(set(json.load(f)["weight_map"]
                                                                  .values()))]
  else:
    raise FileNotFoundError(f"--hf_dir={hf_dir!r} has neither {WEIGHTS_FILE} nor "
                            f"{WEIGHTS_FILE}.index.json (PyTorch .bin files are not read).")
  tensors: Dict[str, np.ndarray] = {}
  for path in files:
    tensors.update({k: np.asarray(v, np.float32) for k, v in load_file(path).items()})
  return hf_config, tensors


def _hf_get(hf_config: Mapping[str, Any], *names: str, default: Any = KeyError) -> Any:
  for name in names:
    if hf_config.get(name) is not None:
      return hf_config[name]
  if default is KeyError:
    raise ValueError(f"--hf_dir config.json has none of the fields {list(names)}.")
  return default


def _bos_id(hf_config: Mapping[str, Any], bos_token_id: Optional[int]) -> int:
  bos = bos_token_id if bos_token_id is not None else hf_config.get("bos_token_id")
  if bos is None:
    raise ValueError("--hf_dir config.json has no bos_token_id: pass --bos_token_id (the "
                     "token whose embedding becomes our start row).")
  return int(bos[0] if isinstance(bos, list) else bos)


def hf_model_config(hf_config: Mapping[str, Any], **overrides):
  """The AR `ModelConfig` of a GPT-2 or Llama-family config.json (`overrides` on top).

  Raises ValueError naming the config.json field whose value we cannot represent.
  """
  from armd_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  model_type = hf_config.get("model_type")
  tie = bool(hf_config.get("tie_word_embeddings", model_type == "gpt2"))
  if model_type == "gpt2":
    activation = hf_config.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ValueError(f"config.json activation_function={activation!r}: only the tanh GELU "
                       "('gelu_new') is supported.")
    d_model = int(hf_config["n_embd"])
    if hf_config.get("scale_attn_by_inverse_layer_idx") or hf_config.get(
        "reorder_and_upcast_attn"):
      raise ValueError("config.json scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn "
                       "are not supported.")
    values = dict(d_model=d_model, num_layers=int(hf_config["n_layer"]),
                  num_heads=int(hf_config["n_head"]),
                  mlp_dim=int(hf_config.get("n_inner") or 4 * d_model),
                  max_len=int(hf_config["n_positions"]) - 1, rope_base=None,
                  learned_positions=True, norm="layer_norm", mlp_activation="gelu",
                  mlp_bias=True, attention_bias=True,
                  layer_norm_epsilon=float(hf_config.get("layer_norm_epsilon", 1e-5)))
  elif model_type in ("llama", "mistral"):
    if hf_config.get("hidden_act", "silu") != "silu":
      raise ValueError(f"config.json hidden_act={hf_config['hidden_act']!r}: only 'silu' "
                       "(SwiGLU) is supported.")
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
      raise ValueError(f"config.json rope scaling {rope!r}: only plain RoPE is supported.")
    d_model, heads = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
    if hf_config.get("head_dim") not in (None, d_model // heads):
      raise ValueError(f"config.json head_dim={hf_config['head_dim']} must equal hidden_size "
                       f"/ num_attention_heads = {d_model // heads}.")
    if hf_config.get("sliding_window") and model_type == "mistral":
      raise ValueError("config.json sliding_window: sliding-window attention is not "
                       "supported (set it to null for full attention).")
    values = dict(d_model=d_model, num_layers=int(hf_config["num_hidden_layers"]),
                  num_heads=heads,
                  num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
                  mlp_dim=int(hf_config["intermediate_size"]),
                  max_len=int(hf_config["max_position_embeddings"]) - 1,
                  rope_base=float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))),
                  learned_positions=False, norm="rms_norm", mlp_activation="swiglu",
                  mlp_bias=bool(hf_config.get("mlp_bias", False)),
                  attention_bias=bool(hf_config.get("attention_bias", False)),
                  layer_norm_epsilon=float(hf_config.get("rms_norm_eps", 1e-6)))
  else:
    raise ValueError(f"config.json model_type={model_type!r}: supported are 'gpt2', 'llama' "
                     "and 'mistral'.")
  values.update(vocab_size=int(hf_config["vocab_size"]), kind="ar", tie_embeddings=tie,
                dtype="float32", dropout_rate=0.0)
  values.update(overrides)
  return ModelConfig(**values)


def hf_to_ar_params(hf_config: Mapping[str, Any], tensors: Mapping[str, np.ndarray],
                    config, bos_token_id: Optional[int] = None) -> Dict[str, Any]:
  """Our AR parameter tree {'params': ...} from Hugging Face tensors (see the module doc).

  Raises ValueError naming a missing tensor.
  """
  model_type = hf_config.get("model_type")
  t = {k.removeprefix("transformer.").removeprefix("model."): v for k, v in tensors.items()}

  def get(name):
    if name not in t:
      raise ValueError(f"--hf_dir: tensor {name!r} is missing from the checkpoint.")
    return t[name]

  h, dh, hkv, d = config.num_heads, config.head_dim, config.kv_heads, config.d_model
  params: Dict[str, Any] = {}
  norm = lambda prefix: ({"scale": get(prefix + ".weight"), "bias": get(prefix + ".bias")}  # noqa: E731
                         if config.norm == "layer_norm" else {"scale": get(prefix + ".weight")})
  if model_type == "gpt2":
    embedding = get("wte.weight")
    params["position_embedding"] = get("wpe.weight")[:config.max_len + 1]
    for i in range(config.num_layers):
      p = f"h.{i}."
      qkv_w, qkv_b = get(p + "attn.c_attn.weight"), get(p + "attn.c_attn.bias")  # [D, 3D]
      attn = {}
      for j, name in enumerate(("query", "key", "value")):
        attn[name] = {"kernel": qkv_w[:, j * d:(j + 1) * d].reshape(d, h, dh),
                      "bias": qkv_b[j * d:(j + 1) * d].reshape(h, dh)}
      attn["out"] = {"kernel": get(p + "attn.c_proj.weight").reshape(h, dh, d),
                     "bias": get(p + "attn.c_proj.bias")}
      params[f"layer_{i}"] = {
          "ln_attn": norm(p + "ln_1"), "attn": attn, "ln_mlp": norm(p + "ln_2"),
          "mlp": {"wi": {"kernel": get(p + "mlp.c_fc.weight"), "bias": get(p + "mlp.c_fc.bias")},
                  "wo": {"kernel": get(p + "mlp.c_proj.weight"),
                         "bias": get(p + "mlp.c_proj.bias")}}}
    params["final_norm"] = norm("ln_f")
  else:  # llama / mistral: nn.Linear weights are [out, in]
    embedding = get("embed_tokens.weight")

    def linear(name, shape, bias=False):
      out = {"kernel": get(name + ".weight").T.reshape(shape)}
      if bias:
        out["bias"] = get(name + ".bias").reshape(shape[1:])
      return out

    for i in range(config.num_layers):
      p = f"layers.{i}."
      ab, mb = config.attention_bias, config.mlp_bias
      attn = {"query": linear(p + "self_attn.q_proj", (d, h, dh), ab),
              "key": linear(p + "self_attn.k_proj", (d, hkv, dh), ab),
              "value": linear(p + "self_attn.v_proj", (d, hkv, dh), ab)}
      attn["out"] = {"kernel": get(p + "self_attn.o_proj.weight").T.reshape(h, dh, d)}
      if ab:
        attn["out"]["bias"] = get(p + "self_attn.o_proj.bias")
      params[f"layer_{i}"] = {
          "ln_attn": norm(p + "input_layernorm"), "attn": attn,
          "ln_mlp": norm(p + "post_attention_layernorm"),
          "mlp": {"wi": linear(p + "mlp.up_proj", (d, config.mlp_dim), mb),
                  "wi_gate": linear(p + "mlp.gate_proj", (d, config.mlp_dim), mb),
                  "wo": linear(p + "mlp.down_proj", (config.mlp_dim, d), mb)}}
    params["final_norm"] = norm("norm")
  params["embedding"] = {"embedding": embedding}
  params["bos_embedding"] = embedding[_bos_id(hf_config, bos_token_id)]
  if not config.tie_embeddings:
    head = tensors.get("lm_head.weight")
    if head is None:
      raise ValueError("--hf_dir: tie_word_embeddings is false but lm_head.weight is missing.")
    params["head"] = {"kernel": np.asarray(head).T}
  return {"params": _map_tree(lambda x: np.ascontiguousarray(x, np.float32), params)}


# -- AR -> ARMD ------------------------------------------------------------------------


def armd_config_from_ar(ar_config, **overrides):
  """The ARMD `ModelConfig` adapted from an AR one: same shared fields, ARMD defaults
  (or `overrides`) for the ARMD-only ones."""
  return ar_config.replace(kind="armd", **overrides)


def adapt_ar_params(ar_params: Mapping[str, Any], armd_params: Mapping[str, Any],
                    ar_config=None, armd_config=None, source: str = "the AR model"
                    ) -> Dict[str, Any]:
  """ARMD parameters initialised from an AR model's (the rule of docs/training.md).

  Every parameter the two share by name (embedding, start row, position table, layer_i,
  final norm, untied head) is copied from `ar_params`: layer i of ARMD is layer i of the
  AR, and the two-stream lower layers use it for both streams. The ARMD-only parameters
  (`ARMD_ONLY`: PE table, start PE row, query-stream norm and position projection) keep
  their values in `armd_params` (a fresh initialisation).

  Args:
    ar_params, armd_params: {'params': ...} trees (numpy or jax arrays).
    ar_config, armd_config: when given, the `SHARED_FIELDS` must agree.
    source: named in errors (a workdir or folder).

  Returns:
    {'params': ...} with the structure of `armd_params`.

  Raises:
    ValueError: a shared field, a parameter name or a shape differs (names it).
  """
  if ar_config is not None and armd_config is not None:
    for name in SHARED_FIELDS:
      a, b = getattr(ar_config, name), getattr(armd_config, name)
      if a != b:
        raise ValueError(f"{source}: model.{name}={a!r} but the ARMD config has {b!r}; an "
                         "ARMD adapted from an AR model must share it.")
  ar, armd = flatten_params(ar_params), flatten_params(armd_params, as_numpy=False)
  out = {}
  for name, value in armd.items():
    if name.split(".")[0] in ARMD_ONLY:
      out[name] = value
      continue
    if name not in ar:
      raise ValueError(f"{source}: has no parameter {name!r} for the ARMD model.")
    if ar[name].shape != value.shape:
      raise ValueError(f"{source}: parameter {name!r} has shape {ar[name].shape}, the ARMD "
                       f"model needs {value.shape} (model.max_len with learned positions?).")
    out[name] = ar[name].astype(np.dtype(value.dtype))
  unused = sorted(set(ar) - set(out))
  if unused:
    raise ValueError(f"{source}: AR parameters {unused} have no place in the ARMD model.")
  return unflatten_params(out)


def init_params(config, seed: int = 0, seq_len: int = 8) -> Dict[str, Any]:
  """Fresh {'params': ...} (numpy) of `build_model(config)`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import linen as nn  # pylint: disable=g-import-not-at-top

  from armd_jax import orders  # pylint: disable=g-import-not-at-top
  from armd_jax.models import build_model  # pylint: disable=g-import-not-at-top
  seq_len = min(seq_len, config.max_len)
  variables = build_model(config).init(jax.random.PRNGKey(seed),
                                       jnp.zeros((1, seq_len), jnp.int32),
                                       orders.left_to_right(1, seq_len))
  return {"params": _map_tree(np.asarray, nn.meta.unbox(variables)["params"])}


def import_hf(hf_dir: str, kind: str, workdir: str, seed: int = 0,
              bos_token_id: Optional[int] = None) -> Tuple[Any, Dict[str, Any]]:
  """Imports a Hugging Face GPT-2 / Llama-family folder as workdir `workdir`.

  Returns:
    (ModelConfig, params) of the written model.
  """
  if kind not in ("ar", "armd"):
    raise ValueError(f"--kind={kind!r} must be 'ar' or 'armd'.")
  hf_config, tensors = read_hf_checkpoint(hf_dir)
  config = hf_model_config(hf_config)
  params = hf_to_ar_params(hf_config, tensors, config, bos_token_id)
  if kind == "armd":
    armd_config = armd_config_from_ar(config)
    params = adapt_ar_params(params, init_params(armd_config, seed), config, armd_config,
                             source=f"--hf_dir={hf_dir}")
    config = armd_config
  tokenizer = os.path.join(hf_dir, "tokenizer.json")
  write_workdir(workdir, config, params, seed=seed,
                tokenizer=tokenizer if os.path.isfile(tokenizer) else None,
                note=f"imported from {hf_dir} ({hf_config.get('model_type')}, kind={kind})")
  return config, params


def write_workdir(workdir: str, model_config, params: Mapping[str, Any], seed: int = 0,
                  tokenizer: Optional[str] = None, note: str = "") -> None:
  """A workdir of ours holding `params`: config.json and an orbax checkpoint at step 0
  (state {step, params, ema_params, rng}; no optimiser state, so fine-tune it through
  `config.checkpoint.init_from`, which starts a fresh optimiser)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  from armd_jax.train import checkpoints, defaults  # pylint: disable=g-import-not-at-top
  config = defaults.base_config()
  for name, value in _model_config_dict(model_config).items():
    config.model[name] = value
  config.train.seed = seed
  # No corpus comes with imported weights: the data section names only the vocabulary
  # (fine-tuning runs bring their own config.data). The 'synthetic' task needs no files.
  config.data.task = "synthetic"
  config.data.vocab = "hf"
  if tokenizer is not None:
    from armd_jax.data import vocab as vocab_lib  # pylint: disable=g-import-not-at-top
    config.data.hf_tokenizer = "tokenizer.json"
    # Where load_vocab looks first for this workdir's copy of `hf_tokenizer`.
    copy = vocab_lib._workdir_hf_copy(  # pylint: disable=protected-access
        vocab_lib.DataConfig.from_config(config.data), workdir)
    copy.parent.mkdir(parents=True, exist_ok=True)
    with open(tokenizer, "rb") as f:
      copy.write_bytes(f.read())
  elif note:  # hf_tokenizer stays '': loading the vocabulary names the missing field
    note += "; no tokenizer.json: set config.data.hf_tokenizer to read text with it"
  checkpoints.save_config(config, workdir)
  to_jax = lambda t: jax.tree.map(jnp.asarray, dict(t))  # noqa: E731
  state = {"step": jnp.zeros((), jnp.int32), "params": to_jax(params),
           "ema_params": to_jax(params), "rng": jax.random.PRNGKey(seed)}
  manager = ocp.CheckpointManager(checkpoints.checkpoint_dir(workdir),
                                  options=ocp.CheckpointManagerOptions(create=True),
                                  item_names=("state",))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  if note and jax.process_index() == 0:
    print(f"wrote {workdir}: {note}", flush=True)


# -- command line ----------------------------------------------------------------------


def main(argv=None) -> int:
  """`python -m armd_jax.convert export|import ...` (see the module doc); exit status."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m armd_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  ex = sub.add_parser("export", help="a workdir's parameters as safetensors + config.json")
  ex.add_argument("--workdir", required=True)
  ex.add_argument("--out", required=True)
  ex.add_argument("--raw", action="store_true", help="the raw parameters, not the EMA")
  im = sub.add_parser("import", help="a Hugging Face GPT-2 / Llama folder as a workdir")
  im.add_argument("--hf_dir", required=True)
  im.add_argument("--kind", required=True, choices=("ar", "armd"))
  im.add_argument("--workdir", required=True)
  im.add_argument("--seed", type=int, default=0, help="init of ARMD-only parameters")
  im.add_argument("--bos_token_id", type=int, default=None,
                  help="start-row token when config.json has no bos_token_id")
  args = parser.parse_args(argv)
  try:
    if args.command == "export":
      print(f"wrote {export(args.workdir, args.out, args.raw)}", flush=True)
    else:
      import_hf(args.hf_dir, args.kind, args.workdir, args.seed, args.bos_token_id)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, ValueError) else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
