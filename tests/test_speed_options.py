"""The method options that cut work (issue 15), each off by default: decoder masking (--decode_fraction), one
matching negative per pair (--vtm_negatives_per_pair 1), compiled blocks (--compile_blocks) and repeated sampling
(--clips_per_video). Each keeps the loss finite and the checkpoint loadable; each does what it says on the tensors
or, for repeated sampling, on the real synthetic mp4s."""
import json
import os

import pytest
import torch

import annotations
import checkpoint
import datasets
import masking_generator
import model_registry
import run_simvtp_pretraining
from layers import sample_negatives
from test_pretraining import _args

TINY = dict(img_size=32, num_frames=4, vocab_size=30522)


def _batch(b: int = 4, n: int = 8, mask_ratio: float = 0.75) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (b, 12), generator=g)
    masked = int(mask_ratio * n)
    video_mask = torch.stack([torch.randperm(n, generator=g) < masked for _ in range(b)])
    return {"video": torch.randn(b, 3, 4, 32, 32, generator=g), "video_mask": video_mask, "input_ids": ids,
            "attention_mask": torch.ones_like(ids), "mlm_input_ids": ids.clone(),
            "mlm_labels": torch.where(torch.rand(ids.shape, generator=g) < 0.5, ids, -100)}


def test_decoder_masking_decodes_the_asked_share_of_the_masked_tubes_only():
    model = model_registry.create("simvtp_tiny_patch16", decode_fraction=0.5, **TINY)
    video_mask = _batch()["video_mask"]
    chosen = model.tubes_to_decode(video_mask)
    assert (chosen & ~video_mask).sum() == 0  # only masked tubes
    assert chosen.sum(1).tolist() == [3] * 4  # half of the 6 masked tubes of each clip, the same count per clip
    assert model_registry.create("simvtp_tiny_patch16", **TINY).tubes_to_decode(video_mask) is video_mask


def test_one_negative_per_pair_halves_the_matching_negatives():
    torch.manual_seed(0)
    seen = {}
    for per_pair in (1, 2):
        model = model_registry.create("simvtp_tiny_patch16", vtm_negatives_per_pair=per_pair, **TINY)
        model.vtm_head.register_forward_hook(lambda m, i, o, k=per_pair: seen.setdefault(k, []).append(len(o)))
        out = model(_batch())
        assert torch.isfinite(out["loss"])
    assert seen == {1: [4, 4], 2: [4, 8]}  # positives, then the negatives: B with one per pair, 2B with two


@pytest.mark.slow
def test_the_options_train_and_leave_a_checkpoint_that_loads(synthetic_root, tmp_path):
    """The blocks are traced by Dynamo and AOTAutograd as with inductor, without its C++ code generation (a
    minute on a cold cache, as CI always is); what is ours, the tracing and the in-place names, is the same."""
    out = tmp_path / "fast"
    result = run_simvtp_pretraining.main(_args(synthetic_root, out, "--epochs", "1", "--decode_fraction", "0.5",
                                               "--vtm_negatives_per_pair", "1", "--compile_blocks",
                                               "--compile_backend", "aot_eager", "--clips_per_video", "2"))
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert lines and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    assert len(result["history"]) == 24 // 4  # as many steps as one clip per video: 24 videos, 4 clips a step
    saved = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(out)))
    assert not any("_orig_mod" in k for k in saved["model"])  # compiled in place: plain names
    fresh = model_registry.create("simvtp_tiny_patch16", **TINY)
    assert fresh.load_state_dict(saved["model"], strict=True)
    assert saved["model_cfg"]["kwargs"]["decode_fraction"] == 0.5 and result is not None


def _train_set(synthetic_root, clips_per_video: int) -> datasets.VideoTextDataset:
    records = annotations.read_annotations(os.path.join(synthetic_root, "annotations", "pretrain.json"), synthetic_root)
    return datasets.VideoTextDataset(records, num_frames=4, sampling_rate=2, input_size=32, seed=5,
                                     clips_per_video=clips_per_video,
                                     mask_generator=masking_generator.build_mask_generator("tube", (2, 4, 4), 0.75))


def test_repeated_sampling_gives_each_video_once_per_c_epochs_and_c_clips_per_read(synthetic_root):
    single, repeated = _train_set(synthetic_root, 1), _train_set(synthetic_root, 2)
    assert len(single) == 24 and len(repeated) == 12
    read = []
    for epoch in (0, 1):
        repeated.set_epoch(epoch)
        read += [repeated.record_of(i) for i in range(len(repeated))]
    assert sorted(read) == list(range(24))  # every video once over C = 2 epochs, half of them each epoch
    repeated.set_epoch(1)
    item = repeated[3]
    single.set_epoch(1)
    alone = single[item["index"]]
    assert item["video"].shape == (2, 3, 4, 32, 32) and item["video_mask"].shape == (2, 32)
    assert item["match_id"] == item["index"] == repeated.record_of(3) and item["caption"] == alone["caption"]
    assert torch.equal(item["video"][0], alone["video"]) and torch.equal(item["video_mask"][0], alone["video_mask"])
    assert not torch.equal(item["video"][0], item["video"][1])  # its own frames and crop
    assert not torch.equal(item["video_mask"][0], item["video_mask"][1])


def test_the_collator_gives_each_clip_a_row_and_its_own_text_mask(synthetic_root):
    dataset = _train_set(synthetic_root, 2)
    collate = datasets.VideoTextCollator(datasets.build_tokenizer(), max_text_len=32, text_mask_ratio=0.5, seed=0)
    batch = collate([dataset[0], dataset[1]])
    ids = [dataset.record_of(0)] * 2 + [dataset.record_of(1)] * 2
    assert batch["video"].shape[0] == 4 and batch["num_items"] == 2 and batch["index"].tolist() == ids
    assert batch["match_id"].tolist() == ids and int(batch["videos_read"]) == 2
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])  # one caption per video
    assert not torch.equal(batch["mlm_input_ids"][0], batch["mlm_input_ids"][1])


def test_matching_negatives_never_pair_clips_of_one_video():
    torch.manual_seed(0)
    sim = torch.randn(6, 6)
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    for hard in (True, False):
        drawn = torch.stack([sample_negatives(sim, hard, ids) for _ in range(200)])
        assert not (ids[drawn] == ids[None, :]).any()
    alone = torch.stack([sample_negatives(sim, True, torch.zeros(6, dtype=torch.long)) for _ in range(50)])
    assert not (alone == torch.arange(6)).any()  # one video only: any other clip, never the pair itself


def test_clips_per_video_must_divide_the_batch(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="--clips_per_video 3 must be >= 1 and divide --batch_size 4"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--clips_per_video", "3"))


def test_a_compile_backend_without_compiled_blocks_is_refused(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="--compile_backend aot_eager only applies with --compile_blocks"):
        run_simvtp_pretraining.main(_args(synthetic_root, tmp_path, "--compile_backend", "aot_eager"))
    assert not os.path.exists(tmp_path / "args.json")  # refused before the run started
