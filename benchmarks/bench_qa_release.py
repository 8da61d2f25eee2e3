"""QA answer scores: ours (answer_ranking.rank_by_decoder) beside the SViTT release's own rank_answer and
rank_answer_ensemble (models/model_vqa.py), on the same decoder weights and question states.

    .venv/bin/python benchmarks/bench_qa_release.py --release_src ../svitt            # seeded weights, 3 clips
    .venv/bin/python benchmarks/bench_qa_release.py --release_src ../svitt --release_python /tmp/svitt_env/bin/python

The model is svitt_qa_tiny_patch16 (112 px, 8 frames) with seeded weights (every parameter redrawn with std
--weight_scale, so that the decoder's distributions are far from uniform as a trained one's), asked the synthetic
set's five questions about seeded random clips; the closed list is the synthetic set's answer list, tokenised by
our collator (the release tokenises `answer + " [SEP]"`, a second [SEP]: counted and reported separately, not
mixed into the score comparison). Our question states of each clip go to the release's code in its own
environment (benchmarks/release_svitt_qa.py), where its BertLMHeadModel holds our decoder's weights. That
environment is bench_svitt.py's (benchmarks/release_svitt.py) plus what models/model_vqa.py imports:
`/tmp/svitt_env/bin/pip install omegaconf scipy`.

The release returns, per question, its top k answers and their softmax over those k of its score; ours returns a
score per answer. Both are compared as log-probabilities normalised over the k kept answers (a per-question
constant cancels), printed as the max |difference| and the share of questions whose best answer agrees, for:
  - one clip: the release's rank_answer against our likelihood and against scoring="release_concat";
  - --clips clips with lse (the release's configured path, forward_ensemble): rank_answer_ensemble against our
    engine's ensembling (each clip ranked, scores log-sum-exp'd over clips) with likelihood and scoring="release".
With --clips 1 the last pair is the release's path on a one-clip test (its QA recipes always ensemble).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

# bench_common first: it puts the repository's modules on sys.path
from bench_common import print_table, require_svitt_release_checkout, run_job_in_subprocess

import torch  # noqa: E402

import answer_ranking  # noqa: E402
import datasets  # noqa: E402
import model_registry  # noqa: E402
import modeling_svitt  # noqa: E402
import synthetic_dataset  # noqa: E402
from bench_svitt import release_python  # noqa: E402

RELEASE_SCRIPT = Path(__file__).with_name("release_svitt_qa.py")
MAX_Q_LEN, MAX_A_LEN = 25, 5


def seeded_model(seed: int, scale: float) -> modeling_svitt.SViTTQA:
    """The tiny QA model with every parameter redrawn (vectors of norms around 1) from a seeded generator."""
    torch.manual_seed(seed)
    model = model_registry.create("svitt_qa_tiny_patch16").eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if p.dim() == 1 and p.shape[0] > 1 else 0.0))
    return model


def release_decoder_config(model: modeling_svitt.SViTTQA) -> dict:
    """The BertConfig fields with which the release builds its text_decoder (Singularity.build_text_decoder)."""
    cfg = model.text_decoder.config
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.width, num_hidden_layers=cfg.depth,
                num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate,
                max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.layer_norm_eps,
                type_vocab_size=model.text_decoder.bert.embeddings.token_type_embeddings.weight.shape[0],
                hidden_act="gelu", fusion_layer=0, encoder_width=cfg.width, pad_token_id=0)


def question_batch(tokenizer, clips: int, questions: int, seed: int) -> tuple[torch.Tensor, ...]:
    """The synthetic questions (cycled) and seeded clips [clips, Q, 3, 8, 112, 112]."""
    texts = [list(synthetic_dataset.QA_QUESTIONS.values())[i % 5] for i in range(questions)]
    tok = tokenizer(texts, padding="longest", truncation=True, max_length=MAX_Q_LEN, return_tensors="pt")
    video = torch.randn(clips, questions, 3, 8, 112, 112, generator=torch.Generator().manual_seed(seed + 1))
    return video, tok["input_ids"].long(), tok["attention_mask"].long()


def release_tokens_differ(tokenizer, answers: list[str], ours: torch.Tensor) -> int:
    """How many answers the release tokenises otherwise: `answer [SEP]` padded to max_a_len (tasks/vqa.py:106)."""
    rel = tokenizer([a + " [SEP]" for a in answers], padding="max_length", truncation=True, max_length=MAX_A_LEN,
                    return_tensors="pt")["input_ids"]
    ours = torch.nn.functional.pad(ours, (0, MAX_A_LEN - ours.shape[1]))
    return int((rel != ours).any(dim=1).sum())


def normalised(scores: torch.Tensor) -> torch.Tensor:
    """Scores [Q, A] (-inf outside the kept answers) -> log-softmax over the kept ones."""
    return scores.float().log_softmax(dim=1)


def release_scores(ids: list, probs: list, num_answers: int) -> torch.Tensor:
    """The release's (top-k ids, softmax probs) per question -> log-probabilities [Q, A], -inf outside its top k."""
    ids, probs = torch.tensor(ids), torch.tensor(probs, dtype=torch.float64)
    return torch.full((len(ids), num_answers), float("-inf"), dtype=torch.float64).scatter(1, ids, probs.log())


def compare(release: torch.Tensor, ours: torch.Tensor) -> tuple[float, float]:
    """(max |difference| over the answers both keep, % of questions whose best answer agrees)."""
    ours = normalised(ours).double()
    both = torch.isfinite(release) & torch.isfinite(ours)
    diff = (release - ours)[both].abs().max().item()
    return diff, 100.0 * (release.argmax(1) == ours.argmax(1)).double().mean().item()


def our_scores(model, states: list[torch.Tensor], q_mask, a_ids, a_mask, k: int, scoring: str) -> torch.Tensor:
    """Each clip ranked by rank_by_decoder, log-sum-exp over clips (engine_for_qa's lse ensembling)."""
    per_clip = [answer_ranking.rank_by_decoder(model, s, q_mask, a_ids, a_mask, k, scoring)[1] for s in states]
    return answer_ranking.ensemble_clip_scores(torch.stack(per_clip), "lse")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--release_src", required=True, help="a checkout of github:JerryYLi/svitt (commit c8806b3)")
    p.add_argument("--release_python", default=None, help="the release's interpreter (benchmarks/release_svitt.py)")
    p.add_argument("--questions", type=int, default=40)
    p.add_argument("--clips", type=int, default=3, help="clips per question for the ensembled comparison")
    p.add_argument("--k", type=int, default=128, help="answers kept by the first token (the recipes' --k_test)")
    p.add_argument("--weight_scale", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = get_args(argv)
    require_svitt_release_checkout(args.release_src)
    python = release_python(args.release_python)
    torch.set_num_threads(args.threads)
    tokenizer = datasets.build_tokenizer()
    answers = synthetic_dataset.qa_answer_list()
    a_ids, a_mask = datasets.VideoQACollator(tokenizer, MAX_Q_LEN, MAX_A_LEN).answer_tokens(answers)
    model = seeded_model(args.seed, args.weight_scale)
    video, q_ids, q_mask = question_batch(tokenizer, args.clips, args.questions, args.seed)
    with torch.no_grad():
        states = [model.encode_question(video[c], q_ids, q_mask) for c in range(args.clips)]
    k = min(args.k, len(answers))
    decoder_state = {n[len("text_decoder."):]: t for n, t in model.state_dict().items()
                     if n.startswith("text_decoder.")}
    with tempfile.TemporaryDirectory(prefix="bench_qa_release_") as folder:
        inputs = os.path.join(folder, "inputs.pt")
        torch.save(dict(config=release_decoder_config(model), decoder_state=decoder_state, clips=states,
                        question_mask=q_mask, answer_ids=a_ids, answer_mask=a_mask, k=k), inputs)
        rel = run_job_in_subprocess(str(RELEASE_SCRIPT), dict(inputs=inputs, threads=args.threads),
                                    os.path.join(folder, "out.json"), "the release's rank_answer", python=python,
                                    args=("--src", args.release_src))
    one = release_scores(rel["one_clip_ids"], rel["one_clip_probs"], len(answers))
    ens = release_scores(rel["ensemble_ids"], rel["ensemble_probs"], len(answers))
    rows = {
        "1 clip: rank_answer vs ours (likelihood)": compare(one, our_scores(model, states[:1], q_mask, a_ids, a_mask,
                                                                            k, "likelihood")),
        "1 clip: rank_answer vs ours (release_concat)": compare(one, our_scores(model, states[:1], q_mask, a_ids,
                                                                                a_mask, k, "release_concat")),
        f"{args.clips} clips lse: rank_answer_ensemble vs ours (likelihood)": compare(
            ens, our_scores(model, states, q_mask, a_ids, a_mask, k, "likelihood")),
        f"{args.clips} clips lse: rank_answer_ensemble vs ours (release)": compare(
            ens, our_scores(model, states, q_mask, a_ids, a_mask, k, "release")),
    }
    print(f"svitt_qa_tiny_patch16, seeded weights (std {args.weight_scale}), {args.questions} questions, "
          f"{len(answers)} answers, k {k}")
    print_table(["comparison", "max |log-prob diff|", "best answer agrees %"],
                [[name, f"{d:.2e}", f"{a:.1f}"] for name, (d, a) in rows.items()])
    differ = release_tokens_differ(tokenizer, answers, a_ids)
    print(f"answer tokens: the release tokenises `answer [SEP]` ([CLS] answer [SEP] [SEP]): {differ} of "
          f"{len(answers)} answers differ from ours (the comparison above gives both our tokens)")
    return dict(rows=rows, tokens_differ=differ)


if __name__ == "__main__":
    main()
