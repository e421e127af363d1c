"""The one table of the fine-tuning run: v2 and every fine-tuned candidate through the same harness,
checked against the targets of the issue "fine-tune v3", and the best candidate.

    python scripts/finetune_report.py RESULTS_DIR [--out docs/results/v3/finetune]   # table .md/.json, plot .png
    python scripts/finetune_report.py RESULTS_DIR --best-only                        # prints the best name

RESULTS_DIR holds wikitext-NAME.json (benchmarks/quality.py), hotpotqa-NAME.json and squad-NAME.json
(benchmarks/qa_quality.py) for NAME = v2 and each candidate (scripts/finetune_gpu_run.sh writes them).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

COMPOSED = ("picaso-s", "picaso-r")
METHODS = ("none", "concat", "concat-shuffled", "soup", "caso", "picaso-s", "picaso-r")


def load(results: Path, name: str) -> dict | None:
    out = {}
    for dataset in ("wikitext", "hotpotqa", "squad"):
        f = results / f"{dataset}-{name}.json"
        if not f.exists():
            return None if dataset != "squad" else out  # SQuAD is reported, not a target
        out[dataset] = json.loads(f.read_text())
    return out


def nll(run: dict, dataset: str, k: int, method: str) -> float:
    key = "nll" if dataset == "wikitext" else "answer_nll"
    try:
        return run[dataset]["results"][str(k)][method][key]
    except KeyError:
        return math.nan


def check(run: dict, base: dict) -> list[tuple[str, bool, str]]:
    """(target, met, the figures) for every target of the issue."""
    rows = []
    for dataset, ks in (("wikitext", (5, 10)), ("hotpotqa", (10,))):
        for k in ks:
            own, before = nll(run, dataset, k, "concat"), nll(base, dataset, k, "concat")
            for m in COMPOSED:
                v = nll(run, dataset, k, m)
                rows.append((f"{dataset} k={k} {m} <= own concat and <= v2 concat", v <= own and v <= before,
                             f"{v:.4f} vs {own:.4f} / {before:.4f}"))
            rows.append((f"{dataset} k={k} concat <= v2 concat + 0.02", own <= before + 0.02, f"{own:.4f} vs {before:.4f}"))
        v, b = nll(run, dataset, 0, "none"), nll(base, dataset, 0, "none")
        rows.append((f"{dataset} no context within 1% of v2", abs(v - b) <= 0.01 * b, f"{v:.4f} vs {b:.4f}"))
    ppl, b = run["wikitext"]["wikitext2_test_lm"]["perplexity"], base["wikitext"]["wikitext2_test_lm"]["perplexity"]
    rows.append(("WikiText perplexity within 1% of v2", abs(ppl - b) <= 0.01 * b, f"{ppl:.2f} vs {b:.2f}"))
    return rows


def score(run: dict) -> float:
    """Mean PICASO-S/R NLL over the target rows (lower is better)."""
    vals = [nll(run, d, k, m) for d, k in (("wikitext", 5), ("wikitext", 10), ("hotpotqa", 10)) for m in COMPOSED]
    return sum(vals) / len(vals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--best-only", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="output prefix: .json, .md, .png")
    args = parser.parse_args()

    base = load(args.results, "v2")
    if base is None:
        raise SystemExit(f"no v2 results in {args.results}")
    names = sorted({f.stem.split("-", 1)[1] for f in args.results.glob("wikitext-*.json")} - {"v2"})
    runs = {n: r for n in names if (r := load(args.results, n)) is not None}
    checks = {n: check(r, base) for n, r in runs.items()}
    # the best: most targets met, then the lowest composed NLL
    ranked = sorted(runs, key=lambda n: (-sum(ok for _, ok, _ in checks[n]), score(runs[n])))
    best = ranked[0] if ranked else ""
    if args.best_only:
        print(best)
        return

    device = (args.results / "device.txt").read_text().strip() if (args.results / "device.txt").exists() else "?"
    lines = [f"Device: {device}. NLL in nats/token (WikiText: continuation tokens 1..127; HotpotQA and SQuAD: answer tokens).", "",
             "| model | WikiText ppl | " + " | ".join(f"WikiText k={k} {m}" for k in (0, 5, 10) for m in METHODS
                                                      if (k == 0) == (m == "none")) +
             " | " + " | ".join(f"HotpotQA k={k} {m}" for k in (0, 10) for m in METHODS if (k == 0) == (m == "none")) +
             " | " + " | ".join(f"SQuAD k={k} {m}" for k in (0, 5) for m in ("none", "concat", "picaso-s") if (k == 0) == (m == "none")) + " |"]
    lines.append("| --- " * (lines[-1].count("|") - 1) + "|")
    table = {}
    for n in ["v2", *ranked]:
        r = base if n == "v2" else runs[n]
        cells = [f"{r['wikitext']['wikitext2_test_lm']['perplexity']:.2f}"]
        cells += [f"{nll(r, 'wikitext', k, m):.4f}" for k in (0, 5, 10) for m in METHODS if (k == 0) == (m == "none")]
        cells += [f"{nll(r, 'hotpotqa', k, m):.4f}" for k in (0, 10) for m in METHODS if (k == 0) == (m == "none")]
        cells += [f"{nll(r, 'squad', k, m):.4f}" for k in (0, 5) for m in ("none", "concat", "picaso-s") if (k == 0) == (m == "none")]
        lines.append(f"| {'**' + n + '**' if n == best else n} | " + " | ".join(cells) + " |")
        table[n] = r
    lines += ["", f"Best: **{best}** (most targets met, then the lowest mean PICASO-S/R NLL over WikiText k=5, 10 and HotpotQA k=10).", ""]
    for n in ranked:
        met = sum(ok for _, ok, _ in checks[n])
        lines.append(f"### {n}: {met} of {len(checks[n])} targets met")
        lines += [f"- {'met' if ok else 'MISSED'}: {what} ({figs})" for what, ok, figs in checks[n]]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text + "\n")
        summary = {"device": device, "best": best, "candidates": ranked,
                   "checks": {n: [{"target": w, "met": ok, "figures": f} for w, ok, f in c] for n, c in checks.items()},
                   "results": {n: {d: r[d]["results"] for d in r} | {"wikitext_lm": r["wikitext"]["wikitext2_test_lm"]}
                               for n, r in table.items()},
                   "commands": {n: {d: r[d].get("command") for d in r} for n, r in table.items()}}
        args.out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
        plot(table, args.out.with_suffix(".png"))


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("wikitext", 5), ("wikitext", 10), ("hotpotqa", 10), ("squad", 5)]
    methods = ("concat", "soup", "caso", "picaso-s", "picaso-r")
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), sharey=False)
    width = 0.8 / len(table)
    for ax, (dataset, k) in zip(axes, panels):
        for i, (n, r) in enumerate(table.items()):
            ax.bar([j + i * width for j in range(len(methods))], [nll(r, dataset, k, m) for m in methods], width, label=n)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(methods))], methods, rotation=30)
        vals = [nll(r, dataset, k, m) for r in table.values() for m in methods if not math.isnan(nll(r, dataset, k, m))]
        if vals:
            ax.set_ylim(min(vals) - 0.1, max(vals) + 0.05)
        ax.set_title(f"{dataset} k={k}")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("NLL (nats/token)")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
