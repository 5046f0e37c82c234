"""`instructune compare` on the tiny model: the report's files, and its numbers against the runs' own."""

from __future__ import annotations

import json
import statistics

import pytest

from instructune.cli import main
from instructune.data.encoded import ROLE_CODE, EncodedRow
from instructune.study.compare import instruction_rows, shared_prefix_length, weights_fingerprint
from instructune.train.metrics import read_metrics
from train_fixtures import quick_settings, train_records, write_tiny_model, write_toy_data

REPORT_FILES = ("report.md", "summary.json", "response_loss.png", "instruction_loss.png", "generation.png",
                "compute.png")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    model, data = write_tiny_model(root / "model"), write_toy_data(root / "data.jsonl")
    output = root / "report"
    # No eval_data: a quarter of the rows is held out, and the held-out questions are those rows.
    settings = quick_settings(model, data, output, max_steps=8, eval_every=4, save_every=0, keep_last=1,
                              eval_fraction=0.25)
    assert main(["compare", *settings, "--max-new-tokens", "8", "--examples", "3"]) == 0
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    return model, output, summary


def test_writes_every_file_of_the_report(study):
    _, output, summary = study
    for name in REPORT_FILES:
        assert (output / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (output / "report.md").read_text(encoding="utf-8")
    for name in REPORT_FILES[2:]:
        assert f"]({name})" in report  # every plot is embedded
    for name in ("masked", "unmasked"):
        checkpoint = output / name / "checkpoint-8"
        assert (checkpoint / "model.safetensors").is_file() and (output / name / "metrics.jsonl").is_file()
        assert not (checkpoint / "optimizer.pt").exists()  # removed to save disk
        assert summary["runs"][name]["checkpoint"] == str(checkpoint)
    assert report.count("\n| ") >= 3 + 3  # example answers: header, rule, 3 rows (and the other tables)
    assert len(summary["answers"]) == summary["before"]["generation"]["questions"] == 12


def test_numbers_match_the_runs_metrics(study):
    _, output, summary = study
    report = (output / "report.md").read_text(encoding="utf-8")
    for name in ("masked", "unmasked"):
        records = read_metrics(output / name)
        last_eval = [r for r in records if r["split"] == "eval"][-1]
        train = [r for r in records if r["split"] == "train"]
        run = summary["runs"][name]
        assert run["final"]["response_loss"] == last_eval["loss"]
        assert run["final"]["instruction_loss"] == last_eval["instruction_loss"]
        assert run["final"]["train_instruction_loss"] == last_eval["train_instruction_loss"]
        assert run["curve"]["step"] == [4, 8]
        # Step times: each step's tokens over its tokens_per_s.
        tokens = [b["tokens"] - a["tokens"] for a, b in zip([{"tokens": 0}, *train], train)]
        step_s = [n / r["tokens_per_s"] for n, r in zip(tokens, train)]
        assert run["compute"]["median_step_s"] == pytest.approx(statistics.median(step_s), rel=1e-12)
        assert run["compute"]["trained_tokens_per_step"] == pytest.approx(train[-1]["trained_tokens"] / 8)
        for value in (last_eval["loss"], last_eval["instruction_loss"], run["compute"]["median_step_s"]):
            assert f"{value:.3f}" in report
    masked, unmasked = summary["runs"]["masked"], summary["runs"]["unmasked"]
    assert summary["ratios"]["median_step_s"] == pytest.approx(
        masked["compute"]["median_step_s"] / unmasked["compute"]["median_step_s"])
    assert f"{summary['before']['response_loss']:.3f}" in report


def test_both_runs_start_alike_and_differ_only_in_labels(study):
    from instructune.model.load import load_model

    model, output, summary = study
    masked, unmasked = summary["runs"]["masked"], summary["runs"]["unmasked"]
    assert masked["initial_weights_sha256"] == unmasked["initial_weights_sha256"] == weights_fingerprint(
        load_model(str(model)))
    assert masked["data_sha256"] == unmasked["data_sha256"]
    assert all(summary["checks"].values())
    records = {name: read_metrics(output / name) for name in ("masked", "unmasked")}
    train = {name: [r for r in rs if r["split"] == "train"] for name, rs in records.items()}
    # The same rows in the same order: every step read the same number of tokens ...
    assert [r["tokens"] for r in train["masked"]] == [r["tokens"] for r in train["unmasked"]]
    # ... but the masked run scored fewer of them.
    assert train["masked"][-1]["trained_tokens"] < train["unmasked"][-1]["trained_tokens"]
    # Both were evaluated on the same rows with the same labels (the responses), not their own policy's.
    evals = {name: [r for r in rs if r["split"] == "eval"] for name, rs in records.items()}
    for key in ("targets", "instruction_targets", "train_instruction_targets"):
        assert [r[key] for r in evals["masked"]] == [r[key] for r in evals["unmasked"]]
    assert evals["masked"][-1]["targets"] == summary["eval"]["response_tokens"]


def test_the_study_leaves_training_as_a_plain_run_would(study, tmp_path):
    from instructune.train.config import load_config
    from instructune.train.loop import train

    _, output, summary = study
    # The unmasked run's own resolved configuration, trained again by the ordinary `train`.
    train(load_config(output / "unmasked" / "config.yaml", [f"output_dir={tmp_path / 'plain'}"]))
    # Extra eval sets and the side-by-side timing must not change a single training step.
    plain = [r for r in train_records(tmp_path / "plain") if r["split"] == "train"]
    assert plain == [r for r in train_records(output / "unmasked") if r["split"] == "train"]
    assert summary["paired_timing"]["pairs"] == 6 and len(summary["paired_timing"]["masked_s"]) == 6
    report = (output / "report.md").read_text(encoding="utf-8")
    assert f"{summary['paired_timing']['median_ratio']:.2f}× the time" in report


def test_train_on_is_set_by_the_study(capsys, tmp_path):
    assert main(["compare", "train_on=all", f"output_dir={tmp_path}"]) == 2
    assert "train_on" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_instruction_tokens_leave_out_responses_the_shared_prefix_and_position_0():
    s, u, a, o = (ROLE_CODE[r] for r in ("system", "user", "assistant", "other"))
    rows = [EncodedRow(0, [1, 2, 3, 4, 5, 6], [-100] * 4 + [5, 6], [o, s, u, u, a, a]),
            EncodedRow(1, [1, 2, 7, 8, 9], [-100] * 3 + [8, 9], [o, s, u, a, a])]
    assert shared_prefix_length(rows) == 2
    assert [r.labels for r in instruction_rows(rows, 2)] == [[-100, -100, 3, 4, -100, -100],
                                                            [-100, -100, 7, -100, -100]]
    assert instruction_rows(rows, 0)[0].labels == [-100, 2, 3, 4, -100, -100]  # position 0 never
    assert shared_prefix_length(rows[:1]) == 0
