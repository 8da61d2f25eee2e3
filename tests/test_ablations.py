"""The ablation runner's bookkeeping on a one-epoch micro-study over the tiny synthetic set (real subprocesses of
our entry points): a failed run is reported and the rest go on, a second start skips finished runs and retries
only the failed one, and the table is built from the runs' own result files. Never assertions on accuracy."""
import json
import os
import sys

import pytest

import run_ablations as ab

MICRO = dict(epochs=1, finetune_epochs=1, input_size=32, num_frames=4, batch_size=4)


@pytest.fixture(scope="module")
def micro(synthetic_root, tmp_path_factory):
    cfg = ab.Config(out=str(tmp_path_factory.mktemp("ablations")), data_root=str(synthetic_root),
                    python=sys.executable, **MICRO)
    study = ab.Study("micro", "Micro study", "nothing at this size", [
        ab.Setting("tube 0.9", ["--mask_ratio", "0.9"], cross_modal=True),
        ab.Setting("broken", ["--mask_ratio", "1.5"]),  # refused by the pre-training script: a failing run
        ab.Setting("default", [])])  # the same training as "tube 0.9" (0.9 is the default): shared, not repeated
    runs = ab.plan([study], [0])
    failures = ab.run_all(runs, cfg)
    return cfg, study, runs, failures


def _result(cfg, study, name):
    return os.path.join(ab.run_folder(cfg, study, study.settings[0] if name == "ok" else study.settings[1], 0),
                        "result.json")


def test_a_failed_run_is_reported_and_the_others_finish(micro):
    cfg, study, _, failures = micro
    assert len(failures) == 1 and failures[0].startswith("micro / broken / seed 0: pre-training (broken) exited")
    assert "mask_ratio" in failures[0]  # the script's own one-line error travels into the report
    broken = ab.run_folder(cfg, study, study.settings[1], 0)
    assert os.path.exists(os.path.join(broken, "failed.json")) and not os.path.exists(os.path.join(broken,
                                                                                                   "result.json"))
    with open(_result(cfg, study, "ok")) as f:
        result = json.load(f)
    assert {"zero_shot", "finetune", "gflops_per_step", "pretrain_seconds", "cross_modal"} <= set(result)
    assert result["pretrain_steps"] > 0 and result["gflops_per_step"] > 0
    assert {f"word_top1_{c}" for c in ("own", "other", "none")} <= set(result["cross_modal"])


def test_a_setting_equal_to_another_shares_its_training_and_evaluations(micro):
    cfg, study, _, _ = micro
    results = []
    for setting in (study.settings[0], study.settings[2]):
        with open(os.path.join(ab.run_folder(cfg, study, setting, 0), "result.json")) as f:
            results.append(json.load(f))
    spelled_out, default = results
    assert default["checkpoint"] == spelled_out["checkpoint"]
    assert default["pretrain_seconds"] == spelled_out["pretrain_seconds"]
    assert default["finetune"] == spelled_out["finetune"] and default["zero_shot"] == spelled_out["zero_shot"]
    trained = [k for k in os.listdir(os.path.join(cfg.out, "pretrain"))
               if os.path.exists(os.path.join(cfg.out, "pretrain", k, "done.json"))]
    assert len(trained) == 1  # one finished pre-training for the two settings (the broken one never finished)
    with open(os.path.join(ab.run_folder(cfg, study, study.settings[2], 0), "run.log")) as f:
        assert f.read().count("shared, already in") == 3  # pre-training, zero-shot, fine-tuning


def test_a_second_start_skips_finished_runs_and_retries_the_failed_one(micro, capsys):
    cfg, study, runs, _ = micro
    before = os.path.getmtime(_result(cfg, study, "ok"))
    failures = ab.run_all(runs, cfg)
    out = capsys.readouterr().out
    assert "3 runs, 2 already finished, 1 to go" in out and "micro / broken / seed 0" in out
    assert len(failures) == 1 and os.path.getmtime(_result(cfg, study, "ok")) == before


def test_the_table_and_figure_come_from_the_result_files(micro):
    cfg, study, _, failures = micro
    path = _result(cfg, study, "ok")
    with open(path) as f:
        result = json.load(f)
    result["finetune"]["t2v_R@1"] = 77.7  # edited on disk: the table must show it
    ab.write_json(path, result)
    text = ab.write_report(cfg, [study], [0], failures, seconds=12.0)
    row = next(line for line in text.splitlines() if line.startswith("| tube 0.9 |"))
    assert "| 77.7 |" in row and f"{result['zero_shot']['t2v_R@1']:.1f}" in row
    assert next(line for line in text.splitlines() if line.startswith("| broken |")).endswith("| 0 (1 failed) |")
    assert "Failed runs" in text and os.path.getsize(os.path.join(cfg.out, "claims.png")) > 0
    with open(os.path.join(cfg.out, "claims.md")) as f:
        assert f.read() == text
    assert "| micro / tube 0.9 |" in text  # study 6's probe table


def test_mean_and_spread_over_seeds():
    assert ab.mean_std([1.0, 3.0]) == "2.0 +- 1.4" and ab.mean_std([5.0]) == "5.0" and ab.mean_std([]) == "-"


def test_a_data_fraction_keeps_a_seeded_share_of_the_clips_in_the_files_format(synthetic_root, tmp_path):
    import datasets
    cfg = ab.Config(out=str(tmp_path), data_root=str(synthetic_root), **MICRO)
    path = ab.subset_file(cfg, 0.5, seed=3)
    full = datasets.read_annotations(os.path.join(cfg.ann, "pretrain.json"), synthetic_root)
    half = datasets.read_annotations(path, synthetic_root)
    assert len(half) == round(0.5 * len(full)) and {r.path for r in half} < {r.path for r in full}
    assert ab.subset_file(cfg, 0.5, seed=3) == path and ab.subset_file(cfg, 1.0, seed=3).endswith("pretrain.json")
