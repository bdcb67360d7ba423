"""Issue 31, met as a user meets it: the real training command (in this process) on real
files: resume=False over a finished run, a model replaced at the same path, single bits
flipped in a checkpoint, and a run that diverges while still finite, then resumed from an
earlier step."""

import hashlib
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fr_jax.harness import toy_world as W
from fr_jax.loop.checkpoint import checksum
from fr_jax.runtime.bundle import bundled_world

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Models copied out of the package (a test replaces one) and a data file."""
    root = tmp_path_factory.mktemp("record")
    world = bundled_world()
    models = {n: str(root / "models" / n) for n in ["router_base"] + world["names"]}
    for n, dst in models.items():
        shutil.copytree(world[n] if n == "router_base" else world["experts"][
            world["names"].index(n)], dst)
    data = W.make_world_data(200, 4, seed=11)
    sft = root / "sft.jsonl"
    W.write_jsonl(str(sft), [t.record() for t in W.mixture(
        data.train, {d: 1.0 for d in W.EVAL_DOMAINS}, 160, 3)])
    return {"root": root, "models": models, "sft": sft}


@pytest.fixture(scope="module")
def setup(inputs):
    """The inputs and a finished 4-step run on them, with a checkpoint at every step."""
    s = dict(inputs, run=inputs["root"] / "run")
    _train(*_args(s, s["run"]))
    return s


def _args(s, workdir, *extra, steps=4, sft=None):
    experts = tuple(s["models"][n] for n in ("math", "code", "instr"))
    return ["--config=" + TINY, f"--config.router.path={s['models']['router_base']}",
            f"--config.experts.paths={experts!r}",
            f"--config.data.sft_path={sft or s['sft']}", f"--config.train.workdir={workdir}",
            "--config.train.stages=('sft',)", f"--config.train.sft.steps={steps}",
            "--config.train.ckpt_every=1", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.keep=10",
            "--config.train.sft.expert_signals=online", *extra]


def _train(*args):
    from fr_jax.train import main
    return main(list(args))


def _refused(*args) -> str:
    with pytest.raises(SystemExit) as e:
        _train(*args)
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def _contents(folder, skip=()) -> dict:
    """Every file under `folder` (but those under `skip`, and the workdir's lock file, which
    every run rewrites): relative path -> SHA-256."""
    out = {}
    for r, _, fs in os.walk(folder):
        if any(os.path.relpath(r, folder).startswith(x) for x in skip):
            continue
        for f in (f for f in fs if f != ".lock"):
            p = os.path.join(r, f)
            out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _copy(s, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(s["run"], run)
    return run


def _steps(run):
    return sorted(int(d) for d in os.listdir(run / "sft" / "checkpoints") if d.isdigit())


# ------------------------------------------------------------------- 1: resume=False
@pytest.mark.slow
def test_resume_false_over_a_finished_run_is_refused_before_anything_is_touched(setup,
                                                                               tmp_path):
    s, run = setup, _copy(setup, tmp_path)
    before = _contents(run)
    other = s["root"] / "other.jsonl"
    other.write_text(s["sft"].read_text().replace("add", "add ", 1))
    msg = _refused(*_args(s, run, "--config.train.resume=False", sft=other))
    assert f"{run / 'sft'} holds steps 1..4 of a run of stage sft" in msg, msg
    assert "another --config.train.workdir" in msg and "drop resume=False" in msg, msg
    assert _contents(run) == before  # run.json, checkpoints, the exported router
    # The plain re-run still resumes the one run there is and exports the same router (a
    # run adds its own TensorBoard event file).
    _train(*_args(s, run))
    assert _contents(run, skip=("tensorboard",)) == {
        k: v for k, v in before.items() if not k.startswith("tensorboard")}


# ---------------------------------------------------------------- 2: a replaced model
@pytest.mark.slow
def test_an_expert_replaced_at_the_same_path_is_a_listed_difference(setup, tmp_path):
    s = setup
    run = _copy(s, tmp_path)
    before = _contents(run)
    code = os.path.join(s["models"]["code"], "model.safetensors")
    saved = tmp_path / "code.safetensors"
    shutil.copy2(code, saved)
    st = os.stat(code)
    try:
        # Another expert's weights: the same size; the old modification time put back.
        shutil.copyfile(os.path.join(s["models"]["math"], "model.safetensors"), code)
        assert os.path.getsize(code) == st.st_size
        os.utime(code, ns=(st.st_atime_ns, st.st_mtime_ns))
        msg = _refused(*_args(s, run))
        assert f"the contents of experts.paths[1] ({s['models']['code']!r}) changed" in msg
        assert "accept_changes" in msg and "paths[0]" not in msg, msg
        assert _contents(run) == before
        _train(*_args(s, run, "--config.train.accept_changes=True"))
        record = json.load(open(run / "sft" / "run.json"))
        assert record["changes"][0]["differences"] == [
            f"the contents of experts.paths[1] ({s['models']['code']!r}) changed"]
    finally:
        shutil.copy2(saved, code)


# -------------------------------------------------------------- 3: single bit flips
def _chunks_in(step_dir):
    """(largest data file, [(start, length)] of the stored array chunks inside it, largest
    first): read through OCDBT's own index, so a flip lands in array data, not in an
    index, a manifest or padding."""
    import tensorstore as ts
    state = str(step_dir / "state")
    files = [os.path.join(r, f) for r, _, fs in os.walk(state) for f in fs]
    biggest = max(files, key=os.path.getsize)
    data = open(biggest, "rb").read()
    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{state}/"}).result()
    found = []
    for key in kv.list().result():
        value = kv.read(key).result().value
        at = data.find(value) if len(value) > 1024 else -1
        if at >= 0:
            found.append((at, len(value)))
    return biggest, sorted(found, key=lambda c: -c[1])


def _flip(path, offset, bit):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))


@pytest.mark.slow
def test_single_bit_flips_in_the_newest_checkpoints_are_each_set_aside(setup, tmp_path,
                                                                        caplog, capsys):
    """One bit flipped in an array chunk of each of steps 4, 3 and 2 (at a quarter, a half and
    three quarters of a chunk; bits 0, 3 and 7): the re-run sets each aside with a warning,
    resumes from step 1 and exports the router the unbroken run exported, bit for bit."""
    s = setup
    run = _copy(s, tmp_path)
    want = _contents(run / "sft" / "router")
    shutil.rmtree(run / "sft" / "router")
    for step, (frac, bit) in zip((4, 3, 2), ((0.25, 0), (0.5, 3), (0.75, 7))):
        biggest, chunks = _chunks_in(run / "sft" / "checkpoints" / str(step))
        start, length = chunks[step % len(chunks)]
        _flip(biggest, start + int(length * frac), bit)
    with caplog.at_level("WARNING"):
        _train(*_args(s, run))
    for step in (4, 3, 2):
        assert f"checkpoint step {step} in" in caplog.text and "is bad" in caplog.text
    aside = sorted(d.split("-")[0] for d in os.listdir(str(run / "sft" / "checkpoints")
                                                      + ".corrupt"))
    assert aside == ["2", "3", "4"]  # kept, not deleted
    assert "[sft] resumed from step 1 " in capsys.readouterr().out
    assert _steps(run) == [1, 2, 3, 4]
    assert _contents(run / "sft" / "router") == want


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32])
def test_the_checksum_catches_every_single_bit_and_ignores_the_sharding(dtype):
    x = (jax.random.normal(jax.random.key(0), (8, 64)) * 100).astype(dtype)
    words = np.asarray(x).view({4: np.uint32, 2: np.uint16}[x.dtype.itemsize])
    want = checksum({"x": x})
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    assert checksum({"x": sharded}) == want
    bits = words.dtype.itemsize * 8
    for i in (0, 1, 255, 511):  # every bit of the first, second, a middle and the last word
        for k in range(bits):
            w = words.copy()
            w.flat[i] ^= w.dtype.type(1 << k)
            got = checksum({"x": jnp.asarray(w.view(np.asarray(x).dtype))})
            assert got[0][0] != want[0][0] and got[0][1] != want[0][1], (i, k)
    swapped = words.copy()
    swapped.flat[[3, 7]] = swapped.flat[[7, 3]]
    if swapped.flat[3] != swapped.flat[7]:  # a swap: the plain sum cannot see it
        assert checksum({"x": jnp.asarray(swapped.view(np.asarray(x).dtype))}) != want


# ------------------------------------------------------------------ 4: divergence
@pytest.mark.slow
def test_a_run_diverging_while_finite_stops_and_resumes_from_before_the_rise(inputs, tmp_path,
                                                                            caplog):
    """lr=30: the loss stays near 13 for two steps (12.95, 12.97 with the bundled 3 x 64
    router; 13.8, 14.4 with the earlier 3 x 80), then jumps past 1000 at step 3 (finite; NaN
    would come later from weights of ~1e8). The run stops there, naming step 1 (checkpoint
    2's params gave the jump); the resume it prints moves step 2 aside, keeps it, and trains
    to the end."""
    s = inputs
    run = tmp_path / "run"
    msg = _refused(*_args(s, run, "--config.train.sft.lr=30", "--config.train.sft.warmup=4"))
    assert "[sft] loss jumped to" in msg and "at step 3" in msg, msg
    # The message quotes the losses before the jump and the jump itself, as numbers.
    recent = [float(v) for v in re.search(r"\(recent: ([^)]*)\)", msg).group(1).split(", ")]
    assert len(recent) == 3 and all(12 < v < 15 for v in recent[:2]), msg
    assert recent[2] > 50 * max(recent[:2]), msg
    assert "--config.train.resume_step=1 --config.train.sft.lr=3 " \
           "--config.train.accept_changes=True" in msg, msg
    assert not (run / "sft" / "router").exists() and _steps(run) == [1, 2]
    step2 = _contents(run / "sft" / "checkpoints" / "2")
    # A step that is not there is refused before anything is written.
    record = (run / "sft" / "run.json").read_text()
    msg = _refused(*_args(s, run, "--config.train.resume_step=3", "--config.train.sft.lr=3",
                          "--config.train.sft.warmup=4", "--config.train.accept_changes=True"))
    assert "has no step 3 (it holds: 1, 2)" in msg, msg
    assert (run / "sft" / "run.json").read_text() == record
    with caplog.at_level("WARNING"):
        _train(*_args(s, run, "--config.train.resume_step=1", "--config.train.sft.lr=3",
                      "--config.train.sft.warmup=4", "--config.train.accept_changes=True"))
    assert "the steps after it (2) were moved to" in caplog.text
    aside = os.listdir(str(run / "sft" / "checkpoints") + ".abandoned")
    assert len(aside) == 1 and aside[0].startswith("2-")
    assert _contents(os.path.join(str(run / "sft" / "checkpoints") + ".abandoned",
                                  aside[0])) == step2  # kept as it was
    assert _steps(run) == [1, 2, 3, 4] and (run / "sft" / "router").is_dir()
    history = json.load(open(run / "sft" / "history.json"))
    assert [h["micro"] for h in history] == [1, 2, 3, 4] and history[2]["loss"] < 100
