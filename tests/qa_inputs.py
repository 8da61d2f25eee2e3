"""Hand-made inputs for the QA model tests of both families (not a test module): answers padded as the QA
collator pads them, seeded questions with one padded, and each answer's log-likelihood scored token by token."""
import torch

SMALL = dict(img_size=32, num_frames=2, vocab_size=300)  # a tiny QA model that runs in milliseconds
CLS, SEP = 101, 102
ANSWERS = [[150], [151, 152], [150, 153, 154], [160], [161, 162]]


def padded(answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists (without [CLS] / [SEP]) -> answer_ids / answer_mask as the QA collator gives them."""
    rows = [[CLS, *a, SEP] for a in answers]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    return ids, torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])


def question_inputs(num_questions: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(2)
    video = torch.randn(num_questions, 3, 2, 32, 32, generator=g)
    ids = torch.randint(110, 300, (num_questions, 5), generator=g)
    ids[:, 0] = CLS
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0  # one padded question
    return video, ids, mask


def brute_force_log_likelihood(model, memory: torch.Tensor, memory_mask: torch.Tensor, answer: list[int]) -> float:
    """log p(answer + [SEP] | the question pass's states `memory`), one unpadded answer at a time, token by token
    from the decoder's logits."""
    ids = torch.tensor([[CLS, *answer, SEP]])
    logits = model.decode(ids, torch.ones_like(ids), memory[None], memory_mask[None])[0].log_softmax(-1)
    return sum(logits[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1))
