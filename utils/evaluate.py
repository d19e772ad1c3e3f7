"""The evaluation scripts' run: rebuild the model a checkpoint holds, fold it for inference, score the test/val set."""

from __future__ import annotations

import torch

from models import fold
from models.folding import foldable
from models.pretrained import load_weights, read_checkpoint, resolve_model
from models.registry import rank_flags
from models.summary import count_params, paper_line, paper_row
from utils import distributed
from utils.data import build_loaders
from utils.engine import (
    Precision,
    RunError,
    evaluate,
    json_line,
    progress_enabled,
    run_context,
    seed_everything,
    warn,
    wrap_model,
)
from utils.run_start import check_classes, describe, pretrained_path


def evaluate_checkpoint(args) -> dict:
    """Load ``--pretrained``, fold (unless ``--no_fold``), print the authors' ``Eval_*`` lines and one JSON."""
    with run_context(args.device) as device:
        seed_everything(args.seed)
        ckpt = distributed.from_main(lambda: read_checkpoint(pretrained_path(args)))
        model, inferred = resolve_model(
            ckpt,
            args.pretrained,
            model=args.model or ckpt.get("model") or args.fallback["model"],
            dataset=args.dataset,
            shared_rank=args.shared_rank,
            unique_rank=args.unique_rank,
        )
        if inferred:
            print(f"Ranks read from the checkpoint: {rank_flags(model.cfg.build_kwargs())}")
        load_weights(model, ckpt)
        broken = next(
            (k for k, t in model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()), None
        )
        if broken is not None:
            raise RunError(
                f"checkpoint {args.pretrained!r} holds non-finite weights ({broken}): it is from a diverged "
                f"run and cannot be evaluated; evaluate an earlier checkpoint"
            )
        info = distributed.current()
        loaders = build_loaders(
            args.dataset,
            args.dataset_path,
            args.batch_size,
            num_workers=args.num_workers,
            device=device,
            seed=args.seed,
            channels_last=args.channels_last,
            train=False,
            rank=info.rank,
            world_size=info.world_size,
        )
        check_classes(loaders, model.cfg.num_classes, args.dataset_path, args.pretrained)
        params, described = count_params(model), describe(model)
        model.eval()
        form = "unfolded"
        if not args.no_fold and not foldable(model):  # the test models.export uses: one answer per model
            form = "unfolded (no foldable blocks)"
        elif not args.no_fold:
            try:
                model, form = fold(model), "folded for inference"
            except Exception as e:  # noqa: BLE001
                warn(f"inference folding failed ({type(e).__name__}: {e}); evaluating the unfolded model")
        model.to(device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
        precision = Precision.make(args.amp, device)
        net = wrap_model(model, device, precision, compile=args.compile, data_parallel=not info.enabled)
        world = f" | {info.world_size} processes" if info.enabled else ""
        print(
            f"{args.dataset} {described} | {params:,} params | {args.pretrained} | {device} {precision.label}{world} "
            f"| {form}"
        )
        te = evaluate(
            net,
            model,
            loaders.test,
            device=device,
            precision=precision,
            channels_last=args.channels_last,
            progress=progress_enabled(),
        )
        print(
            "Eval_Acc_top1 = %.3f\nEval_Acc_top5 = %.3f\nEval_Err_top1 = %.3f\nEval_Err_top5 = %.3f"
            % (te["top1"], te["top5"], 100 - te["top1"], 100 - te["top5"])
        )
        row = paper_row(args.dataset, model.cfg.name, model.cfg.build_kwargs())
        if row is not None:  # the published number this checkpoint is meant to reproduce
            print(f"Compare: {paper_line(row)}")
        result = {
            "dataset": args.dataset,
            "model": model.cfg.name,
            "model_kwargs": model.cfg.build_kwargs(),
            "params": params,
            "checkpoint": args.pretrained,
            "checkpoint_epoch": ckpt.get("epoch"),
            "folded": form == "folded for inference",
            "images": te["images"],
            "top1": te["top1"],
            "top5": te["top5"],
            "top1_err": round(100.0 - te["top1"], 6),
            "top5_err": round(100.0 - te["top5"], 6),
            "loss": te["loss"],
            "seconds": round(te["seconds"], 3),
            "paper_row": row and row.row,
            "paper_top1_err": row and row.top1_err,
        }
        print(json_line(result))
        return result
