"""The CLIP ViT-B/16 image tower shipped as an INT8 ONNX graph: read it, dequantise it, run it.

:func:`convert` (what ``headlab fetch clip-vit-b16`` runs) dequantises every ``MatMulInteger``
weight, ``W = (q - zero_point) * scale`` per output column, maps each node to its transformers
module by name (cross-checked by its bias) and requires the result to fill a
``CLIPVisionModelWithProjection`` exactly. :func:`run_onnx` runs the package's own INT8 runtime, or
with ``reference="float"`` the graph with its activation quantisation taken out
(:func:`float_activation_graph`), to measure how close the converted model is.

See docs/models.md (clip-vit-b16).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from probe.checkpoints import force_eager
from probe.errors import HeadlabError, MissingPackageError

if TYPE_CHECKING:
    import torch
    from transformers import CLIPVisionModelWithProjection

VISION_EXTRA = "pip install 'headlab[vision]'  (or: pip install 'onnx>=1.17,<2' 'onnxruntime>=1.20,<2')"

# CLIP ViT-B/16's image tower. The graph carries no config; conversion checks these against it.
CLIP_VIT_B16_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
}
QUICK_GELU_ALPHA = 1.702
_MATMUL_NODE = re.compile(r"^/(?P<module>.+)/MatMul_quant$")


def require(module: str) -> Any:
    """Import ``onnx`` or ``onnxruntime``, or say how to install it."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"the {module} package (needed for the ONNX CLIP model)", VISION_EXTRA)
    return importlib.import_module(module)


def _load_graph(onnx_file: Path) -> Any:
    onnx = require("onnx")
    if not Path(onnx_file).is_file():
        raise HeadlabError(f"no such ONNX file: {onnx_file}; run: headlab fetch clip-vit-b16")
    return onnx.load(str(onnx_file))


def _constants(graph: Any) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def read_state_dict(onnx_file: Path) -> dict[str, np.ndarray]:
    """Every weight of the graph under its transformers name, dequantised to float32.

    Raises :class:`~probe.errors.HeadlabError` when a quantised matrix cannot be tied to a module,
    when its bias belongs to another module, or when two nodes claim the same module.
    """
    return _read(onnx_file)[0]


def _read(onnx_file: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """(state dict, keys of the matrices that were int8 in the graph)."""
    from onnx import numpy_helper

    graph = _load_graph(onnx_file).graph
    inits = {t.name: t for t in graph.initializer}
    state: dict[str, np.ndarray] = {}
    quantised: list[str] = []
    for name, tensor in inits.items():
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and name.startswith(("vision_model.", "visual_projection.")):
            state[name] = array
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        match = _MATMUL_NODE.match(node.name)
        if match is None:
            raise HeadlabError(
                f"cannot tell which module the quantised node {node.name!r} belongs to; "
                "this ONNX file is not the expected CLIP export (reinstall the package: headlab fetch clip-vit-b16)"
            )
        module = match.group("module").replace("/", ".")
        weight = _dequantised_weight(node, inits, module)[1].T  # [in, out] -> torch's [out, in]
        key = f"{module}.weight"
        if key in state:
            raise HeadlabError(f"two quantised nodes map to {key}; unexpected ONNX export")
        state[key] = np.ascontiguousarray(weight, dtype=np.float32)
        quantised.append(key)
        bias = _bias_of(node, consumers)
        if bias is not None and bias != f"{module}.bias":
            raise HeadlabError(
                f"node {node.name!r} is followed by bias {bias!r}, not {module}.bias; "
                "the graph's names do not match its structure"
            )
    return state, quantised


def _dequantised_weight(node: Any, inits: dict[str, Any], module: str) -> tuple[str, np.ndarray]:
    """(scale initialiser name, ``W = (q - zero_point) * scale`` as float32 ``[in, out]``) of a MatMulInteger."""
    from onnx import numpy_helper

    weight_q = node.input[1]
    if not weight_q.endswith("_quantized") or weight_q not in inits or node.input[3] not in inits:
        raise HeadlabError(f"node {node.name!r} has no quantised weight input; unexpected ONNX export")
    stem = weight_q.removesuffix("_quantized")
    if stem + "_scale" not in inits:
        raise HeadlabError(
            f"node {node.name!r}: no scale {stem + '_scale'!r} for its weight; unexpected ONNX export"
        )
    q = numpy_helper.to_array(inits[weight_q]).astype(np.float32)
    zero = numpy_helper.to_array(inits[node.input[3]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[stem + "_scale"]).astype(np.float32)
    if q.ndim != 2 or zero.shape not in ((q.shape[1],), ()) or scale.shape not in ((q.shape[1],), ()):
        raise HeadlabError(
            f"{module}: weight {q.shape}, zero point {zero.shape}, scale {scale.shape} are not "
            "per-output-column; unexpected ONNX export"
        )
    return stem + "_scale", np.ascontiguousarray((q - zero) * scale, dtype=np.float32)


def _bias_of(node: Any, consumers: dict[str, list[Any]]) -> str | None:
    """The name of the float bias added to ``node``'s dequantised output (Cast -> Mul -> Add)."""
    frontier = list(node.output)
    for _ in range(3):
        nxt: list[str] = []
        for value in frontier:
            for user in consumers.get(value, []):
                if user.op_type == "Add":
                    named = [i for i in user.input if i.endswith(".bias")]
                    return named[0] if named else None
                nxt.extend(user.output)
        frontier = nxt
    return None


def check_constants(onnx_file: Path, config: dict[str, Any] = CLIP_VIT_B16_CONFIG) -> None:
    """Check the graph's scalar constants against ``config``: attention scale, layer-norm eps, GELU."""
    graph = _load_graph(onnx_file).graph
    consts = _constants(graph)
    d_head = config["hidden_size"] // config["num_attention_heads"]
    problems: list[str] = []
    # The export splits the attention scale d_head**-0.5 evenly over queries and keys.
    scales = [
        float(consts[i])
        for n in graph.node
        if n.op_type == "Mul" and "/self_attn/Mul" in n.name
        for i in n.input
        if i in consts and consts[i].size == 1
    ]
    if not scales or not np.allclose(np.square(scales), d_head**-0.5, rtol=1e-5):
        problems.append(f"attention scale {sorted(set(scales))[:3]} is not (d_head={d_head})**-0.25 per side")
    eps = [
        float(consts[i])
        for n in graph.node
        if n.op_type == "Add" and re.search(r"(layer_norm\d|layrnorm|layernorm)/Add$", n.name)
        for i in n.input
        if i in consts
    ]
    if not eps or not np.allclose(eps, config["layer_norm_eps"]):
        problems.append(f"layer-norm eps {sorted(set(eps))[:3]} is not {config['layer_norm_eps']}")
    alpha = [
        float(consts[i])
        for n in graph.node
        if n.op_type == "Mul" and n.name.endswith("activation_fn/Mul")
        for i in n.input
        if i in consts
    ]
    if len(alpha) != config["num_hidden_layers"] or not np.allclose(alpha, QUICK_GELU_ALPHA):
        problems.append(
            f"activation constants {sorted(set(alpha))[:3]} are not quick-GELU's {QUICK_GELU_ALPHA}"
        )
    if problems:
        raise HeadlabError(
            f"{Path(onnx_file).name} does not match the CLIP ViT-B/16 config: {'; '.join(problems)}; "
            "reinstall the package (headlab fetch clip-vit-b16 --force)"
        )


def build_model(
    state: dict[str, np.ndarray], config: dict[str, Any] = CLIP_VIT_B16_CONFIG
) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` (eager attention) holding ``state``; every key checked.

    Fails when a parameter of the model is not in ``state``, a key of ``state`` has no parameter,
    or a shape differs: a partly filled model would run with random weights and nobody would notice.
    """
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(**config)
    with torch.device("meta"):
        skeleton = CLIPVisionModelWithProjection(cfg)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise HeadlabError(
            "the ONNX weights do not fill CLIPVisionModelWithProjection: "
            f"missing {missing[:4]}{' …' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' …' if len(unexpected) > 4 else ''}, "
            f"wrong shape {[(k, tuple(state[k].shape), expected[k]) for k in wrong[:3]]}; "
            "the installed transformers names CLIP's modules differently or the ONNX file is not CLIP ViT-B/16"
        )
    model = CLIPVisionModelWithProjection(cfg)
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}  # copies
    result = model.load_state_dict(tensors, strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise HeadlabError(f"loading the ONNX weights left {result}; report this")
    force_eager(model)
    return model.eval()


def convert(onnx_file: Path, out: Path) -> dict[str, Any]:
    """Convert the INT8 ONNX image tower into a float32 transformers checkpoint in ``out``.

    Writes ``config.json`` and ``model.safetensors`` (``CLIPVisionModelWithProjection``) and
    ``headlab-source.json`` (what was converted and how). Returns facts for the cache marker.
    """
    check_constants(onnx_file)
    state, quantised = _read(onnx_file)
    model = build_model(state)
    model.save_pretrained(out)
    info = {
        "onnx_file": Path(onnx_file).name,
        "architecture": "CLIPVisionModelWithProjection",
        "torch_dtype": "float32",
        "dequantisation": "(q - zero_point) * scale, per output channel",
        "n_tensors": len(state),
        "n_quantised_matrices": len(quantised),
    }
    (out / "headlab-source.json").write_text(json.dumps(info, indent=2))
    return info


# Ops that quantise activations (or run on quantised activations): none may stay in the float graph.
ACTIVATION_QUANT_OPS = frozenset(
    {
        "DynamicQuantizeLinear",
        "QuantizeLinear",
        "DequantizeLinear",
        "MatMulInteger",
        "ConvInteger",
        "QLinearMatMul",
        "QLinearConv",
        "QLinearAdd",
        "QLinearMul",
        "QLinearSoftmax",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
    }
)
REFERENCES = ("int8", "float")


def op_counts(model: Any) -> dict[str, int]:
    """``{op type: count}`` of an ``onnx.ModelProto``'s main graph, most frequent first."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def float_activation_graph(onnx_file: Path) -> Any:
    """The package's graph with its activation quantisation taken out (an ``onnx.ModelProto``).

    The INT8 graph computes every linear layer as ::

        x_q, x_scale, x_zero = DynamicQuantizeLinear(x)              # the activation, to uint8
        s = Mul(x_scale, w_scale)
        y = Mul(Cast(MatMulInteger(x_q, w_q, x_zero, w_zero)), s)     # = (x_q - x_zero)(w_q - w_zero) s

    Each such group becomes ``y = MatMul(x, W)`` with ``W = (w_q - w_zero) * w_scale``, the float32
    matrix :func:`read_state_dict` gives the converted model (same function, same numbers); the
    ``DynamicQuantizeLinear`` nodes left without consumers are dropped, and so are the int8
    initialisers. Every other node (layer norms, attention, biases, quick-GELU) is kept as it is.
    The result is built in memory at each call (a few seconds), never written anywhere.

    Raises :class:`~probe.errors.HeadlabError` when a ``MatMulInteger`` is not in that pattern or
    when an activation-quantisation op (:data:`ACTIVATION_QUANT_OPS`) would remain.
    """
    onnx = require("onnx")
    from onnx import helper, numpy_helper

    model = _load_graph(onnx_file)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for value in node.input:
            consumers.setdefault(value, []).append(node)

    def only_consumer(value: str, op_type: str, of: Any) -> Any:
        users = consumers.get(value, [])
        if len(users) != 1 or users[0].op_type != op_type:
            raise HeadlabError(
                f"{of.name!r}: expected its output to feed one {op_type}, found "
                f"{[u.op_type for u in users]}; not the dynamic-quantisation pattern this converter knows"
            )
        return users[0]

    replaced: dict[int, Any] = {}  # id(MatMulInteger) -> its float MatMul
    dropped: set[int] = set()
    new_inits: list[Any] = []
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        quantise = producer.get(node.input[0])
        if (
            quantise is None
            or quantise.op_type != "DynamicQuantizeLinear"
            or list(quantise.output[::2]) != [node.input[0], node.input[2]]
        ):
            raise HeadlabError(
                f"{node.name!r}: its input is not quantised by a DynamicQuantizeLinear; unexpected ONNX export"
            )
        cast = only_consumer(node.output[0], "Cast", node)
        rescale = only_consumer(cast.output[0], "Mul", cast)
        scales = [producer.get(v) for v in rescale.input if v != cast.output[0]]
        w_scale, weight = _dequantised_weight(node, inits, node.name)
        if (
            len(scales) != 1
            or scales[0] is None
            or scales[0].op_type != "Mul"
            or sorted(scales[0].input) != sorted([quantise.output[1], w_scale])
            or len(consumers.get(scales[0].output[0], [])) != 1
        ):
            raise HeadlabError(
                f"{node.name!r}: its output is not rescaled by (input scale * {w_scale}); unexpected ONNX export"
            )
        name = node.input[1].removesuffix("_quantized") + "_dequantized"
        new_inits.append(numpy_helper.from_array(weight, name))
        replaced[id(node)] = helper.make_node(
            "MatMul", [quantise.input[0], name], [rescale.output[0]], name=node.name.removesuffix("_quant")
        )
        dropped.update({id(cast), id(rescale), id(scales[0])})
    if not replaced:
        raise HeadlabError(
            f"{Path(onnx_file).name} has no MatMulInteger; it is not the dynamically quantised export"
        )

    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    used = {value for n in nodes for value in n.input} | {o.name for o in graph.output}
    nodes = [n for n in nodes if not (n.op_type == "DynamicQuantizeLinear" and not set(n.output) & used)]
    used = {value for n in nodes for value in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)
    left = sorted({n.op_type for n in graph.node} & ACTIVATION_QUANT_OPS)
    if left:
        raise HeadlabError(f"the float-activation graph still holds {left}; unexpected ONNX export")
    onnx.checker.check_model(model)
    return model


def _file_key(onnx_file: Path) -> tuple[str, int, int]:
    path = Path(onnx_file).resolve()
    if not path.is_file():
        raise HeadlabError(f"no such ONNX file: {onnx_file}; run: headlab fetch clip-vit-b16")
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
@functools.cache
def int8_matmul_exact() -> bool:
    """Whether onnxruntime's ``MatMulInteger`` on this CPU gives exact int32 products for uint8
    activations times int8 weights, the products the INT8 CLIP graph is made of.

    On x86 CPUs without VNNI instructions its kernel adds pairs of byte products in 16 bits, which
    saturate, and the INT8 graph's embeddings come out wrong (cosine about 0.5 to the dequantised
    model instead of about 0.97). Checked once per process on a 4 × 768 × 64 product of random bytes.
    """
    ort = require("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(4, 768), dtype=np.uint8)
    b = rng.integers(-128, 128, size=(768, 64), dtype=np.int8)
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["y"])],
        "int8-check",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [4, 768])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [4, 64])],
        initializer=[numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(),
        sess_options=options,
        providers=["CPUExecutionProvider"],
    )
    got = session.run(None, {"a": a})[0]
    return bool(np.array_equal(got, a.astype(np.int32) @ b.astype(np.int32)))


def check_int8_runtime() -> None:
    """Refuse the INT8 reference where onnxruntime's INT8 products are not exact (:func:`int8_matmul_exact`)."""
    if not int8_matmul_exact():
        raise HeadlabError(
            "onnxruntime's INT8 matrix products are not exact on this CPU (it adds byte products in 16 bits "
            "and saturates, as on x86 CPUs without VNNI), so its INT8 graph is no reference here; use "
            "reference='float' to check the conversion"
        )


def _session(key: tuple[str, int, int], reference: str, threads: int | None) -> Any:
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
    source: str | bytes = key[0]
    if reference == "float":
        source = float_activation_graph(Path(key[0])).SerializeToString()
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_session(onnx_file: Path, *, reference: str = "int8", threads: int | None = None) -> Any:
    """An onnxruntime CPU session on the package's graph: ``"int8"`` as shipped, or ``"float"``, the
    same graph with float32 activations (:func:`float_activation_graph`).

    Sessions are kept per (file, size, mtime, reference, threads) for the life of the process, so a
    loop over images builds the float graph once; a changed file gets a new session.
    """
    if reference not in REFERENCES:
        raise HeadlabError(f"reference must be one of {REFERENCES}, got {reference!r}")
    return _session(_file_key(onnx_file), reference, threads)


def run_onnx(
    onnx_file: Path,
    pixel_values: np.ndarray | torch.Tensor,
    *,
    threads: int | None = None,
    reference: str = "int8",
) -> np.ndarray:
    """Image embeddings ``[N, 512]`` from the package's graph, with onnxruntime on the CPU.

    ``reference="int8"`` (default): the graph as the package runs it, activations quantised to 8 bits.
    ``reference="float"``: the same graph and the same dequantised weights, activations in float32
    (:func:`float_activation_graph`); it isolates the conversion from the runtime's quantisation.

    Images run one at a time, as the package runs them: the graph's activation quantisation uses
    one range per tensor, so in a batch each image's embedding would depend on the others.
    """
    import torch

    if reference not in REFERENCES:
        raise HeadlabError(f"reference must be one of {REFERENCES}, got {reference!r}")
    require("onnxruntime")
    if isinstance(pixel_values, torch.Tensor):
        pixel_values = pixel_values.detach().to("cpu", torch.float32).numpy()
    pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
    if pixels.ndim != 4 or pixels.shape[1:] != (3, 224, 224):
        raise HeadlabError(
            f"the ONNX CLIP graph takes pixel values [N, 3, 224, 224], got {pixels.shape}; "
            "make them with model.preprocess(images)"
        )
    if reference == "int8":
        check_int8_runtime()
    session = onnx_session(onnx_file, reference=reference, threads=threads)
    name = session.get_inputs()[0].name
    # One image per call: the graph quantises each activation with one range over the whole batch,
    # so an image's embedding would otherwise depend on the images run beside it.
    out = [session.run(["image_embeds"], {name: pixels[i : i + 1]})[0] for i in range(pixels.shape[0])]
    return np.concatenate(out).astype(np.float32)
