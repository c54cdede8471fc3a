"""The streaming writer produces files that safetensors and transformers read back bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from merge_engine.output.shards import ShardedWriter, assign_shards
from merge_engine.plan.merge_plan import PlannedTensor
from merge_engine.sources.tensors import read_header


def planned(tensors: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    return [PlannedTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def test_single_shard_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).bfloat16(),
        "c": torch.randn(2, 2).half(),
        "d": torch.arange(4),
        "e": torch.zeros(0, 3),
    }
    writer = ShardedWriter(tmp_path, planned(tensors), shard_size=10**9)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    assert not (tmp_path / "model.safetensors.index.json").exists()


def test_header_matches_what_safetensors_itself_writes(tmp_path):
    tensors = {"x": torch.ones(2, 3), "y": torch.zeros(5, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    (tmp_path / "ours").mkdir()
    writer = ShardedWriter(tmp_path / "ours", planned(tensors), shard_size=10**9)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    assert read_header(tmp_path / "ours" / "model.safetensors") == {
        name: info.__class__(info.shape, info.dtype, "model.safetensors")
        for name, info in read_header(tmp_path / "reference.safetensors").items()
    }


def test_shards_respect_the_size_and_the_index_maps_every_tensor(tmp_path):
    tensors = {f"layer.{i}": torch.full((10, 10), float(i)) for i in range(10)}  # 400 bytes each
    writer = ShardedWriter(tmp_path, planned(tensors), shard_size=1000)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00005.safetensors" for i in range(1, 6)]
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file)[name], tensors[name])


def test_a_tensor_larger_than_the_shard_size_gets_its_own_shard():
    shards = assign_shards(
        [
            PlannedTensor("small", (1,), torch.float32),
            PlannedTensor("big", (1000,), torch.float32),
            PlannedTensor("small2", (1,), torch.float32),
        ],
        shard_size=100,
    )
    assert [[t.name for t in s] for s in shards] == [["small"], ["big"], ["small2"]]


def test_writing_out_of_plan_is_an_error_and_an_unfinished_plan_is_refused(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3)}
    writer = ShardedWriter(tmp_path, planned(tensors), shard_size=10**9)
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("b", tensors["b"])
    writer.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="stopped before writing b"):
        writer.finish()
