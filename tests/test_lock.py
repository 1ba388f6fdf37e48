"""The one-trainer-per-workdir lock (`armd_jax.train.lock`): it cannot be won twice, on
local disk and on a Cloud Storage emulator, goes stale by heartbeat age (any host) or a
dead local pid, and every process of a multi-process run stops on a busy workdir."""

import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from armd_jax import storage, train
from armd_jax.train import lock
from armd_jax.train.defaults import config_from_file

from gcs_emulator import gcs_bucket, gcs_emulator  # noqa: F401  (pytest fixtures)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 8
ROUNDS = 25


def quiet(_):
  pass


def write_lock(workdir, pid, host=None, heartbeat=None, raw=None):
  """Writes `<workdir>/train.lock` as another trainer would have (or `raw` bytes)."""
  path = lock.lock_path(workdir)
  path.parent.mkdir(parents=True, exist_ok=True)
  if raw is None:
    beat = time.time() if heartbeat is None else heartbeat
    raw = json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": beat,
                      "heartbeat": beat, "token": "theirs"}).encode()
  path.write_bytes(raw)


def read_lock(workdir):
  return json.loads(lock.lock_path(workdir).read_bytes())


def race(workdir, threads=THREADS, timeout_s=lock.DEFAULT_TIMEOUT_S):
  """`threads` locks on `workdir` try at once; returns the winners (still holding)."""
  contenders = [lock.WorkdirLock(workdir, timeout_s, log=quiet) for _ in range(threads)]
  start, winners, errors = threading.Barrier(threads), [], []

  def contend(contender):
    start.wait()
    try:
      winners.append(contender.acquire())
    except lock.WorkdirBusyError:
      pass
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  workers = [threading.Thread(target=contend, args=(c,)) for c in contenders]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  assert not errors, errors
  return winners


def widen_the_race(monkeypatch, seconds=0.05):
  """Every contender pauses between judging a lock stale and taking it over, so all of
  them judge the same stale lock before any replaces it (the race the takeover must win)."""
  judge = lock.stale_reason

  def slow_judge(*args, **kwargs):
    reason = judge(*args, **kwargs)
    time.sleep(seconds)
    return reason

  monkeypatch.setattr(lock, "stale_reason", slow_judge)


def assert_one_winner_every_round(workdir, rounds, prepare=lambda: None):
  for i in range(rounds):
    prepare()
    winners = race(workdir)
    assert len(winners) == 1, f"round {i}: {len(winners)} winners"
    assert read_lock(workdir)["token"] == winners[0].token
    winners[0].release()
    assert not lock.lock_path(workdir).exists()


def test_of_threads_racing_for_a_free_lock_exactly_one_wins_every_time(tmp_path):
  assert_one_winner_every_round(str(tmp_path / "run"), ROUNDS)


def test_of_threads_racing_to_take_over_one_stale_lock_exactly_one_wins(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  widen_the_race(monkeypatch)
  old = time.time() - 2 * lock.DEFAULT_TIMEOUT_S
  assert_one_winner_every_round(
      workdir, ROUNDS, lambda: write_lock(workdir, 1, host="another-host", heartbeat=old))
  leftovers = sorted(os.listdir(workdir))
  assert leftovers == [], leftovers  # no temporary, claim or moved-aside file left


def _contend_in_a_process(workdir, start, outcomes, done):
  start.wait()
  try:
    held = lock.WorkdirLock(workdir, log=quiet).acquire()
    outcomes.put("won")
  except lock.WorkdirBusyError:
    held = None
    outcomes.put("busy")
  done.wait()  # hold until every contender has tried
  if held is not None:
    held.release()


def test_of_two_processes_racing_for_one_lock_exactly_one_wins_every_time(tmp_path):
  context = multiprocessing.get_context("fork")
  workdir = str(tmp_path / "run")
  for i in range(10):
    start, done, outcomes = context.Barrier(2), context.Event(), context.Queue()
    procs = [context.Process(target=_contend_in_a_process,
                             args=(workdir, start, outcomes, done)) for _ in range(2)]
    for p in procs:
      p.start()
    results = sorted(outcomes.get(timeout=60) for _ in procs)
    done.set()
    for p in procs:
      p.join(timeout=60)
    assert results == ["busy", "won"], f"round {i}: {results}"
    assert all(p.exitcode == 0 for p in procs)
    assert not lock.lock_path(workdir).exists()


def test_an_empty_lock_younger_than_the_grace_is_busy_and_older_is_stale(tmp_path):
  workdir = str(tmp_path)
  write_lock(workdir, None, raw=b"")  # a trainer that has created the file, not written it
  with pytest.raises(lock.WorkdirBusyError, match="no readable content yet"):
    lock.WorkdirLock(workdir, log=quiet).acquire()
  past = time.time() - lock.GRACE_S - 5
  os.utime(lock.lock_path(workdir), (past, past))
  notes = []
  with lock.WorkdirLock(workdir, log=notes.append) as held:
    assert read_lock(workdir)["token"] == held.token
  assert "took over a stale lock" in notes[0] and "no readable content" in notes[0]


def test_a_lock_from_another_host_is_busy_while_fresh_and_taken_over_when_its_heartbeat_is_old(
    tmp_path):
  workdir = str(tmp_path)
  write_lock(workdir, 1, host="another-host", heartbeat=time.time() - 30)
  with pytest.raises(lock.WorkdirBusyError,
                     match=r"in use by another trainer \(pid 1 on host 'another-host', "
                           r"heartbeat 3\d s ago.*--force_unlock"):  # 30 s, plus a loaded host
    lock.WorkdirLock(workdir, timeout_s=600, log=quiet).acquire()
  write_lock(workdir, 1, host="another-host", heartbeat=time.time() - 601)
  notes = []
  with lock.WorkdirLock(workdir, timeout_s=600, log=notes.append) as held:
    assert read_lock(workdir)["token"] == held.token
  assert re.search(r"heartbeat is 60\d s old \(timeout 600 s\)", notes[0]), notes[0]
  assert not lock.lock_path(workdir).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_stale_at_once(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  write_lock(str(tmp_path), dead.pid)  # fresh heartbeat, but nobody behind it
  notes = []
  with lock.WorkdirLock(str(tmp_path), log=notes.append):
    assert read_lock(str(tmp_path))["pid"] == os.getpid()
  assert f"pid {dead.pid} on this host is not running" in notes[0]


def test_the_heartbeat_keeps_a_long_held_lock_fresh_and_stops_on_release(tmp_path):
  workdir, timeout_s = str(tmp_path), 0.4
  with lock.WorkdirLock(workdir, timeout_s, log=quiet) as held:
    first = read_lock(workdir)["heartbeat"]
    time.sleep(4 * timeout_s)  # four timeouts: a lock without heartbeat would be stale
    assert read_lock(workdir)["heartbeat"] > first
    write_other_host = lock.WorkdirLock(workdir, timeout_s, log=quiet)
    write_other_host.host = "another-host"
    with pytest.raises(lock.WorkdirBusyError, match=f"pid {os.getpid()}"):
      write_other_host.acquire()
    assert not held.lost
  assert not lock.lock_path(workdir).exists()
  assert not any(t.name == "armd-lock-heartbeat" for t in threading.enumerate())


def test_a_holder_whose_lock_was_taken_over_notices_and_leaves_the_new_lock_alone(tmp_path):
  workdir, timeout_s = str(tmp_path), 0.4
  notes = []
  old = lock.WorkdirLock(workdir, timeout_s, log=notes.append).acquire()
  old._stop.set()  # pylint: disable=protected-access  # a holder that stopped beating
  old._thread.join()  # pylint: disable=protected-access
  time.sleep(timeout_s + 0.2)
  new = lock.WorkdirLock(workdir, timeout_s, log=quiet).acquire()
  old._start_heartbeat()  # pylint: disable=protected-access  # it wakes up again
  time.sleep(timeout_s)
  assert old.lost and "no longer ours" in notes[-1]
  assert read_lock(workdir)["token"] == new.token
  old.release()
  assert read_lock(workdir)["token"] == new.token  # not removed by the old holder
  new.release()


def test_force_unlock_removes_a_live_lock_and_says_whose_it_was(tmp_path):
  write_lock(str(tmp_path), 1, host="another-host")
  notes = []
  assert lock.force_unlock(str(tmp_path), log=notes.append)
  assert "removed the lock" in notes[0] and "another-host" in notes[0]
  assert not lock.lock_path(str(tmp_path)).exists()
  assert not lock.force_unlock(str(tmp_path), log=notes.append)
  assert "no lock" in notes[1]


def test_a_second_trainer_on_a_busy_workdir_stops_before_training_and_names_the_holder(
    tmp_path):
  write_lock(str(tmp_path), os.getppid())  # a live process on this host
  config = config_from_file(os.path.join(ROOT, "configs", "tiny.py"))
  with pytest.raises(train.WorkdirBusyError,
                     match=rf"in use by another trainer \(pid {os.getppid()} on host"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_the_lock_timeout_is_a_checked_config_field():
  config = config_from_file(os.path.join(ROOT, "configs", "tiny.py"))
  assert config.checkpoint.lock_timeout_s == lock.DEFAULT_TIMEOUT_S
  config.checkpoint.lock_timeout_s = 0.0
  with pytest.raises(ValueError, match="config.checkpoint.lock_timeout_s=0.0 must be > 0"):
    train.settings_from(config)


# --- the same on a Cloud Storage emulator -----------------------------------------------


def test_on_gcs_threads_racing_for_a_free_lock_exactly_one_wins(gcs_bucket):  # noqa: F811
  assert_one_winner_every_round(f"{gcs_bucket}/run", 10)


def test_on_gcs_threads_racing_to_take_over_one_stale_lock_exactly_one_wins(
    gcs_bucket, monkeypatch):  # noqa: F811
  workdir = f"{gcs_bucket}/run"
  widen_the_race(monkeypatch)
  old = time.time() - 2 * lock.DEFAULT_TIMEOUT_S
  assert_one_winner_every_round(
      workdir, 10, lambda: write_lock(workdir, 1, host="another-host", heartbeat=old))


def test_on_gcs_a_fresh_foreign_lock_is_busy_an_old_one_and_an_old_empty_one_are_taken_over(
    gcs_bucket):  # noqa: F811
  workdir = f"{gcs_bucket}/run"
  write_lock(workdir, 1, host="another-host")
  with pytest.raises(lock.WorkdirBusyError, match="another-host"):
    lock.WorkdirLock(workdir, log=quiet).acquire()
  write_lock(workdir, 1, host="another-host", heartbeat=time.time() - 700)
  with lock.WorkdirLock(workdir, timeout_s=600, log=quiet) as held:
    assert read_lock(workdir)["token"] == held.token
  write_lock(workdir, None, raw=b"")
  with pytest.raises(lock.WorkdirBusyError, match="no readable content yet"):
    lock.WorkdirLock(workdir, log=quiet, grace_s=60).acquire()
  time.sleep(1.1)  # object times cannot be set back: a 1 s grace instead
  with lock.WorkdirLock(workdir, log=quiet, grace_s=1.0) as held:
    assert read_lock(workdir)["token"] == held.token
  assert not lock.lock_path(workdir).exists()


def test_on_gcs_the_heartbeat_keeps_the_lock_fresh(gcs_bucket):  # noqa: F811
  workdir, timeout_s = f"{gcs_bucket}/run", 0.8
  with lock.WorkdirLock(workdir, timeout_s, log=quiet) as held:
    first = read_lock(workdir)["heartbeat"]
    time.sleep(3 * timeout_s)
    assert read_lock(workdir)["heartbeat"] > first and not held.lost
    other = lock.WorkdirLock(workdir, timeout_s, log=quiet)
    other.host = "another-host"
    with pytest.raises(lock.WorkdirBusyError):
      other.acquire()
  assert lock.force_unlock(workdir, log=quiet) is False


# --- processes ----------------------------------------------------------------------------


@pytest.mark.slow
def test_force_unlock_on_the_command_line_removes_a_lock_and_training_runs(tmp_path):
  workdir = str(tmp_path / "run")
  write_lock(workdir, 1, host="another-host")
  result = subprocess.run(
      [sys.executable, "-m", "armd_jax.main", "--config=configs/tiny.py",
       f"--workdir={workdir}", "--force_unlock", "--config.train.num_steps=2",
       "--config.train.eval_every=0", "--config.eval.num_batches=1",
       "--config.sample.num_samples=0"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "--force_unlock: removed the lock" in result.stdout
  assert "another-host" in result.stdout
  assert not lock.lock_path(workdir).exists()  # released at the end


@pytest.mark.slow
def test_two_processes_on_a_busy_workdir_both_exit_non_zero_naming_the_holder(tmp_path):
  from test_multiprocess import command, environment, free_port  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  write_lock(workdir, 4242, host="holder-host")
  port = free_port()
  procs = [subprocess.Popen(command(workdir, True), cwd=ROOT,
                            env=environment(1, i, port), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  outputs = []
  try:
    for p in procs:
      outputs.append("".join(p.communicate(timeout=300)))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode != 0, f"process {i}:\n{out[-2000:]}"
    assert "in use by another trainer (pid 4242 on host 'holder-host'" in out, (
        f"process {i}:\n{out[-2000:]}")
  assert read_lock(workdir)["host"] == "holder-host"  # left alone
