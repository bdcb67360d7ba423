import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name):
    """The requirement lines of a requirements file, following its `-r other.txt` lines."""
    out = []
    with open(os.path.join(HERE, name)) as f:
        for line in (line.split("#")[0].strip() for line in f):
            if line.startswith("-r"):
                out += requirements(line[2:].strip())
            elif line:
                out.append(line)
    return out


setup(
    name="fr_jax",
    version="0.1.0",
    description="FusionRoute (token-level multi-LLM collaboration) in JAX/Flax",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fr_jax", "fr_jax.*"]),
    # The trained toy world (`python -m fr_jax.decode` with no checkpoints), down to the
    # SharedTrunkNet's Orbax files (seqroute/state/...).
    package_data={"fr_jax.toy": ["assets/world/" + "/".join(["*"] * depth)
                                 for depth in range(1, 6)]},
    python_requires=">=3.10",
    install_requires=requirements("requirements.txt"),
    # tpu: the TPU build of jax (libtpu), which is also the TPU compiler `python -m fr_jax.plan`
    # runs on a CPU-only machine; the tests compile for TPU slices too.
    # tensorboard: the viewer for the event files every training run and the demo write.
    extras_require={"test": requirements("requirements-test.txt"),
                    "tpu": requirements("requirements-tpu.txt"),
                    "tensorboard": requirements("requirements-tensorboard.txt")},
)
