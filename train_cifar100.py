#!/usr/bin/env python3
"""Train a ConvNet with deeply shared filter bases on CIFAR-100 (paper section 4; recipe in SPEC section 5).

    python3 train_cifar100.py --lr=0.1 --momentum=0.9 --weight_decay=5e-4 --lambdaR=10 --shared_rank=16 \\
        --unique_rank=1 --batch_size=256 --model=ResNet34_SingleShared

Three stages of 150 + 75 + 75 epochs at lr, lr x0.1 and lr x0.01; stages 2 and 3 start from the best checkpoint's
weights with a fresh SGD (no momentum), as the authors' script. Writes ``<output_dir>/CIFAR100-<model>-S<s>-U<u>-
L<lambdaR>-<visible_device>.pth`` (best test top-1) and ``...-last.pth`` (``--resume`` continues from it).

Several GPUs or nodes: start it with torchrun (DistributedDataParallel; ``--batch_size`` stays the global batch),
e.g. ``torchrun --nproc_per_node=4 train_cifar100.py ... [--sync_bn]``. ``--val_split=N`` chooses the best checkpoint on
N held-out training images and scores the test set once, at the end. SIGINT/SIGTERM stop at the next step and save
it (status 130/143; ``--resume`` continues from that step).
"""

import sys

from utils.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("cifar100"))
