"""Weights in and out (`armd_jax.convert`): safetensors export, Hugging Face import, AR -> ARMD."""

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import convert, orders, train
from armd_jax.losses import token_log_probs
from armd_jax.sampling import SamplerConfig
from armd_jax.sampling import ar as ar_sampling
from conftest import REPO, tiny_config

FIXTURES = os.path.join(REPO, "tests", "fixtures")
sys.path.insert(0, FIXTURES)
import make_hf_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

HAS_TRANSFORMERS = all(importlib.util.find_spec(m) for m in ("torch", "transformers"))


def hf_inputs_as_ours():
  """Our AR tokens for the fixtures' Hugging Face input [bos, t_1 .. t_{N-1}]: the tokens
  after the start token, plus one (unscored) filler, so our row j is their position j."""
  tokens = make_hf_fixtures.INPUT[:, 1:]
  return jnp.asarray(np.concatenate([tokens, np.zeros_like(tokens[:, :1])], 1), jnp.int32)


def import_and_score(hf_dir, workdir):
  assert convert.main(["import", f"--hf_dir={hf_dir}", "--kind=ar",
                       f"--workdir={workdir}"]) == 0
  trained = train.load_trained(str(workdir), with_vocab=False)
  return trained, np.asarray(trained.model.apply(trained.params, hf_inputs_as_ours()))


# -- export / load_pretrained ---------------------------------------------------------


@pytest.mark.parametrize("raw", [False, True])
def test_export_then_load_pretrained_gives_back_the_checkpoint_parameters_bitwise(
    tiny_workdir, tmp_path, raw):
  out = tmp_path / "exported"
  args = ["export", f"--workdir={tiny_workdir}", f"--out={out}"] + (["--raw"] if raw else [])
  assert convert.main(args) == 0
  model, params, vocab = armd_jax.load_pretrained(str(out))
  trained = train.load_trained(tiny_workdir, use_ema=not raw, with_vocab=False)
  assert model.config == trained.model_config
  want, got = convert.flatten_params(trained.params), convert.flatten_params(params)
  assert sorted(got) == sorted(want)
  for name in want:  # bitwise: same dtype, same bytes
    assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
  other = train.load_trained(tiny_workdir, use_ema=raw, with_vocab=False)
  assert any(not np.array_equal(convert.flatten_params(other.params)[k], want[k]) for k in want), (
      "EMA and raw parameters must differ for this check to tell them apart")
  assert type(vocab).__name__ == "ByteVocabulary"
  description = json.loads((out / "config.json").read_text())
  assert description["source"]["params"] == ("raw" if raw else "ema")
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  assert "layer_0.attn.query.kernel" in load_file(str(out / "model.safetensors"))


def test_load_pretrained_names_the_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json"):
    armd_jax.load_pretrained(str(tmp_path))


# -- Hugging Face import ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_imported_hf_model_gives_the_pytorch_logits_saved_in_the_fixture(tmp_path, name):
  # The fixture folder is what transformers' save_pretrained wrote (config.json and
  # model.safetensors) plus logits.npy, PyTorch's float32 logits of the fixed input.
  hf_dir = os.path.join(FIXTURES, f"hf_{name}")
  trained, ours = import_and_score(hf_dir, tmp_path / "run")
  want = np.load(os.path.join(hf_dir, "logits.npy"))  # [B, N, V]
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
  assert float(np.std(want)) > 0.1, "the check needs logits that vary"
  expected = {"gpt2": dict(learned_positions=True, rope_base=None, attention_bias=True,
                           norm="layer_norm", num_kv_heads=None),
              "llama": dict(learned_positions=False, rope_base=500.0, attention_bias=False,
                            norm="rms_norm", mlp_activation="swiglu", num_kv_heads=2,
                            tie_embeddings=False)}[name]
  for field, value in expected.items():
    assert getattr(trained.model_config, field) == value, field


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the live comparison needs torch and "
                    "transformers (pip install torch==2.13.0 transformers); the fixture test "
                    "above checks the committed PyTorch logits instead")
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_imported_hf_model_gives_the_live_pytorch_logits(tmp_path, name):
  hf_dir = str(tmp_path / "hf")
  want = make_hf_fixtures.write(name, hf_dir)  # save_pretrained + PyTorch logits
  _, ours = import_and_score(hf_dir, tmp_path / "run")
  np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)


def test_the_import_check_fails_when_a_weight_is_mapped_wrongly(tmp_path):
  # Swapping the two heads' query rows of one layer must break the logits match.
  hf_dir = os.path.join(FIXTURES, "hf_llama")
  hf_config, tensors = convert.read_hf_checkpoint(hf_dir)
  config = convert.hf_model_config(hf_config)
  params = convert.hf_to_ar_params(hf_config, tensors, config)
  q = params["params"]["layer_1"]["attn"]["query"]["kernel"]
  params["params"]["layer_1"]["attn"]["query"]["kernel"] = q[:, ::-1]
  ours = np.asarray(armd_jax.build_model(config).apply(params, hf_inputs_as_ours()))
  assert np.abs(ours - np.load(os.path.join(hf_dir, "logits.npy"))).max() > 1e-3


def test_the_kv_cached_sampler_of_an_imported_gpt2_follows_its_learned_positions(tmp_path):
  # Greedy decoding with the KV cache must pick, at every step, the argmax of the
  # one-pass logits of the sequence so far: the position table enters both the same way.
  trained, _ = import_and_score(os.path.join(FIXTURES, "hf_gpt2"), tmp_path / "run")
  out = ar_sampling.generate(trained.model, trained.params, jax.random.PRNGKey(0),
                             batch_size=2, length=10, prompt=jnp.array([5, 17]),
                             sampler=SamplerConfig(greedy=True))
  tokens = np.asarray(out.tokens)
  logits = np.asarray(trained.model.apply(trained.params, jnp.asarray(tokens)))
  np.testing.assert_array_equal(tokens[:, 2:], logits.argmax(-1)[:, 2:])


def test_an_imported_workdir_reads_text_with_the_tokenizer_json_beside_the_weights(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers  # pylint: disable=g-import-not-at-top
  hf_dir = tmp_path / "hf"
  shutil.copytree(os.path.join(FIXTURES, "hf_gpt2"), hf_dir)
  words = {"[UNK]": 0, "<|endoftext|>": 1, **{f"w{i}": i for i in range(2, 48)}}
  tokenizer = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.save(str(hf_dir / "tokenizer.json"))
  assert convert.main(["import", f"--hf_dir={hf_dir}", "--kind=armd",
                       f"--workdir={tmp_path / 'run'}"]) == 0
  trained = train.load_trained(str(tmp_path / "run"))
  assert trained.model_config.kind == "armd"
  assert list(trained.vocab.encode("w5 w17")) == [5, 17] and trained.vocab.eos_id == 1
  shutil.rmtree(tmp_path / "run")  # without tokenizer.json: loading the text side says so
  assert convert.main(["import", f"--hf_dir={FIXTURES}/hf_gpt2", "--kind=ar",
                       f"--workdir={tmp_path / 'run'}"]) == 0
  with pytest.raises(ValueError, match="hf_tokenizer"):
    train.load_trained(str(tmp_path / "run"))


def test_unsupported_hf_configs_are_refused_with_the_field_named():
  with pytest.raises(ValueError, match="model_type='bert'"):
    convert.hf_model_config({"model_type": "bert"})
  with pytest.raises(ValueError, match="activation_function='relu'"):
    convert.hf_model_config({"model_type": "gpt2", "activation_function": "relu", "n_embd": 8,
                             "n_layer": 1, "n_head": 2, "n_positions": 8, "vocab_size": 5})


def test_new_architecture_options_are_validated_with_the_field_named():
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    tiny_config(num_kv_heads=3)
  with pytest.raises(ValueError, match="norm must be"):
    tiny_config(norm="batch_norm")
  with pytest.raises(ValueError, match="mlp_activation"):
    tiny_config(mlp_activation="relu")


# -- ARMD adapted from an AR model ------------------------------------------------------


def test_adapted_armd_copies_the_ar_weights_and_its_content_stream_is_the_ar_stream():
  """With singleton left-to-right blocks (ids 1..N), what the adapted ARMD computes exactly
  like the AR model it came from, and what not.

  Exact (asserted): every shared parameter is the AR's, bitwise, and the ARMD-only ones
  (pe, bos_pe, query_norm, position_proj) are the fresh initialisation; the content stream
  (rows BOS, x_0 .. x_{N-1} at RoPE positions 0..N with ids 0..N) runs through the shared
  layers with the AR's causal mask, so after each full two-stream layer its first N rows
  equal the AR stream rows [BOS, x_0 .. x_{N-2}] (to float rounding of differently shaped
  matmuls, 1e-5); hence every key and value the query stream reads in the two-stream
  layers is the one the AR row predicting the same token reads (query row n, id n, sees
  content ids <= n: BOS, x_0 .. x_{n-1}, as AR row n does).
  Different (asserted to differ): the query stream itself. It starts from
  G0[n] = LN(prefix mean of the visible embeddings, PE-weighted) + Dense(PE[n]), not from
  the AR row's input (the embedding of x_{n-1}), and it sits at RoPE position n + 1 where
  the AR row sits at n, so every query-key rotation is offset by one position. The
  logits therefore differ until fine-tuning teaches the ARMD-only parameters (and the
  upper layers) to use that start.
  """
  armd_cfg = tiny_config(num_layers=4, num_two_stream_layers=3)
  ar_cfg = armd_cfg.replace(kind="ar")
  ar_params = convert.init_params(ar_cfg, seed=1)
  fresh = convert.init_params(armd_cfg, seed=2)
  params = convert.adapt_ar_params(ar_params, fresh, ar_cfg, armd_cfg)
  flat, ar_flat, fresh_flat = (convert.flatten_params(t) for t in (params, ar_params, fresh))
  for name, value in flat.items():
    source = fresh_flat if name.split(".")[0] in convert.ARMD_ONLY else ar_flat
    assert value.tobytes() == source[name].tobytes(), name
  assert set(ar_flat) < set(flat)

  tokens = jax.random.randint(jax.random.PRNGKey(0), (3, 10), 0, armd_cfg.vocab_size)
  ids = orders.left_to_right(3, 10)
  ar, armd = armd_jax.build_model(ar_cfg), armd_jax.build_model(armd_cfg)
  ar_logits, ar_states = ar.apply(ar_params, tokens, capture_intermediates=True)
  armd_logits, armd_states = armd.apply(params, tokens, ids, capture_intermediates=True)
  for i in range(armd_cfg.num_two_stream_layers - 1):  # full two-stream layers
    ar_rows = ar_states["intermediates"][f"layer_{i}"]["__call__"][0]  # [B, N, D]
    both = armd_states["intermediates"][f"layer_{i}"]["__call__"][0]  # [B, 2N+1, D]
    np.testing.assert_allclose(both[:, :10], ar_rows, atol=1e-5, rtol=0)
  ar_lp, armd_lp = token_log_probs(ar_logits, tokens), token_log_probs(armd_logits, tokens)
  assert float(jnp.max(jnp.abs(ar_lp - armd_lp))) > 1e-3


def test_adapting_refuses_an_ar_model_of_another_shape():
  ar_cfg = tiny_config(kind="ar", d_model=16)
  armd_cfg = tiny_config()
  with pytest.raises(ValueError, match="model.d_model=16"):
    convert.adapt_ar_params(convert.init_params(ar_cfg), convert.init_params(armd_cfg),
                            ar_cfg, armd_cfg)


@pytest.mark.slow
def test_init_from_an_ar_workdir_starts_an_armd_run_from_the_adapted_weights(tmp_path):
  # An AR run, then an ARMD run with init_from pointing at it whose one step has learning
  # rate 0 (warmup from 0): its checkpoint holds exactly the adapted initialisation.
  config = tiny_run_of("ar")
  train.train_and_evaluate(config, str(tmp_path / "ar"))
  armd_config = tiny_run_of("armd")
  armd_config.checkpoint.init_from = str(tmp_path / "ar")
  train.train_and_evaluate(armd_config, str(tmp_path / "armd"))
  # init_from takes the raw parameters (and EMA for the EMA); after a step at learning rate
  # 0 the bias-corrected EMA equals the parameters.
  ar = train.load_trained(str(tmp_path / "ar"), use_ema=False, with_vocab=False)
  armd = train.load_trained(str(tmp_path / "armd"), with_vocab=False)
  fresh = convert.init_params(armd.model_config, seed=armd_config.train.seed)
  want = convert.adapt_ar_params(ar.params, fresh, ar.model_config, armd.model_config)
  got, want = convert.flatten_params(armd.params), convert.flatten_params(want)
  assert sorted(got) == sorted(want)
  for name in want:  # shared: bitwise the AR's; ARMD-only: the run's (jitted) fresh init
    if name.split(".")[0] in convert.ARMD_ONLY:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-9, err_msg=name)
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def tiny_run_of(kind):
  """configs/tiny.py as `kind`, 2 steps (AR) or 1 step at learning rate 0 (ARMD)."""
  from conftest import tiny_run_config  # pylint: disable=g-import-not-at-top
  c = tiny_run_config()
  c.model.kind = kind
  c.train.num_steps = 2 if kind == "ar" else 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 0
  c.eval.num_batches = 1
  if kind == "armd":
    c.optim.warmup_steps = 10  # the first update has learning rate 0
  return c
