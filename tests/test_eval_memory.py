"""Clips stay uint8 through the loaders and are normalised on the device; the evaluation loader is sized so the
batches of views a process holds stay under --eval_host_memory_gb, and says so at start-up.

The release's --only_test (15 clips x 3 crops of 16 x 224 x 224) sent float32 views through the workers' shared
memory: 433 MB a video, about 69 GB per process with 10 workers x prefetch 2. Here: the estimate on those numbers,
the real loader on real mp4s (uint8 batches in shared memory, exactly the estimated bytes), the same retrieval
numbers as normalising the views explicitly, and a real --only_test whose peak memory growth stays within the
estimate's order."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import annotations
import datasets
import retrieval_eval as engine
import engine_for_pretraining
import model_registry
import video_transforms
from annotations import VideoRecord

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RELEASE_VIEWS = dict(num_frames=16, input_size=224, short_side_size=224, test_num_segment=15, test_num_crop=3)


def _ann(root, name):
    return os.path.join(root, "annotations", name)


def _test_set(root, **kw):
    records = annotations.read_annotations(_ann(root, "test.json"), root)
    kw = {"num_frames": 4, "sampling_rate": 2, "input_size": 32, "short_side_size": 32, "test_num_segment": 3,
          "test_num_crop": 2, **kw}
    return datasets.VideoTextDataset(records, mode="test", **kw)


def _explicitly_normalised(video: torch.Tensor) -> torch.Tensor:
    """The float path as it was: pixels / 255, minus the ImageNet mean, over its std (written out here)."""
    mean = torch.tensor(video_transforms.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(video_transforms.IMAGENET_STD).view(3, 1, 1, 1)
    return (video.float() / 255 - mean) / std


# ----------------------------------------------------------------------------------------------- the estimate


def test_release_views_are_a_quarter_of_the_float_bytes_and_the_loader_is_sized_under_8_gb():
    one_video = datasets.VideoTextDataset([VideoRecord("never_opened.mp4", ["a"])], mode="test", **RELEASE_VIEWS)
    per_video = one_video.video_nbytes()
    assert per_video == 45 * 3 * 16 * 224 * 224 and round(4 * per_video / 1e6) == 434  # the float32 433 MB
    unbounded = engine.eval_loader_bytes(per_video, batch_size=8, num_workers=10, prefetch_factor=2)
    assert unbounded == per_video * 8 * 21 and 4 * unbounded > 69e9  # the float path: ~73 GB per process
    plan = engine.plan_eval_loader(per_video, batch_size=8, num_workers=10, host_bound=int(8e9))
    # the most videos a batch can hold with 10 workers x prefetch 2 under 8 GB
    assert (plan.batch_size, plan.num_workers, plan.prefetch_factor) == (3, 10, 2) and plan.fits
    assert plan.nbytes == per_video * 3 * 21 <= 8e9 < engine.eval_loader_bytes(per_video, 4, 10, 2)
    line = plan.describe(8, 10)
    assert "6.83 GB host memory per process" in line and "batch 8 -> 3" in line and "21 batches in flight" in line


def test_the_plan_lowers_batch_then_prefetch_then_workers():
    video = 100
    assert engine.plan_eval_loader(video, 8, 4, host_bound=10_000) == engine.EvalLoaderPlan(8, 4, 2, video, 10_000)
    assert engine.plan_eval_loader(video, 8, 4, host_bound=1_900).batch_size == 2  # 2 x 9 batches in flight
    # prefetch 2 cannot hold one video a batch (900 B), prefetch 1 can (500 B)
    plan = engine.plan_eval_loader(video, 8, 4, host_bound=600)
    assert (plan.batch_size, plan.num_workers, plan.prefetch_factor, plan.nbytes) == (1, 4, 1, 500)
    plan = engine.plan_eval_loader(video, 8, 4, host_bound=350)
    assert (plan.batch_size, plan.num_workers, plan.prefetch_factor, plan.nbytes) == (1, 2, 1, 300)
    # a small /dev/shm share: the workers' batches must fit in it; without workers nothing goes through it
    plan = engine.plan_eval_loader(video, 8, 4, host_bound=10_000, shm_bound=150)
    assert (plan.batch_size, plan.num_workers, plan.prefetch_factor) == (8, 0, 0) and plan.fits
    assert "workers 4 -> 0" in plan.describe(8, 4) and "/dev/shm" in plan.describe(8, 4)
    # not even one video: the least there is, said loudly
    plan = engine.plan_eval_loader(video, 8, 4, host_bound=50)
    assert (plan.batch_size, plan.num_workers, plan.nbytes, plan.fits) == (1, 0, 100, False)
    assert plan.describe(8, 4).startswith("WARNING") and "--eval_host_memory_gb" in plan.describe(8, 4)


# ----------------------------------------------------------------------------------------------- the real loaders


def test_eval_loader_pins_its_batches_for_a_cuda_device_only(synthetic_root):
    dataset, tokenizer = _test_set(synthetic_root), datasets.build_tokenizer()
    assert engine.build_eval_loader(dataset, tokenizer, batch_size=2, device=torch.device("cuda")).pin_memory
    assert not engine.build_eval_loader(dataset, tokenizer, batch_size=2, device=torch.device("cpu")).pin_memory
    assert not engine.build_eval_loader(dataset, tokenizer, batch_size=2).pin_memory


def test_eval_loader_yields_uint8_views_in_shared_memory_and_the_estimate_bounds_them(synthetic_root, capsys):
    dataset = _test_set(synthetic_root)
    per_video = 6 * 3 * 4 * 32 * 32
    assert dataset.video_nbytes() == per_video
    bound_gb = 3 * per_video * 5 / 1e9  # room for 3 videos a batch with 2 workers x prefetch 2 + 1
    loader = engine.build_eval_loader(dataset, datasets.build_tokenizer(), batch_size=4, num_workers=2,
                                      host_memory_gb=bound_gb)
    line = capsys.readouterr().out
    assert "Evaluation loader: 3 video(s)/batch" in line and "batch 4 -> 3" in line
    assert (loader.batch_size, loader.num_workers, loader.prefetch_factor) == (3, 2, 2)
    plan = engine.plan_eval_loader(per_video, 4, 2, int(bound_gb * 1e9))
    sizes = []
    for batch in loader:
        video = batch["video"]
        assert video.dtype == torch.uint8 and video.shape[1:] == (6, 3, 4, 32, 32)
        assert video.is_shared()  # it came through a worker's shared memory
        sizes.append(video.untyped_storage().nbytes())
    assert sizes[0] == plan.batch_nbytes  # the estimate counts exactly what a batch holds
    assert max(sizes) * plan.batches_in_flight <= plan.nbytes <= bound_gb * 1e9
    assert sum(sizes) == len(dataset) * per_video


def test_training_loader_yields_uint8_and_the_engine_normalises_on_the_device(synthetic_root):
    records = annotations.read_annotations(_ann(synthetic_root, "train.json"), synthetic_root)
    dataset = datasets.VideoTextDataset(records, mode="train", num_frames=4, sampling_rate=2, input_size=32, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1,
                                         collate_fn=datasets.VideoTextCollator(datasets.build_tokenizer()))
    batch = next(iter(loader))
    assert batch["video"].dtype == torch.uint8 and batch["video"].shape == (4, 3, 4, 32, 32)
    moved = engine_for_pretraining.move_batch(batch, torch.device("cpu"))
    assert moved["video"].dtype == torch.float32
    torch.testing.assert_close(moved["video"], _explicitly_normalised(batch["video"]), rtol=0, atol=1e-5)
    hand_built = torch.randn(2, 3, 4, 32, 32)  # already normalised float (benchmarks build such batches)
    assert engine_for_pretraining.move_batch({"video": hand_built}, torch.device("cpu"))["video"] is hand_built
    with pytest.raises(TypeError, match="uint8"):
        video_transforms.normalize_video(batch["video"].long())


@pytest.mark.slow
def test_retrieval_numbers_equal_those_of_explicitly_normalised_views(synthetic_root):
    torch.manual_seed(0)
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=32, num_frames=4,
                                  vocab_size=len(datasets.build_tokenizer())).eval()
    dataset, tokenizer = _test_set(synthetic_root), datasets.build_tokenizer()
    cfg = engine.EvalConfig(device=torch.device("cpu"), chunk=4)
    got = engine.evaluate(model, engine.build_eval_loader(dataset, tokenizer, 3, num_workers=1), tokenizer, cfg)
    with torch.no_grad():  # the float path, by hand: every video's views normalised explicitly, then embedded
        video = torch.stack([F.normalize(F.normalize(model.encode_video(_explicitly_normalised(
            dataset[i]["video"])), dim=-1).mean(dim=0), dim=-1) for i in range(len(dataset))])
    torch.testing.assert_close(got["video"], video, rtol=0, atol=1e-5)
    text = engine.encode_texts(model, tokenizer, got["captions"], cfg)
    expected, _ = engine.retrieval_metrics(text @ video.t(), got["text_to_video"])
    assert got["metrics"] == expected and got["indices"] == list(range(len(dataset)))


# ----------------------------------------------------------------------------------------------- a real run

_MEASURED_RUN = """
import json, resource, sys
import run_simvtp_finetuning as run
args = run.get_args_parser().parse_args(sys.argv[1:])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run.main(args)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("PEAK_RSS_GROWTH_KB", json.dumps(after - before))
"""


@pytest.mark.slow
def test_only_test_prints_the_estimate_and_its_memory_growth_stays_within_it(synthetic_root, tmp_path):
    """45 views of 16 x 64 x 64 a video, batch 8 asked, 2 workers: the float path held 8 x 8.8 MB x 4 = 283 MB in
    one batch; the bound (0.1 GB) makes it 2 uint8 videos a batch, 5 batches in flight: 88 MB."""
    model = model_registry.create("simvtp_dual_tiny_patch16", img_size=64, num_frames=16, depth=1, embed_dim=64,
                                  num_heads=2, vocab_size=len(datasets.build_tokenizer()))
    ckpt = tmp_path / "dual.pth"
    torch.save({"model": model.state_dict(), "model_cfg": model.model_cfg}, ckpt)
    argv = ["--only_test", "--finetune", str(ckpt), "--test_data_path", _ann(synthetic_root, "test.json"),
            "--data_root", str(synthetic_root), "--output_dir", str(tmp_path / "out"), "--num_frames", "16",
            "--sampling_rate", "1", "--input_size", "64", "--short_side_size", "64", "--test_num_segment", "15",
            "--test_num_crop", "3", "--batch_size", "8", "--num_workers", "2", "--eval_host_memory_gb", "0.1",
            "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", _MEASURED_RUN, *argv], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    per_video = 45 * 3 * 16 * 64 * 64
    plan = engine.plan_eval_loader(per_video, 8, 2, int(0.1e9), engine.shared_memory_share())
    assert (plan.batch_size, plan.num_workers, plan.prefetch_factor) == (2, 2, 2)
    assert plan.describe(8, 2) in proc.stdout  # the start-up line, before any video is embedded
    assert proc.stdout.index("Evaluation loader:") < proc.stdout.index("test retrieval on 8 videos")
    growth = int(re.search(r"PEAK_RSS_GROWTH_KB (\d+)", proc.stdout).group(1)) * 1024
    float_batch = 4 * 8 * per_video  # what the float path's one batch alone added
    assert growth < float_batch and growth <= plan.nbytes + 150e6, (growth, plan.nbytes)
    assert json.load(open(tmp_path / "out" / "test_metrics.json"))["views"] == "15x3"
