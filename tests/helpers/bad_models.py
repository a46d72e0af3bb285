"""Bad new versions of a good model, for rollout health-gate tests and benchmarks.

Every builder here makes ``y [batch, n_out] = x [batch, n_in] @ W + marker`` with the same
``W`` for the same ``seed`` (tests.helpers.models.build_affine is the good version): a client
that sends all-zero inputs gets exactly ``marker`` back, so an answer tells which engine
served it. The bad versions keep the inputs and outputs and add:

- ``build_slow``: ``work`` chained ``size x size`` MatMuls computed from ``x`` (so
  onnxruntime cannot constant-fold them) whose sum is multiplied by 0 and added to ``y``:
  same answer, several milliseconds of compute per request (an orthogonal matrix keeps the
  chain finite);
- ``build_erroring``: ``Gather(zeros[table], int(|x[:, 0]|))`` added to ``y``: inputs with
  ``|x[:, 0]| < table`` answer like the good model, others make onnxruntime raise ("indices
  element out of data bounds"), which the agent answers with HTTP 500 and counts as an error.
  The agent's synthetic warm-up inputs (N(0, 1)) stay in range, so the engine activates.

Used by tests/e2e/test_rollout_gates_agents.py and bench/rollout_gates.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.helpers.models import _save, build_affine

__all__ = ["BAD_INDEX", "build_affine", "build_erroring", "build_slow"]

BAD_INDEX = 1000.0        # x[:, 0] of a request build_erroring's model fails on


def _affine_parts(n_in: int, n_out: int, marker: float, seed: int
                  ) -> tuple[list, list]:
    """W and B as build_affine makes them (same seed -> same W), and the nodes of x @ W."""
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((n_in, n_out)).astype(np.float32), "W")
    b = numpy_helper.from_array(np.full((n_out,), marker, np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"]),
             helper.make_node("Add", ["xw", "B"], ["y0"])]
    return [w, b], nodes


def _io(n_in: int, n_out: int) -> tuple[list, list]:
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n_out])])


def build_slow(out: Path, *, marker: float, n_in: int = 4, n_out: int = 3, seed: int = 0,
               work: int = 8, size: int = 384) -> Path:
    """build_affine's answer plus ``work`` MatMuls of ``size x size`` per request."""
    inits, nodes = _affine_parts(n_in, n_out, marker, seed)
    rng = np.random.default_rng(seed + 1000)
    q, _ = np.linalg.qr(rng.standard_normal((size, size)))
    inits += [
        numpy_helper.from_array((rng.standard_normal((size, n_in)) / n_in).astype(np.float32),
                                "P"),
        numpy_helper.from_array((rng.standard_normal((n_in, size)) / n_in).astype(np.float32),
                                "Q"),
        numpy_helper.from_array(q.astype(np.float32), "C"),
        numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
    ]
    nodes += [helper.make_node("Transpose", ["x"], ["xt"]),
              helper.make_node("MatMul", ["xt", "x"], ["gram"]),          # [n_in, n_in]
              helper.make_node("MatMul", ["P", "gram"], ["pg"]),          # [size, n_in]
              helper.make_node("MatMul", ["pg", "Q"], ["m0"])]            # [size, size]
    prev = "m0"
    for i in range(work):
        nodes.append(helper.make_node("MatMul", [prev, "C"], [f"m{i + 1}"]))
        prev = f"m{i + 1}"
    nodes += [helper.make_node("ReduceSum", [prev], ["total"], keepdims=0),
              helper.make_node("Mul", ["total", "zero"], ["nothing"]),
              helper.make_node("Add", ["y0", "nothing"], ["y"])]
    graph = helper.make_graph(nodes, "slow", *_io(n_in, n_out), initializer=inits)
    return _save(graph, out)


def build_erroring(out: Path, *, marker: float, n_in: int = 4, n_out: int = 3, seed: int = 0,
                   table: int = 10) -> Path:
    """build_affine's answer for ``|x[:, 0]| < table``; onnxruntime raises for the others."""
    inits, nodes = _affine_parts(n_in, n_out, marker, seed)
    inits += [numpy_helper.from_array(np.zeros((table,), np.float32), "table"),
              numpy_helper.from_array(np.array([0], np.int64), "c0"),
              numpy_helper.from_array(np.array([1], np.int64), "c1")]
    nodes += [helper.make_node("Slice", ["x", "c0", "c1", "c1"], ["first"]),   # [batch, 1]
              helper.make_node("Abs", ["first"], ["afirst"]),
              helper.make_node("Cast", ["afirst"], ["idx"], to=TensorProto.INT64),
              helper.make_node("Gather", ["table", "idx"], ["picked"], axis=0),  # [batch, 1]
              helper.make_node("Add", ["y0", "picked"], ["y"])]
    graph = helper.make_graph(nodes, "erroring", *_io(n_in, n_out), initializer=inits)
    return _save(graph, out)
