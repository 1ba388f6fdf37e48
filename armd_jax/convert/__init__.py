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

Files: `pretrained.py` (our safetensors format: `export`, `load_pretrained`, flat
names), `hf.py` (the Hugging Face GPT-2 / Llama mapping), `adapt.py` (AR -> ARMD),
`workdir.py` (`import_hf`, `write_workdir`), `cli.py` (the commands).
"""

from armd_jax.convert.adapt import (ARMD_ONLY, SHARED_FIELDS, adapt_ar_params,
                                   armd_config_from_ar, init_params)
from armd_jax.convert.cli import main
from armd_jax.convert.hf import hf_model_config, hf_to_ar_params, read_hf_checkpoint
from armd_jax.convert.pretrained import (CONFIG_FILE, FORMAT, WEIGHTS_FILE, export,
                                         flatten_params, load_pretrained, unflatten_params)
from armd_jax.convert.workdir import import_hf, write_workdir

__all__ = ["ARMD_ONLY", "CONFIG_FILE", "FORMAT", "SHARED_FIELDS", "WEIGHTS_FILE",
           "adapt_ar_params", "armd_config_from_ar", "export", "flatten_params",
           "hf_model_config", "hf_to_ar_params", "import_hf", "init_params",
           "load_pretrained", "main", "read_hf_checkpoint", "unflatten_params",
           "write_workdir"]
