import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def requirements(name):
    with open(os.path.join(HERE, name)) as f:
        lines = (line.split("#")[0].strip() for line in f)
        return [line for line in lines if line and not line.startswith("-r")]


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
    extras_require={"test": requirements("requirements-test.txt")},
)
