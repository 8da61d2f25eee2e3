"""Reconstruction figure of a SimVTP pre-training checkpoint: any video, any caption.

    python run_simvtp_vis.py --ckpt output/demo/pretrain/checkpoint-19.pth \
        --video data/synthetic/test/test_00000.mp4 --caption "a red disc slides left" --save_path vis.png

One PNG: the original frames, the masked input (masked tubes grey), the reconstruction (visible tubes kept,
masked tubes predicted by the pixel decoder), and the original, masked and predicted caption. The model predicts
each masked tube's pixels normalised by that tube's own mean and std, which the input no longer holds; the figure
de-normalises them (and says how): by default with each masked tube's own true mean and std, as the release's and
VideoMAE's figures do (the shape is predicted, the colour level comes from the input); `--denorm visible` uses only
the visible tubes' statistics.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from timm.models import create_model

import checkpoint
import datasets
import masking_generator
import modeling_simvtp
import utils

DENORM_NOTE = {"tube": "each masked tube's own true per-channel mean/std (as the release's figures)",
               "visible": "the per-channel mean/std of this clip's visible tubes (no hidden pixel used)"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("SimVTP reconstruction figure", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Mask a clip and its caption, reconstruct both with a pre-training "
                                "checkpoint, and draw one PNG.")
    p.add_argument("--ckpt", required=True, help="pre-training checkpoint (ours or the release's)")
    p.add_argument("--video", required=True, help="any video file the decoders read")
    p.add_argument("--caption", required=True, help="the caption to mask and reconstruct")
    p.add_argument("--save_path", default="output/vis/reconstruction.png", help="PNG to write")
    p.add_argument("--model", default=None, help="default: the checkpoint's own (else the release's base model)")
    p.add_argument("--num_frames", type=int, default=None, help="default: the checkpoint's (else 16)")
    p.add_argument("--input_size", type=int, default=None, help="default: the checkpoint's (else 224)")
    p.add_argument("--frame_start", type=int, default=0, help="index of the first frame shown")
    p.add_argument("--frame_stride", type=int, default=None, help="frames between shown frames "
                   "(default: the checkpoint's --sampling_rate, else 4)")
    p.add_argument("--mask_type", default="tube", choices=["tube", "random"])
    p.add_argument("--mask_ratio", type=float, default=0.9)
    p.add_argument("--text_mask_ratio", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0, help="chooses the masked tubes and words")
    p.add_argument("--tokenizer", default=None, help="BERT directory or vocab.txt (default: shipped vocabulary)")
    p.add_argument("--max_text_len", type=int, default=32)
    p.add_argument("--video_backend", default="auto", choices=["auto", "decord", "pyav"])
    p.add_argument("--denorm", default="tube", choices=["tube", "visible"],
                   help="statistics that turn the predicted (per-tube normalised) pixels back into colours: 'tube' "
                   "= each masked tube's own true mean/std (the release's and VideoMAE's figures; shows the "
                   "predicted shape, the colour level comes from the input), 'visible' = the mean/std of the "
                   "clip's visible tubes only (nothing hidden is used)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    return p


def fill_from_checkpoint(args: argparse.Namespace) -> dict:
    """Unset clip and model options take the values the checkpoint was trained with."""
    saved = checkpoint.read_checkpoint_file(args.ckpt).get("args")
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else (saved if isinstance(saved, dict) else {})
    args.model = args.model or saved.get("model") or "pretrain_simvtp_base_patch16_224"
    args.num_frames = args.num_frames or saved.get("num_frames") or 16
    args.input_size = args.input_size or saved.get("input_size") or 224
    args.frame_stride = args.frame_stride or saved.get("sampling_rate") or 4
    return saved


def read_frames(path: str, start: int, stride: int, num_frames: int, backend: str = "auto") -> np.ndarray:
    """uint8 [T, H, W, 3]: frames start, start + stride, ...; an index past the video's end is an error."""
    if start < 0 or stride < 1:
        raise ValueError(f"--frame_start must be >= 0 and --frame_stride >= 1, got {start} and {stride}")
    indices = [start + i * stride for i in range(num_frames)]
    with datasets.open_video(path, backend) as video:
        if indices[-1] >= video.num_frames:
            raise ValueError(f"{path}: has {video.num_frames} frames, but --frame_start {start} with "
                             f"--frame_stride {stride} x {num_frames} frames needs frame {indices[-1]}")
        return video.get_frames(indices)


def clip_tensor(frames: np.ndarray, input_size: int) -> torch.Tensor:
    """Short side resized to input_size first, then the centre square (the release cropped before resizing)."""
    views = datasets.test_views(frames, [list(range(len(frames)))], input_size, input_size, num_crops=1)
    return views[0]  # float32 [3, T, S, S], ImageNet-normalised


def build_model(args: argparse.Namespace, saved: dict, vocab_size: int) -> torch.nn.Module:
    kwargs = dict(img_size=args.input_size, num_frames=args.num_frames, vocab_size=vocab_size)
    if saved.get("decoder_depth"):
        kwargs["decoder_depth"] = saved["decoder_depth"]
    model = create_model(args.model, pretrained=False, **kwargs)
    checkpoint.load_pretrained(model, args.ckpt, strict=True)
    return model.eval()


def mask_inputs(model: torch.nn.Module, args: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, dict]:
    """A video mask [1, N] and the tokenised caption with its MLM-masked copy, all from --seed."""
    rng = np.random.default_rng(args.seed)
    grid = (args.num_frames // model.tubelet_size, args.input_size // model.patch_size,
            args.input_size // model.patch_size)
    video_mask = torch.from_numpy(masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)(rng))
    tok = tokenizer([args.caption], truncation=True, max_length=args.max_text_len, return_tensors="pt")
    ids, att = tok["input_ids"].long(), tok["attention_mask"].long()
    masked, _ = masking_generator.mask_text_tokens(ids[0], att[0], args.text_mask_ratio, rng)
    return video_mask[None], {"input_ids": ids, "attention_mask": att, "mlm_input_ids": masked[None]}


def tube_denormalize(pred: torch.Tensor, target_tubes: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """pred [B, Nm, P] normalised per tube -> pixels, with the true tubes' [B, Nm, P] own per-channel mean and
    unbiased std (the inverse of modeling_simvtp.normalize_tubes)."""
    x = target_tubes.unflatten(-1, (-1, channels))
    mean, std = x.mean(dim=-2, keepdim=True), x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return (pred.unflatten(-1, (-1, channels)) * (std + 1e-6) + mean).flatten(-2)


def missing_pattern(shape: tuple[int, ...], patch: int) -> torch.Tensor:
    """A dark checkerboard for masked tubes [.., P] (p0, p1, p2, c): no colour of a real frame looks like it."""
    cells = patch // 4 or 1
    rows = torch.arange(patch)[:, None] // cells
    cols = torch.arange(patch)[None, :] // cells
    board = 0.18 + 0.14 * ((rows + cols) % 2).float()  # [patch, patch]
    tube = board[None, :, :, None].expand(shape[-1] // (patch * patch * 3), patch, patch, 3).flatten()
    return tube.expand(*shape)


def compose(video01: torch.Tensor, pred01: torch.Tensor, video_mask: torch.Tensor, tubelet: int,
            patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """video01 [1, 3, T, H, W] in [0, 1], pred01 [1, Nm, P], video_mask bool [1, N] ->
    (masked input, reconstruction), both [1, 3, T, H, W]: visible tubes are the input's own pixels."""
    grid = (video01.shape[2] // tubelet, video01.shape[3] // patch, video01.shape[4] // patch)
    tubes = modeling_simvtp.patchify(video01, tubelet, patch)
    masked_tubes, recon_tubes = tubes.clone(), tubes.clone()
    masked_tubes[video_mask] = missing_pattern(masked_tubes[video_mask].shape, patch)
    recon_tubes[video_mask] = pred01.reshape(-1, tubes.shape[-1]).to(tubes.dtype)
    unpatch = lambda t: modeling_simvtp.unpatchify(t, grid, tubelet, patch).clamp(0, 1)  # noqa: E731
    return unpatch(masked_tubes), unpatch(recon_tubes)


def caption_lines(tokenizer, text: dict, filled_ids: torch.Tensor) -> dict[str, str]:
    """Original, masked and predicted caption as text, and how many masked words the model got right."""
    n = int(text["attention_mask"][0].sum())
    to_text = lambda ids: tokenizer.convert_tokens_to_string(  # noqa: E731
        tokenizer.convert_ids_to_tokens(ids[0, 1:n - 1].tolist()))
    changed = text["mlm_input_ids"][0, :n] != text["input_ids"][0, :n]
    right = int((filled_ids[0, :n][changed] == text["input_ids"][0, :n][changed]).sum())
    return {"original": to_text(text["input_ids"]), "masked": to_text(text["mlm_input_ids"]),
            "predicted": to_text(filled_ids), "score": f"{right} of {int(changed.sum())} masked words right"}


def draw_figure(rows: dict[str, torch.Tensor], captions: dict[str, str], note: str, path: str) -> None:
    """rows: name -> [3, T, H, W] in [0, 1]; one column per frame."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    frames = next(iter(rows.values())).shape[1]
    text_h = 0.85  # inches of caption lines above the frames
    fig_h = 1.5 * len(rows) + text_h
    fig, axes = plt.subplots(len(rows), frames, figsize=(1.5 * frames, fig_h), squeeze=False)
    for r, (name, clip) in enumerate(rows.items()):
        for t in range(frames):
            ax = axes[r][t]
            ax.imshow(clip[:, t].permute(1, 2, 0).float().numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_ylabel(name, fontsize=9)
    text = (f"original:   {captions['original']}\nmasked:     {captions['masked']}\n"
            f"predicted: {captions['predicted']}   ({captions['score']})\n{note}")
    fig.text(0.01, 0.99, text, va="top", ha="left", fontsize=8, family="monospace")
    fig.tight_layout(rect=(0, 0, 1, 1 - text_h / fig_h), h_pad=0.3, w_pad=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> str:
    """Build the figure; returns the PNG's path."""
    device = utils.resolve_device(args.device)
    saved = fill_from_checkpoint(args)
    tokenizer = datasets.build_tokenizer(args.tokenizer or saved.get("tokenizer"))
    frames = read_frames(args.video, args.frame_start, args.frame_stride, args.num_frames, args.video_backend)
    model = build_model(args, saved, len(tokenizer)).to(device)
    video = clip_tensor(frames, args.input_size)[None]
    video_mask, text = mask_inputs(model, args, tokenizer)
    out = model.reconstruct(video.to(device), video_mask.to(device),
                            **{k: v.to(device) for k, v in text.items()})
    video01 = modeling_simvtp.denormalize_video(video)
    pred01 = out["pred_pixels_01"].cpu()  # 'visible': de-normalised by reconstruct() itself
    if args.denorm == "tube":
        true_tubes = modeling_simvtp.patchify(video01, model.tubelet_size, model.patch_size)[video_mask]
        pred01 = tube_denormalize(out["pred_pixels"].cpu(), true_tubes[None])
    masked, recon = compose(video01, pred01, video_mask, model.tubelet_size, model.patch_size)
    captions = caption_lines(tokenizer, text, out["filled_ids"].cpu())
    shown = f"frames {args.frame_start}, {args.frame_start + args.frame_stride}, ... (stride {args.frame_stride})"
    note = (f"{os.path.basename(args.video)}, {shown}; {int(video_mask.sum())} of {video_mask.shape[1]} tubes masked "
            f"({args.mask_type}).\nPredicted pixels are de-normalised with {DENORM_NOTE[args.denorm]}.")
    draw_figure({"original": video01[0], "masked input": masked[0], "reconstruction": recon[0]}, captions, note,
                args.save_path)
    print(f"original:  {captions['original']}\nmasked:    {captions['masked']}\npredicted: {captions['predicted']} "
          f"({captions['score']})")
    print(f"Figure written to {args.save_path}")
    return args.save_path


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    try:
        main(parsed)
    except (FileNotFoundError, ValueError, datasets.VideoDecodeError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
