"""Reconstruction figure of a SimVTP pre-training checkpoint on any video and any caption.

    python run_simvtp_vis.py --ckpt output/demo/pretrain/checkpoint-4.pth \\
        --video data/synthetic_2k_64/test/test_00000.mp4 \\
        --caption "the little gray box slides right on a red background" \\
        --frame_start 0 --frame_stride 4 --save_path vis.png

Decodes exactly the frames frame_start + i * frame_stride, resizes their short side to input_size and then takes
the centre square, masks the tubes (tube or random mask) and the caption's words (MLM), and runs the model's
joint pass once (SimVTPPretrain.reconstruct). One PNG: rows original / masked input (masked tubes drawn as a dark
checkerboard) / reconstruction (visible tubes are the input's own pixels, masked tubes the decoder's prediction),
with the original, masked and predicted caption above.

The decoder predicts each masked tube's pixels normalised by that tube's own mean and std, which the input no
longer holds, so some statistics must turn them back into colours. By default (--denorm visible) they are those
reconstruct() uses: the per-channel mean and std over all pixels of the clip's visible tubes; nothing hidden is
used. --denorm tube uses each masked tube's own true mean/std (as VideoMAE's and the release's figures do): the
colour level, and so the rough place of an object, then comes from the hidden pixels and is not a prediction.
"""
from __future__ import annotations

import argparse
import os
import textwrap
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import datasets
import masking_generator
import model_registry
import modeling_simvtp
import utils
import video_io
import video_transforms

DENORM_NOTE = {
    "visible": "the per-channel mean/std over all pixels of this clip's {n} visible tubes (no hidden pixel used)",
    "tube": "each masked tube's own true per-channel mean/std (hidden pixels: the colour level is given, "
            "not predicted)",
}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("run_simvtp_vis.py", description=__doc__,
                                formatter_class=utils.HelpFormatter)
    g = p.add_argument_group("inputs")
    g.add_argument("--ckpt", required=True, help="pre-training checkpoint: ours (run_simvtp_pretraining.py; its "
                   "saved args choose the model and clip shape) or the release's")
    g.add_argument("--video", required=True, help="any video file decord or PyAV can read")
    g.add_argument("--caption", required=True, help="the caption to mask and reconstruct (quote it)")
    g = p.add_argument_group("clip (unset values come from the checkpoint's args, else the release's)")
    g.add_argument("--num_frames", type=int, default=None, help="frames in the clip (else 16)")
    g.add_argument("--input_size", type=int, default=None, help="square side in pixels (else 224)")
    g.add_argument("--frame_start", type=int, default=0, help="index of the first decoded frame (default 0)")
    g.add_argument("--frame_stride", type=int, default=None, help="frames between decoded frames "
                   "(else the checkpoint's --sampling_rate, else 4)")
    g.add_argument("--video_backend", default="auto", choices=["auto", "decord", "pyav"], help="default auto")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="registered model name (default: the one the checkpoint names, or "
                   "for the release's file the one its keys identify)")
    model_registry.add_model_module_arg(g)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ... (default auto)")
    g = p.add_argument_group("masking")
    g.add_argument("--mask_type", default="tube", choices=["tube", "random"], help="video mask (default tube)")
    g.add_argument("--mask_ratio", type=float, default=0.9, help="share of tubes masked (default 0.9)")
    g.add_argument("--text_mask_ratio", type=float, default=0.75, help="share of caption words masked "
                   "(default 0.75)")
    g.add_argument("--seed", type=int, default=0, help="chooses the masked tubes and words (default 0)")
    g.add_argument("--tokenizer", default=None, help="BERT directory or vocab.txt (else the checkpoint's, else "
                   "the shipped bert-base-uncased vocabulary)")
    g.add_argument("--max_text_len", type=int, default=None, help="caption tokens kept (else the checkpoint's, "
                   "else 32)")
    g = p.add_argument_group("output")
    g.add_argument("--denorm", default="visible", choices=["visible", "tube"],
                   help="statistics that turn the predicted per-tube-normalised pixels into colours: 'visible' = "
                   "the clip's visible tubes' per-channel mean/std (what reconstruct() does; default), 'tube' = each "
                   "masked tube's own true mean/std (VideoMAE's figures; uses hidden pixels)")
    g.add_argument("--output_dir", default="output/vis", help="where the PNG goes when --save_path is not given "
                   "(default output/vis)")
    g.add_argument("--save_path", default=None, help="PNG to write (default "
                   "<output_dir>/reconstruction_<video name>.png)")
    return p


# ----------------------------------------------------------------------------------------------- set-up


def fill_defaults(args: argparse.Namespace, saved: dict) -> None:
    """Unset options take the checkpoint's training values, so a clip looks like what the model was trained on."""
    args.num_frames = args.num_frames or saved.get("num_frames") or 16
    args.input_size = args.input_size or saved.get("input_size") or 224
    args.frame_stride = args.frame_stride or saved.get("sampling_rate") or 4
    args.max_text_len = args.max_text_len or saved.get("max_text_len") or 32
    if args.save_path is None:
        stem = os.path.splitext(os.path.basename(args.video))[0]
        args.save_path = os.path.join(args.output_dir, f"reconstruction_{stem}.png")


def load_tokenizer(args: argparse.Namespace, saved: dict):
    """--tokenizer, else the training run's (when that path exists here), else the shipped vocabulary."""
    return datasets.checkpoint_tokenizer(args.tokenizer, saved)


def build_model(args: argparse.Namespace, ckpt: dict) -> torch.nn.Module:
    """The model the checkpoint holds (its model_cfg, else its keys), loaded strictly (a wrong --model is an error,
    not noise); it must be able to reconstruct (a pre-training model)."""
    model = checkpoint.build_model_from(ckpt, args.ckpt, name=args.model)
    model_registry.require(model, "reconstruct", f"{args.ckpt}: model {model.model_cfg['name']} has no pixel decoder "
                           "(reconstruct); the figure needs a pre-training checkpoint and model (e.g. "
                           "simvtp_tiny_patch16)")
    args.model = model.model_cfg["name"]
    return model.eval()


def check_clip_shape(model: torch.nn.Module, args: argparse.Namespace) -> tuple[int, int, int]:
    """The model's token grid (T', H', W') for the clip; a clip that does not split into whole tubes is an error."""
    return model.token_grid(args.num_frames, args.input_size, args.input_size)


# ----------------------------------------------------------------------------------------------- inputs


def frame_indices(start: int, stride: int, num_frames: int) -> list[int]:
    """start, start + stride, ...: exactly the frames shown, no jitter."""
    if start < 0 or stride < 1 or num_frames < 1:
        raise ValueError(f"need --frame_start >= 0, --frame_stride >= 1 and --num_frames >= 1, got {start}, "
                         f"{stride}, {num_frames}")
    return [start + i * stride for i in range(num_frames)]


def read_frames(path: str, indices: list[int], backend: str = "auto") -> np.ndarray:
    """uint8 [T, H, W, 3] of exactly `indices`; asking past the video's end is an error naming the file."""
    with video_io.open_video(path, backend) as video:
        if indices[-1] >= video.num_frames:
            span = indices[-1] - indices[0]
            fits = (f"the largest --frame_start that fits is {video.num_frames - 1 - span}"
                    if span < video.num_frames else "use a smaller --frame_stride or --num_frames")
            raise ValueError(f"{path}: has {video.num_frames} frames, but --frame_start {indices[0]} with "
                             f"--frame_stride {indices[1] - indices[0] if len(indices) > 1 else 1} x "
                             f"{len(indices)} frames needs frame {indices[-1]}; {fits}")
        return video.get_frames(indices)


def clip_tensor(frames: np.ndarray, input_size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> float32 [3, T, S, S], ImageNet-normalised as the datasets do. The short side is
    resized to S first and the centre square cut after (the release cut first and lost the frame's edges)."""
    views = video_transforms.eval_views(frames, [list(range(len(frames)))], input_size, input_size, num_crops=1)
    return video_transforms.normalize_video(views[0])


def mask_inputs(args: argparse.Namespace, grid: tuple[int, int, int], tokenizer) -> tuple[torch.Tensor, dict]:
    """Video mask bool [1, N] and the caption's input_ids / attention_mask / mlm_input_ids [1, L], from --seed."""
    rng = np.random.default_rng(args.seed)
    mask = masking_generator.build_mask_generator(args.mask_type, grid, args.mask_ratio)(rng)
    tok = tokenizer([args.caption], truncation=True, max_length=args.max_text_len, return_tensors="pt")
    ids, att = tok["input_ids"].long(), tok["attention_mask"].long()
    masked, _ = masking_generator.mask_text_tokens(ids[0], att[0], args.text_mask_ratio, rng)
    return torch.from_numpy(mask)[None], {"input_ids": ids, "attention_mask": att, "mlm_input_ids": masked[None]}


# ----------------------------------------------------------------------------------------------- composition


def tube_denormalize(pred: torch.Tensor, true_tubes: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """pred [B, Nm, P] (per-tube normalised) -> pixels with the true tubes' [B, Nm, P] own per-channel mean and
    unbiased std: the exact inverse of modeling_simvtp.normalize_tubes (--denorm tube)."""
    x = true_tubes.unflatten(-1, (-1, channels))
    mean, std = x.mean(dim=-2, keepdim=True), x.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return (pred.unflatten(-1, (-1, channels)) * (std + 1e-6) + mean).flatten(-2)


def missing_pattern(num: int, tube_dim: int, patch: int) -> torch.Tensor:
    """[num, tube_dim] dark checkerboard tubes: unlike grey, no real frame (or synthetic box) looks like it."""
    cell = max(1, patch // 4)
    rows, cols = torch.arange(patch)[:, None] // cell, torch.arange(patch)[None, :] // cell
    board = 0.18 + 0.14 * ((rows + cols) % 2).float()  # [patch, patch]
    frames = tube_dim // (patch * patch * 3)
    tube = board[None, :, :, None].expand(frames, patch, patch, 3).reshape(-1)  # (p0, p1, p2, c) like patchify
    return tube.expand(num, -1)


def compose(video01: torch.Tensor, pred01: torch.Tensor, video_mask: torch.Tensor, tubelet: int,
            patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """video01 [B, 3, T, H, W] in [0, 1], pred01 [B, Nm, P], video_mask bool [B, N] -> (masked input,
    reconstruction), both [B, 3, T, H, W] in [0, 1]; the visible tubes of both are the input's own pixels."""
    grid = (video01.shape[2] // tubelet, video01.shape[3] // patch, video01.shape[4] // patch)
    tubes = modeling_simvtp.patchify(video01.clamp(0, 1), tubelet, patch)
    masked, recon = tubes.clone(), tubes.clone()
    masked[video_mask] = missing_pattern(int(video_mask.sum()), tubes.shape[-1], patch).to(tubes.dtype)
    recon[video_mask] = pred01.reshape(-1, tubes.shape[-1]).to(tubes.dtype).clamp(0, 1)
    return (modeling_simvtp.unpatchify(masked, grid, tubelet, patch),
            modeling_simvtp.unpatchify(recon, grid, tubelet, patch))


def caption_was_cut(tokenizer, caption: str, max_text_len: int) -> bool:
    """The caption has more tokens than --max_text_len keeps (the model sees, and the figure shows, a prefix)."""
    return len(tokenizer(caption, truncation=False)["input_ids"]) > max_text_len


def caption_lines(tokenizer, text: dict, filled_ids: torch.Tensor, cut: bool = False) -> dict[str, str]:
    """Original, masked and predicted caption (between [CLS] and [SEP]) and the masked words' hit count; a caption
    cut at --max_text_len ends in an ellipsis, so the figure does not pass a prefix off as the whole caption."""
    n = int(text["attention_mask"][0].sum())
    tail = " …" if cut else ""

    def words(ids: torch.Tensor) -> str:
        return tokenizer.convert_tokens_to_string(tokenizer.convert_ids_to_tokens(ids[0, 1:n - 1].tolist())) + tail

    truth, masked = text["input_ids"][0, :n], text["mlm_input_ids"][0, :n]
    hidden = masked != truth
    right = int((filled_ids[0, :n][hidden] == truth[hidden]).sum())
    return {"original": words(text["input_ids"]), "masked": words(text["mlm_input_ids"]),
            "predicted": words(filled_ids), "score": f"{right} of {int(hidden.sum())} masked words right"}


@dataclass
class Reconstruction:
    """Everything the figure shows; rows are [3, T, S, S] in [0, 1]."""
    original: torch.Tensor
    masked: torch.Tensor
    recon: torch.Tensor
    video_mask: torch.Tensor  # bool [N]
    frames: list[int]
    captions: dict[str, str]
    note: str


def reconstruct_clip(args: argparse.Namespace) -> Reconstruction:
    """Read, mask, run SimVTPPretrain.reconstruct once and compose the three rows (fills unset args in place)."""
    ckpt = checkpoint.read_checkpoint_file(args.ckpt)  # read once: its args, then its weights
    saved = checkpoint.saved_args(ckpt)
    fill_defaults(args, saved)
    indices = frame_indices(args.frame_start, args.frame_stride, args.num_frames)
    frames = read_frames(args.video, indices, args.video_backend)
    tokenizer = load_tokenizer(args, saved)
    device = utils.resolve_device(args.device)
    model = build_model(args, ckpt).to(device)
    grid = check_clip_shape(model, args)
    video = clip_tensor(frames, args.input_size)[None]
    video_mask, text = mask_inputs(args, grid, tokenizer)
    out = model.reconstruct(video.to(device), video_mask.to(device), **{k: v.to(device) for k, v in text.items()})
    video01 = modeling_simvtp.denormalize_video(video)
    pred01 = out["pred_pixels_01"].cpu()
    if args.denorm == "tube":
        true_tubes = modeling_simvtp.patchify(video01, model.tubelet_size, model.patch_size)[video_mask]
        pred01 = tube_denormalize(out["pred_pixels"].cpu(), true_tubes[None])
    masked, recon = compose(video01, pred01, video_mask, model.tubelet_size, model.patch_size)
    cut = caption_was_cut(tokenizer, args.caption, args.max_text_len)
    return Reconstruction(video01[0].clamp(0, 1), masked[0], recon[0], video_mask[0], indices,
                          caption_lines(tokenizer, text, out["filled_ids"].cpu(), cut), figure_note(args, video_mask))


def figure_note(args: argparse.Namespace, video_mask: torch.Tensor) -> str:
    """The figure's account of what it shows, in particular which statistics de-normalise the prediction."""
    n_masked, n = int(video_mask.sum()), video_mask.shape[1]
    stats = DENORM_NOTE[args.denorm].format(n=n - n_masked)
    return (f"{os.path.basename(args.video)}: frames {args.frame_start} + i x {args.frame_stride}, short side "
            f"resized to {args.input_size} px, centre crop; {n_masked} of {n} tubes masked ({args.mask_type}), "
            f"seed {args.seed}; model {args.model}.\n"
            f"Reconstruction: visible tubes are the input's pixels; masked tubes are the decoder's per-tube-normalised "
            f"prediction x std + mean, with {stats}.")


# ----------------------------------------------------------------------------------------------- drawing


def wrap(text: str, width: int, indent: int) -> str:
    """Hard-wrap one labelled line so long captions stay inside the figure."""
    return textwrap.fill(text, width=width, subsequent_indent=" " * indent, break_long_words=True)


def figure_header(rec: Reconstruction, width_chars: int) -> str:
    c = rec.captions
    lines = [("original:  ", c["original"]), ("masked:    ", c["masked"]),
             ("predicted: ", f"{c['predicted']}   ({c['score']})")]
    text = [wrap(label + value, width_chars, len(label)) for label, value in lines]
    text += [wrap(line, width_chars, 0) for line in rec.note.split("\n")]
    return "\n".join(text)


def draw_figure(rec: Reconstruction, path: str) -> None:
    """One PNG: three rows (original, masked input, reconstruction) x one column per frame, text on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = {"original": rec.original, "masked input": rec.masked, "reconstruction": rec.recon}
    num = rec.original.shape[1]
    cell, font = 1.5, 8  # inches per frame, points
    width = max(cell * num, 8.0)
    header = figure_header(rec, width_chars=int(width * 72 / (0.66 * font)) - 2)  # monospace: ~0.6 em a char
    text_h = (header.count("\n") + 1.6) * font * 1.25 / 72  # inches
    height = cell * len(rows) + 0.3 + text_h
    fig, axes = plt.subplots(len(rows), num, figsize=(width, height), squeeze=False)
    for r, (name, clip) in enumerate(rows.items()):
        for t in range(num):
            ax = axes[r][t]
            ax.imshow(clip[:, t].permute(1, 2, 0).float().numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {rec.frames[t]}", fontsize=font)
            if t == 0:
                ax.set_ylabel(name, fontsize=font + 1)
    fig.text(0.01, 1 - 0.08 / height, header, va="top", ha="left", fontsize=font, family="monospace")
    fig.tight_layout(rect=(0, 0, 1, 1 - text_h / height), h_pad=0.3, w_pad=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(args: argparse.Namespace) -> str:
    """Build the figure and return the PNG's path."""
    rec = reconstruct_clip(args)
    draw_figure(rec, args.save_path)
    c = rec.captions
    print(f"original:  {c['original']}\nmasked:    {c['masked']}\npredicted: {c['predicted']} ({c['score']})")
    print(f"Figure written to {os.path.abspath(args.save_path)}")
    return args.save_path


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser(), video_io.VideoDecodeError)
