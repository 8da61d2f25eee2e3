"""Distributed behaviour with real processes (gloo on CPU): DDP gradients over 2 ranks equal single-process
gradients on the same global batch (contrastive features gathered with gradient; SViTT's contrastive loss with
several captions per video too; QA answers with --dist_eval and re-ranking's matching scores equal one
process's), and torchrun runs the real pre-training entry point (also on a list with broken videos: rank 0 names
every rank's broken files once);
features of uneven ranks are gathered as contiguous tensors (distributed.gather_rows), never as pickled views.
The launch decision (distributed.plan: torchrun / srun / a batch script without srun, device, backend) on
environments of GPU nodes; rank 0's decisions when ranks see the file system differently; the SLURM branch end to
end as srun starts tasks, and an --output_dir that is not shared."""
import argparse
import datetime
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from timm.models import create_model

import modeling_simvtp  # noqa: F401
import distributed
import layers
import model_registry
import utils
from conftest import free_port, mostly_broken_list, randomised
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


def _gradients_scenario(rank: int, world: int, out_dir: str) -> None:
    torch.manual_seed(0)
    model = create_model("simvtp_tiny_patch16", **TINY)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    batch = _global_batch()
    share = len(batch["video"]) // world
    local = {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
    out = ddp(local, gather=distributed.gather_with_grad)
    out["loss"].backward()
    torch.save(_grads(model), os.path.join(out_dir, f"grads{rank}.pth"))


_GROUP_CAPTIONS = [f"a {c} {s} moves {d}" for c in ("red", "blue", "green") for s in ("circle", "square")
                   for d in ("up", "left")][:11]  # 11 items: the ranks embed 6 and 5


def _grouping_inputs():
    import batch_grouping
    import datasets
    import retrieval_eval
    tokenizer = datasets.build_tokenizer()
    torch.manual_seed(0)
    model = create_model("simvtp_tiny_patch16", **{**TINY, "vocab_size": len(tokenizer)})
    cfg = retrieval_eval.EvalConfig(device=torch.device("cpu"), max_text_len=16)

    def grouping(world: int, rank: int):
        sampler = batch_grouping.NeighbourBatchSampler(_GROUP_CAPTIONS, 2, num_replicas=world, rank=rank, seed=1)
        sampler.set_epoch(0)
        return sampler, batch_grouping.TextNeighbourGrouping(sampler, model, lambda i: [_GROUP_CAPTIONS[i]],
                                                             tokenizer, cfg, batch_size=4)
    return grouping


def _grouping_scenario(rank: int, world: int, out_dir: str) -> None:
    sampler, grouping = _grouping_inputs()(world, rank)
    features = grouping.embed()
    order = grouping(0, None)
    torch.save({"features": torch.from_numpy(features), "order": order, "mine": list(sampler)},
               os.path.join(out_dir, f"grouping{rank}.pth"))


@pytest.mark.slow
def test_two_processes_embed_their_shares_and_group_every_clip_alike(gloo_ranks):
    """Neighbour batches: each rank embeds every other caption, the gathered features equal one process's, both
    ranks draw the same order and each gets whole groups of it, disjoint."""
    sampler, grouping = _grouping_inputs()(1, 0)
    expected = torch.from_numpy(grouping.embed())
    sampler.set_features(expected.numpy())
    got = [torch.load(gloo_ranks / f"grouping{rank}.pth", weights_only=True) for rank in range(2)]
    for g in got:
        torch.testing.assert_close(g["features"], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0]["order"], got[1]["order"])
    pairs = {frozenset(g) for g in sampler.epoch_groups()}  # a single process's groups on the same features
    for g in got:  # 5 items each (11 // 2): two whole pairs, then a part of one
        assert all(frozenset(g["mine"][i:i + 2]) in pairs for i in range(0, len(g["mine"]) - 1, 2))
    assert not set(got[0]["mine"]) & set(got[1]["mine"]) and len(got[0]["mine"]) == len(got[1]["mine"]) == 5


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Every scenario below in turn, in one process group of 2 gloo ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for scenario in (_gradients_scenario, _itc_scenario, _qa_scenario, _rerank_scenario, _accumulation_scenario,
                     _grouping_scenario, _gather_scenario):  # the last patches collectives
        scenario(rank, world, out_dir)  # (and puts them back)
    torch.distributed.destroy_process_group()


def _two_ranks_worker(rank: int, world: int, ports: list, gloo_out: str, decisions_root: str) -> None:
    """One spawn of 2 ranks runs the gloo scenarios, then (in process groups of their own) the rank-0-decides
    ones: the process start-up (torch, timm and this module imported in each) is most of the cost."""
    torch.set_num_threads(1)  # the ranks share the cores: OpenMP threads of one would spin-wait on the other's
    _gloo_worker(rank, world, ports[0], gloo_out)
    _decisions_worker(rank, world, ports[1:], decisions_root)


@pytest.fixture(scope="module")
def two_ranks(module_tmp, synthetic_root):
    """(folder where each of 2 gloo ranks left what every scenario of _gloo_worker saw, root of the decision
    scenarios' folders where _decisions_worker left each rank's results)."""
    gloo_out = module_tmp.mktemp("gloo_ranks")
    torch.save(_rerank_inputs(synthetic_root), gloo_out / "rerank_inputs.pth")
    root = _decision_folders(module_tmp.mktemp("decisions"))
    mp.spawn(_two_ranks_worker, args=(2, [free_port(), free_port(), free_port()], str(gloo_out), str(root)),
             nprocs=2, join=True)
    return gloo_out, root


@pytest.fixture(scope="module")
def gloo_ranks(two_ranks):
    return two_ranks[0]


@pytest.mark.slow
def test_two_rank_gradients_equal_single_process(gloo_ranks):
    torch.manual_seed(0)
    model = create_model("simvtp_tiny_patch16", **TINY)
    model(_global_batch(), gather=None)["loss"].backward()
    expected = _grads(model)
    for rank in range(2):
        got = torch.load(gloo_ranks / f"grads{rank}.pth", weights_only=True)
        assert set(got) == set(expected)
        for name, grad in expected.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _itc_features() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    proj = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6)
    y = torch.randn(8, 6)
    ids = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4])  # same-video pairs inside a rank's half and across the halves
    return proj, x, y, ids


def _itc_scenario(rank: int, world: int, out_dir: str) -> None:
    """SViTT's contrastive loss (layers.itc_loss, captions of one video are positives) on each rank's half."""
    proj, x, y, ids = _itc_features()
    ddp = torch.nn.parallel.DistributedDataParallel(proj)
    part = slice(rank * 4, rank * 4 + 4)
    loss = layers.itc_loss(ddp(x[part]), ddp(y[part]) * 2, 0.1, ids[part], distributed.gather_with_grad)
    loss.backward()
    torch.save({n: p.grad for n, p in proj.named_parameters()}, os.path.join(out_dir, f"itc_grad{rank}.pth"))


@pytest.mark.slow
def test_two_process_itc_gradient_equals_one_process_on_the_whole_batch(gloo_ranks):
    proj, x, y, ids = _itc_features()
    layers.itc_loss(proj(x), proj(y) * 2, 0.1, ids, None).backward()
    for rank in range(2):
        got = torch.load(gloo_ranks / f"itc_grad{rank}.pth", weights_only=True)
        for name, p in proj.named_parameters():
            torch.testing.assert_close(got[name], p.grad, rtol=1e-5, atol=1e-6)


def _qa_inputs():
    """A seeded tiny QA model, 5 questions about 5 clips and a 3-answer list (the same in every process)."""
    torch.manual_seed(0)
    model = randomised(model_registry.create("svitt_qa_tiny_patch16", img_size=32, num_frames=2, vocab_size=300),
                       4, scale=0.2).eval()
    g = torch.Generator().manual_seed(7)
    video = torch.randint(0, 256, (5, 1, 3, 2, 32, 32), generator=g, dtype=torch.uint8)
    q_ids = torch.randint(110, 300, (5, 4), generator=g)
    q_ids[:, 0] = 101
    a_ids = torch.tensor([[101, 200, 102, 0], [101, 201, 202, 102], [101, 203, 102, 0]])
    return model, video, q_ids, a_ids


def _answer(model, video, q_ids, a_ids, indices):
    import engine_for_qa
    import retrieval_eval
    batch = {"video": video[indices], "question_input_ids": q_ids[indices],
             "question_mask": torch.ones_like(q_ids[indices]), "index": torch.tensor(indices)}
    cfg = engine_for_qa.QAEvalConfig(retrieval_eval.EvalConfig(device=torch.device("cpu")), k_test=2)
    return engine_for_qa.answer_questions(model, [batch], ["a", "b", "c"], a_ids, (a_ids != 0).long(), cfg)


def _qa_scenario(rank: int, world: int, out_dir: str) -> None:
    """QA answering with --dist_eval: each rank answers its share of the questions, merge_ranks gathers them."""
    import engine_for_qa
    model, video, q_ids, a_ids = _qa_inputs()
    share = [[0, 2, 4], [1, 3, 0]][rank]  # DistributedSampler's interleaved split, padded by a repeat of 0
    merged = engine_for_qa.merge_ranks(_answer(model, video, q_ids, a_ids, share))
    torch.save(merged, os.path.join(out_dir, f"qa_rank{rank}.pt"))


@pytest.mark.slow
def test_two_processes_answer_their_shares_and_every_rank_gets_all_questions_once(gloo_ranks):
    model, video, q_ids, a_ids = _qa_inputs()
    single = _answer(model, video, q_ids, a_ids, [0, 1, 2, 3, 4])
    for rank in range(2):
        merged = torch.load(gloo_ranks / f"qa_rank{rank}.pt", weights_only=True)
        assert [p["index"] for p in merged] == [0, 1, 2, 3, 4]
        assert [p["prediction"] for p in merged] == [p["prediction"] for p in single]
        assert [p["score"] for p in merged] == pytest.approx([p["score"] for p in single], abs=1e-5)


SVITT_TINY = dict(img_size=32, num_frames=4, attn_block_size=4, sparse_random_attn=1, token_keep_rate=0.5,
                  token_drop_loc=(1,), fusion_keep_rate=0.5, fusion_drop_loc=(2,))


def _rerank_inputs(synthetic_root) -> dict:
    """3 synthetic test videos read at 8 frames (two 4-frame clips), 4 captions, and the (caption, video) pairs the
    matching head scores."""
    import annotations
    import datasets
    records = annotations.read_annotations(os.path.join(synthetic_root, "annotations", "test.json"), synthetic_root)
    data = datasets.VideoTextDataset(records, mode="test", num_frames=8, input_size=32, short_side_size=32,
                                     test_num_segment=1, test_num_crop=1, sample_type="middle")
    videos = torch.stack([data[i]["video"][0] for i in range(3)])  # uint8 [V, C, 8, H, W]
    captions = [c for r in records for c in r.captions][:4]
    pairs = [(t, v) for v in range(3) for t in range(4) if (t + v) % 2 == 0 or t == v]
    return {"videos": videos, "captions": captions, "pairs": torch.tensor(pairs)}


def _match_scores(inputs: dict) -> dict:
    """The seeded tiny SViTT's matching scores of the pairs, over 2 clips per video (split among the ranks when
    a process group is up)."""
    import datasets
    import retrieval_eval
    tokenizer = datasets.build_tokenizer()
    torch.manual_seed(0)
    model = model_registry.create("svitt_tiny_patch16", vocab_size=len(tokenizer), **SVITT_TINY).eval()
    cfg = retrieval_eval.EvalConfig(torch.device("cpu"), chunk=4, num_clips=2)
    return retrieval_eval.match_scores(model, [tuple(p) for p in inputs["pairs"].tolist()], inputs["videos"],
                                       inputs["captions"], tokenizer, cfg)


def _rerank_scenario(rank: int, world: int, out_dir: str) -> None:
    """Re-ranking's matching scores (retrieval_eval.match_scores) with each rank scoring its share of the pairs."""
    scores = _match_scores(torch.load(os.path.join(out_dir, "rerank_inputs.pth"), weights_only=True))
    torch.save({"keys": sorted(scores), "values": [scores[p] for p in sorted(scores)]},
               os.path.join(out_dir, f"rerank_scores{rank}.pth"))


@pytest.mark.slow
def test_two_gloo_processes_rerank_like_one(gloo_ranks):
    one = _match_scores(torch.load(gloo_ranks / "rerank_inputs.pth", weights_only=True))
    for rank in range(2):
        got = torch.load(gloo_ranks / f"rerank_scores{rank}.pth", weights_only=True)
        assert [tuple(k) for k in got["keys"]] == sorted(one)  # every rank has every pair, gathered once
        torch.testing.assert_close(torch.tensor(got["values"]), torch.tensor([one[p] for p in sorted(one)]),
                                   rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def torchrun_on_a_mostly_broken_list(module_tmp, synthetic_root, broken_videos):
    """One torchrun launch of the real pre-training entry point (2 processes, zero-shot evaluation each epoch) on
    a list of 10 good clips, 12 missing files and 3 unreadable ones -> (run, output dir, list, its broken paths).
    Each rank draws 12 of the 25 (drop_last), 3 steps of 4: every video a rank draws is read."""
    folder = module_tmp.mktemp("torchrun_broken")
    anno, broken = mostly_broken_list(synthetic_root, broken_videos, folder, good=10, missing=12)
    out = folder / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), os.path.join(ROOT, "run_simvtp_pretraining.py"), "--data_path", anno,
           "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
           "--input_size", "32", "--batch_size", "4", "--epochs", "1", "--warmup_epochs", "0",
           "--num_workers", "0", "--device", "cpu", "--precision", "fp32", "--output_dir", str(out),
           "--max_broken_fraction", "0.9", "--seed", "4", "--print_freq", "1", "--eval_every", "1",
           "--eval_data_path", os.path.join(synthetic_root, "annotations", "val.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, out, anno, broken


@pytest.mark.slow
def test_torchrun_two_processes_pretrain_on_synthetic(torchrun_on_a_mostly_broken_list):
    run, out, _, _ = torchrun_on_a_mostly_broken_list
    assert "2 process(es)" in run.stdout
    assert (out / "latest").is_file() and (out / "args.json").is_file() and (out / "log.txt").is_file()
    # only rank 0 prints: one "Saved" line, not two
    assert run.stdout.count("Saved ") == 1
    # zero-shot evaluation: each rank embeds half the validation videos, the features are gathered
    assert run.stdout.count("Zero-shot on") == 1
    record = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert record["zs_v2t_queries"] == 8 and 0.0 <= record["zs_t2v_R@1"] <= 100.0


SVITT_ALL_ON = ("--model", "svitt_tiny_patch16", "--attn_block_size", "4", "--sparse_random_attn", "1",
                "--token_keep_rate", "0.5", "--token_drop_loc", "1")  # 16 patches: 4 blocks, 3 random draws


# 2 of the epoch's 4 steps at batch 3 per rank; the uninterrupted run also leaves its step-1 state
RESUME_KEEP = ("--save_every_steps", "1", "--keep_last", "0", "--max_steps", "2")


def _check_step_1(full_dir) -> str:
    """The uninterrupted run's step-1 checkpoint, mid-epoch, holding a generator state per rank, each its own."""
    import checkpoint
    step_1 = checkpoint.list_checkpoints(str(full_dir))[0]
    saved = checkpoint.read_checkpoint_file(step_1)
    assert saved["global_step"] == 1 and saved["step_in_epoch"] == 1  # mid-epoch: the resumed run trains 1 more
    states = saved["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["cpu"], states[1]["cpu"])
    return step_1


def _check_resumed_equals_full(full_dir, part_dir, runs) -> None:
    """The resumed run ends on the uninterrupted run's weights, bitwise; the collectives in use are the current API:
    no deprecation warning on any rank."""
    import checkpoint
    want = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(full_dir)))
    got = checkpoint.read_checkpoint_file(checkpoint.find_latest(str(part_dir)))
    assert got["global_step"] == want["global_step"] == 2
    for name, tensor in want["model"].items():
        assert torch.equal(got["model"][name], tensor), name
    for run in runs:
        assert "deprecat" not in (run.stdout + run.stderr).lower(), run.stderr[-2000:]


@pytest.mark.slow
def test_torchrun_two_processes_name_every_ranks_broken_videos_once(torchrun_on_a_mostly_broken_list,
                                                                   synthetic_root):
    run, out, anno, broken = torchrun_on_a_mostly_broken_list
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


def _accumulation_scenario(rank: int, world: int, out_dir: str) -> None:
    """Count DDP's gradient all-reduces (a counting comm hook) over one accumulation window of two micro-batches."""
    import engine_for_pretraining as engine
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
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


@pytest.mark.slow
def test_accumulation_all_reduces_only_at_the_end_of_the_window(gloo_ranks):
    """DDP decides at forward time whether a backward all-reduces: the window's first micro-batch must run its
    forward under no_sync too, or every micro-batch pays a full gradient all-reduce."""
    for rank in range(2):
        calls = json.load(open(gloo_ranks / f"calls{rank}.json"))
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


def _gather_scenario(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist

    import retrieval_eval as engine
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
    dist.all_gather, dist.all_gather_object = real_all_gather, real_all_gather_object


@pytest.mark.slow
def test_gather_rows_sends_contiguous_tensors_of_uneven_ranks_not_pickled_storages(gloo_ranks):
    import retrieval_eval as engine
    expected = torch.cat([_rank_rows(0), _rank_rows(1)])
    row_bytes, most = 8 * 4, max(_ROWS.values())
    for rank in range(2):
        got = torch.load(gloo_ranks / f"rows{rank}.pth", weights_only=False)
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


# ----------------------------------------------------------------------------------------------- the launch plan

TORCHRUN = {"RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "MASTER_ADDR": "node0", "MASTER_PORT": "29500"}
SRUN = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_NTASKS": "64",
        "SLURM_STEP_NUM_TASKS": "64", "SLURM_LOCALID": "5", "SLURM_STEP_NODELIST": "gpu[07-08,10],gpu-b1"}


@pytest.mark.parametrize("device, env, gpus, want", [
    # --device auto (the default) on a GPU node: NCCL on this rank's GPU (before: gloo, every rank on GPU 0)
    ("auto", TORCHRUN, 8, ("torchrun", "nccl", "cuda:3", 3, 16)),
    ("auto", TORCHRUN, 0, ("torchrun", "gloo", "cpu", 3, 16)),
    ("cpu", TORCHRUN, 8, ("torchrun", "gloo", "cpu", 3, 16)),
    ("cuda", TORCHRUN, 8, ("torchrun", "nccl", "cuda:3", 3, 16)),
    ("auto", SRUN, 8, ("srun", "nccl", "cuda:5", 13, 64)),
    # SLURM binding one GPU per task: each task sees only its own, as cuda:0 (before: set_device(5) failed)
    ("auto", SRUN, 1, ("srun", "nccl", "cuda:0", 13, 64)),
    ("auto", {**SRUN, "SLURM_LOCALID": "5"}, 4, ("srun", "nccl", "cuda:1", 13, 64)),
    ("auto", {}, 8, ("single", None, "cuda", 0, 1)),
    ("auto", {}, 0, ("single", None, "cpu", 0, 1)),
    ("cuda:1", {}, 2, ("single", None, "cuda:1", 0, 1)),
    ("auto", {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "1"}, 8, ("single", None, "cuda", 0, 1)),
    # `srun --ntasks 1` inside a 64-task allocation: one process
    ("auto", {**SRUN, "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1"}, 8, ("single", None, "cuda", 0, 1)),
])
def test_plan_resolves_the_device_before_the_backend(device, env, gpus, want):
    p = distributed.plan(device, env, gpus)
    assert (p.launcher, p.backend, p.device, p.rank, p.world_size) == want


def test_plan_under_srun_derives_the_rendezvous_from_the_job():
    p = distributed.plan("auto", SRUN, 8)
    assert (p.master_addr, p.master_port, p.local_rank) == ("gpu07", str(10000 + 4242), 5)
    given = distributed.plan("auto", {**SRUN, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}, 8)
    assert (given.master_addr, given.master_port) == ("head", "1234")
    no_step_list = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}
    assert distributed.plan("auto", {**no_step_list, "SLURM_JOB_NODELIST": "a[3-4]"}, 8).master_addr == "a3"
    with pytest.raises(distributed.LaunchError, match="export MASTER_ADDR"):
        distributed.plan("auto", no_step_list, 8)
    assert distributed.port_for_job("123456") == 13456 and distributed.port_for_job(None, 29501) == 29501


@pytest.mark.parametrize("step", [{}, {"SLURM_STEP_ID": "4294967291"}])
def test_a_batch_script_without_srun_is_refused_at_once(step):
    """Before: the SLURM branch, then 30 minutes of waiting for 63 ranks that were never started."""
    batch = {k: v for k, v in SRUN.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"} | step
    with pytest.raises(distributed.LaunchError, match=r"SLURM job 4242 with 64 tasks.*without srun.*srun python"):
        distributed.plan("auto", batch, 8)


@pytest.mark.parametrize("device, env, gpus, message", [
    ("cuda:1", TORCHRUN, 8, "names one GPU"),
    ("auto", {**TORCHRUN, "LOCAL_RANK": "5"}, 4, "local rank 5 but 4 GPU"),
    ("cuda", {}, 0, "CUDA is not available on this machine"),
    ("cuda:2", {}, 2, "shows 2 GPU"),
    ("gpu", {}, 0, "not a device name"),
    ("auto", {"RANK": "1", "WORLD_SIZE": "2"}, 0, "MASTER_ADDR / MASTER_PORT are not"),
])
def test_plan_refuses_what_cannot_work_in_one_line(device, env, gpus, message):
    with pytest.raises(ValueError, match=message) as err:
        distributed.plan(device, env, gpus)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[01-03,07],gpu-a1", ["node01", "node02", "node03", "node07", "gpu-a1"]),
    ("gpu-a1", ["gpu-a1"]),
    ("n[8-11]", ["n8", "n9", "n10", "n11"]),
    ("n[098-100]", ["n098", "n099", "n100"]),
    ("r[1-2]-g[1,3]", ["r1-g1", "r1-g3", "r2-g1", "r2-g3"]),
    ("a,b[2],c", ["a", "b2", "c"]),
])
def test_slurm_node_lists_expand_without_scontrol(nodelist, hosts):
    assert distributed.expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node]1[", "n[a-b]", "n[5-2]"])
def test_a_malformed_node_list_is_named(nodelist):
    with pytest.raises(distributed.LaunchError, match="SLURM_JOB_NODELIST"):
        distributed.expand_nodelist(nodelist, "SLURM_JOB_NODELIST")


# ----------------------------------------------------------------------------------------------- rank 0 decides
# Two gloo ranks whose views of the file system differ, as on storage that is not shared or lags behind (NFS
# attribute caching): the spawn of two_ranks (above) runs every scenario after the gloo ones (each in its own
# folders and process group; the process start-up is most of the cost here), the tests below read what each rank did.


def _join(rank: int, world: int, port: int) -> argparse.Namespace:
    """This worker as rank `rank` of a torchrun-style launch, through the real init_distributed (gloo here)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    distributed.INIT_TIMEOUT = datetime.timedelta(seconds=30)  # a mismatch fails the test instead of hanging it
    args = argparse.Namespace(device="auto")
    distributed.init_distributed(args)
    return args


def _save_epochs(folder, epochs: int) -> None:
    """Training checkpoints of a tiny model after each of `epochs` epochs; `latest` names the last."""
    import checkpoint
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    for epoch in range(epochs):
        with torch.no_grad():
            model.weight.fill_(epoch + 1.0)
        state = {"epoch": epoch + 1, "micro_in_epoch": 0, "samples_in_epoch": 0, "global_step": 10 * (epoch + 1)}
        checkpoint.save_training_state(str(folder), model=model, optimizer=optimizer, scaler=None, epoch=epoch,
                                       step_in_epoch=None, global_step=10 * (epoch + 1), args={},
                                       train_state=state, rng_states=[checkpoint.rng_state()] * 2)


def _resume(args: argparse.Namespace, folder: str) -> dict:
    import checkpoint
    args.output_dir, args.resume, args.auto_resume = folder, "", True
    model = torch.nn.Linear(3, 2)
    try:
        state, _ = checkpoint.resume_if_any(args, model, torch.optim.AdamW(model.parameters()), None)
    except checkpoint.CheckpointError as err:
        return {"error": str(err).replace(folder, "<its folder>")}
    return {"global_step": state["global_step"], "weight": model.weight[0, 0].item()}


def _finish_epochs(args: argparse.Namespace, folder: str) -> dict:
    import engine_for_pretraining as engine
    evaluated, best = [], []

    def evaluate(epoch: int) -> dict:
        distributed.gather_objects(epoch)  # evaluation gathers features from every rank
        evaluated.append(epoch)
        return {"r1_sum": 30.0}

    run = engine.Run(model=None, train_model=None, loader=None, sampler=None, dataset=None, optimizer=None,
                     scaler=None, lr_schedule=None, wd_schedule=None, cfg=None, state=engine.TrainState(),
                     batch_size=1, epochs=5, output_dir=folder, save=None)
    finish = engine._EpochFinisher(run, evaluate, "val", "r1_sum", lambda epoch, metrics: best.append(epoch))
    finish(1, {"epoch": 1, "global_step": 6}, evaluate_now=True)  # rank 0's record: evaluated already
    finish(2, {"epoch": 2, "global_step": 9}, evaluate_now=True)  # 30 is below rank 0's best (50)
    return {"evaluated": evaluated, "best": best}


def _test_best(args: argparse.Namespace, folder: str) -> dict:
    import engine_for_finetuning
    args.output_dir = folder
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(-1.0 - args.rank)  # each rank's last weights differ from the best ones
    engine_for_finetuning.load_best(model, folder)
    return {"weight": model.weight.flatten().tolist()}


def _error_exit(rank: int, world: int, port: int) -> dict:
    """An entry point whose main fails after the process group started."""
    os.environ.update(MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    sys.argv = ["run_something.py"]

    def main(args: argparse.Namespace) -> None:
        distributed.init_distributed(args)
        raise ValueError("a user mistake found after the process group started")

    try:
        utils.run_entry_point(main, parser)
        code = 0
    except SystemExit as stop:
        code = stop.code
    return {"exit": code, "group_left": not torch.distributed.is_initialized()}


SCENARIOS = {"stale_latest": _resume, "stale_file": _resume, "stale_eval_state": _finish_epochs,
             "best_file_unseen": _test_best}


def _decisions_worker(rank: int, world: int, ports: list, root: str) -> None:
    args = _join(rank, world, ports[0])
    results = {}
    for name, scenario in SCENARIOS.items():
        results[name] = scenario(args, os.path.join(root, name, f"rank{rank}"))
    distributed.shutdown()
    results["error_exit"] = _error_exit(rank, world, ports[1])
    with open(os.path.join(root, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def _decision_folders(root):
    """What each rank sees of each scenario: the folders <root>/<scenario>/rank<r>."""
    import shutil
    import checkpoint
    for name in SCENARIOS:
        (root / name / "rank0").mkdir(parents=True)
    # rank 1's `latest` still names epoch 0's checkpoint
    _save_epochs(root / "stale_latest" / "rank0", 2)
    shutil.copytree(root / "stale_latest" / "rank0", root / "stale_latest" / "rank1")
    (root / "stale_latest" / "rank1" / "latest").write_text("checkpoint-0.pth\n")
    # rank 1 reads an old copy of the checkpoint rank 0 chose
    _save_epochs(root / "stale_file" / "rank0", 2)
    _save_epochs(root / "stale_file" / "old", 1)
    shutil.copytree(root / "stale_file" / "rank0", root / "stale_file" / "rank1")
    shutil.copy(root / "stale_file" / "old" / "checkpoint-0.pth", root / "stale_file" / "rank1" / "checkpoint-1.pth")
    # rank 1's eval_state.json is older: evaluated up to step 3, best 10 (rank 0's: step 6, best 50)
    for rank, (step, best) in enumerate(((6, 50.0), (3, 10.0))):
        folder = root / "stale_eval_state" / f"rank{rank}"
        folder.mkdir(exist_ok=True)
        (folder / "eval_state.json").write_text(json.dumps({"epoch": 1, "global_step": step, "best": best,
                                                            "best_epoch": 0, "metric": "r1_sum"}))
    # only rank 0 sees checkpoint-best.pth
    (root / "best_file_unseen" / "rank1").mkdir()
    best = torch.nn.Linear(3, 2)
    best_file = root / "best_file_unseen" / "rank0" / "checkpoint-best.pth"
    checkpoint.save_atomic({"model": best.state_dict()}, str(best_file))
    (root / "best_weights.json").write_text(json.dumps(best.weight.flatten().tolist()))
    return root


@pytest.fixture(scope="module")
def decisions(two_ranks) -> list[dict]:
    """Per rank, what each scenario did. The folders rank r sees are <scenario>/rank<r>."""
    root = two_ranks[1]
    return [{**json.loads((root / f"rank{r}.json").read_text()), "root": root} for r in range(2)]


@pytest.mark.slow
def test_every_rank_resumes_from_the_checkpoint_rank_0_chose(decisions):
    """Before: rank 1 resumed from its own stale `latest` at global step 10, rank 0 at 20: collectives hung."""
    assert [d["stale_latest"] for d in decisions] == [{"global_step": 20, "weight": 2.0}] * 2


@pytest.mark.slow
def test_ranks_reading_different_contents_of_one_checkpoint_stop_with_one_line(decisions):
    """Rank 1 reads an old copy of the file rank 0 chose: every rank stops with the same error, none hangs."""
    errors = [d["stale_file"]["error"] for d in decisions]
    assert errors[0] == errors[1] and errors[0].startswith("<its folder>/checkpoint-1.pth: the processes read "
                                                           "different training positions")
    assert "must be shared storage" in errors[0] and "\n" not in errors[0]


@pytest.mark.slow
def test_the_best_and_the_evaluations_done_are_rank_0s_decision(decisions):
    """Before: rank 1 evaluated epoch 1 again (its eval_state said step 3) and called epoch 2 the best (saving
    checkpoint-best behind a barrier rank 0 never reached)."""
    assert [d["stale_eval_state"] for d in decisions] == [{"evaluated": [2], "best": []}] * 2
    record = json.loads((decisions[0]["root"] / "stale_eval_state" / "rank0" / "eval_state.json").read_text())
    assert record["best"] == 50.0 and record["global_step"] == 9


@pytest.mark.slow
def test_every_rank_tests_the_best_weights_rank_0_found(decisions):
    """Only rank 0's folder shows checkpoint-best.pth. Before: rank 1 tested its own last weights."""
    best = json.loads((decisions[0]["root"] / "best_weights.json").read_text())
    assert [d["best_file_unseen"] for d in decisions] == [{"weight": best}] * 2


@pytest.mark.slow
def test_an_error_leaves_the_process_group(decisions):
    """run_entry_point destroys the process group on the way out, also when main raised (exit status 1)."""
    assert [d["error_exit"] for d in decisions] == [{"exit": 1, "group_left": True}] * 2


# ----------------------------------------------------------------------------------------------- as srun starts them


def _free_job_port() -> tuple[str, int]:
    """A SLURM job id whose derived rendezvous port (distributed.port_for_job) is free right now."""
    import random
    import socket
    for _ in range(200):
        job = str(random.randrange(1, 10 ** 6))
        port = distributed.port_for_job(job)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return job, port
    raise RuntimeError("no free port in the job-port range")


def _srun(argvs: list[list[str]], job: str) -> list[subprocess.CompletedProcess]:
    """Start one process per argv with the variables srun gives its tasks (no MASTER_ADDR, no MASTER_PORT, no
    RANK: the SLURM branch derives them) and wait for all."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
            and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", SLURM_JOB_ID=job, SLURM_STEP_ID="0",
                SLURM_NTASKS=str(len(argvs)), SLURM_STEP_NUM_TASKS=str(len(argvs)), SLURM_STEP_NODELIST="localhost")
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)})
             for r, argv in enumerate(argvs)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def _pretrain_argv(synthetic_root, out, *extra) -> list[str]:
    return [os.path.join(ROOT, "run_simvtp_pretraining.py"),
            "--data_path", os.path.join(synthetic_root, "annotations", "pretrain.json"),
            "--data_root", str(synthetic_root), "--model", "simvtp_tiny_patch16", "--num_frames", "4",
            "--input_size", "32", "--batch_size", "2", "--epochs", "1", "--warmup_epochs", "0", "--num_workers", "0",
            "--precision", "fp32", "--output_dir", str(out), "--print_freq", "1", *extra]


@pytest.mark.slow
def test_an_output_dir_each_node_sees_alone_is_one_clear_error(tmp_path, synthetic_root):
    """Rank 1 is given another folder, as a node-local path would be. Before: each rank resumed from its own view
    (or wrote nowhere shared); now every rank stops at start-up, rank 0 says why in one line."""
    job, _ = _free_job_port()
    runs = _srun([_pretrain_argv(synthetic_root, tmp_path / "node0"),
                  _pretrain_argv(synthetic_root, tmp_path / "node1")], job)
    assert [r.returncode for r in runs] == [1, 1], runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    lines = runs[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in runs[0].stderr + runs[1].stderr, runs[0].stderr
    assert lines[0].startswith(f"error: --output_dir {tmp_path / 'node0'}: not shared by all processes: rank 1 on ")
    assert f"(its --output_dir {tmp_path / 'node1'})" in lines[0] and "shared storage" in lines[0]
    assert runs[1].stderr == ""  # the same error on rank 1, printed once (by rank 0)
    assert not [f for f in os.listdir(tmp_path / "node0") if f.startswith(distributed.SHARED_CHECK)]


@pytest.mark.slow
def test_srun_tasks_train_and_resume_together_with_no_rendezvous_exported(tmp_path, synthetic_root):
    """The SLURM branch end to end: rank, world size, MASTER_ADDR (the node list's first host) and MASTER_PORT
    (from the job id) derived from what srun gives; --device auto is gloo on this CPU machine. The second job
    resumes where the first stopped, both ranks from the one checkpoint rank 0 chose (else: a one-line error), and
    restores each rank's generators: it ends on the weights of an uninterrupted run. SViTT with every random part
    on draws from each rank's generator: its random attention blocks, drop path and hard negatives (SimVTP's drop
    path and hard negatives come from the same per-rank state). The first job is that uninterrupted run (2 steps,
    saving each); its step-1 checkpoint alone in a folder is what a first job stopped after step 1 leaves."""
    import shutil
    flags = ("--batch_size", "3", "--drop_path", "0.2", "--seed", "5", *RESUME_KEEP, *SVITT_ALL_ON)
    full, part = tmp_path / "full", tmp_path / "part"
    job, port = _free_job_port()
    first = _srun([_pretrain_argv(synthetic_root, full, *flags)] * 2, job)
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    assert f"2 processes started by srun, backend gloo, rank 0 on cpu, rendezvous localhost:{port}" in first[0].stdout
    step_1 = _check_step_1(full)
    saved_lines = [line for line in first[0].stdout.splitlines() if line.startswith("Saved ")]
    assert [line.split("/")[-1] for line in saved_lines] == ["checkpoint-0-step1.pth", "checkpoint-0-step2.pth"]
    part.mkdir()
    saved = shutil.copy(step_1, part)
    job, _ = _free_job_port()
    second = _srun([_pretrain_argv(synthetic_root, part, *flags)] * 2, job)
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    assert f"Resumed from {saved}: epoch 0" in second[0].stdout and second[1].stdout == ""
    _check_resumed_equals_full(full, part, first + second)
