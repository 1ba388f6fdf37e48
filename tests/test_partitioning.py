"""Mesh config, rule tables, the multi-process init arguments and block remat (fast,
in-process; the 8-device comparisons live in test_train_mesh.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import armd_jax
from armd_jax import main as main_lib
from armd_jax.train import partitioning, settings
from armd_jax.train.settings import MeshConfig
from conftest import init_model, tiny_config


def table(name):
  return dict(partitioning.RULE_TABLES[name])


def test_the_three_rule_tables_lay_out_weights_and_batch_as_documented():
  assert set(partitioning.RULE_TABLES) == set(settings.RULE_TABLES)
  for name in settings.RULE_TABLES:
    assert table(name)["activation_batch"] == ("data", "fsdp")  # batch over data x fsdp
    assert table(name)["activation_length"] is None
  dp, fsdp, tp = table("data_parallel"), table("fsdp"), table("fsdp_tensor")
  assert all(v is None for k, v in dp.items() if k != "activation_batch")
  assert fsdp["embed"] == tp["embed"] == "fsdp"
  assert all(fsdp[k] is None for k in ("heads", "mlp", "vocab", "activation_heads"))
  for k in ("heads", "mlp", "vocab", "activation_heads", "activation_mlp"):
    assert tp[k] == "tensor"
  # Both ARMD streams' queries and the K/V they share use one logical spec.
  spec = nn.logical_to_mesh_axes(armd_jax.models.layers.HEADS_ACTIVATION, tuple(tp.items()))
  assert tuple(spec) == (("data", "fsdp"), None, "tensor", None)


def test_mesh_config_validates_shape_table_and_rules():
  assert MeshConfig().shape == (-1, 1, 1)
  with pytest.raises(ValueError, match="config.mesh.shape"):
    MeshConfig(shape=(2, 4))
  with pytest.raises(ValueError, match="config.mesh.rule_table"):
    MeshConfig(rule_table="zero3")
  with pytest.raises(ValueError, match="config.mesh.rules"):
    MeshConfig(rules=(("embed", "model"),))
  config = MeshConfig(rules=[["activation_batch", ["data", "fsdp"]], ["embed", None]])
  assert config.rules == (("activation_batch", ("data", "fsdp")), ("embed", None))
  assert partitioning.rules_of(config) == config.rules
  assert partitioning.rules_of(MeshConfig(rule_table="fsdp")) == partitioning.RULE_TABLES["fsdp"]


def test_make_mesh_fills_minus_one_and_names_the_three_axes():
  mesh = partitioning.make_mesh(MeshConfig(shape=(1, -1, 1)), jax.devices()[:1])
  assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="needs 4 devices"):
    partitioning.make_mesh(MeshConfig(shape=(1, 4, 1)), jax.devices()[:1])


def test_a_mesh_axis_no_rule_uses_is_an_error():
  mesh = jax.sharding.AbstractMesh((1, 2, 4), partitioning.MESH_AXES)
  partitioning.check_mesh(mesh, partitioning.RULE_TABLES["fsdp_tensor"])
  with pytest.raises(ValueError, match=r"\['tensor'\]"):
    partitioning.check_mesh(mesh, partitioning.RULE_TABLES["fsdp"])
  with pytest.raises(ValueError, match=r"\['tensor'\]"):  # fsdp joins the batch axes
    partitioning.check_mesh(mesh, partitioning.RULE_TABLES["data_parallel"])


def test_distributed_args_come_from_the_jax_environment_variables():
  env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
         "JAX_PROCESS_ID": "1"}
  assert main_lib.distributed_args(env) == {"coordinator_address": "127.0.0.1:1234",
                                            "num_processes": 2, "process_id": 1}
  assert main_lib.distributed_args({}) == {}  # TPU / SLURM: jax detects the cluster
  with pytest.raises(SystemExit, match="JAX_PROCESS_ID"):
    main_lib.distributed_args({"JAX_NUM_PROCESSES": "2"})
  with pytest.raises(SystemExit, match="integer"):
    main_lib.distributed_args({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"})


@pytest.mark.parametrize("policy", ["full", "save_dots"])
def test_remat_gives_the_same_loss_and_gradients_and_recomputes(policy):
  model, params = init_model(tiny_config(dropout_rate=0.1))
  remat_model = armd_jax.ARMD(tiny_config(dropout_rate=0.1, remat=policy))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 13)
  ids = armd_jax.orders.left_to_right(2, 8)

  def loss(m, p):
    logits = m.apply(p, tokens, ids, deterministic=False,
                     rngs={"dropout": jax.random.PRNGKey(2)})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[..., None], -1))

  # Compiled as training compiles them: one program each instead of an op-by-op backward.
  a, ga = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  b, gb = jax.jit(jax.value_and_grad(lambda p: loss(remat_model, p)))(params)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)  # fusion order
  # Traced with the inputs as arguments (the model checks the values of concrete ids).
  def traced(m):
    def grad_fn(p, t, i):
      return jax.grad(lambda q: -jnp.mean(m.apply(q, t, i)))(p)
    return jax.make_jaxpr(grad_fn)(params, tokens, ids)

  # Every layer is rematerialised, ARMD's lean last two-stream layer (`Block.cross`) too.
  assert count_checkpoints(traced(remat_model)) == remat_model.config.num_layers
  assert count_checkpoints(traced(model)) == 0


def count_checkpoints(jaxpr) -> int:
  """Number of `jax.checkpoint` (remat) calls in a (closed) jaxpr, nested ones included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in ("checkpoint", "remat2")  # the name differs by version
    count += sum(count_checkpoints(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
  return count


def test_remat_rejects_unknown_policies():
  with pytest.raises(ValueError, match="ModelConfig.remat"):
    tiny_config(remat="offload")
