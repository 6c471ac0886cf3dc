"""Read a finished run back: TensorBoard scalars, completion samples, hyper-parameters and ``timing.csv``.

The notebooks plot from these; a run folder is a Lightning ``log_dir`` (``.../lightning_logs/version_N``)
or any folder above one (the newest run under it is taken).
"""

from __future__ import annotations

import csv
from pathlib import Path


def find_log_dir(path: str | Path, marker: str = "timing.csv") -> Path:
    """``path`` itself if it holds ``marker`` (or TensorBoard events), else the newest folder under it that
    does. Raises FileNotFoundError naming the folder when there is none."""
    path = Path(path)
    if (path / marker).exists() or any(path.glob("events.out.tfevents.*")):
        return path
    found = [p.parent for p in path.rglob(marker)] or [p.parent for p in path.rglob("events.out.tfevents.*")]
    if not found:
        raise FileNotFoundError(
            f"no run under {path}: expected {marker} or TensorBoard event files in it or below it "
            "(pass a Lightning log_dir such as runs/demo/lightning_logs/version_0)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)


def _accumulator(log_dir: str | Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(find_log_dir(log_dir)), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def read_scalars(log_dir: str | Path, prefix: str = "") -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag starting with ``prefix`` (e.g. ``train/``, ``eval/``, ``time/``) as (step, value)
    pairs in step order."""
    acc = _accumulator(log_dir)
    return {
        tag: [(e.step, e.value) for e in sorted(acc.Scalars(tag), key=lambda e: e.step)]
        for tag in acc.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def read_texts(log_dir: str | Path, tag: str = "samples/completions") -> list[tuple[int, str]]:
    """The text summaries under ``tag`` (the CompletionSamples callback's markdown) as (step, text)."""
    acc = _accumulator(log_dir)
    name = next((t for t in acc.Tags()["tensors"] if t.startswith(tag)), None)
    if name is None:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(name)]


def read_hparams(log_dir: str | Path) -> dict[str, object]:
    """The hyper-parameters the logger wrote for TensorBoard's HPARAMS tab (flattened keys, e.g.
    ``sampling/temperature``)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams: dict[str, object] = {}
    for events in sorted(find_log_dir(log_dir).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "hparams":
                    continue
                data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                for key, v in data.session_start_info.hparams.items():
                    kind = v.WhichOneof("kind")
                    hparams[key] = getattr(v, kind) if kind else None
    return hparams


def read_timing(log_dir: str | Path) -> list[dict[str, float]]:
    """``timing.csv`` (written by the TimingProfile callback): one dict of seconds per optimizer step."""
    path = find_log_dir(log_dir) / "timing.csv"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: add lit_dash.callbacks.TimingProfile to trainer.callbacks"
        )
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
