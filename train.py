"""Fine-tune the temporal layers of a Video LDM on captioned video.

    python train.py                                          # the embedded demo (configs/demo.yaml)
    python train.py train.max_steps=50                       # the demo, shorter
    python train.py --config configs/t2v_sd15.yaml model.base=path/to/sd15 data.root=path/to/clips
    python train.py --config configs/t2v_sd15.yaml train.resume=auto       # continue a run
    accelerate launch train.py --config ...                  # several GPUs (or torchrun --nproc_per_node N)
    python train.py --help-config                            # every key, its type, default and meaning

Overrides people change: model.base, model.base_config, data.root / data.manifest, data.num_frames,
data.resolution, train.max_steps, train.lr, train.batch_size, train.mixed_precision=bf16,
model.gradient_checkpointing=true, train.resume=auto, output_dir. The trained temporal module is
written to <output_dir>/temporal.safetensors.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from lvdm.cli import Parser, exit_status, run_cli, split_overrides

if TYPE_CHECKING:
    from lvdm.config import Config

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def main(argv: list[str]) -> int:
    from lvdm.config import check_machine, describe_config, load_config
    from lvdm.config_rules import overwrite_stays_with_its_folder

    parser = Parser(prog="train.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", default=[], help="YAML config file(s); later ones win")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    overrides, rest = split_overrides(argv, parser)  # --config runs/lr=1e-4/config.yaml: a file, not an override
    args = parser.parse_args(rest)
    if args.help_config:
        print(describe_config())
        return 0
    files = args.config or [DEMO_CONFIG]  # no config file: the demo
    cfg = overwrite_stays_with_its_folder(load_config(files, overrides), overrides, files)
    check_machine(cfg)  # fp16 without a GPU, xformers not installed: one line, before anything loads
    from lvdm.training.report import print_report
    from lvdm.training.trainer import train

    if is_demo(cfg):
        from lvdm.training.demo import prepare_demo

        for line in prepare_demo(cfg):
            print(f"demo: made {line}")
    result = train(cfg, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch: one summary, from rank 0
        print_report(result)
        if is_demo(cfg) and not result.stopped_by_signal:
            from lvdm.training.demo import demo_summary

            print("\n".join(demo_summary(result, cfg)))
    return exit_status(result)  # 75 when stopped by a signal: resumable


def is_demo(cfg: Config) -> bool:
    """Whether ``cfg`` trains the demo's own assets (the base and clips configs/demo.yaml names), which are then
    made if missing: with no --config, --config configs/demo.yaml or a copy, configs/demo_i2v.yaml (the clips'
    motion-only captions), configs/demo_upscale.yaml (the demo x4 upscaler beside the base), and any overrides but
    those two."""
    from lvdm.config import load_config
    from lvdm.training.demo import DEMO_UPSCALER, demo_clip_folder

    demo = load_config([DEMO_CONFIG])
    bases = (demo.model.base, str(Path(demo.model.base).with_name(DEMO_UPSCALER)))  # configs/demo_upscale.yaml
    return cfg.model.base in bases and demo_clip_folder(cfg.data) == demo_clip_folder(demo.data)


if __name__ == "__main__":
    sys.exit(run_cli(main))
