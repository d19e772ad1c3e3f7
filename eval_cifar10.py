#!/usr/bin/env python3
"""Evaluate a checkpoint on the CIFAR-10 test set: top-1/top-5 accuracy and error (SPEC sections 6-7).

    python3 eval_cifar10.py --pretrained=<path_to_model> --model=ResNet56_DoubleShared --shared_rank=16 --unique_rank=1
    python3 eval_cifar10.py --pretrained=paper --model=ResNet56_DoubleShared  # the paper's file

Reads the authors' files (with or without the ``module.`` prefix) and this project's. ``--model`` and the rank flags
may be left out: this project's checkpoints record them, and for the authors' files the ranks are read off the tensor
shapes. Prints the authors' ``Eval_Acc_top1 = ...`` / ``Eval_Acc_top5 = ...`` lines, the errors and one JSON line.

The model is evaluated in its inference-folded form (``models.fold``: the same outputs up to float rounding, at
plain-model speed); ``--no_fold`` evaluates it as trained. ``--amp``, ``--channels_last`` and ``--compile`` apply.
"""

import sys

from utils.cli import eval_main

# The authors' eval flag defaults (SPEC section 6), read by utils/cli.py. The ranks are read off the checkpoint's
# tensor shapes; the test transforms and normalisation are utils/data.py's, the same facts training uses (SPEC 5).
DEFAULTS = dict(
    model="ResNet56_DoubleShared",  # when neither --model nor the checkpoint names one
    batch_size=256,
    dataset_path="./data/",
)

if __name__ == "__main__":
    sys.exit(eval_main("cifar10", defaults=DEFAULTS))
