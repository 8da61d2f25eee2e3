"""cross_modal_probe.py's word groups: which masked words the video should help with, and the figures per group
on a real pre-training checkpoint and the synthetic test list."""
import json
import os

import pytest

import cross_modal_probe
import datasets
import synthetic_dataset


def test_word_groups_map_one_piece_words_to_their_group_and_leave_split_words_to_the_rest():
    tokenizer = datasets.build_tokenizer()
    ids = cross_modal_probe.token_groups(tokenizer, {"colour": ["red", "violet"], "motion": ["left", "leftward"],
                                                     "again": ["red"]})
    red, violet, left = (tokenizer.convert_tokens_to_ids(w) for w in ("red", "violet", "left"))
    assert ids == {red: "colour", violet: "colour", left: "motion"}  # "leftward" is two pieces; "red" stays colour


def test_synthetic_groups_cover_the_grammar_words_that_only_the_video_gives():
    groups = synthetic_dataset.word_groups()
    assert set(groups) == {"colour", "shape", "size", "motion"}
    assert {"red", "violet", "grey"} <= set(groups["colour"]) and "disc" in groups["shape"]
    assert {"rises", "leftward", "dwindles"} <= set(groups["motion"]) and "background" not in sum(groups.values(), [])
    assert cross_modal_probe.read_word_groups("synthetic") == groups


def test_a_bad_groups_file_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        cross_modal_probe.read_word_groups(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    for text, message in (("{", "not JSON"), ('["red"]', "JSON object of word lists"),
                          ('{"other": ["a"]}', "is the probe's")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            cross_modal_probe.read_word_groups(str(bad))


@pytest.mark.slow
def test_figures_per_group_add_up_to_the_overall_ones(pretrained_checkpoint, synthetic_root, tmp_path):
    groups_file = tmp_path / "groups.json"
    groups_file.write_text(json.dumps(synthetic_dataset.word_groups()))
    args = cross_modal_probe.get_args_parser().parse_args(
        ["--ckpt", pretrained_checkpoint, "--data_path", os.path.join(synthetic_root, "annotations", "test.json"),
         "--data_root", str(synthetic_root), "--batch_size", "4", "--word_groups", str(groups_file)])
    figures = cross_modal_probe.main(args)
    counts = {k.split("/")[1]: v for k, v in figures.items() if k.startswith("masked_words/")}
    assert "other" in counts and sum(counts.values()) == figures["masked_words"]
    assert set(counts) - {"other"} <= {"colour", "shape", "size", "motion"} and len(counts) >= 2
    for cond in cross_modal_probe.CONDITIONS:
        weighted = sum(figures[f"word_top1_{cond}/{g}"] * n for g, n in counts.items()) / figures["masked_words"]
        assert weighted == pytest.approx(figures[f"word_top1_{cond}"], abs=1e-6)
    table = cross_modal_probe.format_word_groups(figures)
    assert table.splitlines()[0].split()[-2:] == ["no", "video"] and len(table.splitlines()) == len(counts) + 1
