"""FLOP counts of jitted programs from XLA's cost analysis, loops counted per iteration.

XLA's cost analysis (`compiled.cost_analysis()['flops']`, jax 0.10) counts the body of
a `while` loop once, whatever its trip count: a `lax.scan` of 128 decoder calls costs
as much as one call. `program_flops` corrects that from the program's jaxpr, where each
`scan` states its length: it adds (length - 1) times the XLA count of the scan's body
(itself counted the same way, so nested loops multiply). A `cond` counts its costliest
branch, as XLA's analysis does; a `while_loop` of unknown trip count is refused unless
its body costs no FLOPs. Loops are rare and their bodies compile fast, so the extra
compiles (one per distinct loop body) cost seconds.

`compiled_flops` is the plain XLA figure of one compiled program (each loop body once),
for callers that separate per-iteration costs themselves (`benchmarks/decode_speed.py`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

import jax
from jax.extend import core as jax_core


def cost_flops(cost: Any) -> float:
  """The 'flops' entry of a `cost_analysis()` result (a dict, or a list of them in older
  jax); NaN when XLA gives none."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def compiled_flops(jitted, *args) -> float:
  """XLA's FLOP count of `jitted(*args)` compiled for the default backend (each loop body
  once). `args` may be arrays or `jax.ShapeDtypeStruct`s."""
  return cost_flops(jitted.lower(*args).compile().cost_analysis())


def _closed(jaxpr) -> jax_core.ClosedJaxpr:
  return jaxpr if isinstance(jaxpr, jax_core.ClosedJaxpr) else jax_core.ClosedJaxpr(jaxpr, ())


def _jaxpr_flops(closed: jax_core.ClosedJaxpr, memo: Dict[int, float]) -> float:
  """XLA's count of a jaxpr compiled on its own (each loop body once), memoised by id."""
  if id(closed.jaxpr) not in memo:
    specs = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    memo[id(closed.jaxpr)] = compiled_flops(jax.jit(jax_core.jaxpr_as_fun(closed)), *specs)
  return memo[id(closed.jaxpr)]


def _loop_correction(jaxpr: jax_core.Jaxpr, memo: Dict[int, float]) -> float:
  """FLOPs that XLA's once-per-body count misses in `jaxpr`'s loops (see module doc)."""
  extra = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "scan":
      body = _closed(eqn.params["jaxpr"])
      length = int(eqn.params["length"])
      inner = _loop_correction(body.jaxpr, memo)
      extra += (length - 1) * _jaxpr_flops(body, memo) + length * inner
    elif name == "while":
      body = _closed(eqn.params["body_jaxpr"])
      if _jaxpr_flops(body, memo) + _loop_correction(body.jaxpr, memo) > 0:
        raise ValueError("program_flops: a while_loop of unknown trip count does FLOPs; "
                         "write it as a lax.scan (or fori_loop with static bounds).")
    elif name == "cond":
      branches = [_closed(b) for b in eqn.params["branches"]]
      inner = [_loop_correction(b.jaxpr, memo) for b in branches]
      if any(inner):  # XLA counts the costliest branch; keep that rule with loops counted
        counted = [_jaxpr_flops(b, memo) for b in branches]
        extra += max(c + i for c, i in zip(counted, inner)) - max(counted)
    else:
      # pjit, remat, custom_jvp/vjp calls, ...: sub-jaxprs run once each.
      extra += sum(_loop_correction(sub, memo)
                   for sub in jax_core.jaxprs_in_params(eqn.params))
  return extra


def program_flops(fn: Callable[..., Any], *args) -> float:
  """FLOPs of `fn(*args)` (any jax-traceable function, e.g. a jitted one): XLA's cost
  analysis of the compiled program plus, for every `lax.scan`, its body's count times
  (length - 1) (module doc). `args` may be arrays or `jax.ShapeDtypeStruct`s."""
  closed = jax.make_jaxpr(fn)(*args)
  memo: Dict[int, float] = {}
  return _jaxpr_flops(closed, memo) + _loop_correction(closed.jaxpr, memo)
