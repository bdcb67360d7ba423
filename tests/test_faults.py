"""Bad input and faults met as a user meets them (issue 16): real files on disk, the real
command lines (in this process), real Orbax checkpoints damaged on disk."""

import json
import os
import shutil

import numpy as np
import pytest

from fr_jax.runtime.bundle import bundled_world

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                    "tiny.py")


def _train_args(workdir, sft_file, *extra, steps=8, ckpt_every=2):
    world = bundled_world()
    return ["--config=" + TINY, f"--config.router.path={world['router_base']}",
            f"--config.experts.paths={tuple(world['experts'])!r}",
            f"--config.data.sft_path={sft_file}", f"--config.train.workdir={workdir}",
            "--config.train.stages=('sft',)", f"--config.train.sft.steps={steps}",
            f"--config.train.ckpt_every={ckpt_every}", "--config.train.log_every=1",
            "--config.train.eval_every=0", "--config.train.keep=10",
            "--config.train.sft.expert_signals=online", *extra]


def _train(*args):
    from fr_jax.train import main
    return main(list(args))


def _router_weights(folder):
    from safetensors.numpy import load_file
    return load_file(os.path.join(folder, "model.safetensors"))


def _history(workdir):
    return [{k: v for k, v in h.items() if k not in ("tokens_per_s", "step_time")}
            for h in json.load(open(os.path.join(workdir, "sft", "history.json")))]


def _steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "sft", "checkpoints"))
                  if d.isdigit())


# ------------------------------------------------------------------------------ training
@pytest.mark.slow
def test_a_diverging_stage_stops_at_its_step_and_exports_nothing(tmp_path, sft_file):
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        _train(*_train_args(run, sft_file, "--config.train.sft.lr=1e9",
                            "--config.train.sft.warmup=4"))
    msg = str(e.value)
    assert "error: [sft]" in msg and "at step" in msg and ("nan" in msg or "inf" in msg), msg
    bad_step = int(msg.split("at step ")[1].split(":")[0])
    assert not (run / "sft" / "router").exists()  # nothing exported
    steps = _steps(run)
    assert all(s < bad_step for s in steps)
    if steps:  # the newest checkpoint holds the last finite state
        assert f"step {steps[-1]}, is the last finite state" in msg
        meta = json.load(open(run / "sft" / "checkpoints" / str(steps[-1]) / "meta" / "metadata"))
        assert np.isfinite(meta["fingerprint"]).all()


def _damage(step_dir, how):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir / "state") for f in fs]
    biggest = max(files, key=os.path.getsize)
    if how == "delete":
        os.remove(biggest)
    elif how == "truncate":
        with open(biggest, "r+b") as f:
            f.truncate(os.path.getsize(biggest) // 2)
    else:  # flip 64 bytes in the middle of the biggest data file
        data = bytearray(open(biggest, "rb").read())
        mid = len(data) // 2
        data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
        open(biggest, "wb").write(bytes(data))


@pytest.mark.slow
def test_a_bad_newest_checkpoint_is_set_aside_and_the_run_still_ends_as_an_unbroken_one(
        tmp_path, sft_file, caplog):
    """The newest checkpoint is damaged (a file deleted, truncated, 64 bytes flipped) and
    the exported router removed: the re-run moves the bad step aside, resumes from the one
    before, trains to the end and exports what the unbroken run exported, bit for bit, with
    the unbroken run's full history."""
    straight = tmp_path / "straight"
    _train(*_train_args(straight, sft_file))
    want, want_history = _router_weights(straight / "sft" / "router"), _history(straight)
    assert [h["micro"] for h in want_history] == list(range(1, 9))
    for how in ("delete", "truncate", "flip"):
        run = tmp_path / how
        shutil.copytree(straight, run)
        shutil.rmtree(run / "sft" / "router")
        _damage(run / "sft" / "checkpoints" / "8", how)
        with caplog.at_level("WARNING"):
            _train(*_train_args(run, sft_file))
        assert "checkpoint step 8" in caplog.text and "moved it to" in caplog.text, how
        aside = os.listdir(str(run / "sft" / "checkpoints") + ".corrupt")
        assert len(aside) == 1 and aside[0].startswith("8-"), how  # kept, not deleted
        assert _steps(run)[-1] == 8
        got = _router_weights(run / "sft" / "router")
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{how}: {k}")
        assert _history(run) == want_history, how
        caplog.clear()
    # A finished stage re-run leaves its history as it was (it used to write []).
    _train(*_train_args(straight, sft_file))
    assert _history(straight) == want_history


@pytest.mark.slow
def test_resuming_with_other_data_or_settings_is_refused_and_never_rewrites_the_record(
        tmp_path, sft_file):
    run = tmp_path / "run"
    _train(*_train_args(run, sft_file, steps=2))
    config_before = (run / "config.json").read_text()
    changed = tmp_path / "changed.jsonl"
    changed.write_text(sft_file.read_text().replace("add", "add ", 1))
    with pytest.raises(SystemExit) as e:
        _train(*_train_args(run, changed, steps=2))
    assert "data.sft_path" in str(e.value) and "accept_changes" in str(e.value)
    with pytest.raises(SystemExit) as e:
        _train(*_train_args(run, sft_file, "--config.train.sft.lr=0.5", steps=2))
    assert "train.sft.lr: 0.003 -> 0.5" in str(e.value)
    _train(*_train_args(run, changed, "--config.train.accept_changes=True", steps=2))
    record = json.load(open(run / "sft" / "run.json"))
    assert len(record["changes"]) == 1 and "data.sft_path" in record["changes"][0]["differences"][0]
    assert (run / "config.json").read_text() == config_before


def test_bad_data_records_are_counted_in_the_stage_report_and_an_unusable_file_is_fatal(
        tmp_path, sft_file):
    mixed = tmp_path / "mixed.jsonl"
    lines = sft_file.read_text().splitlines()
    lines[3] = '{"prompt": "add 1+2", "response": 3}'
    lines[5] = "not json at all"
    mixed.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    _train(*_train_args(run, mixed, steps=2))
    report = json.load(open(run / "sft" / "data_report.json"))
    assert report["kept"] == len(lines) - 2
    assert report["where"] == {"response_not_text": [f"{mixed}:4"], "bad_json": [f"{mixed}:6"]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 1, "response": 2}\nnope\n')
    with pytest.raises(SystemExit, match="no usable sft records"):
        _train(*_train_args(tmp_path / "run2", bad, steps=2))


# ------------------------------------------------------------------------------ knobs
@pytest.mark.parametrize("argv, field", [
    (["--config.train.ckpt_every=0"], "train.ckpt_every"),
    (["--config.train.sft.lr=nan"], "train.sft.lr"),
    (["--config.train.cdpo.beta=-1"], "train.cdpo.beta"),
])
def test_training_knobs_out_of_range_fail_before_any_work(argv, field, tmp_path):
    with pytest.raises(SystemExit, match=f"--config.{field}=.* is out of range"):
        _train("--config=" + TINY, f"--config.train.workdir={tmp_path}", *argv)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--config.lam=nan"], "--config.lam=nan is out of range"),
    (["--config.lam=-1e30"], "--config.lam=-1e\\+30 is out of range"),
    (["--config.density=0"], "--config.density=0"),
])
def test_merge_refuses_values_that_destroy_the_model(argv, message, tmp_path):
    from fr_jax.merge import main
    with pytest.raises(SystemExit, match=message):
        main([f"--out={tmp_path / 'm'}", *argv])
    assert not (tmp_path / "m").exists()


def test_merge_never_writes_into_one_of_its_inputs(tmp_path):
    from fr_jax.merge import main
    world = bundled_world()
    expert = tmp_path / "expert"
    shutil.copytree(world["experts"][0], expert)
    before = {f: (expert / f).read_bytes() for f in os.listdir(expert)}
    with pytest.raises(SystemExit, match="would be overwritten"):
        main([f"--base={world['base']}", f"--experts={expert},{world['experts'][1]}",
              f"--out={expert}"])
    assert {f: (expert / f).read_bytes() for f in os.listdir(expert)} == before


@pytest.mark.parametrize("argv, message", [
    (["--config.seqroute.lam=nan", "--mode=sequence"], "--config.seqroute.lam=nan"),
    (["--config.seqroute.lam=-1", "--mode=sequence"], "--config.seqroute.lam=-1"),
    (["--config.decode.top_p=0"], "--config.decode.top_p=0"),
    (["--config.decode.temperature=-1"], "--config.decode.temperature=-1"),
    (["--output=/nonexistent-folder/out.jsonl"], "does not exist"),
])
def test_decode_refuses_bad_knobs_and_unwritable_outputs_before_decoding(argv, message, capsys):
    from fr_jax.decode import main
    with pytest.raises(SystemExit, match=message):
        main(argv)
    assert "tokens per expert" not in capsys.readouterr().out  # nothing was decoded


def test_eval_refuses_a_negative_limit():
    from fr_jax.eval import main
    with pytest.raises(SystemExit, match="--config.eval.limit=-4 is out of range"):
        main(["--limit=-4"])


# ------------------------------------------------------------------------------ SIGKILL
def _final_state(workdir):
    """(every array of the newest checkpoint's state, its meta) as saved on disk."""
    import orbax.checkpoint as ocp
    step = _steps(workdir)[-1]
    folder = os.path.join(workdir, "sft", "checkpoints", str(step))
    state = ocp.PyTreeCheckpointer().restore(os.path.join(folder, "state"))
    meta = json.load(open(os.path.join(folder, "meta", "metadata")))
    return state, meta


@pytest.mark.slow
def test_sigkill_at_several_points_including_mid_save_resumes_to_the_unbroken_run(
        tmp_path, sft_file):
    """`python -m fr_jax.train` killed with SIGKILL after a checkpoint, while a checkpoint
    is being written (its temporary folder exists), and again after resuming; each re-run
    resumes. The end: the same params, optimizer state, step, data position and history as
    a run never interrupted, bit for bit."""
    import signal
    import subprocess
    import sys
    import time

    import jax
    from cli_env import REPO, one_device_env

    def cmd(workdir):
        return [sys.executable, "-m", "fr_jax.train",
                *_train_args(workdir, sft_file, steps=8, ckpt_every=1)]

    env = one_device_env(tmp_path / "home")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(cmd(straight), cwd=REPO, env=env, check=True, capture_output=True,
                   timeout=600)
    ckpts = killed / "sft" / "checkpoints"

    def run_until(stop, what):
        proc = subprocess.Popen(cmd(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not stop():
            time.sleep(0.001)
        assert proc.poll() is None, f"the run ended before the kill point ({what})"
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def steps_done():
        return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit()) if ckpts.exists() else []

    def saving():  # a step's temporary folder: Orbax is writing it
        return ckpts.exists() and any("tmp" in d for d in os.listdir(ckpts))

    run_until(lambda: 2 in steps_done(), "after step 2")
    run_until(lambda: steps_done() and steps_done()[-1] >= 3 and saving(), "mid-save")
    left = [d for d in os.listdir(ckpts) if not d.isdigit()]
    run_until(lambda: 6 in steps_done(), "after step 6")
    out = subprocess.run(cmd(killed), cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step" in out.stdout
    assert left, "no partial checkpoint was left by the mid-save kill"

    a_state, a_meta = _final_state(straight)
    b_state, b_meta = _final_state(killed)
    assert a_meta["micro"] == b_meta["micro"] == 8 and a_meta["data"] == b_meta["data"]
    assert jax.tree.structure(a_state) == jax.tree.structure(b_state)
    for x, y in zip(jax.tree.leaves(a_state), jax.tree.leaves(b_state)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # params, Adam, rng
    assert _history(killed) == _history(straight)
    assert [h["micro"] for h in _history(killed)] == list(range(1, 9))


# ------------------------------------------------------------------------------ unclear ends
def test_damaged_checkpoint_files_name_the_file_and_the_fix(tmp_path):
    from fr_jax.runtime.errors import CheckpointError, ConfigError
    from fr_jax.hf import load_config, load_hf

    world = bundled_world()
    folder = tmp_path / "expert"
    shutil.copytree(world["experts"][0], folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (0x7FFFFFFFFFFFFFFF).to_bytes(8, "little")  # a header length past the file
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or damaged"):
        load_hf(str(folder))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = str(cfg["num_attention_heads"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="config.json: num_attention_heads must be a "
                                          "positive integer, got '4'"):
        load_config(str(folder))


@pytest.mark.parametrize("argv, message", [
    (["--mode=expert:-1"], "counts from 0"),
    (["--config.decode.eos_ids=(5, 100000)"], "100000 is not a token id"),
])
def test_decode_names_a_bad_mode_or_eos_id(argv, message):
    from fr_jax.decode import main
    with pytest.raises(SystemExit, match=message):
        main(argv)


@pytest.mark.slow
def test_a_prompt_past_the_models_positions_decodes_with_a_warning(capsys):
    from fr_jax.decode import main
    main(["--prompt=" + "say " + "ab" * 130, "--config.decode.max_new_tokens=4"])
    err = capsys.readouterr().err
    assert "runs past the models' max_position_embeddings (256)" in err


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_says_what_happened_and_the_run_recovers(
        tmp_path, sft_file):
    """The file-size limit (RLIMIT_FSIZE) stands in for a full disk: every write past it
    fails, as on a full device. The checkpoint that cannot be written stops the run with a
    message that names the folder and the intact step; once there is room, the same
    command resumes from that step and finishes."""
    import resource
    import signal
    import subprocess
    import sys

    from cli_env import REPO, one_device_env

    run = tmp_path / "run"
    env = one_device_env(tmp_path / "home")  # a cache entry past the limit: JAX warns
    first = [sys.executable, "-m", "fr_jax.train", *_train_args(run, sft_file, steps=2)]
    subprocess.run(first, cwd=REPO, env=env, check=True, capture_output=True, timeout=600)
    state = run / "sft" / "checkpoints" / "2" / "state"
    biggest = max(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(state) for f in fs)
    limit = biggest // 2
    # What a run writes before its next checkpoint (logs, records; the exported router comes
    # only after the last step) stays under the limit: only the checkpoint hits it.
    others = [os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(run) for f in fs
              if "checkpoints" not in r and not r.startswith(str(run / "sft" / "router"))]
    assert max(others) < limit, "the limit must only stop checkpoint files"

    def full_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    more = [sys.executable, "-m", "fr_jax.train",
            *_train_args(run, sft_file, "--config.train.accept_changes=True", steps=4)]
    out = subprocess.run(more, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                         preexec_fn=full_disk)
    assert out.returncode != 0
    # Orbax's and tensorstore's writer threads print their own tracebacks of the failed
    # write, sometimes after the run's last line and sometimes into the middle of it (no
    # newline between the two writers): the run's error is found among them wherever it
    # starts on its line.
    errs = [ln[ln.index("error: "):] for ln in out.stderr.splitlines()
            if "error: could not" in ln or ln.startswith("error: ")]
    assert len(errs) == 1, out.stderr[-3000:]
    assert errs[0].startswith("error: could not write checkpoint step 4") and \
        "step 2, is intact" in errs[0] and "re-run the same command to resume" in errs[0], errs
    out = subprocess.run(more, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from step 2" in out.stdout and _steps(run)[-1] == 4
