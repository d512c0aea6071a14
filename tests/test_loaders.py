"""FFCV loaders: view outputs, rank shards, epoch-seeded order and resume, error surfacing, threads.

A small beton whose labels are the sample indices makes every order observable.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace as dc_replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline.sources import ImageSource, load_source
from data_pipeline.write import write_beton

ROOT = Path(__file__).resolve().parent.parent
N = 60  # divisible by 2 and 3


@pytest.fixture(scope="module")
def id_beton(tmp_path_factory) -> tuple[Path, ImageSource]:
    """N synthetic 16x16 images; label i for image i."""
    syn = load_source({"name": "synthetic", "num_classes": 4, "resolution": 16, "train_size": N,
                       "test_size": 8, "seed": 0}, "train")
    src = ImageSource("ids", "train", syn.images, np.arange(N, dtype=np.int64), [str(i) for i in range(N)], 16)
    path = tmp_path_factory.mktemp("ids") / "ids.beton"
    write_beton(src, path)
    return path, src


def _labels(loader) -> list[int]:
    return [int(v) for b in loader for v in b["label"]]


def test_eval_loader_returns_stored_pixels_in_order(id_beton):
    from data_pipeline.loaders import build_loader

    path, src = id_beton
    loader = build_loader(str(path), "eval", batch_size=16, train=False, drop_last=False, num_threads=1)
    batches = list(loader)
    assert len(loader) == 4 and [len(b["label"]) for b in batches] == [16, 16, 16, 12]
    x = torch.cat([b["views"][0] for b in batches])
    assert x.dtype == torch.float32 and x.shape == (N, 3, 16, 16) and x.is_contiguous()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    expected = torch.from_numpy(np.stack([src[i][0] for i in range(N)])).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(x, expected)
    assert torch.cat([b["label"] for b in batches]).tolist() == list(range(N))


def test_ssl_views(id_beton):
    """three_view = (original, t(x), t'(x)) (RoCL); two_view uses the same ops (SimCLR/ACL)."""
    from data_pipeline.loaders import build_loader

    path, src = id_beton
    loader = build_loader(str(path), "three_view", batch_size=20, num_threads=2, seed=3,
                          augment={"crop_scale": [0.08, 1.0], "color": {"grayscale_p": 0.5}})
    assert loader.view_kinds == ["plain", "ssl", "ssl"]
    seen = []
    for batch in loader:
        plain, v1, v2 = batch["views"]
        for v in (plain, v1, v2):
            assert v.shape == (20, 3, 16, 16) and v.dtype == torch.float32
            assert float(v.min()) >= 0.0 and float(v.max()) <= 1.0
        ids = batch["label"]
        expected = torch.from_numpy(np.stack([src[int(i)][0] for i in ids])).permute(0, 3, 1, 2).float() / 255
        torch.testing.assert_close(plain, expected)  # the original image, untouched
        assert not torch.allclose(v1, v2)  # two independent augmentations
        gray = ((v1[:, 0] - v1[:, 1]).abs().amax(dim=(1, 2)) < 1e-6)
        seen.append(gray.float().mean().item())
    assert 0.15 < float(np.mean(seen)) < 0.85  # grayscale_p=0.5 per sample (60 samples)
    assert len(loader) == 3


def test_weak_view_is_pad_crop_and_flip(id_beton):
    from data_pipeline.loaders import build_loader

    path, src = id_beton
    loader = build_loader(str(path), "weak", batch_size=30, num_threads=1, augment={"crop_padding": 2})
    for batch in loader:
        (x,) = batch["views"]
        assert x.shape == (30, 3, 16, 16)
        for img, i in zip(x, batch["label"]):
            orig = torch.from_numpy(src[int(i)][0]).permute(2, 0, 1).float() / 255
            # Some shift in [-2, 2]^2 (zero fill) of the image or of its mirror reproduces it.
            ok = False
            for cand in (orig, orig.flip(-1)):
                padded = torch.nn.functional.pad(cand, (2, 2, 2, 2))
                for dy in range(5):
                    for dx in range(5):
                        if torch.equal(padded[:, dy:dy + 16, dx:dx + 16], img):
                            ok = True
            assert ok


def _fake_loader(n: int, seed: int) -> SimpleNamespace:
    return SimpleNamespace(indices=np.arange(n, dtype="uint64"), seed=seed, distributed=True)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_shards_disjoint_cover_and_epoch_seeded(monkeypatch, world):
    """FFCV's distributed traversal orders (DistributedSampler under the hood), per rank."""
    import torch.distributed as dist
    from ffcv.traversal_order import Random, Sequential

    def orders(order_cls, n, seed, epoch):
        out = []
        for rank in range(world):
            monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
            monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
            monkeypatch.setattr(dist, "is_available", lambda: True)
            out.append(np.asarray(order_cls(_fake_loader(n, seed)).sample_order(epoch)).tolist())
        return out

    for cls in (Random, Sequential):
        shards = orders(cls, N, seed=5, epoch=0)
        assert all(len(s) == N // world for s in shards)
        assert sorted(sum(shards, [])) == list(range(N))  # disjoint and covering
    e0, e1 = orders(Random, N, 5, 0), orders(Random, N, 5, 1)
    assert e0 != e1 and sorted(sum(e1, [])) == list(range(N))
    assert orders(Random, N, 5, 1) == e1  # a function of (seed, epoch) only
    assert orders(Random, N, 6, 1) != e1
    # N not divisible by world: padded with repeats, every rank the same length (DDP-safe).
    shards = orders(Random, N + 1, 5, 0)
    assert len({len(s) for s in shards}) == 1 and set(sum(shards, [])) == set(range(N + 1))


def test_order_resume_via_set_epoch(id_beton):
    from data_pipeline.loaders import build_loader

    path, _ = id_beton
    a = build_loader(str(path), "eval", batch_size=10, train=True, seed=7, num_threads=1)
    first, second = _labels(a), _labels(a)
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    assert a.epoch == 2
    np.testing.assert_array_equal(a.order(1), np.random.default_rng(7 + 1).permutation(N))
    b = build_loader(str(path), "eval", batch_size=10, train=True, seed=7, num_threads=1)
    b.set_epoch(1)  # a resumed run continues with epoch 1's order
    assert _labels(b) == second
    # The colour-augmentation stream is re-seeded from (seed, rank, epoch): on un-cropped images
    # (the eval decoder) a resumed epoch reproduces the augmented batches exactly.
    from data_pipeline.loaders import ViewLoader

    def colour_epoch(base, epoch):
        v = ViewLoader(base.loader, ["ssl"], base.aug, seed=7)
        v.set_epoch(epoch)
        return [(b["label"], b["views"][0]) for b in v]

    run1, resumed, other = colour_epoch(a, 1), colour_epoch(b, 1), colour_epoch(b, 2)
    for (l1, x1), (l2, x2) in zip(run1, resumed):
        assert torch.equal(l1, l2) and torch.equal(x1, x2)
    assert not torch.equal(torch.cat([x for _, x in run1]), torch.cat([x for _, x in other]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_real_gloo_ranks_read_disjoint_shards(id_beton, tmp_path):
    path, _ = id_beton
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "dist_loader_worker.py"), str(path), str(r),
                               "2", port, str(tmp_path / f"rank{r}.json")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    e0 = [r["epochs"]["0"] for r in res]
    e1 = [r["epochs"]["1"] for r in res]
    assert all(len(s) == N // 2 for s in e0 + e1)
    assert sorted(e0[0] + e0[1]) == sorted(e1[0] + e1[1]) == list(range(N))  # disjoint, covering
    assert e0 != e1  # reshuffled per epoch
    assert [r["epochs"]["0_again"] for r in res] == e0  # set_epoch(0) replays epoch 0


def _python_op(fn):
    """An FFCV operation that runs `fn(images) -> images` in Python (not jitted), in FFCV's thread."""
    from ffcv.pipeline.operation import Operation

    class PythonOp(Operation):
        def generate_code(self):
            def run(images, _dst):
                return fn(images)
            return run

        def declare_state_and_memory(self, previous_state):
            return dc_replace(previous_state, jit_mode=False), None

    return PythonOp()


def _boom(raised_at: list):
    """Raises on the third batch."""
    calls = [0]

    def boom(images):
        calls[0] += 1
        if calls[0] == 3:
            raised_at.append(time.time())
            raise ValueError("decoder exploded on batch 3")
        return images
    return _python_op(boom)


def test_pipeline_exception_surfaces_in_consumer(id_beton):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor

    from data_pipeline.loaders import GuardedLoader, PipelineError

    path, _ = id_beton
    raised_at: list[float] = []
    loader = GuardedLoader(str(path), batch_size=10, num_workers=1, batches_ahead=1,
                           pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), _boom(raised_at)],
                                      "label": [IntDecoder(), ToTensor()]})
    result: dict = {}

    def consume():
        try:
            for _ in loader:
                pass
            result["error"] = None
        except BaseException as e:  # noqa: BLE001
            result["error"], result["t"] = e, time.time()

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    t.join(timeout=120)  # FFCV alone would block here forever
    assert not t.is_alive(), "the consumer hangs after a pipeline error"
    err = result["error"]
    assert isinstance(err, PipelineError) and isinstance(err.__cause__, ValueError)
    assert "decoder exploded on batch 3" in str(err)
    assert result["t"] - raised_at[0] < 5.0  # surfaces within seconds


def _thread_probe(seen: list):
    """Records (in the main thread?, torch's thread count) per batch."""
    def probe(images):
        seen.append((threading.current_thread() is threading.main_thread(), torch.get_num_threads()))
        return images
    return _python_op(probe)


def test_loader_leaves_the_training_thread_count_and_copies_single_threaded(id_beton):
    """FFCV sets torch's threads to the loader's in the consumer (build, every epoch) and gives its
    own pipeline thread as many: a second OpenMP team spinning beside the training step's (11% of
    the step on 2 cores). The consumer keeps its count; the pipeline thread runs torch on one."""
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.transforms import ToTensor

    from data_pipeline.loaders import GuardedLoader, build_loader

    path, _ = id_beton
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # neither FFCV's import-time 1 nor the loaders' 2 below
        seen: list = []
        loader = GuardedLoader(str(path), batch_size=20, num_workers=2,
                               pipelines={"image": [SimpleRGBImageDecoder(), ToTensor(), _thread_probe(seen)],
                                          "label": [IntDecoder(), ToTensor()]})
        assert torch.get_num_threads() == 3
        for _ in range(2):
            assert sum(1 for _ in loader) == N // 20
            assert torch.get_num_threads() == 3
        assert seen == [(False, 1)] * (2 * N // 20)  # every batch, in FFCV's thread, one torch thread
        for _ in build_loader(str(path), "weak", batch_size=20, num_threads=2):
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_importing_ffcv_through_data_pipeline_keeps_torch_threads(id_beton):
    """ffcv's import runs Compiler.set_num_threads(1), which also made torch single-threaded."""
    path, _ = id_beton
    code = ("import torch; torch.set_num_threads(2)\n"
            "from data_pipeline.write import check_structure; check_structure(%r)\n"
            "import data_pipeline.loaders\n"
            "import ffcv.pipeline.compiler  # already imported: a no-op\n"
            "print(torch.get_num_threads())" % str(path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"


def test_threads_follow_ray_cpu_allocation(ray_local):
    import ray

    from data_pipeline.loaders import default_num_threads, loader_threads

    remote_default = ray.remote(default_num_threads)
    remote_capped = ray.remote(loader_threads)
    assert ray.get(remote_default.options(num_cpus=1).remote()) == 1
    assert ray.get(remote_default.options(num_cpus=2).remote()) == 2
    assert ray.get(remote_capped.options(num_cpus=1).remote(None)) == 1
    import numba
    assert loader_threads(10_000) == numba.config.NUMBA_NUM_THREADS  # capped instead of crashing FFCV


def test_empty_shard_is_an_error_not_a_silent_noop(id_beton):
    from data_pipeline.loaders import build_loader

    path, _ = id_beton
    with pytest.raises(ValueError, match="fewer than batch_size"):
        build_loader(str(path), "eval", batch_size=N + 1, train=True, num_threads=1)


def test_stratified_subset_keeps_each_class_share_and_is_seeded():
    from data_pipeline.write import stratified_subset

    labels = np.repeat(np.arange(10), [100, 100, 100, 100, 100, 50, 50, 50, 20, 3])
    sub = stratified_subset(labels, 0.1, seed=0)
    counts = np.bincount(labels[sub], minlength=10)
    assert counts.tolist() == [10, 10, 10, 10, 10, 5, 5, 5, 2, 1]  # every class, at least one image
    assert np.array_equal(sub, np.sort(sub)) and len(set(sub.tolist())) == len(sub)
    assert np.array_equal(sub, stratified_subset(labels, 0.1, seed=0))
    assert not np.array_equal(sub, stratified_subset(labels, 0.1, seed=1))
    assert len(stratified_subset(labels, 1.0, seed=3)) == len(labels)


def test_loader_reads_only_the_given_indices_with_their_labels(id_beton):
    from data_pipeline.loaders import build_loader
    from data_pipeline.write import read_beton_labels

    path, _ = id_beton
    assert read_beton_labels(path).tolist() == list(range(N))
    keep = [3, 7, 8, 20, 41, 59]
    loader = build_loader(str(path), "weak", batch_size=4, train=True, drop_last=False, num_threads=1, indices=keep)
    batches = list(loader)
    seen = sorted(int(v) for b in batches for v in b["label"])
    assert seen == keep and sorted(int(v) for b in batches for v in b["index"]) == keep
