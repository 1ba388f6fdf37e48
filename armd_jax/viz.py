"""Pictures of ARMD for the notebooks: orders, masks, causality, prefix weights, decoding.

Two kinds of function live here:
- pure computations that return numpy arrays and are unit-tested
  (`attention_masks`, `logit_change`, `prefix_aggregation_weights`, `fill_steps`);
- `plot_*` functions that draw them and return a matplotlib `Figure`, plus
  `train_with_live_loss`, which trains through `armd_jax.train.train_and_evaluate` while
  redrawing the loss curve from `<workdir>/metrics.jsonl`.

matplotlib (and IPython, for live updates) are imported lazily inside the functions that
draw, so `import armd_jax.viz` costs nothing extra (`pip install armd-jax[plot]`).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


# Colours: earlier blocks / the changed block / later blocks (perturbation plots).
_EARLIER, _SAME, _LATER = "#4c72b0", "#dd8452", "#c44e52"


def _pyplot():
  try:
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("armd_jax.viz draws with matplotlib: pip install 'armd-jax[plot]'.") from e
  return plt


def _row(block_ids, name: str = "block_ids") -> np.ndarray:
  """One row of block ids [N] from [N] or [1, N]."""
  ids = np.asarray(block_ids)
  if ids.ndim == 2 and ids.shape[0] == 1:
    ids = ids[0]
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name} must be one integer row [N] (or [1, N]), got "
                     f"{ids.dtype}{list(ids.shape)}.")
  return ids


# -- computations --------------------------------------------------------------------


def attention_masks(block_ids) -> tuple[np.ndarray, np.ndarray]:
  """The two masks one order induces, over the context [BOS, x_0, ..., x_{N-1}].

  Args:
    block_ids: int [N] (or [1, N]) block ids of one sequence (BOS has id 0).

  Returns:
    (content, query): bool [N, N + 1] each; column 0 is BOS, column 1 + i is token i.
    `content[n, j] = id_j <= b(n)` (content stream, inclusive: a token sees its own block)
    and `query[n, j] = id_j < b(n)` (query stream, strict: what `logits[n]` may depend on).
  """
  ids = _row(block_ids)
  ctx = np.concatenate([[0], ids])  # [N + 1]
  return ctx[None, :] <= ids[:, None], ctx[None, :] < ids[:, None]


def logit_change(model, params, tokens, block_ids, position: int,
                 new_token: Optional[int] = None) -> np.ndarray:
  """Max |change| of every position's log-probabilities when one token is replaced.

  Args:
    model, params: an ARMD model and its variables.
    tokens: int [N] or [1, N]; block_ids: int [N] or [1, N] (the order).
    position: the token to change.
    new_token: its replacement (default: (token + 1) mod vocab_size).

  Returns:
    float32 [N]: `max_v |log p'(v | n) - log p(v | n)|` per position n. Strict causality
    makes it exactly 0 wherever `block_ids[n] <= block_ids[position]`.
  """
  tokens = jnp.asarray(_row(tokens, "tokens"), jnp.int32)[None]
  ids = jnp.asarray(_row(block_ids), jnp.int32)[None]
  if not 0 <= position < tokens.shape[1]:
    raise ValueError(f"position={position} is outside the sequence of {tokens.shape[1]}.")
  vocab = model.config.vocab_size
  new = (int(tokens[0, position]) + 1) % vocab if new_token is None else int(new_token)
  both = jnp.concatenate([tokens, tokens.at[0, position].set(new)])  # [2, N]
  log_probs = jax.nn.log_softmax(jax.jit(model.apply)(params, both, jnp.tile(ids, (2, 1))), -1)
  return np.asarray(jnp.abs(log_probs[1] - log_probs[0]).max(-1))


def prefix_aggregation_weights(model, params, block_ids, positions=None) -> np.ndarray:
  """The weights ARMD's prefix aggregation puts on each visible token, per target.

  `G0[n] = LN(sum_j w[n, j] X0[j]) (+ position term)` with
  `w[n, j] = <PE[p_n], PE[p_j]> / count_n` over the context j in [BOS, x_0..x_{N-1}]
  with `id_j < b(n)` (count_n = how many such j), zero elsewhere. The weights depend on
  the positions and the order only, never on the tokens.

  Args:
    model, params: an ARMD model (`config.kind == 'armd'`) and its variables.
    block_ids: int [N] or [1, N]; positions: int [N] (default arange(N)).

  Returns:
    float32 [N, N + 1]; column 0 is BOS.
  """
  if getattr(model.config, "kind", "armd") != "armd":
    raise ValueError(f"prefix aggregation is ARMD's; got a {model.config.kind!r} model.")
  ids = _row(block_ids)
  length = ids.shape[0]
  positions = np.arange(length) if positions is None else _row(positions, "positions")
  dummy = jnp.zeros((1, length), jnp.int32)  # embed() returns the PE rows too
  _, pe = model.apply(params, dummy, jnp.asarray(positions, jnp.int32)[None],
                      method=type(model).embed)  # [1, N, P]
  _, bos_pe = model.apply(params, 1, method=type(model).bos)  # [1, 1, P]
  ctx_pe = jnp.concatenate([bos_pe, pe], axis=1)[0].astype(jnp.float32)  # [N + 1, P]
  dots = np.asarray(pe[0].astype(jnp.float32) @ ctx_pe.T)  # [N, N + 1]
  _, visible = attention_masks(ids)
  return (np.where(visible, dots, 0.0) / visible.sum(-1, keepdims=True)).astype(np.float32)


def fill_steps(block_ids) -> list[np.ndarray]:
  """Positions filled at each network call of a decode: call t fills block t + 1.

  Args:
    block_ids: dense ids [N] or [1, N] (e.g. `GenerateOutput.block_ids[0]`).

  Returns:
    A list with one int array of positions per call, in call order.
  """
  ids = _row(block_ids)
  return [np.flatnonzero(ids == k) for k in range(1, int(ids.max()) + 1)]


# -- training with a live loss curve --------------------------------------------------


def train_with_live_loss(config, workdir: str, refresh_s: float = 2.0,
                         title: str = "training loss") -> Dict[str, float]:
  """`train.train_and_evaluate(config, workdir)` with a loss plot redrawn as it trains.

  Training runs in a worker thread; this thread re-reads `<workdir>/metrics.jsonl`
  every `refresh_s` seconds and updates one figure in place (IPython display handle;
  outside IPython only the final figure is drawn). Points come every
  `config.train.log_every` steps; held-out NLLs are drawn as they appear.

  Returns:
    The final metrics of `train_and_evaluate`. Errors in training are re-raised here.
  """
  from armd_jax import train  # pylint: disable=import-outside-toplevel

  plt = _pyplot()
  result: Dict[str, Any] = {}

  def work():
    try:
      result["final"] = train.train_and_evaluate(config, workdir)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised below)
      result["error"] = e

  try:
    from IPython import get_ipython  # pylint: disable=import-outside-toplevel
    from IPython.display import display  # pylint: disable=import-outside-toplevel
    live = get_ipython() is not None
  except ImportError:
    live = False
  fig, ax = plt.subplots(figsize=(6, 3.2))
  handle = display(fig, display_id=True) if live else None
  worker = threading.Thread(target=work, name="armd-train", daemon=True)
  worker.start()
  shown = -1
  while worker.is_alive():
    worker.join(refresh_s)
    records = train.read_metrics(workdir)
    if live and len(records) != shown:
      shown = len(records)
      _draw_loss(ax, records, title)
      handle.update(fig)
  if "error" in result:
    plt.close(fig)
    raise result["error"]
  _draw_loss(ax, train.read_metrics(workdir), title)
  if live:
    handle.update(fig)
    plt.close(fig)  # already shown through the handle; avoid a second copy
  return result["final"]


def _draw_loss(ax, records: Sequence[Mapping[str, float]], title: str) -> None:
  ax.clear()
  train_pts = [(r["step"], r["train/loss"]) for r in records if "train/loss" in r]
  eval_pts = [(r["step"], r["eval/nll"]) for r in records if "eval/nll" in r]
  if train_pts:
    ax.plot(*zip(*train_pts), "-o", ms=3, label="train loss")
  if eval_pts:
    ax.plot(*zip(*eval_pts), "s", ms=7, label="held-out NLL (left to right, exact)")
  ax.set_xlabel("step")
  ax.set_ylabel("nats / token")
  ax.set_title(title)
  if train_pts or eval_pts:
    ax.legend(loc="upper right", fontsize=8)
  ax.grid(alpha=0.3)


def plot_loss(records: Sequence[Mapping[str, float]], title: str = "training loss"):
  """Loss curve of `train.read_metrics(workdir)` records. Returns the Figure."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.2))
  _draw_loss(ax, records, title)
  fig.tight_layout()
  return fig


# -- plots ---------------------------------------------------------------------------


def plot_block_ids(orders: Mapping[str, Any], annotate: bool = True):
  """One row per named order: the block id of every position (darker = revealed later).

  Args:
    orders: name -> block ids [N] (or [1, N]); all of one length.
    annotate: write each id in its cell.
  """
  plt = _pyplot()
  rows = [_row(v, f"orders[{k!r}]") for k, v in orders.items()]
  if len({len(r) for r in rows}) != 1:
    raise ValueError("plot_block_ids: every order must have the same length.")
  length = len(rows[0])
  fig, axes = plt.subplots(len(rows), 1, figsize=(0.36 * length + 2.5, 0.55 * len(rows) + 0.6),
                           squeeze=False)
  for ax, name, ids in zip(axes[:, 0], orders, rows):
    ax.imshow(ids[None], cmap="viridis", aspect="auto", vmin=1, vmax=max(ids.max(), 2))
    if annotate:
      for n, v in enumerate(ids):
        ax.text(n, 0, str(v), ha="center", va="center", fontsize=7,
                color="white" if v < 0.6 * ids.max() else "black")
    ax.set_yticks([0], [name])
    ax.set_xticks([])
  axes[-1, 0].set_xticks(range(length))
  axes[-1, 0].tick_params(labelsize=7)
  axes[-1, 0].set_xlabel("text position n (cell = block id: the call that reveals it)")
  fig.tight_layout()
  return fig


def plot_masks(orders: Mapping[str, Any]):
  """Content-stream (inclusive) and query-stream (strict) masks of each named order."""
  plt = _pyplot()
  fig, axes = plt.subplots(2, len(orders), figsize=(2.6 * len(orders) + 0.5, 5.8),
                           squeeze=False)
  for col, (name, ids) in enumerate(orders.items()):
    content, query = attention_masks(ids)
    for row, (mask, what) in enumerate(((content, "content  id_j <= b(n)"),
                                        (query, "query  id_j < b(n)"))):
      ax = axes[row, col]
      ax.imshow(mask, cmap="Greys", vmin=0, vmax=1.4, interpolation="nearest")
      ax.set_title(f"{name}\n{what}" if row == 0 else what, fontsize=8)
      ax.set_xticks([0], ["BOS"], fontsize=6)
      ax.set_yticks([])
      if col == 0:
        ax.set_ylabel("target n", fontsize=8)
      if row == 1:
        ax.set_xlabel("visible j (BOS, x_0, ...)", fontsize=7)
  fig.tight_layout()
  return fig


def plot_logit_change(change, block_ids, position: int):
  """Bars of `logit_change` per position, coloured earlier / same / later block."""
  plt = _pyplot()
  change = np.asarray(change)
  ids = _row(block_ids)
  changed = ids[position]
  colours = [_EARLIER if b < changed else _SAME if b == changed else _LATER for b in ids]
  fig, ax = plt.subplots(figsize=(7, 2.8))
  ax.bar(np.arange(len(ids)), change, color=colours)
  ax.scatter(np.arange(len(ids)), change, c=colours, s=12, zorder=3)  # zeros stay visible
  ax.axvline(position, color="k", ls=":", lw=1)
  ax.set_xlabel(f"position n (token {position}, block {changed}, changed)")
  ax.set_ylabel("max |delta log p|")
  from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
  ax.legend(handles=[Patch(color=_EARLIER, label="earlier block"),
                     Patch(color=_SAME, label="same block"),
                     Patch(color=_LATER, label="later block")], fontsize=7)
  ax.set_title("changing one token moves only the conditionals of later blocks", fontsize=9)
  fig.tight_layout()
  return fig


def plot_prefix_weights(weights, block_ids, title: str = "prefix-aggregation weights",
                        per_row: bool = True):
  """Heatmap of `prefix_aggregation_weights` [N, N + 1] (white = not visible).

  With `per_row`, each row is divided by its largest |weight| (the 1 / count_n factor
  otherwise fades later rows), so the shape of every target's weighting shows.
  """
  plt = _pyplot()
  weights = np.asarray(weights)
  _, visible = attention_masks(block_ids)
  if per_row:
    weights = weights / np.maximum(np.abs(weights).max(-1, keepdims=True), 1e-30)
  shown = np.ma.masked_where(~visible, weights)
  fig, ax = plt.subplots(figsize=(4.6, 3.9))
  bound = float(np.abs(weights).max()) or 1.0
  image = ax.imshow(shown, cmap="coolwarm", vmin=-bound, vmax=bound, interpolation="nearest")
  label = "w[n, j] / max_j |w[n, j]|" if per_row else "w[n, j] = <PE_n, PE_j> / count_n"
  fig.colorbar(image, ax=ax, shrink=0.8, label=label)
  ax.set_xlabel("visible j (column 0 = BOS)")
  ax.set_ylabel("target n")
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  return fig


def plot_fill_steps(block_ids, tokens=None, decode=None, title: Optional[str] = None):
  """Which positions each network call fills: one row per call (orange = this call).

  Args:
    block_ids: dense ids [N] of the decode (`GenerateOutput.block_ids[0]`).
    tokens: optional generated tokens [N]; with `decode` (ids -> str, e.g.
      `vocab.decode`) each filled cell shows its character (when N <= 96).
  """
  plt = _pyplot()
  ids = _row(block_ids)
  steps = fill_steps(ids)
  length = len(ids)
  grid = np.zeros((len(steps), length))
  for t, where in enumerate(steps):
    grid[t:, where] = 1  # filled by now
    grid[t, where] = 2  # filled at this call
  from matplotlib.colors import ListedColormap  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(min(0.16 * length + 2, 16), 0.22 * len(steps) + 1.2))
  ax.imshow(grid, cmap=ListedColormap(["#f2f2f2", "#9ecae1", "#e6550d"]), vmin=0, vmax=2,
            aspect="auto", interpolation="nearest")
  if tokens is not None and decode is not None and length <= 96:
    toks = _row(tokens, "tokens")
    for t, where in enumerate(steps):
      for n in where:
        char = decode([int(toks[n])]).replace("\n", "\u21b5")[:1]
        ax.text(n, t, char if char.isprintable() and char != "\ufffd" else "\u00b7",
                ha="center", va="center", fontsize=8 if length <= 48 else 6)
  ax.set_yticks(range(len(steps)), [str(t + 1) for t in range(len(steps))], fontsize=6)
  ax.set_xlabel("text position")
  ax.set_ylabel("network call")
  ax.set_title(title or f"{length} tokens in {len(steps)} calls", fontsize=9)
  fig.tight_layout()
  return fig


def plot_decode_speed(rows: Sequence[Mapping[str, Any]], title: str = ""):
  """Network calls and decode time per decoding method, side by side.

  Args:
    rows: dicts with 'label', 'calls' and 'seconds'.
  """
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 2.8))
  labels = [r["label"] for r in rows]
  for ax, key, what in ((left, "calls", "network calls"), (right, "seconds", "decode time (s)")):
    values = [float(r[key]) for r in rows]
    ax.bar(labels, values, color="#4c72b0")
    for i, v in enumerate(values):
      ax.text(i, v, f"{v:.0f}" if key == "calls" else f"{v:.3g}", ha="center", va="bottom",
              fontsize=8)
    ax.set_ylabel(what)
    ax.tick_params(labelsize=8)
  if title:
    fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  return fig


def plot_tradeoff(results: Sequence[Mapping[str, Any]], evaluator: str = ""):
  """Generative perplexity and unigram entropy against network calls, one line per method.

  Args:
    results: dicts with 'method', 'calls', 'gen_ppl' and 'entropy' (nats).
    evaluator: who scored the samples (written under the plot).
  """
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
  methods = list(dict.fromkeys(r["method"] for r in results))
  for method in methods:
    pts = sorted((r["calls"], r["gen_ppl"], r["entropy"]) for r in results
                 if r["method"] == method)
    calls, ppl, ent = zip(*pts)
    left.plot(calls, ppl, "-o", ms=4, label=method)
    right.plot(calls, ent, "-o", ms=4, label=method)
  for ax, label in ((left, "generative perplexity"), (right, "unigram entropy (nats)")):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network calls per sample")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  left.legend(fontsize=7)
  if evaluator:
    fig.text(0.5, 0.01, f"scored by {evaluator}", ha="center", fontsize=7)
  fig.tight_layout(rect=(0, 0.04 if evaluator else 0, 1, 1))
  return fig


__all__ = ["attention_masks", "fill_steps", "logit_change", "plot_block_ids", "plot_decode_speed",
           "plot_fill_steps", "plot_logit_change", "plot_loss", "plot_masks",
           "plot_prefix_weights", "plot_tradeoff", "prefix_aggregation_weights",
           "train_with_live_loss"]
