"""An exported graph rewritten so that ONNX Runtime's fusions find it.

torch's dynamo exporter writes an exact GELU as `x * (0.5 * (1 + erf(x / √2)))`. ONNX Runtime fuses a GELU (and the
bias before it, `BiasGelu`) only in the orders `0.5 * x * (…)` or `(x * (…)) * 0.5`, so the exported towers ran the
five element-wise steps over every MLP activation: 4-7% of a ViT-B-32 image tower's time. Multiplying by 0.5 last
instead of first is exact in floating point, so the rewritten graph computes the same numbers up to the fused
kernel's own erf.

It writes each `nn.MultiheadAttention` of open_clip's towers as some thirty nodes: a projection to queries, keys and
values, then reshapes, transposes, squeezes and gathers into heads, the scaled product, the (causal) mask, softmax,
and the way back to one row per token. Neither ONNX Runtime's optimiser nor its `transformers` optimiser matches that,
and on a short text each node's fixed cost adds up. `fuse_attention` rewrites the whole block as ONNX Runtime's
`Attention` (com.microsoft) followed by the output projection, on the CPU only (another execution provider may lack
the operator), and `kept_graph` keeps the rewrite only where the rewritten graph answers as the export does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# the bar an export meets against torch (`export.py`), and a rewritten graph against the export
MIN_COSINE = 0.99999
MAX_ABS = 1e-4
_SHAPE_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze")


def kept_graph(source: Path, *, attention: bool) -> str | bytes:
    """The graph at `source` with its GELUs in the order ONNX Runtime fuses and, with `attention`, its attention
    blocks as ONNX Runtime's operator, serialised; its path when it has nothing to rewrite or cannot be read as ONNX
    (ONNX Runtime then loads it, or says what is wrong with it). Attention rewritten is kept only where the graph
    then answers probe inputs as the export does, to the bar the export meets against torch."""
    import onnx

    try:
        model = onnx.load(str(source))
    except Exception:
        return str(source)
    gelus = fuse_gelu(model.graph)
    if attention and fuse_attention(model):
        feed = _probe(model.graph.input)
        fused = model.SerializeToString()
        del model  # a tower's weights, held once more by each session below
        if _answers_as(source, fused, feed):
            return fused
        log.warning("attention rewritten in %s disagrees with the export; kept as exported", source)
        model = onnx.load(str(source))
        gelus = fuse_gelu(model.graph)
    return model.SerializeToString() if gelus else str(source)


def fuse_gelu(graph: Any) -> int:
    """Reorder each `x * (0.5 * (1 + erf(x / √2)))` in `graph` (an onnx GraphProto) to `(x * (1 + erf(x / √2))) *
    0.5`, in place; returns how many. Only the exact pattern is touched: each step's output used by the next alone."""
    links = _Links(graph)
    producer, sole_user = links.producer, links.sole_user
    scalar = _scalars(graph)

    def other(node: Any, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(rest) == 1 else None

    done = 0
    for erf in [node for node in graph.node if node.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not _near(scalar.get(div.input[1]), math.sqrt(2)):
            continue
        x = div.input[0]
        add = sole_user(erf.output[0], "Add")
        if add is None or scalar.get(other(add, erf.output[0]) or "") != 1.0:
            continue
        scale = sole_user(add.output[0], "Mul")
        half = other(scale, add.output[0]) if scale is not None else None
        if scale is None or half is None or scalar.get(half) != 0.5:
            continue
        outer = sole_user(scale.output[0], "Mul")
        if outer is None or sorted(outer.input) != sorted([x, scale.output[0]]):
            continue
        scale.input[:] = [x, add.output[0]]  # x * (1 + erf)
        outer.input[:] = [scale.output[0], half]  # … * 0.5
        done += 1
    return done


def _scalars(graph: Any) -> dict[str, float]:
    """The graph's one-element constants (initializers and Constant nodes), by name."""
    from onnx import numpy_helper

    found = {}
    for name, tensor in _constants(graph).items():
        if math.prod(tensor.dims) == 1 and not tensor.external_data:
            found[name] = float(numpy_helper.to_array(tensor).reshape(-1)[0])
    return found


def _constants(graph: Any) -> dict[str, Any]:
    """The graph's constant tensors (initializers and Constant nodes' values), by name."""
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                tensors[node.output[0]] = value
    return tensors


class _Links:
    """Which node makes each value of a graph, and which nodes read it."""

    def __init__(self, graph: Any):
        self.producer = {out: node for node in graph.node for out in node.output}
        self.users: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.users.setdefault(name, []).append(node)

    def made_by(self, name: str, op: str) -> Any:
        """The node making `name` when it is an `op`, else None."""
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op else None

    def sole_user(self, name: str, op: str) -> Any:
        """The one node reading `name` when there is one and it is an `op`, else None."""
        found = self.users.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op else None


def _near(value: float | None, target: float) -> bool:
    return value is not None and math.isclose(value, target, rel_tol=1e-6)


def fuse_attention(model: Any) -> int:
    """Rewrite each attention block of `model` (an onnx ModelProto) as torch's exporter writes `nn.MultiheadAttention`
    into ONNX Runtime's `Attention` and a MatMul by the output projection (and its bias), in place; returns how many.

    A block is rewritten only when all of it is found: the residual stream's rows (batch, token, width) transposed
    to (token, batch, width); one projection to 3 × width (with or without a bias) gathered into queries, keys and
    values in that order; queries and keys each scaled by a constant; either no mask or a causal one sliced from a
    constant (-inf above the diagonal, 0 elsewhere); softmax over keys; heads read off a reshape to (batch, heads,
    token, width / heads); and the way back through `Gemm` (weights transposed) to (batch, token, width). The
    nodes only the block used are dropped."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    tensors = _constants(graph)
    links = _Links(graph)
    producer, made_by, sole_user = links.producer, links.made_by, links.sole_user

    def const(name: str) -> np.ndarray | None:
        t = tensors.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def scalar(name: str) -> float | None:
        a = const(name)
        return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None

    def attr(node: Any, name: str, default: Any = None) -> Any:
        a = next((a for a in node.attribute if a.name == name), None)
        return default if a is None else helper.get_attribute_value(a)

    def scaled(name: str) -> tuple[str, float] | None:
        mul = made_by(name, "Mul")
        if mul is None:
            return None
        for i in (0, 1):
            s = scalar(mul.input[1 - i])
            if s is not None:
                return mul.input[i], s
        return None

    def back_to(name: str, op: str) -> tuple[Any, list[Any]]:
        """Walk back along the data input of shape-only ops to the first `op` node."""
        path = []
        node = producer.get(name)
        while node is not None and node.op_type in _SHAPE_OPS:
            path.append(node)
            node = producer.get(node.input[0])
        return (node if node is not None and node.op_type == op else None), path

    def heads_of(path: list[Any], width: int) -> int | None:
        for node in path:
            if node.op_type != "Reshape":
                continue
            fixed, shape = const(node.input[1]), made_by(node.input[1], "Concat")
            h: float | None
            d: float | None
            if fixed is not None and fixed.shape == (4,):  # (batch, heads, tokens, width / heads)
                h, d = float(fixed[1]), float(fixed[3])
            elif shape is not None and len(shape.input) == 4:
                h, d = scalar(shape.input[1]), scalar(shape.input[3])
            else:
                continue
            if h and d and int(h) * int(d) == width:
                return int(h)
        return None

    def causal(mask: str) -> bool:
        """Whether `mask` is sliced from a constant causal mask (-inf, or below -1e4, above the diagonal; 0 elsewhere)."""
        name = mask
        while name in producer and producer[name].op_type in ("Unsqueeze", "Slice"):
            name = producer[name].input[0]
        m = const(name)
        if m is None or m.ndim != 2 or m.shape[0] != m.shape[1]:
            return False
        upper = np.triu(np.ones(m.shape, bool), 1)
        return bool(np.all(m[~upper] == 0) and np.all(m[upper] <= -1e4))

    done = 0
    new_inits = []
    replaced: set[str] = set()  # output projections' weights, now transposed
    new_nodes: dict[int, list[Any]] = {}  # position -> nodes to insert after it
    position = {id(n): i for i, n in enumerate(graph.node)}
    for softmax in [n for n in graph.node if n.op_type == "Softmax" and attr(n, "axis", -1) in (-1, 3)]:
        x, mask = softmax.input[0], None
        add = made_by(x, "Add")
        if add is not None:
            first = [i for i in add.input if made_by(i, "MatMul") is not None]
            if len(first) != 1:
                continue
            x = first[0]
            mask = next(i for i in add.input if i != x)
        scores = made_by(x, "MatMul")
        if scores is None:
            continue
        q, k = scaled(scores.input[0]), scaled(scores.input[1])
        if q is None or k is None:
            continue
        out = sole_user(softmax.output[0], "MatMul")
        if out is None or out.input[0] != softmax.output[0]:
            continue
        v = out.input[1]
        gathers = []
        for name in (q[0], k[0], v):
            g, _ = back_to(name, "Gather")
            gathers.append(g)
        if any(g is None for g in gathers) or len({g.input[0] for g in gathers}) != 1:
            continue
        if [scalar(g.input[1]) for g in gathers] != [0.0, 1.0, 2.0] or any(attr(g, "axis", 0) != 0 for g in gathers):
            continue
        proj, _ = back_to(gathers[0].input[0], "Add")
        bias = None
        if proj is not None:
            mm = [made_by(i, "MatMul") for i in proj.input]
            if sum(m is not None for m in mm) != 1:
                continue
            matmul = next(m for m in mm if m is not None)
            bias = next(i for i in proj.input if i != matmul.output[0])
        else:
            matmul, _ = back_to(gathers[0].input[0], "MatMul")
            if matmul is None:
                continue
        w_in = const(matmul.input[1])
        into = made_by(matmul.input[0], "Transpose")
        if w_in is None or w_in.ndim != 2 or w_in.shape[1] != 3 * w_in.shape[0] or into is None:
            continue
        if list(attr(into, "perm")) != [1, 0, 2] or (bias is not None and const(bias) is None):
            continue
        width = w_in.shape[0]
        _, qpath = back_to(q[0], "Gather")
        heads = heads_of(qpath, width)
        if heads is None:
            continue
        if mask is not None and not causal(mask):
            continue
        # forward: Transpose [2,0,1,3] -> Reshape -> Gemm(transB) -> Reshape -> Transpose [1,0,2]
        perm = sole_user(out.output[0], "Transpose")
        if perm is None or list(attr(perm, "perm")) != [2, 0, 1, 3]:
            continue
        flat = sole_user(perm.output[0], "Reshape")
        gemm = sole_user(flat.output[0], "Gemm") if flat is not None else None
        if gemm is None or attr(gemm, "transB", 0) != 1 or attr(gemm, "transA", 0) != 0:
            continue
        if attr(gemm, "alpha", 1.0) != 1.0 or attr(gemm, "beta", 1.0) != 1.0:
            continue
        w_out = const(gemm.input[1])
        b_out = const(gemm.input[2]) if len(gemm.input) > 2 and gemm.input[2] else None
        if w_out is None or w_out.shape != (width, width) or (len(gemm.input) > 2 and gemm.input[2] and b_out is None):
            continue
        unflat = sole_user(gemm.output[0], "Reshape")
        back = sole_user(unflat.output[0], "Transpose") if unflat is not None else None
        if back is None or list(attr(back, "perm")) != [1, 0, 2]:
            continue
        tag = f"clipdex_attention_{done}"
        if bias is None:
            bias = f"{tag}_b_in"
            new_inits.append(numpy_helper.from_array(np.zeros(3 * width, w_in.dtype), bias))
        new_inits.append(numpy_helper.from_array(np.ascontiguousarray(w_out.T), f"{tag}_w_out"))
        replaced.add(gemm.input[1])
        nodes = [
            helper.make_node(
                "Attention",
                [into.input[0], matmul.input[1], bias],
                [f"{tag}_heads"],
                name=tag,
                domain="com.microsoft",
                num_heads=heads,
                unidirectional=int(mask is not None),
                scale=q[1] * k[1],
            ),
        ]
        if b_out is not None:
            new_inits.append(numpy_helper.from_array(b_out, f"{tag}_b_out"))
            nodes += [
                helper.make_node("MatMul", [f"{tag}_heads", f"{tag}_w_out"], [f"{tag}_proj"], name=f"{tag}_out"),
                helper.make_node("Add", [f"{tag}_proj", f"{tag}_b_out"], [back.output[0]], name=f"{tag}_bias"),
            ]
        else:
            nodes.append(
                helper.make_node("MatMul", [f"{tag}_heads", f"{tag}_w_out"], [back.output[0]], name=f"{tag}_out")
            )
        back.output[0] = f"{tag}_unused"
        new_nodes[position[id(back)]] = nodes
        done += 1
    if not done:
        return 0
    ordered = []
    for i, node in enumerate(graph.node):
        ordered.append(node)
        ordered += new_nodes.get(i, [])
    del graph.node[:]
    graph.node.extend(_live(ordered, {o.name for o in graph.output}))
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used or t.name not in replaced]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *new_inits])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return done


def _live(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """`nodes` (in order) less those whose outputs nothing leading to `outputs` reads."""
    needed = set(outputs)
    keep = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output if o):
            keep.append(node)
            needed.update(i for i in node.input if i)
    return keep[::-1]


def _probe(inputs: Any) -> dict[str, np.ndarray]:
    """Inputs for a graph's `inputs`: two rows, 9 where a length is dynamic; token ids within any vocabulary, the
    largest (an end token) last."""
    import onnx

    rng = np.random.default_rng(0)
    feed = {}
    for given in inputs:
        tensor = given.type.tensor_type
        dims = [2, *[d.dim_value or 9 for d in tensor.shape.dim][1:]]
        if tensor.elem_type == onnx.TensorProto.FLOAT:
            feed[given.name] = rng.standard_normal(dims).astype(np.float32)
        else:
            ids = rng.integers(1, 1000, dims)
            ids[:, -1] = 1000
            feed[given.name] = ids.astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
    return feed


def _answers_as(source: Path, fused: bytes, feed: dict[str, np.ndarray]) -> bool:
    """Whether the rewritten graph's first output on `feed` is the export's, within `MIN_COSINE` and `MAX_ABS`, each
    graph run as written."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    try:
        expect = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        got = ort.InferenceSession(fused, options, providers=["CPUExecutionProvider"]).run(None, feed)[0]
    except Exception:
        return False
    expect, got = expect.reshape(len(expect), -1), got.reshape(len(got), -1)
    norms = np.linalg.norm(expect, axis=1) * np.linalg.norm(got, axis=1)
    cosine = np.sum(expect * got, axis=1) / np.maximum(norms, 1e-12)
    return bool(np.min(cosine) >= MIN_COSINE and np.max(np.abs(expect - got)) <= MAX_ABS)
