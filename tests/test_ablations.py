"""The ablation runner's bookkeeping on a one-epoch micro-study over the tiny synthetic set (real subprocesses of
our entry points): a failed run is reported and the rest go on, a second start skips finished runs and retries
only the failed one, the table is built from the runs' own result files, and a tested fine-tuning keeps its best
weights and metrics but not its training state. Never assertions on accuracy."""
import glob
import json
import os
import sys

import pytest

import run_ablations as ab

MICRO = dict(epochs=1, finetune_epochs=1, input_size=32, num_frames=4, batch_size=8)  # 3 steps an epoch


@pytest.fixture(scope="module")
def micro(synthetic_root, module_tmp):
    cfg = ab.Config(out=str(module_tmp.mktemp("ablations")), data_root=str(synthetic_root),
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_second_start_skips_finished_runs_and_retries_the_failed_one(micro, capsys):
    cfg, study, runs, _ = micro
    before = os.path.getmtime(_result(cfg, study, "ok"))
    failures = ab.run_all(runs, cfg)
    out = capsys.readouterr().out
    assert "3 runs, 2 already finished, 1 to go" in out and "micro / broken / seed 0" in out
    assert len(failures) == 1 and os.path.getmtime(_result(cfg, study, "ok")) == before


@pytest.mark.slow
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
    probe_row = next(line for line in text.splitlines() if line.startswith("| micro / tube 0.9 |"))  # study 6
    cells = [c.strip() for c in probe_row.strip("|").split("|")][1:]
    assert len(cells) == len(ab.PROBE_COLUMNS) and [len(c.split(" / ")) for c in cells] == [3, 3, 3, 4, 4]
    assert cells[3].split(" / ")[0] == f"{result['cross_modal']['pixel_mse_own']:.3f}"


def test_a_probe_without_a_figure_an_older_run_lacks_shows_a_dash():
    old = {"pixel_mse_own": 0.5, "pixel_mse_other": 0.6, "pixel_mse_none": 0.7}
    new = {**old, "pixel_mse_own": 0.7, "pixel_mse_mean": 0.9}
    assert ab._probe_cell([old, new], "pixel_mse_{}", "{:.2f}") == "0.60 / 0.60 / 0.70 / 0.90"
    assert ab._probe_cell([old], "word_in_group_{}/colour", "{:.1f}") == "- / - / -"


def test_mean_and_spread_over_seeds():
    assert ab.mean_std([1.0, 3.0]) == "2.0 +- 1.4" and ab.mean_std([5.0]) == "5.0" and ab.mean_std([]) == "-"


def test_a_data_fraction_keeps_a_seeded_share_of_the_clips_in_the_files_format(synthetic_root, tmp_path):
    import annotations
    cfg = ab.Config(out=str(tmp_path), data_root=str(synthetic_root), **MICRO)
    path = ab.subset_file(cfg, 0.5, seed=3)
    full = annotations.read_annotations(os.path.join(cfg.ann, "pretrain.json"), synthetic_root)
    half = annotations.read_annotations(path, synthetic_root)
    assert len(half) == round(0.5 * len(full)) and {r.path for r in half} < {r.path for r in full}
    assert ab.subset_file(cfg, 0.5, seed=3) == path and ab.subset_file(cfg, 1.0, seed=3).endswith("pretrain.json")


def _tested_finetunings(cfg):
    return [f for f in sorted(glob.glob(os.path.join(cfg.out, "evals", "*")))
            if os.path.exists(os.path.join(f, "test_metrics.json"))]


@pytest.mark.slow
def test_a_tested_finetuning_keeps_its_best_weights_and_metrics_not_its_training_state(micro):
    cfg, study, _, _ = micro
    [tuned] = _tested_finetunings(cfg)  # "tube 0.9" and "default" share it
    with open(os.path.join(ab.run_folder(cfg, study, study.settings[0], 0), "run.log")) as f:
        assert f"Saved {tuned}/checkpoint-0.pth" in f.read()  # the training state was written ...
    assert glob.glob(os.path.join(tuned, "*checkpoint-[0-9]*.pth")) == []  # ... and is gone, with its hard link
    assert not os.path.exists(os.path.join(tuned, "latest"))
    for kept in ("checkpoint-best.pth", "test_metrics.json", "test_per_query.jsonl", "log.txt", "done.json"):
        assert os.path.getsize(os.path.join(tuned, kept)) > 0, kept
    [pretrained] = [f for f in glob.glob(os.path.join(cfg.out, "pretrain", "*")) if ab.finished(f)]
    assert os.path.exists(ab.latest_checkpoint(pretrained))  # pre-training checkpoints stay: runs start from them


@pytest.mark.slow
def test_a_run_redone_after_its_finetuning_was_cleaned_shares_it_instead_of_training_again(micro, capsys):
    cfg, study, _, _ = micro
    [tuned] = _tested_finetunings(cfg)
    tested_at = os.path.getmtime(os.path.join(tuned, "test_metrics.json"))
    run = (study, study.settings[2], 0)  # "default": its result file removed, the run is done again
    os.remove(os.path.join(ab.run_folder(cfg, *run[:2], 0), "result.json"))
    assert ab.run_all([run], cfg) == []
    assert "Disk: 0 pre-trainings and 0 fine-tunings to train" in capsys.readouterr().out
    with open(os.path.join(ab.run_folder(cfg, *run[:2], 0), "run.log")) as f:
        assert f.read().count(f"fine-tuning (default): shared, already in {tuned}") == 2
    assert os.path.getmtime(os.path.join(tuned, "test_metrics.json")) == tested_at
    assert _tested_finetunings(cfg) == [tuned] and not glob.glob(os.path.join(tuned, "checkpoint-[0-9]*.pth"))


@pytest.mark.slow
def test_the_size_estimate_matches_the_files_the_micro_runs_wrote(micro):
    cfg, _, _, _ = micro
    pretraining, retrieval = ab.model_sizes("simvtp", cfg)
    [tuned] = _tested_finetunings(cfg)
    [pretrained] = [f for f in glob.glob(os.path.join(cfg.out, "pretrain", "*")) if ab.finished(f)]
    for estimate, path in ((pretraining.state_bytes, ab.latest_checkpoint(pretrained)),
                           (retrieval.weights_bytes, os.path.join(tuned, "checkpoint-best.pth"))):
        assert abs(os.path.getsize(path) - estimate) < 0.05 * estimate, path  # pickling and config add a little


def test_a_cleaned_folder_loses_the_training_state_and_its_hard_link_only(tmp_path):
    tested, untested = tmp_path / "evals" / "a", tmp_path / "evals" / "b"
    for folder in (tested, untested):
        folder.mkdir(parents=True)
        for name, size in (("done.json", 2), ("checkpoint-best.pth", 5), ("checkpoint-2.pth", 7), ("latest", 3)):
            (folder / name).write_bytes(b"x" * size)
        os.link(folder / "checkpoint-2.pth", folder / "keep-checkpoint-2.pth")
    (tested / "test_metrics.json").write_text("{}")
    cfg = ab.Config(out=str(tmp_path), data_root="-")
    assert ab.drop_finished_training_states(cfg) == (1, 7)  # one folder, the linked file's bytes counted once
    assert sorted(os.listdir(tested)) == ["checkpoint-best.pth", "done.json", "test_metrics.json"]
    assert len(os.listdir(untested)) == 5  # not tested yet: a stopped fine-tuning resumes from it
    assert ab.drop_finished_training_states(cfg) == (0, 0)


def test_the_disk_estimate_counts_checkpoints_best_weights_and_two_states_in_flight():
    pretraining, retrieval = ab.ModelSize(params=10, trainable=10), ab.ModelSize(params=10, trainable=4)
    assert (pretraining.weights_bytes, pretraining.state_bytes) == (40, 120)
    assert (retrieval.weights_bytes, retrieval.state_bytes) == (40, 72)  # AdamW moments of trainable ones only
    assert ab.disk_estimate([pretraining] * 2, [retrieval] * 3) == ab.DiskEstimate(leaves=2 * 120 + 3 * 40,
                                                                                   peak=360 + 2 * 120)
    assert ab.disk_estimate([], [retrieval]) == ab.DiskEstimate(leaves=40, peak=40 + 2 * 72)
    assert ab.disk_estimate([], []) == ab.DiskEstimate(0, 0)


def test_the_disk_report_warns_only_when_free_space_is_short():
    estimate = ab.DiskEstimate(leaves=8_100_000_000, peak=8_500_000_000)
    roomy = ab.disk_report(estimate, 40, 40, free=37_600_000_000, out="out")
    assert roomy.startswith("Disk: 40 pre-trainings and 40 fine-tunings to train will leave about 8.1 GB in out "
                            "(8.5 GB at peak); 37.6 GB free there.") and "WARNING" not in roomy
    short = ab.disk_report(estimate, 40, 40, free=8_000_000_000, out="out")
    assert short.splitlines()[-1] == ("WARNING: only 8.0 GB free on the file system of out, the runs need about "
                                      "8.5 GB: free some space or pass --out on a larger disk")
