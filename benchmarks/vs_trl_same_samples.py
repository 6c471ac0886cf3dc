"""One optimizer step's gradient from TRL's GRPOTrainer and from lit_dash on the same completions.

The vs-TRL table (benchmarks/vs_trl.py) compares runs that draw different completions. This takes the draws
out: the base model samples P x G completions once (transformers, temperature 1), the rewards are fixed (seeded
0/1, about 40% right), the group advantages come from ``lit_dash.advantages.group_advantages``, and both
libraries compute the step's gradient on those completions: lit_dash through ``lit_dash.training.update``
(``update: dash``, ``loss_agg: constant``, no KL, normalised over the sampled completions), TRL 1.16 through
``GRPOTrainer._compute_loss`` with the config ``vs_trl.py`` gives it (Dr. GRPO, beta 0, gradient accumulation
over the micro-batches). It prints the two gradients' norms, cosine and relative difference. ``--control``
hands TRL the advantages shifted by one completion, which must move the two far apart.

    .venv/bin/python benchmarks/vs_trl_same_samples.py            # and again with --control

TRL is the optional ``bench`` extra (``pip install --no-deps trl==1.16.0``).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def sample(model, tokenizer, prompt_ids: list[list[int]], group_size: int, max_new_tokens: int) -> list:
    """``group_size`` completions per prompt from ``model`` (transformers generate, temperature 1, no top-k/p),
    cut after the first end-of-sequence token."""
    from lit_dash.engines.base import Completion

    eos = tokenizer.eos_token_id
    completions = []
    with torch.no_grad():
        for i, ids in enumerate(prompt_ids):
            out = model.generate(
                torch.tensor([ids]), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=max_new_tokens, num_return_sequences=group_size, pad_token_id=eos, eos_token_id=eos,
            )  # fmt: skip
            for row in out[:, len(ids) :].tolist():
                row = row[: row.index(eos) + 1] if eos in row else row
                completions.append(Completion(i, tokenizer.decode(row), row, [], eos not in row))
    return completions


def lit_dash_gradient(
    model, prompt_ids, completions, advantages, micro_batch: int, max_new_tokens: int
) -> dict:
    from lit_dash.data.batches import pad_completions
    from lit_dash.module import DashModule
    from lit_dash.training import update
    from lit_dash.training.policy import completion_logprobs, scatter

    spec = DashModule(
        model="smollm2-135m-instruct", kl_coef=0.0, loss_agg="constant", update="dash"
    ).update_spec
    rows, cpu = list(range(len(completions))), torch.device("cpu")
    mbs = [
        pad_completions(rows[k : k + micro_batch], prompt_ids, completions, advantages, 0, 1.0)
        for k in range(0, len(rows), micro_batch)
    ]
    counts = update.step_counts(mbs, max_new_tokens)
    sampled = (float(len(completions)), float(sum(len(c.token_ids) for c in completions)))
    weight = update.normalizer_weight(spec, counts, sampled)
    model.zero_grad(set_to_none=True)
    for mb in mbs:
        logprobs, entropy = completion_logprobs(model, mb, torch.float32, cpu, 1024, True, packed=False)
        loss, _ = update.micro_batch_loss(
            spec, mb, scatter(logprobs, mb, cpu), scatter(entropy, mb, cpu), counts
        )
        (loss * weight).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trl_gradient(model, tokenizer, texts, prompt_ids, completions, advantages, config_kwargs: dict) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    trainer = GRPOTrainer(
        model=model, reward_funcs=[lambda **k: [0.0] * len(k["completions"])], args=GRPOConfig(**config_kwargs),
        train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
    )  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = config_kwargs["gradient_accumulation_steps"]
    micro_batch, pad = config_kwargs["per_device_train_batch_size"], tokenizer.eos_token_id
    model.zero_grad(set_to_none=True)
    for start in range(0, len(completions), micro_batch):
        chunk = list(range(start, min(start + micro_batch, len(completions))))
        prompts = [prompt_ids[completions[r].prompt_index] for r in chunk]
        outs = [completions[r].token_ids for r in chunk]
        width_p, width_c = max(map(len, prompts)), max(map(len, outs))
        p_ids = torch.full((len(chunk), width_p), pad)
        p_mask = torch.zeros(len(chunk), width_p, dtype=torch.long)
        c_ids = torch.full((len(chunk), width_c), pad)
        c_mask = torch.zeros(len(chunk), width_c, dtype=torch.long)
        for j, (p, c) in enumerate(zip(prompts, outs, strict=True)):
            p_ids[j, width_p - len(p) :], p_mask[j, width_p - len(p) :] = (
                torch.tensor(p),
                1,
            )  # left padding, as TRL
            c_ids[j, : len(c)], c_mask[j, : len(c)] = torch.tensor(c), 1
        inputs = {
            "prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
            "advantages": advantages[chunk], "num_items_in_batch": int(c_mask.sum()),
        }  # fmt: skip
        trainer._compute_loss(model, inputs).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def main() -> None:
    import vs_trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_dash.advantages import group_advantages
    from lit_dash.data.formatting import format_prompts
    from lit_dash.models import resolve_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", action="store_true", help="TRL gets the advantages shifted by one")
    parser.add_argument("--prompts", type=int, default=4, help="P; G = 8, micro-batch 16, 64 new tokens")
    cli = parser.parse_args()
    group_size, micro_batch, max_new_tokens = 8, 16, 64
    args = vs_trl.parse_args(
        ["--prompts", str(cli.prompts), "--group-size", str(group_size), "--micro-batch", str(micro_batch)]
    )
    torch.manual_seed(0)
    path = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    problems = vs_trl.prompt_order(vs_trl.training_problems(args, tokenizer), cli.prompts, 0, 1)[0]
    texts = format_prompts(problems, tokenizer, "chat", args.instruction)
    prompt_ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    completions = sample(model, tokenizer, prompt_ids, group_size, max_new_tokens)
    rng = random.Random(1)
    rewards = torch.tensor([float(rng.random() < 0.4) for _ in completions])
    advantages = group_advantages(rewards, group_size)
    ours = lit_dash_gradient(model, prompt_ids, completions, advantages, micro_batch, max_new_tokens)
    if cli.control:
        advantages = torch.roll(advantages, 1)
    out = Path(tempfile.gettempdir()) / "vs_trl_same_samples"
    theirs = trl_gradient(
        model, tokenizer, texts, prompt_ids, completions, advantages, vs_trl.trl_config_kwargs(args, out)
    )
    a = torch.cat([ours[n].flatten() for n in ours]).double()
    b = torch.cat([theirs[n].flatten() for n in ours]).double()
    lengths = [len(c.token_ids) for c in completions]
    print(f"{len(completions)} completions ({min(lengths)}-{max(lengths)} tokens), {int((advantages != 0).sum())} "
          f"with a nonzero advantage{'; CONTROL: TRL got the advantages shifted by one' if cli.control else ''}")  # fmt: skip
    print(
        f"gradient norm: lit_dash {float(a.norm()):.6g}, TRL {float(b.norm()):.6g} (ratio {float(a.norm() / b.norm()):.6f})"
    )
    print(
        f"cosine {float(a @ b / (a.norm() * b.norm())):.8f}; |lit_dash - TRL| / |TRL| = {float((a - b).norm() / b.norm()):.3g}"
    )
    worst = max(ours, key=lambda n: float((ours[n] - theirs[n]).norm() / (theirs[n].norm() + 1e-12)))
    print(
        f"worst tensor: {worst}, relative difference {float((ours[worst] - theirs[worst]).norm() / theirs[worst].norm()):.3g}"
    )


if __name__ == "__main__":
    main()
