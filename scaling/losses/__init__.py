"""The contrastive loss family under one N-view API (DESIGN.md section 4, issue 3).

``build_loss(name, *, temperature, dataset_size=None, **params)`` returns an ``nn.Module``;
``loss(z)`` with ``z`` of shape ``(V, N, D)`` (this process's raw projections) returns a scalar;
``loss(z, index=idx)`` passes the samples' dataset indices (required when ``loss.needs_index``).
Every loss L2-normalises z itself, gathers the other processes' embeddings through
``scaling.dist`` and averages over its local anchors, so the mean of the per-rank values — and,
with DDP gradient averaging, the parameter gradients — equal one process on the global batch.

``LOSS_PARAMS[name]`` maps each of a loss's own parameters to ``(type, default, (low, high))``,
a CLOSED valid range; it is the single source for defaults and ranges (the constructors read it).
``temperature`` (> 0), ``dataset_size`` and ``dim`` are not in it: every loss takes them.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from scaling.losses import adnce, dcl, debiased, hcl, infonce, isogclr, mochi, swav
from scaling.losses._common import LossError, ParamSpec, check_param, normalize
from scaling.losses.adnce import ADNCELoss, adnce_loss
from scaling.losses.dcl import DCLLoss, VonMisesFisherWeight, dcl_loss
from scaling.losses.debiased import DebiasedLoss, debiased_loss
from scaling.losses.hcl import HCLLoss, hcl_loss
from scaling.losses.infonce import InfoNCELoss, infonce_loss
from scaling.losses.isogclr import ISogCLRLoss, isogclr_step
from scaling.losses.mochi import MoCHiLoss, mochi_loss
from scaling.losses.swav import SwAVLoss, sinkhorn, swav_loss

__all__ = [
    "ADNCELoss",
    "DCLLoss",
    "DebiasedLoss",
    "HCLLoss",
    "ISogCLRLoss",
    "InfoNCELoss",
    "LOSS_NAMES",
    "LOSS_PARAMS",
    "LossError",
    "MoCHiLoss",
    "SwAVLoss",
    "VonMisesFisherWeight",
    "adnce_loss",
    "build_loss",
    "dcl_loss",
    "debiased_loss",
    "hcl_loss",
    "infonce_loss",
    "isogclr_step",
    "mochi_loss",
    "normalize",
    "sinkhorn",
    "swav_loss",
]

LOSS_NAMES: tuple[str, ...] = ("infonce", "dcl", "dclw", "debiased", "hcl", "adnce", "mochi", "swav", "isogclr")

LOSS_PARAMS: dict[str, dict[str, ParamSpec]] = {
    "infonce": infonce.PARAMS,
    "dcl": dcl.DCL_PARAMS,
    "dclw": dcl.DCLW_PARAMS,
    "debiased": debiased.PARAMS,
    "hcl": hcl.PARAMS,
    "adnce": adnce.PARAMS,
    "mochi": mochi.PARAMS,
    "swav": swav.PARAMS,
    "isogclr": isogclr.PARAMS,
}


def build_loss(
    name: str, *, temperature: float, dataset_size: int | None = None, dim: int | None = None, **params: Any
) -> nn.Module:
    """The loss ``name`` with its hyperparameters; LossError on an unknown name/parameter or a bad value.

    Context every loss accepts (not hyperparameters, not in LOSS_PARAMS): ``dataset_size`` — only
    ``isogclr`` needs it (per-sample state); ``dim``, the embedding dimension D — only ``swav`` uses
    it (prototype shape; None: inferred from the first call).
    """
    if name not in LOSS_PARAMS:
        raise LossError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
    valid = LOSS_PARAMS[name]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise LossError(
            f"{name}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: {', '.join(valid) or 'none (only temperature)'}"
        )
    p = {k: check_param(name, k, v, valid[k]) for k, v in params.items()}
    if dataset_size is not None:
        dataset_size = check_param(name, "dataset_size", dataset_size, (int, 1, (1, float("inf"))))
    dim = check_param(name, "dim", dim, swav.DIM_SPEC)
    if name == "infonce":
        return InfoNCELoss(temperature=temperature)
    if name == "dcl":
        return DCLLoss(temperature=temperature)
    if name == "dclw":
        return DCLLoss(temperature=temperature, weight_fn=VonMisesFisherWeight(**p))
    if name == "debiased":
        return DebiasedLoss(temperature=temperature, **p)
    if name == "hcl":
        return HCLLoss(temperature=temperature, **p)
    if name == "adnce":
        return ADNCELoss(temperature=temperature, **p)
    if name == "mochi":
        return MoCHiLoss(temperature=temperature, **p)
    if name == "swav":
        return SwAVLoss(temperature=temperature, dim=dim, **p)
    if name == "isogclr":
        return ISogCLRLoss(temperature=temperature, dataset_size=dataset_size, **p)
    raise AssertionError(name)  # LOSS_PARAMS and this dispatch list the same names
