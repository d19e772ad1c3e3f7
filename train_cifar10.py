#!/usr/bin/env python3
"""Train a ConvNet with deeply shared filter bases on CIFAR-10 (paper section 4; recipe in SPEC section 5).

    python3 train_cifar10.py --lr=0.1 --momentum=0.9 --weight_decay=5e-4 --lambdaR=10 --shared_rank=16 \\
        --unique_rank=1 --batch_size=256 --model=ResNet56_DoubleShared

Writes ``<output_dir>/CIFAR10-<model>-S<s>-U<u>-L<lambdaR>-<visible_device>.pth`` (best test top-1) and ``...-last.pth``
(every epoch; ``--resume`` continues from it). ``--help`` lists every flag.

Several GPUs or nodes: start it with torchrun (DistributedDataParallel; ``--batch_size`` stays the global batch),
e.g. ``torchrun --nproc_per_node=4 train_cifar10.py ... [--sync_bn]``. ``--val_split=N`` chooses the best checkpoint on
N held-out training images and scores the test set once, at the end. SIGINT/SIGTERM stop at the next step and save
it (status 130/143; ``--resume`` continues from that step).
"""

import sys

from utils.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("cifar10"))
