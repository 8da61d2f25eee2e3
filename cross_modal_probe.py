"""Does one modality help reconstruct the other? A probe of a SimVTP pre-training checkpoint (the paper's central
claim: it "reconstructs the masked signal of one modality with the help from another").

On a test list, with the pre-training masks (tube mask on the video, [MASK] on the caption's words; seeded, the
same for every condition) it measures:
- masked-word accuracy (top-1, top-5) with the clip's own video, another clip's video, and no video tokens;
- pixel reconstruction error of the masked tubes (the pre-training loss: MSE on per-tube normalised pixels) with
  the clip's own caption, another clip's caption, and no text; beside it the error of predicting each tube's mean
  (0 in normalised pixels: a decoder that draws nothing), and both again on the quarter of the masked tubes with
  the most contrast (raw pixel std; in the synthetic clips, the tubes the object crosses). A caption names the
  object, so its help can only show where the decoder draws the object better than that mean.
If the partner modality helps, "own" beats "other" and "none". With --word_groups the word figures are also given
per kind of word (e.g. colour, shape, motion words, and the rest): the words only the video can give are where its
help should show. Beside top-1 over the whole vocabulary they give the choice within the word's group (the head's
highest-scoring colour word for a masked colour word, and so on): a young word head that names no colour at all in
its top 1 may still rank the clip's colour first among the colours, which is where the video's help shows first.

    python cross_modal_probe.py --ckpt output/demo/pretrain/checkpoint-4.pth \
        --data_path data/synthetic_2k_64/annotations/test.json --data_root data/synthetic_2k_64
"""
from __future__ import annotations

import argparse
import json

import torch

import annotations
import checkpoint
import datasets
import masking_generator
import model_registry
import utils
import video_transforms

CONDITIONS = ("own", "other", "none")


OTHER_WORDS = "other"  # the group of the masked words no --word_groups group names
MEAN_PREDICTION = "mean"  # the pixel baseline: each masked tube predicted as its own mean (0 once normalised)
HIGH_CONTRAST_SHARE = 0.25  # the share of the masked tubes, by raw pixel std, the pixel figures also cover apart


def read_word_groups(spec: str) -> dict[str, list[str]]:
    """--word_groups: "synthetic" (the synthetic set's colour, shape, size and motion words) or a JSON file
    {group: [word, ...]}."""
    if spec == "synthetic":
        import synthetic_dataset
        return synthetic_dataset.word_groups()
    try:
        with open(spec) as f:
            groups = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--word_groups {spec}: no such file (or give 'synthetic')") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"--word_groups {spec}: not JSON ({e})") from None
    if not isinstance(groups, dict) or not all(isinstance(w, list) and all(isinstance(x, str) for x in w)
                                               for w in groups.values()):
        raise ValueError(f"--word_groups {spec}: expected a JSON object of word lists, {{\"colour\": [\"red\", ...]}}")
    if OTHER_WORDS in groups:
        raise ValueError(f"--word_groups {spec}: the group name {OTHER_WORDS!r} is the probe's (the words of no group)")
    return groups


def token_groups(tokenizer, groups: dict[str, list[str]]) -> dict[int, str]:
    """Token id -> group for the groups' words that are one word piece (a word split into pieces is left to the
    other words: its pieces are masked and predicted one by one); a word in two groups belongs to the first."""
    ids: dict[int, str] = {}
    for group, words in groups.items():
        for word in words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) == 1:
                ids.setdefault(pieces[0], group)
    return ids


@torch.no_grad()
def probe(ckpt: str, data_path: str, data_root: str | None = None, *, seed: int = 0, batch_size: int = 16,
          mask_ratio: float = 0.9, text_mask_ratio: float = 0.75, max_batches: int | None = None,
          word_groups: dict[str, list[str]] | None = None) -> dict:
    """The probe's figures for the checkpoint's model on data_path's first caption per video (with word_groups,
    also word_top1_<condition>/<group>, word_in_group_<condition>/<group>, masked_words/<group> and
    group_choices/<group>, the group's one-piece words a within-group choice picks from)."""
    model = checkpoint.build_model_from(checkpoint.read_checkpoint_file(ckpt), ckpt).eval()
    model_registry.require(model, "probe", f"{ckpt}: {type(model).__name__} is not a SimVTP pre-training model (no "
                           "pixel decoder and word head to probe)")
    cfg = model.model_cfg.get("kwargs", {})
    frames, size = cfg.get("num_frames", 16), cfg.get("img_size", 224)
    loader = _loader(model, data_path, data_root, seed, batch_size, mask_ratio, text_mask_ratio, frames, size)
    group_of = token_groups(loader.collate_fn.tokenizer, word_groups) if word_groups else None
    members = group_members(group_of) if group_of else {}
    sums = {f"word_top{k}_{c}": 0.0 for k in (1, 5) for c in CONDITIONS}
    tube_errors: dict[str, list[torch.Tensor]] = {c: [] for c in (*CONDITIONS, MEAN_PREDICTION)}
    tube_contrast: list[torch.Tensor] = []
    by_group: dict[str, dict[str, int]] = {}
    words = clips = 0
    for n, batch in enumerate(loader):
        if max_batches is not None and n >= max_batches:
            break
        if len(batch["video"]) < 2:  # "other" needs a second clip
            continue
        batch["video"] = video_transforms.normalize_video(batch["video"])
        w, errors, contrast, logits = _batch_figures(model, batch)
        if group_of is not None:
            _count_by_group(by_group, logits, batch["mlm_labels"], group_of, members)
        count = int((batch["mlm_labels"] != -100).sum())
        for key, value in w.items():
            sums[key] += value * count
        for cond, value in errors.items():
            tube_errors[cond].append(value)
        tube_contrast.append(contrast)
        words += count
        clips += len(batch["video"])
    out = {k: 100.0 * v / max(words, 1) for k, v in sums.items()}
    out.update(_pixel_figures({c: torch.cat(v) for c, v in tube_errors.items() if v},
                              torch.cat(tube_contrast) if tube_contrast else None))
    for group in [g for g in [*(word_groups or {}), OTHER_WORDS] if g in by_group]:
        counts = by_group[group]
        out[f"masked_words/{group}"] = counts["words"]
        out.update({f"word_top1_{c}/{group}": 100.0 * counts[c] / counts["words"] for c in CONDITIONS})
        if group != OTHER_WORDS:
            out[f"group_choices/{group}"] = len(members[group])
            out.update({f"word_in_group_{c}/{group}": 100.0 * counts[f"in_group_{c}"] / counts["words"]
                        for c in CONDITIONS})
    return {**out, "masked_words": words, "clips": clips}


def _pixel_figures(tube_errors: dict[str, torch.Tensor], contrast: torch.Tensor | None) -> dict:
    """pixel_mse_<condition> over every masked tube, and .../high_contrast over the quarter of them with the largest
    raw pixel std (ties at the cut included)."""
    if contrast is None:
        return {f"pixel_mse_{c}": float("nan") for c in (*CONDITIONS, MEAN_PREDICTION)}
    busy = contrast >= torch.quantile(contrast, 1.0 - HIGH_CONTRAST_SHARE)
    out = {f"pixel_mse_{c}": e.mean().item() for c, e in tube_errors.items()}
    out.update({f"pixel_mse_{c}/high_contrast": e[busy].mean().item() for c, e in tube_errors.items()})
    out["high_contrast_tubes"] = int(busy.sum())
    return out


def group_members(group_of: dict[int, str]) -> dict[str, torch.Tensor]:
    """Group -> its token ids (the inverse of token_groups' mapping)."""
    lists: dict[str, list[int]] = {}
    for token, group in group_of.items():
        lists.setdefault(group, []).append(token)
    return {g: torch.tensor(ids) for g, ids in lists.items()}


def _count_by_group(by_group: dict, logits: dict[str, torch.Tensor], labels: torch.Tensor,
                    group_of: dict[int, str], members: dict[str, torch.Tensor]) -> None:
    """Add one batch's masked words to each word's group: per condition, whether the word was the top 1 of the
    vocabulary and whether it was the top 1 among its group's words (members: group_members(group_of))."""
    for n, token in enumerate(labels[labels != -100].tolist()):
        group = group_of.get(token, OTHER_WORDS)
        counts = by_group.setdefault(group, {"words": 0, **{c: 0 for c in CONDITIONS},
                                             **{f"in_group_{c}": 0 for c in CONDITIONS}})
        counts["words"] += 1
        for cond in CONDITIONS:
            scores = logits[cond][n]
            counts[cond] += int(scores.argmax() == token)
            if group in members:
                ids = members[group]
                counts[f"in_group_{cond}"] += int(ids[scores[ids].argmax()] == token)


def format_word_groups(figures: dict) -> str:
    """Masked-word top-1 per group of words and condition, one line per group; then, for the named groups, the
    choice within the group (chance: one in the group's words)."""
    groups = [k.split("/", 1)[1] for k in figures if k.startswith("masked_words/")]
    heads = {"own": "own video", "other": "other video", "none": "no video"}
    lines = ["top 1 of the vocabulary",
             f"{'words':<12}{'masked':>8}" + "".join(f"{heads[c]:>13}" for c in CONDITIONS)]
    for g in groups:
        lines.append(f"{g:<12}{figures[f'masked_words/{g}']:>8}"
                     + "".join(f"{figures[f'word_top1_{c}/{g}']:>13.1f}" for c in CONDITIONS))
    named = [g for g in groups if f"group_choices/{g}" in figures]
    if named:
        lines += ["top 1 among the group's words", f"{'words':<12}{'choices':>8}"
                  + "".join(f"{heads[c]:>13}" for c in CONDITIONS) + f"{'chance':>9}"]
        for g in named:
            choices = figures[f"group_choices/{g}"]
            lines.append(f"{g:<12}{choices:>8}" + "".join(f"{figures[f'word_in_group_{c}/{g}']:>13.1f}"
                                                          for c in CONDITIONS) + f"{100.0 / choices:>9.1f}")
    return "\n".join(lines)


def format_pixels(figures: dict) -> str:
    """The masked tubes' pixel error per condition, over all of them and over the high-contrast quarter."""
    heads = {"own": "own caption", "other": "other caption", "none": "no caption", MEAN_PREDICTION: "tube mean"}
    lines = ["pixel error of the masked tubes (normalised pixels; 'tube mean': each tube predicted as its mean)",
             f"{'tubes':<28}" + "".join(f"{h:>15}" for h in heads.values())]
    for label, suffix in (("all", ""), (f"high contrast ({figures.get('high_contrast_tubes', 0)})", "/high_contrast")):
        lines.append(f"{label:<28}" + "".join(f"{figures.get(f'pixel_mse_{c}{suffix}', float('nan')):>15.4f}"
                                              for c in heads))
    return "\n".join(lines)


def _loader(model, data_path, data_root, seed, batch_size, mask_ratio, text_mask_ratio, frames, size):
    records = annotations.read_annotations(data_path, data_root)
    records = [annotations.VideoRecord(r.path, r.captions[:1], r.video_id) for r in records]
    grid = model.token_grid(frames, size, size)
    dataset = datasets.VideoTextDataset(records, mode="train", num_frames=frames, input_size=size, seed=seed,
                                        mask_generator=masking_generator.build_mask_generator("tube", grid,
                                                                                             mask_ratio))
    collator = datasets.VideoTextCollator(datasets.build_tokenizer(), text_mask_ratio=text_mask_ratio,
                                          text_mask_mode=model.text_masking, seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)


def _batch_figures(model, batch: dict) -> tuple[dict, dict, torch.Tensor, dict]:
    """For one batch (B >= 2: "other" pairs each clip with the next one's partner): masked-word top-1/top-5 accuracy
    (fractions) per condition; each masked tube's pixel error per condition and for the mean prediction [B * Nm];
    each masked tube's contrast (the largest of its channels' raw pixel std) [B * Nm]; per condition the word head's
    logits at the masked words."""
    video, mask = batch["video"], batch["video_mask"]
    vis = model.encoder.embed_video(video, mask)
    text = model.text_embeddings(batch["mlm_input_ids"])
    attn = batch["attention_mask"]
    labels = batch["mlm_labels"]
    other = torch.roll(torch.arange(len(video)), 1)
    words, word_logits = {}, {}
    for cond, v in (("own", vis), ("other", vis[other]), ("none", None)):
        out = model.encoder(v, text, attn)
        logits = model.text_cls(out[:, 0 if v is None else v.shape[1]:][labels != -100]).float()
        top5 = logits.topk(5, dim=-1).indices
        target = labels[labels != -100]
        word_logits[cond] = logits
        words[f"word_top1_{cond}"] = (top5[:, 0] == target).float().mean().item()
        words[f"word_top5_{cond}"] = (top5 == target[:, None]).any(-1).float().mean().item()
    target = model.pixel_target(video, mask)
    errors = {MEAN_PREDICTION: (target ** 2).mean(-1).flatten()}
    for cond, t, a in (("own", text, attn), ("other", text[other], attn[other]), ("none", None, None)):
        out = model.encoder(vis, t, a)
        pred = model.decode_pixels(out[:, :vis.shape[1]], mask).float()
        errors[cond] = ((pred - target) ** 2).mean(-1).flatten()
    raw = model.masked_tube_pixels(video, mask)
    contrast = raw.unflatten(-1, (-1, 3)).std(dim=-2).amax(-1).flatten()
    return words, errors, contrast, word_logits


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=utils.HelpFormatter)
    p.add_argument("--ckpt", required=True, help="a SimVTP pre-training checkpoint")
    model_registry.add_model_module_arg(p)
    p.add_argument("--data_path", required=True, help="annotation file (the first caption of each video is used)")
    p.add_argument("--data_root", default=None, help="folder relative video paths are joined to")
    p.add_argument("--seed", type=int, default=0, help="seed of the masks")
    p.add_argument("--batch_size", type=int, default=16, help="clips per batch (>= 2)")
    p.add_argument("--mask_ratio", type=float, default=0.9, help="tube-mask ratio")
    p.add_argument("--text_mask_ratio", type=float, default=0.75, help="share of words masked")
    p.add_argument("--word_groups", default=None,
                   help="also give the word accuracy per kind of word: 'synthetic' (the synthetic set's colour, "
                   "shape, size and motion words) or a JSON file {group: [word, ...]}; other words form 'other'")
    p.add_argument("--output_json", default=None, help="also write the figures to this JSON file")
    return p


def main(args: argparse.Namespace) -> dict:
    groups = read_word_groups(args.word_groups) if args.word_groups else None
    figures = probe(args.ckpt, args.data_path, args.data_root, seed=args.seed, batch_size=args.batch_size,
                    mask_ratio=args.mask_ratio, text_mask_ratio=args.text_mask_ratio, word_groups=groups)
    print(json.dumps(figures, indent=2))
    if args.output_json:
        checkpoint.write_text_atomic(args.output_json, json.dumps(figures, indent=2))
    print(format_pixels(figures))
    if groups:
        print(format_word_groups(figures))
    return figures


if __name__ == "__main__":
    utils.run_entry_point(main, get_args_parser())
