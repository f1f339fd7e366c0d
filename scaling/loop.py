"""Training of one config in pure PyTorch: no Ray, no MLflow (it runs in pytest and in a notebook).

``train(cfg)`` trains a contrastive model for ``cfg.train.epochs`` epochs and calls ``on_epoch``
after each with an ``EpochMetrics`` and the checkpointable ``TrainState``. In a distributed run
(``scaling.dist`` reports W > 1) every worker draws the same global permutation and takes its own
slice of each global batch, so ``batch_size`` always means the global batch; the loss gathers
the other workers' embeddings itself.

Derived values (per-worker batch, scaled learning rate, step counts) come from the named
functions below and are reported as derived parameters; the config is never mutated.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from scaling import dist
from scaling.augment import AugmentConfig, augment_views, eval_transform
from scaling.data import DatasetSplits, load_dataset
from scaling.evaluate import alignment, effective_rank, extract_features, knn_top1, linear_probe, uniformity
from scaling.losses import build_loss
from scaling.models import ContrastiveModel, ProjectionHead, build_encoder, encoder_flops
from scaling.spec import TrialConfig

# 1 PiB: more than any machine's memory and than x86-64's 128 TiB of user address space, so the
# allocator refuses it even where the kernel overcommits memory.
OOM_FAULT_BYTES = 1 << 50
EVAL_BANK_MAX = 10_000  # cap on the kNN memory bank (training images) to bound per-epoch eval cost


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names epoch and step."""

    retryable = False  # the same config from the same checkpoint diverges again (scaling.failures)

    def __init__(self, epoch: int, step: int, value: float) -> None:
        self.epoch, self.step, self.value = epoch, step, value
        super().__init__(f"non-finite loss at epoch {epoch} step {step} (value {value})")

    def __reduce__(self) -> tuple[Any, ...]:  # Ray ships worker exceptions to the driver by pickling them
        return (type(self), (self.epoch, self.step, self.value))


# ---------------------------------------------------------------------------------------------
# derived values


def per_worker_batch(batch_size: int, world_size: int) -> int:
    """Samples each worker holds per step; the global batch must split evenly."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} does not split evenly over {world_size} workers")
    return batch_size // world_size


def scaled_lr(lr: float, batch_size: int, *, base_batch_size: int = 256, rule: str = "linear") -> float:
    """The learning-rate scaling rule: lr x B/B0 (linear, Goyal et al. 2017) or x sqrt(B/B0)."""
    ratio = batch_size / base_batch_size
    return lr * {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[rule]


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warm-up to ``peak_lr`` then cosine decay to 0 (SimCLR / MoCo v3 schedule)."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(num_train: int, batch_size: int, cap: int | None = None) -> int:
    """Full global batches per epoch (the last partial batch is dropped)."""
    steps = num_train // batch_size
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the training split ({num_train} images)")
    return min(steps, cap) if cap else steps


def derived_params(cfg: TrialConfig, *, num_train: int, world_size: int, flops_per_image: int | None = None) -> dict[str, Any]:
    """Values derived from the config that are logged next to it (never written back into it)."""
    t = cfg.train
    out: dict[str, Any] = {
        "world_size": world_size,
        "per_worker_batch": per_worker_batch(t.batch_size, world_size),
        "scaled_lr": scaled_lr(t.lr, t.batch_size, base_batch_size=t.base_batch_size, rule=t.lr_scaling),
        "steps_per_epoch": steps_per_epoch(num_train, t.batch_size, t.max_steps_per_epoch),
        "num_train": num_train,
    }
    if flops_per_image is not None:
        out["flops_per_image"] = flops_per_image
    return out


# ---------------------------------------------------------------------------------------------
# metrics and state


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch reports. ``knn_top1`` is on the validation split (the selection metric);
    ``knn_top1_test`` is reported alongside and never optimised."""

    epoch: int
    train_loss: float
    knn_top1: float
    samples_seen: int
    wall_s: float
    throughput: float
    last_lr: float
    alignment: float
    uniformity: float
    effective_rank: float
    knn_top1_test: float | None = None
    linear_top1: float | None = None
    linear_top1_test: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class TrainState:
    """Everything a checkpoint holds; ``state_dict()`` is plain tensors/numbers (``weights_only`` loadable)."""

    model: ContrastiveModel
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    epoch: int = 0
    step: int = 0
    samples_seen: int = 0
    wall_s: float = 0.0
    history: list[dict[str, float | int]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        """A snapshot (deep copy: later training steps do not change it)."""
        return copy.deepcopy({
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "epoch": self.epoch,
            "step": self.step,
            "samples_seen": self.samples_seen,
            "wall_s": self.wall_s,
            "history": list(self.history),
        })

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.loss_fn.load_state_dict(state["loss"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.samples_seen, self.wall_s = int(state["samples_seen"]), float(state["wall_s"])
        self.history = list(state.get("history", []))


def build_model(cfg: TrialConfig) -> ContrastiveModel:
    m = cfg.model
    encoder = build_encoder(m.encoder, width=m.width)
    return ContrastiveModel(encoder, ProjectionHead(encoder.out_dim, m.proj_hidden, m.proj_dim))


def augment_config(cfg: TrialConfig) -> AugmentConfig:
    t = cfg.train
    return AugmentConfig(strength=t.augment_strength, crop_scale=(t.crop_min_scale, 1.0), rotation=t.rotation,
                         blur_p=t.blur_p, channel_shuffle_p=t.channel_shuffle_p)


def _optimizer(cfg: TrialConfig, params: list[tuple[str, nn.Parameter]], lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and normalisation parameters (standard for SimCLR-style training).
    decay = [p for n, p in params if p.ndim > 1]
    no_decay = [p for n, p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=t.momentum)
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def load_data(cfg: TrialConfig) -> DatasetSplits:
    d = cfg.data
    return load_dataset(d.name, root=d.root, size=d.size, image_size=d.image_size, seed=d.seed,
                        val_fraction=d.val_fraction, fraction=d.fraction)


def build_state(cfg: TrialConfig, *, num_train: int, device: torch.device | str = "cpu") -> TrainState:
    """Model, loss, optimizer and RNG of a fresh run (seeded by ``cfg.train.seed`` and the rank)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    model = build_model(cfg).to(device)
    t = cfg.train
    loss_fn = build_loss(t.loss, temperature=t.temperature, dataset_size=num_train, dim=cfg.model.proj_dim,
                         **t.loss_params).to(device)
    params = list(model.named_parameters()) + [(f"loss.{n}", p) for n, p in loss_fn.named_parameters()]
    peak = scaled_lr(t.lr, t.batch_size, base_batch_size=t.base_batch_size, rule=t.lr_scaling)
    optimizer = _optimizer(cfg, params, peak)
    generator = torch.Generator(device=device)
    generator.manual_seed(t.seed * 1_000_003 + dist.rank())
    return TrainState(model=model, loss_fn=loss_fn, optimizer=optimizer, generator=generator)


# ---------------------------------------------------------------------------------------------
# the loop


def train(
    cfg: TrialConfig,
    *,
    data: DatasetSplits | None = None,
    device: torch.device | str = "cpu",
    state: dict[str, Any] | None = None,
    on_epoch: Callable[[EpochMetrics, TrainState], None] | None = None,
    on_step: Callable[[int, int, int], None] | None = None,
    prepare_model: Callable[[nn.Module], nn.Module] | None = None,
) -> list[EpochMetrics]:
    """Train one config; returns the per-epoch metrics of this call.

    ``state``: a ``TrainState.state_dict()`` to resume from (training continues after its epoch).
    ``on_step(epoch, step_in_epoch, steps_per_epoch)``: progress hook.
    ``prepare_model``: wraps the model for distributed data parallelism (Ray Train's
    ``prepare_model``); the identity on one process.
    Raises ``NonFiniteLossError`` when the loss becomes NaN/inf.
    """
    device = torch.device(device)
    data = data or load_data(cfg)
    t = cfg.train
    world, rank = dist.world_size(), dist.rank()
    local_batch = per_worker_batch(t.batch_size, world)
    n_train = len(data.train)
    steps = steps_per_epoch(n_train, t.batch_size, t.max_steps_per_epoch)
    ts = build_state(cfg, num_train=n_train, device=device)
    if state is not None:
        ts.load_state_dict(state)
    model: nn.Module = prepare_model(ts.model) if prepare_model else ts.model
    train_images = data.train.images.to(device)
    aug = augment_config(cfg)
    peak = scaled_lr(t.lr, t.batch_size, base_batch_size=t.base_batch_size, rule=t.lr_scaling)
    total_steps, warmup_steps = t.epochs * steps, t.warmup_epochs * steps
    needs_index = getattr(ts.loss_fn, "needs_index", False)
    results: list[EpochMetrics] = []

    for epoch in range(ts.epoch + 1, t.epochs + 1):
        ts.model.train()
        # The same permutation on every worker (seeded by epoch); each takes its slice of every global batch.
        perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(t.seed * 7919 + epoch))
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        lr = peak
        for i in range(steps):
            batch_idx = perm[i * t.batch_size + rank * local_batch: i * t.batch_size + (rank + 1) * local_batch]
            lr = lr_at(ts.step, total_steps=total_steps, warmup_steps=warmup_steps, peak_lr=peak)
            for g in ts.optimizer.param_groups:
                g["lr"] = lr
            images = train_images[batch_idx.to(device)]
            views = augment_views(images, t.views, aug, generator=ts.generator)  # (V, n, C, H, W)
            z = model(views.flatten(0, 1)).unflatten(0, (t.views, local_batch))
            loss = ts.loss_fn(z, index=batch_idx.to(device)) if needs_index else ts.loss_fn(z)
            if t.fault_oom_at_step is not None and ts.step + 1 == t.fault_oom_at_step:
                # injected fault: a real allocation the allocator refuses (more than any machine's memory)
                torch.empty(OOM_FAULT_BYTES, dtype=torch.uint8, device=device)
            if t.fault_nan_at_step is not None and ts.step + 1 == t.fault_nan_at_step:
                loss = loss * float("nan")  # injected fault: exercises the failure path end to end
            if not torch.isfinite(loss):
                raise NonFiniteLossError(epoch, i + 1, float(loss.detach()))
            ts.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            ts.optimizer.step()
            loss_sum += loss.detach()
            ts.step += 1
            if on_step is not None:
                on_step(epoch, i + 1, steps)
        train_s = time.perf_counter() - start
        ts.wall_s += train_s
        ts.samples_seen += steps * t.batch_size
        ts.epoch = epoch
        epoch_loss = dist.all_reduce_mean(loss_sum / steps).item()
        evals = evaluate_epoch(cfg, ts.model, data, device) if rank == 0 else {}
        metrics = EpochMetrics(
            epoch=epoch, train_loss=epoch_loss, samples_seen=ts.samples_seen, wall_s=ts.wall_s,
            throughput=steps * t.batch_size / train_s, last_lr=lr,
            knn_top1=evals.get("knn_top1", float("nan")), alignment=evals.get("alignment", float("nan")),
            uniformity=evals.get("uniformity", float("nan")), effective_rank=evals.get("effective_rank", float("nan")),
            knn_top1_test=evals.get("knn_top1_test"), linear_top1=evals.get("linear_top1"),
            linear_top1_test=evals.get("linear_top1_test"),
        )
        ts.history.append(metrics.as_dict())
        results.append(metrics)
        if on_epoch is not None:
            on_epoch(metrics, ts)
    return results


def evaluate_epoch(cfg: TrialConfig, model: ContrastiveModel, data: DatasetSplits, device: torch.device) -> dict[str, float]:
    """Validation kNN (the selection metric), test kNN (reported only), embedding-geometry metrics."""
    e = cfg.eval
    bank = data.train.images[:EVAL_BANK_MAX].to(device)
    bank_labels = data.train.labels[:EVAL_BANK_MAX].to(device)

    def transform(x: torch.Tensor) -> torch.Tensor:
        return eval_transform(x)

    feats = extract_features(model.encoder, bank, transform=transform)
    val = extract_features(model.encoder, data.val.images.to(device), transform=transform)
    out = {"knn_top1": knn_top1(feats, bank_labels, val, data.val.labels.to(device), k=e.knn_k,
                                temperature=e.knn_temperature, num_classes=data.num_classes)}
    test = None
    if e.test:
        test = extract_features(model.encoder, data.test.images.to(device), transform=transform)
        out["knn_top1_test"] = knn_top1(feats, bank_labels, test, data.test.labels.to(device), k=e.knn_k,
                                        temperature=e.knn_temperature, num_classes=data.num_classes)
    if e.linear_probe:
        out["linear_top1"] = linear_probe(feats, bank_labels, val, data.val.labels.to(device))
        if test is not None:
            out["linear_top1_test"] = linear_probe(feats, bank_labels, test, data.test.labels.to(device))
    out.update(_geometry(cfg, model, data, device))
    return out


@torch.no_grad()
def _geometry(cfg: TrialConfig, model: ContrastiveModel, data: DatasetSplits, device: torch.device) -> dict[str, float]:
    """Alignment/uniformity on two augmented views of validation images; effective rank of their embeddings."""
    was_training = model.training
    model.eval()
    images = data.val.images[:1024].to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed)
    views = augment_views(images, 2, augment_config(cfg), generator=gen)
    z = F.normalize(model(views.flatten(0, 1)).unflatten(0, (2, len(images))), dim=-1)
    model.train(was_training)
    return {
        "alignment": float(alignment(z[0], z[1])),
        "uniformity": float(uniformity(z[0])),
        "effective_rank": float(effective_rank(z[0])),
    }


def raw_pixel_knn(data: DatasetSplits, *, k: int = 20, temperature: float = 0.1) -> float:
    """kNN top-1 on raw (normalised, flattened) pixels: the floor a learned encoder must beat."""
    bank = eval_transform(data.train.images[:EVAL_BANK_MAX]).flatten(1)
    val = eval_transform(data.val.images).flatten(1)
    return knn_top1(bank, data.train.labels[:EVAL_BANK_MAX], val, data.val.labels, k=k, temperature=temperature,
                    num_classes=data.num_classes)


def flops_per_image(cfg: TrialConfig) -> int:
    """Encoder forward FLOPs per image at the config's resolution (for compute-scaling fits)."""
    return encoder_flops(build_encoder(cfg.model.encoder, width=cfg.model.width), cfg.data.image_size)
