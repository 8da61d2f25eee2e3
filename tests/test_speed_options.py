"""The method options that cut work (issue 15), each off by default: decoder masking (--decode_fraction), one
matching negative per pair (--vtm_negatives_per_pair 1) and compiled blocks (--compile_blocks). Each keeps the
loss finite and the checkpoint loadable; the first two do what they say on the tensors."""
import json
import os

import torch

import checkpoint
import model_registry
import run_simvtp_pretraining
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


def test_the_options_train_and_leave_a_checkpoint_that_loads(synthetic_root, tmp_path):
    out = tmp_path / "fast"
    result = run_simvtp_pretraining.main(_args(synthetic_root, out, "--epochs", "1", "--decode_fraction", "0.5",
                                               "--vtm_negatives_per_pair", "1", "--compile_blocks"))
    lines = [json.loads(x) for x in open(out / "log.txt")]
    assert lines and all(torch.isfinite(torch.tensor(x["loss"])) for x in lines if "loss" in x)
    saved = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(out)))
    assert not any("_orig_mod" in k for k in saved["model"])  # compiled in place: plain names
    fresh = model_registry.create("simvtp_tiny_patch16", **TINY)
    assert fresh.load_state_dict(saved["model"], strict=True)
    assert saved["model_cfg"]["kwargs"]["decode_fraction"] == 0.5 and result is not None
