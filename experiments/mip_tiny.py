"""MIP on fedsim's pre-trained tiny CLIP (32 px, embedded data): the numbers of the MIP issue.

Each update comes from the real client code (`fedsim.harness.Setting.observe_examples`, FedSGD,
no defense) on private images, the attack is built from the server's knowledge and scored by the
harness's Scorer; the attacker's decoders are trained on the public split only, so every image
scored here is one the decoders never saw. Parts (`--part`):

- recovery: labels and embeddings, batch 1, for coop, adapter, text-adapter, double-adapter
  (`--images`, default 100), and coop at batch 4 with distinct labels (`--batches`, default 20).
  Targets: labels 100 % at batch 1; >= 95 % of batch-4 coop batches exactly right; adapter
  cosine >= 0.999; coop cosine >= 0.99 and centred cosine >= 0.9 (the cross-image baseline,
  the centred cosine between different images' true embeddings, is printed next to it).
- images: digits, batch 1 (`--images`, default 20), coop and adapter: MIP against the ceiling
  (the same inversion from the true embedding) under each prior (`--priors`, default ridge conv tv), with
  `--iterations` refinement steps (0 = the decoder's output as is). Targets: MIP within 0.5 dB
  of the ceiling; learned prior: adapter >= 20 dB, SSIM >= 0.75, identifiability >= 80 %; coop
  >= 16 dB, SSIM >= 0.55.
- decoders: the ridge decoder's shift reach (0, 1, 2 pixels) by 5-fold cross-validation on the
  public split, next to the images part's test digits (decoder output from the true embedding).
- ablation: coop and adapter, digits, batch 1 (`--images`, default 8): full MIP (ridge prior,
  `--iterations` refinement steps) against MIP without label prediction (embedding and soft
  labels fitted jointly by cosine gradient matching through the exact model, then the same
  step 3) and MIP without inverse gradient estimation (end-to-end gradient matching on pixels
  through the whole model, Inverting Gradients' objective, from the public mean image, with
  MIP's labels and `--iterations` x 4 steps), each with its wall time. The priors' ablation is
  the images part.
- identifiability: batch-4 CoOp, distinct labels (`--batches`): is the true label set
  recognisable by its residual? Levenberg-Marquardt from the class-mean public embeddings of
  the true set, and of the set with its first label swapped for the next class. With
  `--enumerate`, every set of 4 distinct labels is fitted the same way and the true set's rank
  is reported. (The attack itself searches the label sets from better starts: `--part recovery`.)
- peft: the same images attacked under every PEFT method (coop, adapter, text-adapter,
  double-adapter, lora, vpt); lora (image tower) and vpt take MIP's gradient-matching route,
  `--iterations` steps; `--images` defaults to 8. (The prior ablation is the images part.)

Writes <out>/<part>.csv, grids (true images on top, reconstructions below) and prints medians.

    PYTHONPATH=. .venv/bin/python experiments/mip_tiny.py --part recovery --images 30 --batches 10 --out runs/mip
    PYTHONPATH=. .venv/bin/python experiments/mip_tiny.py --part images --iterations 100 --out runs/mip
    PYTHONPATH=. .venv/bin/python experiments/mip_tiny.py --part peft --iterations 100 --out runs/mip
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from attacks.mip import PRIORS
from fedsim.api import Observation, Reconstruction, observed
from fedsim.config import RunConfig
from fedsim.evaluate import embedding_similarity
from fedsim.harness import Setting, Truth
from fedsim.report import save_grid

TEXT_AND_HEAD = ("coop", "adapter", "text-adapter", "double-adapter")
ALL_PEFT = (*TEXT_AND_HEAD, "lora", "vpt")
DEFAULT_IMAGES = {"recovery": 100, "images": 20, "decoders": 20, "ablation": 8, "peft": 8}


def setting(peft: str, seed: int) -> Setting:
    """The pre-trained tiny CLIP under `peft` on digits, on CPU. `--seed` seeds the data, the
    model's initialisation and the attack alike, as it did before the run config split the seeds."""
    return Setting(RunConfig(peft=peft, dataset="digits", attack="mip", seed=seed, model_seed=seed,
                             attack_seed=seed), device="cpu")


def batches(data, n: int, batch: int, seed: int, distinct: bool):
    """n seeded batches of private images (indices), distinct labels when asked."""
    rng = np.random.default_rng(seed)
    labels = data.private.labels.numpy()
    for _ in range(n):
        if distinct:
            classes = rng.choice(np.unique(labels), size=batch, replace=False)
            yield np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])
        else:
            yield rng.choice(len(labels), size=batch, replace=False)


def observe(s: Setting, idx, client: int) -> tuple[Observation, Truth]:
    """What the server sees of a client holding these private images (chosen here, not the
    seeded batch), and the images apart, for scoring."""
    truth = Truth(s.data.private.images[idx], s.data.private.labels[idx])
    return s.observe_examples(truth.images, truth.labels, client=client), truth


def add_to_grid(grids: dict, name: str, truth: torch.Tensor, recon: torch.Tensor) -> None:
    pair = grids.setdefault(name, ([], []))
    pair[0].append(truth)
    pair[1].append(recon.detach())


def save_grids(out: Path, grids: dict, class_names) -> None:
    """One picture per grid: the true images on top, the reconstructions below, unlabelled."""
    for name, (truth, recon) in grids.items():
        unlabelled = torch.full((len(truth),), -1)
        save_grid(out / name, [(torch.cat(truth), unlabelled), (torch.cat(recon), unlabelled)], class_names)


def part_recovery(args, out: Path) -> pd.DataFrame:
    rows = []
    runs = [(p, 1, args.images, False) for p in TEXT_AND_HEAD] + [("coop", 4, args.batches, True)]
    for peft, batch, n, distinct in runs:
        s = setting(peft, args.seed)
        attack, task, params = s.attack(), s.task, s.task.trainable()
        centre = s.scorer().gallery_centre(1, params)
        start = time.perf_counter()
        for k, idx in enumerate(batches(s.data, n, batch, args.seed + batch, distinct)):
            obs, truth = observe(s, idx, k)
            t0 = time.perf_counter()
            recovered_labels, features, info = attack.recover_embeddings(obs, task)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                emb = task.embeddings(params, features=features)
                true = task.embeddings(params, truth.images)
            order = _match_embeddings(emb, true)
            sim = embedding_similarity(task, params, emb[order], truth.images, centre)
            labels = truth.labels.tolist()
            exact = sorted(recovered_labels.tolist()) == sorted(labels)
            rows.append({"peft": peft, "batch": batch, "index": k, "labels": labels,
                         "recovered": recovered_labels.tolist(), "labels_exact": exact, **sim,
                         "route": info["route"], "seconds": seconds})
            print(f"{peft} b{batch} #{k}: {labels} -> {recovered_labels.tolist()} "
                  f"cos {sim['emb_cos']:.4f} centred {sim['emb_cos_centred']:.3f} ({seconds:.2f}s)", flush=True)
        print(f"  {peft} b{batch}: {time.perf_counter() - start:.0f}s", flush=True)
        with torch.no_grad():  # the cross-image baseline: different images' centred cosine
            true = task.embeddings(params, s.data.private.images[:200])
            c = F.normalize(true - centre, dim=-1)
            off = (c @ c.T)[~torch.eye(len(c), dtype=torch.bool)]
        rows[-1]["baseline_centred"] = float(off.mean())
        pd.DataFrame(rows).to_csv(out / "recovery.csv", index=False)
    df = pd.DataFrame(rows)
    for (peft, batch), g in df.groupby(["peft", "batch"], sort=False):
        print(f"{peft:15s} batch {batch}: labels exactly right {g.labels_exact.mean():.1%} of {len(g)}; "
              f"emb cos median {g.emb_cos.median():.5f} (min {g.emb_cos.min():.4f}), centred median "
              f"{g.emb_cos_centred.median():.4f}; {g.seconds.median():.2f}s each")
    print(f"cross-image centred cosine baseline: {df.baseline_centred.dropna().iloc[0]:.3f}")
    return df


def _match_embeddings(recovered: torch.Tensor, true: torch.Tensor) -> np.ndarray:
    """order such that recovered[order[i]] pairs with true[i] (Hungarian on cosine)."""
    from scipy.optimize import linear_sum_assignment

    cost = -(F.normalize(true, dim=-1) @ F.normalize(recovered, dim=-1).T).numpy()
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def part_images(args, out: Path, pefts=("adapter", "coop")) -> pd.DataFrame:
    rows, grids = [], {}
    for peft in pefts:
        s = setting(peft, args.seed)
        scorer = s.scorer()
        for prior in args.priors:
            attack = s.attack(attack_iters=args.iterations, mip_prior=prior)
            for k, idx in enumerate(batches(s.data, args.images, 1, args.seed, False)):
                obs, truth = observe(s, idx, k)
                t0 = time.perf_counter()
                labels, features, _ = attack.recover_embeddings(obs, s.task)
                with torch.no_grad():
                    true_features = F.normalize(s.task.model.encode_image(truth.images), dim=-1)
                for source, f in (("mip", features), ("true z", true_features)):
                    recon, _ = attack.images_from(s.task, f)
                    metrics, _ = scorer.score(obs, Reconstruction(recon, labels), truth)
                    rows.append({"peft": peft, "prior": prior, "source": source, "index": k,
                                 "iterations": args.iterations, **metrics,
                                 "seconds": time.perf_counter() - t0})
                    add_to_grid(grids, f"grid_{peft}_{prior}_{source.replace(' ', '')}.png", truth.images, recon)
                print(f"{peft} {prior} #{k}: mip {rows[-2]['psnr']:.2f} dB / ceiling {rows[-1]['psnr']:.2f} dB",
                      flush=True)
            pd.DataFrame(rows).to_csv(out / "images.csv", index=False)
    save_grids(out, grids, s.knowledge.class_names)
    df = pd.DataFrame(rows)
    summary = df.groupby(["peft", "prior", "source"], sort=False)[["psnr", "ssim", "ident_pixel",
                                                                    "ident_feature"]].median()
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    summary.to_csv(out / "images_summary.csv")
    return df


def _without_label_prediction(task, params, target, public_mean, steps: int = 300):
    """Tower output and soft labels fitted jointly (no label read from the gradient)."""
    from torch.func import grad

    from attacks.objectives import cosine_distance
    from fedsim.task import second_order_attention

    z = public_mean.clone()[None].requires_grad_(True)
    logits = torch.zeros(1, task.num_classes, requires_grad=True)
    opt = torch.optim.Adam([z, logits], lr=0.01)
    with second_order_attention():
        for _ in range(steps):
            opt.zero_grad()
            g = grad(task.head_loss)(params, z, torch.softmax(logits, -1))
            cosine_distance(g, target).backward()
            opt.step()
    return logits.detach().argmax(-1), z.detach()


def _without_inverse_estimation(task, params, target, labels, start, steps: int, tv: float = 1e-2):
    """Pixels fitted end to end through the whole model (the text tower too, for coop)."""
    from attacks.objectives import cosine_distance
    from attacks.optim import UNIT_BOX, to_pixels
    from attacks.priors import total_variation

    units = ((start - 0.5) / 0.25).clone().requires_grad_(True)
    opt = torch.optim.Adam([units], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        g = task.functional_gradients(params, to_pixels(units), labels)
        (cosine_distance(g, target) + tv * total_variation(units)).backward()
        opt.step()
        with torch.no_grad():
            units.clamp_(*UNIT_BOX)
    return to_pixels(units.detach()).clamp(0, 1)


def part_ablation(args, out: Path) -> pd.DataFrame:
    rows, grids = [], {}
    for peft in ("coop", "adapter"):
        s = setting(peft, args.seed)
        task, scorer, public = s.task, s.scorer(), s.knowledge.public.images
        attack = s.attack(attack_iters=args.iterations)
        with torch.no_grad():
            public_mean = F.normalize(task.model.encode_image(public), dim=-1).mean(0)
        for k, idx in enumerate(batches(s.data, args.images, 1, args.seed, False)):
            obs, truth = observe(s, idx, k)
            target, params = observed(obs, task)
            variants = {}
            t0 = time.perf_counter()
            recon = attack.reconstruct(obs, task)
            variants["full"] = (recon.images, recon.labels, time.perf_counter() - t0)
            t0 = time.perf_counter()
            soft_labels, z = _without_label_prediction(task, params, target, public_mean)
            imgs, _ = attack.images_from(task, z)
            variants["no label prediction"] = (imgs, soft_labels, time.perf_counter() - t0)
            t0 = time.perf_counter()
            start = public.mean(0, keepdim=True)
            imgs = _without_inverse_estimation(task, params, target, recon.labels, start, 4 * args.iterations)
            variants["no inverse estimation"] = (imgs, recon.labels, time.perf_counter() - t0)
            for name, (imgs, labs, seconds) in variants.items():
                metrics, _ = scorer.score(obs, Reconstruction(imgs, labs), truth)  # image metrics only
                rows.append({"peft": peft, "variant": name, "index": k, **metrics, "seconds": seconds})
                add_to_grid(grids, f"grid_ablation_{peft}_{name.replace(' ', '_')}.png", truth.images, imgs)
            print(f"{peft} #{k}: " + ", ".join(f"{r['variant']} {r['psnr']:.2f} dB label {r['label_acc']:.0f}"
                                               for r in rows[-3:]), flush=True)
        pd.DataFrame(rows).to_csv(out / "ablation.csv", index=False)
    save_grids(out, grids, s.knowledge.class_names)
    df = pd.DataFrame(rows)
    summary = df.groupby(["peft", "variant"], sort=False)[["psnr", "ssim", "label_acc", "ident_feature",
                                                           "seconds"]].median()
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    summary.to_csv(out / "ablation_summary.csv")
    return df


def part_identifiability(args, out: Path) -> pd.DataFrame:
    from attacks.embeddings import flat_update
    from attacks.label_search import candidate_label_sets, fit_label_sets

    s = setting("coop", args.seed)
    task, attack, public_labels = s.task, s.attack(), s.knowledge.public.labels
    rows = []
    for k, idx in enumerate(batches(s.data, args.batches, 4, args.seed + 4, True)):
        obs, truth = observe(s, idx, k)
        labels = truth.labels
        update, params = observed(obs, task)
        state = attack.round_state(task, params, list(update))
        jac, public = state["jacobian"], state["public"].double()
        g = flat_update(update, list(update))
        means = torch.stack([F.normalize(public[public_labels == c].mean(0), dim=0)
                             for c in range(task.num_classes)])

        scale = task.model.clip.logit_scale.exp().double()

        def residuals(label_sets: torch.Tensor) -> torch.Tensor:
            """Relative residuals of LM from the class means of each set in `label_sets` [S, B]."""
            return fit_label_sets(jac, scale, g, label_sets, means[label_sets], steps=60)[0]

        swapped = labels.clone()
        swapped[0] = (swapped[0] + 1) % task.num_classes
        true, one_swapped = residuals(torch.stack([labels, swapped])).tolist()
        row = {"index": k, "labels": labels.tolist(), "true": true, "one swapped": one_swapped}
        if args.enumerate:
            every = candidate_label_sets(task.num_classes, len(labels), distinct=True)
            row["rank of true set"] = int((residuals(every) < true).sum())
        rows.append(row)
        print(f"#{k} {row['labels']}: residual true set {row['true']:.1e}, one swapped {row['one swapped']:.1e}"
              + (f", rank among all distinct sets {row['rank of true set']}" if args.enumerate else ""), flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "identifiability.csv", index=False)
    if args.enumerate:
        print(f"true set ranked first among all distinct sets in {(df['rank of true set'] == 0).sum()} of {len(df)}")
    print(f"true set below the swapped one in {(df['true'] < df['one swapped']).sum()} of {len(df)} batches; "
          f"median residual {df['true'].median():.1e} vs {df['one swapped'].median():.1e}")
    return df


def part_decoders(args, out: Path) -> pd.DataFrame:
    """The ridge decoder's shift reach, judged without the test digits: 5-fold cross-validation
    on the public split (median PSNR of held-out public digits), next to the test digits of the
    images part; both on the decoder's output from the true embedding, before refinement."""
    from attacks.decoders import fit_decoder, shifted

    s = setting("adapter", args.seed)
    encode, public = s.attack().encode(s.task), s.knowledge.public.images
    test = s.data.private.images[np.concatenate(list(batches(s.data, args.images, 1, args.seed, False)))]

    dim = encode(public[:1]).shape[-1]

    def median_psnr(train: torch.Tensor, held: torch.Tensor, reach: int) -> float:
        decoder = fit_decoder("ridge", encode, shifted(train, reach), dim)
        with torch.no_grad():
            mse = ((decoder(encode(held)) - held) ** 2).flatten(1).mean(1)
        return float(np.median(10 * np.log10(1 / mse.numpy())))  # torch's median is the lower middle

    order = torch.randperm(len(public), generator=torch.Generator().manual_seed(1))
    rows = []
    for reach in (0, 1, 2):
        folds = [median_psnr(public[np.setdiff1d(order, order[f::5])], public[order[f::5]], reach) for f in range(5)]
        rows.append({"reach": reach, "cv_psnr": float(np.mean(folds)), "test_psnr": median_psnr(public, test, reach)})
        print(f"ridge, shifts up to {reach} px: public 5-fold CV {rows[-1]['cv_psnr']:.2f} dB, "
              f"{len(test)} test digits {rows[-1]['test_psnr']:.2f} dB", flush=True)
    df = pd.DataFrame(rows)
    df.to_csv(out / "decoders.csv", index=False)
    return df


def part_peft(args, out: Path) -> pd.DataFrame:
    """The same private images attacked under every PEFT method, default MIP settings."""
    rows, grids = [], {}
    for peft in args.pefts:
        s = setting(peft, args.seed)
        attack, scorer = s.attack(attack_iters=args.iterations), s.scorer()
        for k, idx in enumerate(batches(s.data, args.images, 1, args.seed, False)):
            obs, truth = observe(s, idx, k)
            t0 = time.perf_counter()
            recon = attack.reconstruct(obs, s.task)
            metrics, _ = scorer.score(obs, recon, truth)
            rows.append({"peft": peft, "route": recon.extras.get("route"), "index": k, **metrics,
                         "seconds": time.perf_counter() - t0})
            add_to_grid(grids, f"grid_peft_{peft}.png", truth.images, recon.images)
            print(f"{peft} #{k}: {metrics['psnr']:.2f} dB, label {truth.labels.tolist()} -> {recon.labels.tolist()}",
                  flush=True)
        pd.DataFrame(rows).to_csv(out / "peft.csv", index=False)
    save_grids(out, grids, s.knowledge.class_names)
    df = pd.DataFrame(rows)
    print(df.groupby(["peft", "route"], sort=False)[["psnr", "ssim", "label_acc", "ident_feature", "seconds"]]
          .median().to_string(float_format=lambda v: f"{v:.3f}"))
    return df


PARTS = {"recovery": part_recovery, "images": part_images, "decoders": part_decoders, "ablation": part_ablation,
         "identifiability": part_identifiability, "peft": part_peft}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="recovery", choices=list(PARTS))
    parser.add_argument("--images", type=int, default=None,
                        help="default: " + ", ".join(f"{part} {n}" for part, n in DEFAULT_IMAGES.items()))
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--enumerate", action="store_true", help="identifiability part: rank every label set")
    parser.add_argument("--priors", nargs="+", default=list(PRIORS), choices=PRIORS, help="images part only")
    parser.add_argument("--pefts", nargs="+", default=list(ALL_PEFT), choices=ALL_PEFT, help="peft part only")
    parser.add_argument("--out", default="runs/mip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.images = args.images or DEFAULT_IMAGES.get(args.part)
    PARTS[args.part](args, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
