"""Why PACT diverges with ``--bn fold`` (reports/bn-fold/README.md): follow each folded conv's BN scale
s_c = gamma_c / sqrt(running_var_c + eps) and how many output channels have *every* quantized folded weight on the
grid's smallest magnitude, over the first steps of a 2-bit fine-tune, for PACT (DoReFa weights: no zero level),
PACT with symmetric weights and LSQ.

    python experiments/bn_fold_probe.py --init-from reports/powered/fp/seed0 --steps 200 --out reports/bn-fold/probe

Writes probe.csv (one row per quantizer, step and folded layer) and prints the last step of each run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from quantbench.config import TrainConfig
from quantbench.data import create_dataset
from quantbench.qat_bnfold import ConvBn2d
from quantbench.training.run import build_model

VARIANTS = {"pact (DoReFa weights)": ("pact", {}), "pact (symmetric weights)": ("pact", {"weight_scheme": "symmetric"}),
            "lsq": ("lsq", {})}


def channel_state(layer: ConvBn2d) -> dict[str, float]:
    with torch.no_grad():
        scale = layer.fold_scale()
        weight, _ = layer.folded_parameters()
        quantized = layer.weight_quantizer(weight).flatten(1).abs()
        smallest = quantized[quantized > 0].min() if (quantized > 0).any() else torch.tensor(0.0)
        pinned = ((quantized - smallest).abs() <= 1e-6 * smallest.clamp_min(1e-12)).all(dim=1)
    return {"min_scale": float(scale.min()), "median_scale": float(scale.median()),
            "channels_all_on_smallest_level": int(pinned.sum()), "channels": int(scale.numel())}


def run(name: str, quantizer: str, options: dict, init_from: str, steps: int, seed: int) -> list[dict]:
    torch.manual_seed(seed)
    config = TrainConfig(dataset="fashion-mnist", model="small_cnn", quantizer=quantizer, bits=2, bn="fold",
                         init_from=init_from, quantizer_options=options, seed=seed, out="/tmp/unused")
    data = create_dataset("fashion-mnist")
    loader = torch.utils.data.DataLoader(data.train, batch_size=128, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    sample = next(iter(loader))[0]
    model, _ = build_model(config, data, sample)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.25e-4)
    rows = []
    batches = iter(loader)
    for step in range(steps):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == steps - 1:
            for layer_name, layer in model.named_modules():
                if isinstance(layer, ConvBn2d) and layer.weight_quantizer is not None:
                    rows.append({"method": name, "step": step, "loss": float(loss), "layer": layer_name,
                                 **channel_state(layer)})
        if not torch.isfinite(loss):
            break
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="reports/bn-fold/probe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [row for name, (quantizer, options) in VARIANTS.items()
            for row in run(name, quantizer, options, args.init_from, args.steps, args.seed)]
    frame = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "probe.csv", index=False)
    last = frame.groupby(["method", "layer"]).tail(1)
    print(last.to_string(index=False))


if __name__ == "__main__":
    main()
