"""The lean gRPC ModelInfer's tensors (runtime/serving/grpc_infer.py): what a client sends, read into numpy,
and the answer read back by KServe's own gRPC decoder (InferResponse.from_grpc), raw and typed."""

from __future__ import annotations

import numpy as np
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.infer_type import InferResponse, serialize_byte_tensor

from conveyor.runtime.serving.grpc_infer import GrpcCall, bytes_elements


def _raw_request(outputs: tuple[str, ...] = ()) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="fraud", id="r1")
    amount = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    hour = np.array([[1], [2], [23]], dtype=np.int64)
    foreign = np.array([True, False, True])
    merchant = np.array([b"grocery", "caf\u00e9".encode(), b""], dtype=np.object_)
    for name, datatype, arr in (
        ("amount", "FP32", amount), ("hour", "INT64", hour), ("foreign", "BOOL", foreign),
        ("merchant", "BYTES", merchant),
    ):  # fmt: skip
        request.inputs.add(name=name, datatype=datatype, shape=arr.shape)
        raw = serialize_byte_tensor(arr).item() if datatype == "BYTES" else arr.tobytes()
        request.raw_input_contents.append(raw)
    for name in outputs:
        request.outputs.add(name=name)
    return request


def test_raw_inputs_are_read_into_numpy_with_their_shapes_and_types() -> None:
    call = GrpcCall(_raw_request())
    arrays = {t.name: t.as_numpy() for t in call.inputs}
    assert call.id == "r1" and call.raw
    assert arrays["amount"].dtype == np.float32 and arrays["amount"].tolist() == [1.5, -2.0, 3.25]
    assert arrays["hour"].shape == (3, 1) and arrays["hour"][:, 0].tolist() == [1, 2, 23]
    assert arrays["foreign"].tolist() == [True, False, True]
    assert arrays["merchant"].tolist() == [b"grocery", "caf\u00e9".encode(), b""]


def test_typed_contents_are_read_as_kserve_reads_them() -> None:
    request = pb.ModelInferRequest(model_name="fraud")
    t = request.inputs.add(name="amount", datatype="FP64", shape=[2])
    t.contents.fp64_contents.extend([0.5, 7.0])
    t = request.inputs.add(name="merchant", datatype="BYTES", shape=[2])
    t.contents.bytes_contents.extend([b"a", b"bc"])
    t = request.inputs.add(name="hour", datatype="INT32", shape=[2])
    t.contents.int_contents.extend([3, 4])
    call = GrpcCall(request)
    arrays = {t.name: t.as_numpy() for t in call.inputs}
    assert not call.raw and call.id is None
    assert arrays["amount"].dtype == np.float64 and arrays["amount"].tolist() == [0.5, 7.0]
    assert arrays["merchant"].tolist() == [b"a", b"bc"]
    assert arrays["hour"].dtype == np.int32 and arrays["hour"].tolist() == [3, 4]


def test_malformed_raw_contents_raise_value_error_naming_the_problem() -> None:
    # ValueError: the predictor's V2 decoder turns it into InvalidInput (INVALID_ARGUMENT) naming the input.
    with pytest.raises(ValueError, match="claims 100 bytes"):
        bytes_elements(b"\x64\x00\x00\x00abc")
    with pytest.raises(ValueError, match="stray"):
        bytes_elements(b"\x01\x00\x00\x00ab")
    request = pb.ModelInferRequest(model_name="fraud")
    request.inputs.add(name="amount", datatype="FP32", shape=[2])
    request.raw_input_contents.append(b"\x00" * 7)  # not whole FP32 values
    with pytest.raises(ValueError):
        GrpcCall(request).inputs[0].as_numpy()
    request.raw_input_contents[0] = b"\x00" * 12  # three values for shape [2]
    with pytest.raises(ValueError):
        GrpcCall(request).inputs[0].as_numpy()


def _outputs() -> list[tuple[str, str, np.ndarray]]:
    probs = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    return [("label", "BYTES", np.array(["ok", "fraud"], dtype=np.object_)), ("probabilities", "FP32", probs)]


def test_the_answer_reads_back_with_kserves_decoder_raw_and_typed() -> None:
    raw = GrpcCall(_raw_request()).response("fraud", "v3", "r1", _outputs())
    assert len(raw.raw_output_contents) == 2  # raw in, raw out
    typed = GrpcCall(pb.ModelInferRequest(model_name="fraud")).response("fraud", "v3", "r2", _outputs())
    assert len(typed.raw_output_contents) == 0 and list(typed.outputs[0].contents.bytes_contents) == [
        b"ok",
        b"fraud",
    ]
    for message, rid in ((raw, "r1"), (typed, "r2")):
        answer = InferResponse.from_grpc(message)
        assert (answer.id, answer.model_name, answer.model_version) == (rid, "fraud", "v3")
        labels = (
            answer.outputs[0].as_numpy() if message is raw else message.outputs[0].contents.bytes_contents
        )
        assert [v.decode() if isinstance(v, bytes) else v for v in list(labels)] == ["ok", "fraud"]
        probs = answer.outputs[1].as_numpy() if message is raw else np.array(answer.outputs[1].data)
        np.testing.assert_allclose(np.asarray(probs, dtype=np.float32).reshape(2, 2), _outputs()[1][2])


def test_requested_outputs_are_answered_alone_and_an_unknown_one_is_named() -> None:
    only = GrpcCall(_raw_request(("probabilities",))).response("fraud", "v3", "r1", _outputs())
    assert [o.name for o in only.outputs] == ["probabilities"] and len(only.raw_output_contents) == 1
    with pytest.raises(InvalidInput, match="'score' does not exist"):
        GrpcCall(_raw_request(("score",))).response("fraud", "v3", "r1", _outputs())
