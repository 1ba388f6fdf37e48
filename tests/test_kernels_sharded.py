"""The Pallas kernel inside `jax.shard_map` on 4 simulated CPU devices (interpret mode).

XLA_FLAGS must be set before jax is imported, and conftest imports jax, so the check
runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

from conftest import host_devices_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, PartitionSpec as P
    from armd_jax.kernels import BlockSizes, block_causal_attention_reference
    from armd_jax.kernels.flash import block_causal_flash_attention
    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("data", "model"))
    spec, id_spec = P("data", None, "model", None), P("data", None)
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    q, k, v, do = (jax.random.normal(key, (4, 24, 4, 16)) for key in keys[:4])
    ids = jnp.sort(jax.random.randint(keys[4], (4, 24), 0, 9), axis=1)
    kernel = lambda q, k, v, qi, ki: block_causal_flash_attention(
        q, k, v, qi, ki, block_sizes=BlockSizes(8, 8), interpret=True)
    # check_vma=False: jax's Pallas interpreter slices blocks with unvarying indices and
    # trips the varying-axes check; the compiled kernels run with check_vma=True
    # (benchmarks/tpu_aot.py compiles them so for TPU).
    sharded = jax.jit(jax.shard_map(kernel, mesh=mesh, in_specs=(spec,) * 3 + (id_spec,) * 2,
                                    out_specs=spec, check_vma=False))
    out, vjp = jax.vjp(lambda q, k, v: sharded(q, k, v, ids, ids), q, k, v)
    ref, ref_vjp = jax.vjp(lambda q, k, v: block_causal_attention_reference(q, k, v, ids, ids),
                           q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    for g, r in zip(vjp(do), ref_vjp(do)):
      np.testing.assert_allclose(g, r, atol=5e-5)
    print("SHARDED_OK")
""")


def test_kernel_inside_shard_map_over_batch_and_heads_matches_the_reference():
  env = host_devices_env(4, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0 and "SHARDED_OK" in result.stdout, result.stderr[-3000:]
