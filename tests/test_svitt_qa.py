"""SViTT's video QA model: answer loss, closed-list ranking, clip ensembling, decoder initialisation, release keys."""
import pytest
import torch

import answer_ranking
import checkpoint
import modeling_svitt as S
import svitt_weights
from conftest import randomised
from qa_inputs import ANSWERS, CLS, SMALL, brute_force_log_likelihood, padded, question_inputs
from svitt_release import release_keys, seeded_state_dict
from test_svitt import sdpa_recorder


@pytest.fixture(scope="module")
def qa_model() -> S.SViTTQA:
    torch.manual_seed(0)
    return randomised(S.svitt_qa_tiny_patch16(**SMALL), 1, scale=0.2).eval()


@pytest.mark.slow
def test_top_k_then_full_likelihood_equals_brute_force_when_k_is_the_list(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded(ANSWERS)
    best, scores = qa_model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=len(ANSWERS))
    states = qa_model.encode_question(video, q_ids, q_mask)
    expected = torch.tensor([[brute_force_log_likelihood(qa_model, states[q], q_mask[q], a) for a in ANSWERS]
                             for q in range(2)])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(best, expected.argmax(1))


def test_top_k_keeps_the_answers_with_the_likeliest_first_token(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded(ANSWERS)
    _, full = qa_model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=len(ANSWERS))
    best, scores = qa_model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=2)
    states = qa_model.encode_question(video, q_ids, q_mask)
    start = torch.full((2, 1), CLS)
    first = qa_model.decode(start, torch.ones_like(start), states, q_mask)[:, 0].log_softmax(-1)[:, a_ids[:, 1]]
    for q in range(2):
        kept = torch.isfinite(scores[q]).nonzero().flatten()
        assert set(kept.tolist()) == set(first[q].topk(2).indices.tolist())
        torch.testing.assert_close(scores[q, kept], full[q, kept])
        assert best[q] == kept[scores[q, kept].argmax()]


def test_loss_is_the_weighted_answer_nll_over_the_batch(qa_model):
    video, q_ids, q_mask = question_inputs(2)
    answers, owner, weights = [ANSWERS[1], ANSWERS[0], ANSWERS[2]], [0, 0, 1], [0.75, 0.25, 1.0]
    a_ids, a_mask = padded(answers)
    batch = dict(video=video, question_input_ids=q_ids, question_mask=q_mask, answer_ids=a_ids, answer_mask=a_mask,
                 answer_weights=torch.tensor(weights), answer_to_question=torch.tensor(owner))
    loss = qa_model(batch)["loss"]
    states = qa_model.encode_question(video, q_ids, q_mask)
    nll = [-brute_force_log_likelihood(qa_model, states[q], q_mask[q], a) for a, q in zip(answers, owner)]
    assert loss.item() == pytest.approx(sum(w * n for w, n in zip(weights, nll)) / 2, rel=1e-4)


def test_loss_trains_the_decoder_and_both_towers():
    model = S.svitt_qa_tiny_patch16(**SMALL).train()
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded([ANSWERS[0], ANSWERS[3]])
    model(dict(video=video, question_input_ids=q_ids, question_mask=q_mask, answer_ids=a_ids, answer_mask=a_mask,
               answer_weights=torch.ones(2), answer_to_question=torch.arange(2)))["loss"].backward()
    for part in (model.vision_encoder.embeddings.cls_token, model.text_encoder.bert.encoder.layer[-1]
                 .crossattention.self.key.weight, model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight):
        assert part.grad is not None and part.grad.abs().sum() > 0



def test_text_fusion_and_decoder_attention_get_boolean_masks_only_where_keys_are_padded(qa_model, monkeypatch):
    """Every SDPA call of the question pass (text layers, fusion layers) and of the answer decoder: a boolean mask
    (True = may attend: the memory-efficient kernel on CUDA) on the text's key padding and the decoder's causal +
    padding, none on the cross-attention to the video tokens (all real: the flash kernel on CUDA)."""
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded(ANSWERS)
    tokens = qa_model.video_tokens(video)
    calls = sdpa_recorder(monkeypatch)
    with torch.no_grad():
        states = qa_model.encode_question(None, q_ids, q_mask, video_tokens=tokens)
        question_calls = list(calls)
        calls.clear()
        qa_model.decode(a_ids, a_mask, states[:1].expand(len(a_ids), -1, -1), q_mask[:1].expand(len(a_ids), -1))
    text_keys = q_mask.bool()[:, None, None]
    fusion = qa_model.text_encoder.config.fusion_layer
    kinds = ["self"] * fusion + ["self", "video"] * (len(qa_model.text_encoder.bert.encoder.layer) - fusion)
    assert len(question_calls) == len(kinds)
    for kind, (q, k, mask) in zip(kinds, question_calls):
        if kind == "video":
            assert mask is None and k.shape[2] == tokens.shape[1]
        else:
            assert mask.dtype == torch.bool and torch.equal(mask, text_keys)
    causal = torch.ones(a_ids.shape[1], a_ids.shape[1]).tril().bool()[None] & a_mask.bool()[:, None, :]
    assert len(calls) == 2 * len(qa_model.text_decoder.bert.encoder.layer)
    for (_, _, self_mask), (_, _, question_mask) in zip(calls[::2], calls[1::2]):
        assert self_mask.dtype == question_mask.dtype == torch.bool
        assert torch.equal(self_mask, causal[:, None])
        assert torch.equal(question_mask, text_keys[:1].expand_as(question_mask))

def test_release_scorings_add_the_first_token_term(qa_model):
    """The SViTT release's rank_answer (models/model_vqa.py:154-159) adds log p(first token) to a log-likelihood
    that already holds it (release_concat); its configured rank_answer_ensemble softmaxes the first-token
    probabilities again (lines 228, 242) and adds that log (release). The default adds nothing."""
    video, q_ids, q_mask = question_inputs(2)
    a_ids, a_mask = padded(ANSWERS)
    states = qa_model.encode_question(video, q_ids, q_mask)
    _, ours = answer_ranking.rank_by_decoder(qa_model, states, q_mask, a_ids, a_mask, k=3)
    _, concat = answer_ranking.rank_by_decoder(qa_model, states, q_mask, a_ids, a_mask, k=3,
                                               scoring="release_concat")
    _, release = answer_ranking.rank_by_decoder(qa_model, states, q_mask, a_ids, a_mask, k=3, scoring="release")
    start = torch.full((2, 1), CLS)
    first = qa_model.decode(start, torch.ones_like(start), states, q_mask)[:, 0].log_softmax(-1)
    kept = torch.isfinite(ours)
    assert torch.equal(kept, torch.isfinite(concat)) and torch.equal(kept, torch.isfinite(release))
    assert kept.sum() == 6
    torch.testing.assert_close(concat[kept], (ours + first[:, a_ids[:, 1]])[kept], atol=1e-5, rtol=1e-5)
    twice = first.exp().softmax(-1)[:, a_ids[:, 1]].log()
    torch.testing.assert_close(release[kept], (ours + twice)[kept], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one of likelihood, release"):
        answer_ranking.rank_by_decoder(qa_model, states, q_mask, a_ids, a_mask, k=3, scoring="albef")


def test_clip_ensembling():
    ensemble = answer_ranking.ensemble_clip_scores
    scores = torch.tensor([[[0.0, -1.0, float("-inf")]], [[-2.0, -1.0, -3.0]]])  # 2 clips, 1 question, 3 answers
    torch.testing.assert_close(ensemble(scores, "max"), torch.tensor([[0.0, -1.0, -3.0]]))
    torch.testing.assert_close(ensemble(scores, "mean"), torch.tensor([[-1.0, -1.0, float("-inf")]]))
    lse = torch.tensor([[torch.tensor([0.0, -2.0]).logsumexp(0), torch.tensor([-1.0, -1.0]).logsumexp(0), -3.0]])
    torch.testing.assert_close(ensemble(scores, "lse"), lse)
    with pytest.raises(ValueError, match="one of lse, mean, max"):
        ensemble(scores, "median")


@pytest.mark.slow
def test_pretraining_checkpoint_initialises_the_decoder_from_the_fusion_layers():
    pretrain = randomised(S.svitt_tiny_patch16(**SMALL), 3, scale=0.2)
    source = pretrain.state_dict()
    qa = S.svitt_qa_tiny_patch16(**SMALL)
    mapped, kind = svitt_weights.convert_state_dict(source, qa)
    assert kind == ("svitt_pretrain (answer decoder from the fusion layers) (its MLM head dropped: 7 tensors this "
                    "model has no use for)")
    report = checkpoint.load_weights(qa, mapped, strict=False)
    assert not report.missing
    assert all(k.startswith(("vision_proj.", "text_proj.", "itm_head.", "temp", "vision_encoder.pooler.",
                             "text_encoder.cls.")) for k in report.unexpected)
    own = qa.state_dict()
    fusion = qa.text_encoder.config.fusion_layer
    assert len(qa.text_decoder.bert.encoder.layer) == 2 and fusion == 2
    for i in range(2):
        for rest, tensor in pretrain.text_encoder.bert.encoder.layer[fusion + i].state_dict().items():
            assert torch.equal(own[f"text_decoder.bert.encoder.layer.{i}.{rest}"], tensor), (i, rest)
    for part in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.LayerNorm.weight",
                 "cls.predictions.transform.dense.weight", "cls.predictions.bias"):
        assert torch.equal(own["text_decoder." + part], source["text_encoder." + part])
    assert torch.equal(own["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"],
                       source["text_encoder.bert.encoder.layer.3.crossattention.self.key.weight"])


def test_decoder_copy_on_a_state_dict_keeps_an_existing_decoder():
    state = {"text_encoder.bert.encoder.layer.9.output.dense.bias": torch.ones(2),
             "text_encoder.bert.encoder.layer.8.output.dense.bias": torch.zeros(2),
             "text_encoder.bert.encoder.layer.11.attention.self.query.bias": torch.full((2,), 3.0),
             "text_encoder.bert.embeddings.position_embeddings.weight": torch.full((2,), 4.0),
             "text_decoder.bert.encoder.layer.2.attention.self.query.bias": torch.full((2,), 5.0)}
    out = svitt_weights.decoder_from_fusion_layers(state, fusion_layer=9, decoder_depth=3)
    assert set(out) - set(state) == {"text_decoder.bert.encoder.layer.0.output.dense.bias",
                                     "text_decoder.bert.embeddings.position_embeddings.weight"}
    assert out["text_decoder.bert.encoder.layer.0.output.dense.bias"] is state[
        "text_encoder.bert.encoder.layer.9.output.dense.bias"]
    assert out["text_decoder.bert.encoder.layer.2.attention.self.query.bias"][0] == 5.0


@pytest.mark.slow
def test_release_qa_state_dict_loads_strictly_into_the_base_qa_model():
    keys = release_keys("qa")
    release = seeded_state_dict(keys, seed=5)
    model = S.svitt_qa_base_patch16_224()
    mapped, kind = svitt_weights.convert_state_dict(release, model)
    assert kind == "svitt_qa" and svitt_weights.recognise_release(list(release)) == "svitt_qa_base_patch16_224"
    report = checkpoint.load_weights(model, mapped, strict=True)
    assert not report.missing and not report.unexpected
    own = model.state_dict()
    assert torch.equal(own["text_encoder.bert.encoder.layer.9.crossattention.self.key.weight"],
                       release["text_encoder.encoder.layer.9.crossattention.self.key.weight"])
    assert torch.equal(own["text_decoder.bert.encoder.layer.2.crossattention.self.value.bias"],
                       release["text_decoder.bert.encoder.layer.2.crossattention.self.value.bias"])
    rebuilt = {k for k, _ in keys if k.endswith(svitt_weights.REBUILT_BUFFERS)}
    assert len(own) == len(keys) - len(rebuilt)


def test_qa_models_are_registered_and_take_the_family_flags():
    import argparse

    import model_registry
    from timm.models import list_models
    assert {"svitt_qa_tiny_patch16", "svitt_qa_base_patch16_224"} <= set(list_models("svitt_qa*"))
    parser = argparse.ArgumentParser()
    model_registry.add_model_args(parser, model="svitt_qa_tiny_patch16", model_help="model")
    args = parser.parse_args(["--token_keep_rate", "0.6", "--token_drop_loc", "1", "--fusion_layer", "1"])
    args.num_frames, args.input_size = 2, 32
    model = model_registry.create("svitt_qa_tiny_patch16", vocab_size=300,
                                  **model_registry.model_kwargs(args, "svitt_qa_tiny_patch16"))
    assert isinstance(model, S.SViTTQA) and model_registry.family_of(model).name == "svitt"
    assert model.vision_encoder.config.token_keep_rate == 0.6 and model.vision_encoder.config.num_frames == 2
    assert len(model.text_decoder.bert.encoder.layer) == 3  # the text tower's fusion layers 1, 2, 3
    assert [model.layer_id(f"text_decoder.bert.encoder.layer.{i}.output.dense.weight") for i in range(3)] == \
        [model.layer_id(f"text_encoder.bert.encoder.layer.{i}.output.dense.weight") for i in (1, 2, 3)] == [2, 3, 4]


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
    model = S.svitt_qa_tiny_patch16(img_size=32, num_frames=2, vocab_size=len(tok)).train()
    loss = model(batch)["loss"]
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad.abs().sum() > 0
