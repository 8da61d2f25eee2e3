"""The reconstruction figure: end to end on a real checkpoint written by the pre-training entry point and a real
mp4, the wrapper script, clear errors, and the composition / de-normalisation logic on tensors."""
import os
import subprocess

import matplotlib.image
import pytest
import torch

import modeling_simvtp
import run_simvtp_pretraining
import run_simvtp_vis

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_checkpoint(synthetic_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("vis_pretrain")
    argv = ["--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
            "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
            "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--max_steps", "1", "--num_workers", "0",
            "--device", "cpu", "--precision", "fp32", "--output_dir", str(out)]
    run_simvtp_pretraining.main(run_simvtp_pretraining.get_args_parser().parse_args(argv))
    return str(out / open(out / "latest").read().strip())


def _vis_args(ckpt, video, out_png, *extra):
    return run_simvtp_vis.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--video", video, "--caption", "a small red disc moves left", "--save_path", str(out_png),
         "--device", "cpu", *extra])


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.mark.parametrize("denorm", ["tube", "visible"])
def test_figure_is_a_valid_png_using_the_checkpoints_clip_shape(tiny_checkpoint, video_files, tmp_path, capsys,
                                                                denorm):
    video = str(next(iter(video_files.values())))
    path = run_simvtp_vis.main(_vis_args(tiny_checkpoint, video, tmp_path / "fig.png", "--frame_start", "2",
                                         "--frame_stride", "1", "--denorm", denorm))
    _assert_png(path)
    printed = capsys.readouterr().out
    assert "[MASK]" in printed and "predicted:" in printed


def test_vis_script_wraps_the_entry_point(tiny_checkpoint, video_files, tmp_path):
    video = str(next(iter(video_files.values())))
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "vis.sh"), tiny_checkpoint, video, "a blue box",
                          str(tmp_path / "wrapped.png"), "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_png(tmp_path / "wrapped.png")


def test_frames_past_the_end_of_the_video_are_a_clear_error(tiny_checkpoint, video_files, tmp_path):
    video = str(next(iter(video_files.values())))
    with pytest.raises(ValueError, match=os.path.basename(video) + ".*needs frame"):
        run_simvtp_vis.main(_vis_args(tiny_checkpoint, video, tmp_path / "x.png", "--frame_start", "100000"))
    assert not (tmp_path / "x.png").exists()


def test_missing_checkpoint_is_a_clear_error(video_files, tmp_path):
    video = str(next(iter(video_files.values())))
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        run_simvtp_vis.main(_vis_args(str(tmp_path / "nowhere.pth"), video, tmp_path / "x.png"))


def test_compose_keeps_visible_tubes_and_places_predictions_in_masked_ones():
    torch.manual_seed(0)
    video = torch.rand(1, 3, 4, 32, 32)  # grid 2 x 2 x 2 with tubelet 2, patch 16
    mask = torch.tensor([[True, False, False, True, True, False, False, True]])
    pred = torch.rand(1, int(mask.sum()), 2 * 16 * 16 * 3)
    masked, recon = run_simvtp_vis.compose(video, pred, mask, tubelet=2, patch=16)
    tubes = lambda v: modeling_simvtp.patchify(v, 2, 16)  # noqa: E731
    torch.testing.assert_close(tubes(recon)[~mask], tubes(video)[~mask])
    torch.testing.assert_close(tubes(masked)[~mask], tubes(video)[~mask])
    torch.testing.assert_close(tubes(recon)[mask], pred[0])
    assert not torch.isclose(tubes(masked)[mask], tubes(video)[mask]).all()


def test_tube_denormalize_inverts_the_per_tube_normalisation_of_the_target():
    torch.manual_seed(0)
    tubes = torch.rand(2, 5, 2 * 4 * 4 * 3)
    normalised = modeling_simvtp.normalize_tubes(tubes)
    torch.testing.assert_close(run_simvtp_vis.tube_denormalize(normalised, tubes), tubes, atol=1e-5, rtol=1e-5)
