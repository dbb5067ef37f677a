"""The tensor codec: a TF Serving request -> tensors -> the signature -> a response.

No transport in it: the REST app hands it parsed JSON, the gRPC service hands
it `TensorProto`s; both get `RequestError`s with one sentence for a bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
from typing import Any, Sequence

import numpy as np
import orjson

from stl10_keras.errors import one_line
from stl10_keras.export import IMAGE_BYTES_INPUT, check_encoded_image
from stl10_keras.serving.errors import RequestError, clip
from stl10_keras.serving.repository import Servable

DEFAULT_SIGNATURE = "serving_default"


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("N" if d is None else str(d) for d in shape) + "]"


def _holds_bool(value: Any) -> bool:
    """Whether a nested list holds a JSON `true`/`false` (numpy makes them 1/0)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _numeric_input(name: str, value: Any, spec, row: bool, dtype_name: str,
                   may_hold_booleans: bool = True) -> np.ndarray:
    """A JSON array -> a numpy array of the input's dtype, or a `RequestError`.

    As TF Serving's `json_tensor.cc`: booleans are not numbers, and an integer
    input takes JSON integers only (`1.0` is refused); unlike it, a value out of
    the dtype's range is refused rather than wrapped (300 -> 44 for uint8).
    """
    dtype = np.dtype(spec.dtype.as_numpy_dtype)
    want = list(spec.shape)  # [None, H, W, C]
    what = f"'{name}' ({dtype_name} {_shape_text(want)})"
    try:
        array = np.asarray(value)
    except (ValueError, TypeError):
        array = None  # ragged: rows of different lengths
    if array is not None and array.dtype == object and dtype.kind in "iu":
        # Rectangular, but an integer beyond 64 bits made numpy keep Python ints.
        huge = [v for v in array.flat if isinstance(v, int) and not isinstance(v, bool)
                and not np.iinfo(dtype).min <= v <= np.iinfo(dtype).max]
        if huge and all(isinstance(v, (int, float)) for v in array.flat):
            info = np.iinfo(dtype)
            raise RequestError(400, f"Input '{name}' must hold whole numbers "
                               f"{info.min}..{info.max} ({dtype_name}); found "
                               f"{huge[0]!r}.")
    if array is None or array.dtype == object:
        if row and isinstance(value, list):
            for i, item in enumerate(value):
                try:
                    shape = np.shape(item)
                except ValueError:
                    raise RequestError(400, f"Instance {i} of {what} is not a "
                                       "rectangular array of numbers.") from None
                if list(shape) != want[1:]:
                    raise RequestError(400, f"Instance {i} of '{name}' has shape "
                                       f"{list(shape)}; each instance must be "
                                       f"{_shape_text(want[1:])}.")
        raise RequestError(400, f"Input {what} must be a rectangular array of numbers.")
    kind = array.dtype.kind
    if kind not in "iuf" and not (kind == "b" and dtype == bool):
        found = {"U": "strings", "b": "booleans"}.get(kind, "non-numbers")
        raise RequestError(400, f"Input {what} must hold numbers; found {found}.")
    if dtype != bool and kind != "b" and may_hold_booleans and _holds_bool(value):
        raise RequestError(400, f"Input {what} must hold numbers; found booleans.")
    if array.ndim != len(want) or any(w is not None and w != d
                                      for w, d in zip(want, array.shape)):
        if row and array.ndim >= 1:
            raise RequestError(400, f"Instances of '{name}' have shape "
                               f"{list(array.shape[1:])}; each instance must be "
                               f"{_shape_text(want[1:])}.")
        raise RequestError(400, f"Input '{name}' has shape {list(array.shape)}; it "
                           f"must be {_shape_text(want)}.")
    if array.size and dtype.kind in "iu" and kind != "b":
        info = np.iinfo(dtype)
        if kind == "f":
            bad = array[~np.isfinite(array) | (array != np.floor(array))]
            found = (bad if bad.size else array).flat[0].item()
            raise RequestError(400, f"Input '{name}' must hold whole numbers "
                               f"{info.min}..{info.max} ({dtype_name}) written "
                               f"without a decimal point; found {found!r}.")
        low, high = array.min(), array.max()
        if low < info.min or high > info.max:
            found = low if low < info.min else high
            raise RequestError(400, f"Input '{name}' must hold whole numbers "
                               f"{info.min}..{info.max} ({dtype_name}); found "
                               f"{found.item()!r}.")
    return array.astype(dtype)


def _string_input(name: str, value: Any, spec, row: bool) -> list[bytes]:
    """Strings or `{"b64": ...}` -> bytes; encoded images are checked by header."""
    if spec.shape.rank != 1:
        raise RequestError(400, f"Input '{name}' is a string tensor of rank "
                           f"{spec.shape.rank}; this server takes rank-1 strings only.")
    label = "Instance" if row else "Element"
    if not isinstance(value, list):
        raise RequestError(400, f"Input '{name}' must be a list of strings or "
                           '{"b64": "..."} objects, one per example.')
    out = []
    for i, item in enumerate(value):
        if _is_b64(item):
            if not isinstance(item["b64"], str):
                raise RequestError(400, f'{label} {i} of \'{name}\': "b64" must be a '
                                   "string.")
            text = item["b64"]
            try:
                # Unpadded base64 is accepted, as absl::Base64Unescape does.
                data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
            except (binascii.Error, ValueError):
                raise RequestError(400, f"{label} {i} of '{name}' is not valid base64."
                                   ) from None
        elif isinstance(item, str):
            # A lone surrogate ("\udcff", or such bytes in the body) is passed on
            # as its bytes, as TF Serving passes strings on unvalidated.
            data = item.encode("utf-8", "surrogatepass")
        else:
            raise RequestError(400, f"{label} {i} of '{name}' must be a string or "
                               f'{{"b64": "..."}}; found {type(item).__name__}.')
        if name == IMAGE_BYTES_INPUT:
            try:
                check_encoded_image(data)
            except ValueError as e:
                raise RequestError(400, f"{label} {i} of '{name}' {e}.") from None
        out.append(data)
    return out


def _columns(body: dict[str, Any], signature: str, names: list[str]
             ) -> tuple[dict[str, Any], bool]:
    """The request's value for each input, and whether it is in row format."""
    has_rows, has_cols = "instances" in body, "inputs" in body
    if has_rows and has_cols:
        raise RequestError(400, "Send either 'instances' (row format) or 'inputs' "
                           "(columnar format), not both.")
    if not has_rows and not has_cols:
        raise RequestError(400, "The request needs 'instances' (row format) or "
                           "'inputs' (columnar format).")
    takes = f"signature '{signature}' takes {names}"
    if has_cols:
        inputs = body["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            if sorted(inputs) != sorted(names):
                raise RequestError(400, f"'inputs' has keys {sorted(inputs)}; {takes}.")
            return dict(inputs), False
        if len(names) != 1:
            raise RequestError(400, f"'inputs' must be an object; {takes}.")
        return {names[0]: inputs}, False
    instances = body["instances"]
    if not isinstance(instances, list):
        raise RequestError(400, "'instances' must be a list, one entry per example.")
    if not instances:
        raise RequestError(400, "'instances' is empty; send at least one example.")
    columns: dict[str, list] = {n: [] for n in names}
    for i, instance in enumerate(instances):
        if isinstance(instance, dict) and not _is_b64(instance):
            if sorted(instance) != sorted(names):
                raise RequestError(400, f"Instance {i} has keys {sorted(instance)}; "
                                   f"{takes}.")
            for n in names:
                columns[n].append(instance[n])
        elif len(names) == 1:
            columns[names[0]].append(instance)
        else:
            raise RequestError(400, f"Instance {i} must be an object; {takes}.")
    return columns, True


def _output_json(name: str, array: np.ndarray) -> Any:
    """A tensor as JSON: strings as text, or `{"b64"}` for `*_bytes` and non-UTF-8;
    float32 in its shortest round-trip form (0.2, not 0.20000000298023224), as TF
    Serving's `WriteDecimal` writes it."""
    if array.dtype == np.float32:
        # numpy's str() of a float32 is its shortest round-trip text; as a double
        # that text is what json writes back, and float32(it) is the value again.
        return array.astype(str).astype(np.float64).tolist()
    if array.dtype != object:
        return array.tolist()

    def text(value: bytes) -> Any:
        if not name.endswith("_bytes"):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(value).decode("ascii")}

    return np.frompyfunc(text, 1, 1)(array).tolist()


def _locate_bad_image(values: list[bytes]) -> int | None:
    """The index of the first image the graph's decoder rejects (error path only)."""
    import tensorflow as tf

    from stl10_keras.images import decode

    for i, data in enumerate(values):
        try:
            decode(tf.constant(data))
        except tf.errors.InvalidArgumentError:
            return i
    return None


def signature_of(servable: Servable, name: Any) -> tuple[str, Any]:
    """The signature a request names: `""` or none is `serving_default`, as in TF
    Serving (`kDefaultServingSignatureDefKey`).

    Returns:
        `(name, concrete function)`.

    Raises:
        RequestError: 400 for a name that is not a string or not a signature.
    """
    if name is None or name == "":
        name = DEFAULT_SIGNATURE
    if not isinstance(name, str):
        raise RequestError(400, "'signature_name' must be a string; this model has "
                           f"{sorted(servable.signatures)}.")
    if name not in servable.signatures:
        raise RequestError(400, f"Unknown signature_name {clip(name)!r}; this model "
                           f"has {sorted(servable.signatures)}.")
    return name, servable.signatures[name]


def input_dtype_name(servable: Servable, signature: str, name: str, spec) -> str:
    """The input's dtype as TF Serving names it in errors (`uint8`, `string`)."""
    defs = servable.signature_defs.get(signature, {}).get("inputs", {})
    dtype_name = defs.get(name, {}).get("dtype", spec.dtype.name)
    return dtype_name.removeprefix("DT_").lower()


def batch_size(inputs: dict[str, Any]) -> int:
    """The batch size of a request's inputs (numpy arrays): their common first
    dimension.

    Raises:
        RequestError: 400 when the inputs' batch sizes differ or are 0.
    """
    sizes = {int(np.shape(v)[0]) for v in inputs.values()}
    if len(sizes) > 1:
        raise RequestError(
            400, f"The inputs have different batch sizes {sorted(sizes)}.")
    if 0 in sizes:
        raise RequestError(400, "The request holds no example; send at least one.")
    return sizes.pop()


def run_signature(signature: str, fn, inputs: dict[str, np.ndarray], row: bool = True
                  ) -> dict[str, np.ndarray]:
    """Call a signature on checked inputs; a graph error is a 400 naming the input.

    Args:
        signature: its name (for the error sentence).
        fn: the concrete function.
        inputs: input name -> numpy array (strings as an object array of
            bytes), all with the same batch size.
        row: whether the request was in row format (errors say "Instance i").

    Returns:
        Output name -> numpy array, sorted by name.
    """
    import tensorflow as tf

    batch_size(inputs)
    tensors = {k: tf.constant(v, tf.string if v.dtype == object else None)
               for k, v in inputs.items()}
    try:
        outputs = fn(**tensors)
    except tf.errors.InvalidArgumentError as e:
        images = inputs.get(IMAGE_BYTES_INPUT)
        bad = (_locate_bad_image(list(images))
               if images is not None and images.dtype == object else None)
        if bad is not None:
            label = "Instance" if row else "Element"
            raise RequestError(400, f"{label} {bad} of '{IMAGE_BYTES_INPUT}' could not "
                               f"be decoded ({one_line(e)}).") from None
        raise RequestError(400, f"Signature '{signature}' rejected the input "
                           f"({one_line(e)}).") from None
    return {k: v.numpy() for k, v in sorted(outputs.items())}


def predict(servable: Servable, body: Any, may_hold_booleans: bool = True,
            runner: Any = None, deadline: Any = None) -> dict[str, Any]:
    """Answer a TF Serving predict request.

    Args:
        servable: the version to run.
        body: the parsed JSON body: `{"signature_name"?, "instances": [...]}`
            (row format) or `{"signature_name"?, "inputs": ...}` (columnar).
        may_hold_booleans: False when the raw body holds no `true`/`false`, which
            spares the search for booleans among the pixels.
        runner: what computes the inputs (`batching.Batcher` or
            `DirectRunner`); None: `run_signature` here and now.
        deadline: a `batching.Deadline` for the runner.

    Returns:
        `{"predictions": [...]}` (one entry per instance; a dict of outputs when
        the signature has several) or `{"outputs": ...}` (a dict of outputs).

    Raises:
        RequestError: the request does not fit the signature (HTTP 400), or the
            runner's 503 (queue full) or 504 (deadline passed).
    """
    import tensorflow as tf

    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object with "
                           "'instances' or 'inputs'.")
    signature, fn = signature_of(servable, body.get("signature_name"))
    specs = fn.structured_input_signature[1]
    columns, row = _columns(body, signature, sorted(specs))
    inputs = {}
    for name, value in columns.items():
        spec = specs[name]
        if spec.dtype == tf.string:
            inputs[name] = _object_array(_string_input(name, value, spec, row))
        else:
            dtype_name = input_dtype_name(servable, signature, name, spec)
            inputs[name] = _numeric_input(name, value, spec, row, dtype_name,
                                          may_hold_booleans)
    if runner is None:
        arrays = run_signature(signature, fn, inputs, row)
    else:
        arrays = runner.run(signature, fn, inputs, row, deadline)
    if not row:
        if len(arrays) == 1:
            return {"outputs": _output_json(*next(iter(arrays.items())))}
        return {"outputs": {k: _output_json(k, a) for k, a in arrays.items()}}
    as_json = {k: _output_json(k, a) for k, a in arrays.items()}
    if len(as_json) == 1:
        return {"predictions": next(iter(as_json.values()))}
    n = len(next(iter(arrays.values())))
    return {"predictions": [{k: v[i] for k, v in as_json.items()} for i in range(n)]}


def _object_array(values: list[bytes]) -> np.ndarray:
    """A 1-D object array of bytes (`np.array` would make fixed-width `S` bytes,
    which drop trailing NUL bytes of an encoded image)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_json(data: bytes, fast: bool = True) -> Any:
    """The request body as JSON, or a `RequestError` with the reason.

    Args:
        data: the body.
        fast: parse with orjson, 2x faster than `json` (11 -> 5 ms for 32
            images as uint8 instances). A body orjson refuses (invalid JSON,
            NaN, a lone surrogate escape, UTF-16, nesting past 1024) is parsed
            by `json`, which accepts or words each case as before; the one value
            orjson reads differently, an integer beyond 64 bits (a float), only
            ever fails a request, which the caller then parses again with
            `fast=False` for `json`'s reading.
    """
    if fast:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise RequestError(400, f"The request body is not valid JSON ({e.msg} at line "
                           f"{e.lineno} column {e.colno}).") from None
    except RecursionError:
        raise RequestError(400, "The request body is nested too deeply.") from None
    except ValueError as e:  # bad UTF-8, NaN/Infinity, a number of 4,301+ digits
        if "integer string conversion" in str(e):
            raise RequestError(400, "The request body holds a number of more than "
                               f"{sys.get_int_max_str_digits():,} digits; send "
                               "pixels as 0..255.") from None
        raise RequestError(400, f"The request body is not valid JSON ({one_line(e)})."
                           ) from None


# --------------------------------------------------------------------------------------
# gRPC: TensorProto <-> tensors
# --------------------------------------------------------------------------------------


def tensor_from_proto(name: str, proto, spec, dtype_name: str,
                      max_bytes: int) -> Any:
    """A request's `TensorProto` -> a tensor for the signature's input `spec`.

    Args:
        name: the input name.
        proto: the `tensorflow.TensorProto`.
        spec: the signature's `tf.TensorSpec` for it.
        dtype_name: the dtype as TF Serving names it (`uint8`).
        max_bytes: a tensor larger than this is refused (a short proto can
            claim a huge shape, which `tf.make_ndarray` would fill in).

    Returns:
        A numpy array (strings: an object array of bytes).

    Raises:
        RequestError: 400 for a wrong dtype, shape or image; 413 over the size.
    """
    import tensorflow as tf
    from tensorflow.core.framework import types_pb2

    want = list(spec.shape)
    if proto.dtype != spec.dtype.as_datatype_enum:
        sent = types_pb2.DataType.Name(proto.dtype).removeprefix("DT_").lower()
        raise RequestError(400, f"Input '{name}' must be {dtype_name} "
                           f"{_shape_text(want)}; the request sends {sent}.")
    dims = [d.size for d in proto.tensor_shape.dim]
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise RequestError(400, f"Input '{name}' has no definite shape; send "
                           f"{_shape_text(want)}.")
    if len(dims) != len(want) or any(w is not None and w != d
                                     for w, d in zip(want, dims)):
        raise RequestError(400, f"Input '{name}' has shape {dims}; it must be "
                           f"{_shape_text(want)}.")
    itemsize = 1 if spec.dtype == tf.string else spec.dtype.size
    if int(np.prod(dims, dtype=object)) * itemsize > max_bytes:
        raise RequestError(413, f"Input '{name}' of shape {dims} is larger than "
                           f"this server's limit of {max_bytes / 2**20:.4g} MB; "
                           "send fewer examples per request.")
    try:
        array = tf.make_ndarray(proto)
    except Exception as e:  # inconsistent content for its shape and dtype
        raise RequestError(400, f"Input '{name}' is not a valid TensorProto "
                           f"({one_line(e)}).") from None
    if spec.dtype == tf.string and name == IMAGE_BYTES_INPUT:
        for i, data in enumerate(array.flat):
            try:
                check_encoded_image(data)
            except ValueError as e:
                raise RequestError(400, f"Element {i} of '{name}' {e}.") from None
    if spec.dtype == tf.string:
        return array.astype(object)
    return array.astype(spec.dtype.as_numpy_dtype, copy=False)


#: The dtypes `tf.make_tensor_proto` writes as `tensor_content` bytes (for more
#: than one element), and the `*_val` field it fills for one element.
_CONTENT_DTYPES = {np.dtype(t) for t in ("float16", "float32", "float64", "int8",
                                         "int16", "int32", "int64", "uint8",
                                         "uint32", "uint64")}
_SCALAR_FIELDS = {np.dtype("float32"): "float_val", np.dtype("float64"): "double_val",
                  np.dtype("int64"): "int64_val", np.dtype("int32"): "int_val"}


def tensor_proto(array: np.ndarray) -> Any:
    """An output array -> the very `TensorProto` `tf.make_tensor_proto` makes of
    it (numbers as `tensor_content` bytes, one number or strings in a `*_val`
    field), built directly: 5x faster, which counts when one batch answers many
    small requests."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    content = array.dtype in _CONTENT_DTYPES and array.size > 1
    strings = array.dtype == object and all(isinstance(v, bytes) for v in array.flat)
    scalar = _SCALAR_FIELDS.get(array.dtype) if array.size == 1 else None
    if not (content or strings or scalar):
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(
        dtype=tf.as_dtype(tf.string if strings else array.dtype).as_datatype_enum,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[
            tensor_shape_pb2.TensorShapeProto.Dim(size=d) for d in array.shape]))
    if content:
        proto.tensor_content = np.ascontiguousarray(array).tobytes()
    elif strings:
        proto.string_val.extend(array.flat)
    else:
        getattr(proto, scalar).append(array.flat[0].item())
    return proto


def protos_from_outputs(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Output arrays -> `TensorProto`s, as TF Serving's PredictResponse holds them."""
    return {k: tensor_proto(a) for k, a in arrays.items()}
