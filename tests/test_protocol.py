"""bench/protocol.py: the runner-worker messages and their one codec."""

import json

import pytest

from bench import protocol


@pytest.mark.parametrize("message", [
    protocol.Start({"suite": "fake", "name": "A", "settings": {"label": "A"}}, "fake_suite", "cpu", 2, {}, None),
    protocol.Measure(), protocol.Warmup(True), protocol.Round(3, 1, False),
    protocol.Profile(["train"], 2, False, "/tmp/x"), protocol.Exit(), protocol.Ready(),
    protocol.Measured({"flops": {"value": 1.0, "kind": "count", "unit": "flop"}}, ["a note"], "ok", None, {}, {}),
    protocol.Warmed(), protocol.Warmed({"graph_breaks": {"value": 3.0, "kind": "count", "unit": "1"}}), protocol.Timed({"t": [0.1, 0.2]}, {"t": [[0.1], [0.2]]}),
    protocol.Profiled({"train": {"groups_ms": {}}}), protocol.Failed("ValueError: bad", "Traceback ..."),
])
def test_every_message_survives_the_codec(message):
    line = protocol.encode(message)
    assert "\n" not in line and json.loads(line)["protocol"] == protocol.PROTOCOL_VERSION
    assert protocol.decode(line) == message


@pytest.mark.parametrize("line, message", [
    ("not json", "not a protocol line"),
    ('{"command": "measure"}', "not a protocol message"),
    ('{"type": "Measure", "protocol": 0}', f"protocol version 0, this side speaks {protocol.PROTOCOL_VERSION}: runner "
                                             "and worker come from different versions"),
    (f'{{"type": "Round", "protocol": {protocol.PROTOCOL_VERSION}, "kept": 1, "speed": 2}}', "Round has no field speed"),
    (f'{{"type": "Round", "protocol": {protocol.PROTOCOL_VERSION}, "kept": "1"}}', r"Round.kept: expected int, got '1'"),
])
def test_a_line_of_another_protocol_is_refused_by_name(line, message):
    with pytest.raises(protocol.ProtocolError, match=message):
        protocol.decode(line)


def test_a_case_travels_typed_and_comes_back_as_its_suites_settings():
    import fake_suite

    from bench.suite import Case, Processes, decode_case, encode_case
    from bench.training_modes import Mode

    case = Case("fake", "A", fake_suite.Settings("A", "/tmp/log"), Mode("bf16"), Processes(2, "gloo", 1), rounds=3)
    line = protocol.encode(protocol.Start(encode_case(case), "fake_suite", "cpu"))
    assert decode_case(fake_suite, protocol.decode(line).case) == case
