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

# The recipe, read by utils/cli.py (the library holds no per-dataset table): editing an entry here changes the run,
# except `augmentation` and `normalisation`, which describe what utils/data.py implements once for training and
# evaluation alike (tests/test_preprocessing.py holds both to SPEC section 5).
RECIPE = dict(
    # the authors' flag defaults (SPEC section 6); the ranks a model takes default to its paper row in
    # models/registry.py, so these two only name the files of models that take none (SPEC section 7: "-S32-U1")
    model="ResNet34_DoubleShared",
    lr=0.1,
    momentum=0.9,
    weight_decay=1e-4,
    lambdaR=10.0,
    batch_size=256,
    dataset_path="/media/data/ILSVRC2012/",
    shared_rank=32,
    unique_rank=1,
    epochs=150,  # SPEC section 5: the ResNets (also ResNet50/101, SPEC_v2 section 5)
    milestones=[60, 100, 140],  # SPEC section 5: the LR steps after epochs 60, 100 and 140 ...
    gammas=[0.1, 0.1, 0.1],  # ... by x0.1 each
    restart=False,  # SPEC section 5: one SGD for the whole run
    regularizer_includes_unique=False,  # SPEC section 4: R over the shared bases only
    augmentation="RandomResizedCrop(224), RandomHorizontalFlip; val: Resize(256), CenterCrop(224)",  # SPEC 5
    normalisation="ImageNet mean/std",  # SPEC section 5 (utils/data.py MEAN_STD: one fact for train and eval)
    # Models with their own schedule, by name or glob; the first match wins. The authors scheduled only the shared
    # models (their plain runs crash, SPEC section 10.5): plain ones take their family's.
    per_model={
        # SPEC_v2 section 5: the authors' later code, x0.5 for the last step (5e-4 for epochs 286-300)
        "MobileNetV2_SharedDouble": dict(epochs=300, milestones=[150, 225, 285], gammas=[0.1, 0.1, 0.5]),
        # SPEC section 5 (MobileNetV2_Shared); the NoECA layout takes its own time's x0.1 (SPEC_v2 section 5)
        "MobileNetV2*": dict(epochs=300, milestones=[150, 225, 285], gammas=[0.1, 0.1, 0.1]),
    },
)

if __name__ == "__main__":
    sys.exit(train_main("ilsvrc", recipe=RECIPE))
