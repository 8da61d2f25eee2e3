"""modeling_svitt.py: the SViTT pre-training model. The contrastive loss with several captions per video, hard
negatives that never pair a video with itself, text-guided token selection in the fusion layers, the model
contract (losses and gradients, encoders, matching with a cached video side, fixed random blocks at evaluation).
(The 2-process contrastive gradient against one process on the concatenated batch: test_distributed.py, in its
one spawn of gloo ranks.)"""
import pytest
import torch
import torch.nn.functional as F

import layers
import model_registry
import modeling_svitt as S
from layers import sample_negatives

# every part switched on at a size that runs in a second: 4 frames of 32 px (16 patches), blocks of 4 tokens
TINY = dict(img_size=32, num_frames=4, vocab_size=64, attn_block_size=4, sparse_random_attn=1,
            token_keep_rate=0.5, token_drop_loc=(1,), fusion_keep_rate=0.5, fusion_drop_loc=(2,))


def tiny_model(**kw) -> S.SViTTPretrain:
    torch.manual_seed(0)
    return model_registry.create("svitt_tiny_patch16", **{**TINY, **kw})


def batch(b: int = 4, video_ids=(0, 0, 1, 2)) -> dict:
    """Captions of uneven length (padding), one masked word each; rows 0 and 1 show the same video."""
    g = torch.Generator().manual_seed(3)
    lengths = [6, 4, 5, 3][:b]
    ids = torch.zeros(b, 6, dtype=torch.long)
    mask = torch.zeros(b, 6, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 64, (n,), generator=g)
        mask[i, :n] = 1
    mlm_ids, labels = ids.clone(), torch.full_like(ids, -100)
    mlm_ids[:, 1], labels[:, 1] = 3, ids[:, 1]
    return dict(video=torch.randn(b, 3, 4, 32, 32, generator=g), input_ids=ids, attention_mask=mask,
                mlm_input_ids=mlm_ids, mlm_labels=labels, index=torch.tensor(video_ids[:b]))

# ------------------------------------------------------------------------------------------------- losses


def test_itc_with_distinct_videos_is_the_symmetric_infonce():
    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    logits = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t() / 0.1
    labels = torch.arange(5)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    torch.testing.assert_close(layers.itc_loss(v, t, 0.1, torch.arange(5)), want)


def test_itc_counts_every_caption_of_the_same_video_as_a_positive():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    ids = torch.tensor([7, 7, 2, 5])
    logits = F.normalize(v, dim=-1) @ F.normalize(t, dim=-1).t() / 0.1
    targets = torch.tensor([[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    want = -((logits.log_softmax(1) * targets).sum(1).mean() + (logits.t().log_softmax(1) * targets).sum(1).mean()) / 2
    got = layers.itc_loss(v, t, 0.1, ids)
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got, layers.itc_loss(v, t, 0.1, torch.arange(4)))


def test_hard_negatives_never_pair_a_video_with_itself():
    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 1, 1, 2])
    sim = torch.randn(6, 6) * 5
    for hard in (True, False):
        picks = torch.stack([sample_negatives(sim, hard, ids) for _ in range(300)])
        assert not (ids[picks] == ids[None, :]).any()
        if not hard:  # uniform: row 5 (a video alone) reaches every other row
            assert len(torch.unique(picks[:, 5])) == 5


def test_a_batch_of_one_video_falls_back_to_other_rows():
    one_video = torch.zeros(3, dtype=torch.long)
    picks = torch.stack([sample_negatives(torch.zeros(3, 3), True, one_video) for _ in range(50)])
    assert (picks != torch.arange(3)).all()


def test_hard_negatives_follow_the_similarity():
    torch.manual_seed(0)
    sim = torch.zeros(3, 3)
    sim[0, 2] = 6.0  # row 0: column 2 is by far the most similar other video
    picks = torch.stack([sample_negatives(sim, True, torch.arange(3)) for _ in range(200)])
    assert (picks[:, 0] == 2).float().mean() > 0.9

# ------------------------------------------------------------------------------------------ token selection


def test_selection_keeps_the_video_cls_and_the_most_attended_tokens_in_order():
    video = torch.arange(7.0)[None, :, None].expand(2, 7, 3)  # token i holds the value i
    probs = torch.tensor([[0.0, .1, .5, .0, .3, .05, .05], [0.0, .4, .0, .1, .0, .3, .2]])[:, None].expand(2, 3, 7)
    mask = torch.ones(2, 3, dtype=torch.long)
    kept = S.FusionTokenSelection(0.5, (0,), "cls_attn").select(video, probs, mask)
    assert kept[:, :, 0].tolist() == [[0, 1, 2, 4], [0, 1, 5, 6]]


def test_avg_attn_ignores_padding_text_tokens():
    video = torch.arange(5.0)[None, :, None]
    probs = torch.tensor([[[0, .9, .1, 0, 0], [0, .0, .1, .9, 0], [0, 0, 0, 0, 1.0]]])  # last text token is padding
    mask = torch.tensor([[1, 1, 0]])
    kept = S.FusionTokenSelection(0.5, (0,), "avg_attn").select(video, probs, mask)
    assert kept[0, :, 0].tolist() == [0, 1, 3]


@pytest.mark.slow
def test_text_guided_selection_depends_on_the_caption_and_changes_the_fused_output():
    model = tiny_model(token_keep_rate=1.0).eval()
    b = batch()
    with torch.no_grad():
        video = model.match_video_cache(b["video"])[:1].expand(2, -1, -1)
        states = model.text_encoder.text_layers(b["input_ids"][:2], b["attention_mask"][:2])
        layer = model.text_encoder.bert.encoder.layer[2]
        _, probs = layer(states, layers.key_padding_mask(b["attention_mask"][:2]), video, None,
                         want_probs=True)
        kept = S.FusionTokenSelection(0.5, (2,), "cls_attn").select(torch.arange(17.0)[None, :, None].expand(2, -1, 1),
                                                                     probs, b["attention_mask"][:2])
        assert not torch.equal(kept[0], kept[1])  # two captions of one clip keep different video tokens
        full = tiny_model(token_keep_rate=1.0, fusion_keep_rate=1.0).eval()
        args = (b["video"], b["input_ids"], b["attention_mask"])
        assert not torch.allclose(model.match_logits(*args), full.match_logits(*args))
        # selecting after the last fusion layer leaves nothing downstream to change
        last = tiny_model(token_keep_rate=1.0, fusion_drop_loc=(3,)).eval()
        torch.testing.assert_close(last.match_logits(*args), full.match_logits(*args))


@pytest.mark.slow
def test_mlm_loss_traces_without_graph_breaks_and_is_the_masked_positions_mean():
    """MLM (the head on the collator's count of positions) through text-guided selection (random strategy:
    drawn on the device in training): no data-dependent shape, no host read; the same loss as the head on every
    position."""
    model, b = tiny_model(fusion_keep_strategy="random").train(), batch()
    video = torch.randn(4, 9, 192)  # [CLS] + 8 video tokens
    args = (video, b["mlm_input_ids"], b["attention_mask"], b["mlm_labels"], 1)  # one masked word per caption
    torch._dynamo.reset()
    assert torch._dynamo.explain(model.masked_word_loss)(*args).graph_break_count == 0
    torch.manual_seed(1)
    got = model.masked_word_loss(*args)
    torch.manual_seed(1)
    every = model.masked_word_loss(*args[:-1])  # no count: the head on every position
    torch.testing.assert_close(got, every)
    torch.manual_seed(1)  # the same random selection: the head on the masked positions, by boolean indexing
    fused = model.text_encoder.fusion_layers(model.text_encoder.text_layers(b["mlm_input_ids"], b["attention_mask"]),
                                             b["attention_mask"], video, model._selection())
    sel = b["mlm_labels"] != -100  # one masked word per caption
    want = F.cross_entropy(model.text_encoder.cls.predictions(fused[sel]), b["mlm_labels"][sel])
    torch.testing.assert_close(got, want)

# ------------------------------------------------------------------------------------------ the contract


@pytest.mark.slow
def test_forward_returns_every_loss_and_reaches_every_parameter():
    model = tiny_model().train()
    out = model(batch())
    assert set(out) >= {"loss", "loss_itc", "loss_itm", "loss_mlm", "itm_acc"}
    assert all(torch.isfinite(v) for v in out.values())
    torch.testing.assert_close(out["loss"].detach(), out["loss_itc"] + out["loss_itm"] + out["loss_mlm"])
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.slow
def test_loss_weights_and_flags_reach_the_model():
    model = tiny_model(w_itm=0.0, w_mlm=2.0)
    out = model(batch())
    torch.testing.assert_close(out["loss"].detach(), out["loss_itc"] + 2 * out["loss_mlm"])


@pytest.mark.slow
def test_encoders_and_cached_matching_agree_with_the_plain_path():
    model = tiny_model().eval()
    b = batch()
    with torch.no_grad():
        assert model.encode_video(b["video"]).shape == (4, 64)
        assert model.encode_text(b["input_ids"], b["attention_mask"]).shape == (4, 64)
        plain = model.match_logits(b["video"], b["input_ids"], b["attention_mask"])
        cache = model.match_video_cache(b["video"])
        cached = model.match_logits(None, b["input_ids"], b["attention_mask"], video_cache=cache)
    torch.testing.assert_close(plain, cached)


@pytest.mark.slow
def test_random_blocks_are_fixed_at_evaluation_and_redrawn_in_training():
    model = tiny_model(token_keep_rate=1.0, token_keep_strategy="random")
    video = batch()["video"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_video(video), model.encode_video(video))
        other = tiny_model(token_keep_rate=1.0, token_keep_strategy="random", eval_seed=1).eval()
        assert not torch.allclose(model.encode_video(video), other.encode_video(video))
        model.train()
        assert not torch.allclose(model.encode_video(video), model.encode_video(video))


def test_a_flag_of_the_other_family_is_refused_by_name():
    import argparse
    args = argparse.Namespace(model="svitt_tiny_patch16", mask_type=None, decoder_depth=4)
    with pytest.raises(ValueError, match="--decoder_depth belongs to the simvtp model family"):
        model_registry.model_kwargs(args, "svitt_tiny_patch16")
    args = argparse.Namespace(token_keep_rate=0.6)
    with pytest.raises(ValueError, match="--token_keep_rate belongs to the svitt model family"):
        model_registry.model_kwargs(args, "simvtp_tiny_patch16")

# ---------------------------------------------------------------------------------------- release files


def _constant_release_state() -> dict[str, torch.Tensor]:
    """The release's pretrain state dict (base shapes, 4 frames) with one constant per tensor, so where each
    tensor lands is visible; the tied pairs equal, as the release stores them; its int buffers as it saves them."""
    from svitt_release import release_keys
    tied = {"text_encoder.cls.predictions.decoder.weight": "text_encoder.bert.embeddings.word_embeddings.weight",
            "text_encoder.cls.predictions.decoder.bias": "text_encoder.cls.predictions.bias"}
    state = {}
    for i, (key, shape) in enumerate(release_keys("pretrain")):
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[-1]).expand(shape).clone()
        elif key.endswith("relative_position_index"):
            state[key] = torch.zeros(shape, dtype=torch.int64)
        else:
            state[key] = torch.full(shape, 1e-3 * i)
    for copy, source in tied.items():
        state[copy] = state[source]
    return state


@pytest.mark.slow
def test_a_release_pretrain_file_is_recognised_and_loads_strictly_without_unpickling_its_config(tmp_path):
    import checkpoint
    from svitt_release import write_release_file
    state = _constant_release_state()
    path = tmp_path / "svitt_release.pth"
    write_release_file(path, state, num_frames=4)  # its "config" is a pickled OmegaConf object
    ckpt = checkpoint.read_checkpoint_file(str(path))
    model = checkpoint.build_model_from(ckpt, str(path))  # no model_cfg: recognised by its keys, loaded strictly
    assert model.model_cfg["name"] == "svitt_base_patch16_224"
    own = model.state_dict()
    skipped = [k for k in state if k not in own]
    assert all(k.endswith(("relative_position_index", "position_ids")) for k in skipped) and len(skipped) == 13
    for key, tensor in own.items():
        assert torch.equal(tensor, state[key]), key


def test_from_random_weights_the_vision_tower_cannot_tell_a_clip_from_it_played_backwards():
    """Why the time-order loss stays at log 2 for SViTT (docs/matching_heads.md): frames are patch-embedded one
    by one and the only position signal is the relative bias table, which starts at zero, so reversing the frames
    only permutes the tokens and the pooled output is the same. A table whose time offsets differ breaks it."""
    dense = dict(token_keep_rate=1.0, token_drop_loc=(), sparse_random_attn=0, drop_path_rate=0.0)
    model = tiny_model(**dense).eval()
    video = batch()["video"]
    with torch.no_grad():
        forward, backward = model.encode_video(video), model.encode_video(video.flip(2))
        torch.testing.assert_close(forward, backward, rtol=1e-5, atol=1e-5)
        for layer in model.vision_encoder.modules():
            if hasattr(layer, "relative_position_bias_table"):
                layer.relative_position_bias_table.normal_(0.0, 0.5)
        assert (model.encode_video(video) - model.encode_video(video.flip(2))).abs().max() > 1e-3
