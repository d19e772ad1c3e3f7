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

# The recipe, read by utils/cli.py (the library holds no per-dataset table): editing an entry here changes the run,
# except `augmentation` and `normalisation`, which describe what utils/data.py implements once for training and
# evaluation alike (tests/test_preprocessing.py holds both to SPEC section 5).
RECIPE = dict(
    # the authors' flag defaults (SPEC section 6); the ranks a model takes default to its paper row in
    # models/registry.py, so these two only name the files of models that take none (SPEC section 7: "-S16-U1")
    model="ResNet56_DoubleShared",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    lambdaR=10.0,
    batch_size=256,
    dataset_path="./data/",
    shared_rank=16,
    unique_rank=1,
    epochs=300,  # SPEC section 5
    milestones=[150, 225],  # SPEC section 5: the LR steps after epochs 150 and 225 ...
    gammas=[0.1, 0.1],  # ... by x0.1 each
    restart=False,  # SPEC section 5: one SGD for the whole run
    regularizer_includes_unique=True,  # SPEC section 4: R over each group's shared and unique filters
    augmentation="RandomCrop(32, padding=4), RandomHorizontalFlip",  # SPEC section 5 (utils/data.py)
    normalisation="ImageNet mean/std",  # SPEC sections 5, 10.1 (utils/data.py MEAN_STD: one fact for train and eval)
    per_model={},  # SPEC section 5: no model has its own schedule
)

if __name__ == "__main__":
    sys.exit(train_main("cifar10", recipe=RECIPE))
