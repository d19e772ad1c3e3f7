"""What a training run shows and records: the authors' lines (people grep them), one line per epoch with the whole
run's ETA, TensorBoard scalars (per epoch, and loss/R every check of a pass) and, at the end, the run's
hyper-parameters with its final metrics, so that TensorBoard's HParams tab lays runs with other ranks or lambdaR side
by side."""

from __future__ import annotations

import os

from utils.engine import json_line, warn

# The flags that tell runs apart in TensorBoard's HParams tab.
HPARAMS = (
    "dataset",
    "model",
    "shared_rank",
    "unique_rank",
    "lambdaR",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "epochs",
    "seed",
    "val_split",
    "amp",
    "channels_last",
)


def duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h07m``."""
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def tensorboard_dir(out_dir: str, stem: str, resume: bool) -> str:
    """``<out_dir>/runs/<stem>``, where a new run beside an earlier run's events takes the next free ``<stem>-run2``,
    ``-run3``, ... (TensorBoard then shows the runs apart instead of one tangled curve); ``--resume`` appends to the
    newest, the folder of the run it continues."""
    runs = os.path.join(out_dir, "runs")
    folders = [os.path.join(runs, stem)] + [os.path.join(runs, f"{stem}-run{n}") for n in range(2, 10_000)]
    for i, folder in enumerate(folders):
        used = os.path.isdir(folder) and bool(os.listdir(folder))
        if resume and not os.path.isdir(folders[i + 1]):
            return folder
        if not resume and not used:
            return folder
    return folders[-1]


class RunLog:
    """The printing and TensorBoard side of a :class:`~utils.train.TrainingRun` (TensorBoard on rank 0 only)."""

    def __init__(self, args, select: str, epochs: int) -> None:
        self.args, self.select, self.epochs = args, select, epochs
        self.writer = None
        self.epoch_seconds: list = []  # of the epochs this process trained: a resumed run's ETA uses its own pace
        self.best_just_printed = False

    def open_tensorboard(self, log_dir: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            warn(f"TensorBoard logging disabled ({e})")
            return
        self.writer = SummaryWriter(log_dir=log_dir)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def eta(self, epoch: int) -> float | None:
        """Seconds left after ``epoch`` at the pace of the last (up to 5) epochs, None before the first."""
        recent = self.epoch_seconds[-5:]
        return (self.epochs - epoch) * sum(recent) / len(recent) if recent else None

    def step_scalars(self, global_step: int, loss: float, reg: float | None) -> None:
        if self.writer is not None:
            self.writer.add_scalar("step/loss", loss, global_step)
            if reg is not None:
                self.writer.add_scalar("step/R", reg, global_step)

    def test_lines(self, te: dict, best: tuple, improved: bool, periodic: bool) -> None:
        """The authors' lines (CIFAR: on improvement only; ILSVRC: every epoch); ``Val`` ones with --val_split."""
        label, name = ("Val", "Best_Val_Acc") if self.args.val_split else ("Test", "Best_Acc")
        if self.args.dataset == "ilsvrc":
            print("%s_Acc_Top1/5 = %.3f\t%.3f" % (label, te["top1"], te["top5"]))
            if improved:
                print("Saving Best..\n%s_top1/5 = %.3f\t%.3f" % (name, *best))
            if periodic:
                print("Saving..")
        elif improved:
            print("%s_top1 = %.3f\n%s_top5 = %.3f" % (name, best[0], name, best[1]))
        self.best_just_printed = improved and self.args.dataset != "ilsvrc"

    def epoch_line(self, epoch: int, stage: int, lr: float, tr: dict, te: dict, best: tuple, seconds: float) -> None:
        self.epoch_seconds.append(seconds)
        reg = f" R {tr['reg']:.5f}" if tr["reg"] is not None else ""
        left = self.eta(epoch)
        eta = f" | ETA {duration(left)}" if left else ""
        print("Time:  %.3f" % seconds)
        print(
            f"[epoch {epoch}/{self.epochs}] stage {stage + 1} lr {lr:.5g} | "
            f"train loss {tr['loss']:.4f}{reg} top1 {tr['top1']:.2f} | "
            f"{self.select} loss {te['loss']:.4f} top1 {te['top1']:.2f} top5 {te['top5']:.2f} | "
            f"best {best[0]:.2f} ({'--pretrained' if best[2] is None else f'epoch {best[2]}'}) | "
            f"{seconds:.1f}s {tr['img_per_s']:.0f} img/s{eta}"
        )
        if self.writer is not None:
            scalars = {
                "train/loss": tr["loss"],
                "train/top1": tr["top1"],
                "train/top5": tr["top5"],
                f"{self.select}/loss": te["loss"],
                f"{self.select}/top1": te["top1"],
                f"{self.select}/top5": te["top5"],
                "lr": lr,
                "train/img_per_s": tr["img_per_s"],
                "train/R": tr["reg"],
            }
            for key, value in scalars.items():
                if value is not None:
                    self.writer.add_scalar(key, value, epoch)
            self.writer.flush()

    def final_lines(self, result: dict, final: dict | None) -> None:
        """The authors' closing lines (not repeated when the last epoch just printed the same best), then JSON."""
        best = (result["best_acc"], result["best_acc5"])
        if final is not None:
            for label, value in zip(
                ("Best_Val_Acc_top1", "Best_Val_Acc_top5", "Test_Acc_top1", "Test_Acc_top5"),
                (*best, result["test_acc"], result["test_acc5"]),
            ):
                print("%s = %.3f" % (label, value))
            chosen = (
                f"the checkpoint chosen on {self.args.val_split} held-out training images"
                if result["best_epoch"] is not None
                else "the last checkpoint (no epoch scored above 0% on them)"
            )
            print(f"The test set was scored once, on {chosen} (epoch {final['epoch']})")
        elif not self.best_just_printed:
            print("Best_Acc_top1 = %.3f\nBest_Acc_top5 = %.3f" % best)
        print(json_line(result))

    def hparams(self, result: dict, epochs_done: int) -> None:
        """The run's flags and final metrics in TensorBoard's HParams tab (written next to its scalars)."""
        if self.writer is None:
            return
        flags = {
            k: v if isinstance(v, (bool, int, float, str)) else str(v)
            for k in HPARAMS
            if (v := getattr(self.args, k, None)) is not None
        }
        metrics = {
            "hparam/best_top1": result["best_acc"],
            "hparam/test_top1": result["test_acc"],
            "hparam/test_top5": result["test_acc5"],
            "hparam/epochs_done": epochs_done,
        }
        self.writer.add_hparams(flags, metrics, run_name=os.curdir, global_step=epochs_done)
