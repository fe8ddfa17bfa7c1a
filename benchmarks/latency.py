"""Frame-to-flags latency of the real path over ZeroMQ on loopback: camera publisher -> daemon -> subscriber.

The daemon runs as a subprocess (``cytoedge daemon``), exactly as deployed; this script publishes 640x480
JPEG frames at a set rate and subscribes to the flags. Each flags message carries the frame's capture
``t_ns``, so latency = arrival of the flags - capture, on one clock. Per-stage times come from the daemon's
``/metrics`` (histogram sums and counts, before and after each run). Runs the set rate, then 2x and 10x
overload; reports p50/p95/p99 latency, per-stage ms, cells/s, drops and the daemon's peak memory.

Frames: the BCCD frames in ../shared/data/bccd (read here, never copied into the project). Consecutive BCCD
frames are different fields, so the tracker sees a cut at every frame and every white cell is classified:
the worst case for inference load (a real stage scan re-uses most cells from frame to frame).

    python benchmarks/latency.py [--bundle DIR] [--backend onnxruntime] [--fps 10] [--seconds 20]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from edge.ops import parse_metrics
from edge.protocol import encode_frame, parse_flags

ROOT = Path(__file__).resolve().parents[1]
BCCD_JPEGS = ROOT.parent / "shared" / "data" / "bccd" / "BCCD" / "JPEGImages"
STAGES = ("decode", "detect", "track", "preprocess", "infer", "post", "store", "publish")


def load_frames(folder: Path, n: int) -> list[bytes]:
    """The first n 640x480 JPEGs of ``folder``, as bytes (sent as they are: the camera's JPEG)."""
    paths = sorted(folder.glob("*.jpg"))[:n]
    if not paths:
        raise SystemExit(f"no JPEG frames in {folder} (needs ../shared/data/bccd, or --frames-dir)")
    return [p.read_bytes() for p in paths]


class Daemon:
    def __init__(self, args, db: Path):
        cmd = [sys.executable, "-m", "edge.cli", "daemon", "--frames", args.endpoint, "--flags", "tcp://127.0.0.1:*",
               "--db", str(db), "--metrics-port", "0", "--log-format", "json", "--backend", args.backend,
               "--queue-size", str(args.queue_size), "--max-batch", str(args.max_batch),
               "--max-wait-ms", str(args.max_wait_ms)]
        if args.bundle:
            cmd += ["--bundle", args.bundle]
        if args.precision:
            cmd += ["--precision", args.precision]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.info: dict = {}
        self.log: list[str] = []
        for line in self.proc.stderr:
            self.log.append(line)
            if '"daemon ready"' in line:
                self.info = json.loads(line)
                break
        if not self.info:
            raise SystemExit("daemon did not start:\n" + "".join(self.log))
        threading.Thread(target=lambda: [self.log.append(x) for x in self.proc.stderr], daemon=True).start()

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.info['metrics_port']}/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout=120)


def publish(pub: zmq.Socket, frames: list[bytes], fps: float, seconds: float, slide: str, seq0: int) -> int:
    """Send frames at ``fps`` for ``seconds`` (drift-free schedule) -> frames sent."""
    period, n = 1.0 / fps, int(round(fps * seconds))
    start = time.monotonic()
    for i in range(n):
        delay = start + i * period - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        pub.send_multipart(encode_frame(frames[i % len(frames)], seq=seq0 + i, t_ns=time.time_ns(), slide=slide,
                                        encoding="jpeg"))
    return n


def run_rate(d: Daemon, pub: zmq.Socket, sub: zmq.Socket, frames, fps, seconds, slide, seq0) -> dict:
    before = d.metrics()
    got: list[tuple[int, int, int]] = []  # (seq, latency ns, dropped)
    peak = [d.rss_mb()]
    done = threading.Event()

    def receive():
        while True:
            try:
                g = parse_flags(sub.recv_multipart())
            except zmq.Again:
                if done.is_set():
                    return
                continue
            if g["slide"] == slide:
                got.append((g["seq"], time.time_ns() - g["t_ns"], g["dropped"]))
            peak[0] = max(peak[0], d.rss_mb())

    rx = threading.Thread(target=receive)
    rx.start()
    t0 = time.monotonic()
    sent = publish(pub, frames, fps, seconds, slide, seq0)
    wall = time.monotonic() - t0
    # Wait for the queue to drain: no new flags for 2 s.
    last = -1
    while len(got) != last:
        last = len(got)
        time.sleep(2.0)
    done.set()
    rx.join()
    after = d.metrics()

    def delta(key):
        return after.get(key, 0.0) - before.get(key, 0.0)

    lat = np.array([g[1] for g in got], float) / 1e6
    stages = {}
    for s in STAGES:
        n = delta(f'cytoedge_stage_ms_count{{stage="{s}"}}')
        stages[s] = delta(f'cytoedge_stage_ms_sum{{stage="{s}"}}') / n if n else 0.0
    processed = delta("cytoedge_frames_processed_total")
    infer_calls = delta('cytoedge_stage_ms_count{stage="infer"}')
    dropped = sum(v for k, v in after.items() if k.startswith("cytoedge_frames_dropped_total")) - \
        sum(v for k, v in before.items() if k.startswith("cytoedge_frames_dropped_total"))
    return {
        "fps": fps, "seconds": round(wall, 2), "sent": sent, "flags": len(got), "processed": int(processed),
        "dropped": int(dropped), "lost_in_transport": int(sent - processed - dropped),
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "p95_ms": float(np.percentile(lat, 95)) if lat.size else None,
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "max_ms": float(lat.max()) if lat.size else None,
        "stage_ms_mean": stages, "infer_ms_per_batch": stages["infer"],
        "cells_classified": int(delta("cytoedge_cells_inferred_total")),
        "cells_per_s": delta("cytoedge_cells_inferred_total") / wall,
        "cells_per_batch": delta("cytoedge_cells_inferred_total") / infer_calls if infer_calls else 0.0,
        "frames_per_s": processed / wall, "peak_rss_mb": round(peak[0], 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="model bundle (default: the one shipped with cytoedge)")
    ap.add_argument("--backend", default="onnxruntime")
    ap.add_argument("--precision", default=None)
    ap.add_argument("--fps", type=float, default=10.0, help="the set frame rate")
    ap.add_argument("--overload", type=float, nargs="*", default=[2.0, 10.0], help="also run at these multiples")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each run")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds at the set rate before measuring")
    ap.add_argument("--frames-dir", default=str(BCCD_JPEGS), help="folder of 640x480 JPEG frames")
    ap.add_argument("--n-frames", type=int, default=100, help="distinct frames cycled through")
    ap.add_argument("--queue-size", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", default="benchmarks/out/latency.json")
    args = ap.parse_args()

    frames = load_frames(Path(args.frames_dir), args.n_frames)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 4)  # as cytoedge camera: a slow consumer costs frames, not memory
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    args.endpoint = f"tcp://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        d = Daemon(args, Path(tmp) / "bench.db")
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 200)
        sub.setsockopt(zmq.SUBSCRIBE, b"flags")
        sub.connect(d.info["flags"])
        try:
            # Connect both ways, then warm up (first inference calls, caches) at the set rate.
            for i in range(300):
                pub.send_multipart(encode_frame(frames[0], seq=i, t_ns=time.time_ns(), slide="connect", encoding="jpeg"))
                try:
                    sub.recv_multipart()
                    break
                except zmq.Again:
                    pass
            run_rate(d, pub, sub, frames, args.fps, args.warmup, "warmup", 0)
            results = []
            for mult in [1.0, *args.overload]:
                fps = args.fps * mult
                r = run_rate(d, pub, sub, frames, fps, args.seconds, f"bench-{fps:g}fps", 0)
                r["load"] = f"{mult:g}x"
                results.append(r)
                print(f"  {mult:g}x done: {r['flags']} flags, p99 {r['p99_ms']:.1f} ms, dropped {r['dropped']}", file=sys.stderr)
        finally:
            rc = d.stop()
    info = {"backend": d.info.get("backend"), "precision": d.info.get("precision"), "bundle_id": d.info.get("bundle_id"),
            "frames": f"{len(frames)} JPEG 640x480 from {args.frames_dir}", "cpu_count": os.cpu_count(),
            "loadavg": os.getloadavg(), "daemon_exit": rc}
    print(f"\nbackend {info['backend']} {info['precision']}, bundle {info['bundle_id']}, {info['frames']}")
    print(f"{'load':>5} {'fps':>5} {'sent':>5} {'flags':>5} {'drop':>5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
          f"{'cells/s':>7} {'cells/b':>7} {'RSS MB':>7}")
    for r in results:
        print(f"{r['load']:>5} {r['fps']:>5g} {r['sent']:>5} {r['flags']:>5} {r['dropped']:>5} {r['p50_ms']:>7.1f} "
              f"{r['p95_ms']:>7.1f} {r['p99_ms']:>7.1f} {r['cells_per_s']:>7.1f} {r['cells_per_batch']:>7.2f} {r['peak_rss_mb']:>7.0f}")
    print("\nmean ms per stage (infer: per batch)")
    print(f"{'load':>5} " + " ".join(f"{s:>10}" for s in STAGES))
    for r in results:
        print(f"{r['load']:>5} " + " ".join(f"{r['stage_ms_mean'][s]:>10.2f}" for s in STAGES))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"info": info, "args": {k: v for k, v in vars(args).items()}, "runs": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
