"""Result tables of a run: one row per (model, protocol), the papers' layout, CSV files."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def results_rows(evaluations: dict[str, dict[str, float]], protocols: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label, m in evaluations.items():
        for p in protocols:
            if f"{p}_sa" not in m:
                continue
            rows.append({"model": label, "protocol": p.upper(), "SA": 100 * m[f"{p}_sa"],
                         "RA_PGD": 100 * m[f"{p}_ra"],
                         "AA": 100 * m[f"{p}_aa"] if f"{p}_aa" in m else None,
                         "AA_n": int(m[f"{p}_aa_n"]) if f"{p}_aa_n" in m else None,
                         "n_test": int(m.get(f"{p}_n_test", 0))})
    return rows


def format_table(rows: list[dict[str, Any]], pgd_steps: int) -> str:
    head = f"{'model':<12}{'protocol':<10}{'SA':>8}{f'RA(PGD-{pgd_steps})':>14}{'AA':>8}{'AA n':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        aa = f"{r['AA']:8.2f}" if r["AA"] is not None else f"{'-':>8}"
        lines.append(f"{r['model']:<12}{r['protocol']:<10}{r['SA']:8.2f}{r['RA_PGD']:14.2f}{aa}"
                     f"{(r['AA_n'] or 0):7d}")
    return "\n".join(lines)


def paper_rows(rows: list[dict[str, Any]], protocols: list[str]) -> list[dict[str, Any]]:
    """One row per model with SA / RA / AA per protocol (the papers' table layout)."""
    wide: dict[str, dict[str, Any]] = {}
    for r in rows:
        w = wide.setdefault(r["model"], {"model": r["model"]})
        p = r["protocol"]
        w[f"{p}_SA"], w[f"{p}_RA"], w[f"{p}_AA"] = r["SA"], r["RA_PGD"], r["AA"]
    cols = ["model"] + [f"{p.upper()}_{m}" for p in protocols for m in ("SA", "RA", "AA")]
    return [{c: w.get(c) for c in cols} for w in wide.values()]


def format_paper_table(rows: list[dict[str, Any]], protocols: list[str], pgd_steps: int) -> str:
    """Models as rows, protocols as column groups of SA / RA (PGD-n) / AA, in percent."""
    protocols = [p for p in protocols if any(r["protocol"] == p.upper() for r in rows)]
    wide = paper_rows(rows, protocols)
    name_w = max([12] + [len(str(w["model"])) + 2 for w in wide])
    group_w = 3 * 8
    top = " " * name_w + "".join(f"{p.upper():^{group_w}}|" for p in protocols)
    sub = f"{'model':<{name_w}}" + "".join(f"{'SA':>8}{'RA':>8}{'AA':>8}|" for _ in protocols)
    lines = [top, sub, "-" * len(sub)]
    for w in wide:
        cells = []
        for p in protocols:
            for m in ("SA", "RA", "AA"):
                v = w[f"{p.upper()}_{m}"]
                cells.append(f"{v:8.2f}" if v is not None else f"{'-':>8}")
            cells.append("|")
        lines.append(f"{str(w['model']):<{name_w}}" + "".join(cells))
    lines.append(f"SA: clean accuracy, RA: PGD-{pgd_steps} robust accuracy (full test split), "
                 "AA: AutoAttack robust accuracy (subset, see AA_n in the CSV); all in %.")
    return "\n".join(lines)


def write_results(out: Path, results: dict[str, Any], cfg: dict[str, Any]) -> None:
    rows = results_rows(results["evaluations"], list(cfg["eval"]["protocols"]))
    results["table"] = rows
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "protocol", "SA", "RA_PGD", "AA", "AA_n", "n_test"])
        w.writeheader()
        w.writerows(rows)
    # The same numbers in the papers' layout: one row per model, SA / RA / AA per protocol.
    wide = paper_rows(rows, list(cfg["eval"]["protocols"]))
    with open(out / "results_paper.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(wide[0]) if wide else ["model"])
        w.writeheader()
        w.writerows(wide)
