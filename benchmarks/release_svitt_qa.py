"""The public SViTT release's own answer ranking, run from a checkout the user points to, so that
bench_qa_release.py can compare its answer scores with ours on the same decoder weights (`--release_src DIR`).

It runs in the release's environment (see benchmarks/release_svitt.py; omegaconf and scipy are needed too:
models/model_vqa.py imports them via models/model_retrieval_base.py). What runs is the release's code, unchanged:
`models.xbert.BertLMHeadModel` (the QA model's `text_decoder`, built as `Singularity.build_text_decoder` configures
it: fusion_layer 0, so every layer cross-attends) holding our decoder's weights, and the methods
`Singularity.rank_answer` (one clip) and `Singularity.rank_answer_ensemble` (several clips, eval_frame_ensemble
lse) of models/model_vqa.py, called on a stand-in for the model that holds only what they read (`text_decoder`,
`tokenizer.pad_token_id`, `config.eval_frame_ensemble`). The inputs (question states per clip, masks, answer
tokens, k) come from bench_qa_release.py in a torch file.

    /tmp/svitt_env/bin/python benchmarks/release_svitt_qa.py --src DIR --job '{"inputs": "in.pt"}' --job_out out.json
"""
from __future__ import annotations

import argparse
import json
import types

from release_svitt import import_release, say  # beside this file


def release_decoder(config: dict, state: dict):
    """The release's answer decoder with our decoder's weights (every key but its position_ids buffer must load)."""
    from models.xbert import BertConfig, BertLMHeadModel
    decoder = BertLMHeadModel(BertConfig(**config)).eval()
    report = decoder.load_state_dict(state, strict=False)
    missing = [k for k in report.missing_keys if not k.endswith("position_ids")]
    if missing or report.unexpected_keys:
        raise SystemExit(f"decoder weights do not fit the release's decoder: missing {missing}, unexpected "
                         f"{report.unexpected_keys}")
    return decoder


def rank_job(job: dict) -> dict:
    import torch
    import_release(job["src"])
    from models.model_vqa import Singularity

    torch.set_num_threads(job.get("threads", 1))
    inputs = torch.load(job["inputs"], weights_only=True)  # tensors and plain config values we wrote
    decoder = release_decoder(inputs["config"], inputs["decoder_state"])
    model = types.SimpleNamespace(text_decoder=decoder, tokenizer=types.SimpleNamespace(pad_token_id=0),
                                  config=types.SimpleNamespace(eval_frame_ensemble="lse"))
    clips, q_mask, a_ids, a_mask, k = (inputs[n] for n in ("clips", "question_mask", "answer_ids", "answer_mask", "k"))
    say(f"release rank_answer: {len(q_mask)} questions, {len(a_ids)} answers, k {k}, {len(clips)} clips")
    with torch.no_grad():
        one_ids, one_probs = Singularity.rank_answer(model, clips[0], q_mask, a_ids, a_mask, k)
        ens_ids, ens_probs = Singularity.rank_answer_ensemble(model, list(clips), q_mask, a_ids, a_mask, k)
    return dict(one_clip_ids=one_ids.tolist(), one_clip_probs=one_probs.tolist(),
                ensemble_ids=ens_ids.tolist(), ensemble_probs=ens_probs.tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="a checkout of github:JerryYLi/svitt")
    p.add_argument("--job", required=True, help="JSON: inputs (a torch file), threads")
    p.add_argument("--job_out", required=True, help="where to write the ranks and probabilities (JSON)")
    args = p.parse_args()
    with open(args.job_out, "w") as f:
        json.dump(rank_job(dict(json.loads(args.job), src=args.src)), f)


if __name__ == "__main__":
    main()
