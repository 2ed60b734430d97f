"""MIP's cost per iteration against a plain image-tower inversion step and end-to-end gradient
matching, on one CLIP with CoOp (default: ViT-B-32, random init, 224 px; `--model tiny-clip`
for the embedded one). All timings in one process, one thread, medians of `--repeats` runs:

- inversion step: one Adam step of 1 - cos(tower(x), z) (the plain image-encoder inversion);
- MIP iteration: one step of MIP's refinement (the same plus TV and the anchor term);
- end-to-end step: one step of cosine gradient matching through both towers (what DLG/IG pay
  per iteration on CoOp: a double backward through the text encoder);
- MIP's one-off costs: the text-side Jacobian (once per round, shared by all clients) and the
  embedding fit of one client.

    PYTHONPATH=. .venv/bin/python benchmarks/mip_speed.py --model ViT-B-32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from attacks.embeddings import TextJacobian, text_side
from attacks.encoder_inversion import invert_tower
from attacks.objectives import cosine_distance
from defenses.base import Defense
from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, model_spec
from fedsim.training import local_update


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-jacobian", action="store_true", help="skip the one-off Jacobian (slow on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = RunConfig(model=args.model, pretrained="none" if args.model != "tiny-clip" else "fedsim", peft="coop")
    data = federated_data(cfg)
    task = build_task(model_spec(cfg, data.private.class_names))
    params = task.trainable()
    x, y = data.private.images[:1], data.private.labels[:1]
    update = local_update(cfg, task, Defense(), x, y, params, torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = F.normalize(task.model.encode_image(x), dim=-1)
    start = x * 0 + 0.5

    plain = timed(lambda: invert_tower(task.model, z, start, 1, tv=0.0, anchor=0.0), args.repeats)
    mip = timed(lambda: invert_tower(task.model, z, start, 1), args.repeats)

    def end_to_end():
        dummy = start.clone().requires_grad_(True)
        loss = cosine_distance(task.gradients(params, dummy, y, create_graph=True), update)
        loss.backward()

    e2e = timed(end_to_end, args.repeats)
    print(f"{args.model} + CoOp, one image, 1 thread:")
    print(f"  plain inversion step   {plain * 1000:8.1f} ms")
    print(f"  MIP iteration          {mip * 1000:8.1f} ms  ({mip / plain:.2f} x plain; target <= 1.2)")
    print(f"  end-to-end step        {e2e * 1000:8.1f} ms  ({e2e / plain:.1f} x plain)")
    if not args.skip_jacobian:
        t0 = time.perf_counter()
        jac = TextJacobian(task, params, list(params))
        t_jac = time.perf_counter() - t0
        with torch.no_grad():
            public = task.embeddings(params, data.public.images[:64])
        t0 = time.perf_counter()
        labels, found, _ = text_side(task, params, update, 1, public, jacobian=jac)
        t_fit = time.perf_counter() - t0
        cos = float(F.cosine_similarity(found, task.embeddings(params, x).detach()))
        print(f"  one-off: Jacobian {t_jac:.1f} s per round; embedding fit {t_fit:.1f} s per client "
              f"(label {labels.tolist()} vs {y.tolist()}, cosine {cos:.4f}); = {t_jac / e2e:.0f} + "
              f"{t_fit / e2e:.0f} end-to-end steps")


if __name__ == "__main__":
    main()
