"""A Hugging Face checkpoint written as a workdir of ours (`import_hf`, `write_workdir`).

The workdir holds config.json and an orbax checkpoint at step 0 that `sample`,
`evaluate` and `config.checkpoint.init_from` read, like any training run's.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

from armd_jax.convert.adapt import adapt_ar_params, armd_config_from_ar, init_params
from armd_jax.convert.hf import hf_model_config, hf_to_ar_params, read_hf_checkpoint
from armd_jax.convert.pretrained import model_config_dict


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
  for name, value in model_config_dict(model_config).items():
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
  manager = checkpoints.make_manager(workdir, max_to_keep=1, async_save=False)
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
  manager.wait_until_finished()
  manager.close()
  if note and jax.process_index() == 0:
    print(f"wrote {workdir}: {note}", flush=True)
