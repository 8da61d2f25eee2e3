"""search.py: the index on real mp4 files (incremental, broken files listed), query ranking equal to the retrieval
evaluation's, re-ranking, and the web app through its HTTP API (in-process client)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

import annotations
import checkpoint
import datasets
import retrieval_eval as engine
import model_registry
import search
from conftest import ROOT, randomised, run_as_main

CLIP_FLAGS = ["--num_frames", "4", "--input_size", "64", "--sampling_rate", "2"]


def save_model(path: Path, name: str, seed: int, frames: int = 4, side: int = 64) -> Path:
    """A randomised tiny model (default 4 frames x 64 px) as our runs save it (weights + model_cfg naming it)."""
    model = randomised(model_registry.create(name, img_size=side, num_frames=frames), seed)
    checkpoint.save_atomic({"model": model.state_dict(), "model_cfg": model.model_cfg, "epoch": 0}, str(path))
    return path


@pytest.fixture(scope="module")
def dual_ckpt(module_tmp) -> Path:
    return save_model(module_tmp.mktemp("search_ckpt") / "dual.pth", "simvtp_dual_tiny_patch16", 3)


def copy_videos(synthetic_root: Path, folder: Path, count: int) -> dict[str, list[str]]:
    """The first `count` synthetic test videos copied under folder (every third into a subfolder) -> their
    relative paths with captions."""
    records = annotations.read_annotations(synthetic_root / "annotations" / "test.json", synthetic_root)[:count]
    out = {}
    for i, r in enumerate(records):
        rel = f"sub/{Path(r.path).name}" if i % 3 == 2 else Path(r.path).name
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r.path, folder / rel)
        out[rel] = r.captions
    return out


def index_args(video_dir: Path, ckpt: Path, out: Path, *extra: str):
    return search.get_args_parser().parse_args(["index", str(video_dir), "--ckpt", str(ckpt), "--out", str(out),
                                                "--print_freq", "100", "--precision", "fp32", *CLIP_FLAGS, *extra])


def rows_by_path(index_dir: Path) -> dict[str, torch.Tensor]:
    manifest = search.read_manifest(str(index_dir))
    return {v["path"]: row for v, row in zip(manifest["videos"], search.read_embeddings(str(index_dir), manifest))}


@pytest.mark.slow
def test_the_index_adds_changed_and_new_files_drops_removed_ones_and_lists_broken_ones(tmp_path, synthetic_root,
                                                                                     dual_ckpt):
    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    copy_videos(synthetic_root, videos, 5)
    (videos / "broken.mp4").write_bytes(b"this is not a video")
    (videos / "notes.txt").write_text("not a video file, never indexed")

    first = search.main(index_args(videos, dual_ckpt, out))
    assert torch.is_grad_enabled()  # the command leaves the process as it found it
    manifest = first["manifest"]
    assert first["embedded"] == 5 and [b["path"] for b in manifest["broken"]] == ["broken.mp4"]
    assert "broken.mp4" in manifest["broken"][0]["error"]
    assert sorted(v["path"] for v in manifest["videos"]) == sorted(p.relative_to(videos).as_posix()
                                                                   for p in videos.rglob("*.mp4")
                                                                   if p.name != "broken.mp4")
    assert manifest["clip"]["num_frames"] == 4 and manifest["clip"]["test_num_segment"] == 2
    entry = manifest["videos"][0]
    assert entry["frames"] == 16 and entry["duration"] == 2.0 and (entry["width"], entry["height"]) == (64, 64)
    strip = cv2.imread(str(out / entry["thumbnail"]))
    assert strip.shape == (search.THUMB_HEIGHT, search.THUMB_FRAMES * search.THUMB_HEIGHT, 3)
    before = rows_by_path(out)
    assert all(abs(float(r.norm()) - 1) < 1e-5 for r in before.values())

    again = search.main(index_args(videos, dual_ckpt, out))
    assert (again["embedded"], again["kept"], again["new_broken"]) == (0, 5, 0)

    removed, changed = sorted(before)[0], sorted(before)[1]
    gone_thumb = out / next(v["thumbnail"] for v in manifest["videos"] if v["path"] == removed)
    (videos / removed).unlink()
    shutil.copy(videos / sorted(before)[2], videos / changed)  # new content under an indexed name
    shutil.copy(videos / sorted(before)[2], videos / "sub" / "added.mp4")
    third = search.main(index_args(videos, dual_ckpt, out))
    assert (third["embedded"], third["kept"], third["removed"]) == (2, 3, 1)
    after = rows_by_path(out)
    assert removed not in after and not gone_thumb.exists()
    assert "sub/added.mp4" in after and torch.allclose(after[changed], after[sorted(before)[2]], atol=1e-5)
    assert not torch.allclose(after[changed], before[changed], atol=1e-3)
    for path in set(before) - {removed, changed}:
        assert torch.equal(after[path], before[path])  # unchanged files keep their rows bit for bit

    other = save_model(tmp_path / "other.pth", "simvtp_dual_tiny_patch16", 4)
    rebuilt = search.main(index_args(videos, other, out))
    assert rebuilt["embedded"] == 5 and rebuilt["kept"] == 0  # another checkpoint embeds everything again


@pytest.mark.slow
def test_a_search_ranks_the_videos_as_the_retrieval_evaluation_does(tmp_path, synthetic_root, dual_ckpt):
    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    captions = copy_videos(synthetic_root, videos, 8)
    search.main(index_args(videos, dual_ckpt, out))
    searcher = search.Searcher(str(out))

    model, _ = search.load_model(str(dual_ckpt), torch.device("cpu"))
    records = [annotations.VideoRecord(path=str(videos / rel), captions=caps, video_id=rel)
               for rel, caps in captions.items()]
    dataset = datasets.VideoTextDataset(records, mode="test", num_frames=4, sampling_rate=2, input_size=64,
                                        short_side_size=64, test_num_segment=2, test_num_crop=1)
    tokenizer = datasets.build_tokenizer()
    cfg = engine.EvalConfig(device=torch.device("cpu"), chunk=3)
    res = engine.evaluate(model, engine.build_eval_loader(dataset, tokenizer, batch_size=3), tokenizer, cfg)
    video_of_column = [records[i].video_id for i in res["indices"]]
    for t, caption in enumerate(res["captions"][:6]):
        expected = [video_of_column[v] for v in res["sim"][t].argsort(descending=True).tolist()]
        hits = searcher.search(caption, k=len(records))
        assert [h.path for h in hits] == expected, caption
        assert [h.score for h in hits] == pytest.approx(res["sim"][t].sort(descending=True).values.tolist(),
                                                        abs=1e-5)
    assert [h.rank for h in searcher.search(res["captions"][0], k=3)] == [1, 2, 3]

    top = searcher.search(res["captions"][0], k=3)
    shown = subprocess.run([sys.executable, str(ROOT / "search.py"), "query", str(out), res["captions"][0],
                            "-k", "3", "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert shown.returncode == 0, shown.stderr
    printed = [json.loads(line) for line in shown.stdout.splitlines() if line.startswith("{")]
    assert [p["path"] for p in printed] == [h.path for h in top]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["simvtp_tiny_patch16", "svitt_tiny_patch16"])
def test_re_ranking_orders_the_top_k_by_the_matching_head_and_leaves_the_rest(tmp_path, synthetic_root, name):
    """Either family's pre-training checkpoint indexes, and re-ranks with its own matching head."""
    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    copy_videos(synthetic_root, videos, 6)
    search.main(index_args(videos, save_model(tmp_path / "pretrain.pth", name, 5), out, "--test_num_segment", "1"))
    plain = search.Searcher(str(out)).search("a small red ball slides left", k=6)
    reranked_searcher = search.Searcher(str(out), rerank_k=3)
    reranked = reranked_searcher.search("a small red ball slides left", k=6)
    assert {h.id for h in reranked[:3]} == {h.id for h in plain[:3]}
    assert [h.match for h in reranked[:3]] == sorted((h.match for h in reranked[:3]), reverse=True)
    assert [h.id for h in reranked[3:]] == [h.id for h in plain[3:]] and reranked[3].match is None
    assert [h.id for h in reranked_searcher.search("a small red ball slides left", k=6, rerank=False)] == \
        [h.id for h in plain]


@pytest.mark.slow
def test_a_model_without_a_matching_head_re_ranks_with_another_checkpoint(tmp_path, synthetic_root, dual_ckpt):
    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    copy_videos(synthetic_root, videos, 3)
    search.main(index_args(videos, dual_ckpt, out))
    with pytest.raises(ValueError, match="no matching head"):
        search.Searcher(str(out), rerank_k=3)
    matcher = save_model(tmp_path / "pretrain.pth", "simvtp_tiny_patch16", 6, frames=2, side=32)  # its own clips
    hits = search.Searcher(str(out), rerank_k=2, rerank_ckpt=str(matcher)).search("a ball", k=3)
    assert [h.match is not None for h in hits] == [True, True, False]


@pytest.fixture(scope="module")
def served(module_tmp, synthetic_root, dual_ckpt):
    """A small index and the app over it (Starlette's in-process client), with the folder's other files beside."""
    folder = module_tmp.mktemp("served")
    videos, out = folder / "videos", folder / "index"
    videos.mkdir()
    copy_videos(synthetic_root, videos, 4)
    (videos / "secret.txt").write_text("never served")
    search.main(index_args(videos, dual_ckpt, out))
    searcher = search.Searcher(str(out))
    from starlette.testclient import TestClient
    return searcher, TestClient(search.make_app(searcher)), videos


@pytest.mark.slow
def test_the_web_api_answers_queries_and_serves_only_indexed_files(served):
    searcher, client, videos = served
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text
    info = client.get("/api/info").json()
    assert info["videos"] == 4 and info["model"] == "simvtp_dual_tiny_patch16" and info["rerank_k"] == 0

    found = client.get("/api/search", params={"q": "a grey box slides right", "k": 3}).json()
    expected = searcher.search("a grey box slides right", k=3)
    assert [r["id"] for r in found["results"]] == [h.id for h in expected] and found["took_ms"] >= 0
    first = found["results"][0]
    assert not os.path.isabs(first["path"]) and str(videos) not in json.dumps(found)

    video = client.get(first["video"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    assert video.content == (videos / first["path"]).read_bytes()
    part = client.get(first["video"], headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and part.content == (videos / first["path"]).read_bytes()[:100]
    thumb = client.get(first["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"

    assert client.get("/api/search", params={"q": "  "}).status_code == 400
    assert client.get("/api/search", params={"q": "x", "k": "many"}).status_code == 400
    for url in ("/video/0123456789abcdef", "/thumb/nope", "/video/..%2Fsecret.txt", "/video/../videos/secret.txt",
                f"/video/{first['id']}/..%2F..%2Fsecret.txt", "/video/", "/thumb/", "/videos/", "/index/",
                "/manifest.json", "/embeddings.safetensors", "/secret.txt"):
        refused = client.get(url)
        assert refused.status_code == 404, url
        assert b"never served" not in refused.content and b"<a href" not in refused.content


def test_the_index_runs_in_the_run_scripts_default_precision_and_every_command_sets_cuda_math():
    parser = search.get_args_parser()
    index = parser.parse_args(["index", "videos", "--ckpt", "c.pth", "--out", "ix"])
    assert index.precision == "auto" and index.tf32 is True
    assert parser.parse_args(["query", "ix", "text", "--no-tf32"]).tf32 is False
    assert parser.parse_args(["serve", "ix"]).tf32 is True


@pytest.mark.slow
def test_the_index_command_line_reports_bad_input_clearly(tmp_path, dual_ckpt, capsys):
    run = run_as_main(capsys, "search.py", "index", str(tmp_path / "absent"), "--ckpt", str(dual_ckpt), "--out",
                      str(tmp_path / "index"))
    assert run.returncode == 1 and "absent: not a folder of videos" in run.stderr
    query = run_as_main(capsys, "search.py", "query", str(tmp_path), "a ball")
    assert query.returncode == 1 and "no manifest.json" in query.stderr
