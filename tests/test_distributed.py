"""Distributed behaviour with real processes (gloo on CPU): DDP gradients over 2 ranks equal single-process
gradients on the same global batch (contrastive features gathered with gradient), and torchrun runs the real
pre-training entry point (also on a list with broken videos: rank 0 names every rank's broken files once), and
features of uneven ranks are gathered as contiguous tensors (distributed.gather_rows), never as pickled views."""
import json
import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp
from timm.models import create_model

import modeling_simvtp  # noqa: F401
import distributed
import utils
from conftest import free_port, mostly_broken_list
from masking_generator import TubeMaskingGenerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_size=32, num_frames=4, vocab_size=64, w_vtm=0.0)  # VTM negatives are drawn per rank: off here


def _global_batch(batch: int = 4) -> dict:
    """A deterministic batch with uneven caption lengths (padding) and a tube mask per clip."""
    import numpy as np
    g = torch.Generator().manual_seed(7)
    video = torch.randn(batch, 3, 4, 32, 32, generator=g)
    masker = TubeMaskingGenerator((2, 2, 2), 0.5)
    video_mask = torch.from_numpy(np.stack([masker(np.random.default_rng(i)) for i in range(batch)]))
    lengths = [6, 4, 5, 3][:batch]
    input_ids = torch.zeros(batch, 6, dtype=torch.long)
    attention_mask = torch.zeros(batch, 6, dtype=torch.long)
    mlm_input_ids, mlm_labels = input_ids.clone(), torch.full((batch, 6), -100)
    for i, n in enumerate(lengths):
        input_ids[i, :n] = torch.randint(5, 64, (n,), generator=g)
        attention_mask[i, :n] = 1
        mlm_input_ids[i, :n] = input_ids[i, :n]
        mlm_input_ids[i, 1] = 3  # one masked word per caption
        mlm_labels[i, 1] = input_ids[i, 1]
    return dict(video=video, video_mask=video_mask, input_ids=input_ids, attention_mask=attention_mask,
                mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels)


def _grads(model: torch.nn.Module) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("simvtp_tiny_patch16", **TINY)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = _global_batch()
    share = len(batch["video"]) // world
    local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    out = ddp(local, gather=distributed.gather_with_grad)
    out["loss"].backward()
    torch.save(_grads(model), os.path.join(out_dir, f"grads{rank}.pth"))
    torch.distributed.destroy_process_group()


def test_two_rank_gradients_equal_single_process(tmp_path):
    torch.manual_seed(0)
    model = create_model("simvtp_tiny_patch16", **TINY)
    model(_global_batch(), gather=None)["loss"].backward()
    expected = _grads(model)
    mp.spawn(_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pth", weights_only=True)
        assert set(got) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_torchrun_two_processes_pretrain_on_synthetic(tmp_path, synthetic_root):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "run_simvtp_pretraining.py"),
           "--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
           "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
           "--input_size", "32", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
           "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--output_dir", str(out),
           "--print_freq", "1", "--eval_every", "1",
           "--eval_data_path", os.path.join(synthetic_root, "annotations", "val.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert (out / "latest").is_file() and (out / "args.json").is_file() and (out / "log.txt").is_file()
    # only rank 0 prints: one "Saved" line, not two
    assert run.stdout.count("Saved ") == 1
    # zero-shot evaluation: each rank embeds half the validation videos, the features are gathered
    assert run.stdout.count("Zero-shot on") == 1
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["zs_v2t_queries"] == 8 and 0.0 <= record["zs_t2v_R@1"] <= 100.0


def _torchrun_pretrain(synthetic_root, out, *extra) -> subprocess.CompletedProcess:
    """2 processes, VTM on and drop-path on, so every rank's own generator shapes the weights."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "run_simvtp_pretraining.py"),
           "--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
           "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
           "--input_size", "32", "--batch_size", "3", "--epochs", "1", "--warmup_epochs", "0", "--drop_path", "0.2",
           "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--output_dir", str(out),
           "--print_freq", "1", "--seed", "5", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_two_process_resume_restores_each_ranks_generators(tmp_path, synthetic_root):
    import checkpoint
    full = _torchrun_pretrain(synthetic_root, tmp_path / "full")
    part = tmp_path / "part"
    _torchrun_pretrain(synthetic_root, part, "--max_steps", "2")
    saved = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(part)))
    states = saved["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])
    resumed = _torchrun_pretrain(synthetic_root, part)
    assert "Resumed from" in resumed.stdout
    want = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(tmp_path / "full")))["model"]
    got = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(part)))["model"]
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # the collectives in use are the current API: no deprecation warning on any rank
    for run in (full, resumed):
        assert "deprecat" not in (run.stdout + run.stderr).lower(), run.stderr[-2000:]


def test_torchrun_two_processes_name_every_ranks_broken_videos_once(tmp_path, synthetic_root, broken_videos):
    anno, broken = mostly_broken_list(synthetic_root, broken_videos, tmp_path, good=10, missing=12)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "run_simvtp_pretraining.py"), "--data_path", anno,
           "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
           "--input_size", "32", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0",
           "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--output_dir", str(out),
           "--max_broken_fraction", "0.9", "--seed", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    listed = [line.split("\t")[0] for line in (out / "broken_videos.txt").read_text().splitlines()]
    assert len(listed) == len(set(listed)) and set(listed) <= broken
    paths = list(json.load(open(anno)))
    full = [p if os.path.isabs(p) else os.path.join(str(synthetic_root), p) for p in paths]
    for rank in (0, 1):  # the broken videos each rank drew itself are all listed, rank 1's too
        sampler = utils.ResumableDistributedSampler(full, num_replicas=2, rank=rank, seed=4, shuffle=True)
        drawn = {full[i] for i in sampler} & broken
        assert drawn and drawn <= set(listed), rank
    named = [line for line in run.stdout.splitlines() if line.startswith("WARNING: broken training video")]
    assert len(named) == len(listed)  # printed once, by rank 0
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["broken_video_files"] == len(listed)


def _accumulation_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Count DDP's gradient all-reduces (a counting comm hook) over one accumulation window of two micro-batches."""
    import engine_for_pretraining as engine
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    ddp = engine.wrap_ddp(create_model("simvtp_tiny_patch16", **TINY), torch.device("cpu"))
    calls = []

    def counting_allreduce(state, bucket):
        calls.append(1)
        return default_hooks.allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_allreduce)
    batch = _global_batch()
    local = {k: v[rank * 2:(rank + 1) * 2] for k, v in batch.items()}
    cfg = engine.StepConfig(device=torch.device("cpu"), dtype=torch.float32, accum_iter=2)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    engine._forward_backward(ddp, local, scaler, cfg, scale=0.5, sync=False)
    inside_window = len(calls)
    engine._forward_backward(ddp, local, scaler, cfg, scale=0.5, sync=True)
    json.dump({"inside_window": inside_window, "window_end": len(calls) - inside_window,
               "forward_sync_buffers": ddp.forward_sync_buffers, "bucket_view": ddp.gradient_as_bucket_view},
              open(os.path.join(out_dir, f"calls{rank}.json"), "w"))
    torch.distributed.destroy_process_group()


def test_accumulation_all_reduces_only_at_the_end_of_the_window(tmp_path):
    """DDP decides at forward time whether a backward all-reduces: the window's first micro-batch must run its
    forward under no_sync too, or every micro-batch pays a full gradient all-reduce."""
    mp.spawn(_accumulation_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        calls = json.load(open(tmp_path / f"calls{rank}.json"))
        assert calls["inside_window"] == 0 and calls["window_end"] >= 1, calls
        assert calls["forward_sync_buffers"] is False and calls["bucket_view"] is True


# ----------------------------------------------------------------------------------------------- row gather

_ROWS = {0: 3, 1: 5}  # rows each rank holds: different counts
_STORAGE_ROWS = 1000  # ... as views into a much larger batch


def _rank_rows(rank: int) -> torch.Tensor:
    """Rank r's rows: a view (rows 10r .. 10r + n) into a [1000, 8] storage, values telling rank and row apart."""
    big = torch.arange(_STORAGE_ROWS * 8, dtype=torch.float32).view(_STORAGE_ROWS, 8) + 100_000 * rank
    return big[10 * rank:10 * rank + _ROWS[rank]]


def _merge_inputs(rank: int) -> tuple:
    """One rank's embed_dataset output before the merge: video rows, caption rows, indices, captions (rank 1's
    last index repeats rank 0's first, as a padded DistributedSampler does)."""
    indices = {0: [0, 2, 4], 1: [1, 3, 0]}[rank]
    captions = [[f"v{i} c{k}" for k in range(1 + i % 3)] for i in indices]
    n_texts = sum(len(c) for c in captions)
    text = (torch.arange(50 * 4, dtype=torch.float32).view(50, 4) + 1000 * rank)[5:5 + n_texts]
    return _rank_rows(rank)[:, :4], text, indices, captions


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    import engine_for_finetuning as engine
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    sent, pickled = [], []
    real_all_gather, real_all_gather_object = dist.all_gather, dist.all_gather_object

    def recording_all_gather(outputs, tensor, *a, **kw):  # what goes on the wire, then the real collective
        sent.append({"shape": list(tensor.shape), "nbytes": tensor.nbytes,
                     "storage_nbytes": tensor.untyped_storage().nbytes()})
        return real_all_gather(outputs, tensor, *a, **kw)

    def recording_all_gather_object(outputs, obj, *a, **kw):
        pickled.append(obj)
        return real_all_gather_object(outputs, obj, *a, **kw)

    dist.all_gather, dist.all_gather_object = recording_all_gather, recording_all_gather_object
    rows = _rank_rows(rank)
    assert rows.untyped_storage().nbytes() == _STORAGE_ROWS * 8 * 4  # a pickle would send all of this
    gathered = distributed.gather_rows(rows)
    empty = distributed.gather_rows(rows if rank == 0 else torch.zeros(0, 0))  # a rank with nothing
    row_sends, row_pickles = list(sent), list(pickled)
    merged = engine._merge_ranks(*_merge_inputs(rank))
    torch.save({"gathered": gathered, "empty": empty, "sent": row_sends, "pickled": len(row_pickles),
                "merge_pickled": pickled[len(row_pickles):], "merged": merged},
               os.path.join(out_dir, f"rows{rank}.pth"))
    dist.destroy_process_group()


def test_gather_rows_sends_contiguous_tensors_of_uneven_ranks_not_pickled_storages(tmp_path):
    import engine_for_finetuning as engine
    mp.spawn(_gather_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = torch.cat([_rank_rows(0), _rank_rows(1)])
    row_bytes, most = 8 * 4, max(_ROWS.values())
    for rank in range(2):
        got = torch.load(tmp_path / f"rows{rank}.pth", weights_only=False)
        assert torch.equal(got["gathered"], expected) and torch.equal(got["empty"], _rank_rows(0))
        assert got["pickled"] == 0  # tensors only: no all_gather_object
        # per call: the shapes (2 longs), then the rows padded to the largest rank's count in a buffer of their
        # own: 5 rows, then 3 (rank 1 had none) - never the 32 KB storage the views live in
        shape_sends, row_sends = got["sent"][0::2], got["sent"][1::2]
        assert [s["shape"] for s in shape_sends] == [[2], [2]] and all(s["nbytes"] == 16 for s in shape_sends)
        assert [s["shape"] for s in row_sends] == [[most, 8], [_ROWS[0], 8]]
        assert all(s["nbytes"] == s["storage_nbytes"] == s["shape"][0] * row_bytes for s in row_sends)
        # embed_dataset's merge over 2 ranks equals one process merging the concatenation; only captions pickled
        parts = [_merge_inputs(r) for r in range(2)]
        single = engine._merge_ranks(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                                     parts[0][2] + parts[1][2], parts[0][3] + parts[1][3])
        merged = got["merged"]
        assert merged["indices"] == single["indices"] == [0, 1, 2, 3, 4]
        assert torch.equal(merged["video"], single["video"]) and torch.equal(merged["text"], single["text"])
        assert merged["captions"] == single["captions"] and torch.equal(merged["text_to_video"],
                                                                        single["text_to_video"])
        assert all(isinstance(c, str) for obj in got["merge_pickled"] for caps in obj for c in caps)
