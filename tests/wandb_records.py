"""Read the records of an offline W&B run file (``run-*.wandb``) without a W&B server.

wandb >= 0.2x no longer ships a Python reader for its transaction log. The file is a LevelDB-style
log (32 KiB blocks of ``crc32 | length | type | payload`` records) behind a 7-byte ``:W&B`` header,
each payload a ``wandb_internal_pb2.Record`` protobuf.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2

_BLOCK = 32768
_HEADER = 7


def read_records(path: str | Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos, payloads, pending = _HEADER, [], b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        _crc, length, rtype = struct.unpack("<IHB", data[pos : pos + 7])
        if rtype == 0 and length == 0:  # block padding
            pos += left
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if rtype == 1:
            payloads.append(payload)
        elif rtype == 2:
            pending = payload
        elif rtype == 3:
            pending += payload
        elif rtype == 4:
            payloads.append(pending + payload)
            pending = b""
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def wait_for_exit(path: str | Path, timeout: float = 60.0) -> list[wandb_internal_pb2.Record]:
    """The run file's records once its ``exit`` record is written.

    ``Run.finish()`` hands the run to the ``wandb-core`` service process, which writes the file
    asynchronously: the file can still be short when ``finish`` returns.
    """
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(path) if Path(path).stat().st_size > _HEADER else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.25)


def history(path: str | Path) -> list[dict[str, object]]:
    """The logged rows (``wandb.log`` / logger ``log_metrics`` calls) of a run file."""
    rows = []
    for record in wait_for_exit(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
    return rows
