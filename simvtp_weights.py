"""SimVTP's checkpoint key mapping: the release's pre-training and MSR-VTT files, VideoMAE's K400 pre-training and
BERT's embeddings mapped onto a SimVTP model's names (pre-training model, dual encoder or QA model).

`convert_state_dict` is the family's converter (registered by modeling_simvtp.py, called by checkpoint.py through
model_registry); it tells the three models apart by their parts, so it needs no model class.
"""
from __future__ import annotations

import re

import torch.nn as nn

import model_registry


def recognise_release(keys: list[str]) -> str | None:
    """A file without model_cfg (the release's): its full model by its keys; VideoMAE / BERT files are only parts."""
    return {"simvtp_finetune": "simvtp_dual_base_patch16",
            "simvtp_pretrain": "simvtp_base_patch16"}.get(_source_or_none(keys))


def _source_or_none(keys: list[str]) -> str | None:
    try:
        return detect_source(keys)
    except ValueError:
        return None


def detect_source(keys: list[str]) -> str:
    """simvtp_finetune | simvtp_qa | simvtp_pretrain | videomae_pretrain | bert, from a checkpoint's tensor names."""
    def has(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)
    if has("video_encoder.", "text_encoder.text_embeddings."):  # not SViTT's text_encoder.*
        return "simvtp_finetune"
    if has("answer_decoder."):
        return "simvtp_qa"
    if has("encoder.blocks.", "encoder.patch_embed."):
        return "simvtp_pretrain" if has("text_embeddings.", "text_cls.", "vtm_head.") else "videomae_pretrain"
    if has("bert.embeddings.", "embeddings.word_embeddings."):
        return "bert"
    raise ValueError(f"unrecognised checkpoint ({len(keys)} tensors, first {keys[:5]}): expected a SimVTP, "
                     "VideoMAE pre-training or BERT checkpoint")


def _bert_embedding_name(key: str) -> str | None:
    """'bert.embeddings.LayerNorm.gamma' / 'embeddings.LayerNorm.weight' -> 'LayerNorm.weight'; None otherwise."""
    for prefix in ("bert.embeddings.", "embeddings."):
        if key.startswith(prefix):
            name = key[len(prefix):]
            return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name))
    return None


def _map_bert(state_dict: dict, targets: tuple[str, ...]) -> dict:
    """BERT's embeddings to every `targets` prefix; its other tensors keep their names (reported unused)."""
    out = {}
    for k, v in state_dict.items():
        name = _bert_embedding_name(k)
        if name is None:
            out[k] = v
        for prefix in targets if name is not None else ():
            out[prefix + name] = v
    return out


def _map_pretrain_to_dual(state_dict: dict) -> dict:
    """Both branches take encoder.patch_embed / encoder.blocks (prefix dropped) and text_embeddings; the rest
    (encoder.norm, decoder, heads) keep their names and are reported unused."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("encoder.patch_embed.", "encoder.blocks.")):
            rest = k[len("encoder."):]
        elif k.startswith("text_embeddings."):
            rest = k
        else:
            out[k] = v
            continue
        out["video_encoder." + rest] = out["text_encoder." + rest] = v
    return out


def _map_dual_to_qa(state_dict: dict) -> dict:
    """A fine-tuned dual encoder into the QA model: its video branch is the unified encoder (patch_embed, blocks;
    its fc_norm, the nearest trained output norm, as encoder.norm) with the branch's text_embeddings (the
    pre-training's, frozen in retrieval fine-tuning); the text branch keeps its names and is reported unused."""
    out = {}
    for k, v in state_dict.items():
        if k.startswith(("video_encoder.patch_embed.", "video_encoder.blocks.")):
            out["encoder." + k[len("video_encoder."):]] = v
        elif k.startswith("video_encoder.fc_norm."):
            out["encoder.norm." + k[len("video_encoder.fc_norm."):]] = v
        elif k.startswith("video_encoder.text_embeddings."):
            out[k[len("video_encoder."):]] = v
        else:
            out[k] = v
    return out


def answer_decoder_from_encoder_blocks(state_dict: dict, depth: int, decoder_depth: int) -> dict:
    """The QA model's answer decoder from a state dict with encoder.* names: decoder layer i <- encoder block
    depth - decoder_depth + i (norm1, attn, norm2, mlp by name; cross_norm / cross_attn <- the same block's norm1 /
    attn: SimVTP has no cross-attention, its own self-attention is the nearest pre-trained start), the final norm
    <- encoder.norm (the one the word head was trained on). Entries the state dict already has stay."""
    out = dict(state_dict)
    first = depth - decoder_depth
    for k, v in state_dict.items():
        if k.startswith("encoder.norm."):
            out.setdefault("answer_decoder.norm." + k[len("encoder.norm."):], v)
            continue
        if not k.startswith("encoder.blocks."):
            continue
        index, part, rest = k[len("encoder.blocks."):].split(".", 2)
        i = int(index) - first
        if not 0 <= i < decoder_depth:
            continue
        layer = f"answer_decoder.layers.{i}."
        out.setdefault(f"{layer}{part}.{rest}", v)
        cross = {"attn": "cross_attn", "norm1": "cross_norm"}.get(part)
        if cross:
            out.setdefault(f"{layer}{cross}.{rest}", v)
    return out


# what a pre-training / VideoMAE / dual-encoder file holds that the QA model has by design no place for: dropped
# by convert_state_dict (named in the kind it returns), so a load report lists only real gaps
QA_UNUSED = ("mask_token", "temp")
QA_UNUSED_PREFIXES = ("decoder.", "encoder_to_decoder.", "vtm_head.", "text_encoder.")
QA_UNUSED_PARTS = {"simvtp_pretrain": "pixel decoder and matching head", "videomae_pretrain": "pixel decoder",
                   "simvtp_finetune": "text branch"}


def convert_state_dict(state_dict: dict, model: nn.Module, file_config: dict | None = None) -> tuple[dict, str]:
    """Map a checkpoint's tensors onto `model`'s names -> (mapped state_dict, source kind). See detect_source.
    `file_config` (a file's own training config, e.g. the SViTT release's) tells SimVTP nothing. Into the QA
    model, a source without an answer decoder starts it from the top encoder blocks, and the parts it has no place
    for (pre-training heads, a dual encoder's text branch: QA_UNUSED*) are dropped and counted in the kind."""
    model = model_registry.unwrap(model)
    kind = detect_source(list(state_dict))
    dual, qa = hasattr(model, "video_encoder"), hasattr(model, "answer_decoder")  # SimVTPDualEncoder, SimVTPQA
    if kind == "bert":
        targets = ("video_encoder.text_embeddings.", "text_encoder.text_embeddings.") if dual else ("text_embeddings.",)
        return _map_bert(state_dict, targets), kind
    if qa:
        if kind == "simvtp_qa":
            return dict(state_dict), kind
        mapped = _map_dual_to_qa(state_dict) if kind == "simvtp_finetune" else dict(state_dict)
        unused = [k for k in mapped if k in QA_UNUSED or k.startswith(QA_UNUSED_PREFIXES)]
        mapped = answer_decoder_from_encoder_blocks({k: v for k, v in mapped.items() if k not in unused},
                                                    len(model.encoder.blocks), len(model.answer_decoder.layers))
        dropped = f"; {len(unused)} tensors of its {QA_UNUSED_PARTS[kind]} dropped" if unused else ""
        return mapped, f"{kind} (answer decoder from the top encoder blocks{dropped})"
    if dual and kind != "simvtp_finetune":
        return _map_pretrain_to_dual(state_dict), kind
    if not dual and kind == "simvtp_finetune":
        raise ValueError("a fine-tuned dual-encoder checkpoint cannot initialise a pre-training model "
                         "(it has no decoder, word or matching head); use a simvtp_dual_* model")
    return dict(state_dict), kind
