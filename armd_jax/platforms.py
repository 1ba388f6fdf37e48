"""Which JAX backend a command starts: no libtpu start-up on a host without a TPU.

With libtpu installed (the `[tpu]` and `[test]` extras) and `JAX_PLATFORMS` unset, JAX
tries the TPU backend before the CPU. On a host with no TPU, libtpu then fails to start
and prints its own errors to stderr ("Failed to find host bounds ...", "E0000 ...
INVALID_ARGUMENT: unexpected worker hostname ...") before JAX quietly falls back to the
CPU: output that reads like a failure although nothing failed. No log-level variable
silences it, so the commands call `skip_absent_tpu` first.
"""

from __future__ import annotations

import os


def skip_absent_tpu() -> bool:
  """Selects the CPU backend when no accelerator is attached; True when it did.

  Acts only when the choice is JAX's automatic one (`JAX_PLATFORMS` unset, no
  `jax_platforms` set in code, no `JAX_FORCE_TPU_INIT`) and JAX's own hardware check
  finds neither a TPU chip on the PCI bus nor a GPU: the CPU is then the backend
  JAX would end up with anyway. A TPU or GPU host, or any explicit setting, is left
  alone, so a real TPU start-up error still prints. Call it before the first JAX
  computation (backends are chosen once per process).
  """
  import jax  # pylint: disable=g-import-not-at-top

  if os.environ.get("JAX_PLATFORMS") is not None or "JAX_FORCE_TPU_INIT" in os.environ:
    return False
  if jax.config.jax_platforms:
    return False
  try:  # JAX's own checks (those that decide whether it probes a TPU or a GPU)
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    nvidia_gpu = hardware_utils.has_visible_nvidia_gpu()
  except (ImportError, AttributeError, OSError):  # moved in another JAX: keep its default
    return False
  if tpu_chips or nvidia_gpu or os.path.exists("/dev/kfd"):  # /dev/kfd: an AMD GPU
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
