#!/usr/bin/env python3
"""Train a ConvNet with deeply shared filter bases on CIFAR-100 (paper section 4; recipe in SPEC section 5).

    python3 train_cifar100.py --lr=0.1 --momentum=0.9 --weight_decay=5e-4 --lambdaR=10 --shared_rank=16 \\
        --unique_rank=1 --batch_size=256 --model=ResNet34_SingleShared

Three stages of 150 + 75 + 75 epochs at lr, lr x0.1 and lr x0.01; stages 2 and 3 start from the best checkpoint's
weights with a fresh SGD (the same momentum, its buffers zero), as the authors' script. Writes
``<output_dir>/CIFAR100-<model>-S<s>-U<u>-L<lambdaR>-<visible_device>.pth`` (best test top-1) and ``...-last.pth``
(``--resume`` continues from it).

Several GPUs or nodes: start it with torchrun (DistributedDataParallel; ``--batch_size`` stays the global batch),
e.g. ``torchrun --nproc_per_node=4 train_cifar100.py ... [--sync_bn]``. ``--val_split=N`` chooses the best checkpoint on
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
    model="ResNet34_SingleShared",
    lr=0.1,
    momentum=0.9,
    weight_decay=5e-4,
    lambdaR=10.0,
    batch_size=256,
    dataset_path="./data/",
    shared_rank=16,
    unique_rank=1,
    epochs=300,  # SPEC section 5: 150 + 75 + 75
    milestones=[150, 225],  # SPEC section 5: stages end after epochs 150 and 225 ...
    gammas=[0.1, 0.1],  # ... and the next runs at x0.1 of the previous stage's LR
    restart=True,  # SPEC section 5: stages 2 and 3 reload the best weights, fresh SGD (same momentum, zero buffers)
    regularizer_includes_unique=False,  # SPEC section 4: R over the shared bases only
    augmentation="RandomCrop(32, padding=4), RandomHorizontalFlip",  # SPEC section 5 (utils/data.py)
    normalisation="CIFAR-100 mean/std",  # SPEC section 5 (utils/data.py MEAN_STD: one fact for train and eval)
    # SPEC_v2 section 5: MobileNetV2_SharedDouble takes this recipe, that of its published 27.54% (the authors'
    # later script never decays the LR)
    per_model={},
)

if __name__ == "__main__":
    sys.exit(train_main("cifar100", recipe=RECIPE))
