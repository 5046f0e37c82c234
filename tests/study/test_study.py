"""`instructune study` on the tiny model: the report's numbers are the arms' own, the regimes pick the
rows they say, and the verdict follows its rule on hand-made numbers."""

from __future__ import annotations

import json
import statistics

import pytest

from instructune.cli import main
from instructune.errors import UserError
from instructune.study.regimes import build_regime, ranked, row_lengths
from instructune.study.verdict import NO_DIFFERENCE, NOT_SUPPORTED, SUPPORTED, decide, verdicts
from instructune.train.metrics import read_metrics
from train_fixtures import train_records, write_tiny_model

WEIGHTS, SEEDS, EPOCHS = (0.0, 0.5, 1.0), (1, 2), 2
REPORT_FILES = ("report.html", "report.md", "summary.json", "loss_curves.png", "gap_vs_weight.png",
                "generation.png", "compute.png")


def write_length_data(path, rows: int = 40):
    """Alpaca rows whose instruction and response lengths vary independently (row i: known lengths)."""
    words = "the quick brown fox jumps over the lazy dog".split()
    with path.open("w", encoding="utf-8") as out:
        for i in range(rows):
            instruction = " ".join(words[j % 9] for j in range(1 + (i * 7) % 13)) + "?"
            output = " ".join(words[(j + 3) % 9] for j in range(1 + (i * 5) % 11)) + "."
            out.write(json.dumps({"instruction": instruction, "output": output, "answer": words[(i + 3) % 9]}) + "\n")
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    model, data = write_tiny_model(root / "model"), write_length_data(root / "data.jsonl")
    output = root / "report"
    argv = ["study", f"model={model}", f"data={data}", f"output_dir={output}", "batch_size=4", "lr=1e-2",
            f"epochs={EPOCHS}", "log_every=4", "--weights", ",".join(map(str, WEIGHTS)),
            "--seeds", ",".join(map(str, SEEDS)), "--regime", "as_is", "--rows", "12", "--heldout-rows", "6",
            "--questions", "3", "--max-new-tokens", "4", "--train-sample", "5", "--timing-pairs", "2"]
    assert main(argv) == 0
    summary = json.loads((output / "summary.json").read_text(encoding="utf-8"))
    return model, output, summary


def _arm_dirs(output):
    return {(s, w): output / f"seed{s}" / f"w{w:g}" for s in SEEDS for w in WEIGHTS}


def test_writes_the_report_and_every_arm(study):
    _, output, summary = study
    for name in REPORT_FILES:
        assert (output / name).stat().st_size > 0, name
    for name in REPORT_FILES[3:]:
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in (output / "report.md").read_text(encoding="utf-8")
    page = (output / "report.html").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert len(summary["arms"]) == len(SEEDS) * len(WEIGHTS)
    for folder in _arm_dirs(output).values():
        assert (folder / "metrics.jsonl").is_file() and (folder / "answers.jsonl").is_file()
        assert not list(folder.glob("checkpoint-*"))  # deleted once answered
    assert all(summary["checks"].values())
    assert len((output / "data" / "train.jsonl").read_text().splitlines()) == 12
    assert len((output / "data" / "heldout.jsonl").read_text().splitlines()) == 6


def test_numbers_equal_the_arms_metrics_files(study):
    _, output, summary = study
    report = (output / "report.md").read_text(encoding="utf-8")
    for arm in summary["arms"]:
        folder = _arm_dirs(output)[(arm["seed"], arm["weight"])]
        evals = [r for r in read_metrics(folder) if r["split"] == "eval"]
        assert [e["step"] for e in arm["epochs"]] == [r["step"] for r in evals]
        assert [e["epoch"] for e in arm["epochs"]] == list(range(1, EPOCHS + 1))
        assert arm["steps_per_epoch"] * EPOCHS == evals[-1]["step"]
        for epoch, record in zip(arm["epochs"], evals, strict=True):
            assert epoch["response_loss"] == record["loss"]
            assert epoch["train_response_loss"] == record["train_response_loss"]
            assert epoch["instruction_loss"] == record["instruction_loss"]
            assert epoch["train_instruction_loss"] == record["train_instruction_loss"]
            assert epoch["gap"] == record["loss"] - record["train_response_loss"]
            # the per-epoch table of the report shows exactly these numbers
            row = (f"| {arm['seed']} | {arm['weight']:g} | {epoch['epoch']} | {record['loss']:.3f} | "
                   f"{record['train_response_loss']:.3f} | ")
            assert row in report
        answered = [json.loads(line) for line in (folder / "answers.jsonl").read_text().splitlines()]
        assert [a["epoch"] for a in answered] == list(range(1, EPOCHS + 1))
        assert arm["final_answers"] == answered[-1]["answers"]
    # the last-epoch table: mean (min..max) over seeds of each weight
    for weight in WEIGHTS:
        losses = [a["epochs"][-1]["response_loss"] for a in summary["arms"] if a["weight"] == weight]
        assert f"| {weight:g} | {statistics.fmean(losses):.3f} ({min(losses):.3f}..{max(losses):.3f}) |" in report


def test_arms_share_start_rows_and_sets_and_differ_in_the_weight(study):
    _, output, summary = study
    records = {key: [r for r in read_metrics(folder) if r["split"] == "train"]
               for key, folder in _arm_dirs(output).items()}
    evals = {key: [r for r in read_metrics(folder) if r["split"] == "eval"] for key, folder in _arm_dirs(output).items()}
    for seed in SEEDS:
        base = records[(seed, 0.0)]
        for weight in WEIGHTS:
            # the same rows in the same order: every step reads the same tokens
            assert [r["tokens"] for r in records[(seed, weight)]] == [r["tokens"] for r in base]
            # every arm is scored on the same targets
            for key in ("targets", "train_response_targets", "instruction_targets", "train_instruction_targets"):
                assert [r[key] for r in evals[(seed, weight)]] == [r[key] for r in evals[(1, 0.0)]]
        # the weight changes training: the first step's loss already differs
        assert records[(seed, 1.0)][0]["loss"] != base[0]["loss"]
    assert records[(1, 0.0)][0]["tokens"] != records[(2, 0.0)][0]["tokens"] or \
        [r["loss"] for r in records[(1, 0.0)]] != [r["loss"] for r in records[(2, 0.0)]]  # seeds differ


def test_the_masked_arm_trains_as_a_plain_run(study, tmp_path):
    from instructune.train.config import load_config
    from instructune.train.loop import train

    _, output, _ = study
    folder = _arm_dirs(output)[(1, 0.0)]
    train(load_config(folder / "config.yaml", [f"output_dir={tmp_path / 'plain'}", "save_every=0"]))
    plain = [r for r in train_records(tmp_path / "plain") if r["split"] == "train"]
    assert plain == [r for r in train_records(folder) if r["split"] == "train"]


def test_the_verdict_table_shows_the_summarys_verdicts(study):
    _, output, summary = study
    report = (output / "report.md").read_text(encoding="utf-8")
    assert [v["key"] for v in summary["verdicts"]] == ["responses", "overfitting", "compute"]
    for v in summary["verdicts"]:
        assert f"| {v['claim']} |" in report and f"**{v['verdict']}**" in report
        assert v["seeds"] == (len(SEEDS) if v["key"] != "compute" else 2)  # compute: one value per timed pair
    first = summary["verdicts"][0]
    top = {a["seed"]: a["epochs"][-1]["response_loss"] for a in summary["arms"] if a["weight"] == 1.0}
    masked = {a["seed"]: a["epochs"][-1]["response_loss"] for a in summary["arms"] if a["weight"] == 0.0}
    assert first["differences"] == [top[s] - masked[s] for s in SEEDS]


# ---------------------------------------------------------------------------------------------------
# Regimes

def test_regimes_pick_the_rows_they_name(tmp_path):
    data = write_length_data(tmp_path / "data.jsonl")
    lengths = {r.index: r for r in row_lengths(str(data))}
    for regime in ("long_instruction", "long_response"):
        built = build_regime(regime, str(data), tmp_path / regime, rows=10, heldout_rows=4)
        assert len(built.train) == 10 and len(built.heldout) == 4
        chosen = {r.index for r in built.train + built.heldout}
        rest = [r.ratio for i, r in lengths.items() if i not in chosen]
        ratios = [lengths[i].ratio for i in chosen]
        if regime == "long_instruction":
            assert min(ratios) >= max(rest)
        else:
            assert max(ratios) <= min(rest)
        # the files hold exactly those rows, as read
        source = data.read_text().splitlines()
        written = (tmp_path / regime / "train.jsonl").read_text().splitlines()
        assert [json.loads(w) for w in written] == [json.loads(source[r.index]) for r in built.train]
        # held-out rows are spread over the same part of the ranking, not its tail
        order = [r.index for r in ranked(list(lengths.values()), regime)][:14]
        positions = sorted(order.index(r.index) for r in built.heldout)
        assert positions[0] < 7 < positions[-1]
    medians = [build_regime(r, str(data), tmp_path / f"m-{r}", rows=10, heldout_rows=4).describe()["train"]
               ["median_ratio"] for r in ("long_instruction", "as_is", "long_response")]
    assert medians[0] > medians[1] > medians[2]


def test_the_shipped_regimes_have_the_shapes_they_claim(tmp_path):
    from instructune.study.study_config import default_sources

    data, _ = default_sources("long_instruction")
    long_instruction = build_regime("long_instruction", data, tmp_path / "a", rows=24, heldout_rows=16).describe()
    long_response = build_regime("long_response", data, tmp_path / "b", rows=24, heldout_rows=16).describe()
    assert long_instruction["train"]["median_instruction_chars"] > 2 * long_instruction["train"]["median_response_chars"]
    assert long_response["train"]["median_response_chars"] > 4 * long_response["train"]["median_instruction_chars"]


def test_a_regime_with_too_few_rows_is_a_clear_error(tmp_path):
    data = write_length_data(tmp_path / "data.jsonl", rows=10)
    with pytest.raises(UserError, match="10 usable rows"):
        build_regime("as_is", str(data), tmp_path / "out", rows=20, heldout_rows=4)


def test_bad_flags_stop_before_anything_is_written(capsys, tmp_path):
    assert main(["study", f"output_dir={tmp_path}", "--weights", "0.1,1"]) == 2
    assert "--weights must include 0" in capsys.readouterr().err
    assert main(["study", f"output_dir={tmp_path}", "instruction_weight=0.5"]) == 2
    assert "instruction_weight" in capsys.readouterr().err
    assert main(["study", f"output_dir={tmp_path}", "--weights", "0,2"]) == 2
    assert "[0, 1]" in capsys.readouterr().err
    assert main(["study", f"output_dir={tmp_path}", "--seeds", "1,1"]) == 2
    assert "--seeds must be distinct" in capsys.readouterr().err
    assert main(["study", f"output_dir={tmp_path}", "max_steps=3"]) == 2
    assert "max_steps" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------
# The verdict rule on hand-made numbers

def test_decide_needs_every_seed_and_a_difference_above_the_threshold():
    assert decide([0.05, 0.04], baseline=1.0) == SUPPORTED
    assert decide([-0.05, -0.04], baseline=1.0) == NOT_SUPPORTED
    assert decide([0.05, -0.01], baseline=1.0) == NO_DIFFERENCE  # seeds disagree
    assert decide([0.009, 0.008], baseline=1.0) == NO_DIFFERENCE  # under 1 % of the baseline
    assert decide([0.011], baseline=1.0) == SUPPORTED


def _hand_made(masked: list[float], unmasked: list[float], gaps0: list[float], gaps1: list[float]) -> dict:
    arms = []
    for i, seed in enumerate((1, 2)):
        for weight, loss, gap in ((0.0, masked[i], gaps0[i]), (1.0, unmasked[i], gaps1[i])):
            epoch = {"response_loss": loss, "gap": gap, "instruction_gap": 0.1 * weight}
            arms.append({"seed": seed, "weight": weight, "epochs": [epoch],
                         "compute": {"median_step_s": 1.0 if weight == 0 else 1.2, "head_tokens_per_step": 20 + 70 * weight,
                                     "tokens_per_step": 100}})
    return {"settings": {"seeds": [1, 2], "weights": [0.0, 1.0]}, "arms": arms,
            "paired_timing": {"masked_s": [0.8, 0.82, 0.79, 0.81], "unmasked_s": [1.0] * 4}}


def test_verdicts_on_hand_made_numbers():
    # masking ahead by 0.1 on both seeds; gaps equal; a 20 % faster step in every pair
    result = {v.key: v for v in verdicts(_hand_made([1.0, 1.1], [1.1, 1.2], [0.2, 0.2], [0.2, 0.2]))}
    assert result["responses"].verdict == SUPPORTED
    assert result["responses"].differences == pytest.approx([0.1, 0.1])
    assert result["overfitting"].verdict == NO_DIFFERENCE
    assert result["compute"].verdict == SUPPORTED
    assert result["compute"].differences == pytest.approx([0.2, 0.18, 0.21, 0.19])
    # the unmasked run ahead on both seeds, with a smaller gap: both claims not supported
    result = {v.key: v for v in verdicts(_hand_made([1.2, 1.3], [1.0, 1.1], [0.3, 0.4], [0.1, 0.1]))}
    assert result["responses"].verdict == NOT_SUPPORTED
    assert result["overfitting"].verdict == NOT_SUPPORTED
    assert result["overfitting"].differences == pytest.approx([-0.2, -0.3])
