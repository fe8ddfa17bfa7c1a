"""``cytoedge distill``: distill the teacher to a few fixed timesteps (needs the export extra)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("distill", help="distill the teacher into a few-timestep student (the engine's denoiser)",
                       description="Compute the teacher's full diffusion classification of validation cells and of a "
                       "sample of training cells, search fixed timesteps and a noise seed for agreement with it, then "
                       "fine-tune a student denoiser so the engine's class errors match the teacher's (KL + denoising "
                       "loss), and last choose the dihedral view the engine turns cells by, for accuracy on the calibration split "
                       "(written to view.json; the export reads it). Every stage is cached in --run-dir and resumes. "
                       "Needs the 'export' extra.")
    p.add_argument("--config", help="TOML file with DistillConfig keys (CLI options override it)")
    p.add_argument("--teacher-dir", help="folder with teacher.safetensors, teacher.json, splits.npz (default runs/teacher)")
    p.add_argument("--run-dir", help="output / resume folder (default runs/student)")
    p.add_argument("--cache", help="crop cache .npz (default runs/cache/pbc64.npz)")
    p.add_argument("--n-timesteps", type=int, help="fixed timesteps (evaluations per cell = classes x this; default 2)")
    p.add_argument("--steps", type=int, help="fine-tuning steps (default 300)")
    p.add_argument("--max-minutes", type=float, help="stop fine-tuning after this budget (resumable)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default 2)")
    p.add_argument("--lr-decay-steps", type=int, help="anneal the lr (cosine, to 5%%) over the last N steps (default 0: constant)")
    p.add_argument("--target-cells", type=int, help="training cells with teacher targets (0 = all; default 1600)")
    p.add_argument("--target-seeds", type=_seeds, metavar="S,S,...", help="noise seeds of the teacher runs whose "
                   "class errors are averaged into each target (default 0: one run; e.g. 0,1 costs a second run)")
    p.add_argument("--jitter-copies", type=int, help="also distill on N perturbed copies of the target cells "
                   "(the teacher's own training augmentation), each classified by the teacher (default 0; each copy "
                   "costs a teacher run over the target cells)")
    p.add_argument("--target-sharpen", type=float, help="multiply the teacher's fitted logit scale by this in the KL "
                   "targets (default 1; > 1 sharpens them towards the teacher's label)")
    p.add_argument("--student-heads", action="store_true", default=None, help="a multi-head student: one "
                   "denoiser pass per timestep predicts every class (2 passes per cell instead of 16 at 8 classes x "
                   "2 timesteps); starts from the teacher's weights and imitates its denoiser first (--init-steps)")
    p.add_argument("--init-steps", type=int, help="imitation steps before the KL stage, for a narrow or multi-head "
                   "student (default 3000)")
    p.add_argument("--part", type=_part, metavar="I/N", help="only compute slice I of N (0-based) of the missing "
                   "teacher stages (validation, targets, jittered copies), then stop: run N of these at once (one per core, --threads 1), then distill "
                   "without --part")
    p.set_defaults(func=run)


def _part(text: str) -> tuple[int, int]:
    import argparse

    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part wants I/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text}: need 0 <= I < N")
    return i, n


def _seeds(text: str) -> tuple[int, ...]:
    import argparse

    try:
        seeds = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--target-seeds wants comma-separated integers, e.g. 0,1, got {text!r}") from None
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--target-seeds {text}: need distinct seeds >= 0")
    return seeds


def run(args) -> int:
    import json

    from edge.config import config_from_args
    from export.distill import DistillConfig, distill

    cfg = config_from_args(DistillConfig, args)
    out = distill(cfg, part=args.part)
    info = out / "distill.json"
    if args.part is None and info.exists() and json.loads(info.read_text())["steps"] == cfg.steps:
        print(info.read_text())
    elif args.part is None:
        print(f"stopped by --max-minutes before step {cfg.steps}; checkpoint in {out}: run the same command to resume")
    else:
        print(f"teacher stages, part {args.part[0]}/{args.part[1]}, saved in {out}")
    return 0
