"""What converting a trained plain network buys, measured on real images (issue 28): ``python -m utils.convert_study``.

Fashion-MNIST (Debian's ``dataset-fashion-mnist``: ``/usr/share/datasets/fashion-mnist/*-ubyte.gz``) is written in
CIFAR-10's on-disk pickle layout (28x28 grey zero-padded to 32x32, the grey copied into 3 channels; a seeded random
subset of ``--n_train`` / ``--n_test`` images), then, with the project's own scripts run in process:

1. a plain ResNet32 trains for ``--epochs`` epochs (lr ``--lr``, x0.1 at half and at three quarters of the run: the
   CIFAR-10 recipe's milestones, scaled);
2. its last checkpoint converts (``models.convert``, basis BN calibrated on ``--calibrate`` training images) into
   ResNet32_DoubleShared at each ``--ranks`` S, unique rank 1; each is evaluated before fine-tuning and after one
   fine-tuning epoch (``--pretrained``, lr ``--finetune_lr``);
3. the same shared models train from scratch for ``--epochs`` + 1 epochs (the plain run's epochs plus the fine-tuning
   epoch), with the plain run's flags.

Every top-1 is the test set's, of the last epoch's checkpoint (no selection on the test set). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import os
import pickle
import sys
import time

import numpy as np

FASHION = "/usr/share/datasets/fashion-mnist"
PLAIN, SHARED = "ResNet32", "ResNet32_DoubleShared"


def read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST's format, gzipped) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_fashion_as_cifar10(source: str, root: str, n_train: int, n_test: int, seed: int) -> str:
    """Write a random ``n_train``/``n_test`` subset of Fashion-MNIST under ``root/cifar-10-batches-py``."""
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    rng = np.random.default_rng(seed)

    def rows(split: str, n: int):
        images = read_idx(os.path.join(source, f"{split}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(source, f"{split}-labels-idx1-ubyte.gz"))
        pick = np.sort(rng.permutation(len(labels))[:n])
        padded = np.pad(images[pick], ((0, 0), (2, 2), (2, 2)))  # 28x28 -> 32x32
        chw = np.repeat(padded[:, None], 3, axis=1)  # grey -> 3 channels
        return chw.reshape(n, 3072), labels[pick].astype(int).tolist()

    def dump(name: str, data, labels, tag: str) -> None:
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"batch_label": tag, "labels": labels, "data": data, "filenames": []}, f, protocol=2)

    data, labels = rows("train", n_train)
    for i, idx in enumerate(np.array_split(np.arange(n_train), 5), 1):
        dump(f"data_batch_{i}", data[idx], [labels[j] for j in idx], f"training batch {i} of 5")
    dump("test_batch", *rows("t10k", n_test), "testing batch 1 of 1")
    return root


class Study:
    """The runs of one study, each a script of this project called in process, its output kept in a log."""

    def __init__(self, args) -> None:
        self.args = args
        self.log = open(os.path.join(args.out_dir, "study.log"), "a")
        self.common = [
            f"--dataset_path={args.data}",
            "--device=cpu",
            "--num_workers=0",
            f"--batch_size={args.batch_size}",
            f"--seed={args.seed}",
            "--save_every_minutes=0",
        ]

    def _quiet(self):
        stack = contextlib.ExitStack()
        stack.enter_context(contextlib.redirect_stdout(self.log))
        stack.enter_context(contextlib.redirect_stderr(self.log))
        return stack

    def train(self, name: str, flags: list[str]) -> str:
        """Train into ``out_dir/name``; returns the last checkpoint."""
        from utils.cli import parse_train_args
        from utils.train import fit

        args = parse_train_args("cifar10", [*flags, *self.common, f"--output_dir={self.folder(name)}"], "train")
        with self._quiet():
            fit(args)
        (last,) = [f for f in os.listdir(self.folder(name)) if f.endswith("-last.pth")]
        return os.path.join(self.folder(name), last)

    def top1(self, checkpoint: str) -> float:
        from utils.cli import parse_eval_args
        from utils.evaluate import evaluate_checkpoint

        args = parse_eval_args("cifar10", [f"--pretrained={checkpoint}", *self.common[:-2]], "eval")
        with self._quiet():
            return float(evaluate_checkpoint(args)["top1"])

    def convert(self, plain: str, shared_rank: int) -> tuple[str, dict]:
        import torch

        from models.convert import main

        out = os.path.join(self.args.out_dir, f"converted-S{shared_rank}U1.pth")
        argv = ["--from", plain, "--model", SHARED, "--shared_rank", str(shared_rank), "--unique_rank", "1"]
        argv += ["--out", out, "--calibrate", str(self.args.calibrate), "--dataset_path", self.args.data]
        with self._quiet():
            if main(argv) != 0:
                raise SystemExit(f"conversion failed; see {self.log.name}")
        return out, torch.load(out, weights_only=True)["converted_from"]

    def folder(self, name: str) -> str:
        return os.path.join(self.args.out_dir, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m utils.convert_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--fashion", default=FASHION, help="folder of Fashion-MNIST's four idx .gz files")
    p.add_argument("--out_dir", default="./convert_study", help="data, checkpoints and study.log go here")
    p.add_argument("--n_train", type=int, default=400)
    p.add_argument("--n_test", type=int, default=200)
    p.add_argument("--epochs", type=int, default=4, help="of the plain run")
    p.add_argument("--ranks", default="4,8,16", help="shared ranks S of ResNet32_DoubleShared (unique rank 1)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=0.05, help="of the plain and the from-scratch runs")
    p.add_argument("--finetune_lr", type=float, default=0.01)
    p.add_argument("--calibrate", type=int, default=256, help="training images that calibrate the basis BN")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.fashion, "train-images-idx3-ubyte.gz")):
        p.error(f"no Fashion-MNIST under {args.fashion!r}: apt-get install dataset-fashion-mnist, or pass --fashion")
    if os.path.exists(args.out_dir):
        p.error(f"{args.out_dir!r} exists: remove it or pass another --out_dir")
    os.makedirs(args.out_dir)
    args.data = write_fashion_as_cifar10(
        args.fashion, os.path.join(args.out_dir, "data"), args.n_train, args.n_test, args.seed
    )
    study, start = Study(args), time.time()
    recipe = [f"--lr={args.lr}", "--momentum=0.9", "--weight_decay=5e-4", "--lambdaR=10"]
    plain = study.train("plain", [f"--model={PLAIN}", f"--epochs={args.epochs}", *recipe])
    plain_top1 = study.top1(plain)
    print(f"plain {PLAIN}, {args.epochs} epochs: top-1 {plain_top1:.2f}", flush=True)
    rows = []
    for s in map(int, args.ranks.split(",")):
        converted, report = study.convert(plain, s)
        before = study.top1(converted)
        ranks = [f"--model={SHARED}", f"--shared_rank={s}", "--unique_rank=1"]
        finetune = [f"--pretrained={converted}", "--epochs=1", f"--lr={args.finetune_lr}", *recipe[1:]]
        after = study.top1(study.train(f"finetune-S{s}", [*ranks, *finetune]))
        scratch = study.top1(study.train(f"scratch-S{s}", [*ranks, f"--epochs={args.epochs + 1}", *recipe]))
        rows.append(
            f"| S{s}U1 | {report['params_after']:,} | {report['top1_agreement']:.1f}% / "
            f"{report['logit_rel_error']:.3f} | {before:.2f} | {after:.2f} | {scratch:.2f} |"
        )
        print(rows[-1], flush=True)
    print(
        f"\nplain {PLAIN} ({report['params_before']:,} params), {args.epochs} epochs: top-1 {plain_top1:.2f}\n\n"
        f"| {SHARED} | params | converted vs plain: top-1 agreement / logit rel. error | top-1 converted | "
        f"after 1 fine-tuning epoch | from scratch, {args.epochs + 1} epochs |\n|---|---|---|---|---|---|"
    )
    print("\n".join(rows))
    print(
        f"\nFashion-MNIST subset: {args.n_train} training / {args.n_test} test images; batch {args.batch_size}, "
        f"seed {args.seed}, lr {args.lr}, fine-tuning lr {args.finetune_lr}, basis BN calibrated on "
        f"{args.calibrate} images; {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
