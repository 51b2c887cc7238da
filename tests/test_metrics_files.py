"""The metrics files survive faults: strict JSON rows, torn rows dropped, torn TensorBoard records
cut back to the last whole one (checked against the file's own length before the tear)."""

import json
import struct

import pytest

from llama_jax.metrics import MetricsWriter, repair_event_files


def _write_steps(workdir, steps, start=0):
    writer = MetricsWriter(workdir, start=start)
    for step in steps:
        writer.write(step, {"loss": 1.0 / step, "grad_norm": float("nan")})
    writer.close()
    return max(workdir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)


def test_rows_are_strict_json_and_torn_rows_are_dropped(tmp_path):
    _write_steps(tmp_path, [1, 2, 3])
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "lo')
    assert MetricsWriter(tmp_path).drop_after(2) == 1
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 1.0, "grad_norm": None}, {"step": 2, "loss": 0.5, "grad_norm": None}]


def _records(data: bytes) -> list[tuple[int, bytes]]:
    """(offset, payload) of each record, from the headers: u64 length, u32 crc, payload, u32 crc."""
    offset, records = 0, []
    while offset < len(data):
        length = struct.unpack_from("<Q", data, offset)[0]
        records.append((offset, data[offset + 12 : offset + 12 + length]))
        offset += 8 + 4 + length + 4
    assert offset == len(data)
    return records


@pytest.mark.parametrize("cut", [1, 5, 12, 20])
def test_a_torn_event_record_is_cut_back_to_the_last_whole_one(tmp_path, cut):
    events = _write_steps(tmp_path, [1, 2, 3])
    whole = events.read_bytes()
    starts = [offset for offset, _ in _records(whole)]
    last = starts[-1]
    events.write_bytes(whole[: len(whole) - cut])
    expected_end = last if cut <= len(whole) - last else starts[-2]
    assert repair_event_files(tmp_path) == [(events, len(whole) - cut - expected_end)]
    assert events.read_bytes() == whole[:expected_end]
    assert repair_event_files(tmp_path) == []  # a whole file is left alone


def test_a_garbled_last_record_is_cut(tmp_path):
    events = _write_steps(tmp_path, [1, 2])
    whole = bytearray(events.read_bytes())
    last = _records(bytes(whole))[-1][0]
    whole[-6] ^= 0xFF  # a payload byte of the last record
    events.write_bytes(bytes(whole))
    assert repair_event_files(tmp_path) == [(events, len(whole) - last)]
    assert events.read_bytes() == bytes(whole[:last])


def test_a_resumed_writer_tells_tensorboard_to_purge_the_steps_it_logs_again(tmp_path):
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    events = _write_steps(tmp_path, [5, 6], start=4)
    written = [Event.FromString(payload) for _, payload in _records(events.read_bytes())]
    # A restart at step 4: TensorBoard hides what earlier files hold from step 4 on.
    restarts = [
        e.step for e in written if e.HasField("session_log") and e.session_log.status == SessionLog.START
    ]
    assert restarts == [4]
    assert [e.step for e in written if e.HasField("summary")] == [5, 5, 6, 6]
