"""``export-and-tune peft-train | peft-export | peft-import``: the PEFT stage's commands.

Each handler is a thin call into ``sam_reuse.finetune.train.train``,
``sam_reuse.finetune.export.export_finetuned`` or
``sam_reuse.finetune.checkpoint.import_lora``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sam_reuse.base.files import check_output_folder
from sam_reuse.cli.common import (
    add_first_order_arg,
    add_model_args,
    first_order_files,
    print_why_no_first_order,
    resolve_checkpoint,
    verify_records,
)
from sam_reuse.samples import BUNDLED_DATA


def register(sub: argparse._SubParsersAction) -> dict:
    from sam_reuse.finetune.config import METHODS, PeftConfig, TrainSettings

    config, settings = PeftConfig(method="lora"), TrainSettings()
    train = sub.add_parser("peft-train", help="train LoRA / SCT / SFA / SAM-COBOT adapters on labelled data (torch)")
    add_model_args(train)
    train.add_argument("--method", required=True, choices=METHODS)
    train.add_argument("--out", type=Path, required=True, help="folder for adapters.pt and train.json")
    train.add_argument("--data", type=Path, default=BUNDLED_DATA,
                       help="calibration data; adapters train on its search split (default: bundled isic2016)")
    train.add_argument("--prompt", default=settings.prompt, choices=["given", "point", "box"])
    train.add_argument("--search-images", type=int, help="first K records train (default: first half)")
    train.add_argument("--holdout-images", type=int, help="last M records are held out (never trained on)")
    train.add_argument("--blocks", default=config.blocks,
                       help=f"attention blocks with adapters: all, last:N or names (default: {config.blocks}; "
                            "'all' is meant for a GPU)")
    train.add_argument("--rank", type=int, default=config.rank, help=f"lora/cobot rank (default: {config.rank})")
    train.add_argument("--alpha", type=float, default=config.alpha, help=f"lora/cobot alpha (default: {config.alpha:g})")
    train.add_argument("--sct-fraction", type=float, default=config.sct_fraction,
                       help=f"share of channels SCT tunes per block (default: {config.sct_fraction})")
    train.add_argument("--sfa-budget", type=float, default=config.sfa_budget,
                       help=f"share of qkv/proj weights SFA may change (default: {config.sfa_budget})")
    train.add_argument("--epochs", type=int, default=settings.epochs, help=f"(default: {settings.epochs})")
    train.add_argument("--lr", type=float, default=settings.lr, help=f"(default: {settings.lr:g})")
    train.add_argument("--batch-size", type=int, default=settings.batch_size, help=f"(default: {settings.batch_size})")
    train.add_argument("--device", default=settings.device, help="auto (default), cpu or cuda[:N]")
    train.add_argument("--train-seed", type=int, default=config.seed,
                       help=f"seed of the adapters' initialisation and the batch order (default: {config.seed})")
    train.add_argument("--no-progress", action="store_true")

    export = sub.add_parser("peft-export", help="merge trained adapters and export a verified ONNX pair")
    add_model_args(export)
    export.add_argument("adapters", type=Path, help="adapters.pt from peft-train or peft-import")
    export.add_argument("--out", type=Path, required=True, help="output folder (encoder.onnx, decoder.onnx, export.json)")
    add_first_order_arg(export)

    imported = sub.add_parser("peft-import", help="convert an externally trained LoRA state dict into adapters.pt")
    imported.add_argument("source", type=Path, help="state dict with image_encoder.<block>.attn.<qkv|proj>.lora_A/B")
    imported.add_argument("--out", type=Path, required=True)
    return {"peft-train": _peft_train, "peft-export": _peft_export, "peft-import": _peft_import}


def _peft_train(args: argparse.Namespace) -> int:
    from sam_reuse.finetune.config import PeftConfig, TrainSettings
    from sam_reuse.finetune.train import train

    check_output_folder(args.out)
    config = PeftConfig(method=args.method, blocks=args.blocks, rank=args.rank, alpha=args.alpha,
                        sct_fraction=args.sct_fraction, sfa_budget=args.sfa_budget, seed=args.train_seed)
    settings = TrainSettings(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, device=args.device,
                             prompt=args.prompt, search_images=args.search_images,
                             holdout_images=args.holdout_images, progress=not args.no_progress)
    checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    record = train(args.model_type, checkpoint, args.data, args.out, config, settings, seed=args.seed)
    print(f"wrote {args.out / 'adapters.pt'} and {args.out / 'train.json'}")
    print(f"{record['method']}: {record['trainable_parameters']} trainable parameters, training loss "
          f"{record['initial_loss']:.4f} -> {record['final_loss']:.4f} on {len(record['images'])} images, "
          f"{record['train_seconds']:.1f} s on {record['device']}")
    return 0


def _peft_export(args: argparse.Namespace) -> int:
    from sam_reuse.finetune.export import export_finetuned

    check_output_folder(args.out)
    checkpoint = resolve_checkpoint(args.model_type, args.checkpoint)
    result = export_finetuned(args.model_type, args.adapters, args.out, checkpoint, verify_records(args),
                              exporter=args.exporter, opset=args.opset, seed=args.seed, first_order=args.first_order)
    peft, parity = result.info["peft"], result.info["parity"]
    scorer = [args.out / name for name in first_order_files(result.info)]
    print(f"wrote {', '.join(map(str, [result.encoder, result.decoder, *scorer, result.sidecar]))}")
    print(f"{peft['method']}: merged {peft['merged_linears']} linears, {peft['graph_adapters']} adapters stay in "
          f"the graph; merged vs unmerged torch max|diff| {peft['merge_max_abs_diff']:.2e}; ONNX vs unmerged "
          f"torch: encoder max|diff| {parity['encoder_max_abs_diff']:.2e}, mask IoU {parity['min_mask_iou']:.6f}")
    print_why_no_first_order(result.info)
    return 0


def _peft_import(args: argparse.Namespace) -> int:
    from sam_reuse.finetune.checkpoint import import_lora

    check_output_folder(args.out)
    adapters, base = import_lora(args.source, args.out)
    print(f"wrote {adapters}" + (f" and the base weights {base} (pass it as --checkpoint)" if base else ""))
    if base is None:
        print("the source held no base weights: export with the --checkpoint the LoRA was trained on")
    return 0

