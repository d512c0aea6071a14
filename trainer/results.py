"""Result tables of a run: one row per (model, protocol), the papers' layout, CSV files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


CURVE = "_curve_ra_at_"


def curve_points(m: dict[str, float], protocol: str) -> list[tuple[float, float]]:
    """[(eps, accuracy %)] of one protocol's robustness curve, eps 0 = SA; [] without a curve."""
    prefix = protocol + CURVE
    points = sorted((float(k[len(prefix):]), 100 * v) for k, v in m.items() if k.startswith(prefix))
    return [(0.0, 100 * m[f"{protocol}_sa"])] + points if points else []


AA_AFTER_PREFIX = "aa_after_"


def _pct(m: dict[str, float], key: str) -> float | None:
    return 100 * m[key] if key in m else None


TRANSFER = "_on_"  # `<protocol>_on_<dataset>_...`: a head trained and tested on eval.data


def metric_prefixes(m: dict[str, float], protocols: list[str]) -> list[str]:
    """The protocols' key prefixes present in `m`: `slf` (in-domain), `slf_on_<dataset>` (transfer)."""
    out = []
    for p in protocols:
        out += [p] if f"{p}_sa" in m else []
        out += sorted(k[:-len("_sa")] for k in m if k.startswith(p + TRANSFER) and k.endswith("_sa")
                      and "_" not in k[len(p + TRANSFER):-len("_sa")])
    return out


def protocol_name(prefix: str) -> str:
    """`SLF`, or `SLF@<dataset>` under transfer."""
    base, _, data = prefix.partition(TRANSFER)
    return base.upper() + (f"@{data}" if data else "")


def shift_columns(m: dict[str, float], p: str) -> dict[str, Any]:
    """Corruption accuracies (C_mean, C_<name>, C_<name>_s<k>, C_n) and black-box ones (BB_*), in %."""
    cols: dict[str, Any] = {}
    for k, v in m.items():
        if k.startswith(f"{p}_c_") and k != f"{p}_c_n":
            cols["C_" + k[len(p) + 3:]] = 100 * v
    if f"{p}_c_n" in m:
        cols["C_n"] = int(m[f"{p}_c_n"])
    for key, col in (("bb_sa", "BB_SA"), ("bb_ra", "BB_RA"), ("bb_surrogate_ra", "BB_surrogate_RA")):
        if f"{p}_{key}" in m:
            cols[col] = 100 * m[f"{p}_{key}"]
    if f"{p}_bb_n" in m:
        cols["BB_n"] = int(m[f"{p}_bb_n"])
    return cols


def results_rows(evaluations: dict[str, dict[str, float]], protocols: list[str]) -> list[dict[str, Any]]:
    """One row per (model, protocol): SA / RA on the whole test split, then AutoAttack with SA / RA on
    its own images (AA_SA, AA_RA) and its robust accuracy after each attack, the robustness curve,
    corruptions and black-box, in %. Under transfer the protocol reads SLF@<dataset>."""
    rows = []
    for label, m in evaluations.items():
        for p in metric_prefixes(m, protocols):
            after = {f"AA_after_{k[len(p) + 1 + len(AA_AFTER_PREFIX):]}": 100 * v for k, v in m.items()
                     if k.startswith(f"{p}_{AA_AFTER_PREFIX}")}
            rows.append({"model": label, "protocol": protocol_name(p), "SA": 100 * m[f"{p}_sa"],
                         "RA_PGD": 100 * m[f"{p}_ra"], "n_test": int(m.get(f"{p}_n_test", 0)),
                         "AA": _pct(m, f"{p}_aa"), "AA_n": int(m[f"{p}_aa_n"]) if f"{p}_aa_n" in m else None,
                         "AA_SA": _pct(m, f"{p}_aa_sa"), "AA_RA_PGD": _pct(m, f"{p}_aa_ra"), **after,
                         **{f"curve_RA_at_{e:.6f}": a for e, a in curve_points(m, p)[1:]}, **shift_columns(m, p)})
    return rows


def shift_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One compact line per row with corruption or black-box numbers (the detail is in results.json/CSV)."""
    lines = []
    for r in rows:
        parts = []
        if "C_mean" in r:
            n_c = len({k.rsplit("_s", 1)[0] for k in r if k.startswith("C_") and k[-3:-1] == "_s"})
            parts.append(f"corruptions mean {r['C_mean']:.2f} ({n_c} corruptions, {r['C_n']} images per severity)")
        if "BB_RA" in r:
            parts.append(f"black-box RA {r['BB_RA']:.2f} on {r['BB_n']} images (clean {r['BB_SA']:.2f}; "
                         f"the surrogate white-box {r['BB_surrogate_RA']:.2f})")
        if parts:
            lines.append(f"{r['model']} {r['protocol']}: " + "; ".join(parts))
    return lines


def _cell(v: float | None, width: int) -> str:
    return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"


def aa_threat_model(ecfg: dict[str, Any]) -> str | None:
    """AutoAttack's norm and radius when they differ from the reporting PGD's (None: the same)."""
    aa, pgd = ecfg["autoattack"], ecfg["pgd"]
    eps = aa["eps"] if aa["eps"] is not None else pgd["eps"]
    if aa["norm"].lower() == pgd["norm"] and abs(eps - pgd["eps"]) < 1e-12:
        return None
    return f"{aa['norm']}, eps {eps:.4g}; the PGD: {pgd['norm']}, eps {pgd['eps']:.4g}"


def format_table(rows: list[dict[str, Any]], pgd_steps: int, aa_threat: str | None = None) -> str:
    """SA / RA on the whole test split; AutoAttack beside SA / RA on the images it attacked; `aa_threat`
    (aa_threat_model) names AutoAttack's threat model where it is not the PGD's."""
    ra = f"RA(PGD-{pgd_steps})"
    pw = max([10] + [len(r["protocol"]) + 2 for r in rows])
    head = f"{'model':<12}{'protocol':<{pw}}{'SA':>8}{ra:>12} |{'AA n':>6}{'SA':>8}{ra:>12}{'AA':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<12}{r['protocol']:<{pw}}{r['SA']:8.2f}{r['RA_PGD']:12.2f} |{(r['AA_n'] or 0):6d}"
                     f"{_cell(r.get('AA_SA'), 8)}{_cell(r.get('AA_RA_PGD'), 12)}{_cell(r['AA'], 8)}")
    n_test = {r["n_test"] for r in rows}
    lines.append(f"Left: the whole test split ({'/'.join(map(str, sorted(n_test)))} images). Right: the first AA n "
                 "test images,\nwhere AutoAttack ran, with SA and RA on those same images. All in %.")
    if aa_threat:
        lines.append(f"AA: AutoAttack's threat model is {aa_threat}.")
    return "\n".join(lines + shift_lines(rows))


def paper_rows(rows: list[dict[str, Any]], protocols: list[str]) -> list[dict[str, Any]]:
    """One row per model with SA / RA / AA per protocol (the papers' table layout)."""
    wide: dict[str, dict[str, Any]] = {}
    for r in rows:
        w = wide.setdefault(r["model"], {"model": r["model"]})
        p = r["protocol"]
        w[f"{p}_SA"], w[f"{p}_RA"], w[f"{p}_AA"] = r["SA"], r["RA_PGD"], r["AA"]
    names = list(dict.fromkeys(r["protocol"] for r in rows))  # SLF, ALF, ... (SLF@<dataset> under transfer)
    cols = ["model"] + [f"{p}_{m}" for p in names for m in ("SA", "RA", "AA")]
    return [{c: w.get(c) for c in cols} for w in wide.values()]


def format_paper_table(rows: list[dict[str, Any]], protocols: list[str], pgd_steps: int,
                       aa_threat: str | None = None) -> str:
    """Models as rows, protocols as column groups of SA / RA (PGD-n) / AA, in percent; `aa_threat`
    (e.g. "L2, eps 0.5") names AutoAttack's threat model where it is not the PGD's."""
    protocols = list(dict.fromkeys(r["protocol"] for r in rows))  # SLF, ALF, ... or SLF@<dataset>
    wide = paper_rows(rows, protocols)
    name_w = max([12] + [len(str(w["model"])) + 2 for w in wide])
    group_w = 3 * 8
    top = " " * name_w + "".join(f"{p:^{group_w}}|" for p in protocols)
    sub = f"{'model':<{name_w}}" + "".join(f"{'SA':>8}{'RA':>8}{'AA':>8}|" for _ in protocols)
    lines = [top, sub, "-" * len(sub)]
    for w in wide:
        cells = []
        for p in protocols:
            for m in ("SA", "RA", "AA"):
                v = w[f"{p}_{m}"]
                cells.append(f"{v:8.2f}" if v is not None else f"{'-':>8}")
            cells.append("|")
        lines.append(f"{str(w['model']):<{name_w}}" + "".join(cells))
    subset = sorted({r["AA_n"] for r in rows if r["AA_n"] and r["AA_n"] < r["n_test"]})
    what = f"AutoAttack ({aa_threat}) robust accuracy" if aa_threat else "AutoAttack robust accuracy"
    aa = (f"AA: {what} on the first {'/'.join(map(str, subset))} test images (SA and RA on "
          "those images: AA_SA, AA_RA_PGD in results.csv)" if subset else f"AA: {what}")
    lines.append(f"SA: clean accuracy, RA: PGD-{pgd_steps} robust accuracy (full test split), {aa}; all in %.")
    return "\n".join(lines + shift_lines(rows))


def plot_robustness_curve(out: Path, evaluations: dict[str, dict[str, float]], protocols: list[str],
                          norm: str) -> Path | None:
    """robustness_curve.png: PGD accuracy against eps, one line per (model, protocol)."""
    curves = {(label, p): curve_points(m, p) for label, m in evaluations.items() for p in metric_prefixes(m, protocols)}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (255.0, "eps (x/255, L-inf)") if norm == "linf" else (1.0, f"eps ({norm})")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for (label, p), pts in curves.items():
        ax.plot([e * scale for e, _ in pts], [a for _, a in pts], marker="o", label=f"{label} / {protocol_name(p)}")
    ax.set_xlabel(unit)
    ax.set_ylabel("accuracy under PGD (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Robustness curve (eps 0: clean accuracy)")
    ax.legend()
    fig.tight_layout()
    path = out / "robustness_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out: Path, results: dict[str, Any], cfg: dict[str, Any]) -> None:
    rows = results_rows(results["evaluations"], list(cfg["eval"]["protocols"]))
    results["table"] = rows
    curve = plot_robustness_curve(out, results["evaluations"], list(cfg["eval"]["protocols"]),
                                  cfg["eval"]["pgd"]["norm"])
    if curve is not None:
        results["figures"] = sorted({*results.get("figures", []), str(curve)})
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        fields = ["model", "protocol", "SA", "RA_PGD", "n_test", "AA", "AA_n", "AA_SA", "AA_RA_PGD"]
        w = csv.DictWriter(f, fieldnames=fields + sorted({k for r in rows for k in r} - set(fields)))
        w.writeheader()
        w.writerows(rows)
    # The same numbers in the papers' layout: one row per model, SA / RA / AA per protocol.
    wide = paper_rows(rows, list(cfg["eval"]["protocols"]))
    with open(out / "results_paper.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(wide[0]) if wide else ["model"])
        w.writeheader()
        w.writerows(wide)
