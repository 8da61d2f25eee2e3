"""Scoring answers with an answer decoder (ALBEF's VQA design), shared by both families' QA models.

A QA model that generates answers exposes `decode(answer_ids, answer_mask, memory, memory_mask, fp32_logits=False)
-> logits [N, La, vocab]`: teacher-forced next-token logits of answers ([CLS] answer [SEP], padded) over the states
its question pass produced (`memory` [N, M, D], `memory_mask` [N, M], 1 = a real state); with fp32_logits its
word head runs outside autocast on fp32 states (word_logits): ranking asks for it, training does not. Given Q < N
memory rows, each serves N / Q consecutive answers (their tokens query it together): ranking k answers per
question then holds one copy of a question's memory, not k. Everything here is built on that one method, so
training loss, closed-list ranking and clip ensembling are the same for every family.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn.functional as F

ENSEMBLES = ("lse", "mean", "max")
# likelihood: log P(answer) = sum of its tokens' log-probs. The SViTT release adds a first-token term to that sum
# (kept to measure it, not to use; docs/qa.md): release, its configured path
# (rank_answer_ensemble, one clip): log softmax over the vocabulary of the first-token *probabilities*, i.e. that
# probability (0..1) minus a constant; release_concat (its rank_answer): the first token's log-prob, counted twice.
SCORINGS = ("likelihood", "release", "release_concat")


class AnswerDecoder(Protocol):
    def decode(self, answer_ids: torch.Tensor, answer_mask: torch.Tensor, memory: torch.Tensor,
               memory_mask: torch.Tensor, fp32_logits: bool = False) -> torch.Tensor: ...


def word_logits(head: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, fp32: bool) -> torch.Tensor:
    """A decoder's word head on its final states; with `fp32` outside autocast on fp32 states: answer scores from
    bf16 logits tie (the head's rounding decides ranks), while training's loss keeps the autocast head (speed)."""
    if not fp32:
        return head(states)
    with torch.autocast(states.device.type, enabled=False):
        return head(states.float())


def answer_token_nll(logits: torch.Tensor, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
    """Decoder logits [N, La, V] over inputs [CLS] a_1 .. [SEP] -> per answer the summed NLL [N] of a_1 .. [SEP]
    (position i predicts token i+1; padding ignored)."""
    targets = answer_ids[:, 1:].masked_fill(answer_mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none", ignore_index=-100)
    return nll.sum(dim=1)


def answer_nll(model: AnswerDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, answer_ids: torch.Tensor,
               answer_mask: torch.Tensor, answer_to_question: torch.Tensor) -> torch.Tensor:
    """Summed NLL [N] of each answer row given its question (answer_to_question [N] indexes the questions)."""
    logits = model.decode(answer_ids, answer_mask, memory[answer_to_question], memory_mask[answer_to_question])
    return answer_token_nll(logits, answer_ids, answer_mask)


def weighted_answer_loss(model: AnswerDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, batch: dict
                         ) -> torch.Tensor:
    """Teacher forcing on a VideoQACollator batch: sum over distinct answers of (share of the annotators) x NLL,
    divided by the number of questions."""
    nll = answer_nll(model, memory, memory_mask, batch["answer_ids"], batch["answer_mask"],
                     batch["answer_to_question"].to(memory.device))
    return (batch["answer_weights"].to(nll) * nll).sum() / len(batch["question_input_ids"])


def qa_training_loss(model, batch: dict) -> torch.Tensor:
    """A QA model's training loss on a VideoQACollator batch. The question pass's states come from the batch when
    it carries them (`memory`, `memory_mask`: computed once for a frozen question pass, --cache_memory), else from
    model.answer_memory(video, question_input_ids, question_mask)."""
    if "memory" in batch:
        memory, memory_mask = batch["memory"], batch["memory_mask"]
    else:
        memory, memory_mask = model.answer_memory(batch["video"], batch["question_input_ids"], batch["question_mask"])
    return weighted_answer_loss(model, memory, memory_mask, batch)


@torch.no_grad()
def rank_by_decoder(model: AnswerDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor, k: int, scoring: str = "likelihood"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed-list answering: the decoder's first-token distribution after [CLS] picks each question's top k
    answers of the list answer_ids [A, La], which are re-scored by their full log-likelihood (`scoring`
    release / release_concat: plus the release's first-token term, see SCORINGS), from the decoder's fp32 logits.
    memory [Q, M, D] -> (best answer index [Q], scores [Q, A]: log-likelihood, -inf outside the top k)."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}")
    num_q, num_a = len(memory), len(answer_ids)
    k = min(k, num_a)
    start = answer_ids[:1, :1].expand(num_q, 1)
    first = model.decode(start, torch.ones_like(start), memory, memory_mask, fp32_logits=True)[:, 0].log_softmax(-1)
    top_first, top = first[:, answer_ids[:, 1]].topk(k, dim=1)  # [Q, k]
    rows = top.flatten()  # question-major: each question's k answers are consecutive and share its memory row
    logits = model.decode(answer_ids[rows], answer_mask[rows], memory, memory_mask, fp32_logits=True)
    ll = -answer_token_nll(logits, answer_ids[rows], answer_mask[rows]).view(num_q, k)
    if scoring == "release":
        ll = ll + first.exp().log_softmax(-1)[:, answer_ids[:, 1]].gather(1, top)
    elif scoring == "release_concat":
        ll = ll + top_first
    scores = torch.full((num_q, num_a), float("-inf"), device=memory.device).scatter(1, top, ll)
    return scores.argmax(dim=1), scores


def ensemble_clip_scores(scores: torch.Tensor, mode: str = "lse") -> torch.Tensor:
    """Answer scores of several clips of a video [C, Q, A] -> [Q, A]: log-sum-exp, mean or max over clips (an
    answer outside a clip's top k scores -inf there: lse and max ignore that clip, mean excludes the answer)."""
    if mode == "lse":
        return scores.logsumexp(dim=0)
    if mode == "mean":
        return scores.mean(dim=0)
    if mode == "max":
        return scores.amax(dim=0)
    raise ValueError(f"ensemble mode must be one of {', '.join(ENSEMBLES)}, got {mode!r}")
