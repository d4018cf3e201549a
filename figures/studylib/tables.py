"""The Markdown tables of a study's section of docs/results.md, and eX2L's default chosen on validation."""

from __future__ import annotations

import statistics
from typing import Any

from studylib.aggregate import Table
from studylib.regimes import Regime
from studylib.stats import mean_std, paired_difference


def ms(values: list[Any], pct: bool = True, digits: int = 1) -> str:
    """``mean ± std`` over seeds (percent by default); ``–`` where nothing was measured."""
    mean, sd, n = mean_std(values)
    if n == 0:
        return "–"
    f = 100.0 if pct else 1.0
    return f"{mean * f:.{digits}f} ± {sd * f:.{digits}f}"


def _pct(value: float) -> str:
    return "–" if value != value else f"{100 * value:.0f}"


def _mean(values: list[Any]) -> float:
    return mean_std(values)[0]


def is_ex2l(regime: Regime, method: str) -> bool:
    """Whether ``method`` trains eX2L on the data's own confounders (the candidates of the default and the
    outcome; variants on inferred confounders validate on inferred groups and get their own table)."""
    return "algorithm.name=ex2l" in regime.methods[method].overrides and method not in regime.confounders_from


def choose(table: Table, key: str, benches: tuple[str, ...] | None, regime: Regime) -> str | None:
    """The eX2L variant with the best mean ``key`` (a validation metric) over ``benches`` (default: all). For the
    training-distribution choice (``val_wga``) ties are broken as within a run: by the lower mean validation
    cross-entropy (``val_nll``, where recorded); remaining ties go to the variant listed first (the paper's own
    setting comes first)."""
    benches = tuple(regime.benchmarks) if benches is None else benches
    scores: dict[str, tuple[float, float]] = {}
    for m in regime.methods:
        if not is_ex2l(regime, m) or any(m not in regime.methods_of(b) for b in benches):
            continue
        per_bench = [_mean([r[key] for r in table.get(b, {}).get(m, [])]) for b in benches]
        nll = [_mean([r.get("val_nll") for r in table.get(b, {}).get(m, [])]) for b in benches]
        if all(v == v for v in per_bench):  # no NaN: every benchmark has runs
            tie = -statistics.fmean(nll) if key == "val_wga" and all(v == v for v in nll) else 0.0
            scores[m] = (statistics.fmean(per_bench), tie)
    return max(scores, key=lambda m: scores[m]) if scores else None


def _row(m: str, mdesc: str, recs: list[dict[str, Any]], tag: str) -> str:
    chance = _mean([r.get("m_chance") for r in recs])
    return (
        f"| `{m}`{tag}: {mdesc} | {len(recs)} | {ms([r['val_wga'] for r in recs])} "
        f"| {ms([r['test_aa'] for r in recs])} | **{ms([r['test_wga'] for r in recs])}** "
        f"| {ms([r.get('last_test_wga') for r in recs])} "
        f"| {ms([r['oracle_test_aa'] for r in recs])} | {ms([r['oracle_test_wga'] for r in recs])} "
        f"| {ms([r['train_zero_cam'] for r in recs])} | {ms([r.get('m_zero_cam_share') for r in recs])} "
        f"| {ms([r.get('m_cam_in_mask') for r in recs])} "
        f"| {ms([r.get('m_cam_overlap') for r in recs], pct=False, digits=2)} "
        f"| {ms([r.get('m_logit_leak') for r in recs])} ({_pct(chance)}) "
        f"| {ms([r.get('train_penalty') for r in recs], pct=False, digits=3)} |"
    )


_HEADER = ("| method | seeds | val WGA | test AA | test WGA | last epoch: test WGA | oracle: test AA "
           "| oracle: test WGA | zero label CAMs (train) | zero label CAMs (test) | CAM mass in object "
           "| label–confounder CAM overlap (test) | decision leak (chance) | penalty (train) |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def render(table: Table, regime: Regime) -> str:
    """The Markdown tables of one regime's section of docs/results.md."""
    lines: list[str] = []
    on = regime.choose_on
    val_choice, oracle_choice = choose(table, "val_wga", on, regime), choose(table, "oracle_val_wga", on, regime)
    big = tuple(b for b in regime.benchmarks if b.endswith("_big"))
    where = "the benchmarks" if on is None else ", ".join(on)
    lines.append(f"eX2L variant chosen on training-distribution validation (mean val WGA over {where}, "
                 f"ties broken by the lower mean val cross-entropy): **{val_choice}**; oracle choice (on "
                 f"`oracle_val`, test distribution, disjoint from test): **{oracle_choice}**.\n")
    big_val = None
    if big:
        big_val, big_oracle = choose(table, "val_wga", big, regime), choose(table, "oracle_val_wga", big, regime)
        lines.append(f"On the calibrated benchmarks alone: validation choice **{big_val}**, oracle choice "
                     f"**{big_oracle}**.\n")
    for b, bench in regime.benchmarks.items():
        rows = table.get(b, {})
        if not rows:
            continue
        lines.append(f"\n#### {b}: {bench.description}\n")
        lines.append(_HEADER)
        for m, method in regime.methods.items():
            recs = rows.get(m) if m in regime.methods_of(b) else None
            if recs:
                tag = " ← val choice" if m == (big_val if b in big else val_choice) else ""
                lines.append(_row(m, method.description, recs, tag))
        if regime.baselines:
            lines.append(paired_table(rows, regime))
            lines.append(selection_table(rows, regime))
        if any(m in rows for m in regime.confounders_from):
            lines.append(inferred_table(rows, regime))
    if regime.lambda_sweep:
        lines.append(mechanism_table(table, regime))
    return "\n".join(lines) + "\n"


def _by_seed(recs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {r["seed"]: r[key] for r in recs if r.get(key) is not None}


def paired_table(rows: dict[str, list[dict[str, Any]]], regime: Regime) -> str:
    """Each method against each baseline: mean paired difference (per seed, in points) with its 95 % bootstrap
    interval, for test AA, WGA and mean-group accuracy; ``*`` marks an interval that excludes 0."""
    cols = (("test_aa", "AA"), ("test_wga", "WGA"), ("test_mga", "mean-group acc."))
    head = ["method", "vs", "seeds"] + [f"Δ test {c} [95 % CI]" for _, c in cols] + ["seeds ahead (WGA)"]
    lines = ["\n" + "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = list(regime.baselines)
    for m in regime.methods:
        for base in regime.baselines:
            # each pair of baselines once (the later one against the earlier)
            if m == base or m not in rows or base not in rows or (m in order and order.index(m) < order.index(base)):
                continue
            cells = []
            for key, _ in cols:
                d = paired_difference(_by_seed(rows[m], key), _by_seed(rows[base], key))
                star = "*" if d.excludes_zero() else ""
                cells.append("–" if d.n == 0 else  # a record without the key (older runs: no mean-group acc.)
                             f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{star}")
            wga = paired_difference(_by_seed(rows[m], "test_wga"), _by_seed(rows[base], "test_wga"))
            lines.append(f"| `{m}` | `{base}` | {wga.n} | " + " | ".join(cells) + f" | {_pct(wga.wins)} % |")
    return "\n".join(lines)


def inferred_table(rows: dict[str, list[dict[str, Any]]], regime: Regime) -> str:
    """Per method trained on inferred confounders: the inference (k, ARI and NMI of the inferred against the true
    confounder on train, group ARI) and its test WGA against the same method on the true confounders (the method
    named without ``_inferred``) and against ERM, paired by seed, in points with 95 % bootstrap intervals."""
    lines = ["\n| method (inferred confounders) | seeds | k | ARI (train) | NMI (train) | group ARI (train) "
             "| test WGA | same method, true confounders, same seeds | Δ WGA vs true [95 % CI] "
             "| Δ WGA vs `erm` [95 % CI] |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in regime.confounders_from:
        recs = rows.get(m)
        if not recs:
            continue
        seeds = {r["seed"] for r in recs}  # the true-confounder twin on the same seeds (paired)
        true = [r for r in rows.get(m.removesuffix("_inferred"), []) if r["seed"] in seeds]
        cells = []
        for base in (true, rows.get("erm", [])):
            d = paired_difference(_by_seed(recs, "test_wga"), _by_seed(base, "test_wga")) if base else None
            cells.append("–" if d is None or d.n == 0 else
                         f"{100 * d.mean:+.1f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]{'*' if d.excludes_zero() else ''}")
        lines.append(f"| `{m}` | {len(recs)} | {ms([r.get('inferred_k') for r in recs], pct=False)} "
                     f"| {ms([r.get('inferred_ari') for r in recs], pct=False, digits=2)} "
                     f"| {ms([r.get('inferred_nmi') for r in recs], pct=False, digits=2)} "
                     f"| {ms([r.get('inferred_group_ari') for r in recs], pct=False, digits=2)} "
                     f"| **{ms([r['test_wga'] for r in recs])}** | {ms([r['test_wga'] for r in true])} "
                     f"| {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def selection_table(rows: dict[str, list[dict[str, Any]]], regime: Regime) -> str:
    """Per method, the epochs and test numbers each selection rule picks: validation WGA (ties: val CE), the
    worst-group validation cross-entropy, and the oracle (``oracle_val``)."""
    lines = ["\n| method | epoch: val WGA | epoch: worst-group val CE | epoch: oracle | test WGA: val WGA "
             "| test WGA: worst-group val CE | test WGA: oracle |", "|---|---|---|---|---|---|---|"]
    for m in regime.methods:
        recs = rows.get(m)
        if not recs:
            continue
        lines.append(
            f"| `{m}` | {ms([r['selected_epoch'] for r in recs], pct=False)} "
            f"| {ms([r.get('wgce_epoch') for r in recs], pct=False)} | {ms([r.get('oracle_epoch') for r in recs], pct=False)} "
            f"| {ms([r['test_wga'] for r in recs])} | {ms([r.get('wgce_test_wga') for r in recs])} "
            f"| {ms([r['oracle_test_wga'] for r in recs])} |"
        )
    return "\n".join(lines)


def mechanism_table(table: Table, regime: Regime) -> str:
    """Per λ of the paper's penalty (two backbones; λ = 0 is two-head ERM): does the penalty move what it claims
    to move? Label–confounder CAM overlap, decision-level leak, zero-CAM share and WGA, per benchmark."""
    lines = ["\n#### Mechanism: what λ moves (the paper's penalty, two backbones; λ = 0 is two-head ERM)\n",
             "| benchmark | λ | seeds | CAM overlap (test) | penalty (train) | decision leak | zero label CAMs (test) "
             "| CAM mass in object | test AA | test WGA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in regime.benchmarks:
        for m, lam in regime.lambda_sweep:
            recs = table.get(b, {}).get(m)
            if not recs:
                continue
            lines.append(
                f"| {b} | {lam:g} | {len(recs)} | {ms([r.get('m_cam_overlap') for r in recs], pct=False, digits=2)} "
                f"| {ms([r.get('train_penalty') for r in recs], pct=False, digits=3)} "
                f"| {ms([r.get('m_logit_leak') for r in recs])} | {ms([r.get('m_zero_cam_share') for r in recs])} "
                f"| {ms([r.get('m_cam_in_mask') for r in recs])} | {ms([r['test_aa'] for r in recs])} "
                f"| **{ms([r['test_wga'] for r in recs])}** |"
            )
    return "\n".join(lines)


def outcome(table: Table, regime: Regime, margin: float = 0.05) -> str:
    """The study's one-sentence answer: does any eX2L variant beat every baseline by ``margin`` test WGA with a
    paired interval that excludes 0?"""
    winners = []
    for b in regime.benchmarks:
        rows = table.get(b, {})
        for m in regime.methods_of(b):
            if not is_ex2l(regime, m) or m not in rows:
                continue
            ds = [paired_difference(_by_seed(rows[m], "test_wga"), _by_seed(rows[base], "test_wga"))
                  for base in regime.baselines if base in rows]
            if ds and all(d.mean >= margin and d.low > 0 for d in ds):
                winners.append(f"`{m}` on {b}")
    bases = " and ".join(f"`{x}`" for x in regime.baselines)
    if winners:
        return (f"{', '.join(winners)} beat{'s' if len(winners) == 1 else ''} {bases} by at least "
                f"{100 * margin:.0f} points of test WGA with a paired 95 % interval that excludes 0.")
    return (f"No eX2L variant beats {bases} by {100 * margin:.0f} points of test WGA with a paired 95 % interval "
            f"that excludes 0.")


def choose_default(tables: list[tuple[Table, Regime]], key: str = "val_wga") -> tuple[str | None, dict[str, Any]]:
    """eX2L's default across studies: the variant (by name) with the best mean ``key`` over every study's
    ``choose_on`` benchmarks, ties broken by the lower mean validation cross-entropy; only variants with runs on
    every one of those benchmarks compete, and only one-run settings: a method that starts from another run
    (``init_from``, e.g. Singh et al.'s form) is a two-step recipe with twice the training budget, which no single
    run can default to and which the tie-break's cross-entropy would reward for the extra training alone.
    Returns the choice and each candidate's (score, val CE, benchmarks)."""
    benches = [(t, r, b) for t, r in tables for b in (r.choose_on or tuple(r.benchmarks))]
    two_step = {m for _, r in tables for m in r.init_from}
    names = {m for _, r in tables for m in r.methods if is_ex2l(r, m) and m not in two_step}
    scores: dict[str, Any] = {}
    for m in sorted(names):
        per, nll = [], []
        for t, _r, b in benches:
            recs = t.get(b, {}).get(m, [])
            per.append(_mean([x[key] for x in recs]))
            nll.append(_mean([x.get("val_nll") for x in recs]))
        if all(v == v for v in per):
            scores[m] = {"score": statistics.fmean(per), "val_nll": statistics.fmean(nll) if all(v == v for v in nll)
                         else float("nan"), "benchmarks": [b for _, _, b in benches]}
    if not scores:
        return None, scores
    best = max(scores, key=lambda m: (scores[m]["score"], -scores[m]["val_nll"] if scores[m]["val_nll"] == scores[m]["val_nll"] else -float("inf")))
    return best, scores
