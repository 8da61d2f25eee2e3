"""cross_modal_probe.py's word groups: which masked words the video should help with, and the figures per group
on a real pre-training checkpoint and the synthetic test list."""
import json
import os

import pytest
import torch

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
    assert figures["high_contrast_tubes"] >= figures["clips"]  # a quarter of the masked tubes, ties included
    for suffix in ("", "/high_contrast"):  # predicting each tube's mean scores below 1 in normalised pixels
        assert 0.5 < figures[f"pixel_mse_mean{suffix}"] < 1.0
    assert cross_modal_probe.format_pixels(figures).splitlines()[2].split()[0] == "all"
    named = set(counts) - {"other"}
    for group in named:
        assert figures[f"group_choices/{group}"] == sum(
            1 for g in cross_modal_probe.token_groups(datasets.build_tokenizer(), synthetic_dataset.word_groups())
            .values() if g == group)
        for cond in cross_modal_probe.CONDITIONS:  # the vocabulary's top 1, when right, is the group's top 1 too
            assert figures[f"word_in_group_{cond}/{group}"] >= figures[f"word_top1_{cond}/{group}"]
    assert not any(k.endswith("/other") and k.startswith("word_in_group") for k in figures)
    table = cross_modal_probe.format_word_groups(figures).splitlines()
    assert table[1].split()[-2:] == ["no", "video"] and table[len(counts) + 3].split()[-1] == "chance"
    assert len(table) == len(counts) + len(named) + 4


def test_the_choice_within_a_group_picks_the_groups_best_scored_word():
    red, blue, circle, other = 5, 6, 7, 8
    group_of = {red: "colour", blue: "colour", circle: "shape"}
    labels = torch.tensor([[red, -100, blue], [circle, other, -100]])
    logits = torch.zeros(4, 10)
    logits[0, [red, blue, other]] = torch.tensor([2.0, 1.0, 3.0])  # red: wrong in the vocabulary, right among colours
    logits[1, [red, blue]] = torch.tensor([2.0, 1.0])  # blue: wrong among colours
    logits[2, circle] = 1.0  # circle: right in both (the only shape)
    logits[3, other] = 1.0  # a word of no group: right in the vocabulary
    by_group = {}
    members = cross_modal_probe.group_members(group_of)
    assert {g: sorted(ids.tolist()) for g, ids in members.items()} == {"colour": [red, blue], "shape": [circle]}
    cross_modal_probe._count_by_group(by_group, {c: logits for c in cross_modal_probe.CONDITIONS}, labels, group_of,
                                      members)
    assert by_group["colour"]["words"] == 2 and by_group["colour"]["own"] == 0
    assert by_group["colour"]["in_group_own"] == 1
    assert by_group["shape"]["own"] == 1 and by_group["shape"]["in_group_own"] == 1
    assert by_group["other"]["own"] == 1 and by_group["other"]["in_group_own"] == 0


def test_the_pixel_figures_split_off_the_quarter_of_the_tubes_with_the_most_contrast():
    errors = {"own": torch.arange(1.0, 9.0), "mean": torch.ones(8)}
    contrast = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.3, 0.4, 0.5, 0.6])
    figures = cross_modal_probe._pixel_figures(errors, contrast)
    assert figures["pixel_mse_own"] == pytest.approx(4.5) and figures["pixel_mse_mean"] == pytest.approx(1.0)
    assert figures["high_contrast_tubes"] == 2 and figures["pixel_mse_own/high_contrast"] == pytest.approx(3.0)
