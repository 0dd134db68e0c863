"""Pipeline parallelism: layer ranges, the rank grid, and two stages (and 2 × 2 with TP) vs one."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.engine.pipeline import RankLayout, layer_ranges
from tests.engine.test_tp import assert_matches_reference, reference, run_spmd


@pytest.mark.parametrize("layers, pp, expected", [
    (2, 2, [(0, 1), (1, 2)]), (30, 4, [(0, 8), (8, 16), (16, 23), (23, 30)]), (5, 1, [(0, 5)]),
])
def test_layer_ranges_are_contiguous_and_balanced(layers: int, pp: int, expected: list) -> None:
    assert layer_ranges(layers, pp) == expected


@pytest.mark.parametrize("pp", [0, 3])
def test_more_stages_than_layers_is_a_value_error(pp: int) -> None:
    with pytest.raises(ValueError, match=r"^pp: "):
        layer_ranges(2, pp)


def test_rank_grid_keeps_a_stage_tp_ranks_adjacent() -> None:
    grid = [RankLayout(tp_size=2, pp_size=3, rank=r) for r in range(6)]
    assert [(g.pp_rank, g.tp_rank) for g in grid] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert grid[3].prev_rank == 1 and grid[3].next_rank == 5
    assert {g.sampler_rank for g in grid} == {4}
    assert grid[0].is_first_stage and grid[5].is_last_stage and not grid[2].is_last_stage


def test_two_stages_match_one(tiny_llama_dir: Path, tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    models = [tiny_llama_dir, tiny_qwen2_dir]
    for model_dir, results in zip(models, run_spmd(models, tp=1, pp=2, tmp_path=tmp_path)):
        assert [r["num_layers"] for r in results] == [1, 1]  # each stage caches only its own layer
        assert_matches_reference(results, reference(model_dir))


def test_tp2_times_pp2_matches_one_rank(tiny_qwen2_dir: Path, tmp_path: Path) -> None:
    (results,) = run_spmd([tiny_qwen2_dir], tp=2, pp=2, tmp_path=tmp_path)
    assert [(r["num_layers"], r["num_kv_heads"]) for r in results] == [(1, 1)] * 4
    assert_matches_reference(results, reference(tiny_qwen2_dir))
