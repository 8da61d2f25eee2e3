"""SimVTP's video QA model: answer loss, closed-list ranking, causal / padding masks, decoder initialisation from a
pre-training or retrieval checkpoint, registry."""
import pytest
import torch

import checkpoint
import model_registry
import modeling_simvtp as M
from conftest import randomised
from qa_inputs import ANSWERS, SMALL, brute_force_log_likelihood, padded, question_inputs


@pytest.fixture(scope="module")
def qa_model() -> M.SimVTPQA:
    return randomised(model_registry.create("simvtp_qa_tiny_patch16", **SMALL), 1, scale=0.2).eval()


def qa_batch(video, q_ids, q_mask, answers, owner, weights) -> dict:
    a_ids, a_mask = padded(answers)
    return dict(video=video, question_input_ids=q_ids, question_mask=q_mask, answer_ids=a_ids, answer_mask=a_mask,
                answer_weights=torch.tensor(weights), answer_to_question=torch.tensor(owner))


@pytest.mark.slow
def test_ranking_the_whole_list_equals_brute_force_log_likelihood(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded(ANSWERS)
    best, scores = qa_model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=len(ANSWERS))
    memory, memory_mask = qa_model.encode_question(video, q_ids, q_mask)
    assert memory.shape[1] == memory_mask.shape[1] == 4 + 5  # 1 x 2 x 2 tubes, then the question
    assert memory_mask[0].tolist() == [1] * 4 + [1, 1, 1, 0, 0]
    expected = torch.tensor([[brute_force_log_likelihood(qa_model, memory[q], memory_mask[q], a) for a in ANSWERS]
                             for q in range(2)])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(best, expected.argmax(1))
    _, top2 = qa_model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=2)
    assert (torch.isfinite(top2).sum(1) == 2).all()


def test_loss_is_the_weighted_nll_over_the_batch_and_trains_encoder_decoder_and_embeddings(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    answers, owner, weights = [ANSWERS[1], ANSWERS[0], ANSWERS[2]], [0, 0, 1], [0.75, 0.25, 1.0]
    with torch.no_grad():
        loss = qa_model(qa_batch(video, q_ids, q_mask, answers, owner, weights))["loss"]
        memory, memory_mask = qa_model.encode_question(video, q_ids, q_mask)
        nll = [-brute_force_log_likelihood(qa_model, memory[q], memory_mask[q], a) for a, q in zip(answers, owner)]
    assert loss.item() == pytest.approx(sum(w * n for w, n in zip(weights, nll)) / 2, rel=1e-4)

    model = model_registry.create("simvtp_qa_tiny_patch16", **SMALL).train()
    model(qa_batch(video, q_ids, q_mask, answers, owner, weights))["loss"].backward()
    for part in (model.encoder.patch_embed.proj.weight, model.encoder.blocks[0].attn.qkv.weight,
                 model.answer_decoder.layers[0].cross_attn.qkv.weight, model.answer_decoder.layers[-1].attn.q_bias,
                 model.text_embeddings.word_embeddings.weight, model.text_cls.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0


def test_decoder_is_causal_and_question_padding_is_masked(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    memory, memory_mask = qa_model.encode_question(video, q_ids, q_mask)
    a_ids, a_mask = padded([[150, 153, 154], [150, 153, 154]])
    a_ids[1, 3] = 170  # another third answer token
    logits = qa_model.decode(a_ids, a_mask, memory[:1].expand(2, -1, -1), memory_mask[:1].expand(2, -1))
    torch.testing.assert_close(logits[0, :3], logits[1, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0, 3:], logits[1, 3:])

    # question 0 has 3 real tokens: other ids or more padding behind them change nothing, nor does cutting it
    a_ids, a_mask = padded(ANSWERS)
    _, scores = qa_model.rank_answers(video[:1], q_ids[:1], q_mask[:1], a_ids, a_mask, k=len(ANSWERS))
    other = torch.cat([q_ids[:1], torch.full((1, 3), 250)], dim=1)
    other[0, 3:] = 200
    _, padded_scores = qa_model.rank_answers(video[:1], other, (torch.arange(8) < 3).long()[None], a_ids, a_mask,
                                             k=len(ANSWERS))
    _, cut_scores = qa_model.rank_answers(video[:1], q_ids[:1, :3], torch.ones(1, 3, dtype=torch.long), a_ids,
                                          a_mask, k=len(ANSWERS))
    torch.testing.assert_close(padded_scores, scores, rtol=0, atol=1e-4)
    torch.testing.assert_close(cut_scores, scores, rtol=0, atol=1e-4)


def test_a_pretraining_checkpoint_starts_the_decoder_from_the_top_encoder_blocks(tmp_path, capsys):
    pretrain = randomised(model_registry.create("simvtp_tiny_patch16", **SMALL), 3, scale=0.2)
    path = tmp_path / "pretrain.pth"
    torch.save({"model": pretrain.state_dict(), "model_cfg": pretrain.model_cfg}, path)
    qa = model_registry.create("simvtp_qa_tiny_patch16", **SMALL)
    report = checkpoint.load_pretrained(qa, str(path), strict=False)
    assert not report.missing and not report.unexpected  # pixel decoder, vtm_head, mask_token dropped by convert
    assert "simvtp_pretrain (answer decoder from the top encoder blocks; 34 tensors of its pixel decoder and " \
           "matching head dropped)" in capsys.readouterr().out
    src, own = pretrain.state_dict(), qa.state_dict()
    assert len(qa.encoder.blocks) == 4 and len(qa.answer_decoder.layers) == 2
    for i, block in enumerate((2, 3)):  # top blocks, in order
        for name, tensor in pretrain.encoder.blocks[block].state_dict().items():
            part, rest = name.split(".", 1)
            assert torch.equal(own[f"answer_decoder.layers.{i}.{name}"], tensor), (i, name)
            if part in ("attn", "norm1"):
                cross = {"attn": "cross_attn", "norm1": "cross_norm"}[part]
                assert torch.equal(own[f"answer_decoder.layers.{i}.{cross}.{rest}"], tensor), (i, name)
    for name in ("weight", "bias"):
        assert torch.equal(own[f"answer_decoder.norm.{name}"], src[f"encoder.norm.{name}"])
    for k in own:
        if k.startswith(("encoder.", "text_embeddings.", "text_cls.")):
            assert torch.equal(own[k], src[k]), k
    # our own QA checkpoint loads strictly, its decoder untouched by the copy
    saved = {k: v + 1 if k.startswith("answer_decoder.") else v for k, v in own.items()}
    mapped, kind = M.convert_state_dict(saved, qa)
    assert kind == "simvtp_qa" and checkpoint.load_weights(qa, mapped, strict=True).unexpected == []
    assert torch.equal(qa.answer_decoder.layers[0].mlp.fc1.weight, saved["answer_decoder.layers.0.mlp.fc1.weight"])


def test_a_retrieval_checkpoint_starts_qa_from_its_video_branch():
    dual = randomised(model_registry.create("simvtp_dual_tiny_patch16", **SMALL), 4, scale=0.2)
    qa = model_registry.create("simvtp_qa_tiny_patch16", **SMALL)
    mapped, kind = M.convert_state_dict(dual.state_dict(), qa)
    assert kind.startswith("simvtp_finetune (answer decoder from the top encoder blocks; ") and "text branch" in kind
    report = checkpoint.load_weights(qa, mapped, strict=False)
    assert sorted(report.missing) == ["text_cls.bias", "text_cls.weight"] and not report.unexpected
    video = dual.video_encoder
    assert torch.equal(qa.encoder.blocks[1].mlp.fc2.weight, video.blocks[1].mlp.fc2.weight)
    assert torch.equal(qa.answer_decoder.layers[1].cross_attn.qkv.weight, video.blocks[3].attn.qkv.weight)
    assert torch.equal(qa.encoder.norm.weight, video.fc_norm.weight)
    assert torch.equal(qa.text_embeddings.word_embeddings.weight, video.text_embeddings.word_embeddings.weight)


def test_qa_models_are_registered_as_the_pretraining_and_retrieval_models_qa_model():
    for size in ("tiny", "small", "base"):
        assert model_registry.model_spec(f"simvtp_{size}_patch16").qa_model == f"simvtp_qa_{size}_patch16"
        assert model_registry.model_spec(f"simvtp_dual_{size}_patch16").qa_model == f"simvtp_qa_{size}_patch16"
    assert model_registry.canonical_name("simvtp_qa_base_patch16_224") == "simvtp_qa_base_patch16"
    model = model_registry.create("simvtp_qa_tiny_patch16", **SMALL)
    assert isinstance(model, M.SimVTPQA) and model_registry.family_of(model).name == "simvtp"
    assert not model.takes_video_mask and model.text_masking is None and model.token_grid(2, 32, 32) == (1, 2, 2)
    assert not any(hasattr(model, part) for part in ("decoder", "vtm_head", "mask_token"))
    assert model.num_layers == 4 and model.no_weight_decay() == set()
    assert [model.layer_id(f"answer_decoder.layers.{i}.mlp.fc1.weight") for i in range(2)] == [3, 4]
    assert model.layer_id("answer_decoder.norm.weight") == model.layer_id("text_cls.weight") == 5
    assert model.layer_id("text_embeddings.word_embeddings.weight") == 0
    assert not any(callable(getattr(model, m, None)) for m in ("encode_video", "encode_text", "match_logits"))
    with pytest.raises(ValueError, match="answer_decoder_depth 5: between 1 and the encoder depth 4"):
        model_registry.create("simvtp_qa_tiny_patch16", answer_decoder_depth=5, **SMALL)
    import argparse
    parser = argparse.ArgumentParser()
    model_registry.add_model_args(parser, model="simvtp_qa_tiny_patch16", model_help="model")
    args = parser.parse_args(["--answer_decoder_depth", "1"])
    assert model_registry.model_kwargs(args, "simvtp_qa_tiny_patch16") == {"answer_decoder_depth": 1}


@pytest.mark.slow
def test_the_qa_collators_batch_trains_the_qa_model(synthetic_root):
    """The data side and the model agree on the batch: real synthetic clips and QA files, the real collator."""
    import qa_annotations
    import datasets
    import video_transforms
    tok = datasets.build_tokenizer()
    records = qa_annotations.read_qa_annotations(synthetic_root / "annotations" / "qa_train.json", synthetic_root)[:3]
    data = datasets.VideoQADataset(records, mode="train", num_frames=2, sampling_rate=2, input_size=32,
                                   sample_type="rand")
    batch = datasets.VideoQACollator(tok, max_q_len=25, max_a_len=5)([data[i] for i in range(3)])
    batch["video"] = video_transforms.normalize_video(batch["video"])
    model = model_registry.create("simvtp_qa_tiny_patch16", img_size=32, num_frames=2, vocab_size=len(tok)).train()
    loss = model(batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.answer_decoder.layers[0].cross_attn.qkv.weight.grad.abs().sum() > 0
    best, scores = model.rank_answers(batch["video"], batch["question_input_ids"], batch["question_mask"],
                                      batch["answer_ids"], batch["answer_mask"], k=2)
    assert best.shape == (3,) and scores.shape == (3, len(batch["answer_ids"]))
