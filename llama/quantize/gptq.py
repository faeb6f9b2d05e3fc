"""GPTQ for int8 rows: rounding that knows what a layer's inputs look like.

Mode "int8" (`llama.quantize`) rounds every weight to its nearest code on its
own. GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers") rounds a weight's input columns one after
another and moves each column's rounding error onto the columns not rounded
yet, in the proportions that keep the layer's *output* on calibration inputs X
closest to the original:

    minimize ||X Wᵀ - X Qᵀ||²  over the int8 codes Q,  with  H = Xᵀ X  (K, K)

The codes and scales have mode "int8"'s format (symmetric, a bf16 scale per
output row and group of input columns, or per row), so a GPTQ-rounded layer
runs on the same kernel and loads like any int8 checkpoint: only which codes
are chosen differs. The scales are set before rounding, from the weights
(GPTQ's "static groups"), so they do not depend on the order columns are
rounded in.
"""

from typing import Dict

import torch
from torch import nn

from llama.parallel import COLUMN_PARALLEL, ROW_PARALLEL


@torch.no_grad()
def input_second_moments(model: nn.Module, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
    """H = Σ x xᵀ (K, K), fp64, of the inputs x of every fairscale linear of `model`,
    keyed by module name, over one forward pass of `tokens` (B, T) from position 0."""
    moments: Dict[str, torch.Tensor] = {}

    def accumulate(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()  # (B*T, K)
            moments[name] = moments.get(name, 0) + x.T @ x
        return hook

    hooks = [
        module.register_forward_pre_hook(accumulate(name))
        for name, module in model.named_modules()
        if isinstance(module, COLUMN_PARALLEL + ROW_PARALLEL)
    ]
    try:
        model(tokens, 0)
    finally:
        for hook in hooks:
            hook.remove()
    return moments


@torch.no_grad()
def gptq_int8_rows(
    weight: torch.Tensor, scales: torch.Tensor, moment: torch.Tensor, *, damp: float = 0.01, block_size: int = 128
) -> torch.Tensor:
    """The int8 codes q (N, K) of weight (N, K) ~= q * its scale, chosen with GPTQ's rounding.

    Args:
        scales: (N,) one per row, or (N, K/group_size) one per row and group of columns, as
            `llama.quantize.kernels.quantize_int8_rows` / `quantize_int8_groups` set them.
        moment: H = Σ x xᵀ (K, K) of the layer's calibration inputs.
        damp: added to H's diagonal, as a fraction of its mean, to keep H invertible.
        block_size: columns rounded before the rest are updated in one matrix product.

    """
    n, k = weight.shape
    step = scales.float().reshape(n, -1)  # (N, G), G = 1 for a scale per row

    # Columns in order of decreasing input energy: the important ones are rounded
    # first, while the most columns remain to absorb their errors ("act order").
    h = moment.to(weight.device, torch.float64)  # (K, K); the reordering below makes it a copy
    order = torch.argsort(h.diagonal(), descending=True)
    h = h[order][:, order]
    w = weight.float()[:, order]  # (N, K), a copy (indexing copies), updated as columns are rounded
    step = step.repeat_interleave(k // step.shape[1], dim=1)[:, order]  # (N, K): each column's scale
    dead = h.diagonal() == 0  # inputs that were always 0: their weights never matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    # Upper Cholesky factor of H⁻¹: row i says how column i's error spreads over columns > i.
    spread = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    for start in range(0, k, block_size):
        end = min(start + block_size, k)
        errors = torch.empty(n, end - start, device=weight.device)  # (N, block)
        for i in range(start, end):
            codes = (w[:, i] / step[:, i]).round().clamp(-127, 127)  # (N,)
            q[:, i] = codes.to(torch.int8)
            error = (w[:, i] - codes * step[:, i]) / spread[i, i]
            w[:, i:end] -= error[:, None] * spread[i, i:end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ spread[start:end, end:]  # the block's errors onto the later columns

    return q[:, torch.argsort(order)]  # back to the weight's column order
