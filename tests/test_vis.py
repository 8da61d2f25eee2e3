"""The reconstruction figure end to end: a checkpoint written by the real pre-training entry point, real videos,
the real reconstruct() pass; exact frame choice, resize-before-crop, visible tubes kept, clear errors, the
wrapper script's command and --help."""
import os
import re
import shlex
import shutil
import subprocess
import sys

import matplotlib.image
import pytest
import torch

import modeling_simvtp
import checkpoint
import model_registry
import run_simvtp_vis
from conftest import frame_index_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CAPTION = "a small red disc moves left"


@pytest.fixture(scope="module")
def tiny_checkpoint(pretrained_checkpoint):
    """The shared one-step pre-training checkpoint (4 frames of 32 px): the args it saves drive the figure."""
    return pretrained_checkpoint


@pytest.fixture
def video(video_files):
    return str(video_files["wide_25fps"])  # 160 x 90, 75 frames


def _args(ckpt, video, *extra):
    return run_simvtp_vis.get_args_parser().parse_args(
        ["--ckpt", ckpt, "--video", video, "--caption", CAPTION, "--device", "cpu", *extra])


def _tubes(clip):
    """[3, T, S, S] -> [N, P] as the model cuts tubes (tubelet 2, patch 16)."""
    return modeling_simvtp.patchify(clip[None], 2, 16)[0]


@pytest.mark.slow
def test_figure_is_a_readable_png_with_the_captions(tiny_checkpoint, video, tmp_path, capsys):
    path = run_simvtp_vis.main(_args(tiny_checkpoint, video, "--frame_start", "3", "--output_dir", str(tmp_path)))
    assert path == str(tmp_path / "reconstruction_wide_25fps.png")  # default name under --output_dir
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 300
    printed = capsys.readouterr().out
    assert f"original:  {CAPTION}" in printed and "[MASK]" in printed and "predicted:" in printed
    assert f"Figure written to {os.path.abspath(path)}" in printed


@pytest.mark.slow
def test_a_caption_cut_at_max_text_len_ends_in_an_ellipsis(tiny_checkpoint, video, tmp_path, capsys):
    long_caption = " ".join([CAPTION] * 6)
    args = _args(tiny_checkpoint, video, "--output_dir", str(tmp_path), "--max_text_len", "8")
    args.caption = long_caption
    run_simvtp_vis.main(args)
    printed = capsys.readouterr().out
    original = next(line for line in printed.splitlines() if line.startswith("original:"))
    assert original.endswith(" …") and len(original.split()) == 1 + 6 + 1  # label, 6 kept words ([CLS]/[SEP]), …
    run_simvtp_vis.main(_args(tiny_checkpoint, video, "--output_dir", str(tmp_path)))
    assert "…" not in capsys.readouterr().out  # a caption that fits is shown whole


@pytest.mark.slow
@pytest.mark.parametrize("denorm", ["visible", "tube"])
def test_reconstruction_keeps_visible_tubes_and_uses_the_checkpoints_clip_shape(tiny_checkpoint, video, denorm):
    args = _args(tiny_checkpoint, video, "--frame_start", "5", "--denorm", denorm)
    rec = run_simvtp_vis.reconstruct_clip(args)
    assert (args.model, args.num_frames, args.input_size, args.frame_stride) == ("simvtp_tiny_patch16", 4, 32, 2)
    assert rec.frames == [5, 7, 9, 11] and rec.recon.shape == (3, 4, 32, 32)
    mask = rec.video_mask
    slices = mask.view(2, 4)  # 2 x 2 x 2 tubes; tube masking hides the same 3 of 4 cells in both time slices
    assert torch.equal(slices[0], slices[1]) and int(slices[0].sum()) == 3
    torch.testing.assert_close(_tubes(rec.recon)[~mask], _tubes(rec.original)[~mask])
    torch.testing.assert_close(_tubes(rec.masked)[~mask], _tubes(rec.original)[~mask])
    assert not torch.equal(_tubes(rec.recon)[mask], _tubes(rec.masked)[mask])  # masked tubes are predicted
    assert ("visible tubes" if denorm == "visible" else "own true") in rec.note
    assert rec.captions["original"] == CAPTION and "[MASK]" in rec.captions["masked"]
    assert "[MASK]" not in rec.captions["predicted"]


def test_exactly_the_asked_frames_are_decoded(video):
    frames = run_simvtp_vis.read_frames(video, run_simvtp_vis.frame_indices(3, 7, 5))
    assert [frame_index_of(f) for f in frames] == [3, 10, 17, 24, 31]


def test_short_side_is_resized_before_the_centre_crop(video):
    """The test videos' green channel runs from 0 (top row) to 255 (bottom row): the whole height must survive."""
    frames = run_simvtp_vis.read_frames(video, [0])
    clip = modeling_simvtp.denormalize_video(run_simvtp_vis.clip_tensor(frames, 32)[None])[0]
    assert clip.shape == (3, 1, 32, 32)
    green = clip[1, 0, :, -1]  # right-most column: clear of the frame-index code
    assert green[0] < 0.1 and green[-1] > 0.9


@pytest.mark.slow
def test_frames_past_the_end_are_a_clear_error_naming_the_file(tiny_checkpoint, video, tmp_path):
    out = tmp_path / "x.png"
    with pytest.raises(ValueError, match=rf"{os.path.basename(video)}: has 75 frames.*needs frame 106.*"
                                         r"largest --frame_start that fits is 68"):
        run_simvtp_vis.main(_args(tiny_checkpoint, video, "--frame_start", "100", "--save_path", str(out)))
    assert not out.exists()


def test_missing_checkpoint_is_a_clear_error(video, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nowhere.pth"):
        run_simvtp_vis.main(_args(str(tmp_path / "nowhere.pth"), video, "--save_path", str(tmp_path / "x.png")))


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_a_clear_error(tiny_checkpoint, video, tmp_path):
    name = re.escape(os.path.basename(tiny_checkpoint))
    with pytest.raises(ValueError, match=rf"{name}: does not load into simvtp_small_patch16.*--model"):
        run_simvtp_vis.main(_args(tiny_checkpoint, video, "--model", "simvtp_small_patch16",
                                  "--save_path", str(tmp_path / "x.png")))


@pytest.mark.slow
def test_a_retrieval_model_or_unknown_name_is_a_clear_error(video, tmp_path):
    dual = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4)
    ft = str(tmp_path / "ft.pth")
    checkpoint.save_atomic({"model": dual.state_dict(), "model_cfg": dual.model_cfg}, ft)
    with pytest.raises(ValueError, match="ft.pth: model simvtp_dual_tiny_patch16 has no pixel decoder"):
        run_simvtp_vis.main(_args(ft, video, "--save_path", str(tmp_path / "x.png")))
    with pytest.raises(ValueError, match="unknown model 'no_such_model'"):
        run_simvtp_vis.main(_args(ft, video, "--model", "no_such_model", "--save_path", str(tmp_path / "x.png")))


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


def test_tube_denormalize_inverts_the_per_tube_normalisation():
    torch.manual_seed(0)
    tubes = torch.rand(2, 5, 2 * 4 * 4 * 3)
    normalised = modeling_simvtp.normalize_tubes(tubes)
    torch.testing.assert_close(run_simvtp_vis.tube_denormalize(normalised, tubes), tubes, atol=1e-5, rtol=1e-5)


def test_vis_script_quotes_its_arguments_and_passes_flags_through():
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "vis.sh"), "my ckpt.pth", "a video.mp4",
                          "a caption, with 'quotes'", "out dir/fig.png", "--frame_start", "8"],
                         capture_output=True, text=True, env={**os.environ, "DRY_RUN": "1"}, check=True)
    cmd = shlex.split(out.stdout)
    args = run_simvtp_vis.get_args_parser().parse_args(cmd[cmd.index(os.path.join(REPO, "run_simvtp_vis.py")) + 1:])
    assert (args.ckpt, args.video, args.caption) == ("my ckpt.pth", "a video.mp4", "a caption, with 'quotes'")
    assert (args.save_path, args.frame_start) == ("out dir/fig.png", 8)
    missing = subprocess.run(["bash", os.path.join(REPO, "scripts", "vis.sh"), "only-a-ckpt.pth"],
                             capture_output=True, text=True, env={k: v for k, v in os.environ.items()
                                                                  if k not in ("CKPT", "VIDEO", "CAPTION")})
    assert missing.returncode == 2 and "usage" in missing.stderr


@pytest.mark.slow
def test_vis_script_takes_paths_from_the_folder_it_is_run_in(tiny_checkpoint, video, tmp_path):
    """Before, vis.sh changed into the repository, so a video path relative to the caller's folder was not found.
    Run from a folder outside the repository with relative checkpoint, video and output paths (real files, the
    real script and entry point; the environment given as PY, as the recipes take it)."""
    caller = tmp_path / "my work"
    (caller / "clips").mkdir(parents=True)
    shutil.copy(video, caller / "clips" / "clip.mp4")
    shutil.copy(tiny_checkpoint, caller / "ckpt.pth")
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "CKPT", "VIDEO", "CAPTION", "OUT")}
    run = subprocess.run(["bash", os.path.join(REPO, "scripts", "vis.sh"), "ckpt.pth", "clips/clip.mp4", CAPTION,
                          "figs/out.png", "--device", "cpu"],
                         capture_output=True, text=True, env={**env, "PY": sys.executable}, cwd=str(caller),
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    with open(caller / "figs" / "out.png", "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    assert f"Figure written to {caller / 'figs' / 'out.png'}" in run.stdout


def test_help_names_every_flag():
    text = run_simvtp_vis.get_args_parser().format_help()  # what --help prints (tests/test_help.py: its format)
    for flag in ("--video", "--caption", "--ckpt", "--model", "--num_frames", "--input_size", "--frame_start",
                 "--frame_stride", "--mask_ratio", "--mask_type", "--text_mask_ratio", "--seed", "--tokenizer",
                 "--max_text_len", "--video_backend", "--device", "--denorm", "--output_dir", "--save_path"):
        assert flag in text, flag
    assert "visible tubes" in text
