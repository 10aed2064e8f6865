"""Process-group helpers: every validation image on exactly one rank, gathered back in order."""

from __future__ import annotations

import inspect
import os

import pytest
import torch
import torch.multiprocessing as mp

from geopose_mlops.data.dataset import EpochSampler
from geopose_mlops.tracking.server import free_port
from geopose_mlops.train import distributed


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    context = distributed.init_distributed("cpu")
    try:
        shard = distributed.shard_indices(7, context)
        gathered = distributed.gather_to_main([f"img{i}" for i in shard], context)
        sums = distributed.reduce_sum([len(shard), float(sum(shard))], context)
        decision = distributed.broadcast_from_main({"run_id": "abc"} if context.is_main else None, context)
        sampler = distributed.ShardedEpochSampler(10, 3, context, batch_size=2)
        sampler.set_epoch(1)
        torch.save(
            {"shard": shard, "gathered": gathered, "sums": sums, "decision": decision, "train": list(sampler)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        distributed.cleanup_distributed(context)


@pytest.mark.slow
def test_two_gloo_ranks_split_and_gather_validation_exactly_once(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["shard"] == [0, 2, 4, 6] and rank1["shard"] == [1, 3, 5]
    assert rank0["gathered"] == [f"img{i}" for i in range(7)]  # original order, nothing doubled
    assert rank1["gathered"] is None
    assert rank0["sums"] == rank1["sums"] == [7.0, 21.0]
    assert rank0["decision"] == rank1["decision"] == {"run_id": "abc"}
    # Each rank takes whole micro-batches of the order one process sees (the same augmentation seeds):
    # blocks of 2 ranks x 2 images, and an equal share of the short last block.
    single = EpochSampler(10, seed=3)
    single.set_epoch(1)
    order = list(single)
    assert rank0["train"] == order[0:2] + order[4:6] + order[8:9]
    assert rank1["train"] == order[2:4] + order[6:8] + order[9:10]
    one_process = distributed.ShardedEpochSampler(10, 3, distributed.DistributedContext(), batch_size=2)
    one_process.set_epoch(1)
    assert list(one_process) == order


def test_single_process_context_is_identity():
    context = distributed.init_distributed("cpu")
    assert not context.enabled and context.is_main
    assert distributed.shard_indices(3, context) == [0, 1, 2]
    assert distributed.gather_to_main(["a", "b"], context) == ["a", "b"]
    assert distributed.reduce_sum([1, 2.5], context) == [1.0, 2.5]
    model = torch.nn.Linear(2, 2)
    assert distributed.unwrap_model(distributed.wrap_model(model, context)) is model


def _protocol_methods() -> dict[str, list[str]]:
    from geopose_mlops.train.tracker import Tracker

    methods = {name: getattr(Tracker, name) for name in dir(Tracker) if not name.startswith("_")}
    return {name: list(inspect.signature(method).parameters) for name, method in methods.items()}


def test_the_tracker_protocol_names_methods_the_cv_tracker_and_the_null_tracker_both_have():
    """A misspelt or missing tracker method fails here, not silently on the ranks other than 0."""
    from geopose_mlops.tracking.runs import CvTracker
    from geopose_mlops.train.tracker import NullTracker, Tracker

    expected = _protocol_methods()
    assert "log_epochs" in expected and "download_checkpoint" in expected
    for implementation in (CvTracker, NullTracker):
        have = {name: list(inspect.signature(getattr(implementation, name)).parameters) for name in expected
                if hasattr(implementation, name)}  # fmt: skip
        assert have == expected, implementation
    assert isinstance(NullTracker(), Tracker) and isinstance(CvTracker(), Tracker)


def test_ranks_other_than_0_get_a_null_tracker_that_stores_nothing(tmp_path):
    from geopose_mlops.train.tracker import NullTracker

    real = object()
    assert distributed.main_rank_tracker(real, distributed.DistributedContext()) is real
    other = distributed.main_rank_tracker(real, distributed.DistributedContext(rank=1, world_size=2))
    assert isinstance(other, NullTracker)
    assert other.log_epochs("run", [(0, {"val_score": 1.0})]) is None and other.end_run("run", "FAILED") is None
    assert (other.fold_runs("cv"), other.logged_epochs("run")) == ({}, [])
    assert other.download_checkpoint("run", "last.pt", tmp_path) is None
    with pytest.raises(RuntimeError, match="only rank 0"):
        other.download_artifact("run", "config.json")
    assert list(tmp_path.iterdir()) == []
