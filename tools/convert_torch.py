"""Convert released AIM v1 PyTorch weights into a checkpoint that `aim_jax.load_pretrained` reads.

Split `.pth` files (a backbone and, optionally, an attention-probe head):

    python tools/convert_torch.py --backbone aim_600m_2bimgs_attnprobe_backbone.pth \\
        --head aim_600m_2bimgs_attnprobe_head_best_layers.pth --model aim-600M \\
        --probe-layers best --output checkpoints/aim-600M

A directory in the released Hugging Face layout (config.json plus model.safetensors or
pytorch_model.bin):

    python tools/convert_torch.py --hf-dir aim-600M-hf --output checkpoints/aim-600M

Without --head only the patch embedding and trunk are converted. The classification call of
the model that `load_pretrained` returns then fails, because the head variables are missing.
Read trunk features with `aim_jax.pretrained.restore_variables` and the model's
`patch_embed` and `trunk` submodules instead.

Tensors are converted one at a time through memory-mapped files, so checkpoints larger than
RAM convert. Expected failures (missing, unexpected or mis-shaped keys, unreadable files, an
existing output) exit with status 1 and a one-line message; nothing is written then.
"""

from __future__ import annotations

import argparse
import sys

from absl import logging

from aim_jax import conversion


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the command-line flags."""
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--backbone", help="backbone .pth (preprocessor.* and trunk.* keys)")
    source.add_argument(
        "--hf-dir",
        help="directory with config.json and model.safetensors or pytorch_model.bin",
    )
    parser.add_argument(
        "--head",
        help="attention-probe head .pth (head.* keys); without it only the backbone is "
        "converted and the output cannot classify",
    )

    arch = parser.add_mutually_exclusive_group()
    arch.add_argument("--model", help="registry name of the architecture, e.g. aim-600M")
    arch.add_argument(
        "--config",
        help="config.json (img_size, patch_size, embed_dim, num_blocks, num_heads, "
        "probe_layers, num_classes) for an architecture outside the registry",
    )
    parser.add_argument(
        "--probe-layers",
        choices=["last", "best"],
        help="the blocks the head was trained on: 'last' (final six) or 'best'; stored in "
        "the output config.json. Required with --head and --model; with --config or "
        "--hf-dir it overrides the config's probe_layers",
    )

    parser.add_argument("--output", required=True, help="checkpoint directory to create")
    parser.add_argument(
        "--dtype",
        choices=sorted(conversion.FLOAT_DTYPES),
        default="float32",
        help="dtype of the converted parameters (BatchNorm statistics stay float32)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    args = parser.parse_args(argv)
    if args.backbone is not None:
        if args.model is None and args.config is None:
            parser.error("--backbone needs --model or --config.")
        if args.head is not None and args.model is not None and args.probe_layers is None:
            parser.error(
                "--head with --model needs --probe-layers (last or best, as in the head's "
                "file name)."
            )
    elif args.head or args.model or args.config:
        parser.error(
            "--hf-dir takes its architecture and head from the directory; drop "
            "--head, --model and --config."
        )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one conversion; return the exit status (1 on an expected failure)."""
    args = parse_args(argv)
    logging.set_verbosity(logging.INFO)
    options = {
        "dtype": args.dtype,
        "overwrite": args.overwrite,
        "progress": not args.no_progress,
    }
    try:
        if args.hf_dir is not None:
            output = conversion.convert_hf_dir(
                args.hf_dir, args.output, probe_layers=args.probe_layers, **options
            )
        else:
            output = conversion.convert_released(
                args.backbone,
                args.output,
                head=args.head,
                model=args.model,
                config_file=args.config,
                probe_layers=args.probe_layers,
                **options,
            )
    except (conversion.ConversionError, FileExistsError) as err:
        print(f"convert_torch.py: error: {err}", file=sys.stderr)
        return 1
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
