"""A file without model_cfg (a release file) names no model settings: evaluating it with a recipe's flags builds the
model those flags describe (sparsity, pruning, clip shape), not the registered defaults, and says so."""
import pytest
import torch

import checkpoint
import engine_for_finetuning
import model_registry
import run_simvtp_finetuning as run
from svitt_release import write_release_file

RECIPE = ["--model", "svitt_retrieval_tiny_patch16", "--sparse_local_attn", "1", "--sparse_random_attn", "1",
          "--attn_block_size", "4", "--token_keep_rate", "0.5", "--token_drop_loc", "1", "--num_frames", "4",
          "--input_size", "32", "--device", "cpu"]
SETTINGS = dict(img_size=32, num_frames=4, sparse_local_attn=1, sparse_random_attn=1, attn_block_size=4,
                token_keep_rate=0.5, token_drop_loc=(1,))


def _release_retrieval_file(path) -> None:
    """Seeded weights in the release's retrieval layout (text_encoder.* without bert.), its config, no model_cfg."""
    torch.manual_seed(5)
    model = model_registry.create("svitt_retrieval_tiny_patch16", **SETTINGS)
    state = {k.replace("text_encoder.bert.", "text_encoder."): v for k, v in model.state_dict().items()}
    write_release_file(path, state, num_frames=4)


@pytest.mark.slow
def test_a_release_file_is_built_with_the_command_lines_model_settings(tmp_path, capsys):
    """Before: the registered defaults (dense, unpruned, 8 frames of 112 px) were built and the file did not load."""
    path = str(tmp_path / "ret_msrvtt.pth")
    _release_retrieval_file(path)
    args = run.get_args_parser().parse_args(RECIPE)
    args.device_obj = torch.device("cpu")
    built = engine_for_finetuning.build_from_file(path, args.model, args)
    said = capsys.readouterr().out
    assert "model settings from the command line: " in said and "token_keep_rate 0.5 (file: model default)" in said
    direct = model_registry.create("svitt_retrieval_tiny_patch16", **SETTINGS)
    checkpoint.load_pretrained(direct, path, strict=True)
    direct.eval()
    assert built.vision_encoder.config == direct.vision_encoder.config
    g = torch.Generator().manual_seed(0)
    video = torch.randn(2, 3, 4, 32, 32, generator=g)
    ids, mask = torch.randint(1000, 2000, (2, 6), generator=g), torch.ones(2, 6, dtype=torch.long)
    with torch.no_grad():
        for call in ("encode_video", "match_logits"):
            inputs = (video,) if call == "encode_video" else (video, ids, mask)
            torch.testing.assert_close(getattr(built, call)(*inputs), getattr(direct, call)(*inputs), msg=call)
        torch.testing.assert_close(built.encode_text(ids, mask), direct.encode_text(ids, mask))
