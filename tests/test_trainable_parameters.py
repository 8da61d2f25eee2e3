"""Every model a task trains uses all its trainable parameters in that task: DDP (find_unused_parameters off)
waits for a gradient of each and stops at the second step otherwise ("Expected to have finished reduction").
One forward + backward of each (family, task) a recipe trains, on a batch the task's real collator builds, the
model built by the task's own entry point with recipe-like flags at tiny size."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import datasets
import engine_for_pretraining
import masking_generator
import model_registry
import engine_for_retrieval
import run_simvtp_finetuning
import run_simvtp_pretraining
import engine_for_qa
import run_simvtp_qa

CLIP = ["--num_frames", "4", "--input_size", "32", "--drop_path", "0.1", "--device", "cpu"]
FAMILIES = {  # pre-training model, and its family's recipe flags (edge + node sparsity, text-guided selection)
    "simvtp": ("simvtp_tiny_patch16", []),
    "svitt": ("svitt_tiny_patch16", ["--attn_block_size", "4", "--sparse_random_attn", "1", "--token_keep_rate",
                                     "0.5", "--token_drop_loc", "1"]),
}
QA_FLAGS = {"simvtp": [], "svitt": ["--fusion_keep_rate", "0.5", "--fusion_drop_loc", "2"]}
CAPTIONS = ["a red circle moves left", "a blue square", "the grey disc turns slowly around", "two dots"]


@pytest.fixture(scope="module")
def tokenizer():
    return datasets.build_tokenizer()


def _video(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(i)
    return torch.randint(0, 256, (3, 4, 32, 32), dtype=torch.uint8, generator=g)


def _text_batch(model: torch.nn.Module, tokenizer, masked_words: bool) -> dict:
    """VideoTextCollator's batch for the model's data needs: its video mask, its MLM captions when `masked_words`."""
    items = [{"video": _video(i), "caption": c, "index": i, "epoch": 0} for i, c in enumerate(CAPTIONS)]
    if model.takes_video_mask:
        masker = masking_generator.build_mask_generator("tube", model.token_grid(4, 32, 32), 0.75)
        for i, it in enumerate(items):
            it["video_mask"] = masker(np.random.default_rng(i))
    ratio = model.default_text_mask_ratio if masked_words and model.text_masking else None
    return datasets.VideoTextCollator(tokenizer, text_mask_ratio=ratio, text_mask_mode=model.text_masking or "mask")(
        items)


def _qa_batch(tokenizer) -> dict:
    answers = [["left"], ["blue", "square"], ["slowly"], ["two"]]
    items = [{"video": _video(i), "question": f"what about {c}?", "answers": a, "weights": [1 / len(a)] * len(a),
              "question_id": i, "index": i, "epoch": 0} for i, (c, a) in enumerate(zip(CAPTIONS, answers))]
    return datasets.VideoQACollator(tokenizer)(items)


def _build(family: str, task: str, vocab_size: int) -> torch.nn.Module:
    """The model the task's entry point trains, from the recipe-like flags (the pre-training model's name given
    to pre-training and retrieval fine-tuning, its registered QA model to QA fine-tuning)."""
    pretrain, flags = FAMILIES[family]
    if task == "pretrain":
        args = run_simvtp_pretraining.get_args_parser().parse_args(["--model", pretrain, "--data_path", "-", *CLIP,
                                                                    *flags])
        return engine_for_pretraining.build_model(args, vocab_size)
    if task == "retrieval":
        args = run_simvtp_finetuning.get_args_parser().parse_args(["--model", pretrain, *CLIP, *flags])
        return engine_for_retrieval.build_for_training(args, vocab_size)
    qa_model = model_registry.model_spec(pretrain).qa_model
    args = run_simvtp_qa.get_args_parser().parse_args(["--model", qa_model, *CLIP, *flags, *QA_FLAGS[family]])
    return engine_for_qa.build_for_training(args, vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["pretrain", "retrieval", "qa"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_one_step_of_every_task_gives_every_trainable_parameter_a_gradient(family, task, tokenizer):
    """Before: SViTT retrieval fine-tuning kept the MLM head (text_encoder.cls.*) its batches never use."""
    torch.manual_seed(0)
    model = _build(family, task, len(tokenizer)).train()
    batch = _qa_batch(tokenizer) if task == "qa" else _text_batch(model, tokenizer, masked_words=task == "pretrain")
    out = model(engine_for_pretraining.move_batch(batch, torch.device("cpu")))
    out["loss"].backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{model.model_cfg['name']} ({task}) leaves without gradient: {unused}"


@pytest.mark.slow
def test_a_pretraining_file_loads_strictly_into_the_retrieval_model_its_mlm_head_reported_dropped(tmp_path, capsys):
    import checkpoint
    small = dict(img_size=32, num_frames=4, vocab_size=300)
    pretrain = model_registry.create("svitt_tiny_patch16", **small)
    path = str(tmp_path / "pretrain.pth")
    checkpoint.save_atomic({"model": pretrain.state_dict(), "model_cfg": pretrain.model_cfg}, path)
    retrieval = checkpoint.build_model_from(checkpoint.read_checkpoint_file(path), path,
                                            name="svitt_retrieval_tiny_patch16", strict=True)
    assert "its MLM head dropped: 7 tensors" in capsys.readouterr().out
    assert not any(n.startswith("text_encoder.cls.") for n in retrieval.state_dict())
    own = retrieval.state_dict()
    assert all(torch.equal(own[k], v) for k, v in pretrain.state_dict().items() if k in own)
    from svitt_release import release_keys  # a release retrieval file names no model: its keys identify it
    recognise = model_registry.family_of(retrieval).recognise
    assert recognise([k for k, _ in release_keys("retrieval")]) == "svitt_retrieval_base_patch16_224"


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_pretraining_without_masked_words_or_tubes_is_refused_at_start_up(family):
    """Before: SViTT pre-trained without MLM captions (its head idle: DDP stopped at step 2), SimVTP failed on the
    missing captions or reconstructed no tube (NaN)."""
    pretrain, flags = FAMILIES[family]

    def check(*extra: str) -> None:
        args = run_simvtp_pretraining.get_args_parser().parse_args(
            ["--model", pretrain, "--data_path", "-", *CLIP, *flags, *extra])
        model = model_registry.create(pretrain, **model_registry.model_kwargs(args, pretrain, vocab_size=64))
        args.text_mask_ratio = model.default_text_mask_ratio if args.text_mask_ratio is None else args.text_mask_ratio
        engine_for_pretraining.check_masks(args, model)

    check()  # the defaults mask both
    with pytest.raises(ValueError, match="--text_mask_ratio 0.0: .* learns masked words"):
        check("--text_mask_ratio", "0")
    if family == "simvtp":  # 2x2 tubes a slice: a ratio of 0.2 masks none
        with pytest.raises(ValueError, match="--mask_ratio 0.2 masks no tube of simvtp_tiny_patch16's 2x2x2"):
            check("--mask_ratio", "0.2")
