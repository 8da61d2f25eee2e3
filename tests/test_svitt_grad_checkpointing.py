"""SViTT's gradient checkpointing (--grad_checkpointing, the fallback when a GPU's memory is short): the vision,
text, fusion and answer-decoder layers recomputed in backward give the same loss and gradients, drop path and the
random blocks included, and the pre-training entry point turns it on for a SViTT model."""
import pytest
import torch

import engine_for_pretraining
import model_registry
import run_simvtp_pretraining
from qa_inputs import padded, question_inputs
from test_svitt_model import TINY, batch

RANDOM = dict(drop_path_rate=0.3, token_keep_strategy="random", fusion_keep_strategy="random")  # every RNG use


def _qa_batch() -> dict:
    video, ids, mask = question_inputs(2)
    answer_ids, answer_mask = padded([[50], [51, 52], [53]])
    return dict(video=torch.randn(2, 3, 4, 32, 32), question_input_ids=ids % 64, question_mask=mask,
                answer_ids=answer_ids % 64, answer_mask=answer_mask, answer_weights=torch.tensor([0.5, 0.5, 1.0]),
                answer_to_question=torch.tensor([0, 0, 1]))


def _loss_and_grads(model: torch.nn.Module, data: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    torch.manual_seed(7)  # the same random blocks, token choices, negatives and drop path in both runs
    loss = model(data)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["svitt_tiny_patch16", "svitt_qa_tiny_patch16"])
def test_recomputed_layers_give_the_same_loss_and_gradients(name):
    torch.manual_seed(0)
    model = model_registry.create(name, **TINY, **RANDOM).train()
    data = _qa_batch() if "qa" in name else batch()
    plain_loss, plain = _loss_and_grads(model, data)
    model.set_grad_checkpointing(True)
    recomputed_loss, recomputed = _loss_and_grads(model, data)
    assert torch.equal(recomputed_loss, plain_loss)
    assert set(recomputed) == set(plain)
    for n, grad in plain.items():
        torch.testing.assert_close(recomputed[n], grad, rtol=1e-5, atol=1e-7, msg=n)


def test_the_pretraining_entry_point_turns_it_on_for_svitt():
    """Before: AttributeError, SViTT had no set_grad_checkpointing."""
    args = run_simvtp_pretraining.get_args_parser().parse_args(
        ["--model", "svitt_tiny_patch16", "--data_path", "-", "--grad_checkpointing", "--input_size", "32",
         "--num_frames", "4"])
    model = engine_for_pretraining.build_model(args, 64)
    towers = [model.vision_encoder, model.text_encoder]
    assert all(t.grad_checkpointing for t in towers)


@pytest.mark.parametrize("family", ["simvtp", "svitt"])
def test_retrieval_and_qa_fine_tuning_take_the_flag(family):
    """--grad_checkpointing reached only pre-training: the fine-tuning entry points had no such flag."""
    import engine_for_retrieval
    import run_simvtp_finetuning
    import engine_for_qa
    import run_simvtp_qa
    clip = ["--input_size", "32", "--num_frames", "4"]
    ret_args = run_simvtp_finetuning.get_args_parser().parse_args(
        ["--model", f"{family}_tiny_patch16", "--grad_checkpointing", *clip])
    qa_args = run_simvtp_qa.get_args_parser().parse_args(
        ["--model", f"{family}_qa_tiny_patch16", "--grad_checkpointing", *clip])
    for model in (engine_for_retrieval.build_for_training(ret_args, 64), engine_for_qa.build_for_training(qa_args, 64)):
        flags = [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]
        assert flags and all(flags), type(model).__name__
