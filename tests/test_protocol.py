"""The protocol document and the code agree; encoders and decoders refuse bad
frames with the documented codes."""

import pathlib
import re

import msgpack
import numpy as np
import pytest

from engram_shm.errors import (
    CODES,
    BadFrame,
    MissingField,
    Oversize,
    UnknownOp,
    UnsupportedVersion,
    WrongType,
)
from engram_shm.transport import protocol as p

DOC = (pathlib.Path(__file__).parent.parent / "docs" / "protocol.md").read_text()


def test_the_document_states_the_version_in_code():
    assert re.search(r"Version \*\*(\d+\.\d+)\*\*", DOC).group(1) == p.VERSION
    assert f"- {p.VERSION}:" in DOC.split("## Changelog")[1]


def test_every_error_code_is_documented_with_its_retryability():
    rows = dict(re.findall(r"^\| `([a-z_0-9]+)` \| (yes|no) \|", DOC, re.M))
    local = dict(re.findall(r"`([a-z_]+)` \((yes|no):", DOC))
    documented = {**rows, **local}
    assert set(documented) == set(CODES)
    for code, (retryable, _) in CODES.items():
        assert (documented[code] == "yes") == retryable, code


def test_every_op_is_documented():
    for op in p.CLIENT_OPS | p.SERVER_OPS:
        assert f"`{op}" in DOC, op


def test_vectors_are_read_without_copying_and_checked():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    header = {"op": "observe_batch", "dtype": "f32", "shape": [3, 4]}
    got = p.vectors(header, [data.tobytes()], 1 << 20, single=False)
    np.testing.assert_array_equal(got, data)
    half = data.astype(np.float16)
    got = p.vectors({**header, "dtype": "f16"}, [half.tobytes()], 1 << 20, single=False)
    np.testing.assert_array_equal(got.view(np.float16), half)
    with pytest.raises(BadFrame):
        p.vectors(header, [data.tobytes()[:-1]], 1 << 20, single=False)
    with pytest.raises(BadFrame):
        p.vectors(header, [], 1 << 20, single=False)
    with pytest.raises(Oversize):
        p.vectors(header, [data.tobytes()], 16, single=False)
    with pytest.raises(WrongType):
        p.vectors({**header, "dtype": "f64"}, [data.tobytes()], 1 << 20, single=False)
    with pytest.raises(WrongType):
        p.vectors({**header, "shape": [3]}, [data.tobytes()], 1 << 20, single=False)


def test_headers_are_checked():
    with pytest.raises(UnsupportedVersion):
        p.unpack_header(msgpack.packb({"v": "2.0", "op": "ping"}))
    with pytest.raises(UnknownOp):
        p.unpack_header(msgpack.packb({"v": p.VERSION, "op": "teleport"}))
    header = p.unpack_header(p.pack({"op": "init"})[0])
    with pytest.raises(MissingField):
        p.field(header, "seq", int)
    with pytest.raises(WrongType):
        p.field({"seq": True}, "seq", int)
    assert p.field({}, "k", int, 10) == 10
