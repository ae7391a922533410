"""A small ONNX node builder, so graph code reads like numpy: ``b.op("Gemm", x, w, transB=1)``,
``b.op("Slice", x, [start], [end], [1])``, ``b.op("Mul", x, 0.5)``.

An input is a tensor's name, or a value that becomes a constant (:meth:`Builder.value`): a Python scalar takes
the element type of the tensor it meets (numpy's rule), a list of ints is an int64 index tensor (starts, axes,
shapes), an array keeps its dtype. No module outside this one writes ``helper.make_node``.

Gradient tensors carry an extra target axis: the gradient of a forward tensor of shape
``[N, d1, ...]`` has shape ``[N, T, d1, ...]``. :meth:`Builder.fwd` gives a forward tensor
with that axis inserted (``[N, 1, d1, ...]``) so that it broadcasts against gradients.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Types = dict[str, onnx.TypeProto.Tensor]  # tensor name -> element type and (partly) known shape
Value = str | int | float | bool | Sequence[int] | Sequence[float] | np.ndarray  # an op's input (Builder.value)
Branch = tuple[list[onnx.NodeProto], str | list[str]]  # an If branch: its nodes and its result(s)
BOOL_OPS = {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
INT64_OPS = {"Shape", "Size", "ArgMax", "ArgMin", "NonZero"}  # (the element types of the ops emitted here)


def infer_types(model: onnx.ModelProto) -> Types:
    """The type of every tensor of ``model`` that ONNX shape inference (with data propagation) can type.

    It runs on a copy without the large weights (:func:`_weightless`): run it once per model state
    and pass the result on.
    """
    inferred = onnx.shape_inference.infer_shapes(_weightless(model), data_prop=True)
    types = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        if info.type.HasField("tensor_type"):  # copied out, so that the inferred copy can be freed
            types[info.name] = onnx.TypeProto.Tensor()
            types[info.name].CopyFrom(info.type.tensor_type)
    return types


PREFIX = "onnxcam/"  # the names of the nodes and tensors the grafter adds (a source model's are taken not to)
WEIGHT_ELEMENTS = 4096  # initializers above this many elements: only their type and shape matter to inference


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its large initializers turned into typed graph inputs.

    Shape inference serialises the whole model (VGG19: 548 MB, seconds per call); a weight's values
    never decide a shape, only the small integer constants that data propagation reads, kept here.
    """
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        setattr(light, field, getattr(model, field))
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph, target = model.graph, light.graph
    target.name = graph.name
    for name in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(target, name).extend(getattr(graph, name))
    inputs = {i.name for i in graph.input}
    for tensor in graph.initializer:
        if np.prod(tensor.dims, dtype=np.int64) <= WEIGHT_ELEMENTS:
            target.initializer.append(tensor)
        elif tensor.name not in inputs:
            target.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return light


def make_node(op_type: str, inputs: Sequence[str], outputs: Sequence[str], name: str | None = None,
              **attrs: object) -> onnx.NodeProto:  # fmt: skip
    """One default-domain node (the one place that makes nodes; :class:`Builder` emits them with fresh names)."""
    return helper.make_node(op_type, list(inputs), list(outputs), name=name, **attrs)


class Builder:
    """Emits default-domain ONNX nodes with fresh names into ``self.nodes``."""

    def __init__(self, model: onnx.ModelProto, types: Types | None = None, prefix: str = PREFIX) -> None:
        """``types``: :func:`infer_types` of ``model`` where the caller has it; inferred here otherwise."""
        self.opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.constants = {i.name: i for i in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.constants[node.output[0]] = node.attribute[0].t
        self.dequantized = {  # weights stored as integer levels (per tensor or per axis): their DequantizeLinear
            node.output[0]: node
            for node in model.graph.node
            if node.op_type == "DequantizeLinear"
            and all(i in self.constants for i in node.input if i)
            and not any(a.name == "block_size" and a.i for a in node.attribute)
        }
        self.types = infer_types(model) if types is None else types
        self._count = 0
        self._fwd: dict[str, str] = {}
        self._weights: dict[str, str] = {}
        self.derived: dict[str, str] = {}  # constants a rule derives from a weight, made once (a flipped kernel)
        self._elems: dict[str, int] = {}  # the element types of the tensors this builder emitted
        self.wanted: set[str] | None = None  # tensors that need a gradient; None means all
        self.static: set[str] = set()  # tensors computed from weights alone (a Transpose of one): no batch axis
        weights = {i.name for i in model.graph.initializer}
        first = [i for i in model.graph.input if i.name not in weights][:1]
        shaped = first and first[0].type.tensor_type.HasField("shape") and first[0].type.tensor_type.shape.dim
        self._batch = first[0].type.tensor_type.shape.dim[0] if shaped else None  # the model input's first axis

    def needs(self, name: str) -> bool:
        """Whether a rule should build the gradient of forward tensor ``name``."""
        return self.wanted is None or name in self.wanted

    # -- naming and emission ---------------------------------------------------------
    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    @contextmanager
    def subgraph(self) -> Iterator[list[onnx.NodeProto]]:
        """Emit into a new node list (an ``If`` branch) inside the ``with`` block.

        Initializers stay in the main graph, which a branch can read. Forward tensors
        prepared inside (:meth:`fwd`) are forgotten on the way out: the outer graph cannot see them.
        """
        outer_nodes, outer_fwd = self.nodes, dict(self._fwd)
        self.nodes = []
        try:
            yield self.nodes
        finally:
            self.nodes, self._fwd = outer_nodes, outer_fwd

    def op(self, op_type: str, *inputs: Value, name: str | None = None, **attrs: object) -> str:
        """Append one node and return its output: ``name`` where given (the node's name too), else a fresh one."""
        return self.op_multi(op_type, *inputs, outputs=[name] if name else 1, **attrs)[0]

    def op_multi(self, op_type: str, *inputs: Value, outputs: int | list[str] = 1, node: str | None = None,
                 **attrs: object) -> list[str]:  # fmt: skip
        """Append one node of ``outputs`` outputs (a count: fresh names; or the names) and return them; ``node``:
        the node's name where it is not its first output's."""
        names = [self.fresh(op_type) for _ in range(outputs)] if isinstance(outputs, int) else list(outputs)
        named = [i for i in inputs if isinstance(i, str) and i]
        like = next((i for i in named if self._known_elem(i) not in (None, TensorProto.BOOL)), None)
        like = like or next(iter(named), None)
        made = make_node(op_type, [self.value(i, like) for i in inputs], names, node or names[0], **attrs)
        self.nodes.append(made)
        elem = self._output_elem(op_type, like, attrs) if len(names) == 1 or op_type == "Split" else None
        if elem is not None:
            self._elems.update(dict.fromkeys(names, elem))
        return names

    def _known_elem(self, name: str) -> int | None:
        """The element type of ``name`` where it is known: inferred, a constant's, or one this builder emitted."""
        if name in self.types:
            return self.types[name].elem_type
        if name in self._elems:
            return self._elems[name]
        value = self.constant_value(name)
        return None if value is None else helper.np_dtype_to_tensor_dtype(value.dtype)

    def _output_elem(self, op_type: str, like: str | None, attrs: dict) -> int | None:
        """The element type of an emitted op's outputs: the type its attributes or the op name, else that of its
        first typed input that is not a condition (Where's, a comparison's inputs)."""
        if op_type == "Cast":
            return int(attrs["to"])
        if op_type in BOOL_OPS:
            return TensorProto.BOOL
        if op_type in INT64_OPS:
            return TensorProto.INT64
        if op_type == "ConstantOfShape":
            return attrs["value"].data_type
        return None if like is None else self._known_elem(like)

    def node(self, op_type: str, inputs: Sequence[Value], outputs: Sequence[str], name: str | None = None,
             **attrs: object) -> onnx.NodeProto:  # fmt: skip
        """A node built but not appended (one that replaces or copies another in a list the caller keeps)."""
        return make_node(op_type, [self.value(i) for i in inputs], outputs, name=name, **attrs)

    def value(self, x: Value, like: str | None = None) -> str:
        """``x`` as an input: a tensor name as it is; Python ints (a scalar or a list) as int64, the indices,
        axes and shapes ops take; Python floats as constants of tensor ``like``'s element type (float32 without
        one), as numpy's scalars meet an array; bools as bool; an array as it is."""
        if isinstance(x, str):
            return x
        array = np.asarray(x)
        if not isinstance(x, np.ndarray | np.generic):
            if array.dtype.kind == "f":
                elem = None if like is None else self._known_elem(like)
                array = array.astype(helper.tensor_dtype_to_np_dtype(elem) if elem in FLOAT_TYPES else np.float32)
            elif array.dtype.kind in "iu":
                array = array.astype(np.int64)
        return self.const(array, "scalar" if array.ndim == 0 else "const")

    def if_(self, condition: str, then: Branch, otherwise: Branch, outputs: str | list[str], elem: int,
            node: str | None = None, into: list[onnx.NodeProto] | None = None) -> None:  # fmt: skip
        """An ``If`` on ``condition`` whose branches (:meth:`subgraph`'s nodes and their result, or results)
        compute ``outputs``, each of element type ``elem``; appended to ``into`` (default: the builder's nodes)."""
        names = [outputs] if isinstance(outputs, str) else outputs
        graphs = {}
        for key, (nodes, results) in (("then_branch", then), ("else_branch", otherwise)):
            results = [results] if isinstance(results, str) else results
            infos = [helper.make_tensor_value_info(r, elem, None) for r in results]
            graphs[key] = helper.make_graph(nodes, f"{node or names[0]}_{key}", [], infos)
        (self.nodes if into is None else into).append(make_node("If", [condition], names, node or names[0], **graphs))

    def const(self, value: np.ndarray | list | float | int, hint: str = "const") -> str:
        array = np.asarray(value)
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(array, name))
        self.constants[name] = self.initializers[-1]  # (so that rules can read the constants they are given)
        return name

    def ints(self, values: list[int] | tuple[int, ...]) -> str:
        return self.const(np.asarray(values, dtype=np.int64), "ints")

    def zeros(self, shape: str, like: str) -> str:
        """Zeros of shape ``shape`` (a 1-D int64 tensor) and the element type of tensor ``like``."""
        return self.op("ConstantOfShape", shape, value=helper.make_tensor("zero", self.elem_type(like), [1], [0]))

    # -- what is known about forward tensors -----------------------------------------
    def constant_value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (a weight dequantized from constant levels too), else None."""
        if name in self.dequantized:
            return self._dequantize(self.dequantized[name])
        tensor = self.constants.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def _dequantize(self, node: onnx.NodeProto) -> np.ndarray:
        """(levels - zero point) * scale of a DequantizeLinear of constants, per tensor or per axis."""
        levels, scale, *zero = (numpy_helper.to_array(self.constants[i]) for i in node.input if i)
        shape = [1] * levels.ndim
        if scale.size > 1:
            shape[self._axis(node)] = scale.size
        offset = zero[0].astype(np.float64).reshape(shape) if zero else 0.0
        return ((levels.astype(np.float64) - offset) * scale.astype(np.float64).reshape(shape)).astype(scale.dtype)

    def weight(self, name: str) -> str:
        """``name`` as a gradient rule or the head-only copy reads it: a weight dequantized from integer levels
        as a float constant of the same values, so that the forward's DequantizeLinear keeps its one reader,
        which ONNX Runtime fuses into an integer kernel. (Another reader of the levels stops that fusion; a
        DequantizeLinear inside an ``If`` branch of levels from the outer graph fails it at load; one in the
        main graph ran on each call, for VGG16's FC2 and FC3 too.)"""
        if name not in self.dequantized:
            return name
        if name not in self._weights:
            self._weights[name] = self.const(self.constant_value(name), "dequantized")
        return self._weights[name]

    def _axis(self, node: onnx.NodeProto) -> int:
        """The axis of a DequantizeLinear's scale (default 1), non-negative."""
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        return axis % len(self.constants[node.input[0]].dims)

    def shape(self, name: str) -> list[int | None] | None:
        """Static shape from shape inference: ints where known, None per unknown dim."""
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            value = self.constant_value(name)
            return None if value is None else list(value.shape)
        return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]

    def same_dim(self, x: str, y: str, axis: int) -> bool:
        """Whether tensors ``x`` and ``y`` have provably the same size along ``axis`` (equal sizes, or the
        same named dimension such as the batch)."""
        dims = []
        for name in (x, y):
            t = self.types.get(name)
            if t is None or not t.HasField("shape") or len(t.shape.dim) <= axis:
                return False
            dims.append(t.shape.dim[axis])
        (a, c) = dims
        if a.HasField("dim_value") and c.HasField("dim_value"):
            return a.dim_value == c.dim_value
        return bool(a.dim_param) and a.dim_param == c.dim_param and not a.dim_param.startswith("unk__")

    def maybe_batch(self, x: str) -> bool:
        """Whether axis 0 of ``x`` may be the batch (the model input's first axis): False only where its size is
        known and the batch's is symbolic or another (an attention pool's ``[HW, N, C]`` tokens)."""
        size = (self.shape(x) or [None])[0]
        if size is None or self._batch is None:
            return True
        return self._batch.HasField("dim_value") and self._batch.dim_value == size

    def rank(self, name: str) -> int:
        shape = self.shape(name)
        if shape is None:
            raise ValueError(f"the rank of tensor {name!r} is unknown after shape inference")
        return len(shape)

    def elem_type(self, name: str) -> int:
        """The element type of ``name`` (float where nothing says otherwise)."""
        elem = self._known_elem(name)
        return TensorProto.FLOAT if elem is None else elem

    def np_dtype(self, name: str) -> np.dtype:
        return helper.tensor_dtype_to_np_dtype(self.elem_type(name))

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant with the element type of tensor ``like``."""
        return self.const(np.asarray(value, dtype=self.np_dtype(like)), "scalar")

    # -- opset-dependent forms ----------------------------------------------------------
    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.ints(axes))
        return self.op("Unsqueeze", x, axes=axes)

    def reduce(self, op_type: str, x: str, axes: list[int], keepdims: int) -> str:
        """ReduceSum/ReduceMean/...: axes moved from attribute to input in opset 13 / 18."""
        input_form = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if input_form:
            return self.op(op_type, x, self.ints(axes), keepdims=keepdims)
        return self.op(op_type, x, axes=axes, keepdims=keepdims)

    def fwd(self, x: str) -> str:
        """Forward tensor ``[N, ...]`` as ``[N, 1, ...]``, broadcastable against gradients."""
        if x not in self._fwd:
            self._fwd[x] = self.unsqueeze(x, [1])
        return self._fwd[x]

    def dims(self, x: str, start: int, end: int | None = None) -> str:
        """``Shape(x)[start:end]`` as a 1-D int64 tensor."""
        shape = self.op("Shape", x)
        ends = [end if end is not None else np.iinfo(np.int64).max]
        return self.op("Slice", shape, self.ints([start]), self.ints(ends))

    def product(self, x: str, start: int, end: int | None = None) -> str:
        """``prod(Shape(x)[start:end])`` as a 1-element int64 tensor. Reshapes use it instead of -1,
        which ONNX Runtime cannot resolve when another dimension is 0 (an empty batch)."""
        return self.op("ReduceProd", self.dims(x, start, end), keepdims=1)

    def grad_shape(self, dy: str, x: str) -> str:
        """The shape of the gradient of forward tensor ``x``: ``[N, T] + x.shape[1:]``."""
        return self.op("Concat", self.dims(dy, 0, 2), self.dims(x, 1), axis=0)
