"""The training step's parts, each one concern, each called by :class:`lit_dash.module.DashModule`'s hooks:

* :mod:`.policy`: per-token log-probs of a micro-batch's completions, under the trainer's autocast;
* :mod:`.update`: the update knobs (:class:`~.update.UpdateSpec`), the update plan, the step-wide
  denominators and the micro-batch loss;
* :mod:`.parity`: the engine/trainer log-prob guard (:class:`~.parity.EngineParityError`);
* :mod:`.optim`: AdamW and its schedule, global gradient clipping, the non-finite step guard;
* :mod:`.distributed`: reductions over ranks, DDP's ``no_sync``, zero-loss backward passes, gathering;
* :mod:`.gap_trend`: whether the parity gap is rising over steps (pure, on the logged figures).

None of them holds a Trainer: they take what they need as arguments, so each can be tested alone.
"""
