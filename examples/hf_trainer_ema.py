"""An EMA of a Hugging Face model trained by ``transformers.Trainer``, resumed bit for bit.

A two-layer BERT classifier (built from a config: nothing is downloaded) learns a synthetic
task: 16 token ids from a vocabulary of 32, label 1 when the first token is below 16, with 30%
of the training labels flipped and a high learning rate, so the live weights stay noisy.
``functional_ema.transformers.EMACallback`` keeps the EMA: one update per optimizer step (here
with gradient accumulation over 2 micro-batches), the Trainer's evaluations every
``eval_every`` steps run on the averages, and each checkpoint folder gets an ``ema.pt``.

After training it evaluates the live weights (``trainer.evaluate()``) and the averages
(``with callback.ema.swap(): trainer.evaluate()``), then resumes a fresh Trainer from the
first checkpoint and checks that the final averages equal the uninterrupted run's bit for bit.

Run it on a CPU in a minute or two (needs ``functional_ema[transformers]``)::

    python examples/hf_trainer_ema.py
    python examples/hf_trainer_ema.py --steps 600 --output-dir /tmp/hf_ema
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built locally

from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from functional_ema.transformers import CHECKPOINT_FILE, EMACallback


VOCAB = 32
LENGTH = 16
NOISE = 0.3  # fraction of flipped training labels
DECAY = 0.98
LEARNING_RATE = 1e-2


def make_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=LENGTH,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def make_data(n: int, seed: int, noise: float) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=generator)
    labels = (ids[:, 0] < VOCAB // 2).long()
    flip = torch.rand(n, generator=generator) < noise
    labels = torch.where(flip, 1 - labels, labels)
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels, strict=True)]


def make_trainer(
    output_dir: Path, steps: int, eval_every: int, seed: int, callback: EMACallback
) -> Trainer:
    args = TrainingArguments(
        str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=16,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=256,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",  # no decay to zero: the live weights stay noisy
        eval_strategy="steps",
        eval_steps=eval_every,
        save_strategy="steps",
        save_steps=eval_every,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=make_model(seed),
        args=args,
        train_dataset=make_data(2048, seed=seed + 1, noise=NOISE),
        eval_dataset=make_data(512, seed=seed + 2, noise=0.0),
        callbacks=[EvalPrinter(), callback],
    )
    trainer.remove_callback(PrinterCallback)  # prints every log as a dict
    return trainer


class EvalPrinter(TrainerCallback):
    """One line per evaluation during training (instead of the Trainer's printed dicts)."""

    training = False

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.training = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.training = False

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        logs = kwargs.get("logs") or {}
        if self.training and "eval_loss" in logs:
            print(f"step {state.global_step:4d}: eval loss of the averages {logs['eval_loss']:.4f}")


def main(
    steps: int = 300, eval_every: int = 50, seed: int = 0, output_dir: str | None = None
) -> dict[str, Any]:
    """Train, evaluate live weights and averages, resume; return what was measured."""
    if steps < 2 * eval_every:
        raise ValueError(f"steps must be at least 2 * eval_every = {2 * eval_every}, got {steps}")
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(output_dir or scratch)
        callback = EMACallback(DECAY, use_num_updates=True)
        trainer = make_trainer(root / "run", steps, eval_every, seed, callback)
        trainer.train()
        live = trainer.evaluate()["eval_loss"]  # after training: the live weights
        with callback.ema.swap():
            averaged = trainer.evaluate()["eval_loss"]
        print(f"final eval loss: live weights {live:.4f}, averages {averaged:.4f}")

        # Resume from the first checkpoint (as after a crash), in a fresh folder.
        first = f"checkpoint-{eval_every}"
        shutil.copytree(root / "run" / first, root / "resumed" / first)
        print(f"resuming a fresh Trainer from a copy of {first}:")
        resumed = EMACallback(DECAY, use_num_updates=True)
        make_trainer(root / "resumed", steps, eval_every, seed, resumed).train(
            resume_from_checkpoint=str(root / "resumed" / first)
        )
        ours, theirs = callback.ema.state_dict(), resumed.ema.state_dict()
        identical = all(
            torch.equal(v, theirs[k]) if isinstance(v, torch.Tensor) else v == theirs[k]
            for k, v in ours.items()
        )
        print(
            f"resumed from {first}/{CHECKPOINT_FILE}: final averages "
            f"{'bit-identical' if identical else 'DIFFERENT'} to the uninterrupted run's"
        )
    return {"live_eval_loss": live, "ema_eval_loss": averaged, "resumed_bit_identical": identical}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None, help="keep the checkpoints here")
    options = parser.parse_args()
    main(options.steps, options.eval_every, options.seed, options.output_dir)
