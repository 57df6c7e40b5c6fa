"""The published numbers a comparison is read against: ImageNet ResNet-18 top-1 of every method in the LSQ paper's
Table 1, and a side-by-side table of ours and theirs for ``quantbench report``.

Source for every number: Esser et al., "Learned step size quantization", ICLR 2020, Table 1, ResNet-18 rows, top-1
(%) at 2/3/4/8 bits (``../shared/papers/lsq-esser-2020.txt``; the zoo note ``quantizers-zoo.md`` quotes the FAQ,
LQ-Nets, NICE and Regularization rows from it). A method the table leaves blank at a precision has no entry.
"""

from __future__ import annotations

import pandas as pd

SOURCE = "Esser et al. 2020 (LSQ), Table 1: ImageNet, ResNet-18, top-1 %"
FULL_PRECISION_TOP1 = 70.5
#: quantbench quantizer -> (the method's name in Table 1, {bits: top-1})
PUBLISHED_TOP1: dict[str, tuple[str, dict[int, float]]] = {
    "lsq": ("LSQ", {2: 67.6, 3: 70.2, 4: 71.1, 8: 71.1}),
    "qil": ("QIL", {2: 65.7, 3: 69.2, 4: 70.1}),
    "faq": ("FAQ", {4: 69.8, 8: 70.0}),
    "lq_nets": ("LQ-Nets", {2: 64.9, 3: 68.2, 4: 69.3}),
    "pact": ("PACT", {2: 64.4, 3: 68.1, 4: 69.2}),
    "nice": ("NICE", {3: 67.7, 4: 69.8}),
    "msqe_reg": ("Regularization", {2: 61.7, 4: 67.3, 8: 68.1}),
}


def published_markdown(results: pd.DataFrame) -> str:
    """Rows: every Table 1 method in the results (one per option variant); columns per bit width: our mean
    top-1 over seeds and the paper's, "-" where it published none. Empty when no Table 1 method ran."""
    quantized = results[results["quantizer"].isin(list(PUBLISHED_TOP1))]
    if quantized.empty:
        return ""
    bits = sorted(int(b) for b in quantized["bits"].unique())
    lines = ["| method | " + " | ".join(f"{b}-bit ours | {b}-bit paper" for b in bits) + " |",
             "|---|" + "---|---|" * len(bits)]
    for quantizer in PUBLISHED_TOP1:
        for variant, runs in quantized[quantized["quantizer"] == quantizer].groupby("variant", sort=False):
            lines.append(_row(quantizer, str(variant), runs, bits))
    fp = results[results["quantizer"] == "fp"]["top1"]
    ours_fp = f"{fp.mean():.2f}" if not fp.empty else "n/a"
    lines += ["", f"Full precision: ours {ours_fp}, paper {FULL_PRECISION_TOP1}. Ours: mean top-1 over seeds of this "
              f"comparison; paper: {SOURCE} (each method's own recipe). Read orderings and gaps, not values, when "
              "this comparison did not run ImageNet ResNet-18 for 90 epochs."]
    return "\n".join(lines)


def _row(quantizer: str, variant: str, runs: pd.DataFrame, bits: list[int]) -> str:
    name, paper = PUBLISHED_TOP1[quantizer]
    cells = []
    for b in bits:
        ours = runs[runs["bits"] == b]["top1"]
        cells.append(f"{ours.mean():.2f}" if not ours.empty else "")
        cells.append(f"{paper[b]:.1f}" if b in paper else "-")
    label = f"{name} (`{quantizer}`{', ' + variant if variant else ''})"
    return f"| {label} | " + " | ".join(cells) + " |"
