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
N held-out training images and scores the test set once, at the end. SIGINT/SIGTERM stop at the next step and save
it (status 130/143; ``--resume`` continues from that step).
"""

import sys

from utils.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main("ilsvrc"))
