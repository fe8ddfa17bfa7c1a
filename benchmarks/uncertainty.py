"""Uncertainty report: calibration, risk-controlled review and abnormal-cell flags, from saved engine outputs.

An accuracy report (nothing is timed). Reads one .npz of engine outputs:
    classes      str [K]
    cal_logits   float [N, K], cal_errors float [N, K], cal_anomaly float [N], cal_labels int [N]
                 (normal cells that neither training nor distillation saw: the calibration split)
    test_logits, test_errors, test_anomaly, test_labels   (held-out normal cells, same layout)
and, for each anomaly protocol P (e.g. "loco_erythroblast", "bccd"), abnormal (or shifted) cells:
    ood_P_anomaly [M] (required), ood_P_errors [M, K'], ood_P_logits [M, K']
    ood_P_normal_anomaly / ood_P_normal_errors: normal test cells scored by the same engine (default: the
        test split; give them when P used another engine, e.g. one trained without a class)
    ood_P_cal_anomaly / ood_P_cal_errors: normal calibration cells of that engine (default: the cal split)
    ood_P_errors_t, ood_P_normal_errors_t, ood_P_cal_errors_t [M, K', T] (optional, all three): the errors per
        class and timestep; adds the score timestep_profile, the error profile over all K' * T of them
Prints: ECE before/after temperature scaling (with --class-bias also one offset per class, BCTS; the other
variant's ECE and balanced accuracy alongside), coverage and error among accepted at alpha in {0.5, 1, 2, 5}%
(threshold fitted on the cal split by Learn then Test, measured on the test split), AURC, and for each
protocol the AUROC of every candidate anomaly score and its detection rate at the false-alarm threshold.
Writes uncertainty.json and PNGs (reliability, risk-coverage, anomaly histograms) into --out.

With --crossfit K the calibration may use the test split's cells too, as a bundle calibrated on cal + val
(`cytoedge calibrate --split cal,val`) does, and is still judged on held-out cells: the test split is cut into
K stratified folds; each fold is judged by a calibration fitted on the cal split plus the other K - 1 folds, and
the verdicts of all folds are pooled (ECE, coverage and error among accepted, the full decision). The anomaly
protocols keep the cal split alone.

    python benchmarks/uncertainty.py OUTPUTS.npz --out reports/uncertainty [--delta 0.1] [--false-alarm 0.02] [--crossfit 2]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from calibration.anomaly import (ANOMALY_SCORES, anomaly_scores, auroc, conformal_threshold,
                                 crossfit_profile_distance, fit_best_error_stats, fit_profile_stats, profile_distance,
                                 score_histograms)
from calibration.accuracy import accuracy_report
from calibration.fit import calibrated_probs, fit_calibration
from calibration.risk import aurc, ltt_threshold, plot_risk_coverage
from calibration.temperature import (expected_calibration_error, fit_bias_temperature, fit_temperature, nll,
                                     reliability_diagram, softmax)
from edge.backends import OUTPUTS
from edge.errors import CalibrationError
from edge.postprocess import decide

ALPHAS = (0.005, 0.01, 0.02, 0.05)
SUFFIXES = ("_normal_anomaly", "_normal_errors_t", "_normal_errors", "_cal_anomaly", "_cal_errors_t", "_cal_errors",
            "_anomaly", "_errors_t", "_errors", "_logits")


def protocols(data) -> dict[str, dict[str, np.ndarray]]:
    """{P: {"anomaly": ..., "errors": ..., "normal_anomaly": ..., ...}} from the ood_P_* arrays."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key in data.files:
        if key.startswith("ood_"):
            suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
            if suffix is not None:
                out.setdefault(key[4:-len(suffix)], {})[suffix[1:]] = data[key]
    return {name: arrays for name, arrays in sorted(out.items()) if "anomaly" in arrays}


def selective(cal_conf, cal_correct, test_conf, test_correct, alpha: float, delta: float) -> dict:
    """Learn-then-Test threshold on the cal split, applied to the test split."""
    try:
        rt = ltt_threshold(cal_conf, cal_correct, alpha, delta)
    except CalibrationError as exc:
        return {"alpha": alpha, "refused": str(exc)}
    if not np.isfinite(rt.threshold):
        return {"alpha": alpha, "refused": "no threshold certified: the most confident cells hold too many errors"}
    acc = test_conf >= rt.threshold
    return {"alpha": alpha, "threshold": rt.threshold, "cal_coverage": rt.coverage, "cal_risk": rt.risk,
            "test_coverage": float(acc.mean()), "test_n_accepted": int(acc.sum()),
            "test_risk": float((~test_correct[acc]).mean()) if acc.any() else 0.0}


def stratified_folds(labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Fold number int64 [N] in 0..k-1 of each cell: every class dealt round the folds in a seeded random order."""
    rng, fold = np.random.default_rng(seed), np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        fold[members] = (np.arange(len(members)) + rng.integers(k)) % k
    return fold


def crossfit(d, classes: list[str], k: int, delta: float, false_alarm: float, anomaly_score: str,
             class_bias: bool, seed: int = 0) -> dict:
    """Judge every test cell by a calibration fitted on the cal split plus the test folds it is not in (K
    stratified folds, seeded); pooled figures over the test split. See the module docstring."""
    yc, yt = d["cal_labels"].astype(np.int64), d["test_labels"].astype(np.int64)
    fold = stratified_folds(yt, k, seed)
    probs = np.zeros(d["test_logits"].shape)
    accept = {a: np.zeros(len(yt), bool) for a in ALPHAS}
    states = np.empty(len(yt), object)
    folds = []
    for f in range(k):
        held = fold == f
        fit = {key: np.concatenate([d[f"cal_{key}"], d[f"test_{key}"][~held]]) for key in OUTPUTS}
        y_fit = np.concatenate([yc, yt[~held]])
        calibration = fit_calibration(fit["logits"], fit["errors"], fit["anomaly"], y_fit, classes, delta=delta,
                                      false_alarm=false_alarm, anomaly_score=anomaly_score, class_bias=class_bias)
        probs[held] = calibrated_probs(d["test_logits"][held], calibration)
        pf = calibrated_probs(fit["logits"], calibration)
        for a in ALPHAS:
            try:
                thr = ltt_threshold(pf.max(1), pf.argmax(1) == y_fit, a, delta).threshold
            except CalibrationError:
                thr = np.inf
            accept[a][held] = probs[held].max(1) >= thr
        states[held] = [c.state for c in decide({key: d[f"test_{key}"][held] for key in OUTPUTS}, classes, calibration)]
        folds.append({"n_fit": len(y_fit), "n_test": int(held.sum()), "temperature": calibration["temperature"],
                      "review_threshold": calibration["review_threshold"],
                      "anomaly_threshold": calibration["anomaly_threshold"]})
    ok = probs.argmax(1) == yt
    risk = lambda m: float((~ok[m]).mean()) if m.any() else 0.0  # noqa: E731
    acc = states == "accepted"
    return {"folds": folds, "seed": seed, "test_accuracy": float(ok.mean()),
            "test_balanced_accuracy": accuracy_report(yt, probs.argmax(1), classes)["balanced_accuracy"],
            "test_ece_after": expected_calibration_error(probs, yt), "test_aurc": aurc(probs.max(1), ok),
            "selective": [{"alpha": a, "test_coverage": float(m.mean()), "test_n_accepted": int(m.sum()),
                           "test_risk": risk(m)} for a, m in accept.items()],
            "test_states": {s: float((states == s).mean()) for s in ("accepted", "review", "abnormal")},
            "test_error_among_accepted": risk(acc)}


def anomaly_protocol(name: str, p: dict, d, false_alarm: float, calibration: dict | None, classes, out: Path) -> dict:
    """AUROC and detection rate at the false-alarm threshold of every score available for protocol ``name``."""
    normal_a = p.get("normal_anomaly", d["test_anomaly"])
    normal_e = p.get("normal_errors", d["test_errors"] if "normal_anomaly" not in p else None)
    cal_a = p.get("cal_anomaly", d["cal_anomaly"])
    cal_e = p.get("cal_errors", d["cal_errors"] if "cal_anomaly" not in p else None)
    have_errors = "errors" in p and normal_e is not None and cal_e is not None
    stats = fit_best_error_stats(cal_e) if have_errors else None
    profile = fit_profile_stats(cal_e) if have_errors else None
    score = lambda e, a: anomaly_scores(e, a, stats, profile) if have_errors else {"engine": np.asarray(a, np.float64)}  # noqa: E731
    cal_s, norm_s, ood_s = score(cal_e, cal_a), score(normal_e, normal_a), score(p.get("errors"), p["anomaly"])
    if have_errors:  # as fit_calibration: the profile threshold from out-of-fold distances of the cal cells
        cal_s["error_profile"] = crossfit_profile_distance(cal_e)
    if have_errors and all(f"{k}errors_t" in p for k in ("", "normal_", "cal_")):
        # the profile over every (class, timestep) error [N, K*T] instead of the time-weighted class errors
        flat = {k: p[f"{k}errors_t"].reshape(len(p[f"{k}errors_t"]), -1) for k in ("", "normal_", "cal_")}
        timed = fit_profile_stats(cal_e, flat["cal_"])
        cal_s["timestep_profile"] = crossfit_profile_distance(cal_e, profile=flat["cal_"])
        norm_s["timestep_profile"] = profile_distance(normal_e, timed, flat["normal_"])
        ood_s["timestep_profile"] = profile_distance(p["errors"], timed, flat[""])
    res: dict = {"n_normal": len(normal_a), "n_abnormal": len(p["anomaly"]), "scores": {}}
    for s in ood_s:
        thr = conformal_threshold(cal_s[s], false_alarm)
        res["scores"][s] = {"auroc": auroc(norm_s[s], ood_s[s]), "threshold": thr,
                            "detection_rate": float((ood_s[s] >= thr).mean()),
                            "test_false_alarm": float((norm_s[s] >= thr).mean())}
        score_histograms(norm_s[s], {name: ood_s[s]}, out / f"anomaly_{name}_{s}.png", thr, title=f"{name}: {s}")
    if calibration is not None and "logits" in p and "errors" in p and p["logits"].shape[1] == len(classes):
        states = [c.state for c in decide({"logits": p["logits"], "errors": p["errors"], "anomaly": p["anomaly"]},
                                          classes, calibration)]
        res["states_with_shipped_calibration"] = {s: states.count(s) / len(states) for s in ("accepted", "review", "abnormal")}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("npz", help="engine outputs (see the module docstring for the arrays)")
    ap.add_argument("--out", required=True, help="folder for uncertainty.json and the PNGs")
    ap.add_argument("--delta", type=float, default=0.1, help="1 - confidence of the risk bound (default 0.1)")
    ap.add_argument("--false-alarm", type=float, default=0.02, help="false-alarm rate on normal cells (default 0.02)")
    ap.add_argument("--class-bias", action="store_true", help="calibrate with one offset per class too (BCTS), "
                    "as a bundle exported with class_bias = true")
    ap.add_argument("--teacher-val", help="the teacher's full labels on the test split (distill's teacher_val.npz): "
                    "adds the agreement of the engine's raw and calibrated labels with the teacher")
    ap.add_argument("--anomaly-score", default="engine", choices=ANOMALY_SCORES,
                    help="anomaly score of the full calibration (alpha 1%%) applied to the test split (default engine)")
    ap.add_argument("--crossfit", type=int, default=0, metavar="K",
                    help="also judge the test split by K-fold cross-fitting, each fold calibrated on the cal split plus "
                    "the other folds (as a bundle calibrated on cal + val); 0 = off (default)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = np.load(args.npz, allow_pickle=False)
    classes = [str(c) for c in d["classes"]]
    yc, yt = d["cal_labels"].astype(np.int64), d["test_labels"].astype(np.int64)

    # What the bundle ships: temperature scaling, or with --class-bias one offset per class too (BCTS); the other
    # one's ECE and balanced accuracy are reported alongside.
    bcts, t_only = fit_bias_temperature(d["cal_logits"], yc), (fit_temperature(d["cal_logits"], yc), np.zeros(len(classes)))
    (t, b), other = (bcts, t_only) if args.class_bias else (t_only, bcts)
    probs = lambda logits, tb: calibrated_probs(logits, {"temperature": tb[0], "class_bias": list(tb[1])})  # noqa: E731
    balanced = lambda p, y: accuracy_report(y, p.argmax(1), classes)["balanced_accuracy"]  # noqa: E731
    pc, pt0, pt1, pt_other = probs(d["cal_logits"], (t, b)), softmax(d["test_logits"]), probs(d["test_logits"], (t, b)), \
        probs(d["test_logits"], other)
    cal_conf, cal_ok = pc.max(1), pc.argmax(1) == yc
    conf, ok = pt1.max(1), pt1.argmax(1) == yt
    report: dict = {
        "n_cal": len(yc), "n_test": len(yt), "classes": classes, "temperature": t, "class_bias": b.tolist(),
        "test_accuracy": float(ok.mean()), "test_accuracy_raw": float((pt0.argmax(1) == yt).mean()),
        "test_balanced_accuracy": balanced(pt1, yt), "test_balanced_accuracy_raw": balanced(pt0, yt),
        "test_ece_before": expected_calibration_error(pt0, yt), "test_ece_after": expected_calibration_error(pt1, yt),
        "test_ece_other": expected_calibration_error(pt_other, yt), "test_balanced_accuracy_other": balanced(pt_other, yt),
        "test_nll_before": nll(d["test_logits"], yt), "test_nll_after": nll(np.asarray(d["test_logits"], np.float64) + b * t, yt, t),
        "test_aurc": aurc(conf, ok), "delta": args.delta, "false_alarm": args.false_alarm,
        "selective": [selective(cal_conf, cal_ok, conf, ok, a, args.delta) for a in ALPHAS],
    }
    if args.teacher_val:
        with np.load(args.teacher_val) as z:
            tl = z["label"]
        if len(tl) != len(yt):
            raise SystemExit(f"{args.teacher_val}: {len(tl)} teacher labels for {len(yt)} test cells")
        report["teacher_agreement_raw"] = float((pt0.argmax(1) == tl).mean())
        report["teacher_agreement"] = float((pt1.argmax(1) == tl).mean())
        report["teacher_accuracy"] = float((tl == yt).mean())
        report["teacher_balanced_accuracy"] = accuracy_report(yt, tl, classes)["balanced_accuracy"]
    reliability_diagram({"before": pt0, "after": pt1}, yt, out / "reliability.png", title=f"Test split, T={t:.2f}")
    marks = {f"alpha {100 * s['alpha']:g}%": (s["test_coverage"], s["test_risk"]) for s in report["selective"] if "threshold" in s}
    plot_risk_coverage(conf, ok, out / "risk_coverage.png", marks, title="Test split (calibrated confidence)")

    try:
        calibration = fit_calibration(d["cal_logits"], d["cal_errors"], d["cal_anomaly"], yc, classes,
                                      delta=args.delta, false_alarm=args.false_alarm, anomaly_score=args.anomaly_score,
                                      class_bias=args.class_bias)
        states = [c.state for c in decide({k: d[f"test_{k}"] for k in ("logits", "errors", "anomaly")}, classes, calibration)]
        acc = np.array([s == "accepted" for s in states])
        report["shipped_calibration"] = {
            "review_threshold": calibration["review_threshold"], "anomaly_threshold": calibration["anomaly_threshold"],
            "test_states": {s: states.count(s) / len(states) for s in ("accepted", "review", "abnormal")},
            "test_error_among_accepted": float((~ok[acc]).mean()) if acc.any() else 0.0}
    except CalibrationError as exc:
        calibration, report["shipped_calibration"] = None, {"refused": str(exc)}
    if args.crossfit:
        if args.crossfit < 2:
            raise SystemExit(f"--crossfit needs at least 2 folds, got {args.crossfit}")
        try:
            report["crossfit"] = crossfit(d, classes, args.crossfit, args.delta, args.false_alarm, args.anomaly_score,
                                          args.class_bias)
        except CalibrationError as exc:
            report["crossfit"] = {"refused": str(exc)}
    report["anomaly"] = {name: anomaly_protocol(name, p, d, args.false_alarm, calibration, classes, out)
                         for name, p in protocols(d).items()}
    (out / "uncertainty.json").write_text(json.dumps(report, indent=2, allow_nan=False))

    print(f"cells: cal {len(yc)}, test {len(yt)}; test accuracy {100 * report['test_accuracy_raw']:.2f}% raw, "
          f"{100 * report['test_accuracy']:.2f}% calibrated (balanced {100 * report['test_balanced_accuracy_raw']:.2f}"
          f" -> {100 * report['test_balanced_accuracy']:.2f}%); temperature {t:.3f}, offsets {np.round(b, 2).tolist()}")
    if "teacher_agreement" in report:
        print(f"agreement with the teacher's labels: {100 * report['teacher_agreement_raw']:.2f}% raw, "
              f"{100 * report['teacher_agreement']:.2f}% calibrated (teacher accuracy {100 * report['teacher_accuracy']:.2f}%, "
              f"balanced {100 * report['teacher_balanced_accuracy']:.2f}%)")
    print(f"ECE (15 bins) on test: {100 * report['test_ece_before']:.2f}% before, {100 * report['test_ece_after']:.2f}% after "
          f"({100 * report['test_ece_other']:.2f}% {'with the temperature alone' if args.class_bias else 'with class offsets'}, "
          f"balanced accuracy {100 * report['test_balanced_accuracy_other']:.2f}%); "
          f"NLL {report['test_nll_before']:.4f} -> {report['test_nll_after']:.4f} nats; AURC {100 * report['test_aurc']:.3f}%")
    print(f"\n{'alpha':>7} {'threshold':>10} {'coverage':>9} {'error':>7}   (bound holds with prob {1 - args.delta:g}; test split)")
    for s in report["selective"]:
        if "refused" in s:
            print(f"{100 * s['alpha']:6.1f}%  refused: {s['refused']}")
        else:
            print(f"{100 * s['alpha']:6.1f}% {s['threshold']:10.6f} {100 * s['test_coverage']:8.2f}% {100 * s['test_risk']:6.2f}%")
    sc = report["shipped_calibration"]
    print(f"\nfull calibration (alpha 1%, {args.anomaly_score}): " + (sc["refused"] if "refused" in sc else
          ", ".join(f"{k} {100 * v:.1f}%" for k, v in sc["test_states"].items()) +
          f"; error among accepted {100 * sc['test_error_among_accepted']:.2f}%"))
    cf = report.get("crossfit")
    if cf and "refused" in cf:
        print(f"\ncross-fitted: refused: {cf['refused']}")
    elif cf:
        print(f"\ncross-fitted, {args.crossfit} folds (each test fold calibrated on "
              f"{', '.join(str(f['n_fit']) for f in cf['folds'])} cal + other-fold cells): accuracy "
              f"{100 * cf['test_accuracy']:.2f}%, ECE {100 * cf['test_ece_after']:.2f}%, AURC {100 * cf['test_aurc']:.3f}%")
        print("  " + "; ".join(f"alpha {100 * s['alpha']:g}%: coverage {100 * s['test_coverage']:.2f}%, "
                               f"error {100 * s['test_risk']:.2f}%" for s in cf["selective"]))
        print("  full calibration: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in cf["test_states"].items()) +
              f"; error among accepted {100 * cf['test_error_among_accepted']:.2f}%")
    for name, r in report["anomaly"].items():
        print(f"\nanomaly protocol {name}: {r['n_abnormal']} abnormal vs {r['n_normal']} normal cells")
        print(f"  {'score':>16} {'AUROC':>7} {'detected':>9} {'false alarm':>12}   (threshold at {100 * args.false_alarm:g}% on cal)")
        for s, v in r["scores"].items():
            print(f"  {s:>16} {v['auroc']:7.4f} {100 * v['detection_rate']:8.1f}% {100 * v['test_false_alarm']:11.2f}%")
        if "states_with_shipped_calibration" in r:
            print("  with the full calibration: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in r["states_with_shipped_calibration"].items()))
    print(f"\nwrote {out / 'uncertainty.json'} and PNGs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
