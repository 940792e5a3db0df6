"""midpo: mutual-information DPO in JAX/Flax.

Every dependency is pinned to a version that was installed together with the
others on Python 3.11 (CPU); see README.md for the install command.
"""

import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml_collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    # tfds imports it lazily for builders inside a package, without declaring it.
    "importlib_resources==7.1.0",
    "absl-py==2.5.1",
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    # model.hf_path given as a Hub id (snapshot_download; tokenizers requires it too).
    "huggingface_hub==2.4.0",
    # Parquet preference files (midpo.data imports it only for those).
    "pyarrow==26.0.1",
    # Chat templates of tokenizer_config.json files, rendered as transformers does.
    "Jinja2==3.1.6",
    # TensorBoard event files without TensorFlow.
    "tensorboardX==2.6.5",
    # midpo.analysis (results notebooks).
    "pandas==3.1.1",
    "matplotlib==3.11.2",
]

# gs:// workdirs, data files and checkpoints (midpo.files): pip install -e '.[gcs]'.
GCS_REQUIRES = [
    "gcsfs==2026.10.1",
    "fsspec==2026.9.0",
]

TEST_REQUIRES = GCS_REQUIRES + [
    "pytest==9.2.0",
    # Two test processes (README's test command): about a quarter off the suite on 2 cores.
    "pytest-xdist==3.8.0",
    # Parity references only: the library itself never imports them.
    # torch 2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==5.24.0",
    "trl==1.16.0",
    # Executes notebooks/inspect_runs.ipynb end to end.
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
    # A local Cloud Storage emulator for the gs:// tests (tests/gcs_emulator.py).
    "gcp-storage-emulator==2026.7.19",
]

setuptools.setup(
    name="midpo",
    version="0.1.0",
    description="One MI-DPO loss, many priors: preference optimisation in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["midpo", "midpo.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"gcs": GCS_REQUIRES, "test": TEST_REQUIRES},
)
