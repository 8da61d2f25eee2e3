"""The QA entry point end to end on the tiny synthetic set's QA files: fine-tuning a SViTT QA model from a SViTT
pre-training checkpoint (the answer decoder from its fusion layers), stopped and resumed, selected on val, tested
with predictions per question; --only_test on the best weights with two clips and two frame orders; bad set-ups."""
import json
import os

import pytest
import torch

import checkpoint
import datasets
import model_registry
import qa_annotations
import run_simvtp_qa as run

TINY = ["--num_frames", "2", "--input_size", "32", "--short_side_size", "32", "--batch_size", "8",
        "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--print_freq", "50", "--seed", "1",
        "--sample_type", "rand", "--lr", "1e-2", "--warmup_epochs", "0"]


def _ann(root, name):
    return os.path.join(root, "annotations", name)


def _args(root, out, *extra):
    argv = ["--data_root", str(root), "--output_dir", str(out), "--answer_list", _ann(root, "qa_answer_list.json"),
            *TINY, *extra]
    return run.get_args_parser().parse_args(argv)


def _lines(path):
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def svitt_ckpt(module_tmp):
    """A tiny SViTT pre-training checkpoint as our runs write it (weights + model_cfg naming the model)."""
    torch.manual_seed(0)
    model = model_registry.create("svitt_tiny_patch16", img_size=32, num_frames=2,
                                  vocab_size=len(datasets.build_tokenizer()))
    path = str(module_tmp.mktemp("svitt") / "checkpoint-0.pth")
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": 0}, path)
    return path


@pytest.fixture(scope="module")
def qa_run(synthetic_root, svitt_ckpt, module_tmp):
    """Fine-tuning stopped after 2 steps, then resumed to 4 (each run ends with the test of the best weights)."""
    out = module_tmp.mktemp("qa")
    files = ["--data_path", _ann(synthetic_root, "qa_train.json"), "--val_data_path", _ann(synthetic_root, "qa_val.json"),
             "--finetune", svitt_ckpt, "--epochs", "2"]
    first = run.main(_args(synthetic_root, out, *files, "--max_steps", "2"))  # no test file: no test
    first_log = _lines(out / "log.txt")
    second = run.main(_args(synthetic_root, out, *files, "--max_steps", "4",
                            "--test_data_path", _ann(synthetic_root, "qa_test.json")))
    return out, first, first_log, second


@pytest.mark.slow
def test_finetune_resumes_selects_on_val_and_writes_one_prediction_per_test_question(qa_run, synthetic_root):
    out, first, first_log, second = qa_run
    assert first == {} and [r["global_step"] for r in first_log] == [2]
    log = _lines(out / "log.txt")
    assert [r["global_step"] for r in log] == [2, 4]  # the second run went on from step 2, not from 0
    assert all("val_accuracy" in r and "train_loss" in r for r in log)
    assert json.load(open(out / "args.json"))["model"] is None  # the QA model came from the checkpoint
    best = checkpoint.read_checkpoint_file(str(out / "checkpoint-best.pth"))
    assert best["model_cfg"]["name"] == "svitt_qa_tiny_patch16" and best["metric_name"] == "val_accuracy"
    assert best["metric"] == max(r["val_accuracy"] for r in log)

    test = qa_annotations.read_qa_annotations(_ann(synthetic_root, "qa_test.json"), synthetic_root)
    rows = _lines(out / "test_predictions.jsonl")
    assert [r["question_id"] for r in rows] == [r.question_id for r in test]
    answers = set(json.load(open(_ann(synthetic_root, "qa_answer_list.json"))))
    assert all(r["prediction"] in answers and r["correct"] == (r["prediction"] == r["answer"]) for r in rows)
    metrics = json.load(open(out / "test_metrics.json"))
    assert metrics["accuracy"] == pytest.approx(100 * sum(r["correct"] for r in rows) / len(rows))
    assert metrics["accuracy"] == second["accuracy"]
    assert set(metrics["per_type"]) == {r.answer_type for r in test}
    assert metrics["unlisted"] == 0 and metrics["ceiling"] == 100.0
    assert {"majority_train", "majority_test", "question_prior_train"} <= set(metrics)
    kinds = metrics["answer_kinds"]  # per asked type: the share of answers of that kind, from the rows
    assert set(kinds) == set(metrics["per_type"])
    for t, k in kinds.items():
        assert sum(k["confusion"].values()) == pytest.approx(100.0)
        assert 0.0 <= k["asked_kind"] <= 100.0


@pytest.mark.slow
def test_only_test_reproduces_the_best_weights_predictions_in_two_frame_orders(qa_run, synthetic_root, tmp_path):
    src, *_ = qa_run
    out = tmp_path / "only"
    args = ["--only_test", "--finetune", str(src / "checkpoint-best.pth"),
            "--test_data_path", _ann(synthetic_root, "qa_test.json")]
    result = run.main(_args(synthetic_root, out, *args, "--eval_frame_order", "none", "freeze"))
    assert [r["prediction"] for r in _lines(out / "test_predictions.jsonl")] == \
        [r["prediction"] for r in _lines(src / "test_predictions.jsonl")]
    assert set(result["frame_orders"]) == {"none", "freeze"}
    assert result["frame_orders"]["none"]["accuracy"] == result["accuracy"]
    with pytest.raises(ValueError, match="multiple of --num_frames 2"):
        run.main(_args(synthetic_root, out, *args, "--num_frames_test", "3"))

    motion = run.main(_args(synthetic_root, tmp_path / "motion", *args, "--answer_types", "direction", "size_change"))
    test = qa_annotations.read_qa_annotations(_ann(synthetic_root, "qa_test.json"), synthetic_root)
    asked = [r.question_id for r in test if r.answer_type in ("direction", "size_change")]
    assert 0 < len(asked) < len(test)
    assert [r["question_id"] for r in _lines(tmp_path / "motion" / "test_predictions.jsonl")] == asked
    assert set(motion["per_type"]) == {"direction", "size_change"}


def test_bad_set_ups_are_refused_with_the_reason(synthetic_root, svitt_ckpt, tmp_path):
    files = ["--data_path", _ann(synthetic_root, "qa_train.json"), "--finetune", svitt_ckpt]
    with pytest.raises(ValueError, match="--answer_list is required"):
        run.main(run.get_args_parser().parse_args(["--output_dir", str(tmp_path / "a"), *TINY, *files]))
    with pytest.raises(ValueError, match="not a QA model"):
        run.main(_args(synthetic_root, tmp_path / "b", *files, "--model", "svitt_tiny_patch16"))
    with pytest.raises(ValueError, match="share 8 videos"):
        run.main(_args(synthetic_root, tmp_path / "c", *files, "--val_data_path", _ann(synthetic_root, "qa_test.json"),
                       "--test_data_path", _ann(synthetic_root, "qa_test.json")))
    with pytest.raises(ValueError, match="qa_train.json: no question has answer_type weather"):
        run.main(_args(synthetic_root, tmp_path / "e", *files, "--answer_types", "weather"))
    with pytest.raises(ValueError, match="needs the weights"):
        run.main(_args(synthetic_root, tmp_path / "d", "--only_test", "--test_data_path",
                       _ann(synthetic_root, "qa_test.json")))
    with pytest.raises(ValueError, match="--freeze vision_encode: no parameter .* top-level modules: .*vision_encoder"):
        run.main(_args(synthetic_root, tmp_path / "f", *files, "--freeze", "vision_encode"))


def test_freeze_keeps_the_named_tower_at_its_initial_weights_and_trains_the_rest(synthetic_root, svitt_ckpt,
                                                                                 tmp_path, capsys):
    out = tmp_path / "frozen"
    run.main(_args(synthetic_root, out, "--data_path", _ann(synthetic_root, "qa_train.json"), "--finetune", svitt_ckpt,
                   "--epochs", "1", "--max_steps", "2", "--freeze", "vision_encoder"))
    assert "Frozen at their initial weights" in capsys.readouterr().out
    start = checkpoint.read_checkpoint_file(svitt_ckpt)["model"]
    after = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(out)))["model"]
    tower = [k for k in after if k.startswith("vision_encoder.") and k in start]
    assert tower and all(torch.equal(after[k], start[k]) for k in tower)
    trained = [k for k in after if k.startswith("text_encoder.") and k in start and after[k].dtype.is_floating_point]
    assert any(not torch.equal(after[k], start[k]) for k in trained)
    assert json.load(open(out / "args.json"))["freeze"] == ["vision_encoder"]
