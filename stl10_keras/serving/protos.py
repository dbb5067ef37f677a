"""TF Serving's configuration messages that `tensorflow-serving-api` does not ship.

The package holds `apis/` and `config/` but not
`servables/tensorflow/session_bundle_config_pb2` (`BatchingParameters`, read from
`--batching_parameters_file`) nor `config/monitoring_config_pb2`
(`MonitoringConfig`, `--monitoring_config_file`). Where a generated module is
installed it is used; otherwise the same message (package, names, field
numbers and types, as in TF Serving's `.proto` files) is built from its
descriptor in a pool of its own, so it parses the same text files with
`google.protobuf.text_format` and can never clash with a generated module.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from typing import Any

from stl10_keras.errors import UsageError, one_line

#: BatchingParameters' fields (name, number, type), as in TF Serving's
#: `servables/tensorflow/session_bundle_config.proto`.
BATCHING_FIELDS = (
    ("max_batch_size", 1, "Int64Value"),
    ("batch_timeout_micros", 2, "Int64Value"),
    ("max_enqueued_batches", 3, "Int64Value"),
    ("num_batch_threads", 4, "Int64Value"),
    ("thread_pool_name", 5, "StringValue"),
    ("allowed_batch_sizes", 6, "repeated int64"),
    ("pad_variable_length_inputs", 7, "bool"),
    ("enable_large_batch_splitting", 8, "BoolValue"),
    ("max_execution_batch_size", 9, "Int64Value"),
)
#: TF Serving's `config/monitoring_config.proto`.
PROMETHEUS_FIELDS = (("enable", 1, "bool"), ("path", 2, "string"))
MONITORING_FIELDS = (("prometheus_config", 1, ".tensorflow.serving.PrometheusConfig"),)


def _build(file_name: str, messages: dict[str, tuple]) -> dict[str, type]:
    """Message classes from (name, number, type) fields, in a pool of their own."""
    from google.protobuf import (
        descriptor_pb2,
        descriptor_pool,
        message_factory,
        wrappers_pb2,
    )

    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto()
    wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
    pool.Add(wrappers)
    file = descriptor_pb2.FileDescriptorProto(
        name=file_name, package="tensorflow.serving", syntax="proto3",
        dependency=[wrappers.name])
    kinds = descriptor_pb2.FieldDescriptorProto
    scalars = {"bool": kinds.TYPE_BOOL, "string": kinds.TYPE_STRING,
               "int64": kinds.TYPE_INT64}
    for message_name, fields in messages.items():
        message = file.message_type.add(name=message_name)
        for name, number, kind in fields:
            field = message.field.add(name=name, number=number,
                                      label=kinds.LABEL_OPTIONAL)
            if kind.startswith("repeated "):
                field.label, kind = kinds.LABEL_REPEATED, kind.split()[1]
            if kind in scalars:
                field.type = scalars[kind]
            else:
                field.type = kinds.TYPE_MESSAGE
                field.type_name = (kind if kind.startswith(".")
                                   else f".google.protobuf.{kind}")
    pool.Add(file)
    return {name: message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"tensorflow.serving.{name}"))
        for name in messages}


def _installed(module: str, name: str) -> type | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@functools.cache
def batching_parameters_class() -> type:
    """TF Serving's `tensorflow.serving.BatchingParameters` message class."""
    return (_installed("tensorflow_serving.servables.tensorflow."
                       "session_bundle_config_pb2", "BatchingParameters")
            or _build("tensorflow_serving/servables/tensorflow/"
                      "session_bundle_config.proto",
                      {"BatchingParameters": BATCHING_FIELDS})["BatchingParameters"])


@functools.cache
def monitoring_config_class() -> type:
    """TF Serving's `tensorflow.serving.MonitoringConfig` message class."""
    return (_installed("tensorflow_serving.config.monitoring_config_pb2",
                       "MonitoringConfig")
            or _build("tensorflow_serving/config/monitoring_config.proto",
                      {"PrometheusConfig": PROMETHEUS_FIELDS,
                       "MonitoringConfig": MONITORING_FIELDS})["MonitoringConfig"])


def read_text_proto(path: str | os.PathLike, message_class: type, flag: str) -> Any:
    """A message from a protobuf text file, as TF Serving reads its config files.

    Raises:
        UsageError: the file cannot be read or does not parse (the line, column
            and field are named).
    """
    from google.protobuf import text_format

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {flag} {path} ({one_line(e)}).") from None
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise UsageError(f"{flag} {path} is not a {message_class.DESCRIPTOR.name} "
                         f"text proto ({one_line(e)}); see docs/serving.md for an "
                         "example.") from None
    return message
