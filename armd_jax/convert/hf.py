"""Hugging Face GPT-2 and Llama-family checkpoints as our AR model.

`read_hf_checkpoint` reads a model folder's config.json and safetensors;
`hf_model_config` maps the config to an AR `ModelConfig`; `hf_to_ar_params` maps the
tensors to our parameter tree (the start-row convention: `armd_jax.convert`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from armd_jax.convert.pretrained import CONFIG_FILE, WEIGHTS_FILE


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
  import jax  # pylint: disable=g-import-not-at-top
  return {"params": jax.tree.map(lambda x: np.ascontiguousarray(x, np.float32), params)}
