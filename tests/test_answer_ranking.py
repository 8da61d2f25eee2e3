"""Closed-list answer ranking holds one copy of a question's memory whatever the number k of answers it re-scores:
the k answers' tokens query the question's memory together (its keys and values computed once), so peak memory
grows with k only by the answer tokens. Scores equal each answer decoded alone over its own question."""
import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

import answer_ranking
import model_registry
from conftest import randomised
from qa_inputs import question_inputs

QA_MODELS = ("simvtp_qa_tiny_patch16", "svitt_qa_tiny_patch16")
WIDTH = 192  # both tiny QA models' memory width


def peak_cpu_bytes(fn) -> int:
    """Peak of the bytes torch's CPU allocator holds while fn runs (every allocation and free, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        if event.tag == _EventType.Allocation:
            sizes.append((event.start_time_ns, event.extra_fields.alloc_size))
        stack.extend(event.children)
    held = peak = 0
    for _, size in sorted(sizes):
        held += size
        peak = max(peak, held)
    return peak


@pytest.fixture(scope="module", params=QA_MODELS)
def qa(request):
    torch.manual_seed(0)
    model = randomised(model_registry.create(request.param, img_size=32, num_frames=2, vocab_size=300), 3,
                       scale=0.2).eval()
    g = torch.Generator().manual_seed(1)
    answers = torch.randint(110, 300, (80, 4), generator=g)
    answers[:, 0], answers[:, -1] = 101, 102
    answers[::3, -1], answers[::3, -2] = 0, 102  # some shorter answers: padding in the rows
    return model, answers, (answers != 0).long()


def memory_of(length: int, questions: int = 2, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(questions, length, dtype=torch.long)
    mask[1, length // 2:] = 0  # a padded question
    return torch.randn(questions, length, WIDTH, generator=g), mask


@pytest.mark.slow
def test_scores_equal_each_answer_decoded_alone_over_its_question(qa):
    model, a_ids, a_mask = qa
    memory, memory_mask = memory_of(12)
    best, scores = answer_ranking.rank_by_decoder(model, memory, memory_mask, a_ids, a_mask, k=6)
    assert (scores.isfinite().sum(dim=1) == 6).all()
    for q, a in scores.isfinite().nonzero().tolist():
        logits = model.decode(a_ids[a:a + 1], a_mask[a:a + 1], memory[q:q + 1], memory_mask[q:q + 1])
        alone = -answer_ranking.answer_token_nll(logits, a_ids[a:a + 1], a_mask[a:a + 1])
        assert scores[q, a].item() == pytest.approx(alone.item(), abs=1e-4)
    assert torch.equal(best, scores.argmax(dim=1))
    with pytest.raises(ValueError, match="cannot serve"):  # never a silent split of one answer over two questions
        model.decode(a_ids[:4], a_mask[:4], *memory_of(12, questions=3))


def test_peak_memory_grows_with_k_by_the_answer_tokens_not_copies_of_the_memory(qa):
    model, a_ids, a_mask = qa
    short, long = 8, 96

    def per_extra_answer(length: int) -> float:
        memory, memory_mask = memory_of(length)
        peak = {k: peak_cpu_bytes(lambda: answer_ranking.rank_by_decoder(model, memory, memory_mask, a_ids, a_mask,
                                                                         k)) for k in (8, 64)}
        return (peak[64] - peak[8]) / (len(memory) * 56)

    one_copy = (long - short) * WIDTH * 4  # what a per-answer copy of the longer memory adds, per answer (fp32)
    assert per_extra_answer(long) - per_extra_answer(short) < one_copy / 4


def test_ranking_scores_come_from_fp32_logits_under_bf16_autocast_while_training_keeps_the_bf16_head(qa):
    """Under bf16 autocast, rank_answers' word head (the Linear onto the vocabulary) runs on fp32 states and gives
    fp32 logits, not bf16-rounded ones (ties would decide ranks); the training loss keeps the autocast head."""
    model, a_ids, a_mask = qa
    video, q_ids, q_mask = question_inputs(2)
    heads = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 300]
    seen = []
    hooks = [h.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype))) for h in heads]
    try:
        with torch.autocast("cpu", torch.bfloat16):
            model.rank_answers(video, q_ids, q_mask, a_ids, a_mask, k=4)
            ranking = list(seen)
            seen.clear()
            model(dict(video=video, question_input_ids=q_ids, question_mask=q_mask, answer_ids=a_ids[:2],
                       answer_mask=a_mask[:2], answer_weights=torch.ones(2), answer_to_question=torch.arange(2)))
    finally:
        for h in hooks:
            h.remove()
    assert len(heads) == 1 and len(ranking) == 2  # the first-token pass and the k answers' pass
    assert ranking == [(torch.float32, torch.float32)] * 2
    assert [out for _, out in seen] == [torch.bfloat16]
