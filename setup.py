"""repa_jax: SiT flow-matching transformers with REPA and Dispersive Loss, in JAX/Flax for Cloud TPU."""
import setuptools

# Versions pinned to the stack the code was checked against (JAX 0.10 needs Python 3.11).
CORE = [
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    "tensorboardX==2.6.5",
    "tensorboard==2.21.0",  # the viewer of the event files tensorboardX writes (`make tensorboard`)
    "pillow",
    "absl-py",
]

setuptools.setup(
    name="repa_jax",
    version="0.1.0",
    description=__doc__,
    packages=setuptools.find_packages(include=["repa_jax", "repa_jax.*"]),
    python_requires=">=3.11",
    install_requires=CORE + ["jax[cpu]==0.10.2"],
    extras_require={
        "tpu": ["jax[tpu]==0.10.2"],
        # The ImageNet path's weights: SD-VAE's .safetensors (.pth files are read without PyTorch).
        "imagenet": ["safetensors==0.8.0"],
        "test": ["pytest", "pytest-xdist", "libtpu==0.0.42.*", "safetensors==0.8.0"],
        # benchmarks/tpu_compile.py: libtpu's compiler, to compile TPU programs on a machine without a TPU.
        "tpu-compile": ["libtpu==0.0.42.*"],
        "study": ["matplotlib", "scipy"],
        # Parity tests of the DINOv2 / SD-VAE / Inception ports against their PyTorch references. torch 2.14.1 +
        # torchvision 0.29.1 is the pair that installs together here (pytorch-fid imports torchvision).
        "parity": ["torch==2.14.1", "torchvision==0.29.1", "transformers==5.23.0", "diffusers==0.42.1",
                   "safetensors==0.8.0", "pytorch-fid==0.3.0"],
    },
)
