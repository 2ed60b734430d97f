"""MIP's cost per iteration against a plain image-tower inversion step and end-to-end gradient
matching, on one CLIP with CoOp (default: ViT-B-32, random init, 224 px; `--model tiny-clip`
for the embedded one). All timings in one process, one thread, medians of `--repeats` runs:

- inversion step: one Adam step of 1 - cos(tower(x), z) (the plain image-encoder inversion);
- MIP iteration: one step of MIP's refinement (the same plus TV and the anchor term);
- end-to-end step: one step of cosine gradient matching through both towers (what DLG/IG pay
  per iteration on CoOp: a double backward through the text encoder);
- MIP's one-off costs: the text-side Jacobian (once per round, shared by all clients) and the
  embedding fit of one client.

`--equal-time N` then compares quality at equal wall time on the pre-trained tiny CLIP (CoOp,
N private digits, batch 1): the whole MIP attack (Jacobian charged to every image, as if each
were the round's only client; `--mip-iterations` refinement steps) against end-to-end DLG
(Zhu et al. 2019) given as many L-BFGS iterations as fit in MIP's time, and against Inverting
Gradients likewise.

`--device cuda` times on the GPU (each timing synchronises it), `--n-ctx` sets CoOp's context
vectors (4 by default, as in the README's figures) and `--json PATH` writes every figure printed.
On CPU the timings use one thread unless `--threads` says otherwise.

    PYTHONPATH=. .venv/bin/python benchmarks/mip_speed.py --model ViT-B-32
    PYTHONPATH=. .venv/bin/python benchmarks/mip_speed.py --model tiny-clip --skip-jacobian --equal-time 8
    PYTHONPATH=. .venv/bin/python benchmarks/mip_speed.py --device cuda --n-ctx 16 --json vit_ctx16.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attacks.embeddings import TextJacobian, text_side
from attacks.encoder_inversion import invert_tower
from attacks.objectives import cosine_distance
from fedsim.config import RunConfig
from fedsim.harness import Setting


def sync(device: str = "cpu") -> None:
    """Wait for the GPU's queued work, so that a wall-clock timing holds all of it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int, device: str = "cpu") -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tower_input(task) -> int | None:
    """The image tower's input size in pixels (open_clip resizes smaller images up to it)."""
    size = getattr(task.model.clip.visual, "image_size", None)
    return int(size[0]) if isinstance(size, (tuple, list)) else size


def write_json(path: str | None, figures: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=2, default=str))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-jacobian", action="store_true", help="skip the one-off Jacobian (slow on CPU)")
    parser.add_argument("--equal-time", type=int, default=0, metavar="N",
                        help="also compare MIP and DLG/IG at equal wall time on N tiny-CLIP digits")
    parser.add_argument("--mip-iterations", type=int, default=100)
    parser.add_argument("--n-ctx", type=int, default=4, help="CoOp's context vectors")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model and every timing run (cpu by default, like the README's figures)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (on CPU, 1 as in the README)")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    figures: dict = {"model": args.model, "peft": "coop", "n_ctx": args.n_ctx, "device": device,
                     "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__,
                     "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}
    if args.equal_time:
        figures["equal_time"] = equal_time(args.equal_time, args.mip_iterations, device)
        write_json(args.json, figures)
    setting = Setting(RunConfig(model=args.model, pretrained="none" if args.model != "tiny-clip" else "fedsim",
                                peft="coop", n_ctx=args.n_ctx, device=device), device=device)
    obs, truth = setting.observe(round_=1, client=0)  # one image: the default batch size is 1
    task = setting.task
    params = {n: p.to(device) for n, p in obs.global_params.items()}
    update = {n: g.to(device) for n, g in obs.update.items()}
    x, y = truth.images.to(device), truth.labels.to(device)
    with torch.no_grad():
        z = F.normalize(task.model.encode_image(x), dim=-1)
    start = x * 0 + 0.5

    plain = timed(lambda: invert_tower(task.model, z, start, 1, tv=0.0, anchor=0.0), args.repeats, device)
    mip = timed(lambda: invert_tower(task.model, z, start, 1), args.repeats, device)

    def end_to_end():
        dummy = start.clone().requires_grad_(True)
        loss = cosine_distance(task.gradients(params, dummy, y, create_graph=True), update)
        loss.backward()

    e2e = timed(end_to_end, args.repeats, device)
    figures.update(tower_input=tower_input(task), plain_inversion_step_s=plain, mip_iteration_s=mip,
                   mip_over_plain=mip / plain, end_to_end_step_s=e2e, end_to_end_over_plain=e2e / plain)
    threads = f"{args.threads} thread{'s' * (args.threads > 1)}" if device == "cpu" else figures["gpu"]
    print(f"{args.model} + CoOp ({args.n_ctx} context vectors), one image, {device} ({threads}):")
    print(f"  plain inversion step   {plain * 1000:8.1f} ms")
    print(f"  MIP iteration          {mip * 1000:8.1f} ms  ({mip / plain:.2f} x plain; target <= 1.2)")
    print(f"  end-to-end step        {e2e * 1000:8.1f} ms  ({e2e / plain:.1f} x plain)")
    if not args.skip_jacobian:
        sync(device)
        t0 = time.perf_counter()
        jac = TextJacobian(task, params, list(params))
        sync(device)
        t_jac = time.perf_counter() - t0
        with torch.no_grad():
            public = task.embeddings(params, setting.knowledge.public.images[:64].to(device))
        sync(device)
        t0 = time.perf_counter()
        labels, found, _ = text_side(task, params, update, 1, public, jacobian=jac)
        sync(device)
        t_fit = time.perf_counter() - t0
        cos = float(F.cosine_similarity(found, task.embeddings(params, x).detach()))
        figures.update(jacobian_s=t_jac, jacobian_shape=list(jac.matrix.shape), embedding_fit_s=t_fit,
                       label=labels.tolist(), true_label=y.tolist(), embedding_cosine=cos)
        print(f"  one-off: Jacobian {t_jac:.1f} s per round ({list(jac.matrix.shape)}); embedding fit "
              f"{t_fit:.1f} s per client (label {labels.tolist()} vs {y.tolist()}, cosine {cos:.4f}); = "
              f"{t_jac / e2e:.0f} + {t_fit / e2e:.0f} end-to-end steps")
    write_json(args.json, figures)


def equal_time(n: int, mip_iterations: int, device: str = "cpu") -> dict:
    """MIP against end-to-end attacks given the same wall time, image by image: the digits are
    the round-1 batches of n clients, each attacked and scored by the harness."""
    setting = Setting(RunConfig(model="tiny-clip", peft="coop", attack="mip", clients=n, device=device),
                      device=device)
    task, scorer = setting.task, setting.scorer()
    rows = []
    for i in range(n):
        obs, truth = setting.observe(round_=1, client=i)
        mip = setting.attack(attack_iters=mip_iterations)  # a fresh MIP: the Jacobian is charged to this image
        mip.decoder(task)  # trained once per tower and cached: not part of an attack's time
        sync(device)
        t0 = time.perf_counter()
        recon = mip.reconstruct(obs, task)  # returns CPU tensors: the GPU's work is done
        budget = time.perf_counter() - t0
        row = {"mip": scorer.score(obs, recon, truth)[0]["psnr"], "seconds": budget}
        for name in ("dlg", "ig"):  # each attack built outside its timing, as MIP is
            probe = setting.attack(attack=name, attack_iters=1)
            one = timed(lambda: probe.reconstruct(obs, task), 1, device)  # noqa: B023
            iterations = max(1, int(budget / one))
            attack = setting.attack(attack=name, attack_iters=iterations)
            t0 = time.perf_counter()
            other = attack.reconstruct(obs, task)
            row[f"{name}_iterations"], row[f"{name}_seconds"] = iterations, time.perf_counter() - t0
            row[name] = scorer.score(obs, other, truth)[0]["psnr"]  # scored after the clock stops
        rows.append(row)
        print(f"  #{i}: MIP {row['mip']:.2f} dB in {budget:.1f} s; DLG {row['dlg']:.2f} dB "
              f"({row['dlg_iterations']} it, {row['dlg_seconds']:.1f} s); IG {row['ig']:.2f} dB "
              f"({row['ig_iterations']} it, {row['ig_seconds']:.1f} s)", flush=True)
    med = {k: statistics.median(r[k] for r in rows) for k in ("mip", "dlg", "ig", "seconds")}
    print(f"tiny CLIP + CoOp, {n} digits, {device}, equal wall time (median {med['seconds']:.1f} s): "
          f"MIP {med['mip']:.2f} dB, DLG {med['dlg']:.2f} dB, IG {med['ig']:.2f} dB")
    return {"images": n, "mip_iterations": mip_iterations, "median_psnr": {k: med[k] for k in ("mip", "dlg", "ig")},
            "median_seconds": med["seconds"], "rows": rows}


if __name__ == "__main__":
    main()
