#!/usr/bin/env python3
"""Train a ConvNet with deeply shared filter bases on ILSVRC2012 (paper section 4; recipe in SPEC section 5).

    python3 train_ilsvrc.py --lr=0.1 --momentum=0.9 --weight_decay=1e-4 --lambdaR=10 --shared_rank=32 \\
        --unique_rank=1 --batch_size=512 --dataset_path=<path_to_dataset> --model=ResNet34_DoubleShared \\
        --visible_device=0,1,2,3

``--dataset_path`` holds ``train/`` and ``val/`` ImageFolder trees. Several visible GPUs -> DataParallel (checkpoints
store the unwrapped model). Writes ``<output_dir>/ILSVRC-<model>-S<s>-U<u>-L<lambdaR>-<visible_device>.pth`` (best
val top-1), ``...-last.pth`` (``--resume``) and, as the authors' script, ``...epoch<e>.pth`` every 5 epochs.

Several GPUs or nodes: start it with torchrun (DistributedDataParallel; ``--batch_size`` stays the global batch),
e.g. ``torchrun --nproc_per_node=4 train_ilsvrc.py ... [--sync_bn]``. ``--val_split=N`` chooses the best checkpoint on
N held-out training images and scores the test set once, at the end. SIGINT/SIGTERM stop between checkpoint writes
(status 130/143; ``--resume`` continues).
"""
import sys

from utils.cli import train_main

DEFAULTS = {
    "dataset": "ilsvrc",
    # the authors' flag defaults (their README command uses --batch_size=512)
    "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-4, "lambdaR": 10.0,
    "shared_rank": 32, "unique_rank": 1, "batch_size": 256,
    "dataset_path": "/media/data/ILSVRC2012/", "model": "ResNet34_DoubleShared",
    # First match wins. The authors define a schedule only for the shared models (their plain ResNet18/34 and
    # MobileNetV2 runs crash); the plain models take their family's schedule here.
    "recipes": {
        "MobileNetV2*": {"epochs": 300, "milestones": [150, 225, 285], "restart": False},
        "ResNet*": {"epochs": 150, "milestones": [60, 100, 140], "restart": False},
    },
}

if __name__ == "__main__":
    sys.exit(train_main(DEFAULTS))
