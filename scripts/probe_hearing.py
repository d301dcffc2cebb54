"""Where does an attribute get lost between the audio and the answer? Three measurements per
attribute (gender, pitch, speed, volume, noise), side by side:

1. encoder: a linear probe (multinomial logistic regression on mean-pooled states, fitted on the
   train clips, scored on held-out and real clips) on each tapped Whisper layer: is the fact in the
   features the adapter reads?
2. adapter: the same probe on the trained adapter's output (the embeddings the LLM reads), and how
   alike those outputs are across clips (mean cosine of pooled outputs; the across-clip spread
   relative to their mean): does the adapter pass the fact on, or emit one constant prefix?
3. model: the checkpoint's accuracy by likelihood (`speechllm.eval.likelihood`): for each clip, the
   attribute's question with each value's short answer ("The speaker is male.") as the target; the
   value whose answer has the lowest loss wins. No decoding, so the phrasing of a generated answer
   cannot hide what it knows.

    python scripts/probe_hearing.py --checkpoint runs/demo/runs/self-output \\
        --train runs/demo/data/train.metadata.jsonl --test runs/demo/data/test.metadata.jsonl \\
        --real runs/demo/data/real.metadata.jsonl

Audio paths in a metadata file are read relative to the file's folder. Chance is 1/number of
values; the majority-class rate of each split is printed beside it.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import torch
import torch.nn.functional as F

from speechllm.eval.items import read_metadata
from speechllm.eval.likelihood import accuracy_by_likelihood, clip_states
from speechllm.labels import ATTRIBUTES
from speechllm.model.speechllm import SpeechLLM

PROBE_STEPS = 200
"""L-BFGS iterations of the linear probe."""
PROBE_L2 = 1e-3
"""Weight decay of the linear probe (features are standardized with the train split's statistics)."""


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression; x: (clips, features), y: (clips,) class indices."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_STEPS, line_search_fn="strong_wolfe")
    xs = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(xs), y) + PROBE_L2 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear, mu, sd


def probe_accuracy(train: tuple[torch.Tensor, torch.Tensor], others: dict, classes: int) -> dict[str, float]:
    linear, mu, sd = fit_probe(*train, classes)
    with torch.no_grad():
        return {name: float((linear((x - mu) / sd).argmax(-1) == y).float().mean()) for name, (x, y) in others.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a trained speech model folder (speechllm train --out)")
    p.add_argument("--train", required=True, type=Path, help="metadata.jsonl the probes are fitted on")
    p.add_argument("--test", required=True, type=Path, help="held-out metadata.jsonl")
    p.add_argument("--real", type=Path, help="another held-out metadata.jsonl, e.g. real recordings")
    p.add_argument("--attributes", default="gender,pitch,speed,volume,noise", help="comma-separated attributes")
    p.add_argument("--max-clips", type=int, default=96, help="clips per split at most (default 96)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    args = p.parse_args()
    try:
        torch.device(args.device)
    except RuntimeError as err:
        p.error(f"--device {args.device!r}: {err}")
    if args.threads:
        torch.set_num_threads(args.threads)

    model = SpeechLLM.from_pretrained(args.checkpoint, device=args.device).eval()
    splits = {"train": args.train, "test": args.test, **({"real": args.real} if args.real else {})}
    records = {name: read_metadata(path)[: args.max_clips] for name, path in splits.items()}
    taps: dict[str, list[torch.Tensor]] = {}
    adapted: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, list[torch.Tensor]]] = {}
    with torch.no_grad():
        for name, recs in records.items():
            pooled_taps, pooled_out, states[name] = [], [], {}
            for r in recs:
                clip = clip_states(model, splits[name].parent / r.audio)
                states[name][r.id] = clip
                pooled_taps.append(torch.stack([s.float().mean(0).cpu() for s in clip]))  # probes: fp32, CPU
                emb, _ = model.adapt_states([clip])
                pooled_out.append(emb[0].float().cpu())
            taps[name] = torch.stack(pooled_taps)  # (clips, taps, width)
            if len({o.shape for o in pooled_out}) > 1:  # a frame-rate adapter (mlp): one mean position per clip
                pooled_out = [o.mean(0, keepdim=True) for o in pooled_out]
            adapted[name] = torch.stack(pooled_out)  # (clips, positions, llm_width)

    out = adapted["train"]
    pooled = F.normalize(out.mean(1), dim=-1)
    spread = (out.std(0).norm(dim=-1) / out.mean(0).norm(dim=-1)).mean()
    emb_norm = model.llm.get_input_embeddings().weight.norm(dim=-1).mean()
    print(f"adapter output on train clips: mean cosine between clips {float((pooled @ pooled.T).mean()):.5f}, "
          f"across-clip spread / mean {float(spread):.4f}, norm {float(out.norm(dim=-1).mean()):.1f} "
          f"(token embeddings {float(emb_norm):.1f})")

    for attr_name in [a.strip() for a in args.attributes.split(",") if a.strip()]:
        attr = ATTRIBUTES[attr_name]
        values = list(attr.values)
        ys = {name: [(i, values.index(r.value(attr_name).lower())) for i, r in enumerate(recs)
                     if r.value(attr_name) and r.value(attr_name).lower() in values]
              for name, recs in records.items()}
        print(f"\n== {attr_name} (chance {100 / len(values):.1f}%; majority "
              + ", ".join(f"{n} {100 * max(collections.Counter(v for _, v in y).values()) / len(y):.1f}%"
                          for n, y in ys.items() if y) + ")")
        if len({v for _, v in ys["train"]}) < 2:
            print("   the train split has one value only: no probe")
            continue

        def select(name, x):
            idx = [i for i, _ in ys[name]]
            return x[idx].flatten(1), torch.tensor([v for _, v in ys[name]])

        for t, layer in enumerate(model.encoder.layers):
            acc = probe_accuracy(select("train", taps["train"][:, t]),
                                 {n: select(n, taps[n][:, t]) for n in records if ys[n]}, len(values))
            print(f"   encoder layer {layer:>2} probe: " + ", ".join(f"{n} {100 * a:.1f}" for n, a in acc.items()))
        acc = probe_accuracy(select("train", adapted["train"].mean(1)),
                             {n: select(n, adapted[n].mean(1)) for n in records if ys[n]}, len(values))
        print("   adapter output probe:  " + ", ".join(f"{n} {100 * a:.1f}" for n, a in acc.items()))
        line = []
        for name, recs in records.items():
            if ys[name]:
                acc = accuracy_by_likelihood(model, recs, splits[name].parent, attr_name, states=states[name])
                line.append(f"{name} {100 * acc.accuracy:.1f}")
        print("   model, by likelihood:  " + ", ".join(line))


if __name__ == "__main__":
    main()
