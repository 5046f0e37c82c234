"""`report_to`: TensorBoard and trackio hold exactly metrics.jsonl's values at the same steps, read back
through the libraries' own readers; bad values and missing libraries are clear errors before training."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from instructune.cli import main
from instructune.errors import UserError
from instructune.train.config import config_from_dict, config_to_yaml, load_config
from instructune.train.loop import train
from instructune.train.metrics import read_metrics
from instructune.train.trackers import scalars
from train_fixtures import quick_settings, write_tiny_model, write_toy_data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")


def expected_series(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as tracker series: `<split>/<key>` -> [(step, value)] in step order."""
    series = defaultdict(list)
    for record in read_metrics(output_dir):
        for tag, value in scalars(record).items():
            series[tag].append((record["step"], value))
    return {tag: sorted(points) for tag, points in series.items()}


def tensorboard_series(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars of `output_dir/tensorboard`, read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    events.Reload()
    return {tag: sorted((e.step, e.value) for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}


def as_float32(series: dict[str, list[tuple[int, float]]]) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard stores a scalar as a float32: the exact value it must read back."""
    return {tag: [(step, float(np.float32(value))) for step, value in points] for tag, points in series.items()}


# ---------------------------------------------------------------------------------------------------
# The key

@pytest.mark.parametrize("value, expected", [
    ("none", "none"), ("null", "none"), ("[]", "none"), ("TensorBoard", "tensorboard"), ("[trackio]", "trackio"),
    ("[tensorboard, trackio, tensorboard]", ["tensorboard", "trackio"]), ("trackio,tensorboard", ["trackio", "tensorboard"]),
])
def test_report_to_takes_one_name_or_a_list(value, expected):
    config = load_config(overrides=[f"report_to={value}"])
    assert config.report_to == expected
    assert config_from_dict(yaml.safe_load(config_to_yaml(config))) == config  # the saved form loads back


@pytest.mark.parametrize("text, message", [
    ("report_to: wandb\n", "run.yaml, line 1: 'report_to': expected none, tensorboard or trackio, or a list of "
                           "them, got 'wandb'"),
    ("lr: 0.1\nreport_to: [tensorboard, wandb]\n", "run.yaml, line 2: 'report_to': expected none, tensorboard or "
                                                   "trackio, or a list of them, got ['tensorboard', 'wandb']"),
    ("report_to: 3\n", "run.yaml, line 1: 'report_to': expected none, tensorboard or trackio, or a list of them, "
                       "got 3"),
    ("report_to: [none, trackio]\n", "run.yaml, line 1: 'report_to': none cannot be combined with a tracker, "
                                     "got ['none', 'trackio']"),
])
def test_a_bad_report_to_names_the_file_line_and_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as error:
        load_config(path)
    assert str(error.value) == message.replace("run.yaml", str(path))


def test_report_to_wandb_on_the_command_line_is_one_line(capsys):
    assert main(["train", "report_to=wandb"]) == 2
    assert capsys.readouterr().err == ("error: command line: 'report_to': expected none, tensorboard or trackio, "
                                       "or a list of them, got 'wandb'\n")


@pytest.mark.parametrize("name, module", [("tensorboard", "torch.utils.tensorboard"), ("trackio", "trackio")])
def test_a_missing_library_names_its_extra_before_anything_is_done(tiny, tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # what an environment without the package sees
    run = tmp_path / "run"
    with pytest.raises(UserError) as error:
        train(load_config(overrides=quick_settings(*tiny, run, report_to=name)))
    assert str(error.value) == (f"report_to: {name} needs the {name} package; install it with "
                                f"pip install 'instructune[{name}]' (or set report_to: none)")
    assert not run.exists()  # stopped before the data, the model or the output folder


# ---------------------------------------------------------------------------------------------------
# TensorBoard

def test_tensorboard_events_equal_metrics_jsonl_step_by_step(tiny, tmp_path):
    run = tmp_path / "run"
    train(load_config(overrides=quick_settings(*tiny, run, report_to="tensorboard", max_steps=8)))
    expected = expected_series(run)
    # Every value a step or an evaluation wrote: 8 training steps, evaluations at 4 and 8.
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/tokens", "train/epoch",
            "eval/loss", "eval/accuracy", "eval/targets"} <= set(expected)
    assert [step for step, _ in expected["train/loss"]] == list(range(1, 9))
    assert [step for step, _ in expected["eval/loss"]] == [4, 8]
    assert tensorboard_series(run) == as_float32(expected)


@pytest.mark.parametrize("first", ["none", "tensorboard"])
def test_a_resumed_run_shows_each_step_once_whatever_the_interrupted_run_reported_to(tiny, tmp_path, first):
    run = tmp_path / "run"
    train(load_config(overrides=quick_settings(*tiny, run, max_steps=8, save_optimizer="all", report_to=first)))
    assert (run / "tensorboard").exists() == (first == "tensorboard")  # none (the default) writes no tracker files
    shutil.rmtree(run / "checkpoint-8")  # as if killed after step 8's metrics, before its checkpoint
    train(load_config(overrides=quick_settings(*tiny, run, max_steps=8, resume=True, report_to="tensorboard")))
    expected = expected_series(run)
    assert [step for step, _ in expected["train/loss"]] == list(range(1, 9))  # steps 5-8 once, retrained
    assert tensorboard_series(run) == as_float32(expected)  # steps 1-4 from metrics.jsonl, 5-8 as trained


# ---------------------------------------------------------------------------------------------------
# trackio

# trackio reads its database folder ($TRACKIO_DIR) once, when first imported, so the run and the
# read-back happen in a fresh process with its own cache, HF home and no token: nothing outside
# tmp_path is read or written and nothing is sent anywhere.
TRACKIO_SCRIPT = """
import json, shutil, sys
from pathlib import Path
from instructune.train.config import load_config
from instructune.train.loop import train

settings, run, out = json.loads(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
train(load_config(overrides=settings + ["save_optimizer=all"]))
shutil.rmtree(run / "checkpoint-8")  # as if killed before the last checkpoint: resume from step 4
train(load_config(overrides=settings + ["resume=true"]))

import trackio

runs = [{"name": r.name, "config": r.config,
         "logs": trackio.SQLiteStorage.get_logs("instructune", r.name, run_id=r.id)}
        for r in trackio.Api().runs("instructune")]
out.write_text(json.dumps({"dir": str(trackio.utils.TRACKIO_DIR), "runs": runs}, default=str))
"""


def test_trackio_store_equals_metrics_jsonl_after_a_resume(tiny, tmp_path):
    run, out = tmp_path / "run", tmp_path / "trackio.json"
    settings = quick_settings(*tiny, run, max_steps=8, report_to=["trackio"])
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("TRACKIO_", "HF_", "HUGGING_FACE"))}
    env.update(INSTRUCTUNE_CACHE=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", TRACKIO_SCRIPT, json.dumps(settings), str(run), str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"trackio: project instructune, run run in {tmp_path / 'cache' / 'trackio'}" in done.stdout
    found = json.loads(out.read_text())
    assert found["dir"] == str(tmp_path / "cache" / "trackio")
    assert (tmp_path / "cache" / "trackio" / "instructune.db").is_file() and not (tmp_path / "hf").exists()
    # One trackio run for the folder (the interrupted one was replaced), with the run's configuration.
    assert [r["name"] for r in found["runs"]] == ["run"]
    config = found["runs"][0]["config"]
    assert config["output_dir"] == str(run.resolve()) and config["lr"] == 1e-2 and config["report_to"] == "trackio"
    series = defaultdict(list)
    for row in found["runs"][0]["logs"]:
        for tag, value in row.items():
            if tag not in ("step", "timestamp"):
                series[tag].append((row["step"], value))
    expected = expected_series(run)
    assert [step for step, _ in expected["train/loss"]] == list(range(1, 9))
    assert {tag: sorted(points) for tag, points in series.items()} == expected  # JSON: exact doubles


# ---------------------------------------------------------------------------------------------------
# Several ranks

@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="torchrun with gloo, as in test_distributed")
def test_under_torchrun_rank_0_alone_writes_the_events(tiny, tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "instructune",
               "train", *quick_settings(*tiny, run, max_steps=4, report_to="tensorboard", dist_timeout_s=60)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTUNE_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(list((run / "tensorboard").iterdir())) == 1  # one event file: one writer
    assert done.stdout.count("tensorboard: tensorboard --logdir") == 1
    expected = expected_series(run)
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert tensorboard_series(run) == as_float32(expected)
