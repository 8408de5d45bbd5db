"""Named sets of defaults, one table. Every value can be overridden by a flag of fasttin.train.

The `seed-*` recipes reproduce the write-up's stages (its figure beside each); `fast` is fasttin's
own: the most accuracy per minute from scratch.
"""
from __future__ import annotations

# Every setting the trainer reads, with what it means. Recipes change some of them.
BASE = dict(
    res=64,                # side of the square images the model sees (64 = native, upscaled bicubically above)
    epochs=15,             # passes over the training split
    batch_size=100,        # global batch (split over torchrun processes)
    lr=1e-3,               # peak learning rate for the global batch
    momentum=0.9,          # SGD momentum
    nesterov=False,        # Nesterov momentum
    weight_decay=0.0,      # L2 on conv/linear weights only (never on norms or biases)
    label_smoothing=0.0,   # cross-entropy label smoothing
    schedule="step",       # step: StepLR(step_size, gamma) per epoch; cosine: warmup then cosine to 0
    step_size=7,           # epochs between lr drops (schedule=step)
    gamma=0.1,             # lr factor at each drop (schedule=step)
    warmup_epochs=0.0,     # linear warmup from 0 (schedule=cosine), in epochs
    stem="imagenet",       # imagenet: 7x7/2 conv + max-pool; cifar: 3x3/1 conv, no max-pool
    pretrained="none",     # none | imagenet | PATH (fasttin checkpoint or torchvision state dict)
    augment="flip",        # none | flip | crop | rrc, applied at 64x64 before the upscale
    tta=False,             # also evaluate on mirrored images and average the logits
    amp="bf16",            # bf16 | fp16 (with a gradient scaler) | off
    channels_last=True,    # NHWC activations: the tensor-core friendly layout
    compile=None,          # None, or a torch.compile mode ("default", "max-autotune", ...)
    backend="auto",        # auto | dali | resident | pil (see fasttin.loaders)
)

RECIPES = {
    # write-up: from scratch at 64px, 25.9% val top-1
    "seed-64-scratch": dict(),
    # write-up: ImageNet weights at 64px, 56.9%
    "seed-64-pretrained": dict(pretrained="imagenet"),
    # write-up: files upscaled on disk to 224px, ImageNet weights, 73.1%
    "seed-224": dict(res=224, pretrained="imagenet", augment="none", epochs=7),
    # write-up: the 224 model trained on at 64px, standard stem, 54.5%
    "seed-224-to-64": dict(pretrained="runs/seed-224/best.pt", epochs=7),
    # write-up: the 224 model at 64px with the cifar stem (conv1 re-initialised), 72.3%
    "seed-finetune": dict(stem="cifar", pretrained="runs/seed-224/best.pt", epochs=7),
    # fasttin: from scratch, large batch, one-cycle-like cosine with warmup; aim 60% top-1
    "fast": dict(stem="cifar", epochs=30, batch_size=512, lr=0.4, momentum=0.9, nesterov=True,
                 weight_decay=5e-4, label_smoothing=0.1, schedule="cosine", warmup_epochs=2.0,
                 augment="crop", tta=True),
}

WRITEUP_TOP1 = {"seed-64-scratch": 0.259, "seed-64-pretrained": 0.569, "seed-224": 0.731,
                "seed-224-to-64": 0.545, "seed-finetune": 0.723}


def resolve(name: str, **overrides) -> dict:
    """BASE, then the recipe, then every override that is not None."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}: choose one of {', '.join(RECIPES)}")
    unknown = set(overrides) - set(BASE)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    return {**BASE, **RECIPES[name], **{k: v for k, v in overrides.items() if v is not None}, "recipe": name}
