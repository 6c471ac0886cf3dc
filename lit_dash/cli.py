"""``lit-dash``: LightningCLI over DashModule and RolloutDataModule.

    lit-dash fit --config configs/demo.yaml
    lit-dash validate --config configs/eval_gsm8k.yaml
    lit-dash fit --config configs/demo.yaml --print_config
    lit-dash test --config configs/eval_gsm8k.yaml --ckpt_path runs/demo/checkpoints/last.ckpt
    lit-dash predict --config configs/demo.yaml --data.predict_file prompts.jsonl --ckpt_path ...
    lit-dash export --ckpt_path runs/demo/checkpoints/last.ckpt --out exported/ [--dtype bfloat16]

``test`` runs the eval sets through Lightning's test loop (logged as ``test/<set>/...``); ``predict``
writes greedy completions of ``data.predict_file`` to ``<log_dir>/predictions.jsonl``; ``export`` writes a
checkpoint's policy as a transformers folder (lit_dash/export.py). ``--optimizer`` / ``--lr_scheduler``
are not offered: the module's manual loop steps the AdamW + schedule of ``configure_optimizers``
(``model.lr``, ``warmup_steps``, ``lr_schedule``).

omegaconf+ parser mode lets a config interpolate its own values (``eval_max_new_tokens: ${.sampling.max_new_tokens}``),
resolved after the command line is merged, so an override reaches the keys that interpolate it.
``--model my_pkg.MyModule`` swaps in a subclass (e.g. a new reward); ``data:`` likewise takes a
``class_path:`` (``lit_dash.sft.SftDataModule`` for the SFT baseline), and a ``data:`` block without one
means ``RolloutDataModule``.

The console: :mod:`lit_dash.console` drops library lines that ask nothing of the user (``LIT_DASH_VERBOSE=1``
shows them), and a fit gets :class:`~lit_dash.callbacks.RolloutProgress` (a run summary, a bar in steps)
unless the config lists a progress bar of its own or sets ``trainer.enable_progress_bar: false``.
Lightning's model summary is off by default (the run summary gives the parameter count);
``--trainer.enable_model_summary true`` brings it back.
"""

from __future__ import annotations

import os
import signal
import sys


def _environment() -> None:
    # vLLM must run in this process to take weights directly; set before anything imports it.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    from lit_dash import console  # stdlib only: torch is not imported yet

    console.set_environment()


def main(args: list[str] | None = None) -> None:
    """Console entry point (``lit-dash``).

    Bad input (a knob, a data file, a model name) ends with its one-line message and exit status 2;
    ``LIT_DASH_DEBUG=1`` shows the traceback instead. SIGTERM stops a fit at the end of the current step
    (Lightning's handler; StepCheckpoint saves ``last.ckpt`` there). Lightning then exits with status 0,
    which a scheduler would read as success: this exits with 143 (128 + SIGTERM) instead.
    """
    _environment()
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lit_dash.errors import find_input_error

    argv = list(sys.argv[1:] if args is None else args)
    try:
        if argv[:1] == ["export"]:
            from lit_dash.export import main as export_main

            export_main(argv[1:])
            return
        build_cli(args)
    except SIGTERMException:
        print("[lit_dash] stopped by SIGTERM at a step boundary", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as exc:
        error = find_input_error(exc)
        if error is None or os.environ.get("LIT_DASH_DEBUG"):
            raise
        print(f"lit-dash: error: {error}", file=sys.stderr)
        sys.exit(2)


EPILOG = (
    "also: lit-dash export --ckpt_path CKPT --out DIR [--dtype auto|float32|bfloat16|float16] "
    "[--model NAME] [--config CONFIG]: a checkpoint's policy as a transformers folder"
)


def build_cli(args: list[str] | None = None, run: bool = True, instantiate: bool = True):
    """The LightningCLI object; tests call it with ``args`` to run, or to parse a config only."""
    _environment()
    from lit_dash import console

    console.quiet()
    from lightning.pytorch.callbacks import ProgressBar
    from lightning.pytorch.cli import LightningCLI

    from lit_dash.callbacks import RolloutProgress
    from lit_dash.data.datamodule import RolloutDataModule
    from lit_dash.module import DashModule

    refuse_optimizer_flags(list(sys.argv[1:] if args is None else args))

    class DashCLI(LightningCLI):
        def instantiate_classes(self) -> None:
            if instantiate:
                super().instantiate_classes()

        def instantiate_trainer(self, **kwargs):
            config = self._get(self.config_init, "trainer", default={})
            callbacks = config.get("callbacks") or []
            wanted = config.get("enable_progress_bar") is not False
            if wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
                kwargs["callbacks"] = [RolloutProgress(), *callbacks]  # first: its fit start comes first
            return super().instantiate_trainer(**kwargs)

        def before_fit(self) -> None:
            from lightning.pytorch.utilities import rank_zero_info

            engine = getattr(getattr(self.datamodule, "engine_config", None), "kind", None)
            starting = f" and starting the {engine} engine" if engine else ""
            rank_zero_info(
                f"[lit_dash] fit: loading {getattr(self.model, 'model_name', 'the model')}{starting}"
            )

    return DashCLI(
        DashModule,
        RolloutDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", "epilog": EPILOG},
        auto_configure_optimizers=False,  # the manual loop steps configure_optimizers' optimizer and schedule
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"enable_model_summary": False},
        args=args,  # None: LightningCLI reads sys.argv itself
        run=run,
    )


def refuse_optimizer_flags(args: list[str]) -> None:
    """``--optimizer`` / ``--lr_scheduler`` would replace configure_optimizers, whose AdamW and LR schedule
    the manual loop steps: refused with what to set instead."""
    flags = [a for a in args if a.split("=")[0].split(".")[0] in ("--optimizer", "--lr_scheduler")]
    if flags:
        from lit_dash.errors import ConfigError

        raise ConfigError(
            f"{flags[0]} is not supported: the training loop is manual and steps the AdamW optimizer and "
            "LR schedule of DashModule.configure_optimizers; set model.init_args.lr, weight_decay, "
            "warmup_steps and lr_schedule (linear / constant) instead, or override configure_optimizers in "
            "a subclass (--model my_pkg.MyModule)"
        )


def check_config(path: str):
    """Parse a config and build its model, datamodule and callbacks, without a Trainer, a model load or
    an engine: the knob checks run, nothing expensive does. Returns the instantiated namespace."""
    cli = build_cli(["--config", path], run=False, instantiate=False)
    return cli.parser.instantiate_classes(cli.config)


if __name__ == "__main__":
    main()
