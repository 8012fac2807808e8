"""docs/scaling.md's figures are the ones benchmarks/scaling_cost.py computes from its stated assumptions
(nobody edits them by hand), and the cost model behaves like one: sharding cuts the optimizer state per GPU,
a larger per-rank batch costs more time per step."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("scaling_cost", REPO / "benchmarks" / "scaling_cost.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("scaling_cost", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_docs_block_is_what_the_script_renders(tmp_path):
    sc = _script()
    page = tmp_path / "scaling.md"
    page.write_text((REPO / "docs" / "scaling.md").read_text())
    before = page.read_text()
    result = sc.run(sc.Assumptions())
    sc.update_docs(page, sc.render(result, ".venv/bin/python benchmarks/scaling_cost.py"))
    assert page.read_text() == before, (
        "docs/scaling.md is stale: run .venv/bin/python benchmarks/scaling_cost.py"
    )


def test_cost_model_moves_the_right_way():
    sc = _script()
    a = sc.Assumptions()
    m, r = sc.MODELS["qwen2.5-vl-7b"], sc.RECIPES["qwen2.5-vl-7b"]
    assert 8.0e9 < m.params < 8.6e9  # Qwen2.5-VL-7B is 8.29B parameters
    assert 3.6e9 < sc.MODELS["qwen2.5-vl-3b"].params < 3.9e9  # and the 3B one 3.75B
    one_node, two_nodes = sc.memory_per_gpu(m, r, a, 8), sc.memory_per_gpu(m, r, a, 16)
    assert two_nodes["adamw_fp32"] == one_node["adamw_fp32"] / 2
    assert one_node["ddp_total_unsharded"] > a.gpu_memory_bytes / 1e9 > one_node["total"]
    small = sc.step_cost(m, sc.replace(r, problems_per_rank=4), a, 8, 1)
    assert small["update_s"] < sc.step_cost(m, r, a, 8, 1)["update_s"]
    assert small["rollout_decode_s"] == small["of_which_tail_floor_s"]  # the long tail bounds it
