"""Loading weights into SViTT: the release's files read safely (its pickled OmegaConf config included), the
release / Hugging Face BEiT / BERT key maps, and temporal expansion of the relative position tables."""
from __future__ import annotations

import os
import pickle
import re

import pytest
import torch
import torch.nn as nn

import checkpoint
import model_registry
import modeling_simvtp
import modeling_svitt as S
import sparse_attention
import svitt_references
import svitt_weights
from conftest import randomised
from svitt_release import (omegaconf_like, omegaconf_names, release_keys, seeded_state_dict,
                           write_release_file)

# ----------------------------------------------------------------------------------- safe reading


def test_release_file_config_is_read_as_plain_data(tmp_path):
    weights = {"vision_encoder.embeddings.cls_token": torch.randn(1, 1, 8)}
    write_release_file(tmp_path / "r.pth", weights, num_frames=8)
    ckpt = checkpoint.read_checkpoint_file(str(tmp_path / "r.pth"))
    key = "vision_encoder.embeddings.cls_token"
    assert torch.equal(ckpt["model"][key], weights[key])
    assert ckpt["config"]["video_input"]["num_frames"] == 8
    assert ckpt["config"]["vision_encoder_args"]["token_drop_loc"] == [3, 6, 9]
    assert svitt_weights.config_frames(checkpoint.file_config(ckpt)) == 8
    assert ckpt["epoch"] == 9 and ckpt["global_step"] == 1000


class ArmedDictConfig:
    """Named like OmegaConf's DictConfig; building it (BUILD -> __setstate__) or calling it writes a file."""
    marker = None

    def __init__(self, path: str) -> None:
        open(path, "w").close()

    def __setstate__(self, state: dict) -> None:
        open(state["marker"], "w").close()

    def __reduce__(self):
        return (ArmedDictConfig, (self.marker,)) if self.marker else object.__reduce__(self)


ArmedDictConfig.__module__, ArmedDictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"


def armed_file(tmp_path, by_call: bool) -> tuple[str, str]:
    marker = str(tmp_path / ("called" if by_call else "built"))
    armed = ArmedDictConfig.__new__(ArmedDictConfig)
    if by_call:
        armed.marker = marker  # pickled as a call of the class (REDUCE)
    else:
        armed.__dict__["marker"] = marker  # pickled as NEWOBJ + BUILD with this state
    path = str(tmp_path / "armed.pth")
    with omegaconf_names({"omegaconf.dictconfig": [ArmedDictConfig]}):
        torch.save({"model": {"w": torch.arange(3.0)}, "config": armed}, path)
        with open(path, "rb") as f:  # armed indeed: an ordinary unpickler runs it
            torch.load(f, weights_only=False)
    assert os.path.exists(marker)
    os.remove(marker)
    return path, marker


@pytest.mark.parametrize("by_call", [False, True])
def test_allowed_omegaconf_name_runs_nothing(tmp_path, by_call):
    path, marker = armed_file(tmp_path, by_call)
    ckpt = checkpoint.read_checkpoint_file(path)
    assert not os.path.exists(marker)
    assert torch.equal(ckpt["model"]["w"], torch.arange(3.0))


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Unknown:
    pass


def test_other_globals_are_refused_with_a_way_out(tmp_path):
    marker = tmp_path / "ran"
    for name, obj in [("system", Payload(str(marker))), ("Unknown", Unknown())]:
        path = str(tmp_path / f"{name}.pth")
        torch.save({"model": {"w": torch.zeros(1)}, "config": obj}, path)
        with pytest.raises(checkpoint.CheckpointError) as e:
            checkpoint.read_checkpoint_file(path)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"{path}: refused to unpickle ")
        assert name in message.split("refused to unpickle ")[1].split(" ")[0]
        assert "weights_only=False" in message and "torch.save({'model': c['model']}" in message
    assert not marker.exists()


def test_config_stand_ins_cover_every_real_config_global():
    """A config with every kind of OmegaConf value pickles to globals that all have stand-ins."""
    import pickletools
    config = omegaconf_like({"a": {"b": [1, 2.5, "x", None, True, {"c": [[]]}]}})
    with omegaconf_names():
        data = pickle.dumps(config, protocol=2)
    used = {arg.replace(" ", ".") for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    named = {name for _, name in checkpoint.pickled_config_stand_ins()}
    aliases = {"__builtin__.dict": "builtins.dict", "__builtin__.list": "builtins.list",
               "__builtin__.long": "builtins.int"}
    assert {aliases.get(n, n) for n in used} <= named


# ----------------------------------------------------------------------------------- tables and frames


def test_table_frames_from_rows():
    assert [svitt_weights.table_frames(r, (14, 14)) for r in (732, 5106, 10938, 22602)] == [1, 4, 8, 16]
    assert svitt_weights.table_frames(sparse_attention.relative_table_rows(3, 7, 5), (7, 5)) == 3
    with pytest.raises(ValueError, match="5107 rows fits no frame count at a 14x14"):
        svitt_weights.table_frames(5107, (14, 14))
    with pytest.raises(ValueError, match="no frame count"):
        svitt_weights.table_frames(2 * 729 + 3, (14, 14))  # an even number of temporal slices


def test_release_mapping_4_to_8():
    assert svitt_weights.temporal_source_slices(4, 8) == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert svitt_weights.temporal_source_slices(1, 8) == [0] * 15
    assert svitt_weights.temporal_source_slices(4, 4) == list(range(7))


@pytest.mark.parametrize("src,dst", [(4, 8), (8, 4), (4, 16), (2, 3), (1, 4), (4, 4)])
def test_symmetric_mapping(src, dst):
    slices = svitt_weights.temporal_source_slices(src, dst, "symmetric")
    n = 2 * dst - 1
    assert len(slices) == n and slices[dst - 1] == src - 1  # offset 0 <- offset 0
    assert all(slices[i] + slices[n - 1 - i] == 2 * (src - 1) for i in range(n))  # dt and -dt mirrored
    assert slices == sorted(slices) and slices[0] == 0 and slices[-1] == 2 * src - 2
    if src == dst:
        assert slices == list(range(n))
    with pytest.raises(ValueError, match="expand_mode"):
        svitt_weights.temporal_source_slices(src, dst, "linear")


def test_resize_relative_table_copies_slices_and_cls_rows():
    h, w, heads = 3, 2, 2
    spatial = (2 * h - 1) * (2 * w - 1)
    table = torch.randn(sparse_attention.relative_table_rows(4, h, w), heads)
    tables = {"x." + svitt_weights.TABLE_SUFFIX: table, "y": table}
    out = svitt_references.resize_relative_tables(tables, 4, 8, (8, h, w))
    resized = out["x." + svitt_weights.TABLE_SUFFIX]
    assert resized.shape == (sparse_attention.relative_table_rows(8, h, w), heads) and out["y"] is table
    for i, j in enumerate(svitt_weights.temporal_source_slices(4, 8)):
        assert torch.equal(resized[i * spatial:(i + 1) * spatial], table[j * spatial:(j + 1) * spatial])
    assert torch.equal(resized[-3:], table[-3:])
    image = torch.randn(sparse_attention.relative_table_rows(1, h, w), heads)
    repeated = svitt_weights.resize_relative_table(image, 1, 3, (h, w))
    assert torch.equal(repeated[:-3], image[:-3].repeat(5, 1)) and torch.equal(repeated[-3:], image[-3:])


def tower(frames: int, **overrides) -> S.SViTTVisionTower:
    return S.SViTTVisionTower(svitt_references.svitt_tiny_config(num_frames=frames, depth=2, **overrides))


def bias_of(model: S.SViTTVisionTower, layer: int, query: tuple, key: tuple) -> torch.Tensor:
    """The attention bias a layer adds between two patches (t, h, w), through the tower's own lookup."""
    rpb = model.encoder.layer[layer].attention.attention.relative_position_bias
    rows = rpb.patch_rows(torch.tensor([query]), torch.tensor([key]))
    return rpb.lookup(rows[None])[0, :, 0, 0]


@pytest.mark.parametrize("expand_mode", ["release", "symmetric"])
def test_tower_at_4_frames_loads_into_8_frames(tmp_path, expand_mode):
    src = randomised(tower(4), 0).eval()
    torch.save({"model": src.state_dict()}, tmp_path / "t4.pth")
    ckpt = checkpoint.read_checkpoint_file(str(tmp_path / "t4.pth"))
    dst = tower(8).eval()
    mapped, kind = svitt_weights.convert_state_dict(checkpoint.unwrapped_state_dict(ckpt), dst, expand_mode=expand_mode)
    assert kind == f"beit (relative position tables 4 -> 8 frames, {expand_mode} mapping)"
    report = checkpoint.load_weights(dst, mapped, strict=True)
    assert not report.missing and not report.unexpected
    with torch.no_grad():
        out = dst(torch.randn(2, 8, 3, 112, 112))
    assert out.tokens.shape == (2, 1 + 8 * 49, 192) and torch.isfinite(out.pooled).all()
    slices = svitt_weights.temporal_source_slices(4, 8, expand_mode)
    for dt, dh, dw in [(0, 0, 0), (2, 1, -3), (-7, -6, 6), (7, 2, 0), (-3, 0, 1)]:
        query, key = (max(dt, 0), max(dh, 0), max(dw, 0)), (max(-dt, 0), max(-dh, 0), max(-dw, 0))
        src_dt = slices[dt + 7] - 3  # the source offset this one copies
        src_query, src_key = (max(src_dt, 0), query[1], query[2]), (max(-src_dt, 0), key[1], key[2])
        assert torch.equal(bias_of(dst, 1, query, key), bias_of(src, 1, src_query, src_key))
    assert torch.equal(dst.state_dict()["embeddings.cls_token"], src.state_dict()["embeddings.cls_token"])


def test_release_file_config_must_agree_with_tables(tmp_path):
    src = randomised(tower(4), 1)
    release = {svitt_weights.RELEASE_VISION_PREFIX + k: v for k, v in src.state_dict().items()}
    for frames, ok in [(4, True), (None, True), (2, False)]:
        path = str(tmp_path / f"r{frames}.pth")
        write_release_file(path, release, num_frames=frames)
        ckpt = checkpoint.read_checkpoint_file(path)
        dst = tower(8)
        state, config = checkpoint.unwrapped_state_dict(ckpt), checkpoint.file_config(ckpt)
        if ok:
            mapped, kind = svitt_weights.convert_state_dict(state, dst, file_config=config)
            assert kind.startswith("svitt_vision (relative position tables 4 -> 8 frames")
            assert not checkpoint.load_weights(dst, mapped, strict=True).missing
        else:
            with pytest.raises(ValueError, match="num_frames is 2 but its relative position tables are sized for 4"):
                svitt_weights.convert_state_dict(state, dst, file_config=config)


def test_tables_of_another_image_size_are_refused():
    small = tower(4, image_size=64)  # 4x4 patches
    with pytest.raises(ValueError, match=r"relative_position_bias_table: a relative position table of \d+ rows fits "
                                         "no frame count at a 7x7 patch grid"):
        svitt_weights.convert_state_dict(small.state_dict(), tower(4))


class TowerModel(nn.Module):
    """A model holding our tower as `vision_encoder` (the release's names), registered in a test family whose
    converter is SViTT's, so files load through checkpoint.load_pretrained as every entry point loads them."""

    def __init__(self, **config) -> None:
        super().__init__()
        self.vision_encoder = S.SViTTVisionTower(svitt_references.svitt_tiny_config(**{"depth": 2, **config}))


model_registry.register_family(model_registry.ModelFamily(
    name="svitt_loading_test", add_args=lambda g: None, convert_state_dict=svitt_weights.convert_state_dict))


@model_registry.register_model("svitt_loading_test")
def svitt_loading_test_tower(**kwargs) -> TowerModel:
    return TowerModel(**kwargs)


def test_load_pretrained_expands_a_release_file_and_checks_its_config(tmp_path, capsys):
    src = randomised(tower(4), 7)
    release = {svitt_weights.RELEASE_VISION_PREFIX + k: v for k, v in src.state_dict().items()}
    write_release_file(tmp_path / "r4.pth", release, num_frames=4)
    model = model_registry.create("svitt_loading_test_tower", num_frames=8)
    report = checkpoint.load_pretrained(model, str(tmp_path / "r4.pth"), strict=True)
    assert not report.missing and not report.unexpected
    assert "as svitt_vision (relative position tables 4 -> 8 frames, release mapping)" in capsys.readouterr().out
    assert torch.equal(model.vision_encoder.embeddings.cls_token, src.embeddings.cls_token)
    write_release_file(tmp_path / "r2.pth", release, num_frames=2)
    with pytest.raises(checkpoint.CheckpointError, match=f"^{tmp_path / 'r2.pth'}: the file's config.video_input"
                                                         r".num_frames is 2 but its relative position tables are "
                                                         "sized for 4 frames$"):
        checkpoint.load_pretrained(model, str(tmp_path / "r2.pth"))


# ----------------------------------------------------------------------------------- release key lists


def test_release_sources_are_recognised():
    kinds = {kind: svitt_weights.detect_source([k for k, _ in release_keys(kind)])
             for kind in ("pretrain", "retrieval", "qa")}
    assert kinds == {"pretrain": "svitt_pretrain", "retrieval": "svitt_retrieval", "qa": "svitt_qa"}
    assert svitt_weights.recognise_release([k for k, _ in release_keys("pretrain")]) == "svitt_base_patch16_224"
    for kind in ("pretrain", "retrieval", "qa"):  # SimVTP's recogniser does not claim SViTT's files
        assert modeling_simvtp.recognise_release([k for k, _ in release_keys(kind)]) is None
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        svitt_weights.detect_source(["foo.weight"])


def test_pretrain_and_retrieval_names_map_onto_each_other():
    pretrain, retrieval = ({k for k, _ in release_keys(kind) if not k.endswith(svitt_weights.REBUILT_BUFFERS)}
                           for kind in ("pretrain", "retrieval"))
    to_retrieval = svitt_weights.to_target_names(dict.fromkeys(pretrain), retrieval)
    assert set(to_retrieval) - retrieval == {k for k in pretrain if k.startswith("text_encoder.cls.")}
    assert retrieval <= set(to_retrieval)
    to_pretrain = svitt_weights.to_target_names(dict.fromkeys(retrieval), pretrain)
    assert set(to_pretrain) == pretrain - {k for k in pretrain if k.startswith("text_encoder.cls.")}


@pytest.mark.slow
def test_release_vision_part_loads_strictly_into_the_base_tower(tmp_path):
    """A release-format pretrain file's vision_encoder.* tensors (base shapes, 4 frames; index buffers included)
    into our base tower at 4 frames: every tensor placed, none left over. Layers 0-1 only (the other ten have
    the same names and shapes; 2 layers keep the test fast)."""
    keys = [(k, s) for k, s in release_keys("pretrain") if k.startswith(svitt_weights.RELEASE_VISION_PREFIX)
            and not re.match(r"vision_encoder\.encoder\.layer\.([2-9]|1[01])\.", k)]
    assert len(keys) == 233 - 10 * 19
    release = seeded_state_dict(keys, seed=3)
    write_release_file(tmp_path / "pretrain.pth", release, num_frames=4)
    ckpt = checkpoint.read_checkpoint_file(str(tmp_path / "pretrain.pth"))
    base = S.SViTTVisionTower(S.svitt_base_config(num_frames=4, depth=2))
    mapped, kind = svitt_weights.convert_state_dict(checkpoint.unwrapped_state_dict(ckpt), base,
                                        file_config=checkpoint.file_config(ckpt))
    assert kind == "svitt_vision"
    report = checkpoint.load_weights(base, mapped, strict=True)
    assert len(report.loaded) == len(keys) - 2 and not report.missing and not report.unexpected
    own = base.state_dict()
    assert all(torch.equal(own[k[len(svitt_weights.RELEASE_VISION_PREFIX):]], v) for k, v in release.items()
               if not k.endswith("relative_position_index"))


# ----------------------------------------------------------------------------------- Hugging Face BEiT


def tiny_beit_config():
    from transformers import BeitConfig
    return BeitConfig(image_size=64, patch_size=16, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                      intermediate_size=192, use_relative_position_bias=True, use_mean_pooling=True,
                      layer_scale_init_value=0.1, hidden_act="gelu")


def test_huggingface_beit_gives_the_same_outputs(tmp_path):
    from transformers import BeitModel
    torch.manual_seed(0)
    beit = randomised(BeitModel(tiny_beit_config()), 2).eval()
    beit.save_pretrained(tmp_path / "beit")
    path = checkpoint._resolve_weights_path(str(tmp_path / "beit"))
    state = checkpoint.unwrapped_state_dict(checkpoint.read_checkpoint_file(path))
    assert svitt_weights.detect_source(list(state)) == "beit"
    model = TowerModel(image_size=64, patch_size=16, num_frames=1, width=48, depth=2, num_heads=3,
                       sparse_local_attn=0).eval()
    report = checkpoint.load_pretrained(model, str(tmp_path / "beit"))  # the directory, as --beit_path takes it
    assert not report.missing and not report.unexpected
    ours = model.vision_encoder
    mapped, kind = svitt_weights.convert_state_dict({"beit." + k: v for k, v in state.items()}, ours)
    assert kind == "beit"
    for other in (state, beit.state_dict()):  # without "beit."; transformers 5's module names (layers.N.mlp...)
        mapped_other, _ = svitt_weights.convert_state_dict(other, ours)
        assert mapped_other.keys() == mapped.keys() and all(torch.equal(mapped_other[k], mapped[k]) for k in mapped)
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        theirs, mine = beit(pixel_values=image), ours(image[:, None])
    torch.testing.assert_close(mine.tokens, theirs.last_hidden_state, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.pooled, theirs.pooler_output, atol=1e-5, rtol=0)


def test_beit_shared_table_and_heads(tmp_path):
    from transformers import BeitForMaskedImageModeling
    config = tiny_beit_config()
    config.use_relative_position_bias, config.use_shared_relative_position_bias = False, True
    config.use_mean_pooling = False  # then the model has a final beit.layernorm (unused by SViTT)
    source = randomised(BeitForMaskedImageModeling(config), 3)
    source.save_pretrained(tmp_path / "mim")
    state = checkpoint.read_checkpoint_file(str(tmp_path / "mim" / "model.safetensors"))
    shared = state["beit.encoder.relative_position_bias.relative_position_bias_table"]
    ours = tower(4, image_size=64, width=48, num_heads=3)
    mapped, _ = svitt_weights.convert_state_dict(state, ours)
    in_memory, _ = svitt_weights.convert_state_dict(source.state_dict(), ours)  # transformers 5's module names
    assert in_memory.keys() == mapped.keys() and all(torch.equal(in_memory[k], mapped[k]) for k in mapped)
    report = checkpoint.load_weights(ours, mapped, strict=False)
    for i in range(2):  # copied to every layer, repeated over the 7 temporal offsets
        table = ours.state_dict()[f"encoder.layer.{i}.attention.attention.{svitt_weights.TABLE_SUFFIX}"]
        assert torch.equal(table[:-3], shared[:-3].repeat(7, 1)) and torch.equal(table[-3:], shared[-3:])
    assert {"lm_head.weight", "lm_head.bias", "beit.layernorm.weight", "layernorm.weight"} <= set(report.unexpected)
    assert report.missing == ["pooler.layernorm.weight", "pooler.layernorm.bias"]  # a CLS-pooling model has none


# ----------------------------------------------------------------------------------- Hugging Face BERT


def tiny_bert_config(**kwargs):
    from transformers import BertConfig
    return BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=40, **kwargs)


class TextAndVision(nn.Module):
    """The pre-training model's name layout (vision_encoder.*, text_encoder.bert.*, text_encoder.cls.*) built of
    the real parts: our tower and a BERT with cross-attention in every layer."""

    def __init__(self, text: nn.Module) -> None:
        super().__init__()
        self.vision_encoder = tower(4)
        self.text_encoder = text


def test_huggingface_bert_maps_onto_text_encoder(tmp_path):
    from transformers import BertForMaskedLM, BertModel
    torch.manual_seed(0)
    source = randomised(BertForMaskedLM(tiny_bert_config()), 4)
    source.save_pretrained(tmp_path / "bert")
    path = checkpoint._resolve_weights_path(str(tmp_path / "bert"))
    state = checkpoint.unwrapped_state_dict(checkpoint.read_checkpoint_file(path))
    model = TextAndVision(BertForMaskedLM(tiny_bert_config(is_decoder=True, add_cross_attention=True)))
    mapped, kind = svitt_weights.convert_state_dict(state, model)
    report = checkpoint.load_weights(model, mapped, strict=False)
    assert kind == "bert" and not report.unexpected
    assert report.missing and all(".crossattention." in k or k.startswith("vision_encoder.") for k in report.missing)
    own = model.state_dict()
    for k, v in source.state_dict().items():
        assert torch.equal(own["text_encoder." + k], v), k
    # a BertModel's names without prefix, old gamma/beta LayerNorm names, and a pooler (unused)
    plain = randomised(BertModel(tiny_bert_config()), 5).state_dict()
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in plain.items()}
    mapped, kind = svitt_weights.convert_state_dict(old, model)
    report = checkpoint.load_weights(model, mapped, strict=False)
    assert kind == "bert" and sorted(report.unexpected) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert torch.equal(model.state_dict()["text_encoder.bert.embeddings.LayerNorm.weight"],
                       plain["embeddings.LayerNorm.weight"])
    # a retrieval-style model (text_encoder.* without bert.) takes the same file
    retrieval = TextAndVision(BertModel(tiny_bert_config(), add_pooling_layer=False))
    mapped, _ = svitt_weights.convert_state_dict(state, retrieval)
    report = checkpoint.load_weights(retrieval, mapped, strict=False)
    assert all(k.startswith("vision_encoder.") for k in report.missing)
    assert all(k.startswith("cls.") or k.startswith("text_encoder.cls.") for k in report.unexpected)


def test_bert_pretraining_heads_are_reported_unused():
    from transformers import BertForMaskedLM, BertForPreTraining
    model = TextAndVision(BertForMaskedLM(tiny_bert_config()))
    mapped, kind = svitt_weights.convert_state_dict(BertForPreTraining(tiny_bert_config()).state_dict(), model)
    report = checkpoint.load_weights(model, mapped, strict=False)
    assert kind == "bert" and {k.rsplit(".", 1)[0] for k in report.unexpected} == {
        "bert.pooler.dense", "cls.seq_relationship"}
    assert all(k.startswith("vision_encoder.") for k in report.missing)


def test_tied_mlm_decoder_is_filled_from_the_word_embeddings():
    from transformers import BertForMaskedLM
    model = TextAndVision(BertForMaskedLM(tiny_bert_config()))
    state = {k: v for k, v in randomised(BertForMaskedLM(tiny_bert_config()), 6).state_dict().items()
             if not k.startswith("cls.predictions.decoder.")}
    mapped, _ = svitt_weights.convert_state_dict(state, model)
    words = mapped["text_encoder.bert.embeddings.word_embeddings.weight"]
    assert mapped["text_encoder.cls.predictions.decoder.weight"] is words
    assert mapped["text_encoder.cls.predictions.decoder.bias"] is mapped["text_encoder.cls.predictions.bias"]
