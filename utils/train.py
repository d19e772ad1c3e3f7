"""A training run of the paper's recipes (SPEC sections 5-7): :func:`fit`. Every user-input check happens before the
first write; a signal ends the run after a resumable save (status 130/143), a second one at once; under torchrun only
rank 0 writes and all ranks stop at the same step."""

from __future__ import annotations

import json
import os
import signal
import time

import torch

from models import OrthogonalityRegularizer
from models.pretrained import (
    CheckpointError,
    checkpoint_acc,
    head_classes,
    load_weights,
    read_checkpoint,
    state_dict_of,
)
from models.registry import NUM_CLASSES
from models.summary import count_params
from utils import distributed
from utils.checkpoint import (
    atomic_write_bytes,
    capture_rng_state,
    lock_run_files,
    make_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from utils.data import build_loaders, images_in
from utils.engine import (
    Interrupted,
    NonFiniteLoss,
    Precision,
    RunError,
    Schedule,
    StopSignals,
    end_passes,
    evaluate,
    pass_stats,
    progress_enabled,
    run_context,
    seed_everything,
    train_one_epoch,
    warn,
    wrap_model,
)
from utils.run_start import (
    check_classes,
    check_earlier_files,
    decide_start,
    describe,
    model_for_run,
    provenance,
    run_stem,
)
from utils.runlog import RunLog, duration, tensorboard_dir


def fit(args) -> dict:
    """Train as the recipe in ``args`` says (``train_<dataset>.py``); returns the summary, also printed as a JSON line.

    The epoch loop is here and calls :func:`~utils.engine.train_one_epoch` itself; :class:`TrainingRun` holds the run's
    objects and the small hooks the loop calls (epoch start, stop checks, saves, logging)."""
    with run_context(args.device, args.batch_size) as device, StopSignals() as stop:
        run = None
        try:
            run = TrainingRun(args, device, stop)
            print(run.header())
            if run.state.epoch >= run.schedule.epochs:  # a finished run: print its result, write nothing
                print(f"Nothing to do: the run already completed epoch {run.state.epoch} of {run.schedule.epochs}")
                return run.summary(run.score_on_test() if args.val_split else None)
            run.begin()
            for epoch in range(run.state.epoch + 1, run.schedule.epochs + 1):
                samples, totals, seconds = run.begin_epoch(epoch)
                while True:  # one pass, or several when paused by the save clock or a signal for a mid-epoch save
                    run.loaders.train.set_epoch(epoch, start=samples // run.world)
                    try:
                        r = train_one_epoch(
                            run.net,
                            run.model,
                            run.loaders.train,
                            run.optimizer,
                            print_first=samples == 0,
                            regularizer=run.regularizer,
                            lambda_r=args.lambdaR,
                            **run.pass_kw,
                            stop=run.pause_requested,
                            desc=run.bar_label(epoch),
                            on_check=run.step_logger(epoch, samples),
                        )
                    except NonFiniteLoss as e:
                        raise run.diverged(e, epoch, samples) from None
                    samples, seconds = samples + r["images"], seconds + r["seconds"]
                    totals = r["totals"] if totals is None else [a + b for a, b in zip(totals, r["totals"])]
                    if not r["stopped"]:
                        break
                    run.save(run.mid_epoch_checkpoint(samples, totals), [run.last_path])
                    run.saved_step = (epoch, samples)
                    run.stop_if_asked()
                tr = pass_stats(totals, seconds, run.regularizer is not None)
                print("Training_Acc_Top1 = %.3f\nTraining_Acc_Top5 = %.3f" % (tr["top1"], tr["top5"]))
                te = evaluate(run.eval_net, run.model, run.select_loader, desc=run.select, **run.pass_kw)
                paths = run.end_epoch(epoch, te)
                run.save(run.checkpoint(epoch, te, run.lr), paths, epoch)
                run.log_epoch(epoch, tr, te)
                run.stop_if_asked()
            return run.summary(run.score_on_test() if args.val_split else None)
        except KeyboardInterrupt as e:  # ours (a signal), or Ctrl-C before/after the handlers
            if run is None or not run.started:
                raise
            signum = getattr(e, "signum", signal.SIGINT)
            raise Interrupted(signum, run.interrupt_message(signum)) from None
        finally:
            if run is not None:
                run.log.close()
            stop.ending = True
            end_passes()  # while our handlers still catch a late Ctrl-C


class TrainingRun:
    """The objects of one run (model, optimizer, loaders, state) and the hooks :func:`fit`'s epoch loop calls."""

    def __init__(self, args, device: torch.device, stop: StopSignals):
        self.args, self.device, self.stop = args, device, stop
        info = distributed.current()
        self.world, self.rank, self.main = info.world_size, info.rank, info.is_main
        seed_everything(args.seed)
        self.out_dir, self.stem = args.output_dir, run_stem(args)
        self.best_path = os.path.join(self.out_dir, self.stem + ".pth")
        self.last_path = os.path.join(self.out_dir, self.stem + "-last.pth")
        self.tb_dir = os.path.join(self.out_dir, "runs", self.stem)  # TensorBoard's
        for path in (self.out_dir, os.path.dirname(self.tb_dir), self.tb_dir):
            if os.path.exists(path) and not os.path.isdir(path):
                raise RunError(f"{path!r} exists and is not a directory: move it, or pass another --output_dir")
        self.schedule = Schedule.from_recipe(args.lr, args.schedule, args.epochs)
        self.model = model_for_run(args)  # before the data: ranks that cannot build fail fast
        self.start = distributed.from_main(lambda: decide_start(args, self.last_path, self.schedule))
        self.state = self.start.state
        self.best_file = self.start.best_file  # where the best checkpoint in force is (None: not written yet)
        self.select = "val" if args.val_split else "test"
        self.log = RunLog(args, self.select, self.schedule.epochs)
        self.provenance = provenance(args)
        self._setup_data()
        self._setup_model()
        self.saved = self.state.epoch if self.start.kind == "resume" else 0  # last epoch whose files are on disk
        self.saved_step = None  # (epoch, samples) of the last mid-epoch save
        self.started = False  # whether begin() ran: from then on a signal's message says what is on disk
        ckpt = self.start.ckpt or {}
        self.last_scores = {"top1": checkpoint_acc(ckpt) or 0.0, "top5": float(ckpt.get("acc5") or 0.0)}
        self._rearm_save_clock()
        # last of the checks, so that a bad flag, dataset or checkpoint is named first
        distributed.from_main(lambda: check_earlier_files(args, self.start, self.out_dir, self.stem))

    def _rearm_save_clock(self) -> None:
        self.next_save = time.monotonic() + (60 * self.args.save_every_minutes or float("inf"))  # 0: no clock

    def _new_optimizer(self, lr: float) -> torch.optim.SGD:
        """One group over all parameters: weight decay reaches BN and biases too, as in the authors' recipe."""
        return torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=self.args.momentum, weight_decay=self.args.weight_decay
        )

    def _setup_data(self) -> None:
        args = self.args
        self.loaders = build_loaders(
            args.dataset,
            args.dataset_path,
            args.batch_size // self.world,
            num_workers=args.num_workers,
            device=self.device,
            seed=args.seed,
            channels_last=args.channels_last,
            val_split=args.val_split,
            split_seed=self.start.split_seed,
            rank=self.rank,
            world_size=self.world,
        )
        if args.dataset == "ilsvrc" and self.loaders.num_classes != self.model.cfg.num_classes:
            seed_everything(args.seed)  # any ImageFolder tree: the head is as wide as its class folders are many
            self.model = model_for_run(args, num_classes=self.loaders.num_classes)
        if self.start.ckpt is not None:
            heads = head_classes(args.dataset, state_dict_of(self.start.ckpt)) or NUM_CLASSES[args.dataset]
            check_classes(self.loaders, heads, args.dataset_path, self.start.path)
        self.select_loader = self.loaders.val if args.val_split else self.loaders.test
        self.steps_per_epoch = len(self.loaders.train)  # of a whole epoch: no pass has started yet
        images = images_in(self.loaders.train)
        if self.start.samples >= images:  # a mid-epoch save of a larger dataset
            raise RunError(
                f"checkpoint {self.start.path!r} stopped after step {self.start.ckpt.get('epoch_step')} of epoch "
                f"{self.state.epoch + 1} (sample {self.start.samples}), but the data under "
                f"--dataset_path={args.dataset_path!r} makes only {self.steps_per_epoch} steps per epoch ({images} "
                f"training images): resume with the dataset the run was trained on"
            )

    def _setup_model(self) -> None:
        args, model, device = self.args, self.model, self.device
        if args.sync_bn and self.world > 1:
            model = self.model = distributed.convert_sync_batchnorm(model, self.device)
        model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        if self.rank:  # the same initial weights everywhere; dropout streams differ per rank
            seed_everything(args.seed + 1_000_003 * self.rank)
        self.optimizer = self._new_optimizer(self.schedule.lr_at(self.state.epoch + 1))
        self.precision = Precision.make(args.amp, device)
        self.pass_kw = dict(
            device=device, precision=self.precision, channels_last=args.channels_last, progress=progress_enabled()
        )  # of both training and evaluation passes
        self.regularizer = OrthogonalityRegularizer(model, args.schedule["include_unique"]) or None  # plain: CE only
        self._restore()
        self.net = wrap_model(model, device, self.precision, compile=args.compile, ddp=self.world > 1)
        # evaluation runs without DDP: ranks may score different numbers of batches
        self.eval_net = (
            wrap_model(model, device, self.precision, compile=args.compile, data_parallel=False)
            if self.world > 1
            else self.net
        )

    def _restore(self) -> None:
        """Weights, optimizer, scaler and (for --resume) the random streams of the start checkpoint."""
        start, state = self.start, self.state
        if start.ckpt is None:
            return
        load_weights(self.model, start.ckpt)
        opt_state, problem = start.ckpt.get("optimizer_state_dict"), "has no optimizer state"
        if opt_state:
            try:
                self.optimizer.load_state_dict(opt_state)
                problem = None
            except (ValueError, KeyError, TypeError, RuntimeError) as e:
                problem = f"holds optimizer state that does not fit this model ({e})"
        if problem and start.kind == "resume":
            raise CheckpointError(f"checkpoint {start.path!r} {problem}: it cannot be resumed")
        if problem:
            warn(f"{start.path} {problem}; starting with fresh SGD momentum")
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(state.epoch + 1)
        if start.kind == "pretrained":
            print(f"Starting from {start.path} (top-1 {state.best_acc:.3f}) at epoch {state.epoch + 1}")
            return
        if self.precision.scaler is not None and start.ckpt.get("scaler_state_dict"):
            self.precision.scaler.load_state_dict(start.ckpt["scaler_state_dict"])
        print(
            f"Resuming from {start.path} (epoch {state.epoch}, stage {state.stage + 1}, best {self.select} "
            f"top-1 {state.best_acc:.3f})"
        )

    def header(self) -> str:
        args, loaders, sch = self.args, self.loaders, self.schedule
        sizes = f"{images_in(loaders.train)} train / "
        if args.val_split:
            sizes += f"{images_in(loaders.val)} val (held out, split seed {self.start.split_seed}) / "
        ddp = (
            f" | DDP {self.world} processes x batch {args.batch_size // self.world}{' sync BN' if args.sync_bn else ''}"
            if self.world > 1
            else ""
        )
        paper = " (ranks not given: the paper's row)" if getattr(args, "default_ranks", None) else ""
        classes = self.model.cfg.num_classes
        heads = f" | {classes} classes (the data's folders)" if args.dataset == "ilsvrc" and classes != 1000 else ""
        return (
            f"{args.dataset} {describe(self.model)}{paper} | {count_params(self.model):,} params | {self.device} "
            f"{self.precision.label}{ddp} | {sch.describe()} | {sizes}"
            f"{images_in(loaders.test)} test images{heads} | best checkpoint chosen on {self.select}"
        )

    def _prepare_output(self) -> None:
        """Rank 0: the output folder, ``-args.json`` (resolved flags, how to reproduce) and the TensorBoard writer."""
        if not self.main:
            return
        args = self.args
        try:
            self.lock = lock_run_files(self.out_dir, self.stem)  # held until the process ends
            if args.resume is None and os.path.exists(self.last_path):  # --overwrite (else refused before)
                warn(f"{self.last_path} exists and will be overwritten by this new run (--overwrite)")
            resolved = dict(
                vars(args),
                device=str(self.device),
                milestones=list(self.schedule.milestones),
                params=count_params(self.model),
                world_size=self.world,
                provenance=self.provenance,
                num_classes=self.model.cfg.num_classes,
                split_seed=self.start.split_seed if args.val_split else None,
            )
            args_path = os.path.join(self.out_dir, self.stem + "-args.json")
            atomic_write_bytes((json.dumps(resolved, indent=2, sort_keys=True, default=str) + "\n").encode(), args_path)
        except OSError as e:
            raise RunError(f"cannot write to --output_dir={self.out_dir!r}: {e.strerror or e}") from None
        logs = tensorboard_dir(self.out_dir, self.stem, resume=args.resume is not None)
        self.log.open_tensorboard(logs)
        print(f"Run files: {self.best_path} (best), {self.last_path}, {args_path} | TensorBoard logs: {logs}")

    def begin(self) -> None:
        """Before the first epoch: the output files, then the random streams of a resumed run."""
        self._prepare_output()
        self.began, self.prior_seconds, self.started = time.monotonic(), self.state.seconds, True
        states = self.start.rng_states
        if states:  # last, so that building things above does not shift the random streams
            restore_rng_state(states[self.rank] if len(states) == self.world else states[0] if not self.rank else None)

    def begin_epoch(self, epoch: int) -> tuple[int, list | None, float]:
        """Stage, restart and LR of ``epoch``, the authors' epoch line; returns where the epoch starts: samples done
        (all ranks), their totals and seconds (a mid-epoch --resume continues its first epoch only)."""
        sch, state = self.schedule, self.state
        self.epoch, self.epoch_began = epoch, time.perf_counter()
        stage, self.lr = sch.stage(epoch), sch.lr_at(epoch)
        if sch.restart and stage > state.stage:
            self.restart_stage(epoch)
        state.stage = stage
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        samples, totals = self.start.samples, self.start.totals
        self.start.samples, self.start.totals = 0, None
        resumed = ""
        if samples:
            batch = self.args.batch_size
            resumed = (
                f" (resumed at step {samples // batch})" if samples % batch == 0 else f" (resumed at sample {samples})"
            )
        cuda = f"Cuda {self.args.visible_device} " if self.device.type == "cuda" else ""  # the authors' line, on GPUs
        print(f"\n{cuda}{'Basis ' if self.regularizer is not None else ''}Epoch: {epoch}{resumed}")
        return samples, totals, 0.0

    def pause_requested(self) -> bool:
        """Whether the pass should stop for a mid-epoch save: a signal, or the save clock."""
        return self.stop() or time.monotonic() >= self.next_save

    def stop_if_asked(self) -> None:
        """After a save: end the run if any rank had a signal (all ranks stop at the same step)."""
        if distributed.any_rank(self.stop(), self.device):
            raise Interrupted(self.stop.signum or signal.SIGTERM)

    def step_logger(self, epoch: int, samples: int):
        """``on_check`` of a pass that starts at ``samples``: per-step scalars numbered over the whole run."""
        first = (epoch - 1) * self.steps_per_epoch + samples // self.args.batch_size
        return lambda i, loss, reg: self.log.step_scalars(first + i, loss, reg)

    def _steps(self, samples: int) -> int:
        return -(-samples // self.args.batch_size)  # this run's steps to cover ``samples``

    def diverged(self, e: NonFiniteLoss, epoch: int, samples: int) -> RunError:
        kept = (
            f"the last checkpoint ({self.last_path}) is intact"
            if self.saved or self.saved_step
            else "nothing was saved"
        )
        return RunError(
            f"the loss became {e.value} at epoch {epoch}, step {self._steps(samples) + e.step} of "
            f"{self.steps_per_epoch} (lr {self.lr:g}); stopped without saving: {kept}; lower --lr (or --lambdaR), or "
            f"--resume from the last checkpoint"
        )

    def mid_epoch_checkpoint(self, samples: int, totals: list) -> dict:
        """The -last.pth of a paused epoch: ``epoch`` is the last completed one, ``epoch_samples`` (all ranks, with
        ``world_size``) where the current one stands, so a resume with another --batch_size continues there."""
        ckpt = self.checkpoint(self.state.epoch, self.last_scores, self.lr)
        ckpt.update(epoch_step=self._steps(samples), epoch_samples=samples, epoch_totals=totals)
        return ckpt

    def end_epoch(self, epoch: int, te: dict) -> list:
        """The best-checkpoint rule (strictly greater, as the authors); returns the files this epoch's save writes."""
        state = self.state
        self.improved = te["top1"] > state.best_acc
        if self.improved:
            state.best_acc, state.best_acc5, state.best_epoch = te["top1"], te["top5"], epoch
            self.best_file = self.best_path
        state.epoch, self.last_scores = epoch, te
        self.periodic = self.args.dataset == "ilsvrc" and epoch % 5 == 0  # the authors' ILSVRC history files
        paths = ([self.best_path] if self.improved else []) + [self.last_path]
        return paths + ([os.path.join(self.out_dir, f"{self.stem}epoch{epoch}.pth")] if self.periodic else [])

    def log_epoch(self, epoch: int, tr: dict, te: dict) -> None:
        state = self.state
        best = (state.best_acc, state.best_acc5, state.best_epoch)
        self.log.test_lines(te, best[:2], self.improved, self.periodic)
        self.log.epoch_line(epoch, state.stage, self.lr, tr, te, best, time.perf_counter() - self.epoch_began)

    def interrupt_message(self, signum: int) -> str:
        name, epoch = signal.Signals(signum).name, getattr(self, "epoch", self.state.epoch + 1)
        if self.saved_step and self.saved_step[0] == epoch and self.saved < epoch:
            e, samples = self.saved_step
            return (
                f"interrupted by {name} during epoch {e}: its first {self._steps(samples)} of {self.steps_per_epoch} "
                f"steps are saved in {self.last_path}; rerun the same command with --resume"
            )
        where = f"after epoch {self.saved}" if self.saved >= epoch else f"during epoch {epoch}"
        kept = (
            f"epoch {self.saved} (the last completed) is in {self.last_path}; rerun the same command with --resume"
            if self.saved
            else "no epoch had completed, so there is nothing to resume"
        )
        return f"interrupted by {name} {where}: {kept}"

    def bar_label(self, epoch: int) -> str:
        left = self.log.eta(epoch - 1)
        return f"epoch {epoch}/{self.schedule.epochs}" + (f" (run ETA {duration(left)})" if left else "")

    def checkpoint(self, epoch: int, te: dict, lr: float) -> dict:
        state, args, scaler = self.state, self.args, self.precision.scaler
        rng_states = distributed.all_gather_object(capture_rng_state())
        split = {"n": args.val_split, "seed": self.start.split_seed} if args.val_split else None
        return make_checkpoint(
            self.model,
            self.optimizer,
            epoch=epoch,
            acc=te["top1"],
            acc5=te["top5"],
            selection=self.select,
            **{f"{self.select}_acc": te["top1"], f"{self.select}_acc5": te["top5"]},
            val_split=split,
            best_acc=state.best_acc,
            best_acc5=state.best_acc5,
            best_epoch=state.best_epoch,
            stage=state.stage,
            lr=lr,
            scaler_state_dict=scaler.state_dict() if scaler else None,
            rng_state=rng_states[0],
            rng_states=rng_states if self.world > 1 else None,
            world_size=self.world,
            args=vars(args),
            epoch_step=0,
            epoch_samples=0,
            epoch_totals=None,
            train_seconds=self.prior_seconds + time.monotonic() - self.began,
            provenance=self.provenance,
        )

    def save(self, ckpt: dict, paths: list, epoch: int | None = None) -> None:
        if self.main:
            try:
                save_checkpoint(ckpt, paths)
            except OSError as e:
                part = self.saved_step if self.saved_step and self.saved_step[0] > self.saved else None
                held = (
                    f"the first {self._steps(part[1])} steps of epoch {part[0]}"
                    if part
                    else f"epoch {self.saved}"
                    if self.saved
                    else None
                )
                kept = f"{self.last_path} still holds {held}" if held else "no checkpoint of this run had been written"
                raise RunError(f"could not write checkpoint {paths[0]!r} ({e.strerror or e}); {kept}") from None
        self.saved = epoch or self.saved
        self._rearm_save_clock()

    def restart_stage(self, epoch: int) -> None:
        """CIFAR-100: a new stage starts from the best weights so far, with a fresh SGD (momentum buffers zero)."""
        state, lr = self.state, self.schedule.lr_at(epoch)

        def pick() -> str | None:  # the best this run has seen
            if state.best_epoch is not None and self.best_file and os.path.isfile(self.best_file):
                return self.best_file
            return self.start.path if self.start.kind == "pretrained" else None

        source = distributed.from_main(pick)  # decided where the files are, so that every rank does the same
        if source is not None:
            load_weights(self.model, distributed.from_main(lambda: read_checkpoint(source)))
        what = (
            f"the best checkpoint ({source}, top-1 {state.best_acc:.3f})"
            if source
            else "the current weights (no best checkpoint yet)"
        )
        print(
            f"Stage {self.schedule.stage(epoch) + 1} from epoch {epoch}: restarting from {what} with a fresh SGD at "
            f"lr {lr:g}"
        )
        self.optimizer = self._new_optimizer(lr)
        if self.precision.scaler is not None:
            self.precision.scaler = torch.amp.GradScaler("cuda")

    def score_on_test(self) -> dict:
        """--val_split: the checkpoint chosen on validation, scored once on the test set and stored in its file."""
        state = self.state
        path = self.best_file if state.best_epoch is not None and self.best_file else self.last_path
        ckpt = distributed.from_main(lambda: read_checkpoint(path))
        if ckpt.get("test_acc") is None or ckpt.get("epoch") != (state.best_epoch or state.epoch):
            load_weights(self.model, ckpt)
            te = evaluate(self.eval_net, self.model, self.loaders.test, desc="test", **self.pass_kw)
            ckpt.update(test_acc=te["top1"], test_acc5=te["top5"])
            self.save(ckpt, [path])
            if self.log.writer is not None:
                for key, value in (
                    ("val_top1", ckpt.get("val_acc")),
                    ("test_top1", te["top1"]),
                    ("test_top5", te["top5"]),
                ):
                    self.log.writer.add_scalar(f"final/{key}", float(value or 0.0), self.schedule.epochs)
        return {
            "test_acc": float(ckpt["test_acc"]),
            "test_acc5": float(ckpt.get("test_acc5") or 0.0),
            "epoch": ckpt["epoch"],
        }

    def summary(self, final: dict | None) -> dict:
        state = self.state
        best = (state.best_acc, state.best_acc5)
        test = (final["test_acc"], final["test_acc5"]) if final is not None else best
        vals = best if final is not None else (None, None)
        result = {
            "best_acc": state.best_acc,
            "best_acc5": state.best_acc5,
            "best_epoch": state.best_epoch,
            "epochs": self.schedule.epochs,
            "selection": self.select,
            "val_acc": vals[0],
            "val_acc5": vals[1],
            "test_acc": test[0],
            "test_acc5": test[1],
            "best_checkpoint": self.best_file if state.best_epoch is not None else None,
            "last_checkpoint": self.last_path,
        }
        self.log.final_lines(result, final)
        self.log.hparams(result, state.epoch)
        return result
