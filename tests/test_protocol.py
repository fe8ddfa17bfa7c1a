"""Protocol v1: round trips and every malformed-message kind, on real encoded images."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import ProtocolError
from edge.protocol import (KINDS, MessageError, decode_frame, encode_flags, encode_frame, encode_image, encoded_size,
                           parse_flags, parse_frame)


def _rgb(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), (230, 190, 200), np.uint8)
    cv2.circle(img, (w // 2, h // 2), min(h, w) // 4, (110, 60, 170), -1)
    return np.clip(img.astype(int) + rng.integers(-5, 6, img.shape), 0, 255).astype(np.uint8)


def _header(**kw) -> dict:
    h = {"v": 1, "seq": 3, "t_ns": 123, "slide": "S1", "encoding": "jpeg", "um_per_px": None}
    h.update(kw)
    return h


def _msg(header: dict, payload: bytes) -> list[bytes]:
    return [b"frame", json.dumps(header).encode(), payload]


def _kind(parts, **kw) -> str:
    with pytest.raises(MessageError) as ei:
        frame = parse_frame(parts, **kw)
        decode_frame(frame, **{k: v for k, v in kw.items() if k == "max_pixels"})
    assert isinstance(ei.value, ProtocolError) and ei.value.kind in KINDS
    return ei.value.kind


@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_frame_round_trip(encoding):
    rgb = _rgb()
    payload, shape = encode_image(rgb, encoding)
    parts = encode_frame(payload, seq=7, t_ns=99, slide="slide-A", encoding=encoding, shape=shape, um_per_px=0.1)
    frame = parse_frame(parts)
    assert (frame.header.seq, frame.header.t_ns, frame.header.slide, frame.header.um_per_px) == (7, 99, "slide-A", 0.1)
    out = decode_frame(frame)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    tol = 0 if encoding != "jpeg" else 12
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() <= tol


def test_encoded_size_reads_headers_without_decoding():
    rgb = _rgb(40, 72)
    for enc in ("jpeg", "png"):
        payload, _ = encode_image(rgb, enc)
        assert encoded_size(payload, enc) == (40, 72)
    assert encoded_size(b"\xff\xd8\xff\xda\x00\x02", "jpeg") is None
    assert encoded_size(b"not an image", "png") is None


def test_wrong_part_count_and_topic():
    payload, _ = encode_image(_rgb())
    good = _msg(_header(), payload)
    assert _kind(good[:2]) == "parts"
    assert _kind(good + [b"x"]) == "parts"
    assert _kind([b"frames"] + good[1:]) == "topic"


@pytest.mark.parametrize("raw_header", [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"v": NaN}', b" " * 70000])
def test_bad_json(raw_header):
    assert _kind([b"frame", raw_header, b"x"]) == "json"


@pytest.mark.parametrize("v", [0, 2, "1", 1.0, True, None])
def test_unknown_version(v):
    payload, _ = encode_image(_rgb())
    assert _kind(_msg(_header(v=v), payload)) == "version"


@pytest.mark.parametrize("change", [
    {"seq": None}, {"seq": -1}, {"seq": "3"}, {"seq": True}, {"t_ns": 1.5}, {"slide": ""}, {"slide": 5},
    {"slide": "x" * 300}, {"encoding": "gif"}, {"um_per_px": -1}, {"um_per_px": "0.1"},
])
def test_bad_fields(change):
    payload, _ = encode_image(_rgb())
    assert _kind(_msg(_header(**change), payload)) == "field"


@pytest.mark.parametrize("name", ["v", "seq", "t_ns", "slide", "encoding"])
def test_missing_fields(name):
    payload, _ = encode_image(_rgb())
    h = _header()
    del h[name]
    assert _kind(_msg(h, payload)) == "field"


def test_um_per_px_may_be_absent():
    payload, _ = encode_image(_rgb())
    h = _header()
    del h["um_per_px"]
    assert parse_frame(_msg(h, payload)).header.um_per_px is None


def test_payload_limit():
    payload, _ = encode_image(_rgb(), "png")
    assert _kind(_msg(_header(encoding="png"), payload), max_payload_bytes=len(payload) - 1) == "payload_size"
    assert parse_frame(_msg(_header(encoding="png"), payload), max_payload_bytes=len(payload))


def test_raw_size_must_match_shape():
    rgb = _rgb(32, 32)
    assert _kind(_msg(_header(encoding="raw", shape=[32, 32, 3]), rgb.tobytes()[:-1])) == "raw_size"
    assert _kind(_msg(_header(encoding="raw", shape=[32, 33, 3]), rgb.tobytes())) == "raw_size"
    assert _kind(_msg(_header(encoding="raw"), rgb.tobytes())) == "field"  # shape missing
    assert _kind(_msg(_header(encoding="raw", shape=[32, 32, 4]), rgb.tobytes())) == "field"


def test_zero_and_giant_frames():
    assert _kind(_msg(_header(), b"")) == "frame_size"
    assert _kind(_msg(_header(encoding="raw", shape=[0, 0, 3]), b"")) == "frame_size"
    tiny, _ = encode_image(_rgb(8, 8), "png")
    assert _kind(_msg(_header(encoding="png"), tiny)) == "frame_size"
    # A small PNG that declares 60000 x 60000 px: refused from its header, before any decoding.
    big, _ = encode_image(_rgb(), "png")
    forged = big[:16] + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + big[24:]
    assert _kind(_msg(_header(encoding="png"), forged)) == "frame_size"
    payload, _ = encode_image(_rgb(64, 64), "jpeg")
    assert _kind(_msg(_header(), payload), max_pixels=64 * 64 - 1) == "frame_size"


def test_undecodable_jpeg():
    payload, _ = encode_image(_rgb(64, 64), "jpeg")
    assert _kind(_msg(_header(), b"this is not a jpeg")) == "decode"
    assert _kind(_msg(_header(), payload[:200])) == "decode"  # header intact, data truncated
    assert _kind(_msg(_header(encoding="png"), payload)) == "decode"  # JPEG bytes labelled PNG


def _flags(**kw) -> dict:
    f = {"seq": 1, "slide": "S", "t_ns": 5, "t_done_ns": 9, "counts": {"lymphocyte": 2}, "dropped": 0,
         "cells": [{"id": "S#1", "track": 1, "box": [1, 2, 30, 40], "label": "lymphocyte", "p": 0.9,
                    "state": "accepted", "anomaly": 0.1}]}
    f.update(kw)
    return f


def test_flags_round_trip_and_checks():
    assert parse_flags(encode_flags(_flags()))["cells"][0]["id"] == "S#1"
    assert parse_flags(encode_flags(_flags(cells=[], timing_ms={"infer": 3.5})))["timing_ms"] == {"infer": 3.5}
    for bad in (_flags(seq=-1), _flags(counts={"a": -1}), _flags(cells=[{"id": "x"}]), _flags(dropped=None)):
        with pytest.raises(MessageError):
            parse_flags(encode_flags(bad))
    with pytest.raises(MessageError):
        parse_flags([b"flags", b'{"v": 2}'])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=5))
def test_arbitrary_bytes_never_crash(parts):
    """Any message either parses or raises MessageError with a known kind -- nothing else escapes."""
    try:
        decode_frame(parse_frame(parts, max_payload_bytes=256))
    except MessageError as exc:
        assert exc.kind in KINDS


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "seq", "t_ns", "slide", "encoding", "shape", "um_per_px"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-2, 2**64), st.floats(allow_nan=False),
                                 st.text(max_size=5), st.lists(st.integers(-1, 40), max_size=4))),
       st.binary(max_size=64))
def test_arbitrary_headers_never_crash(header, payload):
    try:
        decode_frame(parse_frame([b"frame", json.dumps(header).encode(), payload]))
    except MessageError as exc:
        assert exc.kind in KINDS
