"""launch/tpu_vm.sh --dry-run and `python -m fr_jax.launch`: the slice's hosts, the command's
mesh checked against its chips, each worker's command line, and nothing created."""

import os
import stat
import subprocess
import sys

import pytest

from fr_jax.launch import check_mesh, command_mesh, main
from fr_jax.runtime.errors import ConfigError
from fr_jax.runtime.hardware import slice_size

sys.path.insert(0, os.path.dirname(__file__))
from cli_env import REPO, one_device_env  # noqa: E402

TRAIN = ["python", "-m", "fr_jax.train", "--config=configs/gemma2.py"]


def test_slices_chips_and_hosts():
    assert slice_size("v5e-8") == (8, 1)  # one VM of 8 chips
    assert slice_size("v5e-16") == (16, 4)
    assert slice_size("v4-8") == (4, 1)  # v4 / v5p slices are named by TensorCores
    assert slice_size("v4-32") == (16, 4)
    assert slice_size("v5p-32") == (16, 4)


def test_mesh_of_a_command_and_its_check():
    # configs/gemma2.py: fsdp=-1 x tensor=2 for training, tensor=-1 for decoding
    assert command_mesh(TRAIN) == {"data": 1, "fsdp": -1, "tensor": 2, "expert": 1}
    assert command_mesh(["python", "-m", "fr_jax.decode", "--config=configs/gemma2.py"]) == {
        "data": 1, "fsdp": 1, "tensor": -1, "expert": 1}
    assert command_mesh(["bash", "-c", "nvidia-smi"]) is None
    assert check_mesh({"data": 2, "fsdp": -1, "tensor": 2, "expert": 1}, 16, "v5p-32") == {
        "data": 2, "fsdp": 4, "tensor": 2, "expert": 1}
    with pytest.raises(ConfigError, match="v5p-32 has 16 chips: mesh data=4 x fsdp=4 x "
                       "tensor=2 x expert=1 needs 32 devices but 16 are available"):
        check_mesh({"data": 4, "fsdp": 4, "tensor": 2, "expert": 1}, 16, "v5p-32")
    with pytest.raises(ConfigError, match="mesh data=3 x fsdp=-1 x tensor=1 x expert=1 "
                       "does not divide 16 devices"):
        check_mesh({"data": 3, "fsdp": -1, "tensor": 1, "expert": 1}, 16, "v5p-32")


def test_launch_cli_prints_every_worker_and_refuses_a_mesh_that_does_not_fit(capsys):
    assert main(["--slice=v5p-32", "--dir=/w", "--setup=pip install -e .", "--", *TRAIN,
                 "--config.mesh.data=2"]) == 0
    out = capsys.readouterr().out
    assert "slice v5p-32: 16 chips on 4 hosts" in out
    assert "mesh: data=2 x fsdp=4 x tensor=2 x expert=1 = 16 devices" in out
    workers = [line for line in out.splitlines() if line.startswith("worker ")]
    assert [w.split(":")[0] for w in workers] == [f"worker {i}" for i in range(4)]
    assert all(w.endswith("cd /w && pip install -e . && python -m fr_jax.train "
                          "--config=configs/gemma2.py --config.mesh.data=2") for w in workers)
    with pytest.raises(SystemExit, match=r"error: v5p-32 has 16 chips: mesh data=4 x fsdp=4 "
                       r"x tensor=2 x expert=1 needs 32 devices but 16 are available; set one "
                       r"axis to -1 \(the fields: --config.mesh"):
        main(["--slice=v5p-32", "--", *TRAIN, "--config.mesh.data=4", "--config.mesh.fsdp=4"])
    with pytest.raises(SystemExit, match="unknown TPU slice 'v9-8'"):
        main(["--slice=v9-8", "--", *TRAIN])


def test_tpu_vm_dry_run_calls_no_gcloud_that_changes_anything(tmp_path):
    """With --slice nothing asks gcloud at all; without it only `describe` runs."""
    calls = tmp_path / "gcloud_calls"
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n'
                    'if [ "$4" = describe ]; then echo v5p-16; exit 0; fi\nexit 1\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(one_device_env(tmp_path / "home"),
               PATH=f"{fake.parent}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    script = os.path.join(REPO, "launch", "tpu_vm.sh")
    run = lambda *a: subprocess.run(["bash", script, "my-tpu", "us-east5-a", *a], env=env,
                                    capture_output=True, text=True, timeout=120)
    ok = run("--dry-run", "--slice=v5p-32", "--", *TRAIN, "--config.mesh.data=2")
    assert ok.returncode == 0, ok.stderr
    assert "16 chips on 4 hosts" in ok.stdout and ok.stdout.count("worker ") == 4
    assert "pip install -q 'jax[tpu]==" in ok.stdout  # the setup each worker would run
    assert not calls.exists()
    bad = run("--dry-run", "--", *TRAIN, "--config.mesh.data=3")
    assert bad.returncode == 1, bad.stderr
    assert ("v5p-16 has 8 chips: mesh data=3 x fsdp=-1 x tensor=2 x expert=1 does not "
            "divide 8 devices" in bad.stderr), bad.stderr
    assert calls.read_text().split()[:4] == ["compute", "tpus", "tpu-vm", "describe"]
    assert len(calls.read_text().splitlines()) == 1
    assert run("--bogus", "--", "true").returncode == 2
