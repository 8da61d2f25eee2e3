"""Retrieval fine-tuning and testing for any model family: the task engine_for_finetuning's outline trains
(RetrievalTask: captioned videos, selection on val R@1), and the test flows of run_simvtp_finetuning.py: a test set
once per frame order with optional re-ranking by a matching head, zero-shot, --only_test, and embedding export.
The numbers themselves (embedding, ranks, re-ranking) come from retrieval_eval.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Any, Callable

import numpy as np
import torch

import annotations
import checkpoint
import datasets
import distributed
import engine_for_finetuning
import model_registry
import retrieval_eval
import video_io

RELEASE_DUAL_MODEL = "simvtp_dual_base_patch16"  # the release's fine-tuning model (its name: vit_base_patch16_224)
EXIT_SKIPPED = 3  # exit status of an export that finished without some unreadable videos (named in its metadata)


def eval_config(args: argparse.Namespace, dtype: torch.dtype, mask_ratio: float = 0.0, num_clips: int = 1,
                frame_order: str = "none") -> retrieval_eval.EvalConfig:
    """The retrieval evaluation's settings: the shared clip set-up plus captions, masking and offload."""
    return engine_for_finetuning.clip_eval_config(args, dtype, num_clips, frame_order, max_text_len=args.max_text_len,
                                                  video_mask_ratio=mask_ratio, offload=args.eval_offload,
                                                  match_mask_ratio=args.match_mask_ratio, match_masks=args.match_masks,
                                                  distinct_captions=annotation_format(args).match_by == "caption")


def at_frames(model: torch.nn.Module, num_frames: int, args: argparse.Namespace) -> torch.nn.Module:
    """The same weights in a model built for num_frames-frame clips (--eval_frame_ensemble concat): loaded the way
    a checkpoint of other frames is (SViTT's relative tables expanded), strictly."""
    if model.model_cfg.get("kwargs", {}).get("num_frames") == num_frames:
        return model
    held = {"model": model.state_dict(), "model_cfg": model.model_cfg}
    rebuilt = checkpoint.build_model_from(held, "<the model under test>", num_frames=num_frames)
    print(f"--eval_frame_ensemble concat: {model.model_cfg['name']} rebuilt for {num_frames}-frame clips")
    return rebuilt.to(args.device_obj).eval()


def annotation_format(args: argparse.Namespace) -> annotations.AnnotationFormat:
    """--data_set's caption handling with --paragraph_retrieval / --clean_text / --match_by applied."""
    return annotations.annotation_format(getattr(args, "data_set", None), getattr(args, "paragraph_retrieval", None),
                                      getattr(args, "clean_text", None), getattr(args, "match_by", None))


def read_records(path: str, args: argparse.Namespace, table: bool = False) -> list | annotations.RecordTable:
    """An annotation file's records (in --data_set's format): a list, or with table a annotations.RecordTable (the
    training list: numpy columns that forked loader workers share instead of copying)."""
    read = annotations.read_record_table if table else annotations.read_annotations
    records = read(path, args.data_root, args.skip_bad_records, annotation_format(args))
    captions = records.num_captions if table else sum(len(r.captions) for r in records)
    print(f"Data: {len(records)} videos, {captions} captions from {path}")
    return records


def check_eval_lists(args: argparse.Namespace, lists: dict[str, list | None]) -> None:
    """Every evaluation list checked at start-up (annotations.check_eval_lists), all problems in one error."""
    annotations.check_eval_lists({label: records for label, records in lists.items() if records},
                              args.video_backend, skip=args.skip_eval_check)


def read_text_lines(path: str) -> list[str]:
    """The texts of --text_file: row i of the exported text embeddings is line i, so a blank line (it has no text
    to embed) is refused, every one listed; blank lines after the last text are ignored."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [n for n, line in enumerate(lines, 1) if not line.strip()]
    if blank:
        shown = ", ".join(map(str, blank[:annotations.MAX_LISTED])) + (
            f" and {len(blank) - annotations.MAX_LISTED} more" if len(blank) > annotations.MAX_LISTED else "")
        raise ValueError(f"--text_file {path}: blank line(s) {shown}; every line is one text and row i of the "
                         "exported text embeddings is line i, so remove the blank lines (or put a text on them)")
    if not lines:
        raise ValueError(f"--text_file {path}: no text in it")
    return [line.strip() for line in lines]


def split_val(records: list | annotations.RecordTable, fraction: float,
              seed: int) -> tuple[list | annotations.RecordTable, list | annotations.RecordTable]:
    """A seeded held-out fraction of the training videos (all captions of a video go to the same side), both
    sides in file order and of the type given (a list, or a RecordTable)."""
    is_val = engine_for_finetuning.held_out(len(records), fraction, seed)
    take = records.take if isinstance(records, annotations.RecordTable) else (lambda idx: [records[i] for i in idx])
    return take(np.flatnonzero(~is_val).tolist()), take(np.flatnonzero(is_val).tolist())


def eval_dataset(records: list, args: argparse.Namespace, segments: int, crops: int,
                 frames: int | None = None) -> datasets.VideoTextDataset:
    return datasets.VideoTextDataset(records, mode="test", num_frames=frames or args.num_frames,
                                     sampling_rate=args.sampling_rate, input_size=args.input_size,
                                     short_side_size=args.short_side_size, test_num_segment=segments,
                                     test_num_crop=crops, video_backend=args.video_backend, seed=args.seed,
                                     sample_type=args.sample_type_test, decode_threads=args.decode_threads)


def build_for_training(args: argparse.Namespace, vocab_size: int) -> torch.nn.Module:
    """The retrieval model to fine-tune: the retrieval model of --model (itself when it is one), else of the
    --finetune checkpoint's model, else the release's; --finetune's weights mapped onto it (non-strict). A
    pre-training model is never fine-tuned as it is: its heads for masked words would get no gradient."""
    ckpt = checkpoint.read_checkpoint_file(args.finetune) if args.finetune else {}
    of_file = engine_for_finetuning.checkpoint_model_name(ckpt)
    name = _retrieval_model(args.model) if args.model else (_retrieval_model(of_file) if of_file
                                                            else RELEASE_DUAL_MODEL)
    if args.model and name != model_registry.canonical_name(args.model):
        print(f"--model {args.model}: fine-tuned for retrieval as {name} (its registered retrieval model)")
    return engine_for_finetuning.model_for_training(args, name, vocab_size, ckpt)


def _retrieval_model(name: str) -> str:
    spec = model_registry.model_spec(name)
    return spec.retrieval_model or spec.name


def load_match_model(args: argparse.Namespace) -> torch.nn.Module:
    """--rerank_ckpt (with --rerank_model): a model with the contract's match_logits."""
    if not args.rerank_ckpt:
        raise ValueError(f"--rerank_k {args.rerank_k}: the evaluated model has no matching head; give --rerank_ckpt "
                         "a checkpoint of one that has (e.g. a SimVTP pre-training checkpoint)")
    model = engine_for_finetuning.build_from_file(args.rerank_ckpt, args.rerank_model, args)
    check_can_match(model, args.rerank_ckpt)
    return model


def own_match_model(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module | None:
    """Re-ranking without --rerank_ckpt: the evaluated model itself when it has a matching head (a SViTT model,
    pre-trained or fine-tuned, scores its own top k as the release does); None sends run_test to --rerank_ckpt."""
    if args.rerank_k > 0 and not args.rerank_ckpt and model_registry.supports(model, "rerank"):
        return model
    return None


def contrastive_scale(model: torch.nn.Module) -> float:
    """1 / the evaluated model's contrastive temperature (its similarities times this are its contrastive
    logits), or 0 for a model without one."""
    if not model_registry.supports(model, "temperature"):
        return 0.0
    return 1.0 / float(torch.as_tensor(model.current_temperature()).detach())


def check_can_match(model: torch.nn.Module, path: str) -> None:
    model_registry.require(model, "rerank", f"{path}: {model.model_cfg['name']} has no matching head (match_logits) "
                           "to re-rank with; give --rerank_ckpt a pre-training checkpoint")


# ----------------------------------------------------------------------------------------------- evaluation


def run_test(model: torch.nn.Module, records: list, args: argparse.Namespace, tokenizer, dtype: torch.dtype,
             prefix: str = "test", mask_ratio: float = 0.0, match_model: torch.nn.Module | None = None) -> dict:
    """Evaluate on a test set once per --eval_frame_order (the first order's results are the main ones),
    optionally re-rank, print the tables, write <prefix>_metrics.json + <prefix>_per_query.jsonl and the
    scalars to tensorboard (<prefix>/..., <prefix>_rerank/...)."""
    frames, clips = engine_for_finetuning.eval_frames(args)
    if args.rerank_k > 0 and match_model is None:
        match_model = load_match_model(args)
    if args.eval_frame_ensemble == "concat":
        model = at_frames(model, frames, args)
        if match_model is not None:
            match_model = model if match_model is model else at_frames(match_model, frames, args)
    dataset = eval_dataset(records, args, args.test_num_segment, args.test_num_crop, frames)
    loader = retrieval_eval.build_eval_loader(dataset, tokenizer, args.batch_size, args.num_workers, args.max_text_len,
                                      args.dist_eval, args.eval_host_memory_gb, device=args.device_obj)
    runs = {order: evaluate_one_order(model, match_model, records, loader, args, tokenizer,
                                  eval_config(args, dtype, mask_ratio, clips, order), frames, prefix)
            for order in dict.fromkeys(args.eval_frame_order)}
    first = next(iter(runs.values()))
    out = {**first["out"], "views": f"{args.test_num_segment}x{args.test_num_crop}",
           "sample_type_test": args.sample_type_test, "num_frames_test": frames, "clips": clips,
           "clip_sampling": "sparse" if args.eval_sparse_sampling else "consecutive",
           "frame_ensemble": args.eval_frame_ensemble, "frame_order": next(iter(runs))}
    if mask_ratio:
        out["video_mask_ratio"] = mask_ratio
    if len(runs) > 1:
        out["frame_orders"] = {order: frame_order_row(r["out"]) for order, r in runs.items()}
        add_in_order_preference(out["frame_orders"], {order: r["own_sim"] for order, r in runs.items()})
        print(format_frame_orders(out["frame_orders"]), flush=True)
    retrieval_eval.write_results(args.output_dir, prefix, out, first["per_query"])
    write_tensorboard(args, prefix, out)
    return out


def evaluate_one_order(model, match_model, records: list, loader, args: argparse.Namespace, tokenizer,
                   cfg: retrieval_eval.EvalConfig, frames: int, prefix: str) -> dict:
    """One evaluation (and re-ranking) in cfg's frame order: {"out": metrics (+ "rerank"), "per_query": ...}."""
    res = retrieval_eval.evaluate(model, loader, tokenizer, cfg)
    video_ids = [records[i].video_id for i in res["indices"]]
    out = dict(res["metrics"])
    table = {"contrastive": res["metrics"]}
    if args.rerank_k > 0:
        t0 = time.time()
        one_view = eval_dataset(records, args, 1, 1, frames)
        scores = retrieval_eval.match_scores(
            match_model, retrieval_eval.candidate_pairs(res["sim"], args.rerank_k), retrieval_eval.FirstViews(one_view, res["indices"]),
            res["captions"], tokenizer, cfg, num_workers=args.num_workers)
        out["rerank"] = retrieval_eval.rerank_metrics(res["sim"], res["text_to_video"], scores, args.rerank_k)
        out["rerank"].update(seconds=time.time() - t0, pairs=len(scores),
                             score="log-odds of match, " + args.eval_frame_ensemble + " over clips")
        table[f"re-ranked k={args.rerank_k}"] = out["rerank"]
        scale = contrastive_scale(model)
        if scale:  # the same scores plus the contrastive logit (a sum as BLIP's)
            out["rerank_contrastive"] = retrieval_eval.rerank_metrics(res["sim"], res["text_to_video"], scores,
                                                              args.rerank_k, contrastive_scale=scale)
            out["rerank_contrastive"]["score"] = out["rerank"]["score"] + " + similarity / temperature"
            table[f"re-ranked k={args.rerank_k} + contrastive"] = out["rerank_contrastive"]
    order = "" if cfg.frame_order == "none" else f", frames {cfg.frame_order}"
    print(retrieval_eval.format_table(table, title=f"{prefix} retrieval on {len(video_ids)} videos{order}"), flush=True)
    per_query = retrieval_eval.per_query_records(res["sim"], res["text_to_video"], res["ranks"], video_ids, res["captions"])
    gt = retrieval_eval.ground_truth_mask(res["text_to_video"], *res["sim"].shape).to(res["sim"].device)
    own_sim = retrieval_eval.best_ground_truth_scores(res["sim"], gt).float().cpu()  # for add_in_order_preference
    return {"out": out, "per_query": per_query, "own_sim": own_sim}


def add_in_order_preference(rows: dict[str, dict], own_sim: dict[str, torch.Tensor]) -> None:
    """Each later order's row gains `in_order_preferred`: the share (%) of captions whose own clip, frames as in
    the first order, scores above the same clip in this order (ties count against). Unlike R@1 it does not depend
    on what the other videos show: a caption that names a motion should prefer its clip played forwards to the
    same clip reversed, whether or not another test video could take its place."""
    orders = list(rows)
    for order in orders[1:]:
        preferred = (own_sim[orders[0]] > own_sim[order]).float().mean().item()
        rows[order]["in_order_preferred"] = 100.0 * preferred


def frame_order_row(out: dict) -> dict:
    row = {"t2v_R@1": out["t2v_R@1"], "v2t_R@1": out["v2t_R@1"]}
    if "rerank" in out:
        row.update({"rerank_t2v_R@1": out["rerank"]["t2v_R@1"], "rerank_v2t_R@1": out["rerank"]["v2t_R@1"]})
    return row


def format_frame_orders(rows: dict[str, dict]) -> str:
    """frame order -> t2v R@1, v2t R@1 (contrastive; and re-ranked when present)."""
    columns = [("t2v R@1", "t2v_R@1", 9, ".1f"), ("v2t R@1", "v2t_R@1", 9, ".1f")]
    reranked = any("rerank_t2v_R@1" in r for r in rows.values())
    if reranked:
        columns += [("re-ranked t2v", "rerank_t2v_R@1", 15, ".1f"), ("v2t", "rerank_v2t_R@1", 7, ".1f")]
    preference = any("in_order_preferred" in r for r in rows.values())
    if preference:
        columns.append(("in order preferred", "in_order_preferred", 20, ".1f"))
    title = "Temporal sensitivity (contrastive" + (", re-ranked" if reranked else "") + ")"
    if preference:
        title += "; in order preferred: % of captions scoring their clip in the first order above it in that one"
    return engine_for_finetuning.format_frame_orders(title, rows, columns)


def write_tensorboard(args: argparse.Namespace, prefix: str, out: dict) -> None:
    """The test's scalars next to training's (args.log_dir): <prefix>/t2v_R@1 ... and <prefix>_rerank/..., and
    per frame order <prefix>_order_<order>/..."""
    numbers = lambda d: {k: v for k, v in d.items() if isinstance(v, (int, float))}  # noqa: E731
    groups = {prefix: numbers(out)}
    if "rerank" in out:
        groups[f"{prefix}_rerank"] = numbers(out["rerank"])
    groups.update({f"{prefix}_order_{order}": row for order, row in out.get("frame_orders", {}).items()})
    engine_for_finetuning.write_test_scalars(args.log_dir, groups)


def only_test(args: argparse.Namespace, dtype: torch.dtype, tokenizer) -> dict:
    """The given weights, once, on the test set; auto-resume never replaces them."""
    weights = engine_for_finetuning.weights_under_test(args, report_latest=True)
    path = args.test_data_path or args.data_path
    records = read_records(path, args)
    check_eval_lists(args, {f"test list {path}": records})
    model = engine_for_finetuning.build_from_file(weights, args.model, args)
    return run_test(model, records, args, tokenizer, dtype, match_model=own_match_model(model, args))


def zero_shot(args: argparse.Namespace, dtype: torch.dtype, tokenizer) -> dict:
    """Retrieval with a pre-training model's unimodal passes; re-ranking uses its own matching head unless
    --rerank_ckpt names another model."""
    if not args.finetune:
        raise ValueError("--zero_shot needs --finetune PRETRAIN_CKPT")
    path = args.test_data_path or args.data_path
    records = read_records(path, args)
    check_eval_lists(args, {f"zero-shot test list {path}": records})
    model = engine_for_finetuning.build_from_file(args.finetune, args.model, args)
    match_model = None
    if args.rerank_k > 0 and not args.rerank_ckpt:
        check_can_match(model, args.finetune)
        match_model = model
    return run_test(model, records, args, tokenizer, dtype, prefix="zero_shot",
                    mask_ratio=args.zero_shot_video_mask_ratio, match_model=match_model)


def export(args: argparse.Namespace, dtype: torch.dtype, tokenizer) -> dict:
    """Embed the videos of an annotation file or folder and/or the lines of a text file, then save them.

    Videos that do not open are left out (found at start-up, unless --skip_eval_check), named on the console and
    in the export's metadata ("skipped_videos"). Returns {"written": files, "skipped_videos": [...]}; the command
    line's exit status is then EXIT_SKIPPED."""
    if not args.finetune:
        raise ValueError("--export_embeddings needs --finetune CKPT (the weights to embed with)")
    texts = read_text_lines(args.text_file) if args.text_file else None
    records, skipped = usable_export_records(args)
    model = engine_for_finetuning.build_from_file(args.finetune, args.model, args)
    cfg = eval_config(args, dtype, args.zero_shot_video_mask_ratio if args.zero_shot else 0.0)
    video = video_ids = None
    if records:
        loader = retrieval_eval.build_eval_loader(eval_dataset(records, args, args.test_num_segment, args.test_num_crop),
                                          tokenizer, args.batch_size, args.num_workers, args.max_text_len,
                                          args.dist_eval, args.eval_host_memory_gb, device=args.device_obj)
        emb = retrieval_eval.embed_dataset(model, loader, tokenizer, cfg, with_text=False)
        video, video_ids = emb["video"], [records[i].video_id for i in emb["indices"]]
    text = retrieval_eval.encode_texts(model, tokenizer, texts, cfg) if texts else None
    meta = {"model": model.model_cfg["name"], "checkpoint": args.finetune, "num_frames": args.num_frames,
            "input_size": args.input_size, "views": f"{args.test_num_segment}x{args.test_num_crop}",
            "sample_type_test": args.sample_type_test,
            "skipped_videos": skipped}
    written = []
    if distributed.is_main_process():
        written = retrieval_eval.save_embeddings(args.export_embeddings, meta, video, video_ids or (), text, texts or ())
        print(f"Exported {0 if video is None else len(video)} videos and {0 if text is None else len(text)} texts "
              f"to {', '.join(written)}" + (f"; {len(skipped)} unreadable video(s) skipped (exit status "
                                            f"{EXIT_SKIPPED})" if skipped else ""))
    return {"written": written, "skipped_videos": skipped}


def usable_export_records(args: argparse.Namespace) -> tuple[list, list[dict]]:
    """The videos to export (--video_dir's video files by name, or --data_path's records) without those the
    start-up check finds unreadable, and those: [{"video_id", "path", "status", "message"}]."""
    if args.video_dir:
        names = sorted(f for f in os.listdir(args.video_dir)
                       if os.path.splitext(f)[1].lower() in video_io.VIDEO_EXTENSIONS)
        records = [annotations.VideoRecord(path=os.path.join(args.video_dir, f), captions=[], video_id=f)
                   for f in names]
    else:
        records = read_records(args.data_path, args) if args.data_path else []
    if not records or args.skip_eval_check:
        return records, []
    print(f"Checking the {len(records)} videos to export (each opens; --skip_eval_check skips this)", flush=True)
    problems = {p["path"]: p for p in annotations.find_unusable_videos(records, args.video_backend,
                                                                      label="export check")}
    if not problems:
        return records, []
    skipped = [{"video_id": r.video_id, "path": r.path, "status": problems[r.path]["status"],
                "message": problems[r.path]["message"]} for r in records if r.path in problems]
    print(f"Skipping {len(skipped)} of {len(records)} videos that cannot be read (listed in the export's metadata "
          f"as skipped_videos):\n{annotations.format_unusable(skipped)}", flush=True)
    return [r for r in records if r.path not in problems], skipped


# ----------------------------------------------------------------------------------------------- fine-tuning


class RetrievalTask(engine_for_finetuning.FinetuneTask):
    """Retrieval fine-tuning: captioned videos, the retrieval model of the family, selection on val R@1 t2v + v2t,
    the best weights tested (and re-ranked) as --only_test would."""

    def read(self, path: str, train: bool = False) -> list | annotations.RecordTable:
        return read_records(path, self.args, table=train)

    def split_val(self, records: list | annotations.RecordTable) -> tuple:
        train, val = split_val(records, self.args.val_fraction, self.args.seed)
        print(f"Validation: {len(val)} videos held out of the training list (seed {self.args.seed})")
        return train, val

    def val_label(self) -> str:
        a = self.args
        return (f"--val_data_path {a.val_data_path}" if a.val_data_path
                else f"validation videos held out of --data_path {a.data_path}")

    def check_eval_lists(self, lists: dict) -> None:
        check_eval_lists(self.args, lists)

    def train_dataset(self, records: list | annotations.RecordTable) -> datasets.VideoTextDataset:
        return train_dataset(records, self.args)

    def collator(self) -> datasets.VideoTextCollator:
        return datasets.VideoTextCollator(self.tokenizer, max_text_len=self.args.max_text_len, seed=self.args.seed)

    def model_for_training(self) -> torch.nn.Module:
        return build_for_training(self.args, len(self.tokenizer))

    def validator(self, model: torch.nn.Module, records: list) -> Callable[[int], dict]:
        args, tokenizer = self.args, self.tokenizer  # one centre view per video keeps per-epoch validation cheap
        val_loader = retrieval_eval.build_eval_loader(eval_dataset(records, args, 1, 1), tokenizer, args.batch_size,
                                                      args.num_workers, args.max_text_len, args.dist_eval,
                                                      args.eval_host_memory_gb, device=args.device_obj)

        def validate_epoch(epoch: int) -> dict:
            val = retrieval_eval.evaluate(model, val_loader, tokenizer, eval_config(args, self.dtype))["metrics"]
            print(retrieval_eval.format_table({f"val epoch {epoch}": val}, title="Validation"))
            return val
        return validate_epoch

    def test(self, model: torch.nn.Module, records: list, train_records: Any) -> dict:
        return run_test(model, records, self.args, self.tokenizer, self.dtype,
                        match_model=own_match_model(model, self.args))


def train_dataset(records: list | annotations.RecordTable, args: argparse.Namespace) -> datasets.VideoTextDataset:
    return datasets.VideoTextDataset(records, mode="train", num_frames=args.num_frames,
                                     sampling_rate=args.sampling_rate, input_size=args.input_size,
                                     short_side_size=args.short_side_size, video_backend=args.video_backend,
                                     seed=args.seed, sample_type=args.sample_type,
                                     decode_threads=args.decode_threads,
                                     excluded=annotations.exclusions_for(records, args.exclude_list, args.data_root),
                                     match_by=annotation_format(args).match_by)


def build_train_loader(records: list | annotations.RecordTable, args: argparse.Namespace, tokenizer):
    """(loader, dataset, sampler) of the retrieval training set."""
    task = RetrievalTask(args, tokenizer, torch.float32)
    return engine_for_finetuning.build_train_loader(task.train_dataset(records), task.collator(), args)
