"""Score a trained checkpoint independently of lit_dash: its weights, plain vLLM, a plain answer rule.

    .venv/bin/python scripts/independent_check.py runs/demo            # the run folder (or a .ckpt file)
    .venv/bin/python scripts/independent_check.py runs/demo --n 300 --seed 12345 --json-out check.json
    .venv/bin/python scripts/independent_check.py --model runs/demo/lightning_logs/version_0/export

What it does, and what it does NOT share with lit_dash:

1. The checkpoint's ``policy.*`` weights go into a plain transformers folder with lit_dash's export
   (``lit_dash.export.export_checkpoint``, the same code as ``lit-dash export`` and the ExportModel
   callback, whose vLLM round trip tests/test_export.py checks): AutoModelForCausalLM from the base model
   folder, ``load_state_dict``, ``save_pretrained``, the tokenizer beside them. With ``--model FOLDER``
   an already exported folder (``<log_dir>/export``) is scored as it is; the run's instruction and eval
   length are read from ``<log_dir>/hparams.yaml`` and its eval JSONL from ``<log_dir>/eval``.
2. ``N`` fresh two-digit additions ("What is 37 + 48?", both operands 10-99), drawn here with Python's
   ``random.Random(f"independent-check:{seed}")``, not with lit_dash's generator. They are taken only from
   the held-out half of lit_dash's fixed hash partition of the question space (the rule is copied below
   and tested against lit_dash's), so none of them can be in an ``arithmetic`` train split, whatever its
   seed; and, given a run folder, every question of that run's eval JSONL files is excluded too. What can
   overlap: another run's held-out eval set (same partition, other seeds), which never trains on them.
3. Greedy completions from plain ``vllm.LLM`` (fp32, no lit_dash engine code) of the same chat prompt
   lit_dash uses: the question, a newline and the instruction, as one user turn of the tokenizer's chat
   template with the assistant turn opened. The instruction is the run's (from the checkpoint).
4. The plain rule: the last number inside the last ``\\boxed{...}``, else the last number of the text,
   compared by value with the sum computed here from the question. No lit_dash reward code is used, so
   an answer lit_dash's strict reward scores 0 as unevaluated (``\\boxed{23 + 73}``) reads as 73 here,
   which is wrong too; the two rules differ only on rare cases such as ``\\boxed{96 + 0}``.

Given a run folder it also prints what lit_dash's evaluation reported at the run's last step and the
difference; with ``--tolerance`` (default 0.08) it exits 1 when they differ by more. This is the demo's
acceptance check: the final checkpoint's weights, plain vLLM, 300 new two-digit additions, the last number
in the box, within 8 points of what lit_dash printed.

``--questions-from FILE.jsonl`` scores the questions of an eval JSONL instead of fresh ones (what the test
suite does, to compare problem by problem with lit_dash's own records).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

DEFAULT_INSTRUCTION = "Put your final answer within \\boxed{}."
_QUESTION = re.compile(r"^What is (\d+) \+ (\d+)\?$")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")
_EVAL_FILE = re.compile(r"^(?P<set>.+)_fit_step(?P<step>\d+)\.jsonl$")


# ---------------------------------------------------------------------------------------------- problems


def held_out_half(question: str) -> bool:
    """lit_dash's fixed partition of arithmetic questions (``sources._arith_split``), copied: a question is
    in the "test" part when the first 4 bytes of its SHA-256, big-endian, are divisible by 5."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % 5 == 0


def fresh_additions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[str, int]]:
    """``n`` distinct "What is a + b?" (10 <= a, b <= 99) from the held-out half, none in ``exclude``."""
    pool = [
        f"What is {a} + {b}?"
        for a in range(10, 100)
        for b in range(10, 100)
        if held_out_half(f"What is {a} + {b}?") and f"What is {a} + {b}?" not in exclude
    ]
    if n > len(pool):
        raise SystemExit(
            f"only {len(pool)} held-out two-digit additions are left after exclusions; ask for fewer"
        )
    rng = random.Random(f"independent-check:{seed}")
    return [(q, reference_of(q)) for q in rng.sample(pool, n)]


def reference_of(question: str) -> int:
    m = _QUESTION.match(question.strip())
    if m is None:
        raise SystemExit(f"not a two-digit addition this script can check: {question!r}")
    return int(m.group(1)) + int(m.group(2))


# -------------------------------------------------------------------------------------------- the rule


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            return text[start + len("\\boxed{") : i - 1]
        start = text.rfind("\\boxed{", 0, start)  # unclosed (cut off): try the one before
    return None


def plain_answer(text: str) -> Fraction | None:
    """The last number inside the last ``\\boxed{}``, else the last number of the text, else None."""
    for where in (last_boxed(text), text):
        if where:
            numbers = _NUMBER.findall(where)
            if numbers:
                return Fraction(numbers[-1].replace(",", ""))
    return None


def is_right(text: str, reference: int) -> bool:
    return plain_answer(text) == reference


# ------------------------------------------------------------------------------------------- the weights


def find_checkpoint(path: str | Path) -> Path:
    """A .ckpt file itself, else ``<run>/checkpoints/last.ckpt``, else the newest .ckpt under ``path``."""
    path = Path(path)
    if path.is_file():
        return path
    last = path / "checkpoints" / "last.ckpt"
    if last.exists():
        return last
    found = sorted(path.rglob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no checkpoint under {path}: pass a .ckpt file or a run folder with checkpoints/")
    return found[-1]


def load_checkpoint(ckpt_path: Path) -> dict:
    import torch

    return torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)


def export_weights(ckpt_path: Path, out_folder: str | Path, base_model: str | None = None) -> Path:
    """The checkpoint's policy weights as a plain transformers folder (lit_dash's export, fp32)."""
    from lit_dash.errors import InputError
    from lit_dash.export import export_checkpoint

    try:
        return export_checkpoint(ckpt_path, out_folder, dtype="float32", model=base_model)
    except InputError as exc:
        raise SystemExit(str(exc)) from None


def run_hparams(log_dir: Path) -> dict:
    """``<log_dir>/hparams.yaml`` (the module's and the datamodule's hyper-parameters), or {}."""
    path = log_dir / "hparams.yaml"
    if not path.exists():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


# ------------------------------------------------------------------------------------------ generation


def chat_prompts(tokenizer, questions: list[str], instruction: str) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{q}\n{instruction}"}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def greedy_completions(
    folder: str | Path, questions: list[str], instruction: str, max_new_tokens: int, kv_cache_gib: float
) -> tuple[list[str], list[str]]:
    """(prompts, greedy completions) from plain vLLM on ``folder``."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # must precede the import
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm

    llm = vllm.LLM(
        model=str(folder),
        dtype="float32",
        kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
        max_model_len=512,
        enforce_eager=True,
        seed=0,
    )
    prompts = chat_prompts(llm.get_tokenizer(), questions, instruction)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return prompts, [o.outputs[0].text for o in outputs]


# ------------------------------------------------------------------------------------- lit_dash's report


def eval_files(run: Path) -> list[Path]:
    return sorted(run.rglob("eval/*_fit_step*.jsonl")) if run.is_dir() else []


def lit_dash_final(run: Path, eval_set: str) -> dict | None:
    """What lit_dash's evaluation wrote at the run's last evaluated step (newest version folder)."""
    files = [f for f in eval_files(run) if (m := _EVAL_FILE.match(f.name)) and m["set"] == eval_set]
    if not files:
        return None
    newest = max({f.parent for f in files}, key=lambda d: d.stat().st_mtime)
    last = max((f for f in files if f.parent == newest), key=lambda f: int(_EVAL_FILE.match(f.name)["step"]))
    rows = [json.loads(line) for line in last.read_text().splitlines() if line.strip()]
    accuracy = sum(r["reward"] >= 1.0 for r in rows) / max(len(rows), 1)
    return {
        "file": str(last),
        "step": int(_EVAL_FILE.match(last.name)["step"]),
        "n": len(rows),
        "accuracy": accuracy,
    }


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "path", nargs="?", help="a run folder (default_root_dir, with checkpoints/) or a .ckpt file"
    )
    ap.add_argument("--model", help="score this exported transformers folder (<log_dir>/export) instead")
    ap.add_argument("--n", type=int, default=300, help="fresh two-digit additions to score (default 300)")
    ap.add_argument("--seed", type=int, default=12345, help="seed of this script's own problem draw")
    ap.add_argument("--questions-from", help="score the questions of this eval JSONL instead of fresh ones")
    ap.add_argument("--base-model", help="base transformers folder (default: the checkpoint's model)")
    ap.add_argument("--instruction", help="default: the run's (from the checkpoint), else the demo's")
    ap.add_argument("--max-new-tokens", type=int, help="default: the run's eval_max_new_tokens, else 64")
    ap.add_argument("--kv-cache-gib", type=float, default=0.5)
    ap.add_argument("--eval-set", default="arithmetic", help="the run's eval set to compare with")
    ap.add_argument("--tolerance", type=float, default=0.08, help="allowed |plain - lit_dash| (fraction)")
    ap.add_argument("--samples", type=int, default=5, help="completions to print")
    ap.add_argument("--export-dir", help="keep the exported transformers folder here")
    ap.add_argument("--json-out", help="write every completion and the summary here")
    args = ap.parse_args(argv)

    if (args.path is None) == (args.model is None):
        ap.error("pass a run folder / .ckpt file, or --model EXPORTED_FOLDER (one of the two)")
    start = time.perf_counter()
    ckpt_path = ckpt = None
    step = None
    if args.model:
        model_folder = Path(args.model)
        if not (model_folder / "config.json").exists():
            raise SystemExit(f"--model {model_folder}: no config.json there; pass an exported folder")
        run = model_folder.parent  # <log_dir>/export: the run's eval JSONL are in <log_dir>/eval
        data_hp = run_hparams(run)
    else:
        ckpt_path = find_checkpoint(args.path)
        ckpt = load_checkpoint(ckpt_path)
        data_hp = ckpt.get("datamodule_hyper_parameters", {}) or {}
        run = Path(args.path) if Path(args.path).is_dir() else ckpt_path.parent.parent
    instruction = args.instruction or data_hp.get("instruction") or DEFAULT_INSTRUCTION
    max_new_tokens = args.max_new_tokens or data_hp.get("eval_max_new_tokens") or 64

    if args.questions_from:
        rows = [
            json.loads(line) for line in Path(args.questions_from).read_text().splitlines() if line.strip()
        ]
        problems = [(r["question"], reference_of(r["question"])) for r in rows]
    else:
        seen = set()
        for f in eval_files(run):
            seen |= {json.loads(line)["question"] for line in f.read_text().splitlines() if line.strip()}
        problems = fresh_additions(args.n, args.seed, exclude=seen)
        print(
            f"[check] {len(problems)} fresh held-out additions (seed {args.seed}; {len(seen)} of the run's eval questions excluded)"
        )

    with tempfile.TemporaryDirectory(prefix="independent_check_") as tmp:
        if ckpt is not None:
            step = ckpt.get("global_step")
            del ckpt
            folder = export_weights(ckpt_path, args.export_dir or tmp, args.base_model)
            print(f"[check] exported {ckpt_path} (step {step}) to {folder}")
        else:
            folder = model_folder
            print(f"[check] scoring the exported folder {folder}")
        questions = [q for q, _ in problems]
        prompts, texts = greedy_completions(folder, questions, instruction, max_new_tokens, args.kv_cache_gib)

    right = [is_right(t, ref) for t, (_, ref) in zip(texts, problems, strict=True)]
    n = len(problems)
    accuracy = sum(right) / n
    summary = {
        "checkpoint": str(ckpt_path or args.model),
        "step": step,
        "n": n,
        "accuracy": accuracy,
        "instruction": instruction,
        "max_new_tokens": max_new_tokens,
        "seconds": time.perf_counter() - start,
    }
    for (q, ref), text, ok in list(zip(problems, texts, right, strict=True))[: args.samples]:
        print(
            f"--- {q} (reference {ref}; read {plain_answer(text)}; {'right' if ok else 'wrong'})\n{text.strip()}"
        )
    print(f"[check] plain vLLM, greedy, last number in the box: {accuracy:.1%} of {n} ({sum(right)} right)")

    status = 0
    report = lit_dash_final(run, args.eval_set)
    if report is not None:
        diff = accuracy - report["accuracy"]
        sampling = 3 * math.sqrt(max(accuracy * (1 - accuracy), 1e-9) / n)
        summary["lit_dash"] = report
        summary["difference"] = diff
        verdict = "within" if abs(diff) <= args.tolerance else "OUTSIDE"
        print(
            f"[check] lit_dash's evaluation at step {report['step']}: {report['accuracy']:.1%} of {report['n']} "
            f"({report['file']}); difference {diff:+.1%}, {verdict} the {args.tolerance:.0%} tolerance "
            f"(3 standard errors of this check: {sampling:.1%})"
        )
        status = 0 if abs(diff) <= args.tolerance else 1
    else:
        print("[check] no eval JSONL found beside the checkpoint: nothing of lit_dash's to compare with")
    if args.json_out:
        records = [
            {
                "question": q,
                "reference": ref,
                "prompt": p,
                "completion": t,
                "read": str(plain_answer(t)),
                "right": ok,
            }
            for (q, ref), p, t, ok in zip(problems, prompts, texts, right, strict=True)
        ]
        Path(args.json_out).write_text(json.dumps({"summary": summary, "records": records}, indent=1))
    return status


if __name__ == "__main__":
    sys.exit(main())
