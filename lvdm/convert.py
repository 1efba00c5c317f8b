"""Move AnimateDiff motion modules into lvdm and back.

    python -m lvdm.convert motion-module mm_sd_v15_v2.ckpt mm_v2.safetensors --allow-pickle
    python -m lvdm.convert motion-module path/to/motion_adapter_folder mm.safetensors
    python -m lvdm.convert to-diffusers outputs/run/temporal.safetensors my_motion_adapter/

``motion-module`` reads an original AnimateDiff checkpoint (v1, v2, v3; ``.safetensors``, or ``.ckpt`` only with
``--allow-pickle``: a pickle can run code) or a diffusers ``MotionAdapter`` folder, and writes an lvdm temporal
module of the ``animatediff`` layout: ``sample.py --temporal``, transfer onto any SD 1.5 checkpoint and
``model.temporal_init`` (fine-tuning) all take it. ``--base`` names the diffusers folder of the base when the module
is not for SD 1.5's widths. (``sample.py --temporal`` and ``model.temporal_init`` also take the AnimateDiff file
itself; converting once saves doing it at every load.)

``to-diffusers`` writes an lvdm module of the ``animatediff`` layout (imported, fine-tuned, or trained from scratch
with ``model.layout: animatediff``) as a ``MotionAdapter`` folder for diffusers' ``AnimateDiffPipeline``.
"""

from __future__ import annotations

import argparse
import sys

from lvdm.cli import Parser, run_cli
from lvdm.errors import ConfigError


def main(argv: list[str]) -> int:
    parser = Parser(
        prog="python -m lvdm.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    into = commands.add_parser("motion-module", help="an AnimateDiff motion module -> an lvdm temporal module")
    into.add_argument("source", help="AnimateDiff checkpoint (.safetensors/.ckpt) or MotionAdapter folder")
    into.add_argument("out", help="the lvdm temporal module to write (.safetensors)")
    into.add_argument("--base", help="diffusers folder of the base, for modules not of SD 1.5's widths")
    into.add_argument("--heads", type=int, default=8, help="attention heads per module (original files: 8)")
    into.add_argument("--allow-pickle", action="store_true", help="read a .ckpt/.pt pickle (it can run code)")
    into.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    back = commands.add_parser("to-diffusers", help="an lvdm module of the animatediff layout -> a MotionAdapter")
    back.add_argument("module", help="lvdm temporal module (.safetensors) of the animatediff layout")
    back.add_argument("out_dir", help="the MotionAdapter folder to write (new, or empty)")
    args = parser.parse_args(argv)
    from lvdm.models.animatediff import export_motion_adapter, import_motion_module
    from lvdm.outputs import check_output_file, module_output

    if args.command == "motion-module":
        out = module_output(args.out)
        check_output_file(out, overwrite=args.overwrite)  # a dangling link too (it passed, then failed at the end)
        if args.heads < 1:
            raise ConfigError(f"--heads {args.heads}: must be >= 1")
        module = import_motion_module(
            args.source,
            out,
            base=args.base,
            allow_pickle=args.allow_pickle,
            heads=args.heads,
            exclusive=not args.overwrite,
        )
        layout = module.layout
        print(
            f"wrote {out}: {len(module.sites)} motion modules ({'with' if layout.mid_block else 'no'} mid block, "
            f"{layout.max_frames} frames at most), base family {module.family}"
        )
    else:
        out_dir = export_motion_adapter(args.module, args.out_dir)
        print(f"wrote {out_dir}: load it with diffusers' MotionAdapter.from_pretrained({str(out_dir)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
