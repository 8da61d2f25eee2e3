"""modeling_simvtp.py: every registered model's shapes, strict loads of the release's key lists, attention paths,
position table, tube layout, each loss by hand, the release's leaks fixed, over-fitting, checkpoint key mapping."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models import create_model, list_models

import checkpoint
import layers
import model_registry
import modeling_simvtp as M

REFERENCE = Path(__file__).parent / "data"  # the release's key lists
PRETRAIN = ["simvtp_base_patch16", "simvtp_small_patch16", "simvtp_tiny_patch16"]
DUAL = ["simvtp_dual_base_patch16", "simvtp_dual_small_patch16", "simvtp_dual_tiny_patch16"]
QA = ["simvtp_qa_base_patch16", "simvtp_qa_small_patch16", "simvtp_qa_tiny_patch16"]
SIZE = dict(embed_dim=32, depth=2, num_heads=2, img_size=32, num_frames=4, vocab_size=64)  # grid (2, 2, 2)
DECODER = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny(**kw) -> M.SimVTPPretrain:
    torch.manual_seed(0)
    return create_model("simvtp_tiny_patch16", **{**SIZE, **DECODER, **kw})


def tiny_dual(**kw) -> M.SimVTPDualEncoder:
    torch.manual_seed(0)
    return create_model("simvtp_dual_tiny_patch16", **{**SIZE, **kw})


def make_batch(b: int = 3, length: int = 7, seed: int = 0) -> dict:
    """Clips [b, 3, 4, 32, 32] with a tube mask (2 of 4 positions, both time slices), captions of uneven length
    with padding, and two masked words per caption."""
    g = torch.Generator().manual_seed(seed)
    spatial = torch.stack([torch.randperm(4, generator=g) < 2 for _ in range(b)])
    input_ids = torch.zeros(b, length, dtype=torch.long)
    attention_mask = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        n = length - i % 3
        input_ids[i, :n] = torch.randint(5, 64, (n,), generator=g)
        attention_mask[i, :n] = 1
    mlm_input_ids, mlm_labels = input_ids.clone(), torch.full_like(input_ids, -100)
    mlm_input_ids[:, 1:3], mlm_labels[:, 1:3] = 3, input_ids[:, 1:3]
    return dict(video=torch.randn(b, 3, 4, 32, 32, generator=g), video_mask=spatial.repeat(1, 2),
                input_ids=input_ids, attention_mask=attention_mask, mlm_input_ids=mlm_input_ids,
                mlm_labels=mlm_labels)


def reference_keys(name: str) -> dict:
    with open(REFERENCE / name) as f:
        return {k: tuple(s) for k, s in json.load(f)}


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}

# ----------------------------------------------------------------------------------------------- registry


def test_registry_holds_exactly_our_names_and_tiny_defaults():
    assert sorted(list_models("*simvtp*")) == sorted(PRETRAIN + DUAL + QA)
    model = create_model("simvtp_tiny_patch16")
    assert model.encoder.patch_embed.proj.weight.shape == (192, 3, 2, 16, 16) and len(model.encoder.blocks) == 4
    assert model.decoder.head.weight.shape == (1536, 96) and len(model.decoder.blocks) == 2
    assert model.encoder.pos_table.table.shape == (1, 4 * 7 * 7, 192)  # 8 frames x 112 px
    with pytest.raises(ValueError, match="nothing is downloaded"):
        create_model("simvtp_tiny_patch16", pretrained=True)
    # one naming scheme; the release's names (and our older base names) are aliases
    assert model_registry.canonical_name("pretrain_simvtp_base_patch16_224") == "simvtp_base_patch16"
    assert model_registry.canonical_name("vit_base_patch16_224") == "simvtp_dual_base_patch16"
    assert model_registry.canonical_name("simvtp_dual_base_patch16_224") == "simvtp_dual_base_patch16"
    assert model_registry.model_spec("simvtp_tiny_patch16").retrieval_model == "simvtp_dual_tiny_patch16"


@pytest.mark.parametrize("name", PRETRAIN)
def test_pretrain_model_losses_gradients_and_inference_shapes(name):
    torch.manual_seed(0)
    model = create_model(name, **SIZE, **DECODER)
    batch = make_batch()
    out = model(batch)
    assert set(out) == {"loss", "loss_pixel", "loss_mlm", "loss_vtc", "loss_vtm", "vtm_acc"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter in the graph (DDP-safe)
    with torch.no_grad():
        assert model.encode_video(batch["video"]).shape == (3, 32)
        assert model.encode_video(batch["video"], batch["video_mask"]).shape == (3, 32)
        assert model.encode_text(batch["input_ids"], batch["attention_mask"]).shape == (3, 32)
        logits = model.match_logits(batch["video"], batch["input_ids"], batch["attention_mask"])
        assert logits.shape == (3, 2)
        # re-ranking's cached video part: one clip's cache paired with three captions scores as the clip itself
        cache = model.match_video_cache(batch["video"][:1]).expand(3, -1, -1)
        clip = batch["video"][:1].expand(3, -1, -1, -1, -1)
        torch.testing.assert_close(model.match_logits(None, batch["input_ids"], batch["attention_mask"],
                                                      video_cache=cache),
                                   model.match_logits(clip, batch["input_ids"], batch["attention_mask"]))
        # and through a tube mask (re-ranking with --match_mask_ratio): the cache's visible tubes, as the video's
        torch.testing.assert_close(model.match_logits(None, batch["input_ids"], batch["attention_mask"],
                                                      video_mask=batch["video_mask"], video_cache=cache),
                                   model.match_logits(clip, batch["input_ids"], batch["attention_mask"],
                                                      video_mask=batch["video_mask"]))
    rec = model.reconstruct(**{k: batch[k] for k in ("video", "video_mask", "input_ids", "attention_mask",
                                                     "mlm_input_ids")})
    assert rec["pred_pixels"].shape == rec["pred_pixels_01"].shape == (3, 4, 1536)
    assert rec["word_logits"].shape == (3, 7, 64) and rec["filled_ids"].shape == (3, 7)


@pytest.mark.parametrize("name", DUAL)
def test_dual_model_shapes_and_unused_parameters_frozen(name):
    torch.manual_seed(0)
    model = create_model(name, **SIZE)
    batch = make_batch()
    video, text = model.encode_video(batch["video"]), model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert video.shape == text.shape == (3, 32)
    out = model(batch)  # the contract's training step: its own contrastive loss
    assert set(out) == {"loss"} and out["loss"].dim() == 0
    expected = layers.vtc_loss(video, text, model.temperature)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in shapes(model) if n.startswith(("video_encoder.text_embeddings.",
                                                                  "text_encoder.patch_embed."))}
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

# ----------------------------------------------------------------------------------------------- release key lists


@pytest.fixture(scope="module")
def base_pretrain():
    return create_model("simvtp_base_patch16")


@pytest.fixture(scope="module")
def base_dual():
    return create_model("simvtp_dual_base_patch16")


@pytest.mark.slow
@pytest.mark.parametrize("fixture, keys, kind", [("base_pretrain", "simvtp_pretrain_keys.json", "simvtp_pretrain"),
                                                 ("base_dual", "simvtp_finetune_keys.json", "simvtp_finetune")])
def test_release_checkpoint_loads_strictly_into_base_model(fixture, keys, kind, request):
    model = request.getfixturevalue(fixture)
    expected = reference_keys(keys)
    assert shapes(model) == expected
    g = torch.Generator().manual_seed(0)
    release = {k: torch.randn(s, generator=g).half() for k, s in expected.items()}  # fp16 file, fp32 model
    mapped, source = M.convert_state_dict(release, model)
    report = checkpoint.load_weights(model, mapped, strict=True)
    assert source == kind and sorted(report.loaded) == sorted(expected) and not report.missing
    some = next(k for k in expected if k.endswith("blocks.11.attn.qkv.weight"))
    assert torch.equal(model.state_dict()[some], release[some].float())

# ----------------------------------------------------------------------------------------------- building blocks


def test_fused_and_explicit_attention_agree_with_padding():
    model = tiny().eval()
    batch = make_batch()
    vis = model.encoder.embed_video(batch["video"], batch["video_mask"])
    text = model.text_embeddings(batch["mlm_input_ids"])
    with torch.no_grad():
        fused = model.encoder(vis, text, batch["attention_mask"])
        for m in model.modules():
            if isinstance(m, M.Attention):
                m.fused = False
        explicit = model.encoder(vis, text, batch["attention_mask"])
    torch.testing.assert_close(fused, explicit, rtol=1e-5, atol=1e-5)


class SdpaRecorder:
    """Stands in for F.scaled_dot_product_attention: notes (query shape, mask) of each call, then calls it."""

    def __init__(self, real) -> None:
        self.real, self.calls = real, []

    def __call__(self, q, k, v, attn_mask=None, **kwargs):
        self.calls.append((tuple(q.shape), attn_mask))
        return self.real(q, k, v, attn_mask=attn_mask, **kwargs)


def test_attention_gets_a_mask_only_where_keys_are_padded_and_then_a_boolean_key_padding_one(monkeypatch):
    recorder = SdpaRecorder(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
    model, batch = tiny(), make_batch()
    model(batch)
    b, length, heads, depth = 3, 7, SIZE["num_heads"], SIZE["depth"]
    visible = int((~batch["video_mask"][0]).sum())
    masked = [(shape, m) for shape, m in recorder.calls if m is not None]
    unmasked = sorted(shape[2] for shape, m in recorder.calls if m is None)
    # video-only pass (4 visible tubes) and pixel decoder (all 8 tubes): no mask, flash-eligible on CUDA
    assert unmasked == [visible] * depth + [8] * DECODER["decoder_depth"]
    for shape, m in masked:  # joint (a), text-only (b), negatives' joint (c): key padding [B, 1, 1, S] in bool
        assert m.dtype == torch.bool and m.shape == (shape[0], 1, 1, shape[2])
    assert sorted((shape[0], shape[2]) for shape, _ in masked) == sorted(
        [(b, visible + length)] * depth + [(b, length)] * depth + [(2 * b, visible + length)] * depth)
    recorder.calls.clear()
    tiny_dual()(batch)  # retrieval: the video branch unmasked, the text branch with key padding
    assert sorted(m is None for _, m in recorder.calls) == [False] * depth + [True] * depth


def test_attention_path_per_device_dtype_and_length():
    threshold = M.CPU_BF16_SDPA_MIN_KEYS
    assert M.sdpa_threshold(M.CPU_BF16_ATTENTION_MS) == threshold and 178 < threshold <= 1568
    assert M.use_sdpa("cuda", torch.bfloat16, 16) and M.use_sdpa("cpu", torch.float32, 16)
    assert not M.use_sdpa("cpu", torch.bfloat16, threshold - 1) and M.use_sdpa("cpu", torch.bfloat16, threshold)
    assert M.sdpa_threshold({100: ((), 2.0, 1.0), 200: ((), 1.0, 2.0), 400: ((), 3.0, 2.0)}) == 401  # never wins
    assert M.sdpa_threshold({100: ((), 2.0, 1.0), 200: ((), 1.0, 2.0), 400: ((), 1.0, 2.0)}) == 200


def test_explicit_and_sdpa_attention_agree_under_the_same_boolean_masks():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    keys = torch.tensor([[True] * 5, [True, True, True, False, False]])[:, None, None, :]
    causal = layers.causal_key_mask(keys[:, 0, 0].long())
    for mask in (None, keys, causal):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(M.explicit_attention(q, k, v, mask, 8 ** -0.5), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(causal[1, 0], torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                   [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]).bool())


def test_cpu_bf16_attention_takes_the_explicit_path_below_the_threshold(monkeypatch):
    recorder = SdpaRecorder(F.scaled_dot_product_attention)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
    attn = M.Attention(8, 2)
    short, long = torch.randn(1, 4, 8), torch.randn(1, M.CPU_BF16_SDPA_MIN_KEYS, 8)
    with torch.autocast("cpu", torch.bfloat16):
        attn(short)
        assert recorder.calls == []
        attn(long)
    attn(short)  # fp32: SDPA at any length
    assert [shape[2] for shape, _ in recorder.calls] == [M.CPU_BF16_SDPA_MIN_KEYS, 4]


@pytest.mark.slow
def test_select_tokens_gathers_the_boolean_selection_with_no_graph_break():
    g = torch.Generator().manual_seed(0)
    x, keep = torch.randn(3, 10, 4, generator=g), torch.stack([torch.randperm(10, generator=g) < 4 for _ in range(3)])
    want = x[keep].reshape(3, 4, 4)
    assert torch.equal(M.select_tokens(x, keep), want) and torch.equal(M.select_tokens(x, keep, 4), want)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(M.select_tokens)(x, keep, 4)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with pytest.raises(ValueError, match="same number of masked tubes"):
        M.select_tokens(x, torch.arange(10)[None].expand(3, -1) < torch.tensor([[3], [4], [4]]))


def test_training_losses_trace_without_graph_breaks():
    """The word head on the collator's count of positions (or every one), labels built on the device: no
    data-dependent shape in the losses; both give the loss of boolean selection."""
    model, batch = tiny(), make_batch()
    text_out = torch.randn(3, 7, SIZE["embed_dim"])
    torch._dynamo.reset()
    assert torch._dynamo.explain(model.masked_word_loss)(text_out, batch["mlm_labels"], 2).graph_break_count == 0
    sel = batch["mlm_labels"] != -100  # the head on the masked positions by boolean indexing (a host sync)
    ce = F.cross_entropy(model.text_cls(text_out[sel]), batch["mlm_labels"][sel], reduction="none")
    for count in (2, None):
        torch.testing.assert_close(model.masked_word_loss(text_out, batch["mlm_labels"], count),
                                   ce.view(3, 2).mean(1).mean())


def test_sincos_table_matches_hand_computation():
    table = M.sincos_table(10, 8)
    assert table.shape == (1, 10, 8) and table.dtype == torch.float32
    assert table[0, 3, 0].item() == pytest.approx(math.sin(3))
    assert table[0, 3, 1].item() == pytest.approx(math.cos(3))
    assert table[0, 5, 6].item() == pytest.approx(math.sin(5 / 10000 ** (6 / 8)))
    assert table[0, 5, 7].item() == pytest.approx(math.cos(5 / 10000 ** (6 / 8)))
    assert torch.equal(M.SinCosPosition(10, 8)(10), table)
    assert torch.equal(M.SinCosPosition(4, 8)(10), table)  # other token counts computed on the fly


def test_patchify_layout_matches_explicit_loop_and_unpatchify_inverts():
    video = torch.randn(2, 3, 4, 6, 4)
    tubes = M.patchify(video, tubelet_size=2, patch_size=2)
    assert tubes.shape == (2, 2 * 3 * 2, 2 * 2 * 2 * 3)
    for b in range(2):
        n = 0
        for t in range(2):
            for h in range(3):
                for w in range(2):
                    i = 0
                    for p0 in range(2):
                        for p1 in range(2):
                            for p2 in range(2):
                                for c in range(3):
                                    assert tubes[b, n, i] == video[b, c, 2 * t + p0, 2 * h + p1, 2 * w + p2]
                                    i += 1
                    n += 1
    assert torch.equal(M.unpatchify(tubes, (2, 3, 2), tubelet_size=2, patch_size=2), video)


def test_pixel_target_is_each_masked_tube_normalised_per_channel():
    model = tiny()
    batch = make_batch()
    target = model.pixel_target(batch["video"], batch["video_mask"])
    assert target.shape == (3, 4, 1536)
    b, n = 1, int(batch["video_mask"][1].nonzero()[0])  # the first masked tube of clip 1
    t, h, w = n // 4, (n // 2) % 2, n % 2
    mean = torch.tensor(M.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(M.IMAGENET_STD).view(3, 1, 1, 1)
    tube = batch["video"][b, :, 2 * t:2 * t + 2, 16 * h:16 * h + 16, 16 * w:16 * w + 16] * std + mean
    flat = tube.reshape(3, -1)
    normed = (flat - flat.mean(1, keepdim=True)) / (flat.std(1, unbiased=True, keepdim=True) + 1e-6)
    torch.testing.assert_close(target[b, 0], normed.t().reshape(-1))

# ----------------------------------------------------------------------------------------------- losses


def test_vtc_is_symmetric_infonce_by_hand():
    v = torch.tensor([[2.0, 0.0], [0.0, 1.0]])  # normalised inside
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    s = [[2.0, 1.2], [0.0, 1.6]]  # cosine / 0.5
    rows = [-math.log(math.exp(s[0][0]) / (math.exp(s[0][0]) + math.exp(s[0][1]))),
            -math.log(math.exp(s[1][1]) / (math.exp(s[1][0]) + math.exp(s[1][1])))]
    cols = [-math.log(math.exp(s[0][0]) / (math.exp(s[0][0]) + math.exp(s[1][0]))),
            -math.log(math.exp(s[1][1]) / (math.exp(s[0][1]) + math.exp(s[1][1])))]
    expected = (sum(rows) / 2 + sum(cols) / 2) / 2
    assert layers.vtc_loss(v, t, 0.5).item() == pytest.approx(expected, rel=1e-6)
    assert layers.vtc_loss(v, t, 0.5, gather=lambda x: x).item() == pytest.approx(expected, rel=1e-6)


def test_mlm_is_mean_over_captions_of_each_captions_mean():
    logits, targets = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    ce = F.cross_entropy(logits, targets, reduction="none")
    expected = (ce[0] + ce[1:].mean()) / 2
    labels = torch.full((3, 4), -100)  # caption 0 masks position 2, caption 1 positions 0, 1, 3, caption 2 none
    labels[0, 2], labels[1, [0, 1, 3]] = targets[0], targets[1:]
    every = torch.randn(3, 4, 10)  # the word head's logits at every position; only the masked ones count
    every[0, 2], every[1, [0, 1, 3]] = logits[0], logits[1:]
    torch.testing.assert_close(layers.mlm_loss(every[:2], labels[:2]), expected)
    torch.testing.assert_close(layers.mlm_loss(every, labels), 2 * expected / 3)  # no masked word: 0


def test_masked_word_states_keep_each_captions_masked_positions_in_order():
    labels = torch.full((3, 5), -100)  # caption 0 masks positions 3 and 1, caption 1 position 4, caption 2 none
    labels[0, [1, 3]], labels[1, 4] = torch.tensor([7, 8]), 9
    states = torch.arange(15.0).view(3, 5, 1).expand(-1, -1, 2)
    kept, kept_labels = layers.masked_word_states(states, labels, 2)
    assert kept.shape == (3, 2, 2) and kept[0, :, 0].tolist() == [1.0, 3.0] and kept[1, 0, 0] == 9.0
    assert kept_labels.tolist() == [[7, 8], [9, -100], [-100, -100]]  # a short row is filled by unmasked positions
    head = torch.nn.Linear(2, 10)
    torch.testing.assert_close(layers.mlm_loss(head(kept), kept_labels), layers.mlm_loss(head(states), labels))
    assert layers.masked_word_states(states, labels, None)[0] is states  # no count: every position


def test_vtm_negatives_never_the_positive_and_follow_similarity():
    torch.manual_seed(0)
    sim = torch.randn(5, 5) + 100 * torch.eye(5)
    draws = torch.stack([layers.sample_negatives(sim, hard) for hard in (True, False) for _ in range(200)])
    assert not bool((draws == torch.arange(5)).any())
    peaked = torch.full((4, 4), -20.0) + 60 * torch.eye(4)
    peaked[torch.arange(4), (torch.arange(4) + 1) % 4] = 20.0
    assert torch.equal(layers.sample_negatives(peaked, hard=True), (torch.arange(4) + 1) % 4)
    uniform = torch.stack([layers.sample_negatives(peaked, hard=False) for _ in range(300)])
    assert len(set(uniform[:, 0].tolist())) == 3  # random: every other caption drawn


def test_vtm_negatives_are_multinomials_draws_without_its_host_checks():
    sim = torch.randn(6, 6, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        torch.manual_seed(seed)
        got = layers.sample_negatives(sim)
        torch.manual_seed(seed)
        probs = sim.masked_fill(torch.eye(6, dtype=torch.bool), float("-inf")).softmax(dim=1)
        assert torch.equal(got, torch.multinomial(probs, 1).squeeze(1))


def test_batch_of_one_gives_zero_vtm_loss_connected_to_the_graph():
    model = tiny()
    out = model(make_batch(b=1))
    assert out["loss_vtm"].item() == 0.0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.vtm_head.weight.grad is not None


def test_vtc_uses_the_full_caption_unless_asked_for_the_masked_one():
    batch = make_batch()
    other = dict(batch, mlm_input_ids=batch["input_ids"].clone())
    other["mlm_input_ids"][:, 4] = 3
    full = tiny()
    torch.testing.assert_close(full(batch)["loss_vtc"], full(other)["loss_vtc"], rtol=0, atol=1e-6)
    masked = tiny(vtc_text="masked")
    assert abs(masked(batch)["loss_vtc"].item() - masked(other)["loss_vtc"].item()) > 1e-4


def test_vtm_pairs_use_the_masked_caption_unless_asked_for_the_whole_one():
    batch = make_batch()
    other = dict(batch, mlm_input_ids=batch["input_ids"].clone())  # another word mask of the same captions
    other["mlm_input_ids"][:, 3:5] = 3
    full = tiny(vtm_text="full")
    torch.manual_seed(1)
    a = full(batch)["loss_vtm"]
    torch.manual_seed(1)
    torch.testing.assert_close(a, full(other)["loss_vtm"], rtol=0, atol=1e-6)
    masked = tiny()
    torch.manual_seed(1)
    b = masked(batch)["loss_vtm"]
    torch.manual_seed(1)
    assert abs(b.item() - masked(other)["loss_vtm"].item()) > 1e-4


def test_contrastive_video_pass_sees_every_tube_only_when_asked():
    batch = make_batch()
    other = dict(batch, video_mask=~batch["video_mask"])
    full, masked = tiny(vtc_video="full"), tiny()
    torch.testing.assert_close(full(batch)["loss_vtc"], full(other)["loss_vtc"], rtol=0, atol=1e-6)
    assert abs(masked(batch)["loss_vtc"].item() - masked(other)["loss_vtc"].item()) > 1e-4


def test_vtm_pairs_see_every_tube_only_when_asked():
    batch = make_batch()
    other = dict(batch, video_mask=~batch["video_mask"])  # the other half of the tubes visible
    losses = {}
    for video in ("full", "masked"):
        model = tiny(vtm_video=video, vtm_negatives="random")
        for name, b in (("mask", batch), ("other", other)):
            torch.manual_seed(1)  # the same uniform negatives for both masks
            losses[video, name] = model(b)["loss_vtm"].item()
    assert losses["full", "mask"] == pytest.approx(losses["full", "other"], abs=1e-6)
    assert abs(losses["masked", "mask"] - losses["masked", "other"]) > 1e-4
    for option in ("vtm_video", "vtc_video"):
        with pytest.raises(ValueError, match=option):
            tiny(**{option: "some"})


def test_text_pooled_matching_reads_the_caption_tokens_after_they_saw_the_video():
    batch = make_batch()
    model = tiny(vtm_pool="text").eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        vis = model.encoder.embed_video(batch["video"])
        x, pooled = model.joint(vis, model.text_embeddings(ids), mask)
        expected = (x[:, vis.shape[1]:] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(pooled, model.encoder.fc_norm(expected), rtol=1e-5, atol=1e-5)
        other = model.match_logits(batch["video"].flip(0), ids, mask)
        assert not torch.allclose(model.match_logits(batch["video"], ids, mask), other)
    with pytest.raises(ValueError, match="vtm_pool"):
        tiny(vtm_pool="cls")


def test_mixed_negatives_draw_the_video_by_similarity_and_the_caption_uniformly():
    peaked = torch.full((4, 4), -20.0) + 60 * torch.eye(4)
    peaked[(torch.arange(4) + 1) % 4, torch.arange(4)] = 20.0  # video i + 1 is caption i's closest other, and
    # caption v - 1 video v's
    draws = [layers.matching_negatives(peaked, "mixed") for _ in range(300)]
    assert all(torch.equal(v, (torch.arange(4) + 1) % 4) for v, _ in draws)
    assert len({int(t[0]) for _, t in draws}) == 3
    hard_v, hard_t = layers.matching_negatives(peaked, "hard")
    assert torch.equal(hard_v, (torch.arange(4) + 1) % 4) and torch.equal(hard_t, (torch.arange(4) + 3) % 4)
    with pytest.raises(ValueError, match="vtm_negatives"):
        layers.matching_negatives(peaked, "easy")


def test_matching_negatives_are_random_during_the_warm_up_epochs():
    assert layers.negatives_now("hard", 3, {"train_epoch": 2}) == "random"
    assert layers.negatives_now("mixed", 3, {"train_epoch": 3}) == "mixed"
    assert layers.negatives_now("hard", 0, {}) == "hard"


@pytest.mark.parametrize("build", [tiny, tiny_dual])
def test_extra_padding_changes_text_features_only_with_release_pooling(build):
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    padded_ids = torch.cat([ids, torch.zeros(3, 4, dtype=torch.long)], 1)
    padded_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        model = build().eval()
        torch.testing.assert_close(model.encode_text(ids, mask), model.encode_text(padded_ids, padded_mask),
                                   rtol=1e-5, atol=1e-5)
        release = build(release_pooling=True).eval()
        assert not torch.allclose(release.encode_text(ids, mask), release.encode_text(padded_ids, padded_mask),
                                  atol=1e-3)
    if build is tiny:
        with torch.no_grad():
            torch.testing.assert_close(model.match_logits(batch["video"], ids, mask),
                                       model.match_logits(batch["video"], padded_ids, padded_mask),
                                       rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_bf16_autocast_give_the_same_losses():
    batch = make_batch()
    model = tiny()
    torch.manual_seed(1)
    plain = model(batch)
    plain["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.manual_seed(1)
    ckpt = model(batch)
    ckpt["loss"].backward()
    torch.testing.assert_close(ckpt["loss"], plain["loss"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(batch)
    assert all(v.dtype == torch.float32 for v in low.values())
    assert low["loss_pixel"].item() == pytest.approx(plain["loss_pixel"].item(), rel=0.05)


def test_learnable_temperature_is_an_extra_parameter_tolerated_by_strict_loads():
    fixed = tiny()
    learnable = tiny(learnable_temp=True, temperature=0.07)
    assert "temp" not in shapes(fixed) and learnable.temp.item() == pytest.approx(0.07)
    report = checkpoint.load_weights(learnable, fixed.state_dict(), strict=True)
    assert report.missing == ["temp"]
    checkpoint.load_weights(fixed, learnable.state_dict(), strict=True)


@pytest.mark.slow
def test_overfitting_two_clips_lowers_every_loss():
    model = tiny(embed_dim=64, num_heads=4, decoder_embed_dim=32)
    batch = make_batch(b=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(30):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    for k in ("loss_pixel", "loss_mlm", "loss_vtc"):
        assert last[k] < first[k], k

# ----------------------------------------------------------------------------------------------- key mapping


def fake_bert(prefix: str, gamma: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    ln = ("gamma", "beta") if gamma else ("weight", "bias")
    e = prefix + "embeddings."
    return {e + "word_embeddings.weight": torch.randn(64, 32, generator=g),
            e + "position_embeddings.weight": torch.randn(512, 32, generator=g),
            e + "token_type_embeddings.weight": torch.randn(2, 32, generator=g),
            e + f"LayerNorm.{ln[0]}": torch.randn(32, generator=g),
            e + f"LayerNorm.{ln[1]}": torch.randn(32, generator=g),
            e + "position_ids": torch.arange(512)[None],
            prefix + "encoder.layer.0.attention.self.query.weight": torch.randn(32, 32, generator=g),
            prefix + "pooler.dense.weight": torch.randn(32, 32, generator=g),
            "cls.predictions.bias": torch.randn(64, generator=g)}


@pytest.mark.parametrize("prefix", ["bert.", ""])
@pytest.mark.parametrize("gamma", [True, False])
def test_bert_checkpoints_in_every_spelling_map_to_text_embeddings(prefix, gamma):
    bert = fake_bert(prefix, gamma)
    ln_weight = bert[prefix + "embeddings.LayerNorm." + ("gamma" if gamma else "weight")]
    for model, targets in ((tiny(), ["text_embeddings."]),
                           (tiny_dual(), ["video_encoder.text_embeddings.", "text_encoder.text_embeddings."])):
        mapped, kind = M.convert_state_dict(bert, model)
        report = checkpoint.load_weights(model, mapped, strict=False)
        assert kind == "bert"
        assert sorted(report.loaded) == sorted(t + n for t in targets for n in (
            "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
            "LayerNorm.weight", "LayerNorm.bias"))
        assert sorted(report.unexpected) == sorted([prefix + "encoder.layer.0.attention.self.query.weight",
                                                    prefix + "pooler.dense.weight", "cls.predictions.bias"])
        assert len(report.ignored) == len(targets)  # position_ids: a non-persistent buffer
        for t in targets:
            assert torch.equal(model.state_dict()[t + "LayerNorm.weight"], ln_weight)
        assert "unexpected" in str(report) and "loaded" in str(report)


def test_pretrain_checkpoint_initialises_both_dual_branches():
    source = tiny().state_dict()
    dual = tiny_dual()
    mapped, kind = M.convert_state_dict(source, dual)
    report = checkpoint.load_weights(dual, mapped, strict=False)
    assert kind == "simvtp_pretrain"
    assert sorted(report.missing) == sorted(f"{b}.fc_norm.{w}" for b in ("video_encoder", "text_encoder")
                                            for w in ("weight", "bias"))
    assert {"encoder.norm.weight", "decoder.head.weight", "text_cls.weight", "vtm_head.weight", "mask_token",
            "encoder_to_decoder.weight"} <= set(report.unexpected)
    state = dual.state_dict()
    for branch in ("video_encoder", "text_encoder"):
        assert torch.equal(state[f"{branch}.blocks.1.attn.qkv.weight"], source["encoder.blocks.1.attn.qkv.weight"])
        assert torch.equal(state[f"{branch}.patch_embed.proj.weight"], source["encoder.patch_embed.proj.weight"])
        assert torch.equal(state[f"{branch}.text_embeddings.word_embeddings.weight"],
                           source["text_embeddings.word_embeddings.weight"])
    with pytest.raises(ValueError, match="pre-training model"):
        M.convert_state_dict(dual.state_dict(), tiny())


def test_videomae_subset_loads_and_reports_the_text_parts_missing():
    videomae = {k: v for k, v in tiny().state_dict().items()
                if k.startswith(("encoder.", "decoder.", "encoder_to_decoder.", "mask_token"))}
    model = tiny()
    mapped, kind = M.convert_state_dict(videomae, model)
    assert kind == "videomae_pretrain"
    report = checkpoint.load_weights(model, mapped, strict=False)
    assert {k.split(".")[0] for k in report.missing} == {"text_embeddings", "text_cls", "vtm_head"}
    with pytest.raises(ValueError, match=r"strict load: missing .*text_cls\.weight"):
        checkpoint.load_weights(model, mapped, strict=True)


def test_shape_mismatch_names_the_key_and_both_shapes():
    model = tiny(vocab_size=80)
    before = model.text_cls.weight.clone()
    with pytest.raises(ValueError, match=r"text_cls\.weight: checkpoint \(64, 32\) vs model \(80, 32\)"):
        checkpoint.load_weights(model, tiny().state_dict(), strict=False)
    assert torch.equal(model.text_cls.weight, before)  # nothing copied
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        M.convert_state_dict({"foo.weight": torch.zeros(1)}, model)


def test_reversal_loss_prefers_the_forward_clip_and_counts_who_does():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    forward = torch.tensor([[1.0, 0.1], [0.0, 1.0]])
    backward = torch.tensor([[0.1, 1.0], [1.0, 0.2]])  # caption 0 and 1 prefer their forward clip
    loss, acc = layers.reversal_loss(text, forward, backward, 0.1)
    f, b = F.normalize(forward, dim=-1), F.normalize(backward, dim=-1)
    logits = torch.stack([(text * f).sum(1), (text * b).sum(1)], 1) / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(2, dtype=torch.long)))
    assert acc.item() == 1.0
    _, swapped = layers.reversal_loss(text, backward, forward, 0.1)
    assert swapped.item() == 0.0


def test_time_order_through_all_tubes_compares_the_retrieval_features_of_both_orders():
    model = tiny(w_reverse=1.0, reverse_tubes="all").eval()
    b = make_batch(b=3)
    forwards, backwards = model.time_order_pair(b["video"], b["video_mask"], None, b)
    torch.testing.assert_close(forwards, model.encode_video(b["video"]))
    torch.testing.assert_close(backwards, model.encode_video(b["video"].flip(2)))
    with pytest.raises(ValueError, match="reverse_tubes 'some'"):
        tiny(reverse_tubes="some")


@pytest.mark.parametrize("tubes", ["visible", "all"])
def test_time_order_with_a_full_contrastive_pass_reuses_it_forwards_and_plays_every_tube_backwards(tubes):
    model = tiny(w_reverse=1.0, reverse_tubes=tubes, vtc_video="full").eval()
    b = make_batch(b=3)
    with torch.no_grad():
        contrastive = model.encode_video(b["video"])
        forwards, backwards = model.time_order_pair(b["video"], b["video_mask"], contrastive, b)
        assert forwards is contrastive
        torch.testing.assert_close(backwards, model.encode_video(b["video"].flip(2)))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["simvtp", "simvtp_all_tubes", "svitt"])
def test_w_reverse_adds_the_time_order_term_and_its_gradient_separates_the_orders(family):
    """The term appears only when weighted; a few steps on it alone make the features tell a clip from the same
    clip played backwards (SViTT's start exactly equal: its only position signal is a relative bias table that
    starts at zero; dense and without pruning or drop path here, so that the steps are not drowned in noise)."""
    if family.startswith("simvtp"):
        tubes = "all" if family == "simvtp_all_tubes" else "visible"
        plain, model, b = tiny(), tiny(w_reverse=1.0, reverse_tubes=tubes), make_batch(b=4)
    else:
        import test_svitt_model as T
        dense = dict(token_keep_rate=1.0, token_drop_loc=(), sparse_random_attn=0, drop_path_rate=0.0,
                     fusion_keep_rate=1.0, fusion_drop_loc=())
        plain, model, b = T.tiny_model(), T.tiny_model(w_reverse=1.0, **dense), T.batch()
    assert "loss_reverse" not in plain(b) and "reverse_acc" not in plain(b)
    out = model(b)
    assert {"loss_reverse", "reverse_acc"} <= set(out) and 0.0 <= out["reverse_acc"].item() <= 1.0
    weights = dict(model.loss_weights, reverse=0.0)
    torch.testing.assert_close(out["loss"].detach(), sum(weights.get(k, 0.0) * out[f"loss_{k}"] for k in weights
                                                         if f"loss_{k}" in out) + out["loss_reverse"])
    model.loss_weights = {k: (1.0 if k == "reverse" else 0.0) for k in model.loss_weights}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = out["loss_reverse"].item()
    for _ in range(40):  # one torch thread (a test worker's) leaves log 2 later than two: about step 30
        opt.zero_grad()
        model(b)["loss"].backward()
        opt.step()
    assert model(b)["loss_reverse"].item() < first - 0.15  # from about log 2: the orders are told apart


def test_matching_rank_loss_puts_each_non_match_below_the_match_it_was_drawn_for():
    """Non-match k belongs to match k mod M; the loss is a two-way cross-entropy per (match, non-match) pair of
    log-odds, blind to a shift shared by a pair and not to their order."""
    matches = torch.tensor([[0.0, 2.0], [1.0, 0.0]])  # log-odds 2, -1
    non_matches = torch.tensor([[0.0, 1.0], [0.0, 0.5], [3.0, 0.0], [0.0, -2.0]])  # log-odds 1, 0.5, -3, -2
    logits = torch.cat([matches, non_matches])
    by_hand = [F.cross_entropy(torch.tensor([[m, n]]), torch.tensor([0])) for m, n in
               [(2.0, 1.0), (-1.0, 0.5), (2.0, -3.0), (-1.0, -2.0)]]
    torch.testing.assert_close(layers.matching_rank_loss(logits, 2), torch.stack(by_hand).mean())
    shifted = logits + torch.tensor([0.0, 5.0])  # every log-odds moved alike: the same order, the same loss
    torch.testing.assert_close(layers.matching_rank_loss(shifted, 2), layers.matching_rank_loss(logits, 2))
    logits.requires_grad_(True)
    layers.matching_rank_loss(logits, 2).backward()
    assert (logits.grad[:2, 1] < 0).all() and (logits.grad[2:, 1] > 0).all()  # descent: matches up, non-matches down
    assert layers.matching_rank_loss(matches, 2).item() == 0.0  # no non-match: nothing to rank


@pytest.mark.parametrize("family", ["simvtp", "svitt"])
def test_w_vtm_rank_adds_the_rank_term_whose_gradient_reaches_the_head_and_the_pair_encoder(family):
    """The term appears only when weighted and adds to the total; alone, its gradient reaches the matching head and
    the layers that read the pair."""
    if family == "simvtp":
        plain, model, b, term = tiny(), tiny(w_vtm_rank=1.0), make_batch(b=4), "vtm_rank"
        head, encoder = model.vtm_head, model.encoder
    else:
        import test_svitt_model as T
        plain, model, b, term = T.tiny_model(), T.tiny_model(w_vtm_rank=1.0), T.batch(), "itm_rank"
        head, encoder = model.itm_head, model.text_encoder
    assert f"loss_{term}" not in plain(b)
    out = model(b)
    weights = dict(model.loss_weights, **{term: 0.0})
    torch.testing.assert_close(out["loss"].detach(), sum(weights[k] * out[f"loss_{k}"] for k in weights
                                                         if f"loss_{k}" in out) + out[f"loss_{term}"])
    model.loss_weights = {k: (1.0 if k == term else 0.0) for k in model.loss_weights}
    model.zero_grad()
    model(b)["loss"].backward()
    for module in (head, encoder):
        grads = [p.grad.abs().sum() for p in module.parameters() if p.grad is not None]
        assert grads and sum(grads).item() > 0


def test_matching_rank_loss_on_the_sum_adds_each_pairs_contrastive_logit_without_training_it():
    """vtm_rank_score "sum": the score is log-odds + the pair's contrastive logit, the sum re-ranking reads; the
    offsets carry no gradient (they come from the contrastive features, which the rank term must not move)."""
    logits = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 3.0]], requires_grad=True)  # log-odds 2 | 1, 3
    offsets = torch.tensor([4.0, 1.0, 0.5], requires_grad=True)
    by_hand = torch.stack([F.softplus(torch.tensor(1.0 + 1.0 - (2.0 + 4.0))),
                           F.softplus(torch.tensor(3.0 + 0.5 - (2.0 + 4.0)))]).mean()
    loss = layers.matching_rank_loss(logits, 1, offsets)
    torch.testing.assert_close(loss, by_hand)
    assert loss.item() < layers.matching_rank_loss(logits, 1).item()  # the contrastive order already agrees
    loss.backward()
    assert offsets.grad is None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="vtm_rank_score"):
        layers.check_rank_score("both")


def test_svitt_rank_term_on_the_sum_trains_the_fusion_layers_and_head_not_the_towers():
    """SViTT's fusion layers and head are the re-ranker: the rank term on the sum reaches them and stops at the
    towers' outputs, so the contrastive order it builds on stays the contrastive losses' own; on the head's
    log-odds alone it reaches the towers as the matching loss does."""
    import test_svitt_model as T
    fusion = T.tiny_model().text_encoder.config.fusion_layer
    for score, towers_learn in (("sum", False), ("head", True)):
        model = T.tiny_model(w_vtm_rank=1.0, vtm_rank_score=score)
        model.loss_weights = {k: (1.0 if k == "itm_rank" else 0.0) for k in model.loss_weights}
        model(T.batch())["loss"].backward()
        layers_ = model.text_encoder.bert.encoder.layer
        reached = {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
                   for name, module in (("head", model.itm_head), ("fusion", layers_[fusion:]),
                                        ("text tower", layers_[:fusion]), ("vision tower", model.vision_encoder))}
        assert reached == {"head": True, "fusion": True, "text tower": towers_learn, "vision tower": towers_learn}
    with pytest.raises(ValueError, match="vtm_rank_score"):
        T.tiny_model(vtm_rank_score="both")


def test_simvtp_rank_term_on_the_sum_is_its_own_loss_and_trains_the_head():
    model = tiny(w_vtm_rank=1.0, vtm_rank_score="sum")
    head_only = tiny(w_vtm_rank=1.0)
    torch.manual_seed(1)
    on_sum = model(make_batch(b=4))["loss_vtm_rank"]
    torch.manual_seed(1)
    on_head = head_only(make_batch(b=4))["loss_vtm_rank"]
    assert torch.isfinite(on_sum) and not torch.isclose(on_sum, on_head)
    model.loss_weights = {k: (1.0 if k == "vtm_rank" else 0.0) for k in model.loss_weights}
    model.zero_grad()
    model(make_batch(b=4))["loss"].backward()
    assert sum(p.grad.abs().sum() for p in model.vtm_head.parameters() if p.grad is not None) > 0
