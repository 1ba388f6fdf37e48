"""Workdirs anywhere: local folders, gs:// buckets (on a local fake-gcs-server), and a
clear error for URLs no client handles. A whole run in a bucket (2 processes with
`--workdir=gs://...`, killed, resumed from the bucket, matching a local run) is
tests/test_multiprocess.py's.
"""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from armd_jax import data, storage, train
from armd_jax.train import observe

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (fixtures)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind.\n"


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
  """Runs the test in an empty folder, its cwd; a local `gs:` folder would show up there."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv(storage.LOCAL_CACHE_VARIABLE, str(tmp_path / "local_cache"))
  return cwd


# ---------------------------------------------------------------------------------------
# Paths and errors (no emulator).


def test_local_paths_become_absolute_and_urls_stay_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(storage.path("run")) == str(tmp_path / "run")
  assert os.fspath(storage.path("file://" + str(tmp_path / "x"))) == str(tmp_path / "x")
  assert os.fspath(storage.path("~/r")) == os.path.expanduser("~/r")
  assert os.fspath(storage.path("gs://bucket/run") / "checkpoints") == (
      "gs://bucket/run/checkpoints")
  assert storage.is_local("run") and storage.is_local("file:///x")
  assert not storage.is_local("gs://b/x") and storage.scheme_of("GS://b") == "gs"


def test_a_url_no_client_handles_is_a_one_line_error_naming_its_scheme():
  with pytest.raises(ValueError, match=r"no installed storage client handles ftp://") as e:
    storage.path("ftp://host/run")
  assert "\n" not in str(e.value)


def test_a_url_with_one_slash_is_an_error_not_a_local_folder():
  with pytest.raises(ValueError, match="one slash"):
    storage.path("gs:/bucket/run")


def test_gs_without_gcsfs_says_what_to_pip_install(monkeypatch):
  real = storage.importlib.util.find_spec
  monkeypatch.setattr(storage.importlib.util, "find_spec",
                      lambda name, *a: None if name == "gcsfs" else real(name, *a))
  with pytest.raises(ValueError, match=r"pip install gcsfs") as e:
    storage.path("gs://bucket/run")
  assert "\n" not in str(e.value)


def test_storage_emulator_host_alone_configures_tensorstore_gcsfs_and_epath():
  env = {"STORAGE_EMULATOR_HOST": "127.0.0.1:4443"}
  storage.configure_emulator(env)
  assert env["TENSORSTORE_GCS_HTTP_URL"] == "http://127.0.0.1:4443"
  assert env["GOOGLE_AUTH_TOKEN_FOR_TESTING"] and env["EPATH_USE_TF"] == "false"
  assert env["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] == "false"
  mine = {"STORAGE_EMULATOR_HOST": "http://h:1", "TENSORSTORE_GCS_HTTP_URL": "http://other:2"}
  storage.configure_emulator(mine)
  assert mine["TENSORSTORE_GCS_HTTP_URL"] == "http://other:2"  # a user's setting wins
  plain = {}
  storage.configure_emulator(plain)
  assert plain == {"EPATH_USE_TF": "false"}  # real Cloud Storage: nothing redirected


def test_importing_armd_jax_and_storage_does_not_import_gcsfs():
  code = ("import sys, armd_jax, armd_jax.storage; "
          "assert 'gcsfs' not in sys.modules and 'tensorflow' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------
# The pieces of a run this module's owners write, on the emulator.


def test_metrics_append_on_gs_and_read_back_in_order(gcs_bucket, in_tmp_cwd):
  run = f"{gcs_bucket}/run"
  writer = observe.Writer(run, tensorboard=False)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  records = train.read_metrics(run)
  assert [r["step"] for r in records] == [1, 2, 3]
  assert records[2]["train/loss"] == pytest.approx(1 / 3)
  assert os.listdir(in_tmp_cwd) == []  # nothing local, no `gs:` folder
  assert observe.read_metrics(f"{gcs_bucket}/never_ran") == []


def test_only_storage_emulator_host_is_needed_for_orbax_to_write_to_the_bucket(gcs_bucket,
                                                                                tmp_path):
  """A fresh interpreter with just STORAGE_EMULATOR_HOST saves an orbax checkpoint to gs://;
  this process lists its files through gcsfs."""
  code = (
      "import sys, numpy as np, orbax.checkpoint as ocp\n"
      "from armd_jax import storage\n"
      "target = storage.path(sys.argv[1])\n"
      "with ocp.StandardCheckpointer() as c:\n"
      "  c.save(target, {'w': np.arange(6.0).reshape(2, 3)})\n")
  env = {k: v for k, v in os.environ.items()
         if k not in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  subprocess.run([sys.executable, "-c", code, f"{gcs_bucket}/ckpt"], check=True, env=env,
                 cwd=tmp_path, timeout=300)
  assert storage.path(f"{gcs_bucket}/ckpt").is_dir()
  assert any(storage.path(f"{gcs_bucket}/ckpt").iterdir())
  assert os.listdir(tmp_path) == []


def _vocab_config(tmp_path):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(f"{TEXT}Scene {i}.\n" for i in range(60)))
  c = data.default_config()
  c.task, c.train_files, c.document_split, c.num_threads = ("text_files", str(corpus),
                                                            "paragraph", 0)
  c.vocab, c.sentencepiece_vocab_size = "sentencepiece", 400
  return c


def test_sentencepiece_trained_for_a_gs_workdir_lands_in_the_bucket_and_reloads_elsewhere(
    gcs_bucket, in_tmp_cwd, tmp_path, monkeypatch):
  c = _vocab_config(tmp_path)
  run = f"{gcs_bucket}/run"
  built = data.create_datasets(c, seq_len=32, global_batch_size=4, workdir=run, seed=0)
  names = [p.name for p in storage.path(f"{run}/vocab").iterdir()]
  assert names == ["sentencepiece_unigram_400.model"]
  # Another host: an empty local cache; it reads the model from the bucket.
  monkeypatch.setenv(storage.LOCAL_CACHE_VARIABLE, str(tmp_path / "other_host"))
  loaded = data.load_vocab(c, run)
  assert loaded.fingerprint == built.vocab.fingerprint
  assert loaded.encode(TEXT) == built.vocab.encode(TEXT)
  assert loaded.model_file.startswith(str(tmp_path / "other_host"))
  assert os.listdir(in_tmp_cwd) == []


def test_other_processes_wait_for_the_vocab_and_token_cache_in_the_bucket(
    gcs_bucket, in_tmp_cwd, tmp_path, monkeypatch):
  """Process 1 (another host: its own local cache) waits for what process 0 puts in the
  bucket, then reads the same examples from its own local copy."""
  c = _vocab_config(tmp_path)
  run = f"{gcs_bucket}/run"

  def make(process_index):
    return data.create_datasets(c, seq_len=32, global_batch_size=4, workdir=run, seed=0,
                                process_index=process_index, process_count=2)

  result = {}
  waiter = threading.Thread(target=lambda: result.update(ds=make(1)))
  waiter.start()
  waiter.join(timeout=3.0)
  assert waiter.is_alive() and not result  # nothing in the bucket yet: process 1 waits
  writer = make(0)
  waiter.join(timeout=120.0)
  assert not waiter.is_alive()
  np.testing.assert_array_equal(result["ds"].train_examples.tokens,
                                writer.train_examples.tokens)
  entries = list(storage.path(f"{run}/data_cache").iterdir())
  assert len(entries) == 1 and sorted(p.name for p in entries[0].iterdir()) == [
      "eval_doc_ends.npy", "eval_tokens.npy", "meta.json", "train_doc_ends.npy",
      "train_tokens.npy"]
  # A host with an empty local cache downloads the arrays and memory-maps its copy.
  monkeypatch.setenv(storage.LOCAL_CACHE_VARIABLE, str(tmp_path / "third_host"))
  third = make(1)
  np.testing.assert_array_equal(third.train_examples.tokens, writer.train_examples.tokens)
  assert os.listdir(tmp_path / "third_host" / "gs") == [gcs_bucket[len("gs://"):]]
  assert os.listdir(in_tmp_cwd) == []


def test_a_sweep_root_in_a_bucket_gets_its_summary_and_launch_commands_keep_the_url(
    gcs_bucket, in_tmp_cwd):
  from armd_jax import sweep  # pylint: disable=import-outside-toplevel
  root = f"{gcs_bucket}/sweep"
  points = [{"order.rho": 2}, {"order.rho": 4}]
  finished = storage.path(root) / sweep.point_name(points[0])
  writer = observe.Writer(finished, tensorboard=False)
  writer.write(2, {"train/loss": 3.0, "eval/nll": 2.5})
  storage.write_atomic(finished / sweep.DONE_FILE,
                       '{"overrides": {"order.rho": 2}, "metrics": {"eval/nll": 2.5}}')
  table = sweep.summarize(root, points)
  assert "2.5000" in table and "0 (unfinished)" in table
  names = sorted(p.name for p in storage.path(root).iterdir())
  assert names[-3:] == ["summary.json", "summary.md", "val_curves.png"]
  assert (storage.path(root) / "summary.md").read_text() == table
  commands = sweep.point_commands("xpk", "configs/tiny.py", root, points, [], [], True)
  assert f"--workdir={root}/order.rho=4" in commands[1]
  assert os.listdir(in_tmp_cwd) == []


def test_compile_check_reads_a_runs_config_from_a_bucket_and_needs_exactly_one_source(
    gcs_bucket, in_tmp_cwd):
  """`compile_check --workdir=gs://...` compiles the config the run saved there."""
  from armd_jax import compile_check  # pylint: disable=import-outside-toplevel
  from armd_jax.train import checkpoints, defaults  # pylint: disable=import-outside-toplevel
  config = defaults.config_from_file(os.path.join(REPO, "configs", "tiny.py"))
  config.model.d_model = 48
  workdir = f"{gcs_bucket}/run"
  checkpoints.save_config(config, workdir)
  loaded, source = compile_check.config_of(None, workdir)
  assert loaded.model.d_model == 48 and source == f"{workdir}/config.json"
  assert loaded.to_dict() == checkpoints.load_config(workdir).to_dict()
  for both_or_neither in ((config, workdir), (None, "")):
    with pytest.raises(SystemExit) as stop:
      compile_check.config_of(*both_or_neither)
    assert stop.value.code == 2
  assert os.listdir(in_tmp_cwd) == []


def test_urls_use_fsspec_even_when_epath_chose_a_backend_before_storage_was_configured(
    monkeypatch):
  """epath caches its TensorFlow-or-not choice at the first URL it sees; storage resets it."""
  from etils.epath import gpath  # pylint: disable=import-outside-toplevel
  monkeypatch.delenv("EPATH_USE_TF", raising=False)
  gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  pinned = gpath._is_tf_installed()  # pylint: disable=protected-access  (True: TF is installed)
  storage.configure_emulator()
  assert pinned and not gpath._is_tf_installed()  # pylint: disable=protected-access
  assert "FileSystemSpec" in type(storage.path("gs://bucket/x")._backend).__name__  # pylint: disable=protected-access
