"""What the three examples share: training pyfastattn's model and the plain
PyTorch baseline side by side, one step each in turn, and printing both
speeds the same way. Imported by examples/*.py (run from any directory:
Python puts the script's own folder on sys.path)."""

from __future__ import annotations

import os
import time


def step_both(
    models: dict, opts: dict, scheds: dict | None, step: int, loss_of, step_times: dict, losses: dict
):
    """One optimiser step of every model on the same batch, the order
    alternating each step so neither always runs on a warm cache.
    ``loss_of(model)`` returns the loss of that model on the batch (called
    at once, within the caller's loop iteration);
    each step's wall time and loss are appended to ``step_times``/``losses``."""
    for k in list(models) if step % 2 == 0 else list(reversed(models)):  # alternate who goes first
        t = time.perf_counter()
        loss = loss_of(models[k])
        opts[k].zero_grad(set_to_none=True)
        loss.backward()
        opts[k].step()
        if scheds is not None:
            scheds[k].step()
        step_times[k].append(time.perf_counter() - t)
        losses[k].append(loss.item())


def print_speeds(rows: list, baseline: str) -> None:
    """The speed table: per row (name, {provider: tokens/s}), pyfastattn,
    the baseline and their ratio, saying plainly which is faster."""
    print(f"\n{'':24s}{'pyfastattn':>12s}{baseline:>12s}{'ratio':>8s}")
    for name, d in rows:
        r = d["pyfastattn"] / d[baseline]
        print(f"{name:24s}{d['pyfastattn']:12.0f}{d[baseline]:12.0f}{r:7.2f}x  "
              f"({'pyfastattn faster' if r > 1 else 'pyfastattn SLOWER'})")  # fmt: skip


def print_footer(train_s: float, steps: int, cpu0: float) -> float:
    """The run's cost line; returns the process CPU time since ``cpu0``."""
    cpu = time.process_time() - cpu0
    print(f"training took {train_s:.1f} s for both models, {steps} steps each; process CPU time "
          f"{cpu:.1f} s; load average now {os.getloadavg()[0]:.2f}")  # fmt: skip
    return cpu
