"""SViTT's checkpoint conversion: the release's files, Hugging Face BEiT and BERT mapped onto a SViTT model's names,
and the relative position tables resized to its frame count (temporal expansion).

`convert_state_dict` is the family's converter (registered by modeling_svitt.py, called by checkpoint.py through
model_registry); everything here works on state dicts and the model's own tensor names, so it needs no model class.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

import model_registry
from sparse_attention import RelativePositionBias3D, relative_table_rows

# Sources `convert_state_dict` recognises by their tensor names (see detect_source):
#   svitt_pretrain   the release's pre-training model: text_encoder.bert.*, MLM head text_encoder.cls.*
#   svitt_retrieval  the release's retrieval model: text_encoder.* without "bert.", no MLM head
#   svitt_qa         the release's QA model: adds text_decoder.*
#   svitt_vision     vision_encoder.* only (a release file's vision tower kept on its own)
#   beit             a Hugging Face BEiT (beit.*), or the same names without the prefix (e.g. our bare tower's)
#   bert             a Hugging Face BERT (bert.*, cls.*), or embeddings.* / encoder.* without the prefix
# Everything is mapped onto the names of the model being loaded, read from its own state_dict (with or without
# "bert." in its text names, with or without "vision_encoder."), and the relative position tables are resized to
# its frame count (temporal expansion).

RELEASE_VISION_PREFIX = "vision_encoder."
TEXT_PREFIX = "text_encoder."
DECODER_PREFIX = "text_decoder."
TABLE_SUFFIX = "relative_position_bias.relative_position_bias_table"
REBUILT_BUFFERS = ("relative_position_index", "embeddings.position_ids")  # saved by the release, rebuilt by us
EXPAND_MODES = ("release", "symmetric")
# source kind -> registered model of that file
RELEASE_MODELS = {"svitt_pretrain": "svitt_base_patch16_224", "svitt_qa": "svitt_qa_base_patch16_224",
                  "svitt_retrieval": "svitt_retrieval_base_patch16_224"}
MLM_HEAD_PREFIX = TEXT_PREFIX + "cls."


def detect_source(keys: list[str]) -> str:
    """svitt_pretrain | svitt_retrieval | svitt_qa | svitt_vision | beit | bert, from a checkpoint's tensor names."""
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)
    if has("text_decoder."):
        return "svitt_qa"
    if has("text_encoder.bert."):
        return "svitt_pretrain"
    if has(TEXT_PREFIX):
        return "svitt_retrieval"
    if has(RELEASE_VISION_PREFIX):
        return "svitt_vision"
    if has("bert.", "cls.predictions.", "embeddings.word_embeddings.", "encoder.layer.0.attention.self."):
        return "bert"
    if has("beit.", "embeddings.patch_embeddings.", "embeddings.cls_token", "layers.0.attention.q_proj."):
        return "beit"
    raise ValueError(f"unrecognised checkpoint ({len(keys)} tensors, first {keys[:5]}): expected a SViTT release "
                     "(pretrain, retrieval, qa), Hugging Face BEiT or BERT checkpoint")


def recognise_release(keys: list[str]) -> str | None:
    """A file without model_cfg: the registered model its keys identify (the release's pre-training, retrieval or
    QA model)."""
    try:
        return RELEASE_MODELS.get(detect_source(keys))
    except ValueError:
        return None


def convert_state_dict(state_dict: dict, model: nn.Module, file_config: dict | None = None,
                       expand_mode: str | None = None) -> tuple[dict, str]:
    """Map a checkpoint's tensors onto `model`'s names -> (mapped state dict, source kind and any resizing).

    Sources: see detect_source. Saved index buffers / position_ids the model rebuilds are dropped; text names
    follow the model's (with or without `bert.`); bias tables of another frame count are resized to the model's
    (temporal expansion, `expand_mode` "release" or "symmetric", default the model's `temporal_expand_mode` or
    "release"). `file_config`: the release file's config (its num_frames must agree with its tables)."""
    model = model_registry.unwrap(model)
    kind = detect_source(list(state_dict))
    own = model.state_dict()
    target_keys = set(own)
    mapped = map_beit(state_dict) if kind == "beit" else map_bert(state_dict) if kind == "bert" else dict(state_dict)
    mapped = {k: v for k, v in mapped.items() if k in target_keys or not k.endswith(REBUILT_BUFFERS)}
    mapped = to_target_names(mapped, target_keys)
    has_decoder = any(k.startswith(DECODER_PREFIX) for k in target_keys)  # the QA model (SViTTQA)
    init_decoder = has_decoder and not any(k.startswith(DECODER_PREFIX) for k in mapped)
    if init_decoder:  # a pre-training (or BERT) checkpoint into the QA model: the decoder from the fusion layers
        mapped = decoder_from_fusion_layers(mapped, model.text_encoder.config.fusion_layer,
                                            len(model.text_decoder.bert.encoder.layer))
    mapped = _fill_tied(mapped, target_keys)
    mapped, head_note = drop_absent_mlm_head(mapped, target_keys)
    mode = expand_mode or getattr(model, "temporal_expand_mode", None) or "release"
    if mode not in EXPAND_MODES:
        raise ValueError(f"expand_mode must be one of {EXPAND_MODES}, got {mode!r}")
    mapped, note = _expand_frames(mapped, own, model, config_frames(file_config), mode)
    return mapped, kind + note + (" (answer decoder from the fusion layers)" if init_decoder else "") + head_note


def decoder_from_fusion_layers(state_dict: dict, fusion_layer: int, decoder_depth: int) -> dict:
    """ALBEF/Singularity's initialisation of the answer decoder from a pre-trained text tower (names with
    `text_encoder.bert.`): fusion layers fusion_layer + i -> `text_decoder.bert.encoder.layer.i`, the embeddings
    and the MLM head copied to `text_decoder.*`. Entries the state dict already has under text_decoder stay."""
    src_layer = TEXT_PREFIX + "bert.encoder.layer."
    out = dict(state_dict)
    for k, v in state_dict.items():
        new = None
        if k.startswith(src_layer):
            index, rest = k[len(src_layer):].split(".", 1)
            if 0 <= int(index) - fusion_layer < decoder_depth:
                new = f"{DECODER_PREFIX}bert.encoder.layer.{int(index) - fusion_layer}.{rest}"
        elif k.startswith((TEXT_PREFIX + "bert.embeddings.", TEXT_PREFIX + "cls.")):
            new = DECODER_PREFIX + k[len(TEXT_PREFIX):]
        if new is not None:
            out.setdefault(new, v)
    return out


def drop_absent_mlm_head(state_dict: dict, target_keys: set[str]) -> tuple[dict, str]:
    """A file's MLM head (`text_encoder.cls.*`, a pre-training or BERT file's) into a model without one (retrieval,
    QA): dropped, so a strict load succeeds, and counted in the note for the load report."""
    if any(k.startswith(MLM_HEAD_PREFIX) for k in target_keys):
        return state_dict, ""
    kept = {k: v for k, v in state_dict.items() if not k.startswith(MLM_HEAD_PREFIX)}
    dropped = len(state_dict) - len(kept)
    return kept, f" (its MLM head dropped: {dropped} tensors this model has no use for)" if dropped else ""


def model_grid(model: nn.Module) -> tuple[int, int, int] | None:
    """(T, h, w) patch grid of the model's vision tower (None: the model has no SViTT tower)."""
    for m in model.modules():
        if isinstance(m, RelativePositionBias3D):
            return m.grid
    return None


def _expand_frames(state_dict: dict, own: dict, model: nn.Module, declared: int | None,
                   expand_mode: str) -> tuple[dict, str]:
    """Resize the source's bias tables to the model's frame count -> (state dict, note for the load report)."""
    grid = model_grid(model)
    if grid is None:
        return state_dict, ""
    dst = state_dict_frames({k: v for k, v in own.items() if k.endswith(TABLE_SUFFIX)}, grid)
    src = state_dict_frames({k: v for k, v in state_dict.items() if k in own}, grid)
    if src is None:
        return state_dict, ""
    if declared is not None and declared != src:
        raise ValueError(f"the file's config.video_input.num_frames is {declared} but its relative position "
                         f"tables are sized for {src} frames")
    if dst is None or src == dst:
        return state_dict, ""
    resized = {k: resize_relative_table(v, src, dst, grid[-2:], expand_mode) if k in own and k.endswith(TABLE_SUFFIX)
               else v for k, v in state_dict.items()}
    return resized, f" (relative position tables {src} -> {dst} frames, {expand_mode} mapping)"


def to_target_names(state_dict: dict, target_keys: set[str]) -> dict:
    """Release-style names -> the target model's: `text_encoder.` with or without `bert.` as the model has it,
    and no `vision_encoder.` for a bare vision tower."""
    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in target_keys)
    text_bert = has(TEXT_PREFIX + "bert.")
    text_plain = has(TEXT_PREFIX) and not text_bert
    bare_tower = not has(RELEASE_VISION_PREFIX) and "embeddings.cls_token" in target_keys
    out = {}
    for k, v in state_dict.items():
        if k.startswith(TEXT_PREFIX):
            rest = k[len(TEXT_PREFIX):]
            if text_bert and not rest.startswith(("bert.", "cls.")):
                k = TEXT_PREFIX + "bert." + rest
            elif text_plain and rest.startswith("bert."):
                k = TEXT_PREFIX + rest[len("bert."):]
        elif bare_tower and k.startswith(RELEASE_VISION_PREFIX):
            k = k[len(RELEASE_VISION_PREFIX):]
        out[k] = v
    return out


def _fill_tied(state_dict: dict, target_keys: set[str]) -> dict:
    """The MLM decoder's weight and bias are tied to the word embeddings and `predictions.bias`: a file holding
    only one name of a pair (Hugging Face drops the tied copy) fills the other."""
    out = dict(state_dict)
    for key in target_keys:
        if key.endswith("cls.predictions.decoder.weight"):
            owner = key[:-len("cls.predictions.decoder.weight")]
            pairs = ((key, owner + "bert.embeddings.word_embeddings.weight"),
                     (owner + "cls.predictions.decoder.bias", owner + "cls.predictions.bias"))
            for tied, source in pairs:
                if tied in target_keys and tied not in out and source in out:
                    out[tied] = out[source]
    return out


def config_frames(file_config: dict | None) -> int | None:
    """config.video_input.num_frames of a release file (read as plain data by checkpoint.read_checkpoint_file)."""
    video_input = (file_config or {}).get("video_input")
    frames = video_input.get("num_frames") if isinstance(video_input, dict) else None
    return int(frames) if isinstance(frames, (int, float, str)) and str(frames).isdigit() else None


def table_frames(rows: int, grid_hw: tuple[int, int]) -> int:
    """Frame count T of a bias table with `rows` = (2T-1)*(2h-1)*(2w-1) + 3 rows at an h x w patch grid."""
    h, w = grid_hw
    spatial = (2 * h - 1) * (2 * w - 1)
    slices, rest = divmod(rows - 3, spatial)
    if rows <= 3 or rest or slices % 2 == 0:
        raise ValueError(f"a relative position table of {rows} rows fits no frame count at a {h}x{w} patch grid "
                         f"(rows = (2T-1)*{spatial} + 3); was it trained at another image size?")
    return (slices + 1) // 2


def temporal_source_slices(src_frames: int, dst_frames: int, expand_mode: str = "release") -> list[int]:
    """For each of the 2*dst-1 temporal offsets of the new table, the source slice it copies.

    release: nearest neighbour as the release resizes, slice i <- floor(i*(2*src-1)/(2*dst-1)) (4 -> 8:
    0,0,0,1,1,2,2,3,3,4,4,5,5,6,6: not symmetric, offset -1 takes source offset -1 but +1 takes 0).
    symmetric: offset dt <- the source offset nearest dt*(src-1)/(dst-1) (halves away from 0), so offset 0 <- 0
    and dt, -dt take mirrored slices."""
    n_src, n_dst = 2 * src_frames - 1, 2 * dst_frames - 1
    if expand_mode == "release":
        return [i * n_src // n_dst for i in range(n_dst)]
    if expand_mode == "symmetric":
        ratio = (src_frames - 1) / (dst_frames - 1) if dst_frames > 1 else 0.0
        offsets = [(i - (dst_frames - 1)) * ratio for i in range(n_dst)]
        return [src_frames - 1 + int(math.copysign(math.floor(abs(o) + 0.5), o)) for o in offsets]
    raise ValueError(f"expand_mode must be one of {EXPAND_MODES}, got {expand_mode!r}")


def resize_relative_table(table: torch.Tensor, src_frames: int, dst_frames: int, grid_hw: tuple[int, int],
                          expand_mode: str = "release") -> torch.Tensor:
    """[(2*src-1)*S + 3, H] -> [(2*dst-1)*S + 3, H]: temporal slices of S = (2h-1)(2w-1) rows picked by
    temporal_source_slices, the three [CLS] rows copied."""
    expected = relative_table_rows(src_frames, *grid_hw)
    if table.shape[0] != expected:
        raise ValueError(f"table of {table.shape[0]} rows, expected {expected} for {src_frames} frames at "
                         f"{grid_hw[0]}x{grid_hw[1]} patches")
    slices = table[:-3].unflatten(0, (2 * src_frames - 1, -1))
    index = torch.tensor(temporal_source_slices(src_frames, dst_frames, expand_mode), device=table.device)
    return torch.cat([slices[index].flatten(0, 1), table[-3:]])


def state_dict_frames(state_dict: dict, grid: tuple[int, ...]) -> int | None:
    """The frame count the state dict's bias tables were trained at (None without tables); tables of different
    frame counts are a ValueError."""
    found = {}
    for k, v in state_dict.items():
        if k.endswith(TABLE_SUFFIX):
            try:
                found[k] = table_frames(v.shape[0], tuple(grid[-2:]))
            except ValueError as e:
                raise ValueError(f"{k}: {e}") from None
    if len(set(found.values())) > 1:
        raise ValueError(f"relative position tables of different frame counts: {sorted(set(found.values()))}")
    return next(iter(found.values()), None)


BEIT_TOWER_PARTS = ("embeddings.cls_token", "embeddings.patch_embeddings.", "encoder.layer.", "pooler.")


# transformers >= 5 names a BEiT's modules differently in memory (its files keep the names above): -> file names
BEIT_MEMORY_NAMES = ((r"^layers\.(\d+)\.relative_position_bias\.",
                      r"encoder.layer.\1.attention.attention.relative_position_bias."),
                     (r"^layers\.(\d+)\.attention\.([qkv])_proj\.", r"encoder.layer.\1.attention.attention.\2_proj."),
                     (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
                     (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
                     (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
                     (r"^layers\.", "encoder.layer."), (r"^shared_position_bias\.", "encoder.relative_position_bias."),
                     (r"\.q_proj\.", ".query."), (r"\.k_proj\.", ".key."), (r"\.v_proj\.", ".value."))


def beit_file_name(name: str) -> str:
    """A BEiT name without `beit.`, as its files spell it ('layers.0.mlp.fc1.weight' ->
    'encoder.layer.0.intermediate.dense.weight'); file names pass unchanged."""
    if not name.startswith(("layers.", "shared_position_bias.")):
        return name
    for pattern, repl in BEIT_MEMORY_NAMES:
        name = re.sub(pattern, repl, name)
    return name


def map_beit(state_dict: dict) -> dict:
    """Hugging Face BEiT names (with or without `beit.`; file or transformers-5 module names) ->
    `vision_encoder.*`. A shared table (`encoder.relative_position_bias.*`, pre-training-only checkpoints) is
    copied to every layer; heads, mask token and final layernorm keep their names (reported unused). Tables
    stay 2-D sized (T = 1) here."""
    out, shared, layers = {}, None, set()
    for k, v in state_dict.items():
        name = beit_file_name(k[len("beit."):] if k.startswith("beit.") else k)
        if name == "encoder.relative_position_bias.relative_position_bias_table":
            shared = v
        elif name.startswith("encoder.relative_position_bias."):
            continue  # the shared index buffer: rebuilt
        elif name.startswith(BEIT_TOWER_PARTS):
            out[RELEASE_VISION_PREFIX + name] = v
            if name.startswith("encoder.layer."):
                layers.add(int(name.split(".")[2]))
        else:
            out[k] = v
    for i in sorted(layers) if shared is not None else ():
        out.setdefault(f"{RELEASE_VISION_PREFIX}encoder.layer.{i}.attention.attention.{TABLE_SUFFIX}", shared)
    return out


def _bert_name(key: str) -> str | None:
    """'bert.encoder.layer.0.output.LayerNorm.gamma' -> 'text_encoder.bert.encoder.layer.0.output.LayerNorm.weight';
    None for BERT parts SViTT has no place for (pooler, next-sentence head)."""
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key))
    name = key[len("bert."):] if key.startswith("bert.") else key
    if name.startswith(("embeddings.", "encoder.")):
        return TEXT_PREFIX + "bert." + name
    if key.startswith("cls.predictions."):
        return TEXT_PREFIX + key
    return None


def map_bert(state_dict: dict) -> dict:
    """Hugging Face BERT (BertForMaskedLM / BertModel, old gamma/beta names too) -> `text_encoder.bert.*` and
    `text_encoder.cls.*`; pooler and next-sentence head keep their names (reported unused). Cross-attention has
    no source: it stays randomly initialised (missing in a non-strict load), as ALBEF does."""
    return {_bert_name(k) or k: v for k, v in state_dict.items()}
