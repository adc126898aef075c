"""The stream record encoding (design.md, "Streams"): exactly the documented fields, all strings, and the payload
policy (sampling, redaction, size cap) applied the way the `payload` and `redacted` fields say."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from gateway.records import (
    PAYLOAD_FULL,
    PAYLOAD_SAMPLED_OUT,
    PAYLOAD_TRUNCATED,
    Exchange,
    PayloadPolicy,
    decode_tensors,
    encode_exchange,
    feedback_fields,
    feedback_stream,
    log_stream,
)

# design.md, "Streams": the log entry's fields, in the table's order.
DESIGN_FIELDS = [
    "uid", "id", "ts", "endpoint", "variant", "role", "model", "version", "rows",
    "inputs", "outputs", "payload", "redacted", "status", "latency_ms", "error",
]


def exchange(**overrides: Any) -> Exchange:
    features = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    base: dict[str, Any] = {
        "request_id": "req-1",
        "arrived_ms": 1_700_000_000_123,
        "endpoint": "fraud",
        "variant": "a",
        "role": "primary",
        "model": "tabular",
        "version": 3,
        "rows": 2,
        "status": 200,
        "latency_ms": 1.23456,
        "inputs": {"features": features, "user": np.array([[b"alice"], [b"bob"]], dtype=object)},
        "input_types": {"features": "FP32", "user": "BYTES"},
        "outputs": [
            ("probabilities", np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)),
            ("label", np.array([1, 0], dtype=np.int64)),
        ],
    }
    base.update(overrides)
    return Exchange(**base)


def tensors(raw: str) -> dict[str, dict[str, Any]]:
    return {tensor["name"]: tensor for tensor in orjson.loads(raw)}


def test_stream_names_follow_design() -> None:
    assert log_stream("fraud") == "gatewatch:log:fraud"
    assert feedback_stream("fraud") == "gatewatch:feedback:fraud"


def test_encoded_fields_are_exactly_the_design_table_and_all_strings() -> None:
    fields = encode_exchange(exchange(), "abc-7", PayloadPolicy(), sampled_in=True)
    assert list(fields) == DESIGN_FIELDS
    assert all(isinstance(value, str) for value in fields.values())
    assert fields["uid"] == "abc-7"
    assert fields["id"] == "req-1"
    assert fields["ts"] == "1700000000123"
    assert (fields["endpoint"], fields["variant"], fields["role"]) == ("fraud", "a", "primary")
    assert (fields["model"], fields["version"], fields["rows"]) == ("tabular", "3", "2")
    assert (fields["payload"], fields["redacted"], fields["status"], fields["error"]) == (PAYLOAD_FULL, "", "200", "")
    assert float(fields["latency_ms"]) == pytest.approx(1.23456, abs=1e-3)


def test_full_payload_tensors_are_v2_json_flat_row_major() -> None:
    fields = encode_exchange(exchange(), "u", PayloadPolicy(), sampled_in=True)
    inputs, outputs = tensors(fields["inputs"]), tensors(fields["outputs"])
    assert inputs["features"] == {
        "name": "features", "shape": [2, 3], "datatype": "FP32", "data": [0.0, 0.25, 0.5, 0.75, 1.0, 1.25],
    }
    assert inputs["user"] == {"name": "user", "shape": [2, 1], "datatype": "BYTES", "data": ["alice", "bob"]}
    # every output the model returned, in order; datatypes derived from the arrays
    assert list(outputs) == ["probabilities", "label"]
    assert outputs["probabilities"]["datatype"] == "FP32"
    assert outputs["probabilities"]["data"] == [0.25, 0.75, 0.5, 0.5]
    assert outputs["label"] == {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]}
    decoded = decode_tensors(fields["inputs"])
    np.testing.assert_array_equal(decoded["features"], np.arange(6, dtype=np.float32).reshape(2, 3) / 4)


def test_sampled_out_keeps_metadata_and_omits_tensors() -> None:
    fields = encode_exchange(exchange(), "u", PayloadPolicy(sample=0.0), sampled_in=False)
    assert list(fields) == DESIGN_FIELDS
    assert fields["payload"] == PAYLOAD_SAMPLED_OUT
    assert orjson.loads(fields["inputs"]) == [] and orjson.loads(fields["outputs"]) == []
    assert (fields["id"], fields["rows"], fields["status"]) == ("req-1", "2", "200")


def test_redacted_inputs_have_null_data_and_are_listed() -> None:
    policy = PayloadPolicy(redact=frozenset({"features", "user"}))
    fields = encode_exchange(exchange(), "u", policy, sampled_in=True)
    assert fields["redacted"] == "features,user"
    inputs = tensors(fields["inputs"])
    assert inputs["features"]["data"] is None and inputs["user"]["data"] is None
    assert inputs["features"]["shape"] == [2, 3]  # the shape is metadata, kept
    assert tensors(fields["outputs"])["label"]["data"] == [1, 0]
    assert fields["payload"] == PAYLOAD_FULL
    assert "features" not in decode_tensors(fields["inputs"])


def test_redaction_names_only_inputs_present() -> None:
    policy = PayloadPolicy(redact=frozenset({"user", "not_an_input"}))
    fields = encode_exchange(exchange(), "u", policy, sampled_in=True)
    assert fields["redacted"] == "user"
    assert tensors(fields["inputs"])["features"]["data"] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.25]


def test_numeric_tensor_over_cap_is_cut_and_flagged() -> None:
    big = np.arange(100, dtype=np.float32).reshape(50, 2)
    ex = exchange(inputs={"features": big}, input_types={"features": "FP32"}, outputs=[("y", big.copy())], rows=50)
    fields = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=40), sampled_in=True)
    assert fields["payload"] == PAYLOAD_TRUNCATED
    logged = tensors(fields["inputs"])["features"]
    assert logged["shape"] == [50, 2]  # the true shape, with the data cut to the cap (10 FP32 values = 40 bytes)
    assert logged["data"] == list(range(10))
    assert tensors(fields["outputs"])["y"]["data"] == list(range(10))
    partial = decode_tensors(fields["inputs"])["features"]
    assert partial.shape == (10,)  # cut data comes back flat


def test_tensor_at_cap_is_not_truncated() -> None:
    exact = np.arange(10, dtype=np.float32)
    ex = exchange(inputs={"features": exact}, input_types={"features": "FP32"}, outputs=[], rows=10)
    fields = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=40), sampled_in=True)
    assert fields["payload"] == PAYLOAD_FULL
    assert tensors(fields["inputs"])["features"]["data"] == list(range(10))


def test_only_an_output_over_cap_still_flags_truncated() -> None:
    small = np.zeros((1, 2), dtype=np.float32)
    ex = exchange(inputs={"features": small}, input_types={"features": "FP32"},
                  outputs=[("y", np.arange(64, dtype=np.float64))], rows=1)
    fields = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=64), sampled_in=True)
    assert fields["payload"] == PAYLOAD_TRUNCATED
    assert tensors(fields["inputs"])["features"]["data"] == [0.0, 0.0]
    assert tensors(fields["outputs"])["y"]["data"] == list(range(8))


def test_bytes_tensor_over_cap_is_cut_and_flagged() -> None:
    words = np.array([b"abcd"] * 10, dtype=object)
    ex = exchange(inputs={"user": words}, input_types={"user": "BYTES"}, outputs=[], rows=10)
    fields = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=10), sampled_in=True)
    assert fields["payload"] == PAYLOAD_TRUNCATED
    logged = tensors(fields["inputs"])["user"]
    assert logged["datatype"] == "BYTES" and logged["data"] == ["abcd", "abcd"]


def test_redacted_tensor_never_counts_as_truncated() -> None:
    big = np.zeros(1000, dtype=np.float32)
    ex = exchange(inputs={"features": big}, input_types={"features": "FP32"}, outputs=[], rows=1000)
    policy = PayloadPolicy(redact=frozenset({"features"}), max_tensor_bytes=16)
    fields = encode_exchange(ex, "u", policy, sampled_in=True)
    assert (fields["payload"], fields["redacted"]) == (PAYLOAD_FULL, "features")


def test_failed_request_fields() -> None:
    ex = exchange(status=400, error="input 'features': expected shape [-1, 3]", inputs=None, outputs=None,
                  version=None, rows=0)
    fields = encode_exchange(ex, "u", PayloadPolicy(), sampled_in=True)
    assert list(fields) == DESIGN_FIELDS
    assert (fields["status"], fields["version"], fields["rows"]) == ("400", "", "0")
    assert fields["error"] == "input 'features': expected shape [-1, 3]"
    assert orjson.loads(fields["inputs"]) == [] and orjson.loads(fields["outputs"]) == []


def test_fp16_and_bool_tensors_encode_as_json_numbers_and_booleans() -> None:
    half = np.array([0.5, 1.5], dtype=np.float16)
    flags = np.array([True, False])
    ex = exchange(inputs={"h": half, "b": flags}, input_types={}, outputs=[], rows=2)
    inputs = tensors(encode_exchange(ex, "u", PayloadPolicy(), sampled_in=True)["inputs"])
    assert inputs["h"]["datatype"] == "FP16" and inputs["h"]["data"] == [0.5, 1.5]
    assert inputs["b"]["datatype"] == "BOOL" and inputs["b"]["data"] == [True, False]


def test_feedback_fields_label_is_json_and_reward_a_number() -> None:
    assert feedback_fields("r1", 5, label=1) == {"id": "r1", "ts": "5", "label": "1"}
    assert feedback_fields("r1", 5, label="fraud")["label"] == '"fraud"'
    assert feedback_fields("r1", 5, reward=0.5) == {"id": "r1", "ts": "5", "reward": "0.5"}


def test_bytes_tensor_cap_counts_utf8_bytes_not_characters() -> None:
    words = np.array(["ééééé"] * 3, dtype=object)  # 5 characters, 10 bytes each
    ex = exchange(inputs={"user": words}, input_types={"user": "BYTES"}, outputs=[], rows=3)
    fields = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=20), sampled_in=True)
    assert fields["payload"] == PAYLOAD_TRUNCATED
    assert tensors(fields["inputs"])["user"]["data"] == ["ééééé"] * 2
    exact = encode_exchange(ex, "u", PayloadPolicy(max_tensor_bytes=30), sampled_in=True)
    assert (exact["payload"], len(tensors(exact["inputs"])["user"]["data"])) == (PAYLOAD_FULL, 3)
