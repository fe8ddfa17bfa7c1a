"""``cytoedge train``: train the diffusion teacher on a labelled folder (needs the export extra)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("train", help="train the diffusion teacher (autoencoder + class-conditional denoiser)",
                       description="Train the CytoDiffusion-style teacher on a folder of class folders. The images are "
                       "preprocessed once into a crop cache; training checkpoints every --ckpt-every steps and resumes "
                       "from <run-dir>/ckpt.pt when run again with the same settings. Writes <run-dir>/teacher.safetensors "
                       "(fp16 EMA weights) and teacher.json. Needs the 'export' extra (torch, diffusers).")
    p.add_argument("--data", help="labelled folder (PBC layout); builds the crop cache if it does not exist")
    p.add_argument("--config", help="TOML file with TrainConfig keys (CLI options override it)")
    p.add_argument("--cache", help="crop cache .npz (default runs/cache/pbc64.npz)")
    p.add_argument("--run-dir", help="output / resume folder (default runs/teacher)")
    p.add_argument("--steps", type=int, help="denoiser steps (default 40000)")
    p.add_argument("--batch", type=int, help="batch size (default 64)")
    p.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    p.add_argument("--ckpt-every", type=int, help="checkpoint period in steps (default 500)")
    p.add_argument("--max-minutes", type=float, help="stop after this wall-clock budget (resumable); 0 = no limit")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2; 1 when other work shares the CPU)")
    p.add_argument("--seed", type=int, help="seed of the split and the sampler (default 0)")
    p.add_argument("--lr-decay-steps", type=int, help="anneal lr (cosine, to 5%%) over the last N steps (default 0: constant)")
    p.add_argument("--stain-jitter", type=float, help="per-cell stain, saturation and white-balance jitter strength, "
                   "for other labs' staining and microscopes (e.g. 0.05; default 0: off)")
    p.add_argument("--exclude-classes", type=lambda v: tuple(c for c in v.split(",") if c), metavar="A,B",
                   help="leave these classes out of training, e.g. erythroblast for the leave-one-class-out anomaly check")
    p.add_argument("--init-from", metavar="DIR", help="start a new run from the teacher in DIR (a bundle or run folder: "
                   "teacher.safetensors + teacher.json), e.g. for another lr cycle when only the shipped weights are at hand; "
                   "ignored when the run folder already has a checkpoint")
    p.add_argument("--blur-prob", type=float, help="fraction of training cells blurred by 0.3-1.2 px (default 0)")
    p.epilog = ("The classifier's timestep range can get a larger share of training with t_focus = [100, 500] and "
                "t_focus_frac = 0.5 in the --config TOML.")
    p.set_defaults(func=run)


def run(args) -> int:
    from edge.config import config_from_args
    from export.datasets import build_crop_cache, load_labelled_folder
    from export.train import TrainConfig, train

    cfg = config_from_args(TrainConfig, args)
    if args.data and not Path(cfg.cache).exists():
        build_crop_cache(load_labelled_folder(args.data), cfg.cache)
    run_dir = train(cfg)
    print(f"teacher written to {run_dir / 'teacher.safetensors'}")
    return 0
