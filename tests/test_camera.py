"""The camera bridge: image folders and video files published over a real PUB socket, checked on a SUB."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from edge.camera import Camera, CameraConfig, iter_source
from edge.errors import ConfigError, InputError
from edge.protocol import decode_frame, parse_frame
from smear import Wbc, render_smear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("frames")
    for i in range(3):
        rgb = render_smear([Wbc(200 + 60 * i, 240)], h=240, w=320, px_per_um=4.0, n_rbc=15, seed=i)
        cv2.imwrite(str(d / f"f{i}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (d / "notes.txt").write_text("not an image")
    return d


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def _publish(ctx, config: CameraConfig, n: int) -> list:
    """Run a Camera on a random port in a thread; collect n frames on a SUB socket."""
    cam = Camera(CameraConfig(**{**config.__dict__, "endpoint": "tcp://127.0.0.1:*", "warmup_s": 0.5}), ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 20000)
    sub.setsockopt(zmq.SUBSCRIBE, b"frame")
    sub.connect(cam.endpoint)
    th = threading.Thread(target=cam.run)
    th.start()
    try:
        return [parse_frame(sub.recv_multipart()) for _ in range(n)]
    finally:
        cam.stop()
        th.join()
        sub.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_folder_frames_are_stamped_and_decodable(ctx, folder):
    frames = _publish(ctx, CameraConfig(source=str(folder), fps=50, slide="S-7", um_per_px=0.25, count=3), 3)
    assert [f.header.seq for f in frames] == [0, 1, 2]
    assert all(f.header.slide == "S-7" and f.header.um_per_px == 0.25 and f.header.encoding == "jpeg" for f in frames)
    ts = [f.header.t_ns for f in frames]
    assert ts == sorted(ts) and len(set(ts)) == 3
    for i, f in enumerate(frames):
        want = cv2.cvtColor(cv2.imread(str(folder / f"f{i}.png")), cv2.COLOR_BGR2RGB)
        got = decode_frame(f)
        assert got.shape == want.shape and np.abs(got.astype(int) - want).mean() < 4


def test_loop_and_raw_encoding(ctx, folder):
    frames = _publish(ctx, CameraConfig(source=str(folder), fps=100, loop=True, encoding="raw", count=7), 7)
    assert [f.header.seq for f in frames] == list(range(7))
    imgs = [decode_frame(f) for f in frames]
    assert np.array_equal(imgs[0], imgs[3]) and np.array_equal(imgs[1], imgs[4])  # the folder came round again
    assert frames[0].header.shape == (240, 320, 3)


def test_video_file_source(tmp_path, ctx):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 120))
    for i in range(5):
        img = np.full((120, 160, 3), 40 * i, np.uint8)
        writer.write(img)
    writer.release()
    means = [float(f.mean()) for f in iter_source(str(path))]
    assert len(means) == 5 and means == sorted(means)
    frames = _publish(ctx, CameraConfig(source=str(path), fps=100, loop=True, encoding="png", count=8), 8)
    assert [f.header.seq for f in frames] == list(range(8))
    assert decode_frame(frames[5]).mean() == pytest.approx(decode_frame(frames[0]).mean(), abs=3)  # looped


def test_bad_sources_and_settings(tmp_path):
    with pytest.raises(InputError):
        next(iter_source(str(tmp_path / "nope.mp4")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError):
        next(iter_source(str(tmp_path / "empty")))
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    with pytest.raises(InputError):
        next(iter_source(str(tmp_path / "junk.avi")))
    for bad in ({"fps": 0}, {"encoding": "gif"}, {"quality": 0}, {"um_per_px": -1.0}, {"slide": ""}):
        with pytest.raises(ConfigError):
            CameraConfig(**bad)


def test_camera_command_publishes_and_stops_on_sigterm(folder, ctx):
    port = _free_port()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVTIMEO, 30000)
    sub.setsockopt(zmq.SUBSCRIBE, b"frame")
    sub.connect(f"tcp://127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "edge.cli", "camera", "--source", str(folder), "--endpoint",
                             f"tcp://127.0.0.1:{port}", "--fps", "20", "--loop", "--slide", "cli"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        got = [parse_frame(sub.recv_multipart()) for _ in range(4)]
        assert all(f.header.slide == "cli" for f in got)
        seqs = [f.header.seq for f in got]
        assert seqs == list(range(seqs[0], seqs[0] + 4))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        sub.close()
    r = subprocess.run([sys.executable, "-m", "edge.cli", "camera", "--source", os.fspath(folder / "missing")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "missing" in r.stderr
