"""Improved Deep Leakage from Gradients (Zhao, Mopuri, Bilen 2020, arXiv 2001.02610).

For one example with cross-entropy, the gradient of the last fully connected layer's row i is
(p_i - y_i) h; with non-negative features h (sigmoid, ReLU) only the true class's row is
negative. So the label is read off the gradient (label strategy "idlg": argmin of the row sums
of the last layer's weight gradient, in `attacks.labels`), then DLG runs with that label fixed
and only the image optimised.

Defaults follow the iDLG reference code (PatrickZH/Improved-Deep-Leakage-from-Gradients,
notes section 3): L-BFGS, lr 1.0, 300 iterations, L2 gradient distance.

Departures, all inherited from fedsim's DLG (see attacks.dlg): dummy images start uniform in
[0, 1] (the code: standard normal); L-BFGS uses a strong-Wolfe line search; an "iteration" is
one L-BFGS step of up to 20 inner iterations; the reference's early stop at loss < 1e-6 is
replaced by DLG's < 1e-12. The label rule holds for batch 1 only; for larger batches the
label strategy raises `LabelStrategyError` (pass another, e.g. "llg" or "ilrg").
"""

from __future__ import annotations

from attacks.dlg import DLG
from attacks.labels import strategy_argument


class IDLG(DLG):
    name = "idlg"

    def __init__(self, iterations: int = 300, restarts: int = 1, seed: int = 0, progress=None,
                 lr: float = 1.0, inner_steps: int = 20, history_size: int = 100,
                 label_strategy: str = "idlg"):
        super().__init__(iterations, restarts, seed, progress, lr, inner_steps, history_size,
                         strategy_argument(label_strategy, "idlg"))
